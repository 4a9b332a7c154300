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

TAG=gpu_record
# shellcheck source=benchmarks/_packages.sh
source benchmarks/_packages.sh
if [[ "$SMOKE" == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_record: torch sees no CUDA device; run with --smoke on a CPU" >&2
    exit 2
fi
exec "$PY" benchmarks/gpu_record.py "$@"
