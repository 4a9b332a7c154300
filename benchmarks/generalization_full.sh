#!/usr/bin/env bash
# `fedseg experiment generalization --scale full` on a lent GPU machine, as one prepared command:
# centralized, dense FedAvg and FedSegNet on the randomized sites at 64^3 / 3 mm (48^3 windows,
# 20 rounds x 6 local epochs, `synthseg` augmentation), each final model scored on the real scan.
# The full-scale targets of results/README.md ("Generalization, sixth pass") are read off its table.
#
#   bash benchmarks/generalization_full.sh                   # the whole experiment
#   bash benchmarks/generalization_full.sh --max-minutes 8   # in parts: the same command resumes
#                                                            # while runs/ survives (a warm machine)
#   bash benchmarks/generalization_full.sh --methods fedsegnet_short    # one method now
#
# Arguments go on to `fedseg experiment generalization --scale full`. Packages: checked in seconds
# as benchmarks/gpu_record.sh checks them (missing ones installed from .whl/ only, status 3 if any
# is still missing). The real scan: Colin 27 from Debian's mricron-data where it is installed, else
# the files in FEDSEG_REAL_SCANS, else every .realscans/*.nii.gz of the repository (ignored by git;
# carry it: `mkdir -p .realscans && cp /usr/share/mricron/templates/ch2bet.nii.gz .realscans/colin27.nii.gz`).
# Writes results/generalization-full/ and, when $OUT is set, a copy in $OUT/generalization-full/.
# Python: $PYTHON, else python3. Refuses to start without a CUDA device unless ALLOW_CPU=1 (hours).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${FEDSEG_WHEELS:-.whl}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

TAG=generalization_full
# shellcheck source=benchmarks/_packages.sh
source benchmarks/_packages.sh
if [[ "${ALLOW_CPU:-0}" != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "$TAG: torch sees no CUDA device; the full scale takes hours on a CPU (ALLOW_CPU=1 runs it anyway)" >&2
    exit 2
fi

if [[ ! -f /usr/share/mricron/templates/ch2bet.nii.gz && -z "${FEDSEG_REAL_SCANS:-}" ]]; then
    shopt -s nullglob
    carried=(.realscans/*.nii.gz .realscans/*.nii)
    if [[ ${#carried[@]} == 0 ]]; then
        echo "$TAG: no real scan: install mricron-data, set FEDSEG_REAL_SCANS, or carry .realscans/colin27.nii.gz" >&2
        exit 3
    fi
    FEDSEG_REAL_SCANS="$(IFS=:; echo "${carried[*]/#/$PWD/}")"
    export FEDSEG_REAL_SCANS
fi
echo "$TAG: real scans: ${FEDSEG_REAL_SCANS:-/usr/share/mricron/templates/ch2bet.nii.gz (mricron-data)}" >&2

started=$SECONDS
status=0
"$PY" -m fedseg experiment generalization --scale full --results results --workdir runs/experiments "$@" || status=$?
echo "$TAG: $((SECONDS - started)) s, status $status; table: results/generalization-full/table.md" >&2
if [[ -n "${OUT:-}" && -d results/generalization-full ]]; then
    mkdir -p "$OUT/generalization-full"
    cp -r results/generalization-full/. "$OUT/generalization-full/"
    rm -rf "$OUT/generalization-full/runs"  # per-method run records stay on the machine; the summary has the numbers
fi
exit "$status"
