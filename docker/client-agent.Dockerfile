# FedSegNet site agent: `client-agent` (training on the site's NIfTI data) with torch, MONAI and
# nibabel; also carries `fedseg init-model`, which writes a federation's initial model.
#
#   podman build -f docker/client-agent.Dockerfile -t fedsegnet/client-agent:0.1.0 .
#   scripts/build-images.sh [--offline]          (both images; what `make images` runs)
#
# Build arguments:
#   BASE_IMAGE       as in aggregator.Dockerfile (a Debian bookworm image with python3 3.11 + venv).
#   TORCH_SPEC       the torch requirement, installed before the project so that nothing else
#                    picks the build. The default, torch==2.13.0 from PyPI, is the CUDA build for
#                    GPU nodes (its CUDA runtime comes in pip wheels; the node needs only the
#                    NVIDIA driver). `torch==2.13.0+cpu` with a CPU index or wheel is the CPU build.
#   TORCH_INDEX_URL  an index for torch alone (e.g. PyTorch's CPU wheel index); empty: the default index.
#   WHEELS_DIR       a folder of the build context holding every wheel needed (torch and setuptools
#                    included): pip installs with --no-index from it. The default has none.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch, then the project with its [client] extra ----
FROM ${BASE_IMAGE} AS build
ARG WHEELS_DIR=docker/no-wheels
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY ${WHEELS_DIR}/ /wheels/
RUN python3 -m venv /opt/fedsegnet
# torch first, in its own layer: it is by far the largest and changes least often.
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; \
    elif [ -n "${TORCH_INDEX_URL}" ]; then set -- --index-url "${TORCH_INDEX_URL}"; \
    else set --; fi; \
    /opt/fedsegnet/bin/pip install --no-cache-dir "$@" "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY codec/ codec/
COPY model/ model/
COPY aggregator_service/ aggregator_service/
COPY fedseg/ fedseg/
COPY client_agent/ client_agent/
COPY experiments/ experiments/
# The import check fails the build, not the first pod, on a missing dependency. pip leaves the
# environment (a tool for building); setuptools stays because torch requires it at run time.
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; else set --; fi; \
    /opt/fedsegnet/bin/pip install --no-cache-dir "$@" ".[client]"; \
    /opt/fedsegnet/bin/python -c "import torch, monai, nibabel, client_agent.agent, fedseg.cli, client_agent.inference, experiments.simulate"; \
    /opt/fedsegnet/bin/python -m pip uninstall --yes --quiet pip

# ---- final: the base image, a non-root user and the virtual environment; nothing else ----
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fedsegnet-client-agent" \
      org.opencontainers.image.description="FedSegNet client-agent (site training on NIfTI data) and fedseg init-model" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --gid 10001 fedsegnet \
 && useradd --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/fedsegnet --create-home \
            --shell /usr/sbin/nologin fedsegnet
COPY --from=build /opt/fedsegnet /opt/fedsegnet
ENV PATH=/opt/fedsegnet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEDSEG_DATA=/nifti \
    FEDSEG_STATE_DIR=/var/lib/fedsegnet/state
USER 10001:10001
WORKDIR /var/lib/fedsegnet
ENTRYPOINT ["client-agent"]
