"""Serving stage: FastAPI gateway, Triton client, detection/alignment, gallery. Never imports torch."""
