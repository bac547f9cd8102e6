"""benchmarks.gpu's harness on the CPU: a lent GPU machine must not be the first place it runs.

The training part is train_step's own harness (it writes the committed CPU results, so it is not run
here); inference and search run end to end into a temporary results folder.
"""

import json

import pytest

from benchmarks import gpu

pytestmark = pytest.mark.slow


def test_inference_and_search_write_their_results(tmp_path, capsys):
    gpu.main(["--device", "cpu", "--quick", "--backbone", "ir18", "--parts", "inference", "search",
              "--inference-batches", "1", "4", "--rounds", "2", "--queries", "20", "--results-dir", str(tmp_path)])
    inference = json.loads((tmp_path / "gpu_inference_ir18_cpu_quick.json").read_text())
    details = inference["details"]
    arms = set(details["batch4"]["images_per_s"])
    assert {"torch_eager_fp32", "torch_channels_last", "torch_compile", "ort_cpu_fp32"} <= arms
    assert inference["value"] == details["batch4"]["images_per_s"][details["batch4"]["best"]]["median"] > 0
    # Every arm computes the same embeddings (fp32 on the CPU): a fast wrong arm must show here.
    assert min(details["cosine_to_eager_fp32_min"].values()) > 0.999
    assert details["skipped"] == {}
    search = json.loads((tmp_path / "gpu_exact_search_cpu_quick.json").read_text())
    assert search["details"]["recall_at_1"] == 1.0  # exact search, float32: it must find the CPU's answer
    assert search["details"]["gallery"] == 20_000 and "faiss-gpu not installed" in search["details"]["engine"]
    assert search["details"]["p99_ms"] >= search["details"]["p50_ms"] > 0


def test_a_missing_gpu_is_one_line_not_a_traceback():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA device here"):
        gpu.main(["--parts", "search"])
