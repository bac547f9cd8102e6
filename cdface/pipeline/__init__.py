"""The model pipeline above the stages: retraining (``cdface retrain``) and the served model's lifecycle.

It orchestrates training, export and the gallery, so it may import all three; nothing below imports it.
"""
