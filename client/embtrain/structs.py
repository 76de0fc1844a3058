"""protobuf ``Struct`` / ``Value`` <-> plain Python, shared by the SDK and the server.

``json_format`` would do, except that it refuses non-finite numbers (``max_dist: inf`` travels fine in the binary
wire format) and turns every number into a float; here whole numbers come back as ``int`` (``out_dim`` 64).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2


def value_to_python(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [value_to_python(x) for x in v.list_value.values]
    if kind == "number_value":
        x = v.number_value
        return int(x) if x.is_integer() and abs(x) < 2**53 else x
    if kind in ("string_value", "bool_value"):
        return getattr(v, kind)
    return None


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return {k: value_to_python(v) for k, v in s.fields.items()}
