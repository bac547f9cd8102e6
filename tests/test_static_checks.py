"""The package code passes its static checks: the import contracts, ruff and mypy (settings in pyproject.toml).

The contracts are also shown to bite: a forbidden import added to a copy of the package, inside a
function as the stages import heavy modules, breaks exactly the contract that forbids it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from cdface.devtools.checks import installed_layout, run_import_contracts, run_mypy, run_ruff

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def layout(tmp_path) -> Path:
    return installed_layout(ROOT, tmp_path / "site")


def test_import_contracts_hold(layout):
    done = run_import_contracts(ROOT, layout)
    assert done.returncode == 0, done.stdout + done.stderr
    declared = len(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"])
    assert declared >= 6  # layers, core, serving, training, export, client
    assert f"Contracts: {declared} kept, 0 broken." in done.stdout, done.stdout


@pytest.mark.parametrize(("contract", "module", "line"), [
    ("serving", "cdface/serving/settings.py", "import torch"),
    ("serving", "cdface/serving/settings.py", "from cdface.training import trainer"),
    ("core", "cdface/core/manifest.py", "from cdface.serving import settings"),
    ("core", "cdface/core/imaging.py", "import torch"),
    ("training", "cdface/training/losses.py", "from cdface.export import onnx_export"),
    ("export", "cdface/export/triton_repo.py", "from cdface.serving import settings"),
    ("layers", "cdface/core/contract.py", "from cdface import cli"),
])
def test_a_forbidden_import_breaks_its_contract(layout, contract, module, line):
    path = layout / module
    path.write_text(path.read_text() + f"\n\ndef _forbidden():\n    {line}  # noqa\n")
    done = run_import_contracts(ROOT, layout, (contract,))
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout and module.removesuffix(".py").replace("/", ".") in done.stdout, done.stdout


def test_ruff_is_clean():
    done = run_ruff(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_is_clean(layout):
    done = run_mypy(ROOT, layout)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
