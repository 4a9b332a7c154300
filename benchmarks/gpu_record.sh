#!/usr/bin/env bash
# The GPU record in one run (benchmarks/gpu_record.py says what it measures): checks in seconds that
# every package it needs imports, installs nothing from the network, then runs the record under a
# global time budget (default 450 s, inside an 8-minute slot) and writes
# benchmarks/results/gpu-record.json (and $OUT/gpu-record.json when $OUT is set).
#
#   bash benchmarks/gpu_record.sh                 # on a machine with a CUDA GPU
#   bash benchmarks/gpu_record.sh --budget-s 300  # a shorter slot
#   bash benchmarks/gpu_record.sh --smoke         # tiny sizes on the CPU, about 2 minutes
#
# Missing packages: the script lists them and exits with status 3. With a folder of wheels
# (FEDSEG_WHEELS, default .whl/ in the repository: `pip download` them on a machine with access),
# it installs the missing ones from there only (pip --no-index) before giving up.
# Python: $PYTHON, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${FEDSEG_WHEELS:-.whl}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=0
for arg in "$@"; do [[ "$arg" == "--smoke" ]] && SMOKE=1; done

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_record: no Python interpreter '$PY' (set PYTHON=...)" >&2
    exit 3
fi

# Prints the pip names of what is missing (one line, space-separated); exit 0 either way.
check_packages() {
    "$PY" - <<'EOF'
import importlib
import sys

# module -> pip name; what the record imports (model, codec, agents, aggregator, site generator)
NEEDED = {
    "torch": "torch", "numpy": "numpy", "scipy": "scipy", "monai": "monai", "einops": "einops",
    "nibabel": "nibabel", "nilearn": "nilearn", "zstandard": "zstandard", "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
    "google.protobuf": "protobuf", "yaml": "pyyaml",
}
missing = []
for module, pip_name in NEEDED.items():
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a version clash raised at import
        print(f"gpu_record: cannot import {module} ({pip_name}): {type(exc).__name__}: {exc}", file=sys.stderr)
        missing.append(pip_name)
if not missing:
    # The project's own modules: the generated protobuf code checks the runtime's version here.
    for module in ("model", "codec", "client_agent.agent", "aggregator_service.server", "experiments.simulate"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            print(f"gpu_record: cannot import the project's {module}: {type(exc).__name__}: {exc}", file=sys.stderr)
            missing.append("protobuf" if "protobuf" in str(exc).lower() else f"?{module}")
print(" ".join(dict.fromkeys(missing)))
EOF
}

missing="$(check_packages)"
if [[ -n "$missing" && -d "$WHEELS" ]]; then
    echo "gpu_record: installing from $WHEELS (offline): $missing" >&2
    # shellcheck disable=SC2086  # one word per package
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" ${missing//\?*/} >&2 || true
    missing="$(check_packages)"
fi
if [[ -n "$missing" ]]; then
    echo "gpu_record: MISSING: $missing" >&2
    echo "gpu_record: nothing is installed from the network; carry wheels in $WHEELS (see benchmarks/README.md)" >&2
    exit 3
fi
if [[ "$SMOKE" == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_record: torch sees no CUDA device; run with --smoke on a CPU" >&2
    exit 2
fi
exec "$PY" benchmarks/gpu_record.py "$@"
