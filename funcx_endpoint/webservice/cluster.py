"""What several service instances over one RabbitMQ cluster need beyond one instance.

- :func:`queue_arguments`: the ``x-queue-type`` argument of every queue the
  service declares (``quorum`` queues are replicated over the cluster's nodes
  and survive the loss of a minority of them; they are always durable and
  never exclusive, which the service never asks for; an *exclusive consumer*,
  which the endpoint uses, is allowed on them).
- :class:`FailoverAdministrator`: the management API of whichever node
  answers (users and permissions are cluster-wide, any node can set them).
- :func:`management_apis`: one :class:`ManagementAPI` per node, from the
  ``--management-url`` and ``--management-hosts`` settings.

See ``docs/deployment.rst``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from funcx_endpoint.amqp.failover import parse_hosts
from funcx_endpoint.webservice.management import (
    BrokerUnavailable,
    IBrokerAdministrator,
    ManagementAPI,
)

__all__ = ["FailoverAdministrator", "management_apis", "queue_arguments"]

_T = TypeVar("_T")


def queue_arguments(queue_type: str, **extra: Any) -> Dict[str, Any]:
    """Declare arguments for a queue of ``queue_type`` (``classic``: none), plus ``extra``."""
    arguments: Dict[str, Any] = dict(extra)
    if queue_type != "classic":
        arguments["x-queue-type"] = queue_type
    return arguments


def management_apis(
    reactor: Any,
    url: str,
    hosts: Optional[str],
    vhost: str,
    ca_file: Optional[str],
) -> List[ManagementAPI]:
    """A :class:`ManagementAPI` for ``url``, or one per ``hosts`` (``host:port,...``)
    reached with ``url``'s scheme and credentials."""
    if not hosts:
        return [ManagementAPI(reactor, url, vhost, ca_file=ca_file)]
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    default_port = parts.port or (443 if parts.scheme == "https" else 15672)
    return [
        ManagementAPI(
            reactor,
            urlunsplit(parts._replace(netloc=f"{userinfo}{host}:{port}")),
            vhost,
            ca_file=ca_file,
        )
        for host, port in parse_hosts(hosts, default_port)
    ]


@implementer(IBrokerAdministrator)
class FailoverAdministrator:
    """The first of ``apis`` that answers; the next one when a node cannot be reached.

    A :class:`~funcx_endpoint.webservice.management.ManagementError` (the API
    refused) is final: another node would refuse the same.
    """

    log = Logger()

    def __init__(self, apis: Sequence[ManagementAPI]) -> None:
        if not apis:
            raise ValueError("no management API given")
        self.apis = list(apis)
        self._current = 0

    def describe(self) -> str:
        return ", ".join(api.describe() for api in self.apis)

    async def _each(self, call: Callable[[ManagementAPI], Awaitable[_T]]) -> _T:
        errors: List[str] = []
        for step in range(len(self.apis)):
            index = (self._current + step) % len(self.apis)
            try:
                result = await call(self.apis[index])
            except BrokerUnavailable as e:
                errors.append(str(e))
                continue
            if index != self._current:
                self.log.info(
                    "The management API at {url} answers; using it",
                    url=self.apis[index].describe(),
                )
                self._current = index
            return result
        raise BrokerUnavailable("; ".join(errors))

    async def provision_endpoint(self, user: str, password: str, endpoint_id: str) -> None:
        await self._each(lambda api: api.provision_endpoint(user, password, endpoint_id))

    async def provision_user(self, user: str, password: str, queue_prefix: str) -> None:
        await self._each(lambda api: api.provision_user(user, password, queue_prefix))

    async def delete_user(self, name: str) -> bool:
        return await self._each(lambda api: api.delete_user(name))

    async def overview(self) -> Dict[str, Any]:
        return await self._each(lambda api: api.overview())

    def close(self) -> Deferred[Any]:
        return gatherResults([api.close() for api in self.apis])
