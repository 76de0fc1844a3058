"""gRPC server reflection under both of its names: ``grpc.reflection.v1`` (what current grpcurl, grpc-java, Postman
and buf curl ask first) and ``grpc.reflection.v1alpha`` (older tools).

grpcio-reflection serves only v1alpha (grpc/grpc#38576). v1 is the same protocol under another package: the same
messages, fields and numbers, so its requests and responses are byte for byte v1alpha's. The v1 service here is
grpcio-reflection's own servicer behind the v1 method path, and the v1 descriptors (v1alpha's, renamed) are added
to the default descriptor pool, so reflection can describe its v1 service too."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

try:  # a grpcio-reflection that ships v1 registers its file first, and v1_file_descriptor finds it
    from grpc_reflection.v1 import reflection_pb2 as _upstream_v1  # noqa: F401
except ImportError:
    pass

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME
METHOD = "ServerReflectionInfo"
# The upstream v1 file's options (grpc/grpc-proto grpc/reflection/v1/reflection.proto).
_V1_OPTIONS = {"go_package": "google.golang.org/grpc/reflection/grpc_reflection_v1", "java_multiple_files": True,
               "java_package": "io.grpc.reflection.v1", "java_outer_classname": "ServerReflectionProto"}


def v1_file_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> descriptor.FileDescriptor:
    """``grpc/reflection/v1/reflection.proto`` in ``pool`` (the default pool): added once, from v1alpha's."""
    pool = pool or descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")
    for key, value in _V1_OPTIONS.items():
        setattr(proto.options, key, value)

    def rename(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            for f in m.field:
                if f.type_name.startswith(old):
                    f.type_name = f".{V1_PACKAGE}.{f.type_name[len(old):]}"
            rename(m.nested_type)

    rename(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}.{method.input_type[len(old):]}"
            method.output_type = f".{V1_PACKAGE}.{method.output_type[len(old):]}"
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindFileByName(V1_FILE)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha for ``service_names`` (both reflection services are listed as well)."""
    v1_file_descriptor()
    names = tuple(dict.fromkeys((*service_names, SERVICE_NAME, V1ALPHA_SERVICE_NAME)))
    v1alpha.enable_server_reflection(names, server)
    servicer = v1alpha.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,  # v1's bytes: the same messages
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD: handler}),))


__all__ = ["SERVICE_NAME", "V1ALPHA_SERVICE_NAME", "enable_server_reflection", "v1_file_descriptor"]
