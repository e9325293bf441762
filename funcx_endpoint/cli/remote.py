"""The CLI's calls to the funcX service: whoami, logout, list and delete endpoints.

They use the daemon's own login code (:mod:`funcx_endpoint.endpoint.auth`)
and treq, run once in a reactor started for the command.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from funcx_endpoint.config.model import Config
from funcx_endpoint.endpoint.auth import (
    Authenticator,
    AuthError,
    config_authenticator,
    error_message,
    headers,
)

T = TypeVar("T")


class RemoteError(Exception):
    """A call to the service failed; the message says why and what to do.

    ``exit_code``: 77 when the credentials are missing or refused, else 69."""

    def __init__(self, message: str, exit_code: int = 69) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    auth, _pool = config_authenticator(reactor, config, config_dir)
    return auth


async def whoami(reactor: Any, config: Config, config_dir: str) -> Dict[str, Any]:
    try:
        return await authenticator(reactor, config, config_dir).userinfo()
    except AuthError as e:
        raise RemoteError(e.message) from None


async def logout(reactor: Any, config: Config, config_dir: str) -> bool:
    return await authenticator(reactor, config, config_dir).logout()


async def _request(
    auth: Authenticator, config: Config, method: str, path: str, body: Optional[bytes] = None
) -> Tuple[int, Any]:
    """``METHOD <service>/path`` (``body``: JSON) with a token for these credentials:
    the answer's status and JSON body (``{"message": ...}`` when it is not JSON).
    A cached token the service refuses (401) is renewed once."""
    url = config.funcx_service_address + path
    for force_new in (False, True):
        try:
            token = await auth.token(force_new=force_new)
        except AuthError as e:
            raise RemoteError(e.message, 77) from None
        fields = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if body is not None:
            fields["Content-Type"] = "application/json"
        try:
            response = await auth.http.request(method, url, data=body, headers=headers(fields))
            content = await response.content()
        except Exception as e:
            raise RemoteError(
                f"cannot reach the funcX service at {config.funcx_service_address}: {e}"
            ) from None
        if response.code != 401:
            break
    try:
        data = json.loads(content)
    except ValueError:
        data = {"message": content[:200].decode(errors="replace")}
    return response.code, data


def _not_found(config: Config, endpoint_id: str) -> RemoteError:
    # The service answers 404 for another user's endpoint too: with the wrong
    # credentials the endpoint would stay registered while its profile goes.
    return RemoteError(
        f"endpoint {endpoint_id} was not found at {config.funcx_service_address}, or it "
        f"is not yours (are these the credentials it was registered with?)"
    )


def _refused(doing: str, code: int, data: Any) -> RemoteError:
    return RemoteError(
        f"the service refused to {doing} ({code}: "
        f"{error_message(data if isinstance(data, dict) else {})})",
        77 if code == 401 else 69,
    )


async def delete_endpoint(reactor: Any, config: Config, config_dir: str, endpoint_id: str) -> None:
    """``DELETE /endpoints/<id>`` at the endpoint's service."""
    auth = authenticator(reactor, config, config_dir)
    code, data = await _request(auth, config, "DELETE", f"/endpoints/{endpoint_id}")
    if code in (200, 204, 410):  # 410: deleted already
        return
    if code == 404:
        raise _not_found(config, endpoint_id)
    raise _refused(f"delete endpoint {endpoint_id}", code, data)


async def stop_endpoint(
    reactor: Any, config: Config, config_dir: str, endpoint_id: str
) -> Dict[str, Any]:
    """``POST /endpoints/<id>/lock`` at the endpoint's service: a running endpoint
    drains and exits, and stays refused until its owner starts it; the answer."""
    auth = authenticator(reactor, config, config_dir)
    code, data = await _request(auth, config, "POST", f"/endpoints/{endpoint_id}/lock", b"{}")
    if code == 200 and isinstance(data, dict):
        return data
    if code == 404:
        raise _not_found(config, endpoint_id)
    raise _refused(f"stop endpoint {endpoint_id}", code, data)


async def get_json(reactor: Any, config: Config, config_dir: str, path: str) -> Tuple[int, Any]:
    """``GET <service>/path`` with a token for these credentials: the answer's
    status and JSON body.  A cached token the service refuses (401) is renewed once."""
    auth = authenticator(reactor, config, config_dir)
    code, data = await _request(auth, config, "GET", path)
    if code == 401:
        raise RemoteError(
            f"the service at {config.funcx_service_address} refused the credentials "
            f"(401: {error_message(data if isinstance(data, dict) else {})})",
            77,
        )
    return code, data


async def list_endpoints(reactor: Any, config: Config, config_dir: str) -> List[Dict[str, Any]]:
    """``GET /endpoints``: the endpoints these credentials own at the config's service."""
    code, data = await get_json(reactor, config, config_dir, "/endpoints")
    if code != 200 or not isinstance(data, list):
        detail = error_message(data) if isinstance(data, dict) else repr(data)[:200]
        raise RemoteError(
            f"the service at {config.funcx_service_address} did not list the endpoints "
            f"({code}: {detail})"
        )
    return [e for e in data if isinstance(e, dict)]
