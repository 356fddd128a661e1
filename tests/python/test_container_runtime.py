"""The container image, as far as it can be tested without a Docker engine.

- The Dockerfile: a release build with `--locked` and without the demo (`--no-default-features`:
  no fake BACE in the image), from the product's sources only (no benchmarks), a distroless
  `nonroot` runtime stage, a
  numeric non-root USER equal to the Helm chart's runAsUser/runAsGroup, the binary as ENTRYPOINT,
  the chart's ports exposed; `.dockerignore` lets in everything the build copies.
- The binary the image copies only links libraries that distroless/cc ships.
- The binary runs the way the image and the chart run it: as uid/gid 65532 with no
  supplementary groups, no HOME, its working directory and its own directory read-only to it
  (the chart mounts the root filesystem read-only), JSON logs. In `serve --demo` mode it turns
  ready over gRPC health and serves GetToken, and exits 0 on SIGTERM.

Environment: BROKER_BIN, the binary to run (default target/debug/bace-token-broker, honouring
CARGO_TARGET_DIR, built with the default `demo` feature); the image builds the same sources with
`--release --no-default-features`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

import testkit

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
CHART_VALUES = REPO_ROOT / "helm" / "bace-token-broker" / "values.yaml"
READINESS_SERVICE = "bace.tokenbroker.v1.TokenBrokerService"
READY_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0

# Shared objects in gcr.io/distroless/cc-debian12 (glibc, libgcc, libstdc++, libgomp, OpenSSL 3).
DISTROLESS_CC_LIBS = {
    "linux-vdso.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libgomp.so.1",
    "libssl.so.3",
    "libcrypto.so.3",
}


# === the Dockerfile ===


class Stage:
    def __init__(self, base: str, name: str | None):
        self.base = base
        self.name = name
        self.instructions: list[tuple[str, str]] = []

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, line
            base = re.sub(r"\$\{(\w+)\}", lambda a: args.get(a.group(1), a.group(0)), m.group(1))
            stages.append(Stage(base, m.group(2)))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text())
    return parsed


@pytest.fixture(scope="module")
def chart_values() -> dict:
    return yaml.safe_load(CHART_VALUES.read_text())


def test_builder_stage(stages):
    builder, runtime = stages[0], stages[-1]
    assert len(stages) == 2
    assert re.fullmatch(r"rust:1\.\d+-bookworm", builder.base), builder.base
    assert builder.name
    builds = [r for r in builder.all("RUN") if "cargo build" in r]
    assert len(builds) == 1
    assert "--release" in builds[0] and "--locked" in builds[0]
    assert "--no-default-features" in builds[0], "the image carries no fake BACE (demo feature)"
    copied = [p for c in builder.all("COPY") for p in shlex.split(c) if not p.startswith("--")]
    assert not any(p.rstrip("/").endswith("benches") for p in copied), copied
    copies = runtime.all("COPY")
    assert any(f"--from={builder.name}" in c for c in copies), copies
    # The manifest's minimum Rust version is at most the builder's.
    cargo = (REPO_ROOT / "Cargo.toml").read_text()
    msrv = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', cargo, re.M)
    builder_minor = int(re.search(r"rust:1\.(\d+)", builder.base).group(1))
    assert int(msrv.group(2)) <= builder_minor


def test_runtime_stage_is_distroless_nonroot_matching_the_chart(stages, chart_values):
    runtime = stages[-1]
    assert runtime.base.startswith("gcr.io/distroless/"), runtime.base
    assert runtime.base.endswith(":nonroot") or ":nonroot@" in runtime.base, runtime.base
    user = runtime.last("USER")
    m = re.fullmatch(r"(\d+):(\d+)", user)
    assert m, f"USER must be numeric uid:gid (runAsNonRoot checks a numeric user), got {user!r}"
    uid, gid = int(m.group(1)), int(m.group(2))
    assert uid != 0 and gid != 0
    for ctx in ("securityContext", "podSecurityContext"):
        sc = chart_values[ctx]
        assert sc["runAsNonRoot"] is True
        assert (sc["runAsUser"], sc["runAsGroup"]) == (uid, gid), ctx
    assert chart_values["podSecurityContext"]["fsGroup"] == gid
    assert not runtime.all("RUN"), "the runtime image has no shell: no RUN in its stage"


def test_runtime_entrypoint_ports_and_command(stages, chart_values):
    runtime = stages[-1]
    entrypoint = json.loads(runtime.last("ENTRYPOINT"))
    (binary,) = entrypoint
    copied = [shlex.split(c)[-1] for c in runtime.all("COPY")]
    assert binary in copied
    assert binary.endswith("/bace-token-broker")
    exposed = {int(p.split("/")[0]) for e in runtime.all("EXPOSE") for p in e.split()}
    assert exposed == {chart_values["service"]["port"], chart_values["metrics"]["port"]}
    cmd = json.loads(runtime.last("CMD"))
    assert cmd[:2] == ["serve", "--config"]


def test_dockerignore_lets_the_build_inputs_in(stages):
    """With an allow-list .dockerignore, every path the builder copies must be allowed, and the
    bulky or private directories must not be."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[0] == "*", "expected an allow-list .dockerignore starting with '*'"
    allowed = {line[1:].rstrip("/") for line in lines[1:] if line.startswith("!")}
    builder = stages[0]
    for copy in builder.all("COPY"):
        parts = [p for p in shlex.split(copy) if not p.startswith("--")]
        for src in parts[:-1]:
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
            assert (REPO_ROOT / src).exists(), src
    for private in ("target", ".venv", ".git", "tools"):
        assert private not in allowed


def test_binary_links_only_what_distroless_cc_has():
    binary = testkit.broker_bin()
    if not binary.is_file():
        pytest.fail(f"broker binary not found at {binary}; run `cargo build --bins` first")
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = {line.split()[0].rsplit("/", 1)[-1] for line in out.splitlines() if line.strip()}
    assert libs <= DISTROLESS_CC_LIBS, f"not in distroless/cc: {sorted(libs - DISTROLESS_CC_LIBS)}"


# === the binary as the image runs it ===


@pytest.fixture
def image_root(chart_values):
    """A stand-in for the image: the binary at /usr/local/bin-like path inside a directory tree
    owned by root and read-only (0555) to everyone, like the chart's read-only root filesystem
    is to uid 65532. Made under /tmp since pytest's own tmp dirs are private to root."""
    binary = testkit.broker_bin()
    if not binary.is_file():
        pytest.fail(f"broker binary not found at {binary}; run `cargo build --bins` first")
    root = Path(tempfile.mkdtemp(prefix="bace-image-"))
    bin_dir = root / "usr" / "local" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(binary, bin_dir / "bace-token-broker")
    for path in (bin_dir / "bace-token-broker", bin_dir, bin_dir.parent, bin_dir.parent.parent, root):
        os.chmod(path, 0o555)
    try:
        yield root
    finally:
        for dirpath, dirnames, _ in os.walk(root):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(root)


def _run_as_nonroot_kwargs(uid: int, gid: int, cwd: Path) -> dict:
    # No HOME, no XDG dirs, no TMPDIR: the broker must need none of them.
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "RUST_LOG": "info"}
    return dict(user=uid, group=gid, extra_groups=[], umask=0o022, cwd=cwd, env=env)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65532")
def test_demo_serves_as_nonroot_from_a_read_only_directory(image_root, chart_values, tmp_path):
    uid = chart_values["securityContext"]["runAsUser"]
    gid = chart_values["securityContext"]["runAsGroup"]
    kwargs = _run_as_nonroot_kwargs(uid, gid, image_root)
    binary = image_root / "usr" / "local" / "bin" / "bace-token-broker"

    # The directory really is read-only to that user.
    probe = subprocess.run(
        ["/bin/sh", "-c", "touch ./probe"], capture_output=True, text=True, **kwargs
    )
    assert probe.returncode != 0, "the stand-in root must not be writable by the broker's user"
    assert "HOME" not in kwargs["env"]

    addr = f"127.0.0.1:{testkit.free_port()}"
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "--log-format", "json", "serve", "--demo", "--listen", addr],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            **kwargs,
        )
    try:
        _wait_ready(proc, addr, log_path)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
        gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
        groups = re.search(r"^Groups:[ \t]*(.*)$", status, re.M).group(1).split()
        assert set(uids) == {str(uid)} and set(gids) == {str(gid)}, status
        assert groups in ([], [str(gid)]), groups
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(image_root)
        assert "HOME=" not in Path(f"/proc/{proc.pid}/environ").read_bytes().decode()

        # GetToken through the bundled CLI client, as the same user.
        got = subprocess.run(
            [str(binary), "get", "demo-fleet-a", "--addr", f"http://{addr}", "--header"],
            capture_output=True,
            text=True,
            timeout=30,
            **kwargs,
        )
        assert got.returncode == 0, got.stderr
        assert re.fullmatch(r"Authorization: Bearer \S+\n", got.stdout), got.stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"broker did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM")
    log_text = log_path.read_text(errors="replace")
    assert code == 0, f"broker exited with {code}; log:\n{log_text}"
    lines = [line for line in log_text.splitlines() if line.strip()]
    assert lines, "no log lines"
    for line in lines:
        record = json.loads(line)  # --log-format json: one object per line
        assert record.get("level") != "ERROR", line
    assert "ermission denied" not in log_text and "panicked" not in log_text


def _wait_ready(proc: subprocess.Popen, addr: str, log_path: Path) -> None:
    testkit.wait_serving(
        proc,
        addr,
        lambda: log_path.read_text(errors="replace"),
        service=READINESS_SERVICE,
        timeout=READY_TIMEOUT_S,
    )
