#!/usr/bin/env bash
# Deployment smoke test: the real images and the real k8s/ manifests, played by podman on this
# machine; CI runs it after the unit tests.
#
#   1. build both images with no network in the build (scripts/build-images.sh --offline)
#   2. make two tiny sites (fedseg make-data) and a PKI (CA, aggregator, site-1, site-2)
#   3. play k8s/ with `podman kube play` (a variant made by scripts/podman_variant.py: host
#      loopback network, hostPath folders for volumes and Secrets, the tiny federation, CPU)
#   4. check: the initial-model init container ran; the aggregator answers SERVING on its health
#      service over mutual TLS and refuses plaintext there; its health port (FEDSEG_HEALTH_LISTEN,
#      what the kubelet's grpc probes call) answers SERVING in plaintext and serves nothing but
#      health; /metrics answers; both site agents finish
#      one round and exit 0; the store says the federation finished; containers ran read-only
#      as uid 10001
#   5. tear everything down (also on failure)
#
# Exits 0 with a "SKIP: reason" line where it cannot run (not root; podman, runc or debootstrap
# cannot be installed; podman cannot start a container here), 1 when a check fails.
# Cold (no base, images or wheels yet) 5.5 min on 2 idle cores, 3 of them the client-agent image,
# plus ~30 s to install podman on a new machine; with the images cached ~1 min (rebuilt layers:
# 2-3 min). On 2 cores shared with other jobs (load ~20) it measured 21.5 min cold (debootstrap
# 4.5, client-agent image 10) and 4 min warm: well inside CI's 90 min with the unit tests.
#
# Environment: PYTHON (the project's venv python; default .venv/bin/python), KEEP=1 keeps the
# work folder and the pods for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

skip() { echo "SKIP: deploy smoke test: $*"; exit 0; }

[ "$(id -u)" = 0 ] || skip "needs root (podman with runc, debootstrap, chown to the containers' uid)"
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} from Debian's archive"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap uidmap; } \
        >/tmp/fedsegnet-smoke-apt.log 2>&1 || skip "could not install podman/runc/debootstrap (see /tmp/fedsegnet-smoke-apt.log)"
fi
# shellcheck source=scripts/lib-containers.sh
. scripts/lib-containers.sh
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || die "no project venv at $PYTHON (run make setup, or set PYTHON)"

# 1. images (the base first: it is also the probe that podman can run a container here)
scripts/make-base-image.sh || skip "could not make the base image from Debian's archive"
if ! probe=$(podman run --rm --network none "$LOCAL_BASE_IMAGE" true 2>&1); then
    skip "podman cannot start a container on this machine: $probe"
fi
scripts/build-images.sh --offline
images_done=$SECONDS

# 2. data, PKI and the folders that stand in for volumes and Secrets
work=$(mktemp -d "${TMPDIR:-/tmp}/fedsegnet-smoke.XXXXXX")
chmod 755 "$work"
play="$work/play.yaml"
init="$work/init.yaml"
cleanup() {
    local status=$?
    if [ "${KEEP:-0}" = 1 ]; then
        log "KEEP=1: pods and $work left in place (podman kube down $play; rm -rf $work)"
        exit "$status"
    fi
    if [ -f "$play" ]; then
        # Bounded: a wedged podman must not hold CI until its time runs out.
        local file
        for file in "$play" "$init"; do
            timeout 120 podman kube down "$file" >/dev/null 2>&1 || true
        done
        local pod
        for pod in $(timeout 30 podman pod ps --format '{{.Name}}' | grep '^fedsegnet-' || true); do
            timeout 60 podman pod rm --force "$pod" >/dev/null 2>&1 || log "could not remove pod $pod"
        done
        # The volumes podman made for the pods' emptyDirs and ConfigMaps.
        if [ -s "$work/volumes.txt" ]; then
            # shellcheck disable=SC2046  # one volume name a line, no spaces
            timeout 60 podman volume rm --force $(cat "$work/volumes.txt") >/dev/null 2>&1 || true
        fi
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

sites=(site-1 site-2)
log "making 2 tiny sites and a PKI in $work"
"$PYTHON" -m fedseg make-data --out "$work/data" --sites 2 --cases 2 --test-cases 1 --size 32 >/dev/null
"$PYTHON" -m fedseg certs init --dir "$work/pki" >/dev/null
"$PYTHON" -m fedseg certs server --dir "$work/pki" --dns localhost --ip 127.0.0.1 >/dev/null
mkdir -p "$work/store" "$work/revoked" "$work/tls/aggregator"
cp "$work/pki/revoked.txt" "$work/revoked/revoked.txt"
cp "$work/pki/server/aggregator.crt" "$work/tls/aggregator/tls.crt"
cp "$work/pki/server/aggregator.key" "$work/tls/aggregator/tls.key"
cp "$work/pki/ca.crt" "$work/tls/aggregator/ca.crt"
site_args=()
for site in "${sites[@]}"; do
    "$PYTHON" -m fedseg certs site "$site" --dir "$work/pki" >/dev/null
    mkdir -p "$work/tls/$site" "$work/state/$site"
    cp "$work/pki/sites/$site.crt" "$work/tls/$site/tls.crt"
    cp "$work/pki/sites/$site.key" "$work/tls/$site/tls.key"
    cp "$work/pki/ca.crt" "$work/tls/$site/ca.crt"
    site_args+=(--site "$site=$work/data/$site")
done
# The containers run as uid 10001 (podman plays no fsGroup): give them what Kubernetes would.
chown -R 10001:10001 "$work/store" "$work/revoked" "$work/tls" "$work/state"
chmod -R a+rX "$work/data"

dump_logs() {
    local c
    for c in $(timeout 30 podman ps -a --format '{{.Names}}' | grep '^fedsegnet-' | grep -v infra); do
        echo "---- podman logs $c (last 30 lines)" >&2
        timeout 30 podman logs --tail 30 "$c" >&2 2>&1 || true
    done
}
fail() { log "FAIL: $*"; dump_logs; exit 1; }

# 3. play the manifests on loopback ports nobody else holds
read -r grpc_port metrics_port health_port < <("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
"$PYTHON" scripts/podman_variant.py --workdir "$work" --grpc-port "$grpc_port" --metrics-port "$metrics_port" \
    --health-port "$health_port" --init-out "$init" --volumes-out "$work/volumes.txt" "${site_args[@]}" >"$play"
log "podman kube play: the aggregator's init container (fedseg init-model)"
timeout 300 podman kube play --replace --quiet "$init" >/dev/null || fail "podman kube play $init failed"
status=$(timeout 300 podman wait fedsegnet-aggregator-initial-model-initial-model) || fail "the init container did not finish"
[ "$status" = 0 ] || fail "the init container exited with status $status"
log "podman kube play: aggregator on 127.0.0.1:$grpc_port (metrics :$metrics_port, health :$health_port), site-1, site-2"
timeout 300 podman kube play --replace --quiet "$play" >/dev/null || fail "podman kube play $play failed"

aggregator=$(podman ps -a --format '{{.Names}}' | grep '^fedsegnet-aggregator-.*-aggregator$' | head -n 1 || true)
[ -n "$aggregator" ] || fail "no aggregator container was started"

# 4. checks
[ -s "$work/store/initial-model.frames" ] || fail "the initial-model init container wrote no model"
tls_site1="$work/tls/site-1"
"$PYTHON" scripts/smoke_checks.py health --target "127.0.0.1:$grpc_port" --tls "$tls_site1" --timeout 120 \
    || fail "the aggregator's health service did not say SERVING"
"$PYTHON" scripts/smoke_checks.py health --target "127.0.0.1:$grpc_port" --tls "$tls_site1" --service "" --timeout 10 \
    || fail "the aggregator's overall health is not SERVING"
if "$PYTHON" scripts/smoke_checks.py health --target "127.0.0.1:$grpc_port" --timeout 3 >/dev/null 2>&1; then
    fail "the aggregator answered a plaintext client: mutual TLS is not in force"
fi
# What the kubelet's probes see: plaintext, the health service alone.
"$PYTHON" scripts/smoke_checks.py health --target "127.0.0.1:$health_port" --timeout 10 \
    || fail "the aggregator's plaintext health port did not say SERVING"
"$PYTHON" scripts/smoke_checks.py health-only --target "127.0.0.1:$health_port" \
    || fail "the aggregator's plaintext health port serves more than the health service"
"$PYTHON" scripts/smoke_checks.py metrics --url "http://127.0.0.1:$metrics_port/metrics" \
    || fail "/metrics did not answer"

for site in "${sites[@]}"; do
    container="fedsegnet-$site-client-agent"
    log "waiting for $container"
    status=$(timeout 600 podman wait "$container") || fail "$container did not finish within 10 minutes"
    [ "$status" = 0 ] || fail "$container exited with status $status"
done
"$PYTHON" scripts/smoke_checks.py status --target "127.0.0.1:$grpc_port" --tls "$tls_site1" --rounds 1 \
    || fail "the federation did not complete its round"
grep -q '"finished"' "$work/store/store/state.json" || fail "the store does not say the federation finished"
for container in "$aggregator" "fedsegnet-site-1-client-agent"; do
    security=$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}' "$container")
    [ "$security" = "true 10001:10001" ] || fail "$container ran with rootfs read-only/user = $security"
done

log "PASS: deploy smoke test (images $((images_done - started))s, federation $((SECONDS - images_done))s)"
