"""Generate the Python stubs for proto/embtrain/v1/*.proto into client/ (or check that they are current).

Usage: python proto/generate.py [--check]
The generated modules import each other as ``embtrain.v1.*``, so they are written under ``client/`` with
no rewriting. ``--check`` generates into a temporary directory and fails when the committed files differ.
"""

from __future__ import annotations

import filecmp
import pathlib
import sys
import tempfile

from google.rpc import status_pb2
import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "client"
PACKAGE = pathlib.Path("embtrain") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    sources = sorted((PROTO_DIR / PACKAGE).glob("*.proto"))
    googleapis = pathlib.Path(status_pb2.__file__).resolve().parent.parent.parent
    builtin = pathlib.Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{googleapis}",
        f"-I{builtin}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(s.relative_to(PROTO_DIR)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out) for p in (out / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    if "--check" not in sys.argv[1:]:
        files = generate(OUT_DIR)
        print("generated:", ", ".join(str(f) for f in files))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        committed = sorted(
            p.relative_to(OUT_DIR) for p in (OUT_DIR / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
        )
        stale = [str(f) for f in fresh if f not in committed or not filecmp.cmp(pathlib.Path(tmp) / f, OUT_DIR / f, shallow=False)]
        extra = [str(f) for f in committed if f not in fresh]
    if stale or extra:
        print(f"generated stubs are stale: {stale + extra}; run `make proto` and commit the result", file=sys.stderr)
        return 1
    print("generated stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
