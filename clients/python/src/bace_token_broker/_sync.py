"""`BrokerClient`: the blocking client, on grpcio."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable, TypeVar

import grpc

from . import _core
from ._base import ClientBase, WatchBase, typed_errors
from ._core import InvalidateResult, Seconds
from ._pb import token_broker_pb2 as pb
from ._pb import token_broker_pb2_grpc as pb_grpc

T = TypeVar("T")


class _LeaderGone(Exception):
    """The thread running a shared call stopped without a result (KeyboardInterrupt, ...)."""


class _Flights:
    """One call in flight per key, shared by every thread that asks meanwhile: the first runs
    it, the others wait for its result or its exception."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._flights: dict[Hashable, tuple[Future[Any], list[int]]] = {}

    def run(self, key: Hashable, check: Callable[[], T | None], call: Callable[[], T]) -> T:
        """`check()` under the lock (an answer there ends it), else joins or leads the call."""
        while True:
            with self._cond:
                hit = check()
                if hit is not None:
                    return hit
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = (Future(), [0])
                else:
                    flight[1][0] += 1
                    self._cond.notify_all()
            future = flight[0]
            if not leader:
                try:
                    return future.result()
                except _LeaderGone:
                    continue  # the leader was interrupted: try again, maybe as the leader
            # The flight is forgotten before its outcome is set, so a waiter that comes back
            # after an interrupted leader finds no stale flight to join.
            try:
                result = call()
            except BaseException as e:
                self._forget(key, flight)
                future.set_exception(e if isinstance(e, Exception) else _LeaderGone())
                raise
            self._forget(key, flight)
            future.set_result(result)
            return result

    def _forget(self, key: Hashable, flight: tuple[Future[Any], list[int]]) -> None:
        with self._cond:
            if self._flights.get(key) is flight:
                del self._flights[key]

    def wait_for_waiters(self, key: Hashable, n: int, timeout: float) -> bool:
        """Blocks until the call in flight for `key` has `n` waiters besides its leader (for
        tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (f := self._flights.get(key)) is not None and f[1][0] >= n, timeout
            )


class BrokerClient(ClientBase["TokenWatch"]):
    """A blocking client of the BACE token broker, safe to share between threads.

    `token(account)` answers from a local cache while the cached token has more than `margin`
    (plus `min_validity`) left before it expires; otherwise one GetToken call is made, shared by
    every thread that asks for the account meanwhile (its result or its error reaches all of
    them). `invalidate(account, token)` reports a token BACE refused and returns the token to use.

    Args:
        target: the broker's address: `host:port`, `http://host:port` or `https://host:port`.
        timeout: deadline of each call to the broker, in seconds.
        ca_file: PEM CA bundle to verify the broker's certificate (turns TLS on).
        cert_file, key_file: PEM client certificate and key for mTLS (together).
        token_file: a service-account token file, sent as `authorization: Bearer` metadata and
            re-read when it changes (checked at most every `token_file_check_interval` s).
        margin: the cache answers while a token has more than this left (default 30 s).
        min_validity: default `min_validity` of `token()`: added to `margin` for the cache,
            and `margin + min_validity` is what GetToken asks the broker for.
        interceptors: grpcio client interceptors (tracing, metrics, ...).
        channel_options: extra grpcio channel options.
        clock: wall-clock time in Unix seconds, compared with `expires_at` (for tests).

    Raises `ValueError` for bad options and unreadable files. Calls raise the typed errors of
    `bace_token_broker.errors` (all `BrokerError`s).
    """

    def _open(self) -> None:
        if self._credentials is not None:
            channel = grpc.secure_channel(
                self._target.address, self._credentials, options=self._options
            )
        else:
            channel = grpc.insecure_channel(self._target.address, options=self._options)
        self._channel = channel
        if self._interceptors:
            channel = grpc.intercept_channel(channel, *self._interceptors)
        self._stub = pb_grpc.TokenBrokerServiceStub(channel)
        self._flights = _Flights()

    def _new_watch(self, account: str, backoff: tuple[float, float]) -> TokenWatch:
        return TokenWatch(self, account, *backoff)

    def token(self, account: str, *, min_validity: Seconds | None = None) -> pb.Token:
        """A token for `account` with more than the margin plus `min_validity` left: from the
        cache, else from one GetToken call shared by concurrent callers.

        Raises a `BrokerError` subclass (`UnknownAccount`, `BrokerUnavailable`, ...)."""
        mv = self._wanted_validity(min_validity)
        hit = self._cache.fresh(account, mv)
        if hit is not None:
            return hit
        return self._flights.run(
            ("token", account, mv),
            lambda: self._cache.fresh(account, mv),
            lambda: self._fetch(account, mv),
        )

    def _fetch(self, account: str, min_validity: float) -> pb.Token:
        generation = self._cache.generation(account)
        margin = self._cache.margin
        try:
            request = _core.get_token_request(account, margin, min_validity)
            token = self._call(self._stub.GetToken, request).token
        except Exception as error:
            if not _core.margin_out_of_range(error, margin):
                raise
            request = _core.get_token_request(account, 0, min_validity)
            return self._call(self._stub.GetToken, request).token
        self._cache.store(account, token, generation)
        return token

    def invalidate(self, account: str, access_token: str | pb.Token) -> InvalidateResult:
        """Reports a token BACE refused (401) and returns `(outcome, token)`: the token to use
        from now on, which the cache then holds. With outcome `TOKEN_VALID` the token is fine
        and the 401 was a missing permission: don't retry. Concurrent reports of the same token
        share one call. An empty `access_token` means whatever token is current."""
        used = _core.access_token_of(access_token)
        return self._flights.run(
            ("invalidate", account, used), lambda: None, lambda: self._invalidate(account, used)
        )

    def _invalidate(self, account: str, used: str) -> InvalidateResult:
        answer = self._call(
            self._stub.Invalidate, pb.InvalidateRequest(account=account, access_token=used)
        )
        return self._invalidated(account, answer)

    def _call(self, method: Any, request: Any) -> Any:
        with typed_errors():
            return method(request, timeout=self._timeout, metadata=self._metadata())

    def close(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TokenWatch(WatchBase):
    """An account's token kept up to date by the broker's WatchToken stream (see
    `BrokerClient.watch`).

    A daemon thread holds the stream open. When it breaks (the broker restarts, the network
    fails, the stream ends) the thread opens it again after a backoff (`backoff_initial`,
    doubling up to `backoff_max`, reset by every message); the call waits for the channel to be
    ready, so a broker coming back is picked up as soon as gRPC reconnects. The stream ending
    with a status that retrying won't fix (NOT_FOUND: the account was removed;
    PERMISSION_DENIED, UNAUTHENTICATED, INVALID_ARGUMENT) stops the watch: `wait` and
    `wait_for` then raise that error.
    """

    def __init__(
        self, client: BrokerClient, account: str, backoff_initial: float, backoff_max: float
    ):
        super().__init__(client, account, (backoff_initial, backoff_max))
        self._client: BrokerClient = client
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(
            target=self._run, name=f"bace-token-watch-{account}", daemon=True
        )
        self._thread.start()

    def wait(self, timeout: float | None = None) -> pb.Token:
        """The current token, waiting for the first one if none came yet."""
        return self.wait_for(lambda _: True, timeout)

    def wait_for(
        self, predicate: Callable[[pb.Token], bool], timeout: float | None = None
    ) -> pb.Token:
        """Blocks until the current token satisfies `predicate` and returns it. Raises
        `TimeoutError` after `timeout` seconds, the watch's `BrokerError` if it stopped on
        one, `RuntimeError` if it was closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._settled(predicate), timeout)
            token = self._answer(predicate)
            if token is not None:
                return token
            raise TimeoutError(f"no matching token for {self.account!r} within {timeout} s")

    def _run(self) -> None:
        initial, maximum = self._backoff
        backoff = initial
        first = True
        while not self._closed.is_set():
            if not first:
                self.reconnects += 1
            first = False
            try:
                call = self._client._stub.WatchToken(
                    pb.WatchTokenRequest(account=self.account),
                    metadata=self._client._metadata(),
                    wait_for_ready=True,
                )
                self._call = call
                if self._closed.is_set():
                    call.cancel()
                for message in call:
                    backoff = initial
                    self._publish(message.token)
            except Exception as e:  # noqa: BLE001 - never let the thread die silently
                if isinstance(e, grpc.RpcError) and self._closed.is_set():
                    return
                error = self._stopping_error(e)
                if error is not None:
                    with self._cond:
                        self._error = error
                        self._cond.notify_all()
                    return
            if self._closed.wait(backoff):
                return
            backoff = min(backoff * 2, maximum)

    def _publish(self, token: pb.Token) -> None:
        self._client._cache.replace(self.account, token)
        with self._cond:
            self._token = token
            self._cond.notify_all()

    def close(self) -> None:
        """Stops the watch and waits for its thread."""
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self._cond:
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> TokenWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
