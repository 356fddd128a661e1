"""The Python client library (clients/python, `bace_token_broker`), asyncio side:
AsyncBrokerClient and HttpxAuth with httpx.AsyncClient, against the real broker binary and the
Rust fake BACE on loopback.

RPCs are counted from the broker's /metrics (`grpc_server_handled_total`). Concurrency is 1,000
asyncio tasks; ordering comes from gates (asyncio events inside a grpc.aio interceptor) and the
client's flight bookkeeping, never from sleeps."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import grpc.aio
import httpx
import pytest
import testkit
from client_harness import (  # noqa: F401  (fixtures)
    FAKE_LOGIN_LIFETIME_S,
    REJECTED,
    BrokerProcess,
    ManualClock,
    async_httpx_client,
    broker,
    broker_config,
    delta,
    fake_bace,
    fresh_account,
    redirects,
    restricted_url,
    revoke,
)

from bace_token_broker import (
    AsyncBrokerClient,
    BrokerClient,
    BrokerUnavailable,
    CredentialsRejected,
    HttpxAuth,
    InvalidateOutcome,
    InvalidRequest,
    UnknownAccount,
)
from bace_token_broker._core import expires_at

TASKS = 1000
TIMEOUT = 10.0


async def counts(broker) -> dict[str, int]:
    """The broker's RPC counts, read off the event loop (a blocking HTTP GET)."""
    return await asyncio.to_thread(broker.counts)


async def get(http: httpx.AsyncClient, url: str):
    r = await http.get(url)
    return r.status_code, [h.status_code for h in r.history]


class Gate(grpc.aio.UnaryUnaryClientInterceptor):
    """Holds every GetToken call until `open` is set; `entered` is set when one arrives."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.entered = asyncio.Event()

    async def intercept_unary_unary(self, continuation, details, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/GetToken"):
            self.entered.set()
            await self.open.wait()
        return await continuation(details, request)


async def until_waiters(client: AsyncBrokerClient, key, n: int) -> None:
    """Lets the other tasks run until `n` of them wait on the call in flight for `key`."""
    for _ in range(100_000):
        if client._flights.waiters(key) >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"only {client._flights.waiters(key)} waiters")


# === the cache and one shared GetToken ===


@pytest.mark.asyncio
async def test_1000_tasks_make_one_get_token_then_none_until_the_margin(
    broker, fake_bace, fresh_account
):
    clock = ManualClock(time.time())
    client = AsyncBrokerClient(broker.addr, timeout=TIMEOUT, margin=60, clock=clock)
    http, sent = async_httpx_client(client, fresh_account)
    before = await counts(broker)
    async with http:
        results = await asyncio.gather(*(get(http, fake_bace.api_url) for _ in range(TASKS)))
        assert results == [(200, [])] * TASKS
        assert sent.count == TASKS
        assert delta(broker, before)["GetToken"] == 1

        token = client.cached(fresh_account)
        assert token is not None
        clock.now = expires_at(token) - 60 - 1
        assert await get(http, fake_bace.api_url) == (200, [])
        assert delta(broker, before)["GetToken"] == 1
        clock.now = expires_at(token) - 60 + 1
        assert await get(http, fake_bace.api_url) == (200, [])
        assert delta(broker, before) == {"GetToken": 2, "Invalidate": 0}
    await client.close()


@pytest.mark.asyncio
async def test_a_cancelled_first_caller_does_not_strand_the_others(broker, fresh_account):
    gate = Gate()
    client = AsyncBrokerClient(broker.addr, timeout=TIMEOUT, interceptors=[gate])
    before = await counts(broker)
    leader = asyncio.ensure_future(client.token(fresh_account))
    await gate.entered.wait()
    followers = [asyncio.ensure_future(client.token(fresh_account)) for _ in range(10)]
    await until_waiters(client, ("token", fresh_account, 0.0), 10)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    gate.open.set()
    tokens = await asyncio.gather(*followers)
    assert {t.access_token for t in tokens} == {tokens[0].access_token}
    assert tokens[0].account == fresh_account
    assert delta(broker, before)["GetToken"] == 1
    await client.close()


@pytest.mark.asyncio
async def test_a_failure_reaches_every_waiter(broker):
    gate = Gate()
    client = AsyncBrokerClient(broker.addr, timeout=TIMEOUT, interceptors=[gate])
    before = await counts(broker)
    tasks = [asyncio.ensure_future(client.token(REJECTED)) for _ in range(20)]
    await gate.entered.wait()
    await until_waiters(client, ("token", REJECTED, 0.0), 19)
    gate.open.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, CredentialsRejected) for r in results), results
    assert delta(broker, before)["GetToken"] == 1
    await client.close()


@pytest.mark.asyncio
async def test_the_broker_is_asked_for_the_margin_plus_min_validity(broker, fresh_account):
    """As in the sync tests: GetToken asks for `margin + min_validity`, so a margin longer than
    the fake's login tokens last gets the refreshed token, which the cache keeps."""
    margin = FAKE_LOGIN_LIFETIME_S + 600
    async with AsyncBrokerClient(broker.addr, timeout=TIMEOUT, margin=margin) as client:
        before = await counts(broker)
        token = await client.token(fresh_account, min_validity=60)
        assert expires_at(token) - time.time() > margin + 60
        assert await client.token(fresh_account, min_validity=60) is token
        assert delta(broker, before)["GetToken"] == 1
    # A bar past what the broker can promise (14 d): OUT_OF_RANGE, then `min_validity` alone,
    # whose answer serves the call and is not cached.
    async with AsyncBrokerClient(broker.addr, timeout=TIMEOUT, margin=14 * 24 * 3600) as far:
        before = await counts(broker)
        assert (await far.token(fresh_account)).access_token
        assert far.cached(fresh_account) is None
        assert delta(broker, before)["GetToken"] == 2
        with pytest.raises(InvalidRequest) as e:
            await far.token(fresh_account, min_validity=30 * 24 * 3600)
        assert e.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert delta(broker, before)["GetToken"] == 4


@pytest.mark.asyncio
async def test_invalidate_returns_outcome_and_token(broker, fake_bace, fresh_account):
    async with AsyncBrokerClient(broker.addr, timeout=TIMEOUT) as client:
        old = await client.token(fresh_account)
        await asyncio.to_thread(revoke, fake_bace, old.access_token)
        outcome, new = await client.invalidate(fresh_account, old.access_token)
        assert outcome is InvalidateOutcome.INVALIDATED
        assert new.access_token != old.access_token
        assert await client.token(fresh_account) is new
        again = await client.invalidate(fresh_account, old)
        assert again.outcome is InvalidateOutcome.ALREADY_REPLACED
        assert again.token.access_token == new.access_token
        with pytest.raises(UnknownAccount):
            await client.token("no-such-account")


# === the 401 dance ===


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["async", "sync-client"])
async def test_revoked_token_one_invalidate_one_retry_success(
    broker, fake_bace, fresh_account, kind
):
    """With an AsyncBrokerClient, and with a (blocking) BrokerClient in httpx.AsyncClient."""
    if kind == "async":
        client = AsyncBrokerClient(broker.addr, timeout=TIMEOUT)
        old = await client.token(fresh_account)
    else:
        client = BrokerClient(broker.addr, timeout=TIMEOUT)
        old = client.token(fresh_account)
    await asyncio.to_thread(revoke, fake_bace, old.access_token)
    before, logins = await counts(broker), fake_bace.calls
    http, sent = async_httpx_client(client, fresh_account)
    async with http:
        assert await get(http, fake_bace.api_url) == (200, [401])
    assert sent.count == 2
    assert delta(broker, before) == {"GetToken": 0, "Invalidate": 1}
    assert fake_bace.calls == logins + 1
    if isinstance(client, AsyncBrokerClient):
        await client.close()


@pytest.mark.asyncio
async def test_permission_401_is_returned_without_retry(broker, fake_bace, fresh_account):
    client = AsyncBrokerClient(broker.addr, timeout=TIMEOUT)
    token = await client.token(fresh_account)
    before, logins = await counts(broker), fake_bace.calls
    http, sent = async_httpx_client(client, fresh_account)
    async with http:
        assert await get(http, restricted_url(fake_bace)) == (401, [])
    assert sent.count == 1
    assert delta(broker, before) == {"GetToken": 0, "Invalidate": 1}
    assert fake_bace.calls == logins
    assert (await client.token(fresh_account)).access_token == token.access_token
    await client.close()


@pytest.mark.asyncio
async def test_a_streamed_body_is_not_replayed(broker, fake_bace, fresh_account):
    client = AsyncBrokerClient(broker.addr, timeout=TIMEOUT)
    old = await client.token(fresh_account)
    await asyncio.to_thread(revoke, fake_bace, old.access_token)
    before = await counts(broker)

    async def body():
        yield b'{"name": '
        yield b'"device"}'

    http, sent = async_httpx_client(client, fresh_account)
    async with http:
        r = await http.post(fake_bace.api_url, content=body())
        assert (r.status_code, sent.count) == (401, 1)
        assert delta(broker, before) == {"GetToken": 0, "Invalidate": 1}
        # In-memory content is replayed; the cache already holds the replacement, so no 401.
        r = await http.post(fake_bace.api_url, json={"name": "device"})
        assert (r.status_code, sent.count) == (200, 2)
    await client.close()


@pytest.mark.asyncio
async def test_a_401_after_a_redirect_to_another_origin_keeps_the_token(
    broker, fake_bace, redirects, fresh_account
):
    """httpx drops `Authorization` on a redirect to another origin: that host's 401 comes back
    without an Invalidate; a 401 after a same-origin redirect is reported."""
    async with AsyncBrokerClient(broker.addr, timeout=TIMEOUT) as client:
        token = await client.token(fresh_account)
        before = await counts(broker)
        http, _ = async_httpx_client(client, fresh_account)
        async with http:
            r = await http.get(redirects.base_url + "/away", follow_redirects=True)
            assert (r.status_code, [h.status_code for h in r.history]) == (401, [302])
            assert redirects.authorizations == [("/away", token.authorization)]
            assert delta(broker, before) == {"GetToken": 0, "Invalidate": 0}
            assert await client.token(fresh_account) is token
            r = await http.get(redirects.base_url + "/here", follow_redirects=True)
            assert (r.status_code, [h.status_code for h in r.history]) == (401, [302])
            assert redirects.authorizations[-1] == ("/deny", token.authorization)
            assert delta(broker, before) == {"GetToken": 0, "Invalidate": 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["async", "sync-client"])
async def test_a_failed_invalidate_returns_the_401_with_a_warning(
    fake_bace, fresh_account, tmp_path, caplog, kind
):
    """The broker gone when BACE answers 401: a warning (without the token) and the 401."""
    gone = await asyncio.to_thread(
        BrokerProcess, testkit.broker_bin(), broker_config(fake_bace), tmp_path
    )
    if kind == "async":
        client = AsyncBrokerClient(gone.addr, timeout=TIMEOUT)
        token = await client.token(fresh_account)
    else:
        client = BrokerClient(gone.addr, timeout=TIMEOUT)
        token = client.token(fresh_account)
    await asyncio.to_thread(gone.stop_cleanly)
    await asyncio.to_thread(revoke, fake_bace, token.access_token)
    http, sent = async_httpx_client(client, fresh_account)
    with caplog.at_level(logging.WARNING, logger="bace_token_broker"):
        async with http:
            assert await get(http, fake_bace.api_url) == (401, [])
    assert sent.count == 1
    warnings = [r for r in caplog.records if r.name == "bace_token_broker"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, caplog.text
    assert "UNAVAILABLE" in warnings[0].getMessage()
    assert token.access_token not in caplog.text
    if isinstance(client, AsyncBrokerClient):
        await client.close()


@pytest.mark.asyncio
async def test_broker_unreachable_is_the_typed_error(fake_bace):
    client = AsyncBrokerClient(f"127.0.0.1:{testkit.free_port()}", timeout=5.0)
    with pytest.raises(BrokerUnavailable) as e:
        await client.token("fleet-a")
    assert e.value.retryable
    http, sent = async_httpx_client(client, "fleet-a")
    async with http:
        with pytest.raises(BrokerUnavailable):
            await http.get(fake_bace.api_url)
    assert sent.count == 0
    await client.close()


def test_async_client_in_a_sync_httpx_client_is_a_clear_error(fake_bace):
    with httpx.Client(
        auth=HttpxAuth(AsyncBrokerClient("127.0.0.1:1"), "a"), trust_env=False
    ) as http:
        with pytest.raises(TypeError, match="AsyncClient"):
            http.get(fake_bace.api_url)


# === watch ===


@pytest.mark.asyncio
async def test_watch_follows_a_rotation(broker, fake_bace, fresh_account):
    async with AsyncBrokerClient(broker.addr, timeout=TIMEOUT) as client:
        watch = client.watch(fresh_account)
        async with asyncio.timeout(30):
            t1 = await watch.wait()
        assert t1.account == fresh_account
        assert client.cached(fresh_account).access_token == t1.access_token
        await asyncio.to_thread(revoke, fake_bace, t1.access_token)
        async with AsyncBrokerClient(broker.addr) as other:
            outcome, t2 = await other.invalidate(fresh_account, t1)
        assert outcome is InvalidateOutcome.INVALIDATED
        async with asyncio.timeout(30):
            await watch.wait_for(lambda t: t.access_token == t2.access_token)
        assert (await client.token(fresh_account)).access_token == t2.access_token
        assert t2.access_token not in repr(watch)
        await watch.close()
        with pytest.raises(RuntimeError, match="closed"):
            await watch.wait()


@pytest.mark.asyncio
async def test_watch_of_an_unknown_account_stops_with_the_typed_error(broker):
    async with AsyncBrokerClient(broker.addr, timeout=TIMEOUT) as client:
        async with client.watch("no-such-account") as watch:
            with pytest.raises(UnknownAccount):
                async with asyncio.timeout(30):
                    await watch.wait()
