"""Cross-language contract test: a Python grpcio client against the real broker binary.

The Python stubs are generated from `proto/` at test time (grpc_tools.protoc, the `pb` fixture
of conftest.py), so this test also proves the proto compiles outside the Rust build. The broker runs as a subprocess in demo
mode (`serve --demo`), which serves the demo accounts `demo-fleet-a` and `demo-fleet-b` from
an in-process fake BACE, on a free loopback port.

Environment:
  BROKER_BIN  path to the broker binary (default: target/debug/bace-token-broker, honouring
              CARGO_TARGET_DIR). `scripts/test-all` builds it before running pytest.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import grpc
import pytest
import testkit
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "bace.tokenbroker.v1.TokenBrokerService"

READY_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0
# Deadline on every RPC so a misbehaving broker fails the test instead of hanging it.
RPC_TIMEOUT_S = 10.0


# === fixtures ===


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """Starts `bace-token-broker serve --demo`, waits until it is ready, yields its address.

    Teardown sends SIGTERM and requires a clean exit (code 0) within SHUTDOWN_TIMEOUT_S.
    """
    binary = testkit.broker_bin()
    if not binary.is_file():
        pytest.fail(f"broker binary not found at {binary}; run `cargo build --bins` first")

    addr = f"127.0.0.1:{testkit.free_port()}"
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "serve", "--demo", "--listen", addr],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    try:
        testkit.wait_serving(proc, addr, log_text, timeout=READY_TIMEOUT_S)
    except testkit.BrokerNotReady as e:
        proc.kill()
        proc.wait()
        pytest.fail(str(e))
    except BaseException:
        proc.kill()
        proc.wait()
        raise

    yield addr

    code = testkit.stop(proc, SHUTDOWN_TIMEOUT_S)
    if code is None:
        pytest.fail(
            f"broker did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM; log:\n{log_text()}"
        )
    assert code == 0, f"broker exited with {code} after SIGTERM; log:\n{log_text()}"


@pytest.fixture(scope="module")
def channel(broker):
    # Closed (by fixture order) before the broker gets SIGTERM, so shutdown has no open client.
    with grpc.insecure_channel(broker) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(pb, channel):
    _, pb2_grpc = pb
    return pb2_grpc.TokenBrokerServiceStub(channel)


# === helpers ===


def _get_token(pb, stub, account: str, **kwargs):
    pb2, _ = pb
    return stub.GetToken(pb2.GetTokenRequest(account=account, **kwargs), timeout=RPC_TIMEOUT_S)


def _invalidate(pb, stub, account: str, access_token: str):
    pb2, _ = pb
    return stub.Invalidate(
        pb2.InvalidateRequest(account=account, access_token=access_token),
        timeout=RPC_TIMEOUT_S,
    )


def _assert_code(excinfo, code: grpc.StatusCode) -> None:
    err = excinfo.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"


# === tests ===


def test_stubs_generate(pb):
    """The proto compiles with grpc_tools.protoc and exposes the expected service."""
    pb2, pb2_grpc = pb
    svc = pb2.DESCRIPTOR.services_by_name["TokenBrokerService"]
    assert svc.full_name == SERVICE
    assert {m.name for m in svc.methods} == {"GetToken", "Invalidate", "WatchToken", "ListAccounts"}
    assert hasattr(pb2_grpc, "TokenBrokerServiceStub")


def test_health_overall_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_get_token(pb, stub):
    before = dt.datetime.now(dt.timezone.utc)
    resp = _get_token(pb, stub, "demo-fleet-a")
    assert resp.HasField("token")
    tok = resp.token
    assert tok.account == "demo-fleet-a"
    assert tok.access_token != ""
    assert tok.token_type == "Bearer"
    assert tok.authorization == "Bearer " + tok.access_token
    assert tok.HasField("expires_at")
    assert tok.expires_at.ToDatetime(tzinfo=dt.timezone.utc) > before


def test_get_token_unknown_account(pb, stub):
    with pytest.raises(grpc.RpcError) as excinfo:
        _get_token(pb, stub, "no-such-account")
    _assert_code(excinfo, grpc.StatusCode.NOT_FOUND)


def test_get_token_empty_account(pb, stub):
    with pytest.raises(grpc.RpcError) as excinfo:
        _get_token(pb, stub, "")
    _assert_code(excinfo, grpc.StatusCode.INVALID_ARGUMENT)


def test_get_token_negative_min_validity(pb, stub):
    with pytest.raises(grpc.RpcError) as excinfo:
        _get_token(pb, stub, "demo-fleet-a", min_validity=duration_pb2.Duration(seconds=-1))
    _assert_code(excinfo, grpc.StatusCode.INVALID_ARGUMENT)


def test_invalidate_sequence(pb, stub):
    """Invalidate the current token, then a stale one, then the new one inside the cooldown."""
    account = "demo-fleet-b"
    old = _get_token(pb, stub, account).token.access_token
    assert old

    first = _invalidate(pb, stub, account, old)
    assert first.invalidated is True
    assert first.outcome == pb[0].INVALIDATE_OUTCOME_INVALIDATED
    assert first.token.account == account
    new = first.token.access_token
    assert new and new != old

    stale = _invalidate(pb, stub, account, old)
    assert stale.invalidated is False
    assert stale.outcome == pb[0].INVALIDATE_OUTCOME_ALREADY_REPLACED
    assert stale.token.access_token == new

    # Within the default 10 s invalidate cooldown: no new login, current token back.
    cooled = _invalidate(pb, stub, account, new)
    assert cooled.invalidated is False
    assert cooled.outcome == pb[0].INVALIDATE_OUTCOME_COOLDOWN
    assert cooled.token.access_token == new


def test_reflection_v1alpha_lists_service(channel):
    """grpcio-reflection's client (v1alpha protocol) lists and describes the service."""
    db = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE in db.get_services()
    fdp = db.FindFileContainingSymbol(SERVICE)
    assert fdp.package == "bace.tokenbroker.v1"
    (svc,) = [s for s in fdp.service if s.name == "TokenBrokerService"]
    assert {m.name for m in svc.method} == {"GetToken", "Invalidate", "WatchToken", "ListAccounts"}


def test_reflection_v1_lists_service(channel):
    """The v1 reflection service (what grpcurl tries first) lists the service too.

    grpcio-reflection ships only v1alpha stubs; the v1 messages are wire-identical, so the
    v1alpha message classes are reused on the v1 method path.
    """
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(
        call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT_S)
    )
    assert len(responses) == 1
    names = [s.name for s in responses[0].list_services_response.service]
    assert SERVICE in names


def test_watch_token_sends_the_current_token(pb, stub):
    """A server stream: the first message is the current valid token."""
    pb2, _ = pb
    current = _get_token(pb, stub, "demo-fleet-a").token
    stream = stub.WatchToken(pb2.WatchTokenRequest(account="demo-fleet-a"), timeout=RPC_TIMEOUT_S)
    first = next(iter(stream))
    stream.cancel()
    assert first.token.account == "demo-fleet-a"
    assert first.token.authorization == "Bearer " + first.token.access_token
    assert first.token.expires_at.ToSeconds() >= current.expires_at.ToSeconds()


def test_list_accounts(pb, stub):
    """Every demo account is listed with a state, and never a token."""
    pb2, _ = pb
    resp = stub.ListAccounts(pb2.ListAccountsRequest(), timeout=RPC_TIMEOUT_S)
    names = [a.account for a in resp.accounts]
    assert names == sorted(names)
    assert {"demo-fleet-a", "demo-fleet-b", "demo-fleet-c"} <= set(names)
    a = next(a for a in resp.accounts if a.account == "demo-fleet-a")
    assert a.state in (pb2.ACCOUNT_STATE_READY, pb2.ACCOUNT_STATE_REFRESHING)
    assert a.HasField("expires_at") and a.HasField("last_success_at")
    token = _get_token(pb, stub, "demo-fleet-a").token.access_token
    assert token not in str(resp)
