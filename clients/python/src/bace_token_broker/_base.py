"""What `BrokerClient` and `AsyncBrokerClient` (and their token watches) share: the options and
their checks, the cache, the requests they build, the metadata they send, what they make of
answers and errors. The subclasses own the channels, the calls and their control flow
(threads or tasks)."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import grpc

from . import _core, errors
from ._core import InvalidateOutcome, InvalidateResult, Seconds
from ._pb import token_broker_pb2 as pb

W = TypeVar("W", bound="WatchBase")

FINAL_WATCH_CODES = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Codes a WatchToken stream ends with that reconnecting won't fix: they stop the watch."""


@contextlib.contextmanager
def typed_errors() -> Iterator[None]:
    """Raises a `grpc.RpcError` from within as the typed `BrokerError` (chained to it)."""
    try:
        yield
    except grpc.RpcError as e:
        raise errors.from_rpc_error(e) from e


def _fs(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)


class ClientBase(Generic[W]):
    """The options, cache and request building of a broker client; `_open()` (the subclass's)
    sets up its channel once the options are checked, and `_new_watch()` makes its watches."""

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
            target, ca_file=_fs(ca_file), cert_file=_fs(cert_file), key_file=_fs(key_file)
        )
        self._sa_token = (
            None
            if token_file is None
            else _core.ServiceAccountToken(
                token_file, _core.seconds(token_file_check_interval, "token_file_check_interval")
            )
        )
        self._cache = _core.TokenCache(_core.seconds(margin, "margin"), clock)
        # Read now, so bad files fail the constructor.
        self._credentials = (
            _core.channel_credentials(ca_file, cert_file, key_file) if self._target.tls else None
        )
        self._interceptors = list(interceptors)
        self._options = list(channel_options)
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    def _wanted_validity(self, min_validity: Seconds | None) -> float:
        """`min_validity` of a call, checked, or the client's default."""
        if min_validity is None:
            return self._min_validity
        return _core.seconds(min_validity, "min_validity")

    def cached(self, account: str, *, min_validity: Seconds | None = None) -> pb.Token | None:
        """The cached token if it is fresh enough, without any call."""
        return self._cache.fresh(account, self._wanted_validity(min_validity))

    def _metadata(self) -> Any:
        """The call's metadata: the service-account token, re-read when its file changes."""
        return self._sa_token.metadata() if self._sa_token is not None else None

    def _invalidated(self, account: str, answer: pb.InvalidateResponse) -> InvalidateResult:
        """The result of an Invalidate call, whose token the cache then holds."""
        self._cache.replace(account, answer.token)
        return InvalidateResult(InvalidateOutcome.from_wire(answer.outcome), answer.token)

    def watch(
        self,
        account: str,
        *,
        backoff_initial: Seconds = _core.DEFAULT_WATCH_BACKOFF_INITIAL,
        backoff_max: Seconds = _core.DEFAULT_WATCH_BACKOFF_MAX,
    ) -> W:
        """A token watch (`TokenWatch`, `AsyncTokenWatch`): the account's token kept current
        by a WatchToken stream in a background thread (a task of the running loop for the
        asyncio client), reconnecting with backoff when the stream breaks. Every token it
        receives also goes into this client's cache. Close it (`with`, `async with`) when
        done."""
        backoff = (
            _core.seconds(backoff_initial, "backoff_initial", allow_zero=False),
            _core.seconds(backoff_max, "backoff_max", allow_zero=False),
        )
        return self._new_watch(account, backoff)

    def _new_watch(self, account: str, backoff: tuple[float, float]) -> W:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(target={self._target.address!r}, tls={self._target.tls}, "
            f"token_file={self._sa_token.path if self._sa_token else None!r})"
        )


class WatchBase:
    """The state of a token watch and the answers of its waits; the subclass runs the stream
    (in a thread or a task) and sets `_closed`, an event, before starting it."""

    _closed: Any

    def __init__(self, client: ClientBase[Any], account: str, backoff: tuple[float, float]):
        self.account = account
        self._client = client
        self._backoff = backoff
        self._token: pb.Token | None = None
        self._error: errors.BrokerError | None = None
        self.reconnects = 0
        """How many times the stream was opened again after it broke."""

    @property
    def token(self) -> pb.Token | None:
        """The latest token received (None before the first). It may have expired if the
        broker has been unreachable for long; `client.token()` checks that for you."""
        return self._token

    def _settled(self, predicate: Callable[[pb.Token], bool]) -> bool:
        """Whether a wait for `predicate` is over: a matching token, an error, or closed."""
        return (
            self._error is not None
            or self._closed.is_set()
            or (self._token is not None and predicate(self._token))
        )

    def _answer(self, predicate: Callable[[pb.Token], bool]) -> pb.Token | None:
        """After a wait: the matching token; raises `RuntimeError` when the watch is closed and
        its error when it stopped on one; None when neither (the wait timed out)."""
        if self._closed.is_set():
            raise RuntimeError("the watch is closed")
        if self._token is not None and predicate(self._token):
            return self._token
        if self._error is not None:
            raise self._error
        return None

    @staticmethod
    def _stopping_error(e: Exception) -> errors.BrokerError | None:
        """The error that stops the watch after the stream failed with `e`; None when the
        stream is to be opened again."""
        if isinstance(e, grpc.RpcError):
            error = errors.from_rpc_error(e)
            return error if error.code in FINAL_WATCH_CODES else None
        return errors.BrokerError(grpc.StatusCode.UNKNOWN, type(e).__name__)

    def __repr__(self) -> str:
        token = None if self._token is None else _core.describe_token(self._token)
        return f"{type(self).__name__}(account={self.account!r}, token={token})"
