"""Real-time task states, cancel and remote stop, end to end: our SDK (and the real
funcX 1.0.13 SDK's ``stop_endpoint``) -> private service -> RabbitMQ -> endpoint
daemon -> manager -> workers; all real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from typing import Any, Dict, Optional

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.endpoint.layout import EndpointDir
from tests.support import CLIEndpoint, replacing, run_cli, wait_for


def sleeper(seconds):
    # Runs on the endpoint, sent as source: its imports are its own.
    from time import sleep as pause

    pause(seconds)
    return seconds


def add(a, b=10):
    return a + b


def controlled_endpoint(config_dir: str, name: str) -> CLIEndpoint:
    """A configured, running endpoint daemon (2 workers) and SDK clients of its user."""
    endpoint = CLIEndpoint(config_dir, name)
    endpoint.configure(replacing({'max_workers_per_node=float("inf"),': "max_workers_per_node=2,"}))
    started = endpoint.start()
    assert started.returncode == 0, started.stdout + started.stderr
    endpoint.wait_online()
    return endpoint


class StatesAndCancelTests(SynchronousTestCase):
    """One endpoint for the module's tests: states seen live, cancels of each kind."""

    endpoint: Optional[CLIEndpoint] = None

    def setUp(self) -> None:
        if StatesAndCancelTests.endpoint is None:
            StatesAndCancelTests.endpoint = controlled_endpoint(
                os.path.abspath(self.mktemp()), "ctl"
            )
            import atexit

            atexit.register(StatesAndCancelTests.endpoint.stop)
        self.endpoint = StatesAndCancelTests.endpoint
        self.client = self.endpoint.client()
        self.addCleanup(self.client.close)
        self.eid = self.endpoint.endpoint_id
        self.sleeper = self.client.register_function(sleeper)

    def run_sleeper(self, seconds: float) -> str:
        task_id: str = self.client.run(seconds, endpoint_id=self.eid, function_id=self.sleeper)
        return task_id

    def status(self, task_id: str) -> str:
        status: str = self.client.fetch_task_records([task_id])[task_id]["status"]
        return status

    def wait_running(self, task_id: str) -> None:
        self.assertTrue(
            wait_for(lambda: self.status(task_id) == "running", 60, 0.05), self.status(task_id)
        )

    def assert_cancelled(self, task_id: str) -> None:
        from funcx_endpoint.sdk import TaskCancelled

        with self.assertRaises(TaskCancelled) as cm:
            self.client.get_result(task_id)
        self.assertEqual(cm.exception.error_code, "TaskCancelled")
        self.assertEqual(self.client.get_task(task_id)["status"], "cancelled")

    def test_running_seen_then_cancelled(self) -> None:
        """A 60 s task is shown running within seconds; cancelled, its worker is
        killed (the endpoint says so) and the next task runs."""
        task_id = self.run_sleeper(60)
        self.wait_running(task_id)
        self.assertTrue(self.client.cancel(task_id))
        self.assert_cancelled(task_id)
        self.assertTrue(
            wait_for(lambda: f"Task {task_id} cancelled at" in self.endpoint.log(), 30),
            self.endpoint.log()[-3000:],
        )
        fid = self.client.register_function(add)
        other = self.client.run(1, endpoint_id=self.eid, function_id=fid)
        self.assertTrue(wait_for(lambda: not self.client.get_task(other)["pending"], 60))
        self.assertEqual(self.client.get_result(other), 11)

    def test_queued_task_dropped(self) -> None:
        """With both workers busy a third task waits; cancelled, it never runs."""
        busy = [self.run_sleeper(60) for _ in range(2)]
        for task_id in busy:
            self.wait_running(task_id)
        queued = self.run_sleeper(0.5)
        self.assertTrue(wait_for(lambda: self.status(queued) != "waiting-for-ep", 30))
        self.assertTrue(self.client.cancel_batch([queued])[queued])
        self.assert_cancelled(queued)
        self.assertTrue(
            wait_for(lambda: f"Task {queued} cancelled" in self.endpoint.log(), 30),
            self.endpoint.log()[-3000:],
        )
        self.assertEqual(self.client.cancel_batch(busy), {t: True for t in busy})
        for task_id in busy:
            self.assert_cancelled(task_id)

    def test_cancel_after_the_result_changes_nothing(self) -> None:
        task_id = self.run_sleeper(0)
        self.assertTrue(wait_for(lambda: not self.client.get_task(task_id)["pending"], 60))
        self.assertFalse(self.client.cancel(task_id))
        self.assertEqual(self.client.get_result(task_id), 0)

    def test_executor_future(self) -> None:
        """FuncXExecutor: running() once the task runs; cancel() ends it."""
        from funcx_endpoint.sdk import FuncXExecutor

        with FuncXExecutor(self.eid, funcx_client=self.client, poll_interval=0.05) as fx:
            future = fx.submit(sleeper, 60)
            quick = fx.submit(sleeper, 0)
            self.assertEqual(quick.result(timeout=60), 0)
            self.assertTrue(wait_for(future.running, 60))
            self.assertTrue(future.cancel())
            self.assertTrue(future.cancelled())
            task_id = future.task_id
        assert task_id is not None
        self.assertEqual(self.client.get_task(task_id)["status"], "cancelled")


REAL_STOP = textwrap.dedent(
    """
    import json, sys
    from funcx import FuncXClient
    cfg = json.loads(sys.argv[1])
    fxc = FuncXClient(funcx_service_address=cfg["base_url"])
    print(json.dumps(fxc.stop_endpoint(cfg["endpoint_id"]).data))
    """
)


class RemoteStopTests(SynchronousTestCase):
    """stop_endpoint (the real funcX 1.0.13 SDK's) and `stop --remote`: the daemon
    drains and exits, and stays refused until its owner starts it."""

    timeout = 900

    def wait_exit(self, ep: EndpointDir, pid: int) -> None:
        import psutil

        def gone() -> bool:
            return not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"

        self.assertTrue(wait_for(gone, 60, 0.1), f"daemon {pid} still runs")
        self.assertTrue(wait_for(lambda: ep.read_pid() is None, 10))

    def real_sdk_stop(self, endpoint: CLIEndpoint) -> Dict[str, Any]:
        from tests.test_real_funcx_sdk import _funcx_python

        python = _funcx_python()
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        script = os.path.join(home, "stop.py")
        with open(script, "w") as f:
            f.write(REAL_STOP)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FUNCX_", "GLOBUS_")) and k != "PYTHONPATH"
        }
        env.update(endpoint.service.client_env(endpoint.credentials))
        env["HOME"] = home
        config = {"base_url": endpoint.service.base_url, "endpoint_id": endpoint.endpoint_id}
        done = subprocess.run(
            [python, script, json.dumps(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=home,
        )
        if done.returncode != 0:
            self.fail(f"the real SDK failed: {done.stderr[-3000:]}")
        answer: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer

    def test_remote_stop(self) -> None:
        try:
            from tests.test_real_funcx_sdk import _funcx_python

            _funcx_python()
        except SkipTest:
            real = False
        else:
            real = True
        endpoint = controlled_endpoint(os.path.abspath(self.mktemp()), "rstop")
        self.addCleanup(endpoint.stop)
        ep = endpoint.ep

        # 1. stop_endpoint from the SDK (the real funcX 1.0.13 one when available).
        pid = ep.read_pid()
        assert pid is not None
        if real:
            answer = self.real_sdk_stop(endpoint)
        else:
            client = endpoint.client()
            self.addCleanup(client.close)
            answer = client.stop_endpoint(endpoint.endpoint_id)
        self.assertEqual(
            answer, {"endpoint_id": endpoint.endpoint_id, "locked": True, "stop_sent": True}
        )
        self.wait_exit(ep, pid)
        self.assertIn("remote stop", endpoint.log())
        # Refused while locked, however often it is started on its own (systemd) ...
        for _ in range(2):
            refused = endpoint.start("--keep-lock")
            self.assertEqual(refused.returncode, 69, refused.stdout + refused.stderr)
            self.assertIn("locked", refused.stdout + refused.stderr)
        # ... until its owner starts it: refused once more (so the owner hears of
        # the remote stop), and the lock is cleared.
        self.owner_restarts(endpoint)

        # 2. `funcx-endpoint stop --remote` (talks to the service only).
        pid = ep.read_pid()
        assert pid is not None
        stopped = run_cli(
            endpoint.config_dir, "stop", "--remote", endpoint.endpoint_id, env=endpoint.env
        )
        self.assertEqual(stopped.returncode, 0, stopped.stdout + stopped.stderr)
        self.assertIn("drains and exits", stopped.stdout)
        self.wait_exit(ep, pid)
        self.assertEqual(endpoint.start("--keep-lock").returncode, 69)
        self.owner_restarts(endpoint)

    def owner_restarts(self, endpoint: CLIEndpoint) -> None:
        first = endpoint.start()
        self.assertEqual(first.returncode, 69, first.stdout + first.stderr)
        self.assertIn("the lock is cleared", first.stdout + first.stderr)
        started = endpoint.start()
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        endpoint.wait_online()
