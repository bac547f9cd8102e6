"""Model code that ``export.triton_repo`` copies into Triton model repositories.

``model.py`` runs inside Triton's Python-backend stub, in the server's own environment (numpy < 2,
onnxruntime); it is never imported by cdface itself.
"""
