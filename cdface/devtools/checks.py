"""Static checks of the package code: ruff, the import contracts (import-linter) and mypy.

    python -m cdface.devtools.checks            # all three, from the repository root
    python -m cdface.devtools.checks imports    # or one: ruff | imports | mypy

import-linter and mypy read a package from one directory tree, while the repository keeps the
stages in top-level folders that setuptools maps into ``cdface.*`` (``package-dir`` in
pyproject.toml). So those two run on a copy laid out as a wheel installs it; ruff reads the
folders as they are. Settings live in pyproject.toml (``[tool.ruff]``, ``[tool.importlinter]``,
``[tool.mypy]``); tests/test_static_checks.py runs this module.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cdface.core.errors import CdfaceError, exit_on_error

TOOLS = ("ruff", "imports", "mypy")


def repository_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding cdface's pyproject.toml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and 'name = "cdface"' in pyproject.read_text():
            return folder
    raise CdfaceError(f"no cdface pyproject.toml at or above {here}; run from the repository")


def package_dirs(root: Path) -> dict[str, str]:
    """pyproject.toml's package -> folder mapping (``[tool.setuptools.package-dir]``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the package runs there, its development checks need 3.11
        raise CdfaceError("the static checks need Python 3.11 or later (tomllib)") from None
    return tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def installed_layout(root: Path, into: Path) -> Path:
    """Copy the package sources into ``into`` as a wheel lays them out; return ``into`` (the folder for sys.path)."""
    for package, folder in package_dirs(root).items():
        shutil.copytree(root / folder, into.joinpath(*package.split(".")), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return into


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_ruff(root: Path) -> subprocess.CompletedProcess:
    folders = sorted(set(package_dirs(root).values()))
    return subprocess.run([_tool("ruff"), "check", "--no-cache", *folders], cwd=root, capture_output=True,
                          text=True, timeout=300)


def run_import_contracts(root: Path, layout: Path, contracts: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = [_tool("lint-imports"), str(root / "pyproject.toml"), "--no-cache", "--no-logo"]
    for contract in contracts:
        args += ["--contract", contract]
    # From the layout, so that `cdface` is found there and not in the repository.
    return subprocess.run(args, cwd=layout, env={**os.environ, "PYTHONPATH": str(layout)}, capture_output=True,
                          text=True, timeout=300)


def run_mypy(root: Path, layout: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("mypy"), "--config-file", str(root / "pyproject.toml"), "-p", "cdface"],
                          cwd=layout, env={**os.environ, "PYTHONPATH": str(layout)}, capture_output=True,
                          text=True, timeout=900)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tools", nargs="*", metavar="TOOL", help=f"any of {', '.join(TOOLS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tools) - set(TOOLS))
    if unknown:
        raise CdfaceError(f"unknown check {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    root = repository_root()
    failed = []
    with tempfile.TemporaryDirectory(prefix="cdface-checks-") as tmp:
        layout = installed_layout(root, Path(tmp))
        for tool in args.tools or TOOLS:
            done = {"ruff": lambda: run_ruff(root), "imports": lambda: run_import_contracts(root, layout),
                    "mypy": lambda: run_mypy(root, layout)}[tool]()
            print(f"== {tool}: {'ok' if done.returncode == 0 else 'FAILED'}")
            if done.returncode != 0:
                print((done.stdout + done.stderr).strip())
                failed.append(tool)
    if failed:
        raise CdfaceError(f"{', '.join(failed)} found problems (above)")


if __name__ == "__main__":
    exit_on_error(main, "cdface checks")
