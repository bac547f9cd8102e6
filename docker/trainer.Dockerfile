# cdface trainer/exporter: CUDA PyTorch for `torchrun ... cdface train`, ONNX export, and the
# TensorRT engine build (`cdface export tensorrt`).
#
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/cdface/trainer:0.1.0 .
#
# torch comes from PyPI, pinned by pyproject.toml (train extra); its Linux wheels are CUDA builds
# that carry the CUDA runtime, cuDNN and NCCL as nvidia-* wheels, so the base image needs only the
# node's driver (mounted by the NVIDIA container toolkit / GPU operator).
#
# Driver: torch 2.13.0's PyPI wheel is built for CUDA 13, which needs NVIDIA driver R580 or newer
# on the node. TensorRT below is a CUDA 13 build too, as is the Triton image's (R580+ serves both).
# On nodes with an older driver (R535-R570), upgrade the driver or build this image with a CUDA 12
# torch 2.13.0 from PyTorch's own wheel index, if one is published.
#
# TensorRT must be the version inside the Triton image the chart runs: an engine only loads in
# the TensorRT that built it. tritonserver 25.08 (CUDA 13.0) ships TensorRT 10.13.2.6; change both
# together (helm/cdface/values.yaml triton.image.tag).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE}
ARG TENSORRT_VERSION=10.13.2.6
LABEL org.opencontainers.image.title="cdface-trainer" \
      org.opencontainers.image.source="https://github.com/cdface/cdface" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md docker/trainer-constraints.txt ./
COPY cdface ./cdface
COPY training ./training
COPY export ./export
COPY serving ./serving
# Every dependency at the version the tests ran with (torch's CUDA wheels bring their nvidia-* parts).
RUN pip install --no-cache-dir -c trainer-constraints.txt ".[train,export,serve]" \
 && pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com "tensorrt-cu13==${TENSORRT_VERSION}" \
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
