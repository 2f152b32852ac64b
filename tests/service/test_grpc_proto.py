"""The checked-in v2 proto speaks tritonclient.grpc's wire format: every message and field the
service defines has the number, type and label of tritonclient's own descriptors, the methods
are the same RPCs, and v2_pb2.py is what protoc makes of v2.proto today."""

from __future__ import annotations

import importlib.util

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from service.grpc import health_pb2, v2_pb2


def _compare(ours: Descriptor, theirs: Descriptor, path: str) -> list[str]:
    problems = []
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        where = f"{path}.{field.name}"
        if other is None:
            problems.append(f"{where}: not in tritonclient's message")
            continue
        if (field.number, field.type, field.is_repeated) != (
            other.number,
            other.type,
            other.is_repeated,
        ):
            problems.append(
                f"{where}: ({field.number}, {field.type}, {field.is_repeated}) against "
                f"({other.number}, {other.type}, {other.is_repeated})"
            )
        if field.message_type is not None:
            problems += _compare(field.message_type, other.message_type, where)
        if field.enum_type is not None:
            problems += _compare_enum(field.enum_type, other.enum_type, where)
    return problems


def _compare_enum(ours: EnumDescriptor, theirs: EnumDescriptor, path: str) -> list[str]:
    mine = {v.name: v.number for v in ours.values}
    other = {v.name: v.number for v in theirs.values}
    return [
        f"{path}: enum {k}={v} against {other.get(k)}" for k, v in mine.items() if other.get(k) != v
    ]


def test_every_message_matches_tritonclients_wire_format():
    problems = []
    for name, message in v2_pb2.DESCRIPTOR.message_types_by_name.items():
        theirs = service_pb2.DESCRIPTOR.message_types_by_name.get(
            name
        ) or model_config_pb2.DESCRIPTOR.message_types_by_name.get(name)
        assert theirs is not None, f"tritonclient has no message {name}"
        problems += _compare(message, theirs, name)
    assert not problems, problems


def test_the_service_methods_are_tritonclients_rpcs():
    ours = v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.name == other.input_type.name, method.name
        assert method.output_type.name == other.output_type.name, method.name
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        ), method.name
    served = {m.name for m in ours.methods}
    assert {"ServerLive", "ServerReady", "ModelReady", "ModelInfer", "ModelStreamInfer"} <= served


def test_a_message_of_ours_parses_as_tritonclients_and_back():
    request = v2_pb2.ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"\x00" * 8])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.parameters["priority"].int64_param = 3
    theirs = service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.inputs[0].shape == [1, 2] and theirs.parameters["priority"].int64_param == 3
    assert v2_pb2.ModelInferRequest.FromString(theirs.SerializeToString()) == request


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="no grpcio-tools")
@pytest.mark.parametrize("module", [v2_pb2, health_pb2], ids=["v2", "health"])
def test_the_checked_in_code_holds_the_proto_as_it_is(module):
    from google.protobuf import descriptor_pb2

    from service.grpc import generate

    checked_in = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(checked_in)
    proto = module.DESCRIPTOR.name
    assert checked_in.SerializeToString(deterministic=True) == generate.proto_descriptor(proto), (
        f"{module.__name__} is out of date with {proto}: run `python -m service.grpc.generate`"
    )
