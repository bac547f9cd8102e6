"""Facts about the model input that every stage shares (torch-free).

Models take aligned 112x112 RGB crops. Training and the PyTorch backbones see float NCHW
``(pixel - MEAN) / STD``; exported ONNX graphs take uint8 NHWC and fold that step in.
"""

INPUT_SIZE = 112
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5
EMBEDDING_SIZE = 512
