# FedSegNet aggregator: `aggregator-service` with its gRPC server, health service and /metrics.
# No torch: the aggregator works on numpy arrays (DESIGN.md), so the image is a fraction of the
# client-agent's (313 MB vs 1.4 GB with the CPU torch, both on the Debian base of --offline).
#
#   podman build -f docker/aggregator.Dockerfile -t fedsegnet/aggregator:0.1.0 .
#   scripts/build-images.sh [--offline]          (both images; what `make images` runs)
#
# Build arguments:
#   BASE_IMAGE  a Debian bookworm image with python3 (3.11) and its venv module. The default is
#               the official Python image; offline builds use one made from Debian's archive
#               (scripts/make-base-image.sh). Both stages use it, so the venv's interpreter link
#               stays valid.
#   WHEELS_DIR  a folder of the build context holding every wheel needed (setuptools included):
#               then pip installs with --no-index from it. The default has none: install from the index.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the project and its aggregator-only dependencies ----
FROM ${BASE_IMAGE} AS build
ARG WHEELS_DIR=docker/no-wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY ${WHEELS_DIR}/ /wheels/
RUN python3 -m venv /opt/fedsegnet
# Only what the aggregator imports: protos, codec, aggregator_service (no torch, no model code),
# and the `fedseg` dispatcher, whose `fedseg certs` needs nothing more.
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY codec/ codec/
COPY aggregator_service/ aggregator_service/
COPY fedseg/ fedseg/
# The import check fails the build, not the first pod, on a missing dependency. pip and setuptools
# are tools for building, not for running, so they leave the environment.
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; else set --; fi; \
    /opt/fedsegnet/bin/pip install --no-cache-dir "$@" . ; \
    /opt/fedsegnet/bin/python -c "import aggregator_service.server, aggregator_service.certs, fedseg.cli, grpc_health, grpc_reflection, zstandard"; \
    /opt/fedsegnet/bin/python -m pip uninstall --yes --quiet pip setuptools

# ---- final: the base image, a non-root user and the virtual environment; nothing else ----
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="fedsegnet-aggregator" \
      org.opencontainers.image.description="FedSegNet aggregator-service (gRPC, health, reflection, Prometheus /metrics)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --gid 10001 fedsegnet \
 && useradd --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/fedsegnet --create-home \
            --shell /usr/sbin/nologin fedsegnet
COPY --from=build /opt/fedsegnet /opt/fedsegnet
ENV PATH=/opt/fedsegnet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEDSEG_STORE=/var/lib/fedsegnet/store
USER 10001:10001
WORKDIR /var/lib/fedsegnet
# gRPC (FEDSEG_LISTEN) and Prometheus /metrics (FEDSEG_METRICS_LISTEN).
EXPOSE 50051 9090
ENTRYPOINT ["aggregator-service"]
