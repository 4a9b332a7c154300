# Shared by scripts/*.sh (sourced, not run): the container engine, its settings, the image names.
# shellcheck shell=bash
# shellcheck disable=SC2034  # the names defined here are used by the scripts that source this file

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=docker/images.env
. "$REPO_ROOT/docker/images.env"
VERSION=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$REPO_ROOT/pyproject.toml" | head -n 1)
AGGREGATOR_REF="$AGGREGATOR_IMAGE:$VERSION"
CLIENT_AGENT_REF="$CLIENT_AGENT_IMAGE:$VERSION"
ENGINE=${ENGINE:-podman}
# runc and explicit ulimits (docker/containers.conf says why); an operator's own file wins.
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
    export CONTAINERS_CONF="$REPO_ROOT/docker/containers.conf"
fi

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The Debian archive this machine's apt uses (override with DEBIAN_MIRROR).
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local found=""
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        found=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$found" ] && [ -r /etc/apt/sources.list ]; then
        found=$(awk '$1 == "deb" && $3 ~ /^bookworm/ {print $2; exit}' /etc/apt/sources.list)
    fi
    [ -n "$found" ] || die "no Debian mirror in /etc/apt/sources.list*; set DEBIAN_MIRROR"
    echo "$found"
}

image_exists() { "$ENGINE" image exists "$1" 2>/dev/null || "$ENGINE" image inspect "$1" >/dev/null 2>&1; }
