"""Export stage: ONNX, TensorRT engines, Triton model repositories."""
