"""Is the service whole?  ``GET /v2/health``, and a direct look at the broker.

``GET /v2/health`` (no token needed, as load balancers and probes ask) answers
200 when the service's broker connection is up (and its embedded node runs),
503 otherwise, with what it knows::

    {"status": "ok" | "degraded",
     "broker": {"connected": true,
                "embedded": {"state": "running", "restarts": 1,
                             "last_exit": "died (killed by signal 9)", "since": ...}}}

``funcx-service status`` asks it, and also looks at the broker itself
(:func:`probe_amqp`: the AMQP greeting on the broker's port), so a broker that
is down is seen even when the service cannot say so; it then exits non-zero.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Optional, Tuple

from funcx_endpoint.rabbitmq.service import NodeState, RabbitMQNodeService
from funcx_endpoint.webservice.http import Call, Router

__all__ = ["HealthAPI", "probe_amqp"]

#: The AMQP 0-9-1 protocol header a client opens with.
_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class HealthAPI:
    """``GET /v2/health`` over the service's ``broker`` connection (anything with a
    ``connected`` flag) and its embedded ``node`` (None: an external broker)."""

    def __init__(self, broker: Any, node: Optional[RabbitMQNodeService]) -> None:
        self._broker = broker
        self._node = node

    def install(self, router: Router) -> None:
        router.add("GET", "/v2/health", self.health)

    def report(self) -> Tuple[bool, dict[str, Any]]:
        """Whether all is well, and the answer's body."""
        broker: dict[str, Any] = {"connected": bool(self._broker.connected)}
        ok = broker["connected"]
        if self._node is not None:
            status = self._node.status()
            broker["embedded"] = {
                "state": status.state.value,
                "restarts": status.restarts,
                "last_exit": status.last_exit,
                "since": status.since,
            }
            ok = ok and status.state is NodeState.RUNNING
        return ok, {"status": "ok" if ok else "degraded", "broker": broker}

    async def health(self, call: Call) -> Tuple[int, Any]:
        ok, body = self.report()
        return (200 if ok else 503), body


def probe_amqp(
    host: str, port: int, tls: bool = False, ca_file: Optional[str] = None, timeout: float = 5.0
) -> Optional[str]:
    """None if an AMQP 0-9-1 broker answers on ``host:port`` (it sends
    ``connection.start`` after the protocol header), else why not.  Blocking."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            conn: Any = raw
            if tls:
                context = ssl.create_default_context(cafile=ca_file)
                conn = context.wrap_socket(raw, server_hostname=host)
            conn.sendall(_PROTOCOL_HEADER)
            data = b""
            while len(data) < 11:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
    except (OSError, ssl.SSLError) as e:
        return f"cannot reach the broker at {host}:{port} ({e})"
    # A method frame (type 1) of class 10 (connection), method 10 (start).
    if len(data) >= 11 and data[0] == 1 and data[7:11] == b"\x00\x0a\x00\x0a":
        return None
    return f"{host}:{port} did not greet as an AMQP 0-9-1 broker (got {data[:16]!r})"


def broker_problem(settings: Any, health: Optional[dict[str, Any]]) -> Optional[str]:
    """None if the broker of the service with ``settings`` answers and the service
    (its ``GET /v2/health`` answer ``health``, if it gave one) is connected to it;
    else what is wrong.  Blocking (``funcx-service status``)."""
    from funcx_endpoint.amqp.connection import AMQPURL
    from funcx_endpoint.rabbitmq.node import LISTEN_IP, NodeDirectory

    if settings.embedded_broker:
        identity = NodeDirectory(settings.broker_dir).load_identity()
        if identity is None:
            return f"the embedded broker has no node in {settings.broker_dir}"
        problem = probe_amqp(LISTEN_IP, identity.ports.amqp)
    else:
        url = AMQPURL.parse(settings.amqp_url)
        problem = probe_amqp(url.host, url.port, url.tls, settings.broker_ca_file)
    broker = (health or {}).get("broker") or {}
    node = broker.get("embedded") or {}
    if node and node.get("state") != NodeState.RUNNING.value:
        why = f"; it last {node['last_exit']}" if node.get("last_exit") else ""
        return (
            f"the embedded broker is {node.get('state')} (restarts so far: "
            f"{node.get('restarts')}){why}"
        )
    if problem is not None:
        return problem
    if health is not None and not broker.get("connected"):
        return "the broker answers, but the service is not connected to it (yet)"
    return None
