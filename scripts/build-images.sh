#!/usr/bin/env bash
# Build FedSegNet's two images (what `make images` runs):
#   fedsegnet/aggregator:VERSION    aggregator-service, no torch      (docker/aggregator.Dockerfile)
#   fedsegnet/client-agent:VERSION  client-agent and fedseg, torch    (docker/client-agent.Dockerfile)
#
#   scripts/build-images.sh [--offline] [aggregator|client-agent ...]
#
# Default: from the registries, as on a developer's or a CI machine with Docker Hub and PyPI:
#   BASE_IMAGE=python:3.11-slim-bookworm, packages from the index, TORCH_SPEC=torch==2.13.0 (PyPI's
#   CUDA build, for GPU nodes).
# --offline: the image builds run with no network at all. The base is made from Debian's archive
#   (scripts/make-base-image.sh, once), the wheels are downloaded on the host with pip into
#   build/wheels/IMAGE/ (once per pyproject.toml and TORCH_SPEC) and installed with
#   `pip install --no-index --find-links /wheels`; TORCH_SPEC defaults to torch==2.13.0+cpu.
#
# Environment: ENGINE (podman or docker; podman by default), BASE_IMAGE, TORCH_SPEC,
# TORCH_INDEX_URL (an index for torch alone, e.g. PyTorch's CPU index), PYTHON (the host Python
# that downloads wheels; python3), EXTRA_BUILD_ARGS (more arguments for `ENGINE build`).
set -euo pipefail
# shellcheck source=scripts/lib-containers.sh
. "$(dirname "$0")/lib-containers.sh"

offline=0
images=()
for arg in "$@"; do
    case "$arg" in
        --offline) offline=1 ;;
        aggregator|client-agent) images+=("$arg") ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) die "unknown argument $arg (expected --offline, aggregator, client-agent)" ;;
    esac
done
[ ${#images[@]} -gt 0 ] || images=(aggregator client-agent)
command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed"
PYTHON=${PYTHON:-python3}

if [ "$offline" = 1 ]; then
    BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE_IMAGE}
    TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
    if [ "$BASE_IMAGE" = "$LOCAL_BASE_IMAGE" ]; then
        "$REPO_ROOT/scripts/make-base-image.sh"
    fi
else
    BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
    TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
fi

# Download every wheel IMAGE needs, for the image's Python (CPython 3.11, glibc x86_64), into
# build/wheels/IMAGE/; skipped when the stamp says pyproject.toml and TORCH_SPEC are unchanged.
download_wheels() {
    local image=$1 dir="$REPO_ROOT/build/wheels/$1" stamp requirements=()
    case "$image" in
        aggregator) requirements=(".") ;;
        client-agent) requirements=(".[client]" "$TORCH_SPEC") ;;
    esac
    stamp=$(cat "$REPO_ROOT/pyproject.toml" <(echo "$TORCH_SPEC") | sha256sum | cut -c1-16)
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
        log "$image: wheels in build/wheels/$image are current"
        return
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    log "$image: downloading wheels into build/wheels/$image"
    # Every manylinux tag that bookworm's glibc (2.36) runs: pip does not widen --platform itself.
    local extra=() glibc
    for glibc in $(seq 36 -1 17); do extra+=(--platform "manylinux_2_${glibc}_x86_64"); done
    extra+=(--platform manylinux2014_x86_64)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then extra+=(--extra-index-url "$TORCH_INDEX_URL"); fi
    (cd "$REPO_ROOT" && "$PYTHON" -m pip download --quiet --disable-pip-version-check \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        "${extra[@]}" --dest "$dir" \
        "${requirements[@]}" "setuptools>=68") || die "$image: pip download failed"
    echo "$stamp" >"$dir/.stamp"
}

build() {
    local image=$1 ref dockerfile args=()
    case "$image" in
        aggregator) ref=$AGGREGATOR_REF ;;
        client-agent) ref=$CLIENT_AGENT_REF
            args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC" --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}") ;;
    esac
    dockerfile="docker/$image.Dockerfile"
    args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    if [ "$offline" = 1 ]; then
        download_wheels "$image"
        args+=(--build-arg "WHEELS_DIR=build/wheels/$image" --network none)
    fi
    # shellcheck disable=SC2206  # EXTRA_BUILD_ARGS is a list of words by design
    args+=(${EXTRA_BUILD_ARGS:-})
    log "$image: building $ref from $BASE_IMAGE"
    local started=$SECONDS
    (cd "$REPO_ROOT" && "$ENGINE" build --file "$dockerfile" --tag "$ref" "${args[@]}" .) \
        || die "$image: build failed"
    log "$image: built $ref in $((SECONDS - started))s ($("$ENGINE" image inspect --format '{{.Size}}' "$ref" \
        | awk '{printf "%.0f MB", $1 / 1e6}'))"
}

for image in "${images[@]}"; do
    build "$image"
done
