"""A RabbitMQ cluster of three (or more) local nodes, for tests and the chaos suite.

:class:`RabbitMQCluster` starts ``size`` :class:`~funcx_endpoint.testing.rabbitmq.RabbitMQNode`
nodes in one directory, in parallel (each boot takes about 10 s), and joins
them into one cluster (``rabbitmqctl join_cluster``):

- one epmd for all of them (Erlang nodes find each other through the epmd of
  their host, on the port ``ERL_EPMD_PORT`` names), started here and watched
  by a watchdog, so that killing a node does not kill the others' epmd;
- the same Erlang cookie (``home/.erlang.cookie`` of every node);
- the same CA and server certificate (``localhost``/``127.0.0.1``), so one CA
  file verifies every node, and a TCP proxy in front of them all;
- distinct node names and ports.

A node killed (:meth:`kill_node`) and started again (:meth:`start_node`) with
its data directory rejoins the cluster by itself.  Blocking, like
:class:`RabbitMQNode`; from a reactor, call it in a thread.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, List, Optional, Tuple
from urllib.parse import quote

from funcx_endpoint import tls
from funcx_endpoint.rabbitmq.node import HOSTNAME, LISTEN_IP, NodePorts, free_ports
from funcx_endpoint.testing.rabbitmq import RabbitMQNode
from funcx_endpoint.testing.watchdog import Watchdog

__all__ = ["RabbitMQCluster"]

# Run by the watchdog once the owner is gone: kill the cluster's epmd (argv[1]).
_KILL_EPMD = r"""
try:
    os.kill(int(sys.argv[1]), signal.SIGKILL)
except OSError:
    pass
"""


class RabbitMQCluster:
    """``size`` clustered nodes in ``base_dir`` (default: a temporary directory)."""

    def __init__(self, base_dir: Optional[str] = None, size: int = 3) -> None:
        self._owns_dir = base_dir is None
        self.base_dir = os.path.abspath(base_dir or tempfile.mkdtemp(prefix="funcx-cluster-"))
        self.size = size
        self.nodes: List[RabbitMQNode] = []
        self._epmd: Optional[subprocess.Popen[bytes]] = None
        self._watchdog: Optional[Watchdog] = None
        self.epmd_port = 0

    # -- where ------------------------------------------------------------------

    @property
    def first(self) -> RabbitMQNode:
        return self.nodes[0]

    @property
    def ca_cert_path(self) -> str:
        return os.path.join(self.base_dir, "tls", "ca.pem")

    @property
    def admin_user(self) -> str:
        return self.first.admin_user

    @property
    def admin_password(self) -> str:
        return self.first.admin_password

    def amqps_hosts(self) -> List[Tuple[str, int]]:
        return [(HOSTNAME, node.amqps_port) for node in self.nodes]

    def management_hosts(self) -> List[Tuple[str, int]]:
        return [(HOSTNAME, node.management_port) for node in self.nodes]

    def amqps_url(self, vhost: str = "/") -> str:
        """The administrator's URL of the first node, for ``vhost``."""
        user, password = quote(self.admin_user, safe=""), quote(self.admin_password, safe="")
        return (
            f"amqps://{user}:{password}@{HOSTNAME}:{self.first.amqps_port}/{quote(vhost, safe='')}"
        )

    def management_url(self) -> str:
        user, password = quote(self.admin_user, safe=""), quote(self.admin_password, safe="")
        return f"http://{user}:{password}@{HOSTNAME}:{self.first.management_port}/"

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the nodes (in parallel) and join them into one cluster."""
        os.makedirs(self.base_dir, mode=0o700, exist_ok=True)
        tls_dir = os.path.join(self.base_dir, "tls")
        tls.ensure_ca_and_server_cert(tls_dir, [HOSTNAME], [LISTEN_IP])
        self._start_epmd()
        cookie = secrets.token_hex(20).encode()
        for index in range(self.size):
            node_dir = os.path.join(self.base_dir, f"node{index + 1}")
            home = os.path.join(node_dir, "home")
            os.makedirs(home, mode=0o700, exist_ok=True)
            cookie_file = os.path.join(home, ".erlang.cookie")
            if not os.path.exists(cookie_file):
                tls.write_private_file(cookie_file, cookie)
                os.chmod(cookie_file, 0o400)
            shutil.copytree(tls_dir, os.path.join(node_dir, "tls"), dirs_exist_ok=True)
            amqp, amqps, management, dist = free_ports(4)
            self.nodes.append(
                RabbitMQNode(
                    node_dir,
                    f"funcx-c{index + 1}-{secrets.token_hex(3)}",
                    ports=NodePorts(amqp, amqps, management, dist, self.epmd_port),
                    shared_epmd=True,
                )
            )
        self._in_parallel([node.start for node in self.nodes])
        for node in self.nodes[1:]:
            node.rabbitmqctl("stop_app")
            node.rabbitmqctl("join_cluster", self.first.name)
            node.rabbitmqctl("start_app")
        self.wait_for_members(self.size)

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        for _ in range(5):
            (self.epmd_port,) = free_ports(1)
            self._epmd = subprocess.Popen(
                [epmd, "-port", str(self.epmd_port), "-address", LISTEN_IP],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._epmd.poll() is None:
                names = subprocess.run(
                    [epmd, "-port", str(self.epmd_port), "-names"],
                    capture_output=True,
                    timeout=5,
                )
                if names.returncode == 0:
                    self._watchdog = Watchdog(_KILL_EPMD, [str(self._epmd.pid)])
                    return
                time.sleep(0.05)
        raise RuntimeError("could not start an epmd for the cluster")

    @staticmethod
    def _in_parallel(calls: List[Any]) -> None:
        errors: List[BaseException] = []

        def run(call: Any) -> None:
            try:
                call()
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(call,)) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def running_members(self) -> List[str]:
        """The running nodes of the cluster, as a live node sees them."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                out = node.rabbitmqctl("eval", "rabbit_nodes:all_running().", timeout=30)
            except Exception:
                continue
            return [name.strip(" '\n[]") for name in out.strip().strip("[]").split(",") if name]
        return []

    def wait_for_members(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.running_members()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster has {self.running_members()} running, not {count} nodes"
                )
            time.sleep(0.5)

    def make_vhost(self, vhost: str) -> None:
        """Create ``vhost`` with every permission for the administrator."""
        node = self.first if self.first.running else next(n for n in self.nodes if n.running)
        node.rabbitmqctl("add_vhost", vhost)
        node.rabbitmqctl("set_permissions", "-p", vhost, self.admin_user, ".*", ".*", ".*")

    # -- faults ---------------------------------------------------------------------

    def kill_node(self, index: int) -> int:
        """``kill -9`` node ``index``'s Erlang VM (the others keep the epmd); its pid."""
        node = self.nodes[index]
        pid = node.beam_pid
        if pid is None:
            raise RuntimeError(f"node {node.name} has no running VM")
        os.kill(pid, signal.SIGKILL)
        node.stop(graceful=False)
        return pid

    def start_node(self, index: int) -> None:
        """Start node ``index`` again (it rejoins the cluster with its data)."""
        self.nodes[index].start()

    def stop(self) -> None:
        """Stop every node (at once: the data is thrown away with the directory)."""
        self._in_parallel([lambda n=node: n.stop(graceful=False) for node in self.nodes])
        if self._epmd is not None:
            self._epmd.kill()
            self._epmd.wait()
            self._epmd = None
        if self._watchdog is not None:
            self._watchdog.release(timeout=5)
            self._watchdog = None
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
