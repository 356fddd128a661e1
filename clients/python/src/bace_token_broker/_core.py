"""What the sync and async clients share: options, the token cache, the service-account token
file, channel credentials and the result types."""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

import grpc
from google.protobuf import duration_pb2

from . import errors
from ._pb import token_broker_pb2 as pb

log = logging.getLogger("bace_token_broker")

Token = pb.Token
"""The broker's `Token` message: `account`, `access_token` (secret), `token_type`,
`expires_at` (a protobuf Timestamp) and `authorization` (the whole `Authorization` header
value). Its protobuf `repr` shows the access token: don't log it."""

Seconds = Union[float, int, dt.timedelta]
"""A duration: seconds as a number, or a `datetime.timedelta`."""

DEFAULT_TIMEOUT = 10.0
DEFAULT_MARGIN = 30.0
DEFAULT_TOKEN_FILE_CHECK_INTERVAL = 5.0
DEFAULT_WATCH_BACKOFF_INITIAL = 0.5
DEFAULT_WATCH_BACKOFF_MAX = 30.0


class InvalidateOutcome(enum.IntEnum):
    """What an `invalidate` call did with the reported token (the proto's `InvalidateOutcome`)."""

    UNSPECIFIED = pb.INVALIDATE_OUTCOME_UNSPECIFIED
    """Not set (an older broker): treat it as INVALIDATED."""
    INVALIDATED = pb.INVALIDATE_OUTCOME_INVALIDATED
    """The token was dropped and replaced by a new login: retry with the returned token."""
    ALREADY_REPLACED = pb.INVALIDATE_OUTCOME_ALREADY_REPLACED
    """The token had already been replaced: retry with the returned token."""
    TOKEN_VALID = pb.INVALIDATE_OUTCOME_TOKEN_VALID
    """BACE accepts the token (checked at the broker's `upstream.verify_url`): the 401 came
    from a missing permission. Do not retry."""
    COOLDOWN = pb.INVALIDATE_OUTCOME_COOLDOWN
    """The account was invalidated moments ago: retry with the returned token."""

    @classmethod
    def from_wire(cls, value: int) -> InvalidateOutcome:
        """The outcome for a wire value; UNSPECIFIED for one this version does not know."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


class InvalidateResult(NamedTuple):
    """The answer to `invalidate`: unpacks as `(outcome, token)`. `token` is the token to use
    from now on. Its `repr` never shows the access token."""

    outcome: InvalidateOutcome
    token: pb.Token

    @property
    def retry(self) -> bool:
        """Whether a call refused with 401 should be retried (once) with `token`: every outcome
        but TOKEN_VALID."""
        return self.outcome is not InvalidateOutcome.TOKEN_VALID

    def __repr__(self) -> str:
        return f"InvalidateResult(outcome={self.outcome.name}, token={describe_token(self.token)})"


def worth_retrying(result: InvalidateResult, used: str) -> bool:
    """Whether a request refused with 401 while carrying `used` should be sent again after
    `invalidate` answered `result`: not when the token is fine (TOKEN_VALID, a permission
    problem) nor when the answer is that same token (the broker's invalidate cooldown kept it),
    which BACE would refuse again."""
    return result.retry and result.token.access_token != used


def invalidate_failed(account: str, error: errors.BrokerError) -> None:
    """Logs that the `invalidate` after a 401 failed; the HTTP integrations then return the 401
    (the broker's error details never hold a token)."""
    log.warning(
        "invalidate after a 401 for account %r failed (%s); returning the 401", account, error
    )


def describe_token(token: pb.Token) -> str:
    """A token for logs and reprs: its account and expiry, never the access token."""
    expires = expires_at(token)
    when = (
        dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat(timespec="seconds")
        if expires
        else "unset"
    )
    return f"<Token account={token.account!r} expires_at={when} access_token=<redacted>>"


def expires_at(token: pb.Token) -> float:
    """The token's `expires_at` in Unix seconds; 0.0 when unset."""
    if not token.HasField("expires_at"):
        return 0.0
    ts = token.expires_at
    return ts.seconds + ts.nanos / 1e9


def authorization(token: pb.Token) -> str:
    """The `Authorization` header value for the token."""
    return token.authorization or f"Bearer {token.access_token}"


def seconds(value: Seconds | None, name: str, *, allow_zero: bool = True) -> float:
    """A duration option as float seconds; ValueError when negative (or zero when not allowed)."""
    if value is None:
        return 0.0
    if isinstance(value, dt.timedelta):
        out = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    else:
        raise TypeError(f"{name} must be seconds (a number) or a datetime.timedelta")
    if out != out or out < 0 or (out == 0 and not allow_zero):  # NaN, negative
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0, got {out}")
    return out


def duration(secs: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(secs * 1e9))
    return d


def get_token_request(account: str, margin: float, min_validity: float) -> pb.GetTokenRequest:
    """The GetToken request behind `token(account, min_validity=...)`: it asks the broker for
    `margin + min_validity`, the bar the client's cache applies, so the answer is a token the
    cache keeps (the broker would serve anything past its own 10 s expiry margin). If the broker
    cannot promise that much (its `refresh.refreshed_lifetime`), it answers OUT_OF_RANGE, and
    the client asks once more for `min_validity` alone (`margin_out_of_range`), as the Rust
    client does: that answer serves the call, and the cache does not keep it."""
    request = pb.GetTokenRequest(account=account)
    if margin + min_validity > 0:
        request.min_validity.CopyFrom(duration(margin + min_validity))
    return request


def margin_out_of_range(error: BaseException, margin: float) -> bool:
    """Whether a GetToken failed only because the client's margin made its bar longer than the
    broker can promise: OUT_OF_RANGE with a margin added (then ask for `min_validity` alone)."""
    return (
        margin > 0
        and isinstance(error, errors.InvalidRequest)
        and error.code == grpc.StatusCode.OUT_OF_RANGE
    )


def access_token_of(token: str | pb.Token) -> str:
    """The access token given as a string or inside a Token message."""
    if isinstance(token, str):
        return token
    if isinstance(token, pb.Token):
        return token.access_token
    raise TypeError("the token must be an access token (str) or a Token message")


# === target and TLS ===


@dataclass(frozen=True)
class Target:
    """Where the broker is and whether to use TLS."""

    address: str
    tls: bool


def parse_target(
    target: str, *, ca_file: str | None, cert_file: str | None, key_file: str | None
) -> Target:
    """`host:port`, `http://host:port` (plaintext) or `https://host:port` (TLS, the system's
    roots unless `ca_file`); a plain `host:port` uses TLS when any TLS file is given."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(
            "the broker target must be a non-empty string such as 'token-broker:50051'"
        )
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file must be given together")
    tls_files = any(f is not None for f in (ca_file, cert_file, key_file))
    address, tls = target.strip(), tls_files
    for scheme, scheme_tls in (("https://", True), ("http://", False)):
        if address.lower().startswith(scheme):
            address, tls = address[len(scheme) :].rstrip("/"), scheme_tls
            if not scheme_tls and tls_files:
                raise ValueError("an http:// target is plaintext; use https:// with TLS files")
            break
    if not address:
        raise ValueError("the broker target has no host")
    return Target(address, tls)


def channel_credentials(
    ca_file: str | os.PathLike[str] | None,
    cert_file: str | os.PathLike[str] | None,
    key_file: str | os.PathLike[str] | None,
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files (read once, now)."""

    def read(path: str | os.PathLike[str] | None) -> bytes | None:
        return None if path is None else open(path, "rb").read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )


# === the service-account token file ===


class ServiceAccountToken:
    """A service-account token file (e.g. a projected token the kubelet rotates), sent as
    `authorization: Bearer <token>` metadata.

    The file is read at construction (so a missing or empty file is an error at once) and
    read again when its identity changes: at most once per `check_interval` seconds the file is
    `stat`ed (following symlinks, so the kubelet's `..data` swap counts) and re-read if its
    inode, size or modification time differ. A file that cannot be read later keeps the last
    good token in use."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        check_interval: float = DEFAULT_TOKEN_FILE_CHECK_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.path = os.fspath(path)
        self._interval = check_interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._next_check = 0.0
        if not self._reload():
            raise ValueError(f"service-account token file {self.path!r} is empty or unreadable")
        self._next_check = monotonic() + check_interval

    def _reload(self) -> bool:
        """Re-reads the file if it changed; False when it cannot be read or holds no token."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return True
            with open(self.path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            if self._stamp is None:
                reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else e.strerror or e
                raise ValueError(
                    f"cannot read service-account token file {self.path!r}: {reason}"
                ) from None
            return False
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            return False
        self._stamp = stamp
        self._metadata = (("authorization", f"Bearer {token}"),)
        return True

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata to send, re-reading the file when it is due for a check and changed."""
        now = self._monotonic()
        if now >= self._next_check:
            with self._lock:
                if now >= self._next_check:
                    self._reload()
                    self._next_check = now + self._interval
        return self._metadata

    def __repr__(self) -> str:
        return f"ServiceAccountToken(path={self.path!r}, token=<redacted>)"


# === the token cache ===


class TokenCache:
    """The latest token of each account, answered while it has more than `margin` (plus the
    caller's `min_validity`) left before `expires_at` by `clock` (Unix seconds).

    A generation counter per account keeps a GetToken answer that raced an `invalidate` from
    putting the replaced token back."""

    def __init__(self, margin: float, clock: Callable[[], float]):
        self.margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[pb.Token, float]] = {}
        self._generations: dict[str, int] = {}

    def fresh(self, account: str, min_validity: float) -> pb.Token | None:
        """The cached token if it stays valid long enough; no lock (one dict read)."""
        entry = self._tokens.get(account)
        if entry is not None and entry[1] - self._clock() > self.margin + min_validity:
            return entry[0]
        return None

    def generation(self, account: str) -> int:
        return self._generations.get(account, 0)

    def store(self, account: str, token: pb.Token, generation: int) -> bool:
        """Caches a GetToken answer unless the account was invalidated since `generation`."""
        with self._lock:
            if self._generations.get(account, 0) != generation:
                return False
            self._tokens[account] = (token, expires_at(token))
            return True

    def replace(self, account: str, token: pb.Token) -> None:
        """Caches the token an `invalidate` returned, superseding GetToken calls in flight."""
        with self._lock:
            self._generations[account] = self._generations.get(account, 0) + 1
            self._tokens[account] = (token, expires_at(token))


def bearer_token(header: str | bytes | None) -> str | None:
    """The token of a `Bearer <token>` header value, or None."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
