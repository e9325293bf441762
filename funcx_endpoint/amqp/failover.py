"""One client endpoint over several addresses: the next one when a connect fails.

A RabbitMQ cluster has several nodes; a client that knows them all can reach
whichever is up.  :class:`FailoverEndpoint` is an ``IStreamClientEndpoint``
over several endpoints (one per node): each ``connect`` tries them in turn,
starting with the one that last answered, and fails only when every one has
(the next ``connect`` then starts one further on).
Under :class:`~twisted.application.internet.ClientService` (which
:class:`~funcx_endpoint.amqp.connection.AMQPConnectionService` uses), a lost
connection is made again to the next node that answers.

:func:`parse_hosts` reads the ``host:port,host:port`` lists of the settings.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from funcx_endpoint.amqp.connection import AMQPURL, client_endpoint

__all__ = ["FailoverEndpoint", "cluster_endpoint", "parse_hosts"]


def parse_hosts(text: str, default_port: int) -> List[Tuple[str, int]]:
    """``[(host, port), ...]`` of ``"h1:5671,h2,[::1]:5672"``; ValueError if malformed."""
    hosts: List[Tuple[str, int]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        elif item.count(":") == 1:
            host, port_text = item.split(":")
        else:
            host, port_text = item, ""
        port = int(port_text) if port_text else default_port
        if not host or not 0 < port < 65536:
            raise ValueError(f"bad broker address {item!r} (host:port)")
        hosts.append((host, port))
    if not hosts:
        raise ValueError("no broker address given")
    return hosts


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Connects through the first of ``endpoints`` that answers; see the module docstring.

    ``names`` (one per endpoint) are for the log only.
    """

    log = Logger()

    def __init__(self, endpoints: Sequence[IStreamClientEndpoint], names: Sequence[str]) -> None:
        if not endpoints:
            raise ValueError("a FailoverEndpoint needs at least one endpoint")
        self._endpoints = list(endpoints)
        self._names = list(names)
        self._next = 0

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        result: Deferred[Any] = Deferred()
        order = [(self._next + i) % len(self._endpoints) for i in range(len(self._endpoints))]
        errors: List[str] = []

        def attempt(position: int) -> None:
            index = order[position]
            d = self._endpoints[index].connect(protocolFactory)

            def connected(protocol: Any) -> None:
                self._next = index
                result.callback(protocol)

            def failed(failure: Failure) -> None:
                errors.append(f"{self._names[index]}: {failure.getErrorMessage()}")
                if position + 1 < len(order):
                    self.log.info(
                        "Cannot connect to {name} ({why}); trying the next address",
                        name=self._names[index],
                        why=failure.getErrorMessage(),
                    )
                    attempt(position + 1)
                else:
                    # Next time, start one further on: rotate through them all.
                    self._next = (order[0] + 1) % len(self._endpoints)
                    result.errback(
                        ConnectionRefusedError("no address answered: " + "; ".join(errors))
                    )

            d.addCallbacks(connected, failed)

        attempt(0)
        return result


def cluster_endpoint(
    reactor: Any, url: AMQPURL, hosts: Sequence[Tuple[str, int]], ca_file: Optional[str] = None
) -> FailoverEndpoint:
    """A :class:`FailoverEndpoint` over ``hosts``, each reached as ``url`` (an
    :class:`~funcx_endpoint.amqp.connection.AMQPURL`) says: TLS verifying each
    node's own host name when it is ``amqps``."""
    return FailoverEndpoint(
        [client_endpoint(reactor, attr.evolve(url, host=h, port=p), ca_file) for h, p in hosts],
        [f"{h}:{p}" for h, p in hosts],
    )
