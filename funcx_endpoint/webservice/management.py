"""The RabbitMQ management HTTP API, for broker users and their permissions.

The service gives each endpoint (and each user of FuncXExecutor) a broker
user of its own; the permissions say exactly what it may touch, so that an
endpoint's credentials can read only its own task queue and publish only
its own results (PROTOCOL.md section 3, DESIGN.md "Security").
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Optional
from urllib.parse import quote, unquote, urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionLost, TimeoutError
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from zope.interface import Interface, implementer

from funcx_endpoint.tls import trust_root

__all__ = [
    "BrokerUnavailable",
    "IBrokerAdministrator",
    "ManagementAPI",
    "ManagementError",
    "endpoint_permissions",
]


class BrokerUnavailable(Exception):
    """The broker (or its management API) cannot be reached now; try again later."""


class ManagementError(Exception):
    """The management API refused a request."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"RabbitMQ management API answered {status}: {text}")
        self.status = status
        self.text = text


def endpoint_permissions(endpoint_id: str) -> Dict[str, Dict[str, str]]:
    """What an endpoint's broker user may do (regular expressions, anchored).

    configure nothing; read only ``<endpoint_id>.tasks``; write only to the
    ``results`` exchange, and there only with the routing key
    ``<endpoint_id>.results`` (a topic permission).  Passive declares need no
    permission in RabbitMQ, so the endpoint can still check that its queue
    and the exchanges exist.
    """
    eid = re.escape(endpoint_id)
    return {
        "permissions": {"configure": "^$", "write": "^results$", "read": f"^{eid}\\.tasks$"},
        "topic": {"exchange": "results", "write": f"^{eid}\\.results$", "read": "^$"},
    }


def user_permissions(queue_prefix: str) -> Dict[str, str]:
    """What a user's result-queue broker user may do: read its own queues only."""
    return {"configure": "^$", "write": "^$", "read": f"^{re.escape(queue_prefix)}.*$"}


class IBrokerAdministrator(Interface):
    """Creates and removes the broker users of endpoints and of FuncXExecutor users.

    Each operation may fail with :class:`BrokerUnavailable` (try again later)
    or :class:`ManagementError` (the broker refused).
    """

    async def provision_endpoint(user: str, password: str, endpoint_id: str) -> None:
        """Create or repair an endpoint's broker user with :func:`endpoint_permissions`
        (idempotent)."""

    async def provision_user(user: str, password: str, queue_prefix: str) -> None:
        """Create or repair a user's result-queue broker user with :func:`user_permissions`."""

    async def delete_user(name: str) -> bool:
        """Delete a broker user; False if there was none."""


@implementer(IBrokerAdministrator)
class ManagementAPI:
    """A client of one broker's management API (``http(s)://user:pass@host:port/``)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        vhost: str = "/",
        *,
        ca_file: Optional[str] = None,
        http_client: Optional[HTTPClient] = None,
        timeout: float = 15.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the management URL must be http(s)://user:password@host:port/")
        self.user = unquote(parts.username or "guest")
        self._password = unquote(parts.password or "guest")
        port = f":{parts.port}" if parts.port else ""
        self.base = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}/api"
        self.vhost = vhost
        self.timeout = timeout
        self._pool: Optional[HTTPConnectionPool] = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 4
            self._pool.retryAutomatically = False
            policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file))
            http_client = HTTPClient(Agent(reactor, contextFactory=policy, pool=self._pool))
        self._http = http_client

    def describe(self) -> str:
        return self.base.rsplit("/api", 1)[0] + "/"

    def close(self) -> Deferred[None]:
        if self._pool is None:
            return Deferred.fromCoroutine(_nothing())
        return self._pool.closeCachedConnections()

    def _url(self, *parts: str) -> str:
        return "/".join([self.base, *(quote(p, safe="") for p in parts)])

    async def _request(self, method: str, url: str, body: Any = None) -> Any:
        kwargs: Dict[str, Any] = {
            "auth": (self.user, self._password),
            "timeout": self.timeout,
            "headers": {"Content-Type": ["application/json"]},
        }
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
        try:
            response = await self._http.request(method, url, **kwargs)
            text = (await treq.content(response)).decode("utf-8", "replace")
        except (ConnectError, ConnectionLost, TimeoutError, ResponseFailed) as e:
            raise BrokerUnavailable(
                f"the broker's management API at {self.describe()} cannot be reached: {e}"
            ) from None
        except Exception as e:
            if type(e).__name__ == "CancelledError":
                raise BrokerUnavailable(
                    f"the broker's management API at {self.describe()} did not answer "
                    f"within {self.timeout:g} s"
                ) from None
            raise
        if response.code >= 500:
            raise BrokerUnavailable(f"the broker's management API failed: {response.code} {text}")
        if response.code >= 400:
            raise ManagementError(response.code, text)
        return json.loads(text) if text.strip() else None

    async def overview(self) -> Dict[str, Any]:
        answer: Dict[str, Any] = await self._request("GET", self._url("overview"))
        return answer

    async def put_user(self, name: str, password: str) -> None:
        await self._request("PUT", self._url("users", name), {"password": password, "tags": ""})

    async def set_permissions(self, user: str, configure: str, write: str, read: str) -> None:
        await self._request(
            "PUT",
            self._url("permissions", self.vhost, user),
            {"configure": configure, "write": write, "read": read},
        )

    async def set_topic_permissions(self, user: str, exchange: str, write: str, read: str) -> None:
        await self._request(
            "PUT",
            self._url("topic-permissions", self.vhost, user),
            {"exchange": exchange, "write": write, "read": read},
        )

    async def delete_user(self, name: str) -> bool:
        """Delete a user; False if there was none."""
        try:
            await self._request("DELETE", self._url("users", name))
        except ManagementError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def provision_endpoint(self, user: str, password: str, endpoint_id: str) -> None:
        """Create or repair an endpoint's broker user and its permissions (idempotent)."""
        rules = endpoint_permissions(endpoint_id)
        await self.put_user(user, password)
        await self.set_permissions(user, **rules["permissions"])
        await self.set_topic_permissions(user, **rules["topic"])

    async def provision_user(self, user: str, password: str, queue_prefix: str) -> None:
        await self.put_user(user, password)
        await self.set_permissions(user, **user_permissions(queue_prefix))


async def _nothing() -> None:
    return None
