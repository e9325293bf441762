"""Is the service whole: ``GET /v2/health``, the broker probe, and ``funcx-service
status`` while its embedded broker is killed with ``kill -9`` and restarted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, Optional

import requests
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.rabbitmq.service import NodeState, NodeStatus
from funcx_endpoint.webservice.embedded_broker import leftover_processes
from funcx_endpoint.webservice.health import HealthAPI, probe_amqp
from funcx_endpoint.webservice.settings import DEFAULT_FUNCX_SCOPE
from tests.support import child_env


class _Broker:
    connected = True


class _Node:
    def __init__(self, state: NodeState, restarts: int = 0, last_exit: Optional[str] = None):
        self._status = NodeStatus(state, "n@localhost", restarts, last_exit, "boom", 1, 2, 5.0)

    def status(self) -> NodeStatus:
        return self._status


class HealthReportTests(SynchronousTestCase):
    def test_external_broker_connected(self) -> None:
        ok, body = HealthAPI(_Broker(), None).report()
        self.assertEqual((ok, body), (True, {"status": "ok", "broker": {"connected": True}}))

    def test_connection_lost(self) -> None:
        broker = _Broker()
        broker.connected = False
        ok, body = HealthAPI(broker, None).report()
        self.assertEqual((ok, body["status"]), (False, "degraded"))

    def test_embedded_node_restarting(self) -> None:
        node: Any = _Node(NodeState.RESTARTING, 2, "died (killed by signal 9)")
        ok, body = HealthAPI(_Broker(), node).report()
        self.assertFalse(ok)
        self.assertEqual(
            body["broker"]["embedded"],
            {
                "state": "restarting",
                "restarts": 2,
                "last_exit": "died (killed by signal 9)",
                "since": 5.0,
            },
        )
        # What a start failed with (log tails, paths) is for the log, not for anyone asking.
        self.assertNotIn("boom", json.dumps(body))

    def test_embedded_node_running(self) -> None:
        node: Any = _Node(NodeState.RUNNING, 1, "died (killed by signal 9)")
        ok, body = HealthAPI(_Broker(), node).report()
        self.assertEqual((ok, body["broker"]["embedded"]["restarts"]), (True, 1))


class ProbeTests(SynchronousTestCase):
    def test_real_broker(self) -> None:
        from funcx_endpoint.testing.rabbitmq import shared_node

        node = shared_node()
        self.assertIsNone(probe_amqp("127.0.0.1", node.amqp_port))
        self.assertIsNone(probe_amqp("localhost", node.amqps_port, True, node.ca_cert_path))

    def test_nothing_listening(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        problem = probe_amqp("127.0.0.1", port, timeout=2)
        assert problem is not None
        self.assertIn(f"cannot reach the broker at 127.0.0.1:{port}", problem)

    def test_not_a_broker(self) -> None:
        import threading

        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.addCleanup(server.close)

        def answer() -> None:
            conn, _ = server.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        problem = probe_amqp("127.0.0.1", server.getsockname()[1], timeout=5)
        thread.join(5)
        assert problem is not None
        self.assertIn("did not greet as an AMQP 0-9-1 broker", problem)


def funcx_service(state_dir: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "funcx_endpoint.webservice", "--state-dir", state_dir, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env({"FUNCX_SERVICE_STATE_DIR": "/nonexistent/not-used"}),
    )


class EmbeddedBrokerKillTests(SynchronousTestCase):
    """A real service with its embedded broker: ``kill -9`` of the broker's VM is
    reported by ``status`` (exit 2) until the node is back, then all is well again
    (exit 0, the restart counted) and the API provisions endpoints on it."""

    def test_kill_9_of_the_broker(self) -> None:
        state_dir = os.path.abspath(self.mktemp())
        started = funcx_service(state_dir, "start")
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.addCleanup(funcx_service, state_dir, "stop")
        status = funcx_service(state_dir, "status", "--json")
        self.assertEqual(status.returncode, 0, status.stdout + status.stderr)
        report: Dict[str, Any] = json.loads(status.stdout)
        self.assertIsNone(report["broker_problem"])

        [beam] = [
            p
            for p in leftover_processes(os.path.join(state_dir, "rabbitmq"))
            if p.name() == "beam.smp"
        ]
        os.kill(beam.pid, signal.SIGKILL)
        time.sleep(1.0)
        status = funcx_service(state_dir, "status")
        self.assertEqual(status.returncode, 2, status.stdout + status.stderr)
        self.assertIn("broker up:              NO", status.stdout)
        self.assertIn("killed by signal 9", status.stdout)

        deadline = time.monotonic() + 120
        while True:
            status = funcx_service(state_dir, "status", "--json")
            if status.returncode == 0:
                break
            self.assertEqual(status.returncode, 2, status.stdout + status.stderr)
            self.assertLess(time.monotonic(), deadline, status.stdout)
            time.sleep(1.0)
        report = json.loads(status.stdout)
        node = report["health"]["broker"]["embedded"]
        self.assertEqual((node["state"], node["restarts"]), ("running", 1))
        self.assertEqual(node["last_exit"], "died (killed by signal 9)")
        with open(report["log_file"]) as f:
            self.assertIn("died (killed by signal 9); restarting it (restart 1)", f.read())

        # The restarted broker serves: an endpoint is provisioned on it.
        created = funcx_service(state_dir, "create-client", "after-kill")
        env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in created.stdout.splitlines()
            if "=" in line
        )
        session = requests.Session()
        session.trust_env = False
        session.verify = report["ca_file"]
        token = session.post(
            report["root_url"] + "/v2/oauth2/token",
            auth=(env["FUNCX_SDK_CLIENT_ID"], env["FUNCX_SDK_CLIENT_SECRET"]),
            data={"grant_type": "client_credentials", "scope": DEFAULT_FUNCX_SCOPE},
            timeout=30,
        ).json()["access_token"]
        answer = session.post(
            report["base_url"] + "/endpoints",
            json={"endpoint_name": "e", "endpoint_uuid": None, "metadata": {}},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        self.assertEqual(answer.status_code, 200, answer.text)
        self.assertIn("task_queue_info", answer.json())
