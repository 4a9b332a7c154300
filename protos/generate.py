"""Regenerate the Python code for the ``fedsegnet.v1`` protos.

Run ``python -m protos.generate`` after editing a ``.proto`` file and commit the result;
``tests/protos/test_protos.py`` fails when the committed code differs from a fresh generation.

The ``.proto`` files live under ``protos/`` with import paths ``fedsegnet/v1/...`` (so buf and
grpcurl see the canonical names); the generated modules import each other as
``fedsegnet.v1``, which we rewrite to ``protos.fedsegnet.v1`` because the Python package is
``protos``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / "fedsegnet").rglob("*.proto"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_IMPORT_RE = re.compile(r"^(from|import) fedsegnet\.v1", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every ``.proto`` into ``out_dir`` (mirroring ``fedsegnet/v1``)."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    # mypy-protobuf's plugins sit beside the interpreter (a venv's bin/), which need not be on PATH.
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_FILES}")
    written = sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    for path in written:
        path.write_text(_IMPORT_RE.sub(r"\1 protos.fedsegnet.v1", path.read_text()))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            target = PROTO_ROOT / path.relative_to(tmp)
            shutil.copyfile(path, target)
            print(f"wrote {target.relative_to(PROTO_ROOT.parent)}")


if __name__ == "__main__":
    main()
