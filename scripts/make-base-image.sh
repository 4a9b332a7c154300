#!/usr/bin/env bash
# Make the offline base image (fedsegnet-base:bookworm): Debian bookworm minbase with python3 (3.11),
# its venv module and CA certificates, from Debian's archive with debootstrap, imported into podman.
# It stands in for python:3.11-slim-bookworm where no image registry can be reached; the Dockerfiles
# build unchanged on either (BASE_IMAGE). Needs root and debootstrap. Takes ~1.5 min, ~280 MB.
#
#   scripts/make-base-image.sh [--force]
set -euo pipefail
# shellcheck source=scripts/lib-containers.sh
. "$(dirname "$0")/lib-containers.sh"

force=0
[ "${1:-}" = "--force" ] && force=1
if [ "$force" = 0 ] && image_exists "$LOCAL_BASE_IMAGE"; then
    log "$LOCAL_BASE_IMAGE exists (--force remakes it)"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/fedsegnet-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
mirror=$(debian_mirror)
log "debootstrap bookworm from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed"; }
rm -f "$rootfs.log"
# Package caches and lists are build leftovers, not part of a base image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
tar --numeric-owner -C "$rootfs" -c . \
    | "$ENGINE" import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$LOCAL_BASE_IMAGE" >/dev/null
log "made $LOCAL_BASE_IMAGE ($("$ENGINE" run --rm "$LOCAL_BASE_IMAGE" python3 --version))"
