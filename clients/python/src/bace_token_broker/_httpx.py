"""`HttpxAuth`: the broker's token on every `httpx` call (sync and async), and the 401 dance."""

from __future__ import annotations

from functools import partial
from typing import AsyncGenerator, Generator

import httpx

from . import _core, errors
from ._aio import AsyncBrokerClient
from ._core import InvalidateResult, Seconds
from ._pb import token_broker_pb2 as pb
from ._sync import BrokerClient


class HttpxAuth(httpx.Auth):
    """`httpx` authentication with a BACE token from the broker, for `httpx.Client` and
    `httpx.AsyncClient`.

    With `httpx.Client` give it a `BrokerClient`; with `httpx.AsyncClient` an
    `AsyncBrokerClient` (a `BrokerClient` works there too: its cache answers in place and a
    call to the broker runs in a worker thread).

    Sets `Authorization` on each request from the client's cached token. When BACE answers 401,
    the token that was used is reported with `invalidate`; then:

    - outcome `TOKEN_VALID` (the broker checked the token at its `upstream.verify_url` and BACE
      accepts it, so the account lacks a permission): the 401 is returned untouched;
    - the same token returned (the broker's invalidate cooldown kept it): the 401 is returned;
    - otherwise the request is sent once more with the returned token, if its body can be
      replayed (content given as bytes, str, `json=`, `data=` or already read; not a
      generator or other stream), with the 401 in `response.history`. At most one retry.

    A 401 to a request that no longer carried the token (httpx follows redirects below the
    auth and drops `Authorization` on a hop to another origin) is returned as is. Broker
    failures of `token()` raise the typed errors of `bace_token_broker.errors` from the request
    call; a failed `invalidate` is logged as a warning and the 401 returned.
    """

    def __init__(
        self,
        client: BrokerClient | AsyncBrokerClient,
        account: str,
        *,
        min_validity: Seconds | None = None,
    ):
        if not isinstance(client, (BrokerClient, AsyncBrokerClient)):
            raise TypeError("HttpxAuth needs a BrokerClient or an AsyncBrokerClient")
        self.client = client
        self.account = account
        self.min_validity = min_validity

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        client = self.client
        if not isinstance(client, BrokerClient):
            raise TypeError(
                "HttpxAuth with an AsyncBrokerClient works with httpx.AsyncClient; "
                "give httpx.Client a BrokerClient"
            )
        token = client.token(self.account, min_validity=self.min_validity)
        request.headers["Authorization"] = _core.authorization(token)
        response = yield request
        if not _refused(response, request):
            return
        try:
            result = client.invalidate(self.account, token.access_token)
        except errors.BrokerError as e:
            _core.invalidate_failed(self.account, e)
            return
        if _retry(request, result, token.access_token):
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._token()
        request.headers["Authorization"] = _core.authorization(token)
        response = yield request
        if not _refused(response, request):
            return
        try:
            result = await self._invalidate(token.access_token)
        except errors.BrokerError as e:
            _core.invalidate_failed(self.account, e)
            return
        if _retry(request, result, token.access_token):
            yield request

    async def _token(self) -> pb.Token:
        client = self.client
        if isinstance(client, AsyncBrokerClient):
            return await client.token(self.account, min_validity=self.min_validity)
        hit = client.cached(self.account, min_validity=self.min_validity)
        if hit is not None:
            return hit
        import anyio.to_thread

        call = partial(client.token, self.account, min_validity=self.min_validity)
        return await anyio.to_thread.run_sync(call)

    async def _invalidate(self, used: str) -> InvalidateResult:
        client = self.client
        if isinstance(client, AsyncBrokerClient):
            return await client.invalidate(self.account, used)
        import anyio.to_thread

        return await anyio.to_thread.run_sync(client.invalidate, self.account, used)

    def __repr__(self) -> str:
        return f"HttpxAuth(account={self.account!r}, client={self.client!r})"


def _refused(response: httpx.Response, request: httpx.Request) -> bool:
    """Whether BACE refused our token: a 401 to a request that still carried it. httpx follows
    redirects below the auth flow, so `response` may answer another origin's request, from
    which httpx dropped `Authorization`; that host's 401 says nothing about the token."""
    return response.status_code == 401 and response.request.headers.get(
        "Authorization"
    ) == request.headers.get("Authorization")


def _retry(request: httpx.Request, result: InvalidateResult, used: str) -> bool:
    """After a 401 and `invalidate`: puts the new token on the request and says whether to send
    it again (not for TOKEN_VALID or the same token, nor for a body that cannot be replayed)."""
    if not _core.worth_retrying(result, used) or not replayable(request):
        return False
    request.headers["Authorization"] = _core.authorization(result.token)
    return True


def replayable(request: httpx.Request) -> bool:
    """Whether the request's body is in memory (httpx reads bytes, str, `json=` and `data=`
    content at once), so it can be sent again; a generator or other stream cannot."""
    try:
        _ = request.content
    except httpx.RequestNotRead:
        return False
    return True
