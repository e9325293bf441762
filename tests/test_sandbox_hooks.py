"""Task sandboxes (``run_in_sandbox``) in the worker, and the endpoint's shell hooks
(``endpoint_setup``/``endpoint_teardown``) with real ``/bin/sh`` processes.

The daemon with both, end to end, is in :mod:`tests.test_user_e2e`.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Dict, List

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from funcx_endpoint.config import Config, HighThroughputExecutor
from funcx_endpoint.endpoint.hooks import ShellHooks
from funcx_endpoint.lifecycle import EX_CONFIG, StartupError
from funcx_endpoint.wire import ErrorCode, PackedResult, deserialize, pack_function, pack_payload
from funcx_endpoint.wire.buffers import pack_task_buffer
from funcx_endpoint.worker.execute import SANDBOX_VARIABLE, TaskRunner


def where_am_i() -> str:
    import os

    with open("here.txt", "w") as f:
        f.write("x")
    return os.getcwd()


class SandboxTests(SynchronousTestCase):
    def run_task(self, runner: TaskRunner, task_id: str) -> Any:
        buffer = pack_task_buffer(pack_function(where_am_i), pack_payload(()))
        return PackedResult.decode(runner.run(task_id, 1, buffer)).to_result()

    def test_each_task_in_its_own_directory(self) -> None:
        root = os.path.abspath(self.mktemp())
        runner = TaskRunner()
        runner.sandbox_root = root
        before = os.getcwd()
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        for task_id in (first, second):
            result = self.run_task(runner, task_id)
            self.assertFalse(result.is_error, result.data)
            self.assertEqual(deserialize(result.data), os.path.join(root, task_id))
            self.assertTrue(os.path.exists(os.path.join(root, task_id, "here.txt")))
            self.assertEqual(os.getcwd(), before)

    def test_from_the_environment(self) -> None:
        root = os.path.abspath(self.mktemp())
        os.environ[SANDBOX_VARIABLE] = root
        self.addCleanup(os.environ.pop, SANDBOX_VARIABLE)
        self.assertEqual(TaskRunner().sandbox_root, root)

    def test_no_sandbox_by_default(self) -> None:
        self.assertIsNone(TaskRunner().sandbox_root)

    def test_sandbox_unavailable(self) -> None:
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        runner = TaskRunner()
        runner.sandbox_root = blocker
        result = self.run_task(runner, str(uuid.uuid4()))
        self.assertEqual(result.error_details.code, ErrorCode.SANDBOX_UNAVAILABLE)
        self.assertIn(blocker, result.error_details.user_message)

    def test_config(self) -> None:
        plain = HighThroughputExecutor()
        self.assertNotIn(SANDBOX_VARIABLE, plain.manager_worker_environment())
        sandboxed = HighThroughputExecutor(run_in_sandbox=True)
        self.assertEqual(
            sandboxed.manager_worker_environment()[SANDBOX_VARIABLE],
            os.path.abspath("tasks_working_dir"),
        )
        elsewhere = HighThroughputExecutor(run_in_sandbox=True, tasks_working_dir="/scratch/t")
        self.assertEqual(elsewhere.manager_worker_environment()[SANDBOX_VARIABLE], "/scratch/t")
        config = Config(endpoint_setup="module load x", endpoint_teardown="echo bye")
        self.assertEqual(
            (config.endpoint_setup, config.endpoint_teardown), ("module load x", "echo bye")
        )


class HookTests(TestCase):
    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def lines(self, hook: str) -> List[str]:
        return [e["line"] for e in self.events if e.get("hook") == hook and "line" in e]

    async def test_setup_and_teardown(self) -> None:
        hooks = ShellHooks(
            reactor, self.dir, "echo setting up; echo to stderr >&2; pwd", "echo tearing down"
        )
        hooks.startService()
        await hooks.when_ready()
        # stdout and stderr are read apart: their lines may interleave either way.
        self.assertEqual(
            sorted(self.lines("endpoint_setup")), sorted(["setting up", "to stderr", self.dir])
        )
        self.assertEqual(self.lines("endpoint_teardown"), [])
        await hooks.stopService()
        self.assertEqual(self.lines("endpoint_teardown"), ["tearing down"])

    async def test_failing_setup(self) -> None:
        hooks = ShellHooks(reactor, self.dir, "echo cannot load module; exit 3", None)
        hooks.startService()
        with self.assertRaises(StartupError) as caught:
            await hooks.when_ready()
        self.assertEqual(caught.exception.exit_code, EX_CONFIG)
        self.assertIn("exited with code 3", caught.exception.message)
        self.assertIn("cannot load module", caught.exception.message)
        # Asked again later: the same answer.
        with self.assertRaises(StartupError):
            await hooks.when_ready()
        await hooks.stopService()

    async def test_setup_too_long_is_killed(self) -> None:
        hooks = ShellHooks(reactor, self.dir, "echo waiting; exec sleep 30", None, timeout=0.5)
        hooks.startService()
        with self.assertRaises(StartupError) as caught:
            await hooks.when_ready()
        self.assertIn("was killed", caught.exception.message)
        self.assertIn("waiting", caught.exception.message)
        await hooks.stopService()

    async def test_failing_teardown_is_logged(self) -> None:
        hooks = ShellHooks(reactor, self.dir, None, "echo oops; exit 1")
        hooks.startService()
        await hooks.when_ready()
        await hooks.stopService()
        self.assertEqual(self.lines("endpoint_teardown"), ["oops"])
        self.assertTrue(
            any(e.get("how") == "exited with code 1" for e in self.events), self.events[-3:]
        )

    async def test_stopped_during_setup(self) -> None:
        """Stopping while the setup runs ends it (TERM), then tears down."""
        hooks = ShellHooks(reactor, self.dir, "echo started; exec sleep 30", "echo bye")
        hooks.startService()
        ready = hooks.when_ready()
        await deferLater(reactor, 0.3, lambda: None)
        started = reactor.seconds()
        await hooks.stopService()
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(self.lines("endpoint_teardown"), ["bye"])
        with self.assertRaises(StartupError) as caught:
            await ready
        self.assertIn("was killed", caught.exception.message)
