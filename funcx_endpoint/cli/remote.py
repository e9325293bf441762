"""The CLI's calls to the funcX service: whoami, logout, delete an endpoint.

They use the daemon's own login code (:mod:`funcx_endpoint.endpoint.auth`)
and treq, run once in a reactor started for the command.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Dict, Optional, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from funcx_endpoint.config.model import Config
from funcx_endpoint.endpoint.auth import (
    Authenticator,
    AuthError,
    TokenStore,
    auth_base_url,
    error_message,
    headers,
    http_client,
)

T = TypeVar("T")


class RemoteError(Exception):
    """A call to the service failed; the message says why and what to do."""


def run_in_reactor(make: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``make(reactor)`` to completion in a reactor started for this call.

    Only once per process (a reactor cannot be restarted); CLI commands
    are one-shot.
    """
    from twisted.internet import reactor

    outcome: Dict[str, Any] = {}

    def go() -> None:
        d: Deferred[T] = Deferred.fromCoroutine(make(reactor))  # type: ignore[arg-type]
        d.addCallbacks(
            lambda result: outcome.setdefault("result", result),
            lambda failure: outcome.setdefault("failure", failure),
        )
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    failure: Optional[Failure] = outcome.get("failure")
    if failure is not None:
        failure.raiseException()
    return outcome.get("result")  # type: ignore[return-value]


def authenticator(reactor: Any, config: Config, config_dir: str) -> Authenticator:
    http, _pool = http_client(reactor, config.service_ca_file)
    return Authenticator(
        http,
        auth_base_url(config.funcx_service_address, config.auth_address),
        TokenStore(config_dir),
        reactor,
    )


async def whoami(reactor: Any, config: Config, config_dir: str) -> Dict[str, Any]:
    try:
        return await authenticator(reactor, config, config_dir).userinfo()
    except AuthError as e:
        raise RemoteError(e.message) from None


async def logout(reactor: Any, config: Config, config_dir: str) -> bool:
    return await authenticator(reactor, config, config_dir).logout()


async def delete_endpoint(reactor: Any, config: Config, config_dir: str, endpoint_id: str) -> None:
    """``DELETE /endpoints/<id>`` at the endpoint's service."""
    auth = authenticator(reactor, config, config_dir)
    try:
        token = await auth.token()
    except AuthError as e:
        raise RemoteError(e.message) from None
    url = f"{config.funcx_service_address}/endpoints/{endpoint_id}"
    try:
        response = await auth.http.delete(
            url, headers=headers({"Authorization": f"Bearer {token}", "Accept": "application/json"})
        )
        body = await response.content()
    except Exception as e:
        raise RemoteError(
            f"cannot reach the funcX service at {config.funcx_service_address}: {e}"
        ) from None
    if response.code in (200, 204, 410):  # 410: deleted already
        return
    if response.code == 404:
        # The service answers 404 for another user's endpoint too: with the wrong
        # credentials the endpoint would stay registered while its profile goes.
        raise RemoteError(
            f"endpoint {endpoint_id} was not found at {config.funcx_service_address}, or it "
            f"is not yours (are these the credentials it was registered with?)"
        )
    try:
        data = json.loads(body)
    except ValueError:
        data = {"message": body[:200].decode(errors="replace")}
    raise RemoteError(
        f"the service refused to delete endpoint {endpoint_id} ({response.code}: "
        f"{error_message(data if isinstance(data, dict) else {})})"
    )
