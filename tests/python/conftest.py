"""Fixtures shared by the Python tests. Plain helpers live in testkit.py."""

from __future__ import annotations

import importlib
import importlib.resources
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = PROTO_ROOT / "bace" / "tokenbroker" / "v1" / "token_broker.proto"


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Generates the Python stubs from `proto/` into a tmp dir (grpc_tools.protoc, which also
    proves the proto compiles outside the Rust build) and returns (pb2, pb2_grpc)."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    wkt = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_FILE),
    ]
    rc = protoc.main(args)
    assert rc == 0, f"grpc_tools.protoc failed with {rc}: {args}"
    pkg = out
    for part in ("bace", "tokenbroker", "v1"):
        pkg = pkg / part
        (pkg / "__init__.py").touch()
    sys.path.insert(0, str(out))
    try:
        importlib.invalidate_caches()
        pb2 = importlib.import_module("bace.tokenbroker.v1.token_broker_pb2")
        pb2_grpc = importlib.import_module("bace.tokenbroker.v1.token_broker_pb2_grpc")
        yield pb2, pb2_grpc
    finally:
        sys.path.remove(str(out))
