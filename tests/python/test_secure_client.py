"""Secured callers, cross-language: a Python grpcio client against the real broker binary with
mTLS and with Kubernetes service-account tokens.

Everything secret is made here with `cryptography`: a CA, a server certificate (SANs 127.0.0.1
and localhost), client certificates whose URI SANs are SPIFFE IDs, and an RSA key whose JWKS the
broker reads from a file; the service-account tokens (RS256 JWTs) are signed by hand. The
broker runs `serve --config FILE` against the Rust fake BACE (`crates/fake-bace`, run as the
`fake-bace` process on loopback), with two accounts, `fleet-a` and `fleet-b`:

- broker A: TLS with client certificates from the CA, an allow list of SPIFFE IDs, and the
  plaintext health-only listener (`health_listen`) that Kubernetes probes use;
- broker B: plaintext, service-account tokens checked against the JWKS file, an allow list of
  service accounts.

Environment: BROKER_BIN, the broker binary to run (default target/debug/bace-token-broker), and
FAKE_BACE_BIN, the fake's (default target/debug/fake-bace), both honouring CARGO_TARGET_DIR.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import testkit
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE = testkit.READINESS_SERVICE
RPC_TIMEOUT_S = 10.0

ACCOUNTS = ("fleet-a", "fleet-b")
WORKER = "spiffe://cluster.local/ns/ingest/sa/worker"  # allowed fleet-a only
OTHER = "spiffe://cluster.local/ns/other/sa/x"  # allowed nothing

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "bace-token-broker"
KID = "test-signing-key-1"
EXPORTER = ("reports", "exporter")  # allowed every account
STRANGER = ("reports", "stranger")  # not in the allow list


# The broker's credentials for each account; the fake BACE has an account for each (keyed by
# username, checking the password, client id and client secret).
CREDENTIALS = {
    name: {
        "client_id": f"{name}-client",
        "client_secret": f"{name}-client-secret",
        "username": f"ops@{name}.example.com",
        "password": f"{name}-password",
    }
    for name in ACCOUNTS
}
FAKE_LOGIN_LIFETIME_S = 3600  # tokens from the password grant live an hour


# === service-account tokens, signed by hand ===


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


class SigningKey:
    """An RSA key standing in for the cluster's service-account signing key."""

    def __init__(self, kid: str):
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, str]:
        numbers = self.key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "n": b64url(_uint(numbers.n)),
            "e": b64url(_uint(numbers.e)),
            "kid": self.kid,
            "alg": "RS256",
            "use": "sig",
        }

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        """An RS256 JWT: base64url(header).base64url(payload).base64url(PKCS#1 v1.5 SHA-256)."""
        header = {"alg": "RS256", "typ": "JWT", "kid": kid or self.kid}
        signing_input = ".".join(
            b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"


def sa_claims(
    namespace: str,
    name: str,
    *,
    iss: str = ISSUER,
    aud: str = AUDIENCE,
    exp_in: int = 600,
    nbf_in: int = 0,
) -> dict[str, Any]:
    """The claims of a projected service-account token (times relative to now, in seconds)."""
    now = int(time.time())
    return {
        "iss": iss,
        "aud": [aud],
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "iat": now + min(nbf_in, 0),
        "nbf": now + nbf_in,
        "exp": now + exp_in,
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
            "pod": {"name": f"{name}-7d9f8-abcde", "uid": str(uuid.uuid4())},
        },
    }


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# === brokers ===


@pytest.fixture(scope="module")
def binary() -> Path:
    return testkit.built(testkit.broker_bin())


@pytest.fixture(scope="module")
def fake_bace(tmp_path_factory):
    """The Rust fake BACE (`fake-bace`) with an account per entry of CREDENTIALS."""
    accounts = [
        dict(creds, login_lifetime_secs=FAKE_LOGIN_LIFETIME_S) for creds in CREDENTIALS.values()
    ]
    yield from testkit.running_fake_bace(accounts, tmp_path_factory.mktemp("fake-bace"))


def issued_to(fake: testkit.FakeBaceProcess, access_token: str) -> str | None:
    """The account (of ACCOUNTS) the fake issued `access_token` to, if it issued it."""
    username = fake.issued_to(access_token)
    return next((name for name, c in CREDENTIALS.items() if c["username"] == username), None)


def _base_config(fake: testkit.FakeBaceProcess) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{testkit.free_port()}",
        "metrics_listen": "",
        "shutdown_grace": "2s",
        "accounts": {
            name: dict(creds, token_url=fake.token_url) for name, creds in CREDENTIALS.items()
        },
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """CA, server certificate, client certificates (and one from a CA the broker does not
    trust), as PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca = testkit.CertificateAuthority("secure-client test CA")
    rogue = testkit.CertificateAuthority("rogue CA")
    files = {"ca": d / "ca.crt"}
    files["ca"].write_bytes(ca.cert_pem)
    issued = {
        "server": ca.issue("broker", dns=["localhost"], ips=["127.0.0.1"], server=True),
        "worker": ca.issue("worker", uris=[WORKER], client=True),
        "other": ca.issue("other", uris=[OTHER], client=True),
        "rogue": rogue.issue("worker", uris=[WORKER], client=True),
    }
    for name, cert in issued.items():
        files[f"{name}.crt"], files[f"{name}.key"] = d / f"{name}.crt", d / f"{name}.key"
        cert.write(files[f"{name}.crt"], files[f"{name}.key"])
    return files


@pytest.fixture(scope="module")
def broker_a(binary, fake_bace, pki, tmp_path_factory):
    """mTLS: client certificates from the CA, the allow list by SPIFFE ID; plaintext health."""
    config = _base_config(fake_bace)
    config["health_listen"] = f"127.0.0.1:{testkit.free_port()}"
    config["tls"] = {
        "cert_file": str(pki["server.crt"]),
        "key_file": str(pki["server.key"]),
        "client_ca_file": str(pki["ca"]),
    }
    config["auth"] = {"allow": [{"caller": WORKER, "accounts": ["fleet-a"]}]}
    broker = testkit.BrokerProcess(binary, config, tmp_path_factory.mktemp("broker-a"))
    broker.wait_ready(config["health_listen"])
    yield broker
    broker.stop_cleanly()


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return SigningKey(KID)


@pytest.fixture(scope="module")
def broker_b(binary, fake_bace, signing_key, tmp_path_factory):
    """Plaintext, service-account tokens checked against a JWKS file."""
    workdir = tmp_path_factory.mktemp("broker-b")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [signing_key.jwk()]}))
    config = _base_config(fake_bace)
    config["auth"] = {
        "kubernetes": {"issuer": ISSUER, "jwks_file": str(jwks), "audience": AUDIENCE},
        "allow": [{"caller": "system:serviceaccount:reports:exporter", "accounts": ["*"]}],
    }
    broker = testkit.BrokerProcess(binary, config, workdir)
    broker.wait_ready(config["listen"])
    yield broker
    broker.stop_cleanly()


# === channels and calls ===


def _mtls_channel(
    broker: testkit.BrokerProcess, pki: dict[str, Path], client: str | None
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{client}.key"].read_bytes() if client else None,
        certificate_chain=pki[f"{client}.crt"].read_bytes() if client else None,
    )
    # A private subchannel pool: a channel never reuses another's (differently authenticated)
    # connection.
    return grpc.secure_channel(broker.addr, creds, options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture(scope="module")
def worker(pb, broker_a, pki):
    with _mtls_channel(broker_a, pki, "worker") as ch:
        yield pb[1].TokenBrokerServiceStub(ch)


@pytest.fixture(scope="module")
def other(pb, broker_a, pki):
    with _mtls_channel(broker_a, pki, "other") as ch:
        yield pb[1].TokenBrokerServiceStub(ch)


@pytest.fixture(scope="module")
def plain_b(pb, broker_b):
    with grpc.insecure_channel(broker_b.addr) as ch:
        yield pb[1].TokenBrokerServiceStub(ch)


def get_token(pb, stub, account: str, metadata=None):
    return stub.GetToken(
        pb[0].GetTokenRequest(account=account), metadata=metadata, timeout=RPC_TIMEOUT_S
    ).token


def list_accounts(pb, stub, metadata=None) -> list[str]:
    resp = stub.ListAccounts(pb[0].ListAccountsRequest(), metadata=metadata, timeout=RPC_TIMEOUT_S)
    return [a.account for a in resp.accounts]


def expect_code(code: grpc.StatusCode, call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as excinfo:
        call(*args, **kwargs)
    err = excinfo.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    return err


# === broker A: mTLS ===


def test_mtls_allowed_identity_gets_its_account(pb, worker, fake_bace):
    tok = get_token(pb, worker, "fleet-a")
    assert tok.account == "fleet-a"
    assert issued_to(fake_bace, tok.access_token) == "fleet-a", "a token the fake issued to fleet-a"
    assert tok.authorization == "Bearer " + tok.access_token


def test_mtls_other_account_denied(pb, worker):
    err = expect_code(grpc.StatusCode.PERMISSION_DENIED, get_token, pb, worker, "fleet-b")
    assert "fleet-b" in err.details()


def test_mtls_unknown_account_denied_not_found(pb, worker):
    """No enumeration: an account that does not exist is denied like one that does."""
    expect_code(grpc.StatusCode.PERMISSION_DENIED, get_token, pb, worker, "no-such")


def test_mtls_identity_without_grants_denied(pb, other):
    for account in ("fleet-a", "fleet-b", "no-such"):
        expect_code(grpc.StatusCode.PERMISSION_DENIED, get_token, pb, other, account)
    assert list_accounts(pb, other) == []


def test_mtls_list_accounts_filtered(pb, worker):
    assert list_accounts(pb, worker) == ["fleet-a"]


def test_mtls_watch_and_invalidate_are_authorized_too(pb, worker):
    pb2, _ = pb
    stream = worker.WatchToken(pb2.WatchTokenRequest(account="fleet-a"), timeout=RPC_TIMEOUT_S)
    first = next(iter(stream))
    stream.cancel()
    assert first.token.account == "fleet-a"
    denied = worker.WatchToken(pb2.WatchTokenRequest(account="fleet-b"), timeout=RPC_TIMEOUT_S)
    expect_code(grpc.StatusCode.PERMISSION_DENIED, lambda: next(iter(denied)))
    expect_code(
        grpc.StatusCode.PERMISSION_DENIED,
        worker.Invalidate,
        pb2.InvalidateRequest(account="fleet-b", access_token="whatever"),
        timeout=RPC_TIMEOUT_S,
    )


def test_mtls_without_client_certificate_fails_the_handshake(pb, broker_a, pki):
    with _mtls_channel(broker_a, pki, None) as ch:
        stub = pb[1].TokenBrokerServiceStub(ch)
        expect_code(grpc.StatusCode.UNAVAILABLE, get_token, pb, stub, "fleet-a")


def test_mtls_client_certificate_from_another_ca_fails_the_handshake(pb, broker_a, pki):
    with _mtls_channel(broker_a, pki, "rogue") as ch:
        stub = pb[1].TokenBrokerServiceStub(ch)
        expect_code(grpc.StatusCode.UNAVAILABLE, get_token, pb, stub, "fleet-a")


def test_mtls_port_refuses_plaintext(pb, broker_a):
    with grpc.insecure_channel(broker_a.addr) as ch:
        stub = pb[1].TokenBrokerServiceStub(ch)
        expect_code(grpc.StatusCode.UNAVAILABLE, get_token, pb, stub, "fleet-a")


def test_plaintext_health_listener_needs_no_certificate(pb, broker_a):
    """What Kubernetes' gRPC probes see: health in plaintext on health_listen, and nothing
    else there."""
    with grpc.insecure_channel(broker_a.config["health_listen"]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        stub = pb[1].TokenBrokerServiceStub(ch)
        expect_code(grpc.StatusCode.UNIMPLEMENTED, get_token, pb, stub, "fleet-a")


def test_mtls_health_needs_no_identity(pki, broker_a):
    """Over TLS, a client certificate with no grants still gets health answers."""
    with _mtls_channel(broker_a, pki, "other") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=RPC_TIMEOUT_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


# === broker B: service-account tokens ===


def test_sa_token_allowed_every_account(pb, plain_b, signing_key, fake_bace):
    md = bearer(signing_key.sign(sa_claims(*EXPORTER)))
    for account in ACCOUNTS:
        tok = get_token(pb, plain_b, account, md)
        assert tok.account == account
        assert issued_to(fake_bace, tok.access_token) == account
    assert list_accounts(pb, plain_b, md) == list(ACCOUNTS)


def test_sa_token_with_every_account_learns_unknown_ones(pb, plain_b, signing_key):
    """A caller allowed `*` may list every account, so there is nothing to hide from it: an
    unknown account is NOT_FOUND (callers with a narrower grant get PERMISSION_DENIED)."""
    md = bearer(signing_key.sign(sa_claims(*EXPORTER)))
    expect_code(grpc.StatusCode.NOT_FOUND, get_token, pb, plain_b, "no-such", md)


def test_no_token_unauthenticated(pb, plain_b):
    expect_code(grpc.StatusCode.UNAUTHENTICATED, get_token, pb, plain_b, "fleet-a")
    expect_code(grpc.StatusCode.UNAUTHENTICATED, list_accounts, pb, plain_b)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired"),
        ("wrong audience", "audience"),
        ("wrong issuer", "issuer"),
        ("not yet valid", "not yet valid"),
        ("bad signature", "signature"),
        ("unknown kid", "unknown key"),
        ("not a JWT", "malformed"),
        ("not a bearer", "malformed"),
    ],
)
def test_invalid_token_unauthenticated(pb, plain_b, signing_key, case, reason):
    claims = sa_claims(*EXPORTER)
    if case == "expired":
        token = signing_key.sign(sa_claims(*EXPORTER, exp_in=-600))
    elif case == "wrong audience":
        token = signing_key.sign(sa_claims(*EXPORTER, aud="https://kubernetes.default.svc"))
    elif case == "wrong issuer":
        token = signing_key.sign(sa_claims(*EXPORTER, iss="https://elsewhere.example.com"))
    elif case == "not yet valid":
        token = signing_key.sign(sa_claims(*EXPORTER, nbf_in=600, exp_in=1200))
    elif case == "bad signature":
        token = SigningKey(KID).sign(claims)  # same kid, another key
    elif case == "unknown kid":
        token = SigningKey("another-kid").sign(claims)
    elif case == "not a JWT":
        token = "not.a.jwt"
    else:
        md = [("authorization", "Basic " + signing_key.sign(claims))]
        err = expect_code(grpc.StatusCode.UNAUTHENTICATED, get_token, pb, plain_b, "fleet-a", md)
        assert reason in err.details()
        return
    err = expect_code(grpc.StatusCode.UNAUTHENTICATED, get_token, pb, plain_b, "fleet-a", bearer(token))
    assert reason in err.details(), err.details()


def test_sa_not_in_allow_list_denied(pb, plain_b, signing_key):
    md = bearer(signing_key.sign(sa_claims(*STRANGER)))
    for account in ACCOUNTS:
        expect_code(grpc.StatusCode.PERMISSION_DENIED, get_token, pb, plain_b, account, md)
    assert list_accounts(pb, plain_b, md) == []


def test_health_and_reflection_need_no_identity(broker_b):
    with grpc.insecure_channel(broker_b.addr) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=RPC_TIMEOUT_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        (answer,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=RPC_TIMEOUT_S,
        )
        assert SERVICE in [s.name for s in answer.list_services_response.service]


def test_denials_are_logged_without_tokens(broker_b, signing_key, pb, plain_b):
    token = signing_key.sign(sa_claims(*STRANGER))
    expect_code(grpc.StatusCode.PERMISSION_DENIED, get_token, pb, plain_b, "fleet-b", bearer(token))
    deadline = time.monotonic() + 5
    while "system:serviceaccount:reports:stranger" not in broker_b.log_text():
        assert time.monotonic() < deadline, broker_b.log_text()
        time.sleep(0.05)
    assert token not in broker_b.log_text()
    assert token.split(".")[2] not in broker_b.log_text()
