"""The Python client library (clients/python, `bace_token_broker`), blocking side: BrokerClient,
RequestsAuth and HttpxAuth with httpx.Client, against the real broker binary and the Rust fake
BACE (`fake-bace`) on loopback.

RPCs are counted from the broker's /metrics (`grpc_server_handled_total`), HTTP requests by a
counting transport on the client side. Concurrency is real (1,000 threads), synchronised with
barriers and the client's own flight bookkeeping, never with sleeps."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import grpc
import httpx
import pytest
import requests
import testkit
from client_harness import (  # noqa: F401  (fixtures)
    FAKE_LOGIN_LIFETIME_S,
    REJECTED,
    BrokerProcess,
    ManualClock,
    broker,
    broker_config,
    delta,
    fake_bace,
    fresh_account,
    httpx_client,
    redirects,
    restricted_url,
    revoke,
)

from bace_token_broker import (
    BrokerClient,
    BrokerError,
    BrokerUnavailable,
    CredentialsRejected,
    DeadlineExceeded,
    HttpxAuth,
    InvalidateOutcome,
    InvalidateResult,
    InvalidRequest,
    PermissionDenied,
    RequestsAuth,
    Token,
    Unauthenticated,
    UnknownAccount,
)
from bace_token_broker import errors
from bace_token_broker._core import ServiceAccountToken, expires_at, worth_retrying

THREADS = 1000
TIMEOUT = 10.0


# === helpers ===


class CountingAdapter(requests.adapters.HTTPAdapter):
    """Counts the HTTP requests requests really sends (the auth's retry included)."""

    def __init__(self) -> None:
        super().__init__(pool_connections=1, pool_maxsize=THREADS)
        self.sent = 0
        self._lock = threading.Lock()

    def send(self, request, **kwargs):  # type: ignore[override]
        with self._lock:
            self.sent += 1
        return super().send(request, **kwargs)


def requests_session(
    client: BrokerClient, account: str
) -> tuple[requests.Session, CountingAdapter]:
    session = requests.Session()
    session.trust_env = False  # loopback only: no proxy from the environment
    adapter = CountingAdapter()
    session.mount("http://", adapter)
    session.auth = RequestsAuth(client, account)
    return session, adapter


def burst(n: int, call: Callable[[], Any]) -> list[Any]:
    """`call()` in n threads started together; their results (exceptions as values)."""
    start = threading.Barrier(n)

    def one() -> Any:
        start.wait(timeout=300)
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - returned for the test to check
            return e

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: one(), range(n)))


# === the cache and one shared GetToken ===


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_1000_concurrent_calls_make_one_get_token_then_none_until_the_margin(
    broker, fake_bace, fresh_account, library
):
    clock = ManualClock(time.time())
    client = BrokerClient(broker.addr, timeout=TIMEOUT, margin=60, clock=clock)
    if library == "requests":
        session, _ = requests_session(client, fresh_account)
        get = lambda: session.get(fake_bace.api_url, timeout=60).status_code  # noqa: E731
    else:
        http, _ = httpx_client(client, fresh_account)
        get = lambda: http.get(fake_bace.api_url).status_code  # noqa: E731
    before = broker.counts()

    statuses = burst(THREADS, get)
    assert statuses == [200] * THREADS, [s for s in statuses if s != 200][:3]
    assert delta(broker, before)["GetToken"] == 1

    # Cached: more calls, no RPC, until the token is within the margin of its expiry.
    token = client.cached(fresh_account)
    assert token is not None
    assert burst(50, get) == [200] * 50
    clock.now = expires_at(token) - 60 - 1
    assert get() == 200
    assert delta(broker, before)["GetToken"] == 1
    clock.now = expires_at(token) - 60 + 1
    assert get() == 200
    assert delta(broker, before) == {"GetToken": 2, "Invalidate": 0}


def test_token_returns_the_cached_token_message(broker, fake_bace, fresh_account):
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    before = broker.counts()
    first = client.token(fresh_account)
    assert first.account == fresh_account
    assert first.authorization == "Bearer " + first.access_token
    assert fake_bace.token_info(first.access_token)["valid"] is True
    assert client.token(fresh_account) is first
    assert delta(broker, before)["GetToken"] == 1


def test_min_validity_beyond_the_cached_token_asks_the_broker(broker, fresh_account):
    clock = ManualClock(time.time())
    client = BrokerClient(broker.addr, timeout=TIMEOUT, margin=10, clock=clock)
    token = client.token(fresh_account)
    left = expires_at(token) - clock.now
    before = broker.counts()
    assert client.token(fresh_account, min_validity=left - 60) is token
    assert delta(broker, before)["GetToken"] == 0
    # More than the cached token has left: the broker is asked (and says it cannot, for the
    # bar with the margin and for `min_validity` alone).
    with pytest.raises(InvalidRequest) as e:
        client.token(fresh_account, min_validity=30 * 24 * 3600)
    assert e.value.code == grpc.StatusCode.OUT_OF_RANGE and not e.value.retryable
    assert delta(broker, before)["GetToken"] == 2


def test_the_broker_is_asked_for_the_margin_plus_min_validity(broker, fresh_account):
    """GetToken asks for `margin + min_validity`, the cache's bar. With a margin longer than the
    fake's login tokens last (1 h), the broker refreshes (to 14 d) and the cache keeps the
    answer; asked for `min_validity` alone it would serve the login token, which the cache
    never keeps: a GetToken on every call."""
    margin = FAKE_LOGIN_LIFETIME_S + 600
    client = BrokerClient(broker.addr, timeout=TIMEOUT, margin=margin)
    before = broker.counts()
    token = client.token(fresh_account, min_validity=60)
    assert expires_at(token) - time.time() > margin + 60
    assert client.token(fresh_account, min_validity=60) is token
    assert delta(broker, before)["GetToken"] == 1
    # A bar past what the broker can promise (its refreshed_lifetime, 14 d) is OUT_OF_RANGE;
    # the client then asks for `min_validity` alone (as the Rust client does): that answer
    # serves the call and is not cached.
    far = BrokerClient(broker.addr, timeout=TIMEOUT, margin=14 * 24 * 3600)
    before = broker.counts()
    assert far.token(fresh_account).access_token
    assert far.cached(fresh_account) is None
    assert delta(broker, before)["GetToken"] == 2


class Gate(grpc.UnaryUnaryClientInterceptor):
    """Holds every GetToken call until `open` is set."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def intercept_unary_unary(self, continuation, details, request):
        if details.method.endswith("/GetToken"):
            assert self.open.wait(timeout=60), "gate never opened"
        return continuation(details, request)


def test_a_failure_reaches_every_waiter_of_the_shared_call(broker):
    gate = Gate()
    client = BrokerClient(broker.addr, timeout=TIMEOUT, interceptors=[gate])
    n = 20
    before = broker.counts()
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(client.token, REJECTED) for _ in range(n)]
        assert client._flights.wait_for_waiters(("token", REJECTED, 0.0), n - 1, timeout=60)
        gate.open.set()
        errors = [f.exception(timeout=60) for f in futures]
    assert all(isinstance(e, CredentialsRejected) for e in errors), errors
    assert not errors[0].retryable
    assert delta(broker, before)["GetToken"] == 1


class Interrupt(BaseException):
    """What a KeyboardInterrupt looks like to the flight: not an Exception."""


class InterruptFirst(grpc.UnaryUnaryClientInterceptor):
    """The first GetToken: waits until `release` is set, then raises Interrupt (as if its
    thread were interrupted); the others go through."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.first = True
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):
        with self._lock:
            first, self.first = self.first, False
        if first:
            assert self.release.wait(timeout=60), "never released"
            raise Interrupt()
        return continuation(details, request)


def test_an_interrupted_leader_does_not_strand_the_waiters(broker, fresh_account):
    gate = InterruptFirst()
    client = BrokerClient(broker.addr, timeout=TIMEOUT, interceptors=[gate])
    before = broker.counts()
    key = ("token", fresh_account, 0.0)
    results: list[Any] = []

    def leader() -> None:
        try:
            client.token(fresh_account)
        except Interrupt:
            results.append("interrupted")

    lead = threading.Thread(target=leader)
    lead.start()
    with ThreadPoolExecutor(max_workers=5) as pool:
        futures = [pool.submit(client.token, fresh_account) for _ in range(5)]
        assert client._flights.wait_for_waiters(key, 5, timeout=60)
        gate.release.set()
        tokens = [f.result(timeout=60) for f in futures]
    lead.join(timeout=60)
    assert results == ["interrupted"]
    assert {t.access_token for t in tokens} == {tokens[0].access_token}
    assert delta(broker, before)["GetToken"] == 1, "one of the waiters took over, once"


@pytest.mark.parametrize(
    ("code", "cls", "retryable"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest, False),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidRequest, False),
        (grpc.StatusCode.NOT_FOUND, UnknownAccount, False),
        (grpc.StatusCode.FAILED_PRECONDITION, CredentialsRejected, False),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated, False),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied, False),
        (grpc.StatusCode.UNAVAILABLE, BrokerUnavailable, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, True),
        (grpc.StatusCode.CANCELLED, DeadlineExceeded, True),
        (grpc.StatusCode.INTERNAL, BrokerError, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, BrokerError, True),
    ],
)
def test_every_status_code_has_its_error(code, cls, retryable):
    err = errors.from_status(code, "details")
    assert type(err) is cls and err.retryable is retryable and err.code is code
    assert str(err) == f"{code.name}: details"


def test_the_deadline_is_the_typed_error():
    """A broker that does not answer within `timeout`: an in-process gRPC server whose GetToken
    waits until the test is done with it."""
    from bace_token_broker._pb import token_broker_pb2_grpc as pb_grpc

    done = threading.Event()

    class Stuck(pb_grpc.TokenBrokerServiceServicer):
        def GetToken(self, request, context):  # noqa: N802 - the RPC's name
            done.wait(timeout=60)
            context.abort(grpc.StatusCode.INTERNAL, "released")

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TokenBrokerServiceServicer_to_server(Stuck(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = BrokerClient(f"127.0.0.1:{port}", timeout=0.2)
        with pytest.raises(DeadlineExceeded) as e:
            client.token("fleet-a")
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.value.retryable
        client.close()
    finally:
        done.set()
        server.stop(grace=None)


# === invalidate ===


def test_invalidate_returns_outcome_and_token(broker, fake_bace, fresh_account):
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    old = client.token(fresh_account)
    revoke(fake_bace, old.access_token)
    result = client.invalidate(fresh_account, old.access_token)
    outcome, new = result
    assert isinstance(result, InvalidateResult)
    assert outcome is InvalidateOutcome.INVALIDATED and result.retry
    assert new.access_token != old.access_token
    assert client.token(fresh_account) is new, "the cache holds the replacement"
    again = client.invalidate(fresh_account, old)  # a Token message works too
    assert again.outcome is InvalidateOutcome.ALREADY_REPLACED
    assert again.token.access_token == new.access_token
    for text in (repr(result), str(result), repr(again)):
        assert new.access_token not in text and old.access_token not in text
        assert "redacted" in text


def test_invalidate_of_a_valid_token_is_token_valid(broker, fresh_account):
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    token = client.token(fresh_account)
    result = client.invalidate(fresh_account, token.access_token)
    assert result.outcome is InvalidateOutcome.TOKEN_VALID and not result.retry
    assert result.token.access_token == token.access_token


def test_when_a_401_is_worth_a_retry():
    """TOKEN_VALID never retries, whatever token comes with it; nor does the same token."""
    used, new = Token(account="a", access_token="used"), Token(account="a", access_token="new")
    for outcome in InvalidateOutcome:
        retry = outcome is not InvalidateOutcome.TOKEN_VALID
        assert worth_retrying(InvalidateResult(outcome, new), "used") is retry, outcome
        assert worth_retrying(InvalidateResult(outcome, used), "used") is False, outcome


# === the 401 dance ===


def do_get(library: str, client: BrokerClient, account: str, url: str):
    """One GET through the auth: (status, HTTP requests sent, history statuses)."""
    if library == "requests":
        session, adapter = requests_session(client, account)
        r = session.get(url, timeout=30)
        return r.status_code, adapter.sent, [h.status_code for h in r.history]
    http, sent = httpx_client(client, account)
    with http:
        r = http.get(url)
    return r.status_code, sent.count, [h.status_code for h in r.history]


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_revoked_token_one_invalidate_one_retry_success(broker, fake_bace, fresh_account, library):
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    old = client.token(fresh_account)
    revoke(fake_bace, old.access_token)
    before, logins = broker.counts(), fake_bace.calls

    status, sent, history = do_get(library, client, fresh_account, fake_bace.api_url)

    assert (status, sent, history) == (200, 2, [401])
    assert delta(broker, before) == {"GetToken": 0, "Invalidate": 1}
    assert fake_bace.calls == logins + 1, "one login for the replacement"
    assert client.token(fresh_account).access_token != old.access_token


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_permission_401_is_returned_without_retry(broker, fake_bace, fresh_account, library):
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    token = client.token(fresh_account)
    before, logins = broker.counts(), fake_bace.calls

    status, sent, history = do_get(library, client, fresh_account, restricted_url(fake_bace))

    assert (status, sent, history) == (401, 1, [])
    assert delta(broker, before) == {"GetToken": 0, "Invalidate": 1}
    assert fake_bace.calls == logins, "the token was valid: no new login"
    assert client.token(fresh_account).access_token == token.access_token


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_a_streamed_body_is_not_replayed(broker, fake_bace, fresh_account, library):
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    old = client.token(fresh_account)
    revoke(fake_bace, old.access_token)
    before = broker.counts()

    def body():
        yield b'{"name": '
        yield b'"device"}'

    if library == "requests":
        session, adapter = requests_session(client, fresh_account)
        r = session.post(fake_bace.api_url, data=body(), timeout=30)
        status, sent = r.status_code, adapter.sent
        # A file is a stream too.
        with open(__file__, "rb") as f:
            r2 = session.post(fake_bace.api_url, data=f, timeout=30)
    else:
        http, hook = httpx_client(client, fresh_account)
        r = http.post(fake_bace.api_url, content=body())
        status, sent = r.status_code, hook.count
        r2 = None
    assert (status, sent) == (401, 1), "no retry of a generator body"
    assert delta(broker, before) == {"GetToken": 0, "Invalidate": 1}, "reported all the same"
    new = client.cached(fresh_account)
    assert new is not None and new.access_token != old.access_token
    if r2 is not None:
        assert r2.status_code == 200, "the next request carries the replacement"
    assert do_get(library, client, fresh_account, fake_bace.api_url) == (200, 1, [])


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_a_replayable_post_body_is_sent_again(broker, fake_bace, fresh_account, library):
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    revoke(fake_bace, client.token(fresh_account).access_token)
    if library == "requests":
        session, adapter = requests_session(client, fresh_account)
        r = session.post(fake_bace.api_url, json={"name": "device"}, timeout=30)
        assert (r.status_code, adapter.sent) == (200, 2)
        assert r.request.body == json.dumps({"name": "device"}).encode()
    else:
        http, hook = httpx_client(client, fresh_account)
        r = http.post(fake_bace.api_url, json={"name": "device"})
        assert (r.status_code, hook.count) == (200, 2)
        assert json.loads(r.request.content) == {"name": "device"}


@pytest.fixture(scope="module")
def broker_no_verify(fake_bace, tmp_path_factory):
    """A broker without `upstream.verify_url` (it cannot tell a permission 401 from a bad token)
    and with an invalidate cooldown no test outlasts."""
    config = broker_config(fake_bace, upstream={}, invalidate_cooldown="1h")
    proc = BrokerProcess(testkit.broker_bin(), config, tmp_path_factory.mktemp("no-verify"))
    yield proc
    proc.stop_cleanly()


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_never_loops_when_the_new_token_is_refused_too(
    broker_no_verify, fake_bace, fresh_account, library
):
    """Without a verify check a permission 401 looks like a bad token: one Invalidate, one
    retry with the new token, and its 401 is returned."""
    client = BrokerClient(broker_no_verify.addr, timeout=TIMEOUT)
    old = client.token(fresh_account)
    before = broker_no_verify.counts()

    status, sent, history = do_get(library, client, fresh_account, restricted_url(fake_bace))

    assert (status, sent, history) == (401, 2, [401])
    assert delta(broker_no_verify, before) == {"GetToken": 0, "Invalidate": 1}
    assert client.token(fresh_account).access_token != old.access_token


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_no_retry_when_the_cooldown_returns_the_same_token(
    broker_no_verify, fake_bace, fresh_account, library
):
    """A second bad token within the broker's invalidate cooldown: Invalidate answers COOLDOWN
    with that same token, which BACE would refuse again, so the 401 is returned."""
    client = BrokerClient(broker_no_verify.addr, timeout=TIMEOUT)
    revoke(fake_bace, client.token(fresh_account).access_token)
    assert do_get(library, client, fresh_account, fake_bace.api_url) == (200, 2, [401])
    second = client.token(fresh_account)
    revoke(fake_bace, second.access_token)
    before = broker_no_verify.counts()

    assert do_get(library, client, fresh_account, fake_bace.api_url) == (401, 1, [])

    assert delta(broker_no_verify, before) == {"GetToken": 0, "Invalidate": 1}
    outcome, token = client.invalidate(fresh_account, second)
    assert (outcome, token.access_token) == (InvalidateOutcome.COOLDOWN, second.access_token)


@pytest.mark.parametrize("library", ["requests", "httpx"])
def test_a_401_after_a_redirect_to_another_origin_keeps_the_token(
    broker, fake_bace, redirects, fresh_account, library
):
    """Both libraries drop `Authorization` on a redirect to another origin: that host's 401 is
    not BACE refusing the token, so it is returned without an Invalidate. A redirect on the
    same origin keeps the token, and a 401 there is reported (TOKEN_VALID: no retry)."""
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    token = client.token(fresh_account)
    before = broker.counts()

    def follow(path: str) -> tuple[int, list[int]]:
        if library == "requests":
            r: Any = requests_session(client, fresh_account)[0].get(
                redirects.base_url + path, timeout=30
            )
        else:
            with httpx_client(client, fresh_account)[0] as http:
                r = http.get(redirects.base_url + path, follow_redirects=True)
        return r.status_code, [h.status_code for h in r.history]

    assert follow("/away") == (401, [302])
    assert redirects.authorizations == [("/away", token.authorization)]
    assert delta(broker, before) == {"GetToken": 0, "Invalidate": 0}
    assert client.token(fresh_account) is token

    assert follow("/here") == (401, [302])
    assert redirects.authorizations[-1] == ("/deny", token.authorization)
    assert delta(broker, before) == {"GetToken": 0, "Invalidate": 1}


def test_a_failed_invalidate_returns_the_401_with_a_warning(
    fake_bace, fresh_account, tmp_path, caplog
):
    """The broker gone when BACE answers 401: the Invalidate fails, a warning says so (without
    the token), and the request returns BACE's 401 instead of raising."""
    gone = BrokerProcess(testkit.broker_bin(), broker_config(fake_bace), tmp_path)
    client = BrokerClient(gone.addr, timeout=TIMEOUT)
    token = client.token(fresh_account)
    gone.stop_cleanly()
    revoke(fake_bace, token.access_token)
    for library in ("requests", "httpx"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bace_token_broker"):
            result = do_get(library, client, fresh_account, fake_bace.api_url)
        assert result == (401, 1, []), library
        warnings = [r for r in caplog.records if r.name == "bace_token_broker"]
        assert len(warnings) == 1, (library, caplog.text)
        assert warnings[0].levelno == logging.WARNING
        assert "UNAVAILABLE" in warnings[0].getMessage() and fresh_account in caplog.text
        assert token.access_token not in caplog.text


# === broker failures ===


@pytest.mark.parametrize("library", ["client", "requests", "httpx"])
def test_broker_unreachable_is_the_typed_error(fake_bace, library):
    client = BrokerClient(f"127.0.0.1:{testkit.free_port()}", timeout=5.0)
    with pytest.raises(BrokerUnavailable) as e:
        if library == "client":
            client.token("fleet-a")
        else:
            do_get(library, client, "fleet-a", fake_bace.api_url)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.retryable
    assert isinstance(e.value, BrokerError)


def test_status_codes_map_to_typed_errors(broker):
    client = BrokerClient(broker.addr, timeout=TIMEOUT)
    with pytest.raises(UnknownAccount) as e:
        client.token("no-such-account")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and not e.value.retryable
    with pytest.raises(InvalidRequest):
        client.token("")
    with pytest.raises(InvalidRequest):
        client.token("not valid!")
    with pytest.raises(CredentialsRejected):
        client.token(REJECTED)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="together"):
        BrokerClient("localhost:1", cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="plaintext"):
        BrokerClient("http://localhost:1", ca_file=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="non-empty"):
        BrokerClient("")
    with pytest.raises(ValueError, match="timeout"):
        BrokerClient("localhost:1", timeout=0)
    with pytest.raises(ValueError, match="margin"):
        BrokerClient("localhost:1", margin=-1)
    with pytest.raises(FileNotFoundError):
        BrokerClient("localhost:1", ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="token file"):
        BrokerClient("localhost:1", token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        BrokerClient("localhost:1", token_file=tmp_path / "empty")
    with pytest.raises(TypeError):
        RequestsAuth(object(), "fleet-a")  # type: ignore[arg-type]


# === TLS and the service-account token file ===


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = testkit.CertificateAuthority("client test CA")
    files = {"ca": d / "ca.crt"}
    files["ca"].write_bytes(ca.cert_pem)
    for name, cert in {
        "server": ca.issue("broker", dns=["localhost"], ips=["127.0.0.1"], server=True),
        "worker": ca.issue("worker", uris=["spiffe://cluster.local/ns/a/sa/worker"], client=True),
    }.items():
        files[f"{name}.crt"], files[f"{name}.key"] = d / f"{name}.crt", d / f"{name}.key"
        cert.write(files[f"{name}.crt"], files[f"{name}.key"])
    return files


@pytest.fixture(scope="module")
def tls_broker(fake_bace, pki, tmp_path_factory):
    """mTLS: client certificates from the CA, the worker allowed every account."""
    config = broker_config(
        fake_bace,
        health_listen=f"127.0.0.1:{testkit.free_port()}",
        tls={
            "cert_file": str(pki["server.crt"]),
            "key_file": str(pki["server.key"]),
            "client_ca_file": str(pki["ca"]),
        },
        auth={"allow": [{"caller": "spiffe://cluster.local/ns/a/sa/worker", "accounts": ["*"]}]},
    )
    proc = BrokerProcess(testkit.broker_bin(), config, tmp_path_factory.mktemp("tls-broker"))
    yield proc
    proc.stop_cleanly()


def test_mtls(tls_broker, pki, fake_bace, fresh_account):
    client = BrokerClient(
        tls_broker.addr,
        timeout=TIMEOUT,
        ca_file=pki["ca"],
        cert_file=pki["worker.crt"],
        key_file=pki["worker.key"],
    )
    token = client.token(fresh_account)
    assert fake_bace.token_info(token.access_token)["username"].startswith(f"ops@{fresh_account}")
    https = BrokerClient(
        f"https://{tls_broker.addr}",
        ca_file=pki["ca"],
        cert_file=pki["worker.crt"],
        key_file=pki["worker.key"],
    )
    assert https.token(fresh_account).access_token == token.access_token
    # Without a client certificate the handshake fails; in plaintext the port refuses.
    with pytest.raises(BrokerUnavailable):
        BrokerClient(tls_broker.addr, timeout=TIMEOUT, ca_file=pki["ca"]).token(fresh_account)
    with pytest.raises(BrokerUnavailable):
        BrokerClient(tls_broker.addr, timeout=TIMEOUT).token(fresh_account)


@pytest.fixture(scope="module")
def signing_key():
    from test_secure_client import KID, SigningKey

    return SigningKey(KID)


@pytest.fixture(scope="module")
def sa_broker(fake_bace, signing_key, tmp_path_factory):
    """Plaintext; service-account tokens checked against a JWKS file; reports:exporter may use
    every account."""
    from test_secure_client import AUDIENCE, ISSUER

    workdir = tmp_path_factory.mktemp("sa-broker")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [signing_key.jwk()]}))
    config = broker_config(
        fake_bace,
        auth={
            "kubernetes": {"issuer": ISSUER, "jwks_file": str(jwks), "audience": AUDIENCE},
            "allow": [{"caller": "system:serviceaccount:reports:exporter", "accounts": ["*"]}],
        },
    )
    proc = BrokerProcess(testkit.broker_bin(), config, workdir)
    yield proc
    proc.stop_cleanly()


def write_atomically(path: Path, text: str) -> None:
    """As the kubelet does: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_token_file_is_sent_and_followed_when_rotated(
    sa_broker, signing_key, tmp_path, fresh_account
):
    from test_secure_client import EXPORTER, STRANGER, sa_claims

    token_file = tmp_path / "token"
    stranger = signing_key.sign(sa_claims(*STRANGER))
    token_file.write_text(stranger + "\n")
    client = BrokerClient(
        sa_broker.addr, timeout=TIMEOUT, token_file=token_file, token_file_check_interval=0
    )
    with pytest.raises(PermissionDenied) as denied:
        client.token(fresh_account)
    exporter = signing_key.sign(sa_claims(*EXPORTER))
    write_atomically(token_file, exporter)
    token = client.token(fresh_account)
    assert token.account == fresh_account
    # An expired service-account token: Unauthenticated, naming the reason.
    write_atomically(token_file, signing_key.sign(sa_claims(*EXPORTER, exp_in=-600)))
    with pytest.raises(Unauthenticated) as expired:
        client.invalidate(fresh_account, token)
    assert "expired" in str(expired.value)
    # No secret in what the errors and the client show.
    for err in (denied.value, expired.value):
        shown = repr(err) + str(err) + "".join(traceback.format_exception(err)) + repr(client)
        for secret in (stranger, exporter, token.access_token):
            assert secret not in shown
    assert no_token_without_file(sa_broker, fresh_account)


def no_token_without_file(broker: BrokerProcess, account: str) -> bool:
    with pytest.raises(Unauthenticated):
        BrokerClient(broker.addr, timeout=TIMEOUT).token(account)
    return True


def test_token_file_is_checked_at_most_every_interval(tmp_path):
    path = tmp_path / "token"
    path.write_text("first")
    now = [100.0]
    sa = ServiceAccountToken(path, check_interval=5.0, monotonic=lambda: now[0])
    assert sa.metadata() == (("authorization", "Bearer first"),)
    write_atomically(path, "second")
    now[0] = 104.0
    assert sa.metadata() == (("authorization", "Bearer first"),), "not checked yet"
    now[0] = 105.0
    assert sa.metadata() == (("authorization", "Bearer second"),)
    # A file that turns empty or unreadable keeps the last good token.
    write_atomically(path, "")
    now[0] = 111.0
    assert sa.metadata() == (("authorization", "Bearer second"),)
    path.unlink()
    now[0] = 117.0
    assert sa.metadata() == (("authorization", "Bearer second"),)
    assert "second" not in repr(sa)


# === watch ===


def test_watch_follows_a_rotation_and_survives_a_broker_restart(fake_bace, fresh_account, tmp_path):
    config = broker_config(fake_bace)
    first = BrokerProcess(testkit.broker_bin(), config, tmp_path)
    client = BrokerClient(
        first.addr, timeout=TIMEOUT, channel_options=testkit.FAST_RECONNECT, margin=0
    )
    second = None
    try:
        with client.watch(fresh_account, backoff_initial=0.05, backoff_max=0.2) as watch:
            t1 = watch.wait(timeout=30)
            assert t1.account == fresh_account
            assert client.token(fresh_account).access_token == t1.access_token

            # A rotation: the token is revoked and reported, the broker logs in again.
            revoke(fake_bace, t1.access_token)
            outcome, t2 = BrokerClient(first.addr, timeout=TIMEOUT).invalidate(fresh_account, t1)
            assert outcome is InvalidateOutcome.INVALIDATED
            assert watch.wait_for(lambda t: t.access_token == t2.access_token, 30) is not None
            assert client.cached(fresh_account).access_token == t2.access_token, "cache follows"
            assert watch.reconnects == 0

            # A restart on the same address: the new broker logs in afresh; the watch reconnects.
            first.stop_cleanly()
            (tmp_path / "again").mkdir()
            second = BrokerProcess(testkit.broker_bin(), config, tmp_path / "again")
            t3 = BrokerClient(second.addr, timeout=TIMEOUT).token(fresh_account)
            assert t3.access_token not in (t1.access_token, t2.access_token)
            got = watch.wait_for(lambda t: t.access_token == t3.access_token, 60)
            assert watch.reconnects >= 1
            assert "redacted" in repr(watch) and got.access_token not in repr(watch)
        with pytest.raises(RuntimeError, match="closed"):
            watch.wait(timeout=1)
    finally:
        client.close()
        if second is not None:
            second.stop_cleanly()
        elif first.proc.poll() is None:
            first.stop_cleanly()


def test_watch_of_an_unknown_account_stops_with_the_typed_error(broker):
    with BrokerClient(broker.addr, timeout=TIMEOUT) as client:
        with client.watch("no-such-account") as watch:
            with pytest.raises(UnknownAccount):
                watch.wait(timeout=30)


# === the example program ===

EXAMPLE = Path(__file__).resolve().parents[2] / "clients/python/examples/physical_devices.py"


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_PROXY": "*"},
    )


@pytest.mark.parametrize("library", ["requests", "httpx", "httpx-async"])
def test_the_example_program(broker, fake_bace, fresh_account, library):
    common = ["--broker", broker.addr, "--account", fresh_account, "--library", library]
    ok = run_example(*common, "--url", fake_bace.api_url)
    assert (ok.returncode, ok.stdout) == (0, "HTTP 200: 0 device(s)\n"), ok.stderr


def test_the_example_program_fails_clearly(broker, fake_bace, fresh_account):
    common = ["--account", fresh_account, "--url", restricted_url(fake_bace)]
    denied = run_example("--broker", broker.addr, *common)
    assert (denied.returncode, denied.stdout) == (1, "HTTP 401\n"), denied.stderr
    down = run_example("--broker", f"127.0.0.1:{testkit.free_port()}", *common)
    assert down.returncode == 2 and down.stderr.startswith("broker: UNAVAILABLE"), down.stderr
