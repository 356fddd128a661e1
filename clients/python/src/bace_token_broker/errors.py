"""Typed errors for the broker's gRPC status codes (the README's status table).

Every error the clients raise for a failed call is a `BrokerError` with the gRPC `code`, the
broker's `details` (short, stable messages that never carry a token or secret) and `retryable`:
whether trying again later may succeed. Catch the subclasses to act on a cause:

| code                               | class                 | retryable |
| ---------------------------------- | --------------------- | --------- |
| INVALID_ARGUMENT, OUT_OF_RANGE     | `InvalidRequest`      | no        |
| NOT_FOUND                          | `UnknownAccount`      | no        |
| FAILED_PRECONDITION                | `CredentialsRejected` | no        |
| UNAUTHENTICATED                    | `Unauthenticated`     | no        |
| PERMISSION_DENIED                  | `PermissionDenied`    | no        |
| UNAVAILABLE                        | `BrokerUnavailable`   | yes       |
| DEADLINE_EXCEEDED, CANCELLED       | `DeadlineExceeded`    | yes       |
| anything else                      | `BrokerError`         | RESOURCE_EXHAUSTED, ABORTED: yes |
"""

from __future__ import annotations

import grpc

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "CredentialsRejected",
    "DeadlineExceeded",
    "InvalidRequest",
    "PermissionDenied",
    "Unauthenticated",
    "UnknownAccount",
]

_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class BrokerError(Exception):
    """A broker call failed with a gRPC status other than OK.

    Attributes:
        code: the gRPC status code.
        details: the status message (the broker's never holds a token or a secret).
        retryable: True when the same call may succeed later (retry with backoff).
    """

    code: grpc.StatusCode
    details: str
    retryable: bool

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.retryable = code in _RETRYABLE

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r})"


class InvalidRequest(BrokerError):
    """INVALID_ARGUMENT (empty or malformed account name, negative `min_validity`) or
    OUT_OF_RANGE (`min_validity` longer than any token can last). Fix the request."""


class UnknownAccount(BrokerError):
    """NOT_FOUND: the account is not configured in the broker."""


class CredentialsRejected(BrokerError):
    """FAILED_PRECONDITION: BACE rejected the account's credentials. A human must fix them;
    retrying soon won't help (the broker backs off for minutes)."""


class Unauthenticated(BrokerError):
    """UNAUTHENTICATED: the broker did not accept this client's identity (no or an invalid
    service-account token; the message names the reason, e.g. `expired token`)."""


class PermissionDenied(BrokerError):
    """PERMISSION_DENIED: this client's identity may not use the account (the broker answers
    so for accounts that do not exist too, when an allow list is configured)."""


class BrokerUnavailable(BrokerError):
    """UNAVAILABLE: the broker cannot be reached, or BACE is down and no valid token is cached.
    Retry with backoff."""


class DeadlineExceeded(BrokerError):
    """DEADLINE_EXCEEDED or CANCELLED: the call's deadline (`timeout`) passed before the broker
    answered. Retry."""


_BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: UnknownAccount,
    grpc.StatusCode.FAILED_PRECONDITION: CredentialsRejected,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: BrokerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: DeadlineExceeded,
}


def from_status(code: grpc.StatusCode, details: str | None) -> BrokerError:
    """The typed error for a gRPC status."""
    return _BY_CODE.get(code, BrokerError)(code, details or "")


def from_rpc_error(error: grpc.RpcError) -> BrokerError:
    """The typed error for a failed grpcio (or grpc.aio) call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    details = error.details() if hasattr(error, "details") else str(error)  # type: ignore[attr-defined]
    return from_status(code or grpc.StatusCode.UNKNOWN, details)
