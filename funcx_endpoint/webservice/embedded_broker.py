"""The embedded broker: a private RabbitMQ node under the service's state directory.

Like SQLite for storage, it is the default when no ``--amqp-url`` is given.
The node runs as a child of the service (Debian's ``rabbitmq-server`` with
the management plugin); its name, ports and administrator password are kept
in ``<state dir>/rabbitmq/node.json``, so the AMQPS URLs handed to endpoints
stay valid across restarts.  Its AMQPS listener uses the service's own CA
and server certificate (one CA file for clients to trust), and listens on
the service's interface; plain AMQP and the management API listen on
127.0.0.1 only, for the service itself.

This is the only module that imports :class:`RabbitMQNode` (from
``funcx_endpoint.testing`` for now).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Dict, List, Optional
from urllib.parse import quote

from twisted.internet.threads import deferToThreadPool

from funcx_endpoint.testing.rabbitmq import NodePorts, RabbitMQNode, node_processes
from funcx_endpoint.tls import TLSFiles

__all__ = ["EmbeddedBroker", "leftover_processes"]


class EmbeddedBroker:
    """Starts and stops the node (blocking work in the reactor's thread pool)."""

    def __init__(self, base_dir: str, tls_files: TLSFiles, interface: str = "127.0.0.1") -> None:
        ports = _stored_ports(base_dir) or NodePorts(*_free_ports(5))
        extra = {
            "ssl_options.cacertfile": tls_files.ca_cert,
            "ssl_options.certfile": tls_files.server_cert,
            "ssl_options.keyfile": tls_files.server_key,
        }
        if interface not in ("127.0.0.1", "localhost"):
            extra["listeners.ssl.default"] = f"{interface}:{ports.amqps}"
        # ``ports`` only matter the first time; afterwards node.json has them.
        self.node = RabbitMQNode(base_dir, ports=ports, extra_config=extra)

    def start(self) -> None:
        """Start the node (about 10 s); blocking."""
        self.node.start()

    def stop(self) -> None:
        """Stop the node gracefully (killing what is left after 30 s); blocking."""
        self.node.stop(graceful=True, timeout=30)

    def start_async(self, reactor: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), self.start)

    def stop_async(self, reactor: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), self.stop)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def admin_amqp_url(self) -> str:
        """Plain AMQP on 127.0.0.1, for the service itself."""
        return self.node.amqp_url

    @property
    def management_url(self) -> str:
        user = quote(self.node.admin_user, safe="")
        password = quote(self.node.admin_password, safe="")
        return f"http://{user}:{password}@{self.node.ip}:{self.node.management_port}/"

    @property
    def amqps_port(self) -> int:
        return self.node.amqps_port


def _node_state(base_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(base_dir, "node.json")) as f:
            state = json.load(f)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _stored_ports(base_dir: str) -> Optional[NodePorts]:
    ports = _node_state(base_dir).get("ports")
    try:
        return NodePorts(**ports) if isinstance(ports, dict) else None
    except TypeError:
        return None


def _free_ports(count: int) -> List[int]:
    """``count`` distinct ports free on 127.0.0.1 now, outside rabbitmqctl's range."""
    held: List[socket.socket] = []
    ports: List[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in ports and not 35672 <= port <= 35682:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def leftover_processes(base_dir: str) -> List[Any]:
    """Live processes of the node kept in ``base_dir`` (after a stop there are none)."""
    name = _node_state(base_dir).get("name")
    return node_processes(name) if isinstance(name, str) and name else []
