"""Training data: identity folders, InsightFace RecordIO, synthetic identities, samplers."""
