"""What the client-library tests (test_client_*.py) share: the fake BACE and a broker wired to
it with metrics on, the count of each RPC the broker handled (from its /metrics), revoking a
token at the fake, an account no other test has used, and httpx clients that count what they
send.

Fixtures are defined here and imported by the test modules (module scope: each module gets
its own fake BACE and broker)."""

from __future__ import annotations

import itertools
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote
from urllib.request import ProxyHandler, Request, build_opener

import httpx
import pytest
import testkit

from bace_token_broker import HttpxAuth

READY_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0
FAKE_LOGIN_LIFETIME_S = 3600

# Accounts the fake knows and the broker serves. Each test that changes an account's token
# (revoke, invalidate) takes its own (`fresh_account`), so the broker's invalidate cooldown of
# one test never meets another's.
ACCOUNTS = [f"acct-{i:02d}" for i in range(60)]
# An account the broker is configured with a wrong password for: BACE rejects its login.
REJECTED = "rejected"

_NO_PROXY = build_opener(ProxyHandler({}))


def credentials(name: str) -> dict[str, str]:
    return {
        "client_id": f"{name}-client",
        "client_secret": f"{name}-client-secret",
        "username": f"ops@{name}.example.com",
        "password": f"{name}-password",
    }


class BrokerProcess(testkit.BrokerProcess):
    """`bace-token-broker serve --config FILE`, ready, with its metrics listener."""

    def __init__(self, binary: Path, config: dict[str, Any], workdir: Path):
        super().__init__(testkit.built(binary), config, workdir)
        self.metrics_addr: str = config.get("metrics_listen") or ""
        self.wait_ready(config.get("health_listen") or self.addr, READY_TIMEOUT_S)

    def handled(self, method: str) -> int:
        """RPCs of `method` the broker completed, whatever their code
        (`grpc_server_handled_total`)."""
        with _NO_PROXY.open(f"http://{self.metrics_addr}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        pattern = re.compile(r"^grpc_server_handled_total\{([^}]*)\} (\S+)$", re.M)
        for labels, value in pattern.findall(text):
            if f'grpc_method="{method}"' in labels:
                total += float(value)
        return int(total)

    def counts(self) -> dict[str, int]:
        return {m: self.handled(m) for m in ("GetToken", "Invalidate")}

    def stop_cleanly(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        super().stop_cleanly(timeout)


def delta(broker: BrokerProcess, before: dict[str, int]) -> dict[str, int]:
    """The RPCs the broker handled since its `counts()` were `before`."""
    after = broker.counts()
    return {k: after[k] - before[k] for k in before}


def restricted_url(fake: testkit.FakeBaceProcess) -> str:
    """A fake BACE endpoint that answers 401 to every token (a missing permission)."""
    return fake.base_url + "/api/v2/restricted"


def revoke(fake: testkit.FakeBaceProcess, access_token: str) -> None:
    """Makes the fake BACE refuse a token it issued (`POST /_fake/revoke/{token}`)."""
    url = fake.base_url + "/_fake/revoke/" + quote(access_token, safe="")
    with _NO_PROXY.open(Request(url, method="POST"), timeout=10) as resp:
        assert resp.status == 204


def broker_config(fake: testkit.FakeBaceProcess, **extra: Any) -> dict[str, Any]:
    accounts = {name: dict(credentials(name), token_url=fake.token_url) for name in ACCOUNTS}
    accounts[REJECTED] = dict(
        credentials(REJECTED), password="not-the-password", token_url=fake.token_url
    )
    config = {
        "listen": f"127.0.0.1:{testkit.free_port()}",
        "metrics_listen": f"127.0.0.1:{testkit.free_port()}",
        "shutdown_grace": "2s",
        "upstream": {"verify_url": fake.api_url},
        "accounts": accounts,
    }
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def fake_bace(tmp_path_factory) -> Iterator[testkit.FakeBaceProcess]:
    """The Rust fake BACE with every account of ACCOUNTS and REJECTED."""
    accounts = [
        dict(credentials(name), login_lifetime_secs=FAKE_LOGIN_LIFETIME_S)
        for name in ACCOUNTS + [REJECTED]
    ]
    yield from testkit.running_fake_bace(accounts, tmp_path_factory.mktemp("fake-bace"))


@pytest.fixture(scope="module")
def broker(fake_bace, tmp_path_factory) -> Iterator[BrokerProcess]:
    """A plaintext broker for the fake's accounts, with metrics and `upstream.verify_url` (the
    fake's physical-device endpoint)."""
    proc = BrokerProcess(
        testkit.broker_bin(), broker_config(fake_bace), tmp_path_factory.mktemp("broker")
    )
    yield proc
    proc.stop_cleanly()


_unused = itertools.count()


@pytest.fixture
def fresh_account() -> str:
    """An account of ACCOUNTS no earlier test of this session has used."""
    n = next(_unused)
    if n >= len(ACCOUNTS):
        pytest.fail("client tests need more accounts: raise the size of ACCOUNTS")
    return ACCOUNTS[n]


class ManualClock:
    """Wall-clock time the test moves by hand (the clients' `clock`)."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class RedirectServer:
    """A loopback HTTP server that redirects: `GET /away` answers 302 to `away_url` (another
    origin), `GET /here` 302 to its own `/deny`, which answers 401. `authorizations` holds the
    `Authorization` header (or None) of every request it received, by path."""

    def __init__(self, away_url: str):
        self.authorizations: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.authorizations.append((self.path, self.headers.get("Authorization")))
                if self.path == "/away":
                    self._answer(302, {"Location": away_url})
                elif self.path == "/here":
                    self._answer(302, {"Location": "/deny"})
                else:
                    self._answer(401, {})

            def _answer(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def redirects(fake_bace) -> Iterator[RedirectServer]:
    """A RedirectServer whose `/away` leads to the fake BACE's physical-device endpoint."""
    server = RedirectServer(fake_bace.api_url)
    yield server
    server.close()


class Sent:
    """An httpx request hook that counts the requests sent (from any thread)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> None:
        with self._lock:
            self.count += 1


class AsyncSent(Sent):
    """`Sent` for httpx.AsyncClient, whose hooks are coroutines."""

    async def __call__(self, request: httpx.Request) -> None:  # type: ignore[override]
        super().__call__(request)


def httpx_client(client: Any, account: str) -> tuple[httpx.Client, Sent]:
    """An httpx.Client authorised for `account` by `client`, and the count of the requests it
    sends."""
    return _counting_httpx(httpx.Client, client, account, max_connections=100)


def async_httpx_client(client: Any, account: str) -> tuple[httpx.AsyncClient, Sent]:
    """The httpx.AsyncClient of `httpx_client`."""
    # httpx's async pool slows down with many connections and waiters (1,000 requests take
    # ~30 s through 100 connections on a loaded 2-core machine, ~9 s through 10).
    return _counting_httpx(httpx.AsyncClient, client, account, max_connections=10)


def _counting_httpx(
    client_type: Any,
    client: Any,
    account: str,
    *,
    max_connections: int,
) -> tuple[Any, Sent]:
    """`client_type` (`httpx.Client` or `httpx.AsyncClient`) authorised by `HttpxAuth`, and
    the count of the requests it sends (retries included)."""
    sent = AsyncSent() if client_type is httpx.AsyncClient else Sent()
    http = client_type(
        auth=HttpxAuth(client, account),
        event_hooks={"request": [sent]},
        limits=httpx.Limits(max_connections=max_connections),
        timeout=httpx.Timeout(60.0, pool=None),
        trust_env=False,
    )
    return http, sent
