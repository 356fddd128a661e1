"""Python client of the BACE token broker (`bace.tokenbroker.v1.TokenBrokerService`).

    from bace_token_broker import BrokerClient, RequestsAuth

    client = BrokerClient("token-broker:50051", timeout=5.0)
    session = requests.Session()
    session.auth = RequestsAuth(client, "fleet-a")
    session.get("https://api.bace-iot.com/api/v2/physical-device")

- `BrokerClient` (blocking, grpcio) and `AsyncBrokerClient` (asyncio, grpc.aio): `token()`
  from a local cache with one shared call per account, `invalidate()`, TLS and a
  service-account token file; `watch()` keeps a token current over WatchToken.
- `RequestsAuth` (needs `requests`) and `HttpxAuth` (needs `httpx`): the token on every
  request and, on a 401 from BACE, Invalidate and at most one retry.
- `bace_token_broker.errors`: typed errors for the broker's status codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from ._aio import AsyncBrokerClient, AsyncTokenWatch
from ._core import InvalidateOutcome, InvalidateResult, Token, describe_token
from ._sync import BrokerClient, TokenWatch
from .errors import (
    BrokerError,
    BrokerUnavailable,
    CredentialsRejected,
    DeadlineExceeded,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
    UnknownAccount,
)

if TYPE_CHECKING:
    from ._httpx import HttpxAuth
    from ._requests import RequestsAuth

__version__ = "0.1.0"

__all__ = [
    "AsyncBrokerClient",
    "AsyncTokenWatch",
    "BrokerClient",
    "BrokerError",
    "BrokerUnavailable",
    "CredentialsRejected",
    "DeadlineExceeded",
    "HttpxAuth",
    "InvalidRequest",
    "InvalidateOutcome",
    "InvalidateResult",
    "PermissionDenied",
    "RequestsAuth",
    "Token",
    "TokenWatch",
    "Unauthenticated",
    "UnknownAccount",
    "describe_token",
    "errors",
]

# The HTTP integrations import their HTTP library: loaded on first use, so each is needed only
# by those who use it (extras `requests` and `httpx`).
_LAZY = {"RequestsAuth": ("_requests", "requests"), "HttpxAuth": ("_httpx", "httpx")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, extra = _LAZY[name]
        import importlib

        try:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
        except ModuleNotFoundError as e:
            if e.name != extra:
                raise
            raise ImportError(
                f"{name} needs {extra}: pip install 'bace-token-broker[{extra}]'"
            ) from e
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
