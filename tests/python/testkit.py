"""Helpers shared by the Python tests (not a test module): where the broker and fake BACE
binaries are, free ports, waiting for a broker to turn ready and stopping it, the Rust fake BACE
as a subprocess, and a throwaway PKI made with `cryptography` (a CA issuing server and client
certificates)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.error import HTTPError
from urllib.parse import quote
from urllib.request import ProxyHandler, build_opener

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
READINESS_SERVICE = "bace.tokenbroker.v1.TokenBrokerService"


def _debug_bin(name: str) -> Path:
    """target/debug/NAME, honouring CARGO_TARGET_DIR."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    if not target.is_absolute():
        target = REPO_ROOT / target
    return target / "debug" / name


def broker_bin() -> Path:
    """The broker binary: BROKER_BIN, else target/debug/bace-token-broker (honouring
    CARGO_TARGET_DIR)."""
    if env := os.environ.get("BROKER_BIN"):
        return Path(env)
    return _debug_bin("bace-token-broker")


def fake_bace_bin() -> Path:
    """The fake BACE binary (crates/fake-bace, built by `cargo build --workspace --bins`):
    FAKE_BACE_BIN, else target/debug/fake-bace (honouring CARGO_TARGET_DIR)."""
    if env := os.environ.get("FAKE_BACE_BIN"):
        return Path(env)
    return _debug_bin("fake-bace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Short reconnect backoff and a private subchannel pool: otherwise grpc-core backs off for
# seconds after the first refused connection and fast polling is moot.
FAST_RECONNECT = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 100),
]


class BrokerNotReady(Exception):
    """The broker exited, or did not answer SERVING in time (the message says which)."""


def wait_serving(
    proc: subprocess.Popen,
    addr: str,
    log_text: Callable[[], str],
    *,
    service: str = READINESS_SERVICE,
    timeout: float = 60.0,
    interval: float = 0.1,
) -> None:
    """Polls grpc.health.v1.Health/Check for `service` in plaintext at `addr` until SERVING;
    raises BrokerNotReady (with the log) if the process exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with grpc.insecure_channel(addr, options=FAST_RECONNECT) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            code = proc.poll()
            if code is not None:
                raise BrokerNotReady(
                    f"broker exited with {code} before becoming ready; log:\n{log_text()}"
                )
            try:
                resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() >= deadline:
                raise BrokerNotReady(
                    f"broker not SERVING {service} at {addr} within {timeout:.0f} s "
                    f"(last: {last}); log:\n{log_text()}"
                )
            time.sleep(interval)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM, then the exit code; None (after a SIGKILL) when it did not exit in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


class BrokerProcess:
    """`bace-token-broker serve --config FILE` in `workdir`: the config written there as
    config.yaml, the output to broker.log."""

    def __init__(self, binary: Path, config: dict[str, Any], workdir: Path):
        self.config = config
        self.addr: str = config["listen"]
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "broker.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, health_addr: str, timeout: float = 60.0) -> None:
        """Waits for readiness (SERVING) on `health_addr`; the test fails, and the process is
        killed, if it exits first or `timeout` passes."""
        try:
            wait_serving(self.proc, health_addr, self.log_text, timeout=timeout)
        except BaseException as e:
            self.proc.kill()
            self.proc.wait()
            if isinstance(e, BrokerNotReady):
                pytest.fail(str(e))
            raise

    def stop_cleanly(self, timeout: float = 15.0) -> None:
        """SIGTERM; the broker must exit 0 within `timeout`."""
        code = stop(self.proc, timeout)
        if code is None:
            pytest.fail(
                f"broker did not exit within {timeout:.0f} s of SIGTERM; "
                f"log:\n{self.log_text()}"
            )
        assert code == 0, f"broker exited with {code} after SIGTERM; log:\n{self.log_text()}"


# === the fake BACE, as a process ===


class FakeBaceNotReady(Exception):
    """The fake BACE exited, or did not announce its URLs in time (the message says which)."""


# Loopback only: never through an HTTP proxy from the environment.
_NO_PROXY = build_opener(ProxyHandler({}))


class FakeBaceProcess:
    """The Rust fake BACE (`crates/fake-bace`, the `fake-bace` binary) as a subprocess, with
    these accounts (dicts as in its accounts file: username, password, client_id,
    client_secret, optionally login_lifetime_secs, refresh_lifetime_secs, refresh_style,
    error_shape). Accounts are keyed by username; both grants check client_id and
    client_secret too, the password grant the password.

    Starts on a free loopback port and waits for the JSON line with its URLs (`base_url`,
    `token_url`, `api_url`). What it issued and how often it was called come from its
    introspection endpoints under `/_fake/`. Its stdin is a pipe: if this process dies, the
    fake sees the end of stdin and stops too. A context manager; `stop()` sends SIGTERM."""

    def __init__(
        self,
        binary: Path,
        accounts: Iterable[dict[str, Any]],
        workdir: Path,
        *,
        timeout: float = 30.0,
    ):
        accounts_path = workdir / "fake-bace-accounts.json"
        accounts_path.write_text(json.dumps({"accounts": list(accounts)}))
        self.log_path = workdir / "fake-bace.log"
        self.exit_code: int | None = None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), "--accounts", str(accounts_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=workdir,
            )
        try:
            urls = json.loads(self._read_line(timeout))
        except BaseException:
            self.proc.kill()
            self._close()
            raise
        self.base_url: str = urls["base_url"]
        self.token_url: str = urls["token_url"]
        self.api_url: str = urls["api_url"]

    def _read_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise FakeBaceNotReady(
                f"fake BACE printed no URL line within {timeout:.0f} s; log:\n{self.log_text()}"
            )
        line = self.proc.stdout.readline().decode()
        if not line:
            code = self.proc.wait()
            raise FakeBaceNotReady(
                f"fake BACE exited with {code} before listening; log:\n{self.log_text()}"
            )
        return line

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _get(self, path: str) -> dict[str, Any] | None:
        """GET a fake-only endpoint: its JSON, or None on 404."""
        try:
            with _NO_PROXY.open(self.base_url + path, timeout=10) as resp:
                return json.load(resp)
        except HTTPError as e:
            if e.code == 404:
                return None
            raise

    def token_info(self, access_token: str) -> dict[str, Any] | None:
        """What the fake knows of an access token (`username`, `valid`, `revoked`,
        `expires_at`), or None if it did not issue it."""
        return self._get("/_fake/tokens/" + quote(access_token, safe=""))

    def issued_to(self, access_token: str) -> str | None:
        """The username of the account the fake issued this access token to, if it did."""
        info = self.token_info(access_token)
        return None if info is None else info["username"]

    @property
    def calls(self) -> int:
        """Token requests the fake received, whatever their account or grant."""
        counts = self._get("/_fake/calls")
        assert counts is not None
        return counts["total"]

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then the exit code (0 on a clean stop); None (after a SIGKILL) when it did
        not exit in time. Idempotent."""
        if self.proc.poll() is None:
            self.exit_code = stop(self.proc, timeout)
        elif self.exit_code is None:
            self.exit_code = self.proc.returncode
        self._close()
        return self.exit_code

    def _close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.proc.wait()

    def __enter__(self) -> FakeBaceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def built(path: Path) -> Path:
    """`path`, a binary of this workspace; the test fails, saying how to build it, if it is
    missing."""
    if not path.is_file():
        pytest.fail(f"{path} not found; run `cargo build --workspace --bins` first")
    return path


def running_fake_bace(
    accounts: Iterable[dict[str, Any]], workdir: Path
) -> Iterator[FakeBaceProcess]:
    """The body of a fake BACE fixture (`yield from`): the fake with `accounts`, failing the
    test if it does not start, and the fixture if it does not stop cleanly."""
    try:
        fake = FakeBaceProcess(built(fake_bace_bin()), accounts, workdir)
    except FakeBaceNotReady as e:
        pytest.fail(str(e))
    try:
        yield fake
    finally:
        code = fake.stop()
    assert code == 0, f"fake BACE exited with {code} after SIGTERM; log:\n{fake.log_text()}"


# === a throwaway PKI ===


@dataclass
class Issued:
    """A certificate and its private key, as PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A self-signed ECDSA P-256 CA that issues leaf certificates valid for a day."""

    def __init__(self, name: str = "bace-token-broker test CA"):
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        public = self._key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        uris: Iterable[str] = (),
        server: bool = False,
        client: bool = False,
    ) -> Issued:
        """A leaf certificate with these SANs, for TLS servers and/or clients."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
