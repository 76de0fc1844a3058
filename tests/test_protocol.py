"""The protocol as a client in another language meets it (docs/protocol.md): the shipped google/rpc protos, `buf
lint`, the DType names and byte layout, what ListLosses says about inputs, dtypes and defaults, the error details
(field violations that do not repeat their field), reflection v1, and the documentation's tables."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.rpc import error_details_pb2, status_pb2
from grpc_tools import protoc

import embtrain
from embtrain import codec
from embtrain.v1 import embtrain_pb2 as pb
from embtrain.v1 import embtrain_pb2_grpc as pb_grpc
from embtrain_server import cancellation, errors, losses, translate
from tests.conftest import ServerHandle

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
DOC = ROOT / "docs" / "protocol.md"
BUF_VERSION = "1.75.0"
BUF_PREFIX = ROOT / ".venv" / "tools" / "buf"  # git-ignored (.venv/)

DTYPES = {  # name: (number, bytes): the wire format, which never changes
    "DTYPE_UNSPECIFIED": (0, None), "DTYPE_FLOAT16": (1, 2), "DTYPE_BFLOAT16": (2, 2), "DTYPE_FLOAT32": (3, 4),
    "DTYPE_FLOAT64": (4, 8), "DTYPE_INT32": (5, 4), "DTYPE_INT64": (6, 8), "DTYPE_BOOL": (7, 1),
    "DTYPE_UINT8": (8, 1), "DTYPE_INT8": (9, 1), "DTYPE_INT16": (10, 2),
}
FLOAT_DTYPES = {"DTYPE_FLOAT16", "DTYPE_BFLOAT16", "DTYPE_FLOAT32", "DTYPE_FLOAT64"}
INT_DTYPES = {"DTYPE_INT32", "DTYPE_INT64", "DTYPE_UINT8", "DTYPE_INT8", "DTYPE_INT16"}


def _generate_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("embtrain_proto_generate", PROTO / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tensor(name: str, values: np.ndarray) -> pb.Tensor:
    """``values`` as a tensor of the wire dtype ``name`` (encoded by the SDK's codec)."""
    if name == "DTYPE_BFLOAT16":
        return codec.encode(torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16))
    np_type = {"DTYPE_FLOAT16": np.float16, "DTYPE_FLOAT32": np.float32, "DTYPE_FLOAT64": np.float64,
               "DTYPE_INT32": np.int32, "DTYPE_INT64": np.int64, "DTYPE_BOOL": np.bool_, "DTYPE_UINT8": np.uint8,
               "DTYPE_INT8": np.int8, "DTYPE_INT16": np.int16}[name]
    t = codec.encode(values.astype(np_type))
    assert pb.DType.Name(t.dtype) == name
    return t


def _batch() -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 4)
    return (g.standard_normal((16, 8)) + y[:, None]).astype(np.float32), y.astype(np.int64)


def _status(err: grpc.RpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no grpc-status-details-bin trailer: {err}")


def _violations(status: status_pb2.Status) -> list[tuple[str, str]]:
    out = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out += [(v.field, v.description) for v in br.field_violations]
    return out


# ---- the .proto files ------------------------------------------------------------------------------------------

def test_stubs_are_current_and_the_shipped_google_rpc_protos_match_the_runtime() -> None:
    r = subprocess.run([sys.executable, str(PROTO / "generate.py"), "--check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _generate_module().shipped_mismatches() == []
    for name in ("status.proto", "error_details.proto"):
        text = (PROTO / "google" / "rpc" / name).read_text()
        assert "package google.rpc;" in text and "Licensed under the Apache License, Version 2.0" in text


def test_a_google_rpc_proto_that_drifts_from_the_runtime_is_caught(tmp_path: pathlib.Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _generate_module()
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy)
    path = copy / "google" / "rpc" / "error_details.proto"
    text = path.read_text()
    assert text.count("string domain = 2;") == 1
    path.write_text(text.replace("string domain = 2;", "string domain = 5;"))  # ErrorInfo.domain renumbered
    monkeypatch.setattr(gen, "PROTO_DIR", copy)
    assert [m.split()[0] for m in gen.shipped_mismatches()] == ["proto/google/rpc/error_details.proto"]


def test_embtrain_proto_compiles_with_proto_as_the_only_include_path(tmp_path: pathlib.Path) -> None:
    """What a client in another language does: -I proto (plus its runtime's google/protobuf well-known types)."""
    import grpc_tools
    builtin = pathlib.Path(grpc_tools.__file__).resolve().parent / "_proto"
    out = tmp_path / "set.binpb"
    files = ["embtrain/v1/embtrain.proto", "google/rpc/error_details.proto"]
    assert protoc.main(["protoc", f"-I{PROTO}", f"-I{builtin}", "--include_imports", f"--descriptor_set_out={out}",
                        *files]) == 0
    names = {f.name for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    assert {"embtrain/v1/embtrain.proto", "google/rpc/status.proto", "google/rpc/error_details.proto"} <= names


def test_dtype_values_carry_the_enum_prefix_and_keep_their_numbers() -> None:
    assert {name: number for name, number in pb.DType.items()} == {k: v[0] for k, v in DTYPES.items()}
    # buf's ENUM_VALUE_PREFIX would want D_TYPE_ (from the name DType) and is waived in the .proto; this holds the
    # DTYPE_ prefix instead.
    assert all(name.startswith("DTYPE_") for name in pb.DType.keys())


@pytest.mark.parametrize("name", [n for n in DTYPES if n != "DTYPE_UNSPECIFIED"])
def test_dtype_byte_sizes_and_little_endian_layout(name: str) -> None:
    number, size = DTYPES[name]
    values = np.array([[1, 0, 1], [0, 1, 1]])
    t = _tensor(name, values)
    assert (t.dtype, list(t.shape), len(t.data)) == (number, [2, 3], 6 * size)
    first = t.data[:size]
    if name == "DTYPE_BFLOAT16":
        assert first == np.array([1.0], "<f4").tobytes()[2:]  # the upper 16 bits of binary32, little-endian
    elif name == "DTYPE_BOOL":
        assert t.data == bytes([1, 0, 1, 0, 1, 1])  # one byte, 0 or 1
    else:
        expected = np.array([1], np.dtype(name.removeprefix("DTYPE_").lower()).newbyteorder("<")).tobytes()
        assert first == expected


def test_the_documented_bfloat16_rounding_is_round_to_nearest_even() -> None:
    """docs/protocol.md's bit formula gives torch's float32 -> bfloat16 conversion for every non-NaN value tried."""
    g = np.random.default_rng(0)
    bits = np.concatenate([g.integers(0, 2**32, 200_000, dtype=np.uint64),
                           np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x00008000, 0x80000000,
                                     0x7F800000, 0xFF800000], np.uint64)])
    f32 = bits.astype(np.uint32).view(np.float32)
    keep = ~np.isnan(f32)
    bits, f32 = bits[keep], f32[keep]
    formula = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    reference = torch.from_numpy(f32.copy()).to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16)
    assert np.array_equal(formula.astype(np.uint16), reference)
    assert "(b + 0x7FFF + ((b >> 16) & 1)) >> 16" in DOC.read_text()


PYTHON_NOTATION = re.compile(r"\blen\(|\bprod\(|\bitemsize\(|\bNone\b|\bTrue\b|\bFalse\b|==|\*\*|\bfloat\(|"
                             r"\bisinstance\b|\blambda\b|\[:|:\]|\bdict\(|\bnp\.|\btorch\.")


def test_proto_comments_use_no_python_notation() -> None:
    bad = []
    for path in sorted((PROTO / "embtrain").rglob("*.proto")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.partition("//")[2]
            if PYTHON_NOTATION.search(comment):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {comment.strip()}")
    assert not bad, "\n".join(bad)


def _buf() -> str:
    """A buf binary: the one pinned here (installed from npm into .venv/tools/buf once), else one on PATH."""
    local = BUF_PREFIX / "node_modules" / ".bin" / "buf"
    if local.exists():
        return str(local)
    npm = shutil.which("npm")
    if npm is not None:
        try:
            r = subprocess.run([npm, "install", "--prefix", str(BUF_PREFIX), "--no-audit", "--no-fund",
                                f"@bufbuild/buf@{BUF_VERSION}"], capture_output=True, text=True, timeout=600)
            failure = "" if r.returncode == 0 else (r.stdout + r.stderr)[-800:]
        except subprocess.TimeoutExpired:
            failure = "npm install timed out after 600 s"
        if local.exists():
            return str(local)
    else:
        failure = "npm is not installed"
    on_path = shutil.which("buf")
    if on_path is not None:
        return on_path
    pytest.skip(f"buf lint needs buf: `npm install --prefix .venv/tools/buf @bufbuild/buf@{BUF_VERSION}` failed "
                f"and there is no buf on PATH ({failure.strip()})")


def test_buf_lint() -> None:
    buf = _buf()
    r = subprocess.run([buf, "lint"], cwd=PROTO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and not r.stdout.strip(), f"buf lint ({buf}):\n{r.stdout}{r.stderr}"


# ---- ListLosses ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def listed(server: ServerHandle) -> pb.ListLossesResponse:
    with grpc.insecure_channel(server.target) as ch:
        return pb_grpc.EmbeddingTrainerStub(ch).ListLosses(pb.ListLossesRequest(), timeout=60)


def test_list_losses_lists_ids_where_it_has_an_effect(listed: pb.ListLossesResponse) -> None:
    losses.load_all()
    by_name = {li.name: li for li in listed.losses}
    mining = {c.name for c in losses.all_losses() if c.mines_triplets or c.uses_memory}
    assert {"batch_hard_triplet", "batch_all_triplet", "triplet_margin", "weighted_margin_ranking",
            "contrastive", "multi_similarity"} <= mining
    for name, li in by_name.items():
        ids = [i for i in li.inputs if i.name == "ids"]
        assert bool(ids) == (name in mining), name
        if ids:
            (info,) = ids
            assert (info.required, info.dtype, info.shape, info.differentiable) == (False, "int", "[n]", False)


def test_every_input_lists_its_dtypes_as_dtype_values(listed: pb.ListLossesResponse) -> None:
    kinds = {"float": FLOAT_DTYPES, "int": INT_DTYPES}
    for li in listed.losses:
        for i in li.inputs:
            assert {pb.DType.Name(d) for d in i.dtypes} == kinds[i.dtype], (li.name, i.name)


@pytest.mark.parametrize("input_name", ["embeddings", "labels"])
def test_the_listed_dtypes_are_exactly_the_accepted_ones(server: ServerHandle, listed: pb.ListLossesResponse,
                                                          input_name: str) -> None:
    (info,) = [i for li in listed.losses if li.name == "batch_hard_triplet" for i in li.inputs if i.name == input_name]
    listed_names = {pb.DType.Name(d) for d in info.dtypes}
    x, y = _batch()
    accepted = set()
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.EmbeddingTrainerStub(ch)
        for name in DTYPES:
            if name == "DTYPE_UNSPECIFIED":
                continue
            req = pb.ComputeRequest(loss=pb.LossSpec(name="batch_hard_triplet"))
            req.inputs["embeddings"].CopyFrom(_tensor(name, x) if input_name == "embeddings" else codec.encode(x))
            req.inputs["labels"].CopyFrom(_tensor(name, y % 2 if name == "DTYPE_BOOL" else y)
                                          if input_name == "labels" else codec.encode(y))
            try:
                stub.Compute(req, timeout=60)
                accepted.add(name)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
                assert [f for f, _ in _violations(_status(err))] == [f"inputs.{input_name}"], (name, err)
    assert accepted == listed_names


def test_non_finite_defaults_are_numbers_where_protobuf_allows(listed: pb.ListLossesResponse,
                                                               client: embtrain.Client) -> None:
    (wmr,) = [li for li in listed.losses if li.name == "weighted_margin_ranking"]
    params = {p.name: p for p in wmr.params}
    max_dist = params["max_dist"]
    assert max_dist.HasField("default_number") and max_dist.default_number == math.inf
    # google.protobuf.Value must hold a finite number: the string keeps the whole response JSON-encodable.
    assert max_dist.default.WhichOneof("kind") == "string_value" and max_dist.default.string_value == "inf"
    assert params["margin"].default_number == params["margin"].default.number_value
    for p in (params["weighted"], params["reduction"]):
        assert not p.HasField("default_number")
    # The proto3 JSON mapping (grpcurl, protojson) encodes every loss, and writes the double's infinity as a string.
    as_json = json_format.MessageToDict(listed)
    (wmr_json,) = [li for li in as_json["losses"] if li["name"] == "weighted_margin_ranking"]
    (max_json,) = [p for p in wmr_json["params"] if p["name"] == "max_dist"]
    assert max_json["defaultNumber"] == "Infinity" and max_json["default"] == "inf"
    # The Python SDK gives float('inf').
    (sdk,) = [li for li in client.losses() if li.name == "weighted_margin_ranking"]
    defaults = {p["name"]: p["default"] for p in sdk.params}
    assert defaults["max_dist"] == math.inf and isinstance(defaults["max_dist"], float)
    assert defaults["margin"] == pytest.approx(params["margin"].default.number_value)


# ---- error details ---------------------------------------------------------------------------------------------

def test_field_violations_do_not_repeat_the_field(server: ServerHandle) -> None:
    x, y = _batch()
    req = pb.ComputeRequest(loss=pb.LossSpec(name="batch_hard_triplet"))
    req.inputs["embeddings"].CopyFrom(codec.encode(x))
    req.inputs["labels"].CopyFrom(codec.encode(y[:-1]))
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.EmbeddingTrainerStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Compute(req, timeout=60)
        in_band = list(stub.ComputeStream(iter([req]), timeout=60))
    err = info.value
    expected = ("inputs.labels", "length 15, expected 16 (one per embedding row)")
    message = "inputs.labels: length 15, expected 16 (one per embedding row)"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == message  # the message is unchanged
    status = _status(err)
    assert status.message == message and _violations(status) == [expected]
    (resp,) = in_band
    assert resp.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and resp.error.message == message
    assert _violations(resp.error) == [expected]


@pytest.mark.parametrize("err,violations", [
    (errors.invalid("params.margin", "expected a number >= 0, got -1"),
     [("params.margin", "expected a number >= 0, got -1")]),
    (errors.ResourceExhausted("streams: 3 open; retry later", field="streams"), [("streams", "3 open; retry later")]),
    # A message that does not start with its field keeps its whole text as the description.
    (errors.FailedPrecondition("the session has no head yet", field="session_id"),
     [("session_id", "the session has no head yet")]),
    # Nothing but the field: the description stays the message rather than going empty.
    (errors.InvalidArgument("rank: ", field="rank"), [("rank", "rank: ")]),
], ids=["invalid", "resource", "no-prefix", "prefix-only"])
def test_translate_strips_the_field_from_descriptions(err: errors.ServiceError,
                                                      violations: list[tuple[str, str]]) -> None:
    status = translate.to_status_proto(err)
    assert status.message == err.message
    assert _violations(status) == violations


def test_hand_built_violations_are_stripped_too() -> None:
    err = errors.InvalidArgument("two fields are wrong")
    err.violations = [("inputs.labels", "inputs.labels: length 3, expected 4"), ("params.margin", "expected >= 0")]
    assert _violations(translate.to_status_proto(err)) == [("inputs.labels", "length 3, expected 4"),
                                                           ("params.margin", "expected >= 0")]


def test_an_aborted_group_step_carries_error_info() -> None:
    status = translate.to_status_proto(errors.Aborted("step 3 aborted", missing_ranks=[1, 3]))
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("GROUP_STEP_ABORTED", "embtrain",
                                                               {"missing_ranks": "1,3"})


# ---- reflection ------------------------------------------------------------------------------------------------

# grpc/reflection/v1/reflection.proto as published by gRPC (messages and field numbers; comments left out): a v1
# client built from it, independently of the server's implementation.
REFLECTION_V1 = """
syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest) returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest {
  string containing_type = 1;
  int32 extension_number = 2;
}
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse {
  string base_type_name = 1;
  repeated int32 extension_number = 2;
}
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse {
  int32 error_code = 1;
  string error_message = 2;
}
"""


def test_reflection_v1_lists_and_describes_the_services(server: ServerHandle, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "grpc" / "reflection" / "v1" / "reflection.proto"
    src.parent.mkdir(parents=True)
    src.write_text(REFLECTION_V1)
    out = tmp_path / "set.binpb"
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}",
                        "grpc/reflection/v1/reflection.proto"]) == 0
    pool = descriptor_pool.DescriptorPool()  # private: the client's own v1 messages
    for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(f)
    request = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse"))
    with grpc.insecure_channel(server.target) as ch:
        call = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                request_serializer=request.SerializeToString,
                                response_deserializer=response.FromString)
        answers = list(call(iter([request(list_services=""),
                                  request(file_containing_symbol="embtrain.v1.EmbeddingTrainer"),
                                  request(file_containing_symbol="grpc.reflection.v1.ServerReflection")]),
                            timeout=60))
    names = [s.name for s in answers[0].list_services_response.service]
    assert {"embtrain.v1.EmbeddingTrainer", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(names)
    files = {descriptor_pb2.FileDescriptorProto.FromString(b).name: descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answers[1].file_descriptor_response.file_descriptor_proto}
    assert {"embtrain/v1/embtrain.proto", "google/rpc/status.proto"} <= set(files)
    assert {m.name for m in files["embtrain/v1/embtrain.proto"].service[0].method} >= {"Compute", "ListLosses"}
    (v1,) = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answers[2].file_descriptor_response.file_descriptor_proto]
    assert (v1.name, v1.package, [s.name for s in v1.service]) == (
        "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1", ["ServerReflection"])
    assert v1.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


# ---- the documentation -----------------------------------------------------------------------------------------

def _codes_the_server_raises() -> set[str]:
    seen, todo = set(), [errors.ServiceError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            seen.add(sub.code_name)
            todo.append(sub)
    assert cancellation.Cancelled.code_name in seen
    return seen | {"INTERNAL", "DEADLINE_EXCEEDED"}  # unexpected failures; the client's own deadline


def test_protocol_doc_tables_cover_dtypes_and_status_codes() -> None:
    text = DOC.read_text()
    rows = {m.group(1): (int(m.group(2)), m.group(3)) for m in
            re.finditer(r"^\| `(DTYPE_[A-Z0-9]+)` \| (\d+) \| ([^|]+?) \|", text, re.M)}
    assert {k: v[0] for k, v in rows.items()} == {k: v[0] for k, v in DTYPES.items()}
    for name, (_, size) in DTYPES.items():
        if size is not None:
            assert rows[name][1] == str(size), name
    table = re.findall(r"^\| `([A-Z_]+)` \((\d+)\) \|", text, re.M)
    missing = _codes_the_server_raises() - {code for code, _ in table}
    assert not missing, f"docs/protocol.md's status table lacks {sorted(missing)}"
    for code, number in table:
        assert grpc.StatusCode[code].value[0] == int(number), code
    for words in ("google.rpc.BadRequest", "google.rpc.ErrorInfo", "GROUP_STEP_ABORTED", "missing_ranks",
                  "grpc-status-details-bin", "little-endian", "round-to-nearest-even", "binary16"):
        assert words in text, words


def test_readme_links_the_protocol_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Wire protocol"):]
    section = section[:section.index("\n## ", 1)]
    assert "(docs/protocol.md)" in section
