"""`AsyncBrokerClient`: the asyncio client, on grpc.aio."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable, Hashable, Sequence, TypeVar

import grpc
import grpc.aio

from . import _core, errors
from ._core import InvalidateOutcome, InvalidateResult, Seconds
from ._pb import token_broker_pb2 as pb
from ._pb import token_broker_pb2_grpc as pb_grpc

T = TypeVar("T")


class _Flights:
    """One call in flight per key. The call runs as its own task and every caller (the first
    included) awaits it through `asyncio.shield`: a caller that is cancelled leaves it running
    for the others, and its result or exception reaches every waiter."""

    def __init__(self) -> None:
        self._tasks: dict[Hashable, tuple[asyncio.Task[Any], list[int]]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        flight = self._tasks.get(key)
        if flight is None:
            task = asyncio.ensure_future(call())
            flight = self._tasks[key] = (task, [0])

            def done(t: asyncio.Task[Any], flight: Any = flight) -> None:
                if self._tasks.get(key) is flight:
                    del self._tasks[key]
                if not t.cancelled():
                    t.exception()  # retrieved: no "never retrieved" warning if all gave up

            task.add_done_callback(done)
        else:
            flight[1][0] += 1
        return await asyncio.shield(flight[0])

    def waiters(self, key: Hashable) -> int:
        """Callers waiting on the call in flight for `key` besides the first (for tests); -1
        when none is in flight."""
        flight = self._tasks.get(key)
        return -1 if flight is None else flight[1][0]


class AsyncBrokerClient:
    """An asyncio client of the BACE token broker, with the options and cache of
    `BrokerClient`; its methods are coroutines.

    Concurrent `token(account)` calls (tasks) share one GetToken call, which runs as its own
    task: a caller that is cancelled does not cancel it for the others, and its error reaches
    every waiter. The gRPC channel is created on first use, in the running event loop, and the
    client must then be used from that loop only. `await client.close()` (or `async with`)
    closes it.

    Args: as `BrokerClient` (`interceptors` are `grpc.aio` client interceptors).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = _core.DEFAULT_TIMEOUT,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        token_file: str | os.PathLike[str] | None = None,
        margin: Seconds = _core.DEFAULT_MARGIN,
        min_validity: Seconds = 0.0,
        token_file_check_interval: Seconds = _core.DEFAULT_TOKEN_FILE_CHECK_INTERVAL,
        interceptors: Sequence[Any] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
        clock: Callable[[], float] = time.time,
    ):
        self._timeout = _core.seconds(timeout, "timeout", allow_zero=False)
        self._min_validity = _core.seconds(min_validity, "min_validity")
        self._target = _core.parse_target(
            target,
            ca_file=_fs(ca_file),
            cert_file=_fs(cert_file),
            key_file=_fs(key_file),
        )
        self._sa_token = (
            None
            if token_file is None
            else _core.ServiceAccountToken(
                token_file, _core.seconds(token_file_check_interval, "token_file_check_interval")
            )
        )
        self._cache = _core.TokenCache(_core.seconds(margin, "margin"), clock)
        # Read now, so bad files fail the constructor; the channel waits for a running loop.
        self._credentials = (
            _core.channel_credentials(ca_file, cert_file, key_file) if self._target.tls else None
        )
        self._interceptors = list(interceptors)
        self._options = list(channel_options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TokenBrokerServiceStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flights = _Flights()

    def _get_stub(self) -> pb_grpc.TokenBrokerServiceStub:
        loop = asyncio.get_running_loop()
        if self._stub is None:
            kwargs: dict[str, Any] = {"options": self._options}
            if self._interceptors:
                kwargs["interceptors"] = self._interceptors
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(
                    self._target.address, self._credentials, **kwargs
                )
            else:
                self._channel = grpc.aio.insecure_channel(self._target.address, **kwargs)
            self._stub = pb_grpc.TokenBrokerServiceStub(self._channel)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "this AsyncBrokerClient is bound to the event loop it was first used in; "
                "create one client per event loop"
            )
        return self._stub

    async def token(self, account: str, *, min_validity: Seconds | None = None) -> pb.Token:
        """A token for `account` with more than the margin plus `min_validity` left: from the
        cache, else from one GetToken call shared by concurrent tasks.

        Raises a `BrokerError` subclass (`UnknownAccount`, `BrokerUnavailable`, ...)."""
        mv = (
            self._min_validity
            if min_validity is None
            else _core.seconds(min_validity, "min_validity")
        )
        hit = self._cache.fresh(account, mv)
        if hit is not None:
            return hit
        return await self._flights.run(("token", account, mv), lambda: self._fetch(account, mv))

    async def _fetch(self, account: str, min_validity: float) -> pb.Token:
        # A flight that started just after another filled the cache needs no call.
        hit = self._cache.fresh(account, min_validity)
        if hit is not None:
            return hit
        generation = self._cache.generation(account)
        request = _core.get_token_request(account, self._cache.margin, min_validity)
        token = (await self._call("GetToken", request)).token
        self._cache.store(account, token, generation)
        return token

    async def invalidate(self, account: str, access_token: str | pb.Token) -> InvalidateResult:
        """Reports a token BACE refused (401) and returns `(outcome, token)`; see
        `BrokerClient.invalidate`. Concurrent reports of the same token share one call."""
        used = _core.access_token_of(access_token)
        return await self._flights.run(
            ("invalidate", account, used), lambda: self._invalidate(account, used)
        )

    async def _invalidate(self, account: str, used: str) -> InvalidateResult:
        answer = await self._call(
            "Invalidate", pb.InvalidateRequest(account=account, access_token=used)
        )
        self._cache.replace(account, answer.token)
        return InvalidateResult(InvalidateOutcome.from_wire(answer.outcome), answer.token)

    def watch(
        self,
        account: str,
        *,
        backoff_initial: Seconds = _core.DEFAULT_WATCH_BACKOFF_INITIAL,
        backoff_max: Seconds = _core.DEFAULT_WATCH_BACKOFF_MAX,
    ) -> AsyncTokenWatch:
        """An `AsyncTokenWatch`: the account's token kept current by a WatchToken stream in a
        task of the running loop, reconnecting with backoff when the stream breaks. Every token
        it receives also goes into this client's cache. `await watch.close()` when done."""
        return AsyncTokenWatch(
            self,
            account,
            _core.seconds(backoff_initial, "backoff_initial", allow_zero=False),
            _core.seconds(backoff_max, "backoff_max", allow_zero=False),
        )

    def cached(self, account: str, *, min_validity: Seconds | None = None) -> pb.Token | None:
        """The cached token if it is fresh enough, without any call."""
        mv = (
            self._min_validity
            if min_validity is None
            else _core.seconds(min_validity, "min_validity")
        )
        return self._cache.fresh(account, mv)

    async def _call(self, method: str, request: Any) -> Any:
        stub = self._get_stub()
        metadata = self._sa_token.metadata() if self._sa_token is not None else None
        try:
            return await getattr(stub, method)(request, timeout=self._timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from e

    async def close(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (
            f"AsyncBrokerClient(target={self._target.address!r}, tls={self._target.tls}, "
            f"token_file={self._sa_token.path if self._sa_token else None!r})"
        )


def _fs(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)


class AsyncTokenWatch:
    """An account's token kept up to date by the broker's WatchToken stream, in a task (see
    `AsyncBrokerClient.watch`); the asyncio twin of `TokenWatch`, with the same reconnection
    and stopping rules."""

    def __init__(
        self, client: AsyncBrokerClient, account: str, backoff_initial: float, backoff_max: float
    ):
        self.account = account
        self._client = client
        self._backoff = (backoff_initial, backoff_max)
        self._token: pb.Token | None = None
        self._error: errors.BrokerError | None = None
        self._changed = asyncio.Condition()
        self._closed = asyncio.Event()
        self.reconnects = 0
        """How many times the stream was opened again after it broke."""
        self._task = asyncio.ensure_future(self._run())

    @property
    def token(self) -> pb.Token | None:
        """The latest token received (None before the first)."""
        return self._token

    async def wait(self) -> pb.Token:
        """The current token, waiting for the first one if none came yet (bound it with
        `asyncio.timeout`)."""
        return await self.wait_for(lambda _: True)

    async def wait_for(self, predicate: Callable[[pb.Token], bool]) -> pb.Token:
        """Waits until the current token satisfies `predicate` and returns it. Raises the
        watch's `BrokerError` if it stopped on one, `RuntimeError` if it was closed."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    self._error is not None
                    or self._closed.is_set()
                    or (self._token is not None and predicate(self._token))
                )
            )
            if self._closed.is_set():
                raise RuntimeError("the watch is closed")
            if self._token is not None and predicate(self._token):
                return self._token
            assert self._error is not None
            raise self._error

    async def _run(self) -> None:
        initial, maximum = self._backoff
        backoff = initial
        first = True
        while not self._closed.is_set():
            if not first:
                self.reconnects += 1
            first = False
            try:
                stub = self._client._get_stub()
                sa = self._client._sa_token
                call = stub.WatchToken(
                    pb.WatchTokenRequest(account=self.account),
                    metadata=sa.metadata() if sa is not None else None,
                    wait_for_ready=True,
                )
                async for message in call:
                    backoff = initial
                    await self._publish(token=message.token)
            except grpc.RpcError as e:
                error = errors.from_rpc_error(e)
                if error.code in _FINAL_WATCH_CODES:
                    await self._stop(error)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - never let the task die silently
                await self._stop(errors.BrokerError(grpc.StatusCode.UNKNOWN, type(e).__name__))
                return
            try:
                await asyncio.wait_for(self._closed.wait(), backoff)
                return
            except asyncio.TimeoutError:
                backoff = min(backoff * 2, maximum)

    async def _publish(self, token: pb.Token) -> None:
        self._client._cache.replace(self.account, token)
        async with self._changed:
            self._token = token
            self._changed.notify_all()

    async def _stop(self, error: errors.BrokerError) -> None:
        async with self._changed:
            self._error = error
            self._changed.notify_all()

    async def close(self) -> None:
        """Stops the watch and waits for its task."""
        self._closed.set()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        async with self._changed:
            self._changed.notify_all()

    async def __aenter__(self) -> AsyncTokenWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        token = None if self._token is None else _core.describe_token(self._token)
        return f"AsyncTokenWatch(account={self.account!r}, token={token})"


_FINAL_WATCH_CODES = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
