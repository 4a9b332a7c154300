# Sourced by the GPU scripts (gpu_record.sh, generalization_full.sh): checks in seconds that every
# package a run needs imports, installs the missing ones from a folder of wheels only (pip
# --no-index; nothing from the network) and exits with status 3 naming what is still missing.
# Needs PY (the interpreter), WHEELS (the wheel folder) and TAG (the script's name, for messages).

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "$TAG: no Python interpreter '$PY' (set PYTHON=...)" >&2
    exit 3
fi

# Prints the pip names of what is missing (one line, space-separated); exit 0 either way.
check_packages() {
    FEDSEG_TAG="$TAG" "$PY" - <<'EOF'
import importlib
import os
import sys

TAG = os.environ["FEDSEG_TAG"]

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
        print(f"{TAG}: cannot import {module} ({pip_name}): {type(exc).__name__}: {exc}", file=sys.stderr)
        missing.append(pip_name)
if not missing:
    # The project's own modules: the generated protobuf code checks the runtime's version here.
    for module in ("model", "codec", "client_agent.agent", "aggregator_service.server", "experiments.simulate"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            print(f"{TAG}: cannot import the project's {module}: {type(exc).__name__}: {exc}", file=sys.stderr)
            missing.append("protobuf" if "protobuf" in str(exc).lower() else f"?{module}")
print(" ".join(dict.fromkeys(missing)))
EOF
}

missing="$(check_packages)"
if [[ -n "$missing" && -d "$WHEELS" ]]; then
    echo "$TAG: installing from $WHEELS (offline): $missing" >&2
    # shellcheck disable=SC2086  # one word per package
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" ${missing//\?*/} >&2 || true
    missing="$(check_packages)"
fi
if [[ -n "$missing" ]]; then
    echo "$TAG: MISSING: $missing" >&2
    echo "$TAG: nothing is installed from the network; carry wheels in $WHEELS (see benchmarks/README.md)" >&2
    exit 3
fi
