"""Generate the Python stubs for proto/embtrain/v1/*.proto into client/ (or check that they are current).

Usage: python proto/generate.py [--check]
The generated modules import each other as ``embtrain.v1.*``, so they are written under ``client/`` with
no rewriting. ``--check`` generates into a temporary directory and fails when the committed files differ.

``proto/google/rpc/`` ships the googleapis files that the protocol uses (``status.proto``, imported by
embtrain.proto, and ``error_details.proto``, the error details) for clients in other languages. Python does not
generate them: the stubs import ``google.rpc.status_pb2`` from googleapis-common-protos, as the SDK and the server
do at runtime. ``--check`` also fails when the shipped files describe other messages than the runtime's (package,
names, field numbers and types; comments aside), so the two cannot drift apart.
"""

from __future__ import annotations

import filecmp
import pathlib
import sys
import tempfile

from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "client"
PACKAGE = pathlib.Path("embtrain") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
BUILTIN = pathlib.Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
# The shipped googleapis files and the runtime modules (googleapis-common-protos) that must describe the same.
SHIPPED = {"google/rpc/status.proto": status_pb2, "google/rpc/error_details.proto": error_details_pb2}


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    sources = sorted((PROTO_DIR / PACKAGE).glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_DIR}",  # google/rpc/*.proto from here: the files clients in other languages use
        f"-I{BUILTIN}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(s.relative_to(PROTO_DIR)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out) for p in (out / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def compiled(files: list[str]) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """``files`` (relative to proto/) compiled by protoc, without source info: what a runtime would load."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.binpb"
        if protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{BUILTIN}", f"--descriptor_set_out={out}", *files]) != 0:
            raise SystemExit("protoc failed")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    for f in fds.file:
        _drop_json_names(f.message_type)  # protoc fills json_name in; a runtime's CopyToProto leaves it out
    return {f.name: f for f in fds.file}


def _drop_json_names(messages) -> None:  # type: ignore[no-untyped-def]
    for m in messages:
        for field in m.field:
            field.ClearField("json_name")
        _drop_json_names(m.nested_type)


def shipped_mismatches() -> list[str]:
    """The shipped google/rpc files whose descriptors differ from googleapis-common-protos' at runtime."""
    built = compiled(sorted(SHIPPED))
    bad = []
    for name, module in SHIPPED.items():
        runtime = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(runtime)
        if built[name] != runtime:
            bad.append(f"proto/{name} differs from {module.__name__} (googleapis-common-protos)")
    return bad


def main() -> int:
    if "--check" not in sys.argv[1:]:
        files = generate(OUT_DIR)
        print("generated:", ", ".join(str(f) for f in files))
        return 0
    mismatched = shipped_mismatches()
    if mismatched:
        print("; ".join(mismatched) + ": copy the runtime's .proto files (site-packages/google/rpc/) into "
              "proto/google/rpc/", file=sys.stderr)
        return 1
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
