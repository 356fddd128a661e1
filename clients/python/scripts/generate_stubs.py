"""Generates the package's gRPC stubs from `proto/` with grpcio-tools.

    python clients/python/scripts/generate_stubs.py          # rewrite src/bace_token_broker/_pb/
    python clients/python/scripts/generate_stubs.py --check  # exit 1 when they are out of date

The generated files are committed, so installing the package needs neither protoc nor
grpcio-tools; `tests/python/test_client_package.py` regenerates them and fails when they differ.
grpc_tools.protoc writes absolute imports (`from bace.tokenbroker.v1 import token_broker_pb2`);
they are rewritten to relative ones so the stubs live inside `bace_token_broker._pb`.

Run it with the grpcio-tools version pinned in tests/python/requirements.txt, then raise the
`protobuf` and `grpcio` lower bounds in pyproject.toml to what the new gencode checks for.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO = Path("bace/tokenbroker/v1/token_broker.proto")
OUT = HERE.parent / "src" / "bace_token_broker" / "_pb"
FILES = ("token_broker_pb2.py", "token_broker_pb2.pyi", "token_broker_pb2_grpc.py")
ABSOLUTE_IMPORT = "from bace.tokenbroker.v1 import token_broker_pb2 as "
RELATIVE_IMPORT = "from . import token_broker_pb2 as "


def generate() -> dict[str, bytes]:
    """Runs grpc_tools.protoc on the proto; returns each output file's name and content."""
    from grpc_tools import protoc

    wkt = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{wkt}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed with {rc}")
        out = Path(tmp) / PROTO.parent
        files = {name: (out / name).read_bytes() for name in FILES}
    grpc_py = files["token_broker_pb2_grpc.py"].decode()
    if ABSOLUTE_IMPORT not in grpc_py:
        raise RuntimeError("token_broker_pb2_grpc.py no longer has the import this script rewrites")
    files["token_broker_pb2_grpc.py"] = grpc_py.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT).encode()
    return files


def stale(out: Path = OUT) -> list[str]:
    """The generated files missing from `out` or different from a fresh generation."""
    fresh = generate()
    return [
        n for n, data in fresh.items() if not (out / n).is_file() or (out / n).read_bytes() != data
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args()
    if args.check:
        names = stale()
        for name in names:
            print(f"out of date: {OUT / name}", file=sys.stderr)
        return 1 if names else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in generate().items():
        (OUT / name).write_bytes(data)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
