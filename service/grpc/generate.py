"""Regenerate ``v2_pb2.py`` and ``health_pb2.py`` from their ``.proto`` files:
``python -m service.grpc.generate [--check]``.

The generated code is checked in, so that serving needs only the protobuf runtime (the slim
image has no compiler); ``tests/service/test_grpc_proto.py`` regenerates it and compares,
where grpcio-tools is installed. One change to protoc's output: the messages live in a
descriptor pool of their own, not in protobuf's default one. tritonclient registers the same
``inference.*`` names from its own files in the default pool, and one process (a test, a
benchmark, a user's program embedding both) must be able to load both.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("v2.proto", "health.proto")


def target(proto: str) -> Path:
    return HERE / proto.replace(".proto", "_pb2.py")


_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(proto: str) -> str:
    """protoc's Python output for ``proto``, with its own descriptor pool."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={HERE}",
                f"--python_out={out}",
                proto,
            ],
            check=True,
        )
        code = (Path(out) / target(proto).name).read_text()
    if code.count(_DEFAULT_POOL) != 1:
        raise RuntimeError("protoc's output no longer adds its file to the default pool once")
    return code.replace(_DEFAULT_POOL, _OWN_POOL)


def proto_descriptor(proto: str) -> bytes:
    """``proto`` as protoc parses it today: a serialized ``FileDescriptorProto`` (what the
    generated code must hold, whichever protoc version generated it)."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as out:
        desc = Path(out) / "proto.desc"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={HERE}",
                f"--descriptor_set_out={desc}",
                proto,
            ],
            check=True,
        )
        files = descriptor_pb2.FileDescriptorSet.FromString(desc.read_bytes())
    (file,) = files.file
    _drop_json_names(file.message_type)  # derived from the names; generated code leaves them out
    return file.SerializeToString(deterministic=True)


def _drop_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether it is current")
    args = parser.parse_args(argv)
    stale = 0
    for proto in PROTOS:
        code, path = generate(proto), target(proto)
        if args.check:
            current = path.is_file() and path.read_text() == code
            stale += not current
            print(f"{path.name} is {'current' if current else 'out of date'}")
        else:
            path.write_text(code)
            print(f"wrote {path}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
