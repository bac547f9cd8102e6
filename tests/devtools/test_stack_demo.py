"""The README's main job (`make demo`) end to end: Triton + gateway on localhost, the real photos."""

from __future__ import annotations

import pytest

from cdface.devtools import stack_demo as demo

pytestmark = pytest.mark.slow


def test_demo_brings_up_the_stack_and_answers_on_real_photos(tmp_path, capsys):
    results = demo.main(["--workdir", str(tmp_path / "demo"), "--once", "--port", "0"])
    assert results["identify"] == {"obama2": "obama", "obama3": "obama"}
    assert results["verify_obama_biden"] is False and results["verify_obama3_obama"] is True
    assert results["group_faces"] == 6
    out = capsys.readouterr().out
    assert "serving model: SFace" in out
    assert "curl -s -X POST" in out and "/v1/identify" in out
    assert "stopped gateway" in out and "stopped Triton Inference Server" in out
