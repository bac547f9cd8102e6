"""The facts of the model contract that every stage shares (torch-free).

Models take aligned 112x112 RGB crops. Training and the PyTorch backbones see float NCHW
``(pixel - MEAN) / STD``; exported ONNX graphs take uint8 NHWC under ``INPUT_NAME``, fold that
step in, and return L2-normalised float32 embeddings under ``OUTPUT_NAME``. Export writes these
names, Triton's config declares them, serving and evaluation call them: each reads them from here.
"""

from typing import Final

INPUT_SIZE: Final = 112
PIXEL_MEAN: Final = 127.5
PIXEL_STD: Final = 127.5
EMBEDDING_SIZE: Final = 512

INPUT_NAME: Final = "images"  # uint8 [N, INPUT_SIZE, INPUT_SIZE, 3], RGB, aligned crops
OUTPUT_NAME: Final = "embedding"  # float32 [N, D], L2-normalised

# An exported graph must agree with the model it came from to this cosine on every face of its
# check batch, or nothing is written (ONNX export and third-party wraps alike).
PARITY_MIN_COSINE: Final = 0.99999
