# cdface trainer/exporter: CUDA PyTorch for `torchrun ... cdface train`, ONNX export, and the
# TensorRT engine build that runs as Triton's init container.
#
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/cdface/trainer:0.1.0 .
#
# torch comes from PyPI, pinned by pyproject.toml (train extra); its Linux wheels are CUDA builds
# that carry the CUDA runtime, cuDNN and NCCL as nvidia-* wheels, so the base image needs only the
# node's driver (mounted by the NVIDIA container toolkit / GPU operator).
#
# TensorRT must be the version inside the Triton image the chart runs: an engine only loads in
# the TensorRT that built it. tritonserver 24.08 ships TensorRT 10.3.0; change both together.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE}
ARG TENSORRT_VERSION=10.3.0
LABEL org.opencontainers.image.title="cdface-trainer" \
      org.opencontainers.image.source="https://github.com/cdface/cdface" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cdface ./cdface
COPY training ./training
COPY export ./export
COPY serving ./serving
RUN pip install ".[train,export]" \
 && pip install --extra-index-url https://pypi.nvidia.com "tensorrt-cu12==${TENSORRT_VERSION}" \
 && rm -rf /src
RUN groupadd --system --gid 10001 cdface \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin cdface
# HOME on the writable /tmp volume: torch, matplotlib and TensorRT write caches under it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    CDFACE_CACHE=/tmp/cdface-cache
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT []
CMD ["cdface", "--help"]
