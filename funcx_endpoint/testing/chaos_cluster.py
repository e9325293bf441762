"""The chaos suite's stack in the cluster topology: three broker nodes, two services.

:class:`ClusterChaosStack` is :class:`~funcx_endpoint.testing.chaos_stack.ChaosStack`
with, instead of one node and one service:

- a :class:`~funcx_endpoint.testing.rabbitmq_cluster.RabbitMQCluster` of three
  nodes; the services declare quorum queues (``--queue-type quorum``) and fail
  over between the nodes (``--amqp-hosts``, ``--management-hosts``);
- a PostgreSQL database (:mod:`funcx_endpoint.testing.postgres`) shared by
- two ``funcx-service`` instances (``--instance-id``), with the same TLS
  certificate;
- one address for each kind of client, as a TCP load balancer gives in a
  real deployment (``docs/deployment.rst``): a
  :class:`~funcx_endpoint.testing.proxy.PartitionableProxy` over a
  :class:`~funcx_endpoint.amqp.failover.FailoverEndpoint` in front of the
  nodes' AMQPS ports (the address endpoints are given), and another in front
  of the two instances' HTTPS ports (the address the SDK and the endpoint use).

The faults strike one part of each kind: ``broker-kill`` kills one node
(``kill -9``), leaves it down a while and starts it again (it rejoins);
``broker-restart`` restarts one node; ``service-kill`` kills one instance
and starts it again after a while, the other serving meanwhile.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Dict, List, Optional

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.threads import blockingCallFromThread

from funcx_endpoint import tls
from funcx_endpoint.amqp.failover import FailoverEndpoint
from funcx_endpoint.testing.chaos_stack import ChaosStack, _free_port
from funcx_endpoint.testing.proxy import PartitionableProxy
from funcx_endpoint.testing.rabbitmq_cluster import RabbitMQCluster
from funcx_endpoint.testing.service import ServiceProcess

__all__ = ["ClusterChaosStack", "ClusterService"]

#: Seconds a killed node or instance stays down before it is started again.
DOWN_SECONDS = 8.0


class ClusterService(ServiceProcess):
    """One instance of several: settings given whole (``settings``) at the first start."""

    def __init__(self, state_dir: str, settings: Dict[str, Any]) -> None:
        super().__init__(state_dir, database_url=settings.get("database_url"))
        self.settings = settings

    def _broker_settings(self) -> Dict[str, Any]:
        return dict(self.settings)


class ClusterChaosStack(ChaosStack):
    """Three broker nodes and two service instances; see the module docstring."""

    def __init__(self, reactor: Any, base_dir: str, **kwargs: Any) -> None:
        super().__init__(reactor, base_dir, **kwargs)
        self.cluster = RabbitMQCluster(os.path.join(self.base_dir, "rabbitmq-cluster"))
        self.services: List[ClusterService] = []
        self.http_proxy: Optional[PartitionableProxy] = None
        self._rng = random.Random(7)
        self.vhost = "funcx-cluster"
        self.database_url = ""

    def _listen(self, upstreams: List[Any], names: List[str]) -> tuple[PartitionableProxy, int]:
        proxy = PartitionableProxy(
            TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1"),
            FailoverEndpoint(upstreams, names),
        )

        def start() -> Any:
            proxy.startService()
            return proxy.when_listening()

        port = blockingCallFromThread(self.reactor, start)
        return proxy, int(port.getHost().port)

    def _start_backend(self) -> None:
        from funcx_endpoint.testing.postgres import shared_postgres

        self.progress("starting three RabbitMQ nodes and joining them")
        self.cluster.start()
        vhost = self.vhost
        self.cluster.make_vhost(vhost)
        self.proxy, amqp_port = self._listen(
            [
                TCP4ClientEndpoint(self.reactor, "127.0.0.1", p)
                for _, p in self.cluster.amqps_hosts()
            ],
            [f"node{i + 1}" for i in range(len(self.cluster.nodes))],
        )
        self.progress("starting PostgreSQL")
        database_url = self.database_url = shared_postgres().create_database()
        tls_files = tls.ensure_ca_and_server_cert(
            os.path.join(self.base_dir, "service-tls"), ["localhost"], ["127.0.0.1"]
        )
        ports = [_free_port(), _free_port()]
        common = {
            "database_url": database_url,
            "amqp_url": self.cluster.amqps_url(vhost),
            "amqp_hosts": ",".join(f"{h}:{p}" for h, p in self.cluster.amqps_hosts()),
            "management_url": self.cluster.management_url(),
            "management_hosts": ",".join(f"{h}:{p}" for h, p in self.cluster.management_hosts()),
            "broker_ca_file": self.cluster.ca_cert_path,
            "broker_public_url": f"amqps://localhost:{amqp_port}/{vhost}",
            "queue_type": "quorum",
            "tls_cert": tls_files.server_cert,
            "tls_key": tls_files.server_key,
            "tls_ca": tls_files.ca_cert,
        }
        for index, port in enumerate(ports):
            state_dir = os.path.join(self.base_dir, f"service{index + 1}")
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            self.progress(f"starting funcx-service instance {index + 1}")
            service = ClusterService(
                state_dir, {**common, "port": port, "instance_id": f"instance-{index + 1}"}
            )
            service.start()
            self.services.append(service)
        self.service = self.services[0]  # type: ignore[assignment]
        self.http_proxy, http_port = self._listen(
            [TCP4ClientEndpoint(self.reactor, "127.0.0.1", p) for p in ports],
            [f"instance{i + 1}" for i in range(len(ports))],
        )
        self.service_address = f"https://localhost:{http_port}/v2"
        self.service_ca = tls_files.ca_cert
        self.amqp_ca = self.cluster.ca_cert_path
        env = self.services[0].client_env(self.services[0].create_client("chaos"))
        env["FUNCX_SERVICE_ADDRESS"] = self.service_address
        env["GLOBUS_SDK_SERVICE_URL_AUTH"] = f"https://localhost:{http_port}/"
        self.env = env

    def start(self) -> None:
        super().start()
        types = self.queue_types()
        self.progress("queues: " + ", ".join(f"{q} {t}" for q, t in sorted(types.items())))

    def queue_types(self) -> Dict[str, str]:
        """The type (classic, quorum) of each queue of the services' virtual host."""
        node = next(n for n in self.cluster.nodes if n.running)
        out = node.rabbitmqctl(
            "list_queues", "-p", self.vhost, "name", "type", "--no-table-headers", "--quiet"
        )
        return dict(line.split(None, 1) for line in out.strip().splitlines() if line.strip())

    def _stop_backend(self) -> None:
        for service in self.services:
            service.stop()
        for proxy in (self.proxy, self.http_proxy):
            if proxy is not None:
                blockingCallFromThread(self.reactor, proxy.stopService)
        self.proxy = self.http_proxy = None
        self.cluster.stop()

    # -- faults --------------------------------------------------------------------------

    def finished_tasks(self) -> int:
        """Tasks with a stored result, from the shared database."""
        from funcx_endpoint.webservice import db

        connection = db.connect(db.DatabaseConfig.from_url(self.database_url))
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT COUNT(*) FROM tasks WHERE status IN ('success', 'failed')")
            return int(cursor.fetchone()[0])
        finally:
            connection.close()

    def _down_for(self, seconds: float) -> int:
        """Wait ``seconds``; how many tasks finished meanwhile."""
        before = self.finished_tasks()
        time.sleep(seconds)
        return self.finished_tasks() - before

    def _pick_node(self) -> int:
        return self._rng.randrange(len(self.cluster.nodes))

    def restart_broker(self) -> str:
        index = self._pick_node()
        node = self.cluster.nodes[index]
        node.restart(graceful=True)
        self.cluster.wait_for_members(len(self.cluster.nodes))
        return f"RabbitMQ node {index + 1} of 3 stopped (SIGTERM) and started again"

    def kill_broker(self) -> str:
        index = self._pick_node()
        pid = self.cluster.kill_node(index)
        served = self._down_for(DOWN_SECONDS)
        self.cluster.start_node(index)
        self.cluster.wait_for_members(len(self.cluster.nodes))
        return (
            f"RabbitMQ node {index + 1} of 3 (beam pid {pid}) killed with SIGKILL, "
            f"down {DOWN_SECONDS:g} s ({served} tasks finished meanwhile), "
            f"started again (rejoined)"
        )

    def close_broker_connections(self) -> str:
        count = 0
        for node in self.cluster.nodes:
            count += len(node.list_connections())
            node.close_all_connections("chaos: connections closed")
        return f"rabbitmqctl close_all_connections on 3 nodes ({count} connections)"

    def kill_service(self) -> str:
        index = self._rng.randrange(len(self.services))
        service = self.services[index]
        pid = service.pid
        service.kill()
        served = self._down_for(DOWN_SECONDS)
        service.start()
        return (
            f"funcx-service instance {index + 1} of 2 (pid {pid}) killed with SIGKILL, "
            f"down {DOWN_SECONDS:g} s ({served} tasks finished meanwhile), started again"
        )
