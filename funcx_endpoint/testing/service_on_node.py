"""A :class:`~funcx_endpoint.testing.service.ServiceProcess` on a RabbitMQ node of your own.

:class:`ServiceProcess` uses the test run's shared node
(:func:`~funcx_endpoint.testing.rabbitmq.shared_node`).  A benchmark that
starts a private :class:`~funcx_endpoint.testing.rabbitmq.RabbitMQNode`
(so that nothing else shares its broker) uses :class:`NodeServiceProcess`
instead: the same service, in a virtual host of its own on the given node.

:func:`make_vhost` creates a virtual host on a node (administrator
permissions), e.g. for another system measured on the same broker.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict
from urllib.parse import quote

from funcx_endpoint.testing.service import ServiceProcess, _make_vhost

__all__ = ["NodeServiceProcess", "make_vhost"]


def make_vhost(node: Any, vhost: str) -> None:
    """Create ``vhost`` on a running node, all permissions for its admin user."""
    _make_vhost(node, vhost)


class NodeServiceProcess(ServiceProcess):
    """A ``funcx-service`` using ``node`` (a started RabbitMQNode) as its broker."""

    def __init__(self, node: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node = node
        #: The virtual host this service uses on the node.
        self.vhost = f"funcx-service-{uuid.uuid4().hex[:12]}"

    def _broker_settings(self) -> Dict[str, Any]:
        node = self.node
        user = quote(node.admin_user, safe="")
        password = quote(node.admin_password, safe="")
        make_vhost(node, self.vhost)
        self.admin_amqp_url = node.amqps_url.rsplit("/", 1)[0] + "/" + quote(self.vhost, safe="")
        return {
            "amqp_url": self.admin_amqp_url,
            "management_url": f"http://{user}:{password}@{node.host}:{node.management_port}/",
            "broker_ca_file": node.ca_cert_path,
        }
