"""Evaluation: verification benchmarks, TAR@FAR, IJB-style templates, plots."""
