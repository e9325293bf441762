"""Tests for funcx_endpoint.executor.blocks: the BlockScaler, on a Clock.

The fakes here (:class:`FakeProvider`, :class:`FakeLoadSource`) are also
used by ``tests.test_strategy``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from funcx_endpoint.executor.blocks import BlockScaler
from funcx_endpoint.executor.interface import ILoadSource, ManagerInfo
from funcx_endpoint.executor.providers import (
    IAsyncProvider,
    IExecutionProvider,
    INonBlockingProvider,
    JobState,
    JobStatus,
    ProviderAdapter,
)


def _make_dir(test: Any) -> str:
    """A new empty directory under trial's temporary directory."""
    path = test.mktemp()
    os.makedirs(path)
    return os.path.abspath(path)


@implementer(INonBlockingProvider)
class FakeProvider(Service):
    """A non-blocking provider whose jobs' states the test sets.

    New jobs are PENDING.  ``submit_result`` (a Deferred) makes submissions
    wait; ``submit_error``/``cancel_error``/``status_error`` make the calls raise.
    """

    label = "fake"

    def __init__(
        self,
        init_blocks: int = 0,
        min_blocks: int = 0,
        max_blocks: int = 10,
        nodes_per_block: int = 1,
        parallelism: float = 1.0,
        status_polling_interval: float = 1.0,
    ) -> None:
        self.init_blocks = init_blocks
        self.min_blocks = min_blocks
        self.max_blocks = max_blocks
        self.nodes_per_block = nodes_per_block
        self.parallelism = parallelism
        self.status_polling_interval = status_polling_interval
        self.resources: Dict[str, JobStatus] = {}
        self.submitted: List[Tuple[str, int, str]] = []
        self.cancelled: List[str] = []
        self.status_calls = 0
        self.submit_error: Optional[Exception] = None
        self.cancel_error: Optional[Exception] = None
        self.status_error: Optional[Exception] = None
        self.submit_result: Optional[Deferred[None]] = None
        self.stopped = False

    def submit(self, command: str, tasks_per_node: int, job_name: str = "parsl.auto") -> Any:
        if self.submit_error is not None:
            raise self.submit_error
        job_id = f"job-{len(self.submitted)}"
        self.submitted.append((command, tasks_per_node, job_name))
        self.resources[job_id] = JobStatus(JobState.PENDING)
        if self.submit_result is not None:
            return self.submit_result.addCallback(lambda _: job_id)
        return job_id

    def status(self, job_ids: Sequence[Any]) -> List[JobStatus]:
        self.status_calls += 1
        if self.status_error is not None:
            raise self.status_error
        return [self.resources.get(j, JobStatus(JobState.MISSING)) for j in job_ids]

    def cancel(self, job_ids: Sequence[Any]) -> List[bool]:
        if self.cancel_error is not None:
            raise self.cancel_error
        result = []
        for job_id in job_ids:
            status = self.resources.get(job_id)
            if status is None or status.terminal:
                result.append(False)
            else:
                self.cancelled.append(job_id)
                self.resources[job_id] = JobStatus(JobState.CANCELLED)
                result.append(True)
        return result

    def set_state(self, job_id: str, state: JobState, **kwargs: Any) -> None:
        self.resources[job_id] = JobStatus(state, **kwargs)

    def set_all(self, state: JobState, **kwargs: Any) -> None:
        for job_id, status in self.resources.items():
            if not status.terminal:
                self.set_state(job_id, state, **kwargs)

    def active_jobs(self) -> List[str]:
        return [j for j, s in self.resources.items() if not s.terminal]

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopped = True
        return succeed(None)


@implementer(ILoadSource)
class FakeLoadSource:
    """Outstanding tasks and connected managers, as the test sets them."""

    def __init__(self) -> None:
        self.tasks = 0
        self._managers: Dict[str, ManagerInfo] = {}
        self.retired: List[Tuple[str, str]] = []  # (block_id, reason)
        self.retire_refused: List[str] = []
        self.failed: List[Tuple[str, str, int]] = []  # fail_waiting calls: code, message, count
        self.gone: Dict[str, int] = {}  # managers disconnected, by block
        self.drained: Dict[str, str] = {}  # drain_block calls: block id, why

    def outstanding_tasks(self) -> int:
        return self.tasks

    def managers(self) -> List[ManagerInfo]:
        return list(self._managers.values())

    def retire_block(self, block_id: str, reason: str, only_idle: bool) -> bool:
        mine = [m for m in self._managers.values() if m.block_id == block_id]
        if only_idle and any(m.active_tasks or m.idle_since is None for m in mine):
            self.retire_refused.append(block_id)
            return False
        self.retired.append((block_id, reason))
        return True

    def drain_block(self, block_id: str, why: str) -> bool:
        if block_id in self.drained:
            return False
        self.drained[block_id] = why
        return True

    def departures(self) -> Dict[str, int]:
        return dict(self.gone)

    def fail_waiting(self, code: str, message: str) -> int:
        failed, self.tasks = self.tasks, 0
        self.failed.append((code, message, failed))
        return failed

    def connect(
        self,
        block_id: str,
        workers: int = 4,
        idle_since: Optional[float] = 0.0,
        active_tasks: int = 0,
        manager_id: Optional[str] = None,
        registered_at: float = 0.0,
        tasks_completed: int = 0,
    ) -> ManagerInfo:
        manager_id = manager_id or f"m-{block_id}-{len(self._managers)}"
        info = ManagerInfo(
            manager_id=manager_id,
            block_id=block_id,
            hostname="localhost",
            worker_count=workers,
            idle_workers=workers if idle_since is not None else 0,
            active_tasks=active_tasks,
            registered_at=registered_at,
            idle_since=idle_since,
            tasks_completed=tasks_completed,
        )
        self._managers[manager_id] = info
        return info

    def update(self, manager_id: str, **changes: Any) -> None:
        self._managers[manager_id] = attr.evolve(self._managers[manager_id], **changes)

    def busy(self, block_id: str, tasks: int = 1) -> None:
        for info in list(self._managers.values()):
            if info.block_id == block_id:
                self.update(info.manager_id, idle_since=None, active_tasks=tasks, idle_workers=0)

    def idle(self, block_id: str, since: float) -> None:
        for info in list(self._managers.values()):
            if info.block_id == block_id:
                self.update(info.manager_id, idle_since=since, active_tasks=0)

    def disconnect_block(self, block_id: str) -> None:
        for manager_id, info in list(self._managers.items()):
            if info.block_id == block_id:
                del self._managers[manager_id]
                self.gone[block_id] = self.gone.get(block_id, 0) + 1


@implementer(ILogObserver)
class LogCollector:
    """Collects twisted.logger events; formats them for assertions."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        self.events.append(event)

    def logger(self) -> Logger:
        return Logger(namespace="test", observer=self)

    def texts(self, level: Optional[str] = None) -> List[str]:
        return [
            formatEvent(e) for e in self.events if level is None or e["log_level"].name == level
        ]


TEMPLATE = "funcx-manager --info-file /x/manager.json --block-id {block_id}"


class FakesTests(SynchronousTestCase):
    def test_fakes_implement_interfaces(self) -> None:
        provider = FakeProvider()
        self.assertTrue(verifyObject(INonBlockingProvider, provider))
        self.assertTrue(verifyObject(IExecutionProvider, provider))
        self.assertTrue(verifyObject(ILoadSource, FakeLoadSource()))
        self.assertTrue(verifyObject(IAsyncProvider, ProviderAdapter(provider, Clock())))


class BlockScalerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(status_polling_interval=2.0)
        self.adapter = ProviderAdapter(self.provider, self.clock)
        self.load = FakeLoadSource()
        self.logs = LogCollector()
        self.scaler = BlockScaler(self.adapter, self.load, self.clock, TEMPLATE)
        self.scaler.log = self.logs.logger()
        self.scaler.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.scaler.running:
            self.successResultOf(self.scaler.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def states(self) -> Dict[str, str]:
        return {b.block_id: b.state.name for b in self.scaler.blocks()}

    def test_template_needs_block_id(self) -> None:
        self.assertRaises(
            ValueError, BlockScaler, self.adapter, self.load, self.clock, "funcx-manager"
        )

    def test_starts_provider(self) -> None:
        self.assertTrue(self.provider.running)
        self.successResultOf(self.scaler.stopService())
        self.assertTrue(self.provider.stopped)

    def test_scale_out(self) -> None:
        ids = self.successResultOf(self.scaler.scale_out(2))
        self.assertEqual(ids, ["0", "1"])
        self.assertEqual(
            self.provider.submitted,
            [
                ("funcx-manager --info-file /x/manager.json --block-id 0", 1, "funcx.block-0"),
                ("funcx-manager --info-file /x/manager.json --block-id 1", 1, "funcx.block-1"),
            ],
        )
        self.assertEqual([b.job_id for b in self.scaler.active_blocks()], ["job-0", "job-1"])
        self.assertEqual(self.states(), {"0": "PENDING", "1": "PENDING"})
        self.assertEqual(self.successResultOf(self.scaler.scale_out(0)), [])
        self.assertEqual(self.successResultOf(self.scaler.scale_out(1)), ["2"])

    def test_pending_submission_counts_as_active(self) -> None:
        self.provider.submit_result = Deferred()
        scaled = self.scaler.scale_out(1)
        self.assertNoResult(scaled)
        [block] = self.scaler.active_blocks()
        self.assertIsNone(block.job_id)
        self.assertEqual(block.state, JobState.PENDING)
        self.provider.submit_result.callback(None)
        self.assertEqual(self.successResultOf(scaled), ["0"])
        self.assertEqual(block.job_id, "job-0")

    def test_polls_status_on_the_clock(self) -> None:
        self.successResultOf(self.scaler.scale_out(2))
        self.provider.set_state("job-0", JobState.RUNNING)
        self.clock.advance(1.9)
        self.assertEqual(self.provider.status_calls, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.provider.status_calls, 1)
        self.assertEqual(self.states(), {"0": "RUNNING", "1": "PENDING"})
        self.assertEqual(
            self.scaler.status_fields(),
            {
                "blocks": {
                    "provider": "fake",
                    "active": 2,
                    "states": {"RUNNING": 1, "PENDING": 1},
                    "ended": {},
                    "failed_starts_in_a_row": 0,
                }
            },
        )

    def test_no_poll_without_blocks(self) -> None:
        self.clock.advance(10)
        self.assertEqual(self.provider.status_calls, 0)

    def test_scale_in_named(self) -> None:
        self.successResultOf(self.scaler.scale_out(3))
        ids = self.successResultOf(self.scaler.scale_in(block_ids=["1", "7"]))
        self.assertEqual(ids, ["1"])
        self.assertEqual(self.provider.cancelled, ["job-1"])
        self.assertEqual([b.block_id for b in self.scaler.active_blocks()], ["0", "2"])
        self.assertEqual([b.block_id for b in self.scaler.ended_blocks()], ["1"])
        self.assertEqual(self.scaler.status_fields()["blocks"]["ended"], {"CANCELLED": 1})

    def test_scale_in_prefers_idle_blocks(self) -> None:
        self.successResultOf(self.scaler.scale_out(4))
        self.load.connect("0", idle_since=None, active_tasks=3)  # busy
        self.load.connect("1", idle_since=20.0)  # idle
        self.load.connect("2", idle_since=5.0)  # idle longest
        self.load.connect("2", idle_since=6.0)
        # block 3: no manager yet
        order = [b.block_id for b in self.scaler.choose_for_scale_in(4)]
        self.assertEqual(order, ["2", "1", "3", "0"])
        self.assertEqual(self.successResultOf(self.scaler.scale_in(2)), ["2", "1"])
        self.assertEqual(sorted(self.provider.cancelled), ["job-1", "job-2"])

    def test_scale_in_retires_managers_first(self) -> None:
        self.successResultOf(self.scaler.scale_out(3))
        self.load.connect("0", idle_since=3.0)
        self.load.connect("1", idle_since=None, active_tasks=2)  # busy since the decision
        ids = self.successResultOf(
            self.scaler.scale_in(block_ids=["0", "1", "2"], only_idle=True, reason="idle")
        )
        self.assertEqual(ids, ["0", "2"])
        self.assertEqual(self.load.retired, [("0", "idle"), ("2", "idle")])
        self.assertEqual(self.load.retire_refused, ["1"])
        self.assertEqual(sorted(self.provider.cancelled), ["job-0", "job-2"])
        self.assertEqual([b.block_id for b in self.scaler.active_blocks()], ["1"])
        self.assertTrue(any("Not stopping block 1" in t for t in self.logs.texts("info")))
        # Without only_idle (the count form), a busy block is retired and cancelled.
        self.assertEqual(self.successResultOf(self.scaler.scale_in(1)), ["1"])
        self.assertEqual(self.load.retired[-1], ("1", "scaling in"))

    def test_scale_in_a_block_mid_submission(self) -> None:
        self.provider.submit_result = Deferred()
        scaled = self.scaler.scale_out(1)
        self.assertEqual(self.successResultOf(self.scaler.scale_in(1)), ["0"])
        self.assertEqual(self.scaler.active_blocks(), [])
        self.assertEqual(self.provider.cancelled, [])
        self.provider.submit_result.callback(None)
        self.successResultOf(scaled)
        self.assertEqual(self.provider.cancelled, ["job-0"])
        self.assertEqual(self.scaler.blocks(), [])

    def test_cancel_error_is_retried(self) -> None:
        self.successResultOf(self.scaler.scale_out(1))
        self.provider.cancel_error = RuntimeError("scancel: timeout")
        self.assertEqual(self.successResultOf(self.scaler.scale_in(1)), ["0"])
        self.assertEqual(self.scaler.active_blocks(), [])
        self.assertEqual(self.states(), {"0": "PENDING"})
        self.assertEqual(self.scaler.status_fields()["blocks"]["states"], {"CANCELLING": 1})
        self.assertTrue(any("scancel: timeout" in t for t in self.logs.texts("error")))
        self.provider.cancel_error = None
        self.clock.advance(2.0)
        self.assertEqual(self.provider.cancelled, ["job-0"])
        self.assertEqual(self.scaler.blocks(), [])

    def test_cancelled_job_that_already_ended(self) -> None:
        self.successResultOf(self.scaler.scale_out(1))
        self.provider.set_state("job-0", JobState.COMPLETED, exit_code=0)
        self.successResultOf(self.scaler.scale_in(1))
        self.assertEqual(self.states(), {"0": "PENDING"})  # the next poll tells
        self.clock.advance(2.0)
        self.assertEqual(self.scaler.blocks(), [])
        [ended] = self.scaler.ended_blocks()
        self.assertEqual(ended.state, JobState.COMPLETED)
        self.assertFalse(ended.failed_start)  # we asked for its end

    def test_submit_error_is_a_failed_start(self) -> None:
        self.provider.submit_error = RuntimeError("sbatch: invalid partition")
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(self.scaler.scale_out(2)), [])
        self.assertEqual(self.scaler.blocks(), [])
        self.assertEqual(self.scaler.consecutive_failures, 2)
        self.assertEqual(self.scaler.last_failure_at, 5)
        self.assertEqual(self.scaler.status_fields()["blocks"]["ended"], {"FAILED": 2})
        self.assertTrue(any("invalid partition" in t for t in self.logs.texts("error")))

    def test_failed_block_logs_stderr_tail(self) -> None:
        stderr = os.path.join(_make_dir(self), "block.err")
        with open(stderr, "w") as f:
            f.write("x" * 5000 + "\nImportError: no module named funcx_endpoint\n")
        self.successResultOf(self.scaler.scale_out(1))
        self.clock.advance(2.0)
        self.provider.set_state(
            "job-0", JobState.FAILED, exit_code=1, message="exited with code 1", stderr_path=stderr
        )
        self.clock.advance(2.0)
        self.assertEqual(self.scaler.blocks(), [])
        self.assertEqual(self.scaler.consecutive_failures, 1)
        self.assertEqual(self.scaler.last_failure_at, 4.0)
        [text] = self.logs.texts("error")
        self.assertIn("Block 0 (job job-0) ended before any of its managers connected", text)
        self.assertIn("ImportError: no module named funcx_endpoint", text)
        self.assertLess(len(text), 2500)

    def test_early_end_after_manager_connected(self) -> None:
        self.successResultOf(self.scaler.scale_out(1))
        self.load.connect("0")
        self.clock.advance(2.0)
        self.provider.set_state("job-0", JobState.COMPLETED, exit_code=0)
        self.clock.advance(2.0)
        self.assertEqual(self.scaler.consecutive_failures, 1)
        self.assertIn("4s after its submission", self.logs.texts("error")[0])

    def test_healthy_block_end_is_not_a_failure(self) -> None:
        """A block that served, then ended (walltime, a manager's own exit), is fine."""
        self.successResultOf(self.scaler.scale_out(1))
        self.load.connect("0")
        self.clock.advance(60.0)
        self.provider.set_state("job-0", JobState.TIMEOUT)
        self.clock.advance(2.0)
        self.assertEqual(self.scaler.blocks(), [])
        self.assertEqual(self.scaler.consecutive_failures, 0)
        self.assertEqual(self.logs.texts("error"), [])
        self.assertEqual(self.scaler.status_fields()["blocks"]["ended"], {"TIMEOUT": 1})

    def test_block_serving_resets_failures(self) -> None:
        self.provider.submit_error = RuntimeError("no")
        self.successResultOf(self.scaler.scale_out(1))
        self.provider.submit_error = None
        self.successResultOf(self.scaler.scale_out(1))
        self.assertEqual(self.scaler.consecutive_failures, 1)
        self.load.connect("1", manager_id="m1")
        self.clock.advance(2.0)
        self.assertEqual(self.scaler.consecutive_failures, 1)  # connected is not enough
        self.load.update("m1", tasks_completed=1)
        self.clock.advance(2.0)
        self.assertEqual(self.scaler.consecutive_failures, 0)
        self.assertEqual(self.scaler.failed_starts, 1)
        self.assertTrue(self.scaler.block("1").healthy)  # type: ignore[union-attr]

    def test_block_staying_up_resets_failures(self) -> None:
        self.provider.submit_error = RuntimeError("no")
        self.successResultOf(self.scaler.scale_out(1))
        self.provider.submit_error = None
        self.successResultOf(self.scaler.scale_out(1))
        self.clock.advance(100.0)  # queued at the batch scheduler for a while
        self.load.connect("1", registered_at=100.0)
        self.clock.advance(58.0)
        self.assertEqual(self.scaler.consecutive_failures, 1)
        self.clock.advance(2.0)  # connected for min_healthy_lifetime
        self.assertEqual(self.scaler.consecutive_failures, 0)

    def test_manager_that_connects_then_quits_is_a_failed_start(self) -> None:
        """A manager that registers, then exits (its workers cannot start), resets nothing."""
        for attempt in range(1, 4):
            self.successResultOf(self.scaler.scale_out(1))
            block_id = str(attempt - 1)
            self.load.connect(block_id, registered_at=self.clock.seconds())
            self.clock.advance(2.0)
            self.load.disconnect_block(block_id)
            self.provider.set_state(f"job-{block_id}", JobState.FAILED, exit_code=4)
            self.clock.advance(2.0)
            self.assertEqual(self.scaler.consecutive_failures, attempt)
        self.assertEqual(self.scaler.failed_starts, 3)

    def test_end_learned_late_is_still_a_failed_start(self) -> None:
        """A provider that learns of a block's end long after its manager quit
        (slow polling) does not make a short-lived block count as healthy."""
        self.successResultOf(self.scaler.scale_out(1))
        self.load.connect("0", registered_at=self.clock.seconds())
        self.clock.advance(4.0)
        self.load.disconnect_block("0")
        self.clock.advance(76.0)  # the provider still says RUNNING
        self.provider.set_state("job-0", JobState.FAILED, exit_code=4)
        self.clock.advance(2.0)
        self.assertEqual(self.scaler.consecutive_failures, 1)
        self.assertEqual(self.scaler.failed_starts, 1)

    def test_poll_error_is_logged_and_polling_goes_on(self) -> None:

        self.successResultOf(self.scaler.scale_out(1))
        self.provider.status_error = RuntimeError("squeue failed")
        self.clock.advance(2.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 0)  # logged to our logger
        self.assertTrue(
            any("squeue failed" in repr(e.get("log_failure")) for e in self.logs.events)
        )
        self.provider.status_error = None
        self.provider.set_state("job-0", JobState.RUNNING)
        self.clock.advance(2.0)
        self.assertEqual(self.states(), {"0": "RUNNING"})

    def test_missing_job(self) -> None:
        self.successResultOf(self.scaler.scale_out(1))
        del self.provider.resources["job-0"]
        self.clock.advance(2.0)
        [ended] = self.scaler.ended_blocks()
        self.assertEqual(ended.state, JobState.MISSING)
        self.assertTrue(ended.failed_start)

    def test_stop_cancels_everything(self) -> None:
        self.successResultOf(self.scaler.scale_out(2))
        self.provider.submit_result = Deferred()
        self.scaler.scale_out(1)  # still being submitted
        stopped = self.scaler.stopService()
        self.assertNoResult(stopped)  # waits for the submission
        self.assertEqual(self.provider.cancelled, [])
        self.provider.submit_result.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(sorted(self.provider.cancelled), ["job-0", "job-1", "job-2"])
        self.assertEqual(self.provider.active_jobs(), [])
        self.assertTrue(self.provider.stopped)
        self.assertEqual(self.successResultOf(self.scaler.scale_out(1)), [])

    def test_stop_waits_for_a_poll(self) -> None:
        self.successResultOf(self.scaler.scale_out(1))
        gate: Deferred[List[JobStatus]] = Deferred()
        self.provider.status = lambda job_ids: gate  # type: ignore[method-assign,assignment,return-value]
        self.clock.advance(2.0)
        stopped = self.scaler.stopService()
        self.assertNoResult(stopped)
        gate.callback([JobStatus(JobState.RUNNING)])
        self.successResultOf(stopped)
        self.assertEqual(self.provider.cancelled, ["job-0"])

    def test_poll_now(self) -> None:
        self.successResultOf(self.scaler.scale_out(1))
        self.provider.set_state("job-0", JobState.RUNNING)
        self.successResultOf(self.scaler.poll())
        self.assertEqual(self.states(), {"0": "RUNNING"})


class ParslLikeSubmitError(Exception):
    """Parsl's SubmitException: the scheduler's output as attributes."""

    def __init__(self, stderr: str) -> None:
        super().__init__("Could not read job ID from submit command standard output")
        self.stdout = ""
        self.stderr = stderr
        self.retcode = 1


class LastErrorTests(BlockScalerTests):
    """The last failed start's message, for status and for tasks nothing can serve."""

    def test_submit_error_names_the_scheduler_message(self) -> None:
        self.provider.submit_error = ParslLikeSubmitError(
            "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
        )
        self.clock.advance(5)
        self.successResultOf(self.scaler.scale_out(1))
        expected = (
            "block 0 could not be submitted to the fake provider: the fake scheduler refused "
            "funcx.block-0 (exit code 1): sbatch: error: Batch job submission failed: Invalid "
            "partition name specified"
        )
        self.assertEqual(self.scaler.last_error, expected)
        [ended] = self.scaler.ended_blocks()
        self.assertEqual(ended.error, expected)
        self.clock.advance(3)
        blocks = self.scaler.status_fields()["blocks"]
        self.assertEqual(blocks["last_error"], expected)
        self.assertEqual(blocks["last_error_age"], 3.0)
        [text] = self.logs.texts("error")
        self.assertIn("Invalid partition name specified", text)

    def test_block_that_ends_early_names_its_status_and_stderr(self) -> None:
        stderr = os.path.join(_make_dir(self), "block.err")
        with open(stderr, "w") as f:
            f.write("srun: error: Unable to create step\nsrun: error: node0: task 0: Exited\n")
        self.successResultOf(self.scaler.scale_out(1))
        self.provider.set_state(
            "job-0", JobState.FAILED, exit_code=1, message="NODE_FAIL", stderr_path=stderr
        )
        self.clock.advance(2.0)
        self.assertEqual(
            self.scaler.last_error,
            "block 0 (job job-0) ended before any of its managers connected: FAILED (NODE_FAIL);"
            " its stderr ends: srun: error: Unable to create step | srun: error: node0: task 0:"
            " Exited",
        )

    def test_no_last_error_without_failures(self) -> None:
        self.successResultOf(self.scaler.scale_out(1))
        self.assertNotIn("last_error", self.scaler.status_fields()["blocks"])
        self.assertIsNone(self.scaler.last_error)


class DescribeBlocksTests(BlockScalerTests):
    """What `funcx-endpoint status` lists of each block."""

    def test_describe_blocks(self) -> None:
        self.provider.walltime = "00:10:00"  # type: ignore[attr-defined]
        self.provider.nodes_per_block = 2
        self.successResultOf(self.scaler.scale_out(2))
        self.provider.submit_result = Deferred()
        self.scaler.scale_out(1)  # block 2: being submitted
        self.provider.set_state("job-0", JobState.RUNNING)
        self.clock.advance(2.0)  # first seen running at t=2
        a = self.load.connect("0", manager_id="a", registered_at=2.5)
        self.load.update(a.manager_id, hostname="node1")
        b = self.load.connect("0", manager_id="b", registered_at=2.5)
        self.load.update(b.manager_id, hostname="node0")
        self.clock.advance(98.0)
        self.assertEqual(
            self.scaler.describe_blocks(),
            [
                {
                    "block": "0",
                    "job_id": "job-0",
                    "state": "RUNNING",
                    "nodes": ["node0", "node1"],
                    "managers": "2/2",
                    "walltime_left": 502.0,  # 98 s since t=2
                },
                {
                    "block": "1",
                    "job_id": "job-1",
                    "state": "PENDING",
                    "nodes": [],
                    "managers": "0/2",
                    "walltime_left": 600.0,  # not started: all of it
                },
                {
                    "block": "2",
                    "job_id": "(submitting)",
                    "state": "PENDING",
                    "nodes": [],
                    "managers": "0/2",
                    "walltime_left": 600.0,
                },
            ],
        )
        self.successResultOf(self.scaler.scale_in(block_ids=["1"]))
        self.assertNotIn("1", [d["block"] for d in self.scaler.describe_blocks()])
        self.provider.submit_result.callback(None)

    def test_started_by_its_first_manager(self) -> None:
        """A block whose manager connected has started, whatever the provider said last."""
        self.provider.walltime = 60  # minutes  # type: ignore[attr-defined]
        self.successResultOf(self.scaler.scale_out(1))
        self.load.connect("0", registered_at=1.0)
        self.clock.advance(2.0)
        [described] = self.scaler.describe_blocks()
        self.assertEqual(described["walltime_left"], 3600.0 - 1.0)

    def test_no_walltime(self) -> None:
        self.successResultOf(self.scaler.scale_out(1))
        [described] = self.scaler.describe_blocks()
        self.assertNotIn("walltime_left", described)
        self.assertEqual(described["managers"], "0/1")


class PromptPollTests(SynchronousTestCase):
    """A slow-polling provider (Slurm: 60 s) is asked sooner when a block is in question."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(status_polling_interval=60.0)
        self.load = FakeLoadSource()
        self.logs = LogCollector()

    def make(self, **kwargs: Any) -> BlockScaler:
        scaler = BlockScaler(
            ProviderAdapter(self.provider, self.clock),
            self.load,
            self.clock,
            TEMPLATE,
            prompt_poll_interval=5.0,
            **kwargs,
        )
        scaler.log = self.logs.logger()
        scaler.startService()
        self.addCleanup(self.stop, scaler)
        return scaler

    def stop(self, scaler: BlockScaler) -> None:
        if scaler.running:
            self.successResultOf(scaler.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, a poller tick (5 s) at a time."""
        self.clock.pump([5.0] * round(seconds / 5.0))

    def test_no_question_no_early_poll(self) -> None:
        scaler = self.make()
        self.successResultOf(scaler.scale_out(1))
        self.advance(55.0)
        self.assertEqual(self.provider.status_calls, 0)
        self.advance(5.0)
        self.assertEqual(self.provider.status_calls, 1)

    def test_managers_connected_to_a_pending_block(self) -> None:
        scaler = self.make()
        self.successResultOf(scaler.scale_out(1))
        self.advance(5.0)
        self.provider.set_state("job-0", JobState.RUNNING)
        self.load.connect("0", registered_at=6.0)
        self.advance(5.0)  # t=10: connected while PENDING: asked
        self.assertEqual(self.provider.status_calls, 1)
        self.assertEqual(scaler.blocks()[0].state, JobState.RUNNING)
        self.advance(45.0)
        self.assertEqual(self.provider.status_calls, 1)  # answered: back to 60 s

    def test_provider_that_keeps_saying_pending_is_asked_for_one_interval(self) -> None:
        scaler = self.make()
        self.successResultOf(scaler.scale_out(1))
        self.load.connect("0", registered_at=0.0)
        self.advance(60.0)
        self.assertEqual(self.provider.status_calls, 12)  # every 5 s
        self.advance(55.0)
        self.assertEqual(self.provider.status_calls, 12)  # then every 60 s only
        self.advance(5.0)
        self.assertEqual(self.provider.status_calls, 13)
        self.assertEqual(scaler.blocks()[0].state, JobState.PENDING)

    def test_managers_gone_between_two_looks(self) -> None:
        """scancel: the block's managers came and went; its end is learned in seconds."""
        scaler = self.make()
        self.successResultOf(scaler.scale_out(1))
        self.advance(20.0)
        self.load.connect("0", registered_at=self.clock.seconds())
        self.load.disconnect_block("0")  # before the scaler looked
        self.provider.set_state("job-0", JobState.CANCELLED)
        self.advance(5.0)  # seen gone, and asked, at the next tick (t=25)
        self.assertEqual(self.provider.status_calls, 1)
        self.assertEqual(scaler.blocks(), [])
        [ended] = scaler.ended_blocks()
        self.assertEqual(ended.state, JobState.CANCELLED)
        self.assertFalse(ended.failed_start)  # the scheduler said cancelled
        self.assertEqual(scaler.consecutive_failures, 0)

    def test_first_poll_delay(self) -> None:
        """A job the scheduler's accounting may not list yet is not asked about."""
        self.provider.status_polling_interval = 2.0
        scaler = self.make(first_poll_delay=10.0)
        self.successResultOf(scaler.scale_out(1))
        del self.provider.resources["job-0"]  # "sacct" does not know it yet
        self.clock.pump([2.0] * 4)
        self.assertEqual(self.provider.status_calls, 0)
        self.assertEqual(scaler.blocks()[0].state, JobState.PENDING)
        self.provider.set_state("job-0", JobState.RUNNING)
        self.clock.advance(2.0)
        self.assertEqual(self.provider.status_calls, 1)
        self.assertEqual(scaler.blocks()[0].state, JobState.RUNNING)

    def test_managers_of_an_ended_block_are_retired(self) -> None:
        scaler = self.make()
        self.successResultOf(scaler.scale_out(1))
        self.load.connect("0")
        self.provider.set_state("job-0", JobState.COMPLETED, exit_code=0)
        self.advance(60.0)
        self.assertEqual(self.load.retired, [("0", "its job ended: COMPLETED")])
        self.assertEqual(scaler.blocks(), [])
