# syntax=docker/dockerfile:1
#
# embtrain server image.
#
#   GPU (default):  docker build -t embtrain:gpu .
#   CPU only:       docker build --build-arg VARIANT=cpu -t embtrain:cpu .
#
# torch's Linux wheels on PyPI are CUDA builds that carry the CUDA runtime libraries with them (as nvidia-* wheels),
# so both variants start from the same slim Python image: a GPU container needs nothing from CUDA but the host's
# driver, which the NVIDIA Container Toolkit mounts in (`docker run --gpus all`, Compose device reservations, or the
# Kubernetes device plugin). The PyPI build of torch 2.13.0 is built against CUDA 13.0 and needs a driver >= 580;
# for an older driver pick another CUDA build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   (or cu126, ...)
#
# Configuration, in rising precedence: defaults < the YAML file named by EMBTRAIN_CONFIG (mount it, e.g. at
# /etc/embtrain/config.yaml) < EMBTRAIN_* environment variables < flags after the image name. The server refuses a
# non-loopback address without authentication: mount a token file and point EMBTRAIN_TOKEN_FILE at it.
#
# See deploy/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------------
# builder: a virtual environment with torch and embtrain[server]; only /opt/venv leaves this stage.
FROM ${PYTHON_IMAGE} AS builder

ARG VARIANT=gpu
ARG TORCH_VERSION=2.13.0
# Empty means: PyPI for gpu (its torch is the CUDA build), PyTorch's CPU-only index for cpu (no CUDA libraries,
# an image several GiB smaller).
ARG TORCH_INDEX_URL=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is most of the image and changes far less often than the source.
RUN case "${VARIANT}" in \
      gpu) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      *) echo "VARIANT must be gpu or cpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY client/ client/
COPY server/ server/
# A regular (not editable) install: the runtime stage gets the venv only, not /src. The torch installed above
# already satisfies the server extra's torch requirement, so pip keeps it.
RUN pip install --no-cache-dir "./[server]" \
 && python -c "import torch, embtrain, embtrain_server; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---------------------------------------------------------------------------------------------------------------
# runtime: the venv, a non-root user and a writable state directory; nothing else.
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=gpu
LABEL org.opencontainers.image.title="embtrain" \
      org.opencontainers.image.description="Remote loss-and-mining service for training embedding models over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.embtrain.variant="${VARIANT}"

# EMBTRAIN_HOST and EMBTRAIN_STATE_DIR are facts about the container (listen on its own interface, keep checkpoints
# on the volume), so they are set here; as environment variables they win over the config file.
# NVIDIA_DRIVER_CAPABILITIES asks the container toolkit for the compute libraries, not just nvidia-smi; which GPUs
# are attached stays the runtime's decision (--gpus, device reservations, the device plugin).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EMBTRAIN_HOST=0.0.0.0 \
    EMBTRAIN_PORT=50051 \
    EMBTRAIN_STATE_DIR=/var/lib/embtrain \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/embtrain

RUN groupadd --system --gid 10001 embtrain \
 && useradd --system --uid 10001 --gid embtrain --home-dir /home/embtrain --create-home \
      --shell /usr/sbin/nologin embtrain \
 && install -d -o embtrain -g embtrain -m 0750 /var/lib/embtrain \
 && install -d -m 0755 /etc/embtrain

COPY --from=builder /opt/venv /opt/venv

# Numeric ids, so that Kubernetes' runAsNonRoot can verify them without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/embtrain

EXPOSE 50051 9400

# The gRPC health service answers without a token. Through sh so that a changed EMBTRAIN_PORT is followed, and
# any failure becomes exit 1, the only "unhealthy" status Docker defines.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/bin/sh", "-c", "embtrain --target \"127.0.0.1:${EMBTRAIN_PORT:-50051}\" --timeout 3 health || exit 1"]

# Exec form: the server is PID 1 and gets SIGTERM itself (it then drains for drain_seconds and checkpoints).
ENTRYPOINT ["embtrain-server"]
