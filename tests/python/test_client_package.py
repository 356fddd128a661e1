"""The Python client's packaging: the committed gRPC stubs are what grpcio-tools makes of
`proto/` today, and `pip install ./clients/python` into a fresh venv works and imports."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import tomllib
import venv
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "clients" / "python"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "generate_stubs", PACKAGE / "scripts" / "generate_stubs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_current():
    gen = _generator()
    assert gen.stale() == [], (
        "the stubs in clients/python/src/bace_token_broker/_pb differ from proto/; run "
        "`.venv/bin/python clients/python/scripts/generate_stubs.py` and commit them"
    )


def test_the_stub_check_notices_a_difference(tmp_path):
    gen = _generator()
    for name, data in gen.generate().items():
        (tmp_path / name).write_bytes(data)
    assert gen.stale(tmp_path) == []
    (tmp_path / "token_broker_pb2.py").write_bytes(b"# edited\n")
    assert gen.stale(tmp_path) == ["token_broker_pb2.py"]


def test_gencode_versions_match_the_declared_dependencies():
    """The runtime lower bounds in pyproject.toml are those the generated code checks."""
    meta = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"]
    pb2 = (PACKAGE / "src/bace_token_broker/_pb/token_broker_pb2.py").read_text()
    major, minor, patch = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb2).groups()
    assert f"protobuf>={major}.{minor}.{patch},<{int(major) + 1}" in deps
    grpc_py = (PACKAGE / "src/bace_token_broker/_pb/token_broker_pb2_grpc.py").read_text()
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_py).group(1)
    assert any(d.startswith(f"grpcio>={grpc_gen},") for d in deps), deps


def test_pip_install_into_a_fresh_venv(tmp_path):
    """A non-editable install from the directory, as on a fresh machine (pip's cache may serve
    the downloads): the wheel carries the stubs and py.typed, the dependencies come along."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(PACKAGE)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.resources as r, bace_token_broker as b; "
            "from bace_token_broker import BrokerClient, AsyncBrokerClient; "
            "assert r.files('bace_token_broker').joinpath('py.typed').is_file(); "
            "print(b.__file__); BrokerClient('localhost:1')\n"
            "try:\n    b.RequestsAuth\nexcept ImportError as e:\n    print(e)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert str(env_dir) in lines[0], "imported from the venv, not the source tree"
    assert "pip install 'bace-token-broker[requests]'" in lines[1]
