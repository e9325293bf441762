"""Functions run end to end: SDK -> private service -> broker -> endpoint daemon ->
manager -> workers, and back; all real processes.

One endpoint daemon (with a task timeout) is shared by the tests of this
module and stopped when the test process exits.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.endpoint.layout import EndpointDir
from tests.support import (
    CLIEndpoint,
    alive,
    configure_endpoint,
    endpoint_processes,
    replacing,
    run_cli,
    sdk_client,
    shared_running_endpoint,
    wait_for,
)

TASK_TIMEOUT = 3


def shared_endpoint() -> CLIEndpoint:
    """The module's endpoint daemon (2 workers, a task timeout), started once."""
    return shared_running_endpoint(
        "e2e",
        replacing(
            {
                "task_timeout=None,": f"task_timeout={TASK_TIMEOUT},",
                'max_workers_per_node=float("inf"),': "max_workers_per_node=2,",
            }
        ),
    )


def wait_result(client: Any, task_id: str, timeout: float = 60.0) -> Any:
    from funcx_endpoint.sdk import TaskPending

    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.get_result(task_id)
        except TaskPending:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# The functions run on the endpoint (sent as source: no imports from here).


def add(a, b=10):
    return a + b


def raises(value):
    def inner(v):
        raise ValueError(f"bad value {v}")

    return inner(value)


def shout(message):
    print(f"SHOUT {message}")
    return message.upper()


def sleeper(seconds):
    import time

    time.sleep(seconds)
    return seconds


def suicide():
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def big(n):
    return "x" * n


class EndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.endpoint = shared_endpoint()
        self.client = self.endpoint.client()
        self.addCleanup(self.client.close)
        self.eid = self.endpoint.endpoint_id

    def run_function(self, fn: Any, *args: Any, **kwargs: Any) -> str:
        fid = self.client.register_function(fn)
        return self.client.run(*args, endpoint_id=self.eid, function_id=fid, **kwargs)

    def test_result(self) -> None:
        task = self.run_function(add, 5, b=7)
        self.assertEqual(wait_result(self.client, task), 12)
        record = self.client.get_task(task)
        self.assertEqual(record["status"], "success")
        self.assertIn("completion_t", record)
        # Sent to a manager once: the service counted it from the result's transitions.
        self.assertEqual(self.client.get(f"tasks/{task}")["attempts"], 1)

    def test_exception_with_traceback(self) -> None:
        from funcx_endpoint.sdk import TaskExecutionFailed

        task = self.run_function(raises, 42)
        with self.assertRaises(TaskExecutionFailed) as cm:
            wait_result(self.client, task)
        error = cm.exception
        self.assertEqual(error.error_code, "RemoteExecutionError")
        self.assertIn("ValueError: bad value 42", error.remote_data)
        # The traceback starts at the user's frames: theirs, not the worker's.
        self.assertIn("in raises", error.remote_data)
        self.assertIn("in inner", error.remote_data)
        self.assertNotIn("funcx_endpoint/worker", error.remote_data)

    def test_print_goes_to_the_worker_log(self) -> None:
        task = self.run_function(shout, "hello e2e")
        self.assertEqual(wait_result(self.client, task), "HELLO E2E")
        managers = os.path.join(self.endpoint.ep.path, "interchange", "managers")

        def printed() -> bool:
            for root, _dirs, files in os.walk(managers):
                for name in files:
                    if name.endswith(".out"):
                        with open(os.path.join(root, name)) as f:
                            if "SHOUT hello e2e" in f.read():
                                return True
            return False

        self.assertTrue(wait_for(printed, 10))

    def test_batch_with_executor(self) -> None:
        from funcx_endpoint.sdk import FuncXExecutor

        with FuncXExecutor(self.eid, funcx_client=self.client) as executor:
            futures = [executor.submit(add, i, b=i) for i in range(300)]
            self.assertEqual([f.result(timeout=120) for f in futures], [2 * i for i in range(300)])

    def test_task_timeout(self) -> None:
        from funcx_endpoint.sdk import TaskExecutionFailed

        task = self.run_function(sleeper, 60)
        with self.assertRaises(TaskExecutionFailed) as cm:
            wait_result(self.client, task, timeout=60)
        self.assertEqual(cm.exception.error_code, "TaskTimeout")
        self.assertIn(f"{TASK_TIMEOUT}", str(cm.exception))
        # The worker was replaced: later tasks run.
        self.assertEqual(wait_result(self.client, self.run_function(add, 1)), 11)

    def test_worker_lost(self) -> None:
        from funcx_endpoint.sdk import TaskExecutionFailed

        task = self.run_function(suicide)
        with self.assertRaises(TaskExecutionFailed) as cm:
            wait_result(self.client, task)
        self.assertEqual(cm.exception.error_code, "WorkerLost")
        self.assertIn("SIGKILL", str(cm.exception))
        self.assertEqual(wait_result(self.client, self.run_function(add, 2)), 12)

    def test_result_over_the_size_limit(self) -> None:
        from funcx_endpoint.sdk import TaskExecutionFailed

        task = self.run_function(big, 11 * 1024 * 1024)
        with self.assertRaises(TaskExecutionFailed) as cm:
            wait_result(self.client, task)
        self.assertEqual(cm.exception.error_code, "MaxResultSizeExceeded")

    def test_endpoint_status_at_the_service(self) -> None:
        status = self.client.get_endpoint_status(self.eid)
        self.assertEqual(status["status"], "online")


class StopLeavesNothingTests(SynchronousTestCase):
    """A stop of an endpoint that ran tasks leaves no manager or worker behind."""

    def test_stop(self) -> None:
        from funcx_endpoint.testing.service import shared_service

        service = shared_service()
        env = service.client_env(service.create_client())
        config_dir = os.path.abspath(self.mktemp())
        self.assertEqual(
            run_cli(
                config_dir,
                "configure",
                "s",
                "--service-address",
                service.base_url,
                "--service-ca-file",
                service.ca_file,
                "--amqp-ca-file",
                service.broker_ca_file,
                env=env,
            ).returncode,
            0,
        )
        ep = EndpointDir(config_dir, "s")
        self.assertEqual(run_cli(config_dir, "start", "s", env=env).returncode, 0)
        pid = ep.read_pid()
        assert pid is not None
        self.assertTrue(
            wait_for(
                lambda: "managers: 1" in run_cli(config_dir, "status", "s", env=env).stdout, 60
            )
        )
        tree = alive(endpoint_processes(ep, pid))
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        self.assertIn("funcx_endpoint.manager", names)
        self.assertIn("funcx_endpoint.worker", names)
        stop = run_cli(config_dir, "stop", "s", env=env)
        self.assertEqual(stop.returncode, 0, stop.stderr)
        # Clean: the daemon stopped its children itself, nothing had to be killed.
        self.assertNotIn("killed", stop.stdout)
        self.assertEqual(alive(tree), [])
        self.assertEqual(alive(endpoint_processes(ep, pid)), [])


class LoginCommandTests(SynchronousTestCase):
    """whoami, logout and delete talk to the service."""

    def setUp(self) -> None:
        from funcx_endpoint.testing.service import shared_service

        self.service = shared_service()
        import uuid

        self.name = f"login-{uuid.uuid4().hex[:8]}"
        self.client_id, secret = self.service.create_client(self.name)
        self.env = self.service.client_env((self.client_id, secret))
        self.config_dir = os.path.abspath(self.mktemp())
        result = configure_endpoint(self.config_dir, "w", self.service, self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.ep = EndpointDir(self.config_dir, "w")

    def test_whoami(self) -> None:
        result = run_cli(self.config_dir, "whoami", env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(self.name, result.stdout)

    def test_whoami_wrong_secret(self) -> None:
        env = dict(self.env, FUNCX_SDK_CLIENT_SECRET="wrong")
        result = run_cli(self.config_dir, "whoami", env=env)
        self.assertEqual(result.returncode, 77)
        self.assertIn("refused the client credentials", result.stderr)
        self.assertNotIn("wrong", result.stderr)

    def test_start_saves_token_and_logout_revokes_it(self) -> None:
        started = run_cli(self.config_dir, "start", "w", env=self.env)
        self.assertEqual(started.returncode, 0, started.stderr)
        token_file = os.path.join(self.config_dir, "tokens.json")
        self.assertEqual(os.stat(token_file).st_mode & 0o777, 0o600)
        refused = run_cli(self.config_dir, "logout", env=self.env)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("endpoints are running (w)", refused.stderr)
        self.assertEqual(run_cli(self.config_dir, "stop", "w", env=self.env).returncode, 0)
        # Without the variables, the saved token still says who we are...
        bare = {k: "" for k in ("FUNCX_SDK_CLIENT_ID", "FUNCX_SDK_CLIENT_SECRET")}
        bare.update({k: v for k, v in self.env.items() if not k.startswith("FUNCX_SDK")})
        self.assertIn(self.name, run_cli(self.config_dir, "whoami", env=bare).stdout)
        import json
        import ssl
        from urllib.error import HTTPError
        from urllib.request import Request, urlopen

        with open(token_file) as f:
            token = json.load(f)["access_token"]

        def service_answer() -> int:
            request = Request(
                self.service.base_url + "/endpoints", headers={"Authorization": f"Bearer {token}"}
            )
            context = ssl.create_default_context(cafile=self.service.ca_file)
            try:
                with urlopen(request, context=context, timeout=30) as response:
                    return int(response.status)
            except HTTPError as e:
                return e.code

        self.assertEqual(service_answer(), 200)
        out = run_cli(self.config_dir, "logout", env=bare)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("Logged out.", out.stdout)
        self.assertNotIn("Warning", out.stderr)
        self.assertFalse(os.path.exists(token_file))
        # ...and after logout it does not: the service itself refuses the token.
        self.assertEqual(run_cli(self.config_dir, "whoami", env=bare).returncode, 77)
        self.assertEqual(service_answer(), 401)

    def test_delete_deregisters(self) -> None:
        from funcx_endpoint.sdk import FuncxAPIError

        self.assertEqual(run_cli(self.config_dir, "start", "w", env=self.env).returncode, 0)
        endpoint_id = self.ep.endpoint_id()
        client = sdk_client(self.env)
        self.addCleanup(client.close)
        self.assertEqual(client.get_endpoint_metadata(endpoint_id)["endpoint_id"], endpoint_id)
        result = run_cli(self.config_dir, "delete", "w", "--yes", env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"Deleted endpoint {endpoint_id} at {self.service.base_url}", result.stdout)
        self.assertFalse(os.path.exists(self.ep.path))
        with self.assertRaises(FuncxAPIError) as cm:
            client.get_endpoint_metadata(endpoint_id)
        self.assertIn(cm.exception.http_status, (404, 410))

    def test_delete_with_another_users_credentials_deletes_nothing(self) -> None:
        """The service answers 404 for another user's endpoint: not a success."""

        self.assertEqual(run_cli(self.config_dir, "start", "w", env=self.env).returncode, 0)
        self.assertEqual(run_cli(self.config_dir, "stop", "w", env=self.env).returncode, 0)
        endpoint_id = self.ep.endpoint_id()
        other_env = self.service.client_env(self.service.create_client())
        result = run_cli(self.config_dir, "delete", "w", "--yes", env=other_env)
        self.assertEqual(result.returncode, 69, result.stderr)
        self.assertIn("not found", result.stderr)
        self.assertIn("not yours", result.stderr)
        self.assertIn("nothing deleted", result.stderr)
        self.assertTrue(os.path.exists(self.ep.path))
        forced = run_cli(self.config_dir, "delete", "w", "--yes", "--force", env=other_env)
        self.assertEqual(forced.returncode, 0, forced.stderr)
        self.assertIn("not yours", forced.stderr)
        self.assertFalse(os.path.exists(self.ep.path))
        # The endpoint is still registered to its owner.
        client = sdk_client(self.env)
        self.addCleanup(client.close)
        self.assertEqual(client.get_endpoint_metadata(endpoint_id)["endpoint_id"], endpoint_id)

    def test_delete_refused_when_the_service_is_unreachable(self) -> None:
        with open(self.ep.config_file) as f:
            text = f.read()
        self.ep.write_endpoint_json({"endpoint_id": "8e7b6a31-43d3-47b6-9a4f-4b8a8a0c7d11"})
        with open(self.ep.config_file, "w") as f:
            f.write(text.replace(self.service.base_url, "https://127.0.0.1:9/v2"))
        result = run_cli(self.config_dir, "delete", "w", "--yes", env=self.env)
        self.assertEqual(result.returncode, 69)
        self.assertIn("nothing deleted", result.stderr)
        self.assertTrue(os.path.exists(self.ep.path))
        forced = run_cli(self.config_dir, "delete", "w", "--yes", "--force", env=self.env)
        self.assertEqual(forced.returncode, 0, forced.stderr)
        self.assertFalse(os.path.exists(self.ep.path))
