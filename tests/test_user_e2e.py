"""The user's view, end to end with real processes: SDK -> private service ->
broker -> endpoint daemon (local provider) -> manager -> worker, and back.

* versions: results carry the worker's environment; a task whose announced
  versions differ and that cannot be loaded is a VersionMismatch naming both
  sides (announced by an SDK-side override, and a function really pickled by
  another Python); the SDK warns once;
* ``funcx-endpoint tasks``: a running task, then the finished ones;
* ``run_in_sandbox``: each task runs in tasks_working_dir/<task id>;
* ``endpoint_setup``/``endpoint_teardown``: their output in endpoint.log; a
  failing setup stops the start with exit code 78.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.wire.serialize import Serializer
from tests.support import CLIEndpoint, replacing, run_cli, shared_running_endpoint, wait_for
from tests.test_end_to_end import wait_result
from tests.test_runtime import other_python, pickled_by

# The functions run on the endpoint (sent as source: no imports from here).


def triple(x):
    return 3 * x


def where_am_i():
    import os

    return os.getcwd()


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


SETUP = "echo setup says hello from $PWD"
TEARDOWN = "echo teardown says bye"


def user_endpoint() -> CLIEndpoint:
    """This module's endpoint daemon (2 workers, sandboxes, hooks), started once."""
    return shared_running_endpoint(
        "user",
        replacing(
            {
                "prefetch_capacity=8,": "prefetch_capacity=0,",
                'max_workers_per_node=float("inf"),': (
                    "max_workers_per_node=2, run_in_sandbox=True,"
                ),
                "endpoint_setup=None,": f"endpoint_setup={SETUP!r},",
                "endpoint_teardown=None,": f"endpoint_teardown={TEARDOWN!r},",
                "run_in_sandbox=False,": "",
            }
        ),
    )


class UserEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.endpoint = user_endpoint()
        self.client = self.endpoint.client()
        self.addCleanup(self.client.close)

    def run_function(self, function_id: str, *args: Any) -> str:
        task_id: str = self.client.run(
            *args, endpoint_id=self.endpoint.endpoint_id, function_id=function_id
        )
        return task_id

    def register_bytecode_only(self, function_code: str) -> str:
        """Register function code as given (the SDK would add its source too)."""
        answer = self.client.post(
            "functions",
            data={
                "function_name": "f",
                "function_code": function_code,
                "entry_point": "f",
                "container_uuid": None,
                "description": None,
                "public": False,
                "group": None,
            },
        )
        function_id: str = answer["function_uuid"]
        return function_id

    # -- versions ---------------------------------------------------------------

    def test_results_carry_the_worker_environment(self) -> None:
        from funcx_endpoint.wire.runtime import local_runtime

        function_id = self.client.register_function(triple)
        task_id = self.run_function(function_id, 14)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual(wait_result(self.client, task_id), 42)
        details = self.client.get_task(task_id)["details"]
        self.assertEqual(
            {k: details[k] for k in ("python_version", "dill_version")}, local_runtime()
        )
        self.assertEqual(details["host"], socket.gethostname())
        self.assertIn("Linux", details["os"])
        self.assertEqual(caught, [])  # same versions: no warning

    def test_announced_versions_differ(self) -> None:
        """An SDK announcing another Python: a function with only its bytecode is a
        VersionMismatch naming both sides; one with its source runs, and the SDK
        warns once that the worker's environment differs."""
        from funcx_endpoint.sdk import EnvironmentMismatchWarning, TaskExecutionFailed
        from funcx_endpoint.wire.runtime import local_runtime

        self.client.user_runtime = {"python_version": "3.7.16", "dill_version": "0.3.5.1"}
        seen = warnings.catch_warnings(record=True)
        caught_warnings = seen.__enter__()
        self.addCleanup(seen.__exit__, None, None, None)
        warnings.simplefilter("always")
        bytecode = self.register_bytecode_only(
            Serializer(code_methods=("01",)).pack_function(triple)
        )
        refused = self.run_function(bytecode, 1)
        with self.assertRaises(TaskExecutionFailed) as caught:
            wait_result(self.client, refused)
        self.assertEqual(caught.exception.error_code, "VersionMismatch")
        self.assertIn("Python 3.7.16 with dill 0.3.5.1", str(caught.exception))
        self.assertIn(
            f"this worker runs Python {local_runtime()['python_version']}", str(caught.exception)
        )

        source = self.client.register_function(triple)
        tasks = [self.run_function(source, n) for n in (1, 2)]
        self.assertEqual([wait_result(self.client, t) for t in tasks], [3, 6])
        # One warning for the three results from another environment.
        mismatches = [w for w in caught_warnings if w.category is EnvironmentMismatchWarning]
        self.assertEqual(len(mismatches), 1, [str(w.message) for w in caught_warnings])
        self.assertIn("this client Python 3.7.16", str(mismatches[0].message))

    def test_function_pickled_by_another_python(self) -> None:
        """What an SDK on another Python sends (its bytecode, its true versions):
        VersionMismatch before anything runs, never a WorkerLost."""
        from funcx_endpoint.sdk import TaskExecutionFailed

        pickled = pickled_by(other_python(), "def f(x):\n    return 3 * x", "f")
        self.client.user_runtime = {k: pickled[k] for k in ("python_version", "dill_version")}
        function_id = self.register_bytecode_only(pickled["function_code"])
        with self.assertRaises(TaskExecutionFailed) as caught, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the SDK's warning: another test's subject
            wait_result(self.client, self.run_function(function_id, 1))
        self.assertEqual(caught.exception.error_code, "VersionMismatch")
        self.assertIn(f"Python {pickled['python_version']}", str(caught.exception))

    # -- tasks ------------------------------------------------------------------

    def tasks(self, *args: str) -> Dict[str, Any]:
        out = run_cli(
            self.endpoint.config_dir,
            "tasks",
            self.endpoint.name,
            "--json",
            *args,
            env=self.endpoint.env,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        listing: Dict[str, Any] = json.loads(out.stdout)
        return listing

    def test_tasks_command(self) -> None:
        function_id = self.client.register_function(nap)
        slow = self.run_function(function_id, 8)
        listed: Dict[str, Any] = {}

        def seen_running() -> bool:
            listed.update(self.tasks())
            return any(t["task_id"] == slow and t["state"] == "sent" for t in listed["tasks"])

        self.assertTrue(wait_for(seen_running, 30, 0.5), (listed, self.client.get_task(slow)))
        [held] = [t for t in listed["tasks"] if t["task_id"] == slow]
        self.assertTrue(held["manager"])
        self.assertEqual(held["attempts"], 1)
        self.assertGreaterEqual(held["age"], 0)
        self.assertEqual(wait_result(self.client, slow, 60), 8)
        self.assertTrue(
            wait_for(
                lambda: any(
                    t["task_id"] == slow and t["outcome"] == "success"
                    for t in self.tasks("-n", "50")["finished"]
                ),
                10,
                0.5,
            )
        )
        text = run_cli(
            self.endpoint.config_dir, "tasks", self.endpoint.name, env=self.endpoint.env
        ).stdout
        self.assertIn("Tasks held:", text)
        self.assertIn(slow, text)

    # -- sandboxes and hooks ------------------------------------------------------

    def test_each_task_in_its_sandbox(self) -> None:
        function_id = self.client.register_function(where_am_i)
        tasks = [self.run_function(function_id) for _ in range(2)]
        root = os.path.join(self.endpoint.ep.path, "tasks_working_dir")
        for task_id in tasks:
            self.assertEqual(wait_result(self.client, task_id), os.path.join(root, task_id))

    def test_setup_output_in_the_log(self) -> None:
        with open(os.path.join(self.endpoint.ep.path, "endpoint.log")) as f:
            log = f.read()
        self.assertIn(f"endpoint_setup: setup says hello from {self.endpoint.ep.path}", log)


class HookStartStopTests(SynchronousTestCase):
    """Daemons of their own: a failing setup, and a teardown at stop."""

    def configured(self, name: str, edits: Dict[str, str]) -> CLIEndpoint:
        endpoint = CLIEndpoint(tempfile.mkdtemp(prefix="funcx-hooks-e2e-"), name)
        endpoint.configure(replacing(edits))
        return endpoint

    def test_failing_setup_is_a_start_error(self) -> None:
        endpoint = self.configured(
            "badsetup",
            {"endpoint_setup=None,": "endpoint_setup='echo no such module >&2; exit 4',"},
        )
        ep = endpoint.ep
        started = endpoint.start()
        self.assertEqual(started.returncode, 78, started.stdout + started.stderr)
        self.assertIn("endpoint_setup exited with code 4", started.stdout + started.stderr)
        self.assertIn("no such module", started.stdout + started.stderr)
        self.assertIsNone(ep.endpoint_id())  # never registered

    def test_teardown_after_stop(self) -> None:
        endpoint = self.configured(
            "teardown", {"endpoint_teardown=None,": f"endpoint_teardown={TEARDOWN!r},"}
        )
        ep = endpoint.ep
        started = endpoint.start()
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        stopped = endpoint.stop()
        self.assertEqual(stopped.returncode, 0, stopped.stdout + stopped.stderr)
        with open(os.path.join(ep.path, "endpoint.log")) as f:
            log = f.read()
        self.assertIn("endpoint_teardown: teardown says bye", log)
        # After everything else stopped (the control socket was the part after it).
        self.assertLess(
            log.index("control.sock Closed"), log.index("endpoint_teardown: teardown says bye")
        )
