"""``funcx-service`` on the command line: start, status, clients, stop, with its embedded broker.

One long test, because starting and stopping the embedded RabbitMQ node
costs about 15 s each time: start as a daemon, use it with our SDK, manage
clients while it runs and while it is stopped, start again with the saved
settings (same ports), and check that a stop leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import psutil
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.sdk.client import FuncXClient
from funcx_endpoint.sdk.errors import FuncxAPIError
from funcx_endpoint.webservice.embedded_broker import leftover_processes
from funcx_endpoint.webservice.settings import ServiceSettings
from tests.support import child_env


def add(a, b=1):
    return a + b


def funcx_service(state_dir: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "funcx_endpoint.webservice", "--state-dir", state_dir, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env({"FUNCX_SERVICE_STATE_DIR": "/nonexistent/not-used"}),
    )


def credentials(output: str) -> Dict[str, str]:
    return dict(line.split("=", 1) for line in output.strip().splitlines() if "=" in line)


def processes_of(state_dir: str) -> List[psutil.Process]:
    """Live processes whose command line or environment mention ``state_dir``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid():
                continue
            text = " ".join(proc.cmdline())
            if state_dir in text:
                found.append(proc)
        except psutil.Error:
            continue
    return found


class ServiceCommandLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state_dir = os.path.abspath(self.mktemp())
        self.addCleanup(self._stop_anyway)
        self._environ = dict(os.environ)
        self.addCleanup(self._restore_environ)

    def _restore_environ(self) -> None:
        os.environ.clear()
        os.environ.update(self._environ)

    def _stop_anyway(self) -> None:
        if os.path.exists(os.path.join(self.state_dir, "funcx-service.pid")):
            funcx_service(self.state_dir, "stop", "--timeout", "20")

    def sdk(self, env: Dict[str, str], client: Optional[Dict[str, str]] = None) -> FuncXClient:
        os.environ.update(env)
        if client is not None:
            os.environ.update(client)
        return FuncXClient()

    def test_lifecycle(self) -> None:
        started = funcx_service(self.state_dir, "start", "--max-request-size", "1M")
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        out = started.stdout
        self.assertIn("Starting the embedded RabbitMQ broker", out)
        self.assertIn("funcx-service is running (pid", out)
        ca_file = os.path.join(self.state_dir, "tls", "ca.pem")
        self.assertIn(f"CA file to trust:       {ca_file}", out)
        env = dict(re.findall(r"export (\w+)=(\S+)", out))
        self.assertEqual(env["GLOBUS_SDK_VERIFY_SSL"], ca_file)
        base_url = env["FUNCX_SERVICE_ADDRESS"]
        self.assertTrue(base_url.startswith("https://localhost:") and base_url.endswith("/v2"))
        self.assertEqual(env["GLOBUS_SDK_SERVICE_URL_AUTH"], base_url[: -len("v2")])
        settings = ServiceSettings.load(self.state_dir)
        self.assertEqual(os.stat(settings.settings_file).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(self.state_dir).st_mode & 0o777, 0o700)
        pid = int(open(settings.pidfile).read())

        status = funcx_service(self.state_dir, "status")
        self.assertEqual(status.returncode, 0, status.stdout + status.stderr)
        self.assertIn("answering:              yes", status.stdout)
        again = funcx_service(self.state_dir, "start")
        self.assertEqual(again.returncode, 1)
        self.assertIn("already running", again.stderr)

        created = funcx_service(self.state_dir, "create-client", "alice")
        self.assertEqual(created.returncode, 0, created.stderr)
        alice = credentials(created.stdout)
        self.assertEqual(sorted(alice), ["FUNCX_SDK_CLIENT_ID", "FUNCX_SDK_CLIENT_SECRET"])
        self.assertIn("shown only now", created.stderr)
        # The secret is stored only as a hash.
        with open(settings.sqlite_path, "rb") as f:
            self.assertNotIn(alice["FUNCX_SDK_CLIENT_SECRET"].encode(), f.read())
        self.assertEqual(funcx_service(self.state_dir, "create-client", "alice").returncode, 1)

        fxc = self.sdk(env, alice)
        function_id = fxc.register_function(add)
        self.assertTrue(function_id)
        # --max-request-size 1M applies.
        big = "x" * (2 * 1024 * 1024)
        with self.assertRaises(FuncxAPIError) as caught:
            fxc.post(
                "functions", data={"function_name": "big", "function_code": f"{len(big)}\n{big}"}
            )
        self.assertEqual(caught.exception.http_status, 413)
        fxc.close()

        listed = funcx_service(self.state_dir, "list-clients")
        self.assertIn("alice", listed.stdout)
        self.assertIn("active", listed.stdout)
        revoked = funcx_service(self.state_dir, "revoke-client", "alice")
        self.assertEqual(revoked.returncode, 0, revoked.stderr)
        import globus_sdk

        with self.assertRaises(globus_sdk.AuthAPIError) as refused:
            self.sdk(env, alice)
        self.assertEqual(refused.exception.http_status, 401)

        node = ServiceSettings.load(self.state_dir).broker_dir
        self.assertTrue(leftover_processes(node))
        broker_url = json.loads(funcx_service(self.state_dir, "status", "--json").stdout)["broker"]
        self.assertTrue(broker_url["public_url"].startswith("amqps://localhost:"))
        stopped = funcx_service(self.state_dir, "stop")
        self.assertEqual(stopped.returncode, 0, stopped.stdout + stopped.stderr)
        self.assertIn("stopped cleanly", stopped.stdout)
        self.assertFalse(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie")
        self.assertEqual(leftover_processes(node), [])
        self.assertEqual(processes_of(self.state_dir), [])
        self.assertFalse(os.path.exists(settings.pidfile))
        self.assertEqual(funcx_service(self.state_dir, "status").returncode, 3)
        self.assertIn("not running", funcx_service(self.state_dir, "stop").stdout)

        # Clients can be managed while it is stopped.
        bob = credentials(funcx_service(self.state_dir, "create-client", "bob").stdout)
        listed = funcx_service(self.state_dir, "list-clients", "--json").stdout
        self.assertIn('"name": "bob"', listed)
        self.assertIn("revoked", listed)

        # A start with no options uses the saved settings: same URL, same broker ports.
        restarted = funcx_service(self.state_dir, "start")
        self.assertEqual(restarted.returncode, 0, restarted.stdout + restarted.stderr)
        self.assertIn(f"export FUNCX_SERVICE_ADDRESS={base_url}", restarted.stdout)
        again = json.loads(funcx_service(self.state_dir, "status", "--json").stdout)["broker"]
        self.assertEqual(again["public_url"], broker_url["public_url"])
        # The embedded broker is supervised: its Erlang VM killed, the service starts
        # it again (same ports and users) and works with it.
        [beam] = [p for p in leftover_processes(node) if p.name() == "beam.smp"]
        beam.kill()
        self.wait_for(lambda: any(p.name() == "beam.smp" for p in leftover_processes(node)))
        fxc = self.sdk(env, bob)
        endpoint_id = "5e7a1c2d-0000-4000-8000-00000000beef"
        registration = self.wait_for(
            lambda: (
                fxc.post(
                    "endpoints",
                    data={"endpoint_name": "e", "endpoint_uuid": endpoint_id, "metadata": {}},
                ).data
            )
        )
        self.assertTrue(registration["task_queue_info"]["connection_url"].startswith("amqps://"))
        self.assertIn("@localhost:", registration["task_queue_info"]["connection_url"])
        fxc.close()
        stopped = funcx_service(self.state_dir, "stop")
        self.assertEqual(stopped.returncode, 0, stopped.stdout + stopped.stderr)
        self.assertEqual(leftover_processes(node), [])
        self.assertEqual(processes_of(self.state_dir), [])

    def wait_for(self, attempt: Callable[[], Any], timeout: float = 90) -> Any:
        """The first true result of ``attempt()`` (errors count as false) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = attempt()
            except Exception as e:
                if time.monotonic() > deadline:
                    raise
                result = None
                error: Any = e
            else:
                error = result
            if result:
                return result
            if time.monotonic() > deadline:
                self.fail(f"nothing within {timeout} s; last: {error!r}")
            time.sleep(0.2)

    def test_bad_settings(self) -> None:
        result = funcx_service(self.state_dir, "start", "--tls-cert", "/nonexistent.pem")
        self.assertEqual(result.returncode, 2)
        self.assertIn("no such file", result.stderr)
        result = funcx_service(self.state_dir, "start", "--amqp-url", "http://x")
        self.assertEqual(result.returncode, 78)
        self.assertIn("amqp", result.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.state_dir, "funcx-service.pid")))

    def test_start_failure_is_reported(self) -> None:
        """A port that is taken: start fails at once (no broker is started) and says why."""
        import socket

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        started = time.monotonic()
        result = funcx_service(self.state_dir, "start", "--port", str(taken.getsockname()[1]))
        self.assertEqual(result.returncode, 69, result.stdout + result.stderr)
        self.assertIn("cannot listen", result.stderr)
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(processes_of(self.state_dir), [])
        self.assertEqual(leftover_processes(os.path.join(self.state_dir, "rabbitmq")), [])
