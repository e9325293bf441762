"""The embedded broker: a private RabbitMQ node under the service's state directory.

Like SQLite for storage, it is the default when no ``--amqp-url`` is given.
The node is a child service of the web service
(:class:`~funcx_endpoint.rabbitmq.service.RabbitMQNodeService`: Debian's
``rabbitmq-server`` with the management plugin, restarted if it dies); its
name, ports and administrator password are kept in
``<state dir>/rabbitmq/node.json``, so the AMQPS URLs handed to endpoints
stay valid across restarts.  Its AMQPS listener uses the service's own CA
and server certificate (one CA file for clients to trust), and listens on
the service's interface; plain AMQP and the management API listen on
127.0.0.1 only, for the service itself.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.interfaces import IReactorProcess, IReactorTime

from funcx_endpoint.rabbitmq.node import LISTEN_IP, NodeDirectory, NodeIdentity
from funcx_endpoint.rabbitmq.processes import node_processes
from funcx_endpoint.rabbitmq.service import RabbitMQNodeService
from funcx_endpoint.tls import TLSFiles

__all__ = ["admin_amqp_url", "embedded_broker", "leftover_processes", "management_url"]


def embedded_broker(
    base_dir: str,
    tls_files: TLSFiles,
    reactor: IReactorProcess,
    interface: str = LISTEN_IP,
    clock: IReactorTime | None = None,
) -> RabbitMQNodeService:
    """The node service for ``base_dir`` (not started), AMQPS on ``interface``;
    processes spawned on ``reactor``, timed by ``clock`` (default: the reactor)."""
    amqps_address = LISTEN_IP if interface in ("127.0.0.1", "localhost") else interface
    service = RabbitMQNodeService(
        NodeDirectory(base_dir),
        tls_files,
        reactor=reactor,
        clock=clock,
        amqps_address=amqps_address,
        stop_timeout=30.0,
    )
    service.setName("rabbitmq")
    return service


def admin_amqp_url(identity: NodeIdentity) -> str:
    """Plain AMQP on 127.0.0.1, for the service itself."""
    return identity.amqp_url()


def management_url(identity: NodeIdentity) -> str:
    """The management API on 127.0.0.1, with the administrator's credentials."""
    return identity.management_url(LISTEN_IP, with_credentials=True)


def leftover_processes(base_dir: str) -> List[Any]:
    """Live processes of the node kept in ``base_dir`` (after a stop there are none)."""
    identity = NodeDirectory(base_dir).load_identity()
    return node_processes(identity.name) if identity is not None else []
