"""`RequestsAuth`: the broker's token on every `requests` call, and the 401 dance."""

from __future__ import annotations

from typing import Any

import requests
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar

from . import _core, errors
from ._core import Seconds
from ._sync import BrokerClient

# Set on a request the auth has retried once: its own 401 is handed back, never retried again.
_RETRIED = "_bace_token_broker_retried"


class RequestsAuth(AuthBase):
    """`requests` authentication with a BACE token from the broker.

    Sets `Authorization` on each request from `client.token(account)` (cached). When BACE
    answers 401, the token that was used is reported with `client.invalidate`; then:

    - outcome `TOKEN_VALID` (the broker checked the token at its `upstream.verify_url` and BACE
      accepts it, so the account lacks a permission): the 401 is returned untouched;
    - the same token returned (the broker's invalidate cooldown kept it): the 401 is returned;
    - otherwise the request is sent once more with the returned token, if it can be replayed
      (its body is bytes, a string or absent; not a generator or a file), and that answer is
      returned, with the 401 in `response.history`. A 401 to the retry is returned as is: at
      most one retry, never a loop.

    A 401 to a request without the token (a redirect to another origin dropped it) is returned
    as is. Broker failures of `token()` raise the typed errors of `bace_token_broker.errors`
    from the request call; a failed `invalidate` is logged as a warning and the 401 returned.

        session = requests.Session()
        session.auth = RequestsAuth(BrokerClient("token-broker:50051"), "fleet-a")
        session.get("https://api.bace-iot.com/api/v2/physical-device")
    """

    def __init__(self, client: BrokerClient, account: str, *, min_validity: Seconds | None = None):
        if not isinstance(client, BrokerClient):
            raise TypeError("RequestsAuth needs a BrokerClient (requests is synchronous)")
        self.client = client
        self.account = account
        self.min_validity = min_validity

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self.client.token(self.account, min_validity=self.min_validity)
        request.headers["Authorization"] = _core.authorization(token)
        request.register_hook("response", self._on_response)
        return request

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code != 401:
            return response
        request = response.request
        if getattr(request, _RETRIED, False):
            return response
        used = _core.bearer_token(request.headers.get("Authorization"))
        if used is None:
            return response
        try:
            result = self.client.invalidate(self.account, used)
        except errors.BrokerError as e:
            _core.invalidate_failed(self.account, e)
            return response
        if not _core.worth_retrying(result, used) or not replayable(request):
            return response
        _ = response.content  # read the 401 so its connection goes back to the pool
        response.close()
        retry = request.copy()
        setattr(retry, _RETRIED, True)
        cookies = getattr(retry, "_cookies", None)
        if cookies is not None:
            extract_cookies_to_jar(cookies, request, response.raw)
            retry.prepare_cookies(cookies)
        retry.headers["Authorization"] = _core.authorization(result.token)
        answer: requests.Response = response.connection.send(retry, **kwargs)
        answer.history.append(response)
        answer.request = retry
        return answer

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RequestsAuth)
            and other.client is self.client
            and other.account == self.account
        )

    def __hash__(self) -> int:
        return hash((id(self.client), self.account))

    def __repr__(self) -> str:
        return f"RequestsAuth(account={self.account!r}, client={self.client!r})"


def replayable(request: requests.PreparedRequest) -> bool:
    """Whether the request's body can be sent again: none, bytes or a string (requests encodes
    `data=` dicts, `json=` and `files=` to bytes); not a generator, iterator or file."""
    return request.body is None or isinstance(request.body, (bytes, str))
