"""``cdface data`` through the installed entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CDFACE = Path(sys.executable).parent / "cdface"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CDFACE), "data", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("data_format", ["recordio", "folder"])
def test_synth_then_info(tmp_path, data_format):
    out = tmp_path / "set"
    result = _run("synth", "--out", str(out), "--identities", "4", "--per-identity", "3", "--hard-share", "0.25",
                  "--format", data_format, "--seed", "1", "--val-identities", "3", "--val-pairs", "4")
    assert result.returncode == 0, result.stderr
    assert (out / "val.bin").is_file() and (out / "synthetic.json").is_file()
    info = _run("info", str(out))
    assert info.returncode == 0, info.stderr
    assert "samples:    12" in info.stdout and "identities: 4" in info.stdout
    assert "per identity: min 3, median 3, max 3" in info.stdout
    assert "4 pairs (2 same, 2 different)" in _run("info", str(out / "val.bin")).stdout
    if data_format == "folder":
        converted = _run("to-recordio", str(out), str(tmp_path / "rec"))
        assert converted.returncode == 0, converted.stderr
        assert "samples:    12" in _run("info", str(tmp_path / "rec")).stdout


def test_bad_path_is_one_line_and_exit_code_2(tmp_path):
    result = _run("info", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_for_each_command():
    for command in ("synth", "to-recordio", "info"):
        result = _run(command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout
