"""Triton Python-backend model: serve a face-embedding ONNX file with ONNX Runtime.

Copied by ``export.triton_repo`` into ``<repo>/<model>/<version>/model.py`` beside ``model.onnx``.
It runs inside Triton's Python stub, in the server's environment (numpy < 2, onnxruntime), not in
cdface's: it must import nothing from cdface.

Triton has already checked dtype, dims and batch size against config.pbtxt before a request gets
here; the checks below repeat them so that a mismatched config cannot feed ONNX Runtime garbage.

Config ``parameters`` read here (all strings, as Triton passes them):
  intra_op_threads  ONNX Runtime threads inside one operator (default 1)
  inter_op_threads  threads across independent operators (default 1)
  onnx_file         the graph's file name in the version directory (default model.onnx)
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _error(message):
    # TritonError takes a status code since Triton 23.x; INVALID_ARG turns into HTTP 400 / gRPC
    # INVALID_ARGUMENT for the client instead of a generic internal error.
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}

        # args["model_repository"] is this model's directory; the version is a sub-directory of it.
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, params.get("onnx_file") or "model.onnx")

        options = ort.SessionOptions()
        # Triton runs one stub process per instance; each must stay within its share of the cores.
        options.intra_op_num_threads = int(params.get("intra_op_threads") or 1)
        options.inter_op_num_threads = int(params.get("inter_op_threads") or 1)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])

        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.input_dims = tuple(int(d) for d in config["input"][0]["dims"])
        self.input_dtype = pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.name = args["model_name"]

    def _check(self, array):
        """None when ``array`` is a valid batch, else one sentence saying what is wrong."""
        if array.dtype != self.input_dtype:
            return f"input {self.input_name!r} must be {np.dtype(self.input_dtype).name}, got {array.dtype.name}"
        # -1 in the config means "any size" for that dimension.
        if array.ndim != len(self.input_dims) + 1 or any(
                want not in (-1, got) for want, got in zip(self.input_dims, array.shape[1:])):
            return (f"input {self.input_name!r} must have shape [N, {', '.join(map(str, self.input_dims))}], "
                    f"got {list(array.shape)}")
        if array.shape[0] < 1 or (self.max_batch_size and array.shape[0] > self.max_batch_size):
            return f"batch size {array.shape[0]} is outside 1..{self.max_batch_size}"
        return None

    def execute(self, requests):
        # The dynamic batcher hands several requests to one call; run them as one ONNX Runtime batch
        # (that is the whole point of batching) and cut the result back into per-request responses.
        responses = [None] * len(requests)
        batches, owners = [], []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses[i] = _error(f"request has no input {self.input_name!r}")
                continue
            array = tensor.as_numpy()
            problem = self._check(array)
            if problem is not None:
                responses[i] = _error(problem)
                continue
            batches.append(array)
            owners.append(i)

        if batches:
            merged = batches[0] if len(batches) == 1 else np.concatenate(batches, axis=0)
            try:
                output = self.session.run([self.output_name], {self.input_name: merged})[0]
            except Exception as exc:  # one failed run fails every request that was part of it
                for i in owners:
                    responses[i] = _error(f"ONNX Runtime failed: {exc}")
                return responses
            output = output.astype(self.output_dtype, copy=False)
            start = 0
            for i, array in zip(owners, batches):
                end = start + array.shape[0]
                tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(output[start:end]))
                responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
                start = end
        return responses

    def finalize(self):
        self.session = None
