"""`AsyncBrokerClient`: the asyncio client, on grpc.aio."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Hashable, TypeVar

import grpc
import grpc.aio

from . import _core, errors
from ._base import ClientBase, WatchBase, typed_errors
from ._core import InvalidateResult, Seconds
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


class AsyncBrokerClient(ClientBase["AsyncTokenWatch"]):
    """An asyncio client of the BACE token broker, with the options and cache of
    `BrokerClient`; its methods are coroutines.

    Concurrent `token(account)` calls (tasks) share one GetToken call, which runs as its own
    task: a caller that is cancelled does not cancel it for the others, and its error reaches
    every waiter. The gRPC channel is created on first use, in the running event loop, and the
    client must then be used from that loop only. `await client.close()` (or `async with`)
    closes it.

    Args: as `BrokerClient` (`interceptors` are `grpc.aio` client interceptors).
    """

    def _open(self) -> None:
        # The channel waits for a running loop (`_get_stub`).
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TokenBrokerServiceStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flights = _Flights()

    def _new_watch(self, account: str, backoff: tuple[float, float]) -> AsyncTokenWatch:
        return AsyncTokenWatch(self, account, *backoff)

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
        mv = self._wanted_validity(min_validity)
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
        margin = self._cache.margin
        try:
            request = _core.get_token_request(account, margin, min_validity)
            token = (await self._call("GetToken", request)).token
        except Exception as error:
            if not _core.margin_out_of_range(error, margin):
                raise
            request = _core.get_token_request(account, 0, min_validity)
            return (await self._call("GetToken", request)).token
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
        return self._invalidated(account, answer)

    async def _call(self, method: str, request: Any) -> Any:
        stub = self._get_stub()
        metadata = self._metadata()
        with typed_errors():
            return await getattr(stub, method)(request, timeout=self._timeout, metadata=metadata)

    async def close(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncTokenWatch(WatchBase):
    """An account's token kept up to date by the broker's WatchToken stream, in a task (see
    `AsyncBrokerClient.watch`); the asyncio twin of `TokenWatch`, with the same reconnection
    and stopping rules."""

    def __init__(
        self, client: AsyncBrokerClient, account: str, backoff_initial: float, backoff_max: float
    ):
        super().__init__(client, account, (backoff_initial, backoff_max))
        self._client: AsyncBrokerClient = client
        self._changed = asyncio.Condition()
        self._closed = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def wait(self) -> pb.Token:
        """The current token, waiting for the first one if none came yet (bound it with
        `asyncio.timeout`)."""
        return await self.wait_for(lambda _: True)

    async def wait_for(self, predicate: Callable[[pb.Token], bool]) -> pb.Token:
        """Waits until the current token satisfies `predicate` and returns it. Raises the
        watch's `BrokerError` if it stopped on one, `RuntimeError` if it was closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._settled(predicate))
            token = self._answer(predicate)
            assert token is not None
            return token

    async def _run(self) -> None:
        initial, maximum = self._backoff
        backoff = initial
        first = True
        while not self._closed.is_set():
            if not first:
                self.reconnects += 1
            first = False
            try:
                call = self._client._get_stub().WatchToken(
                    pb.WatchTokenRequest(account=self.account),
                    metadata=self._client._metadata(),
                    wait_for_ready=True,
                )
                async for message in call:
                    backoff = initial
                    await self._publish(token=message.token)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - never let the task die silently
                error = self._stopping_error(e)
                if error is not None:
                    await self._stop(error)
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
