"""Walltimes: blocks drain before their walltime ends, are replaced in time,
and tasks lost at a walltime end are retried without counting an attempt.

Unit tests on a Clock (the strategy and the walltime watch over a real
BlockScaler, a fake provider and a fake load) and on a MemoryReactorClock
(the interchange with fake managers).  The real Slurm test is in
``tests.test_slurm``.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.cli.status import format_status
from funcx_endpoint.config.model import ConfigError, HighThroughputExecutor
from funcx_endpoint.executor.blocks import BlockScaler
from funcx_endpoint.executor.providers import JobState, ProviderAdapter
from funcx_endpoint.executor.strategy import (
    ScalingService,
    SimpleStrategy,
    scaling_from_config,
)
from funcx_endpoint.executor.walltime import WalltimeWatch, drain_margin
from funcx_endpoint.wire import Result
from funcx_endpoint.wire.errors import ErrorCode
from tests.test_blocks import TEMPLATE, FakeLoadSource, FakeProvider
from tests.test_interchange import Harness, make_task

WALLTIME = 600.0
MARGIN = 60.0


class DrainMarginTests(SynchronousTestCase):
    def test_default_is_a_tenth_at_most_a_minute(self) -> None:
        self.assertEqual(drain_margin(60.0), 6.0)
        self.assertEqual(drain_margin(300.0), 30.0)
        self.assertEqual(drain_margin(3600.0), 60.0)

    def test_configured(self) -> None:
        self.assertEqual(drain_margin(3600.0, 120), 120.0)
        self.assertEqual(drain_margin(60.0, 0), 0.0)
        self.assertEqual(drain_margin(60.0, 90), 60.0)  # never more than the walltime

    def test_config_field(self) -> None:
        self.assertIsNone(HighThroughputExecutor().walltime_drain_margin)
        self.assertEqual(HighThroughputExecutor(walltime_drain_margin=30).walltime_drain_margin, 30)
        self.assertRaises(ConfigError, HighThroughputExecutor, walltime_drain_margin=-1)


class InterchangeDrainTests(SynchronousTestCase):
    """The interchange's side: a draining block's managers take no new task."""

    def test_draining_block_gets_no_new_task(self) -> None:
        harness = Harness(self)
        old = harness.manager(manager_id="old", block_id="0", worker_count=1, prefetch_capacity=0)
        first = make_task()
        harness.interchange.submit([first])
        harness.flush()
        self.assertEqual(old.task_ids, [first.task_id])
        self.assertTrue(harness.interchange.drain_block("0", "its walltime ends in 60s"))
        self.assertFalse(harness.interchange.drain_block("0", "again"))
        second = make_task()
        harness.interchange.submit([second])
        old.answer(first.task_id)
        harness.advance(10)
        self.assertEqual(old.task_ids, [first.task_id])  # the one it had, no more
        late = harness.manager(manager_id="late", block_id="0", worker_count=1)
        harness.flush()
        self.assertEqual(late.task_ids, [])  # registering later changes nothing
        new = harness.manager(manager_id="new", block_id="1", worker_count=1)
        harness.flush()
        self.assertEqual(new.task_ids, [second.task_id])
        self.assertEqual([r.task_id for r in harness.results], [first.task_id])

    def test_tasks_lost_at_the_walltime_end_cost_no_attempt(self) -> None:
        harness = Harness(self, HighThroughputExecutor(max_retries_on_system_failure=0))
        old = harness.manager(manager_id="old", block_id="0", worker_count=1, prefetch_capacity=0)
        task = make_task()
        harness.interchange.submit([task])
        harness.flush()
        harness.interchange.drain_block("0", "its walltime ends in 60s")
        old.disconnect()  # the scheduler killed the job, the task with it
        harness.flush()
        self.assertEqual(harness.results, [])  # not ManagerLost, although no retries allowed
        new = harness.manager(manager_id="new", block_id="1", worker_count=1)
        harness.flush()
        self.assertEqual(new.task_ids, [task.task_id])
        new.answer(task.task_id)
        harness.flush()
        [result] = harness.results
        self.assertIsNone(result.error_details)

    def test_workers_killed_at_the_walltime_end_cost_no_attempt(self) -> None:
        """The scheduler kills every process of the job: a worker may die
        before its manager, which answers WorkerLost; from a draining block,
        the task is queued again instead, without counting an attempt."""
        harness = Harness(self, HighThroughputExecutor(max_retries_on_system_failure=0))
        old = harness.manager(manager_id="old", block_id="0", worker_count=2, prefetch_capacity=0)
        killed, done = make_task(), make_task()
        harness.interchange.submit([killed, done])
        harness.flush()
        harness.interchange.drain_block("0", "its walltime ends in 60s")
        old.send_results(
            Result.failure(killed.task_id, ErrorCode.WORKER_LOST, "worker 0 was killed by SIGTERM")
        )
        old.answer(done.task_id)
        harness.flush()
        self.assertEqual([r.task_id for r in harness.results], [done.task_id])
        record = harness.interchange.dispatcher.record(killed.task_id)
        assert record is not None
        self.assertEqual(record.attempts, 0)
        new = harness.manager(manager_id="new", block_id="1", worker_count=1)
        harness.flush()
        self.assertEqual(new.task_ids, [killed.task_id])
        new.answer(killed.task_id)
        harness.flush()
        self.assertEqual(len(harness.results), 2)
        self.assertFalse([r for r in harness.results if r.is_error])

    def test_other_failures_of_a_draining_block_are_answered(self) -> None:
        harness = Harness(self)
        old = harness.manager(manager_id="old", block_id="0", worker_count=1, prefetch_capacity=0)
        task = make_task()
        harness.interchange.submit([task])
        harness.flush()
        harness.interchange.drain_block("0", "its walltime ends in 60s")
        old.send_results(Result.failure(task.task_id, ErrorCode.TASK_TIMEOUT, "too long"))
        harness.flush()
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.TASK_TIMEOUT)

    def test_worker_lost_elsewhere_is_answered(self) -> None:
        """The control: WorkerLost from a block not draining is the task's result."""
        harness = Harness(self)
        old = harness.manager(manager_id="old", block_id="0", worker_count=1, prefetch_capacity=0)
        task = make_task()
        harness.interchange.submit([task])
        harness.flush()
        old.send_results(Result.failure(task.task_id, ErrorCode.WORKER_LOST, "segfault"))
        harness.flush()
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.WORKER_LOST)

    def test_without_drain_the_loss_counts(self) -> None:
        """The control: the same loss from a block not draining is ManagerLost."""
        harness = Harness(self, HighThroughputExecutor(max_retries_on_system_failure=0))
        old = harness.manager(manager_id="old", block_id="0", worker_count=1, prefetch_capacity=0)
        task = make_task()
        harness.interchange.submit([task])
        harness.flush()
        old.disconnect()
        harness.flush()
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, "ManagerLost")

    def test_drain_ends_a_holdoff(self) -> None:
        harness = Harness(self)
        a = harness.manager(manager_id="a", block_id="0", worker_count=1, prefetch_capacity=0)
        harness.manager(manager_id="b", block_id="0", worker_count=1, prefetch_capacity=0)
        harness.interchange.submit([make_task()])
        harness.flush()
        a.disconnect()
        harness.flush()
        harness.interchange.drain_block("0", "its walltime ends")
        harness.advance(5)  # the holdoff's end does not resume a draining block
        self.assertTrue(harness.interchange.dispatcher.pauses.paused("0"))


class WalltimeTestCase(SynchronousTestCase):
    """A strategy and a walltime watch over a real BlockScaler, fake provider and load."""

    def build(self, margin: float = MARGIN, **provider_args: Any) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(**provider_args)
        self.provider.walltime = WALLTIME  # type: ignore[attr-defined]
        self.load = FakeLoadSource()
        adapter = ProviderAdapter(self.provider, self.clock)
        self.scaler = BlockScaler(adapter, self.load, self.clock, TEMPLATE)
        self.watch = WalltimeWatch(self.scaler, self.load, self.clock, WALLTIME, margin)
        self.strategy = SimpleStrategy(
            self.scaler,
            self.load,
            self.clock,
            interval=5.0,
            max_idletime=1000.0,
            workers_per_node=4,
            walltimes=self.watch,
        )
        self.service = ScalingService(self.scaler, self.strategy, self.watch)
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.service.running:
            self.successResultOf(self.service.stopService())
        self.assertEqual(self.provider.active_jobs(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def advance_to(self, when: float) -> None:
        while self.clock.seconds() < when - 1e-9:
            self.clock.advance(min(1.0, when - self.clock.seconds()))

    def active(self) -> List[str]:
        return [b.block_id for b in self.scaler.active_blocks()]


class WalltimeWatchTests(WalltimeTestCase):
    def start_block(self, submitted: float = 0.0, running_after: float = 20.0) -> None:
        """Block 0 submitted at ``submitted``; its manager registers ``running_after`` later."""
        self.advance_to(submitted)
        self.successResultOf(self.scaler.scale_out(1))
        self.advance_to(submitted + running_after)
        self.provider.set_all(JobState.RUNNING)
        self.load.connect("0", registered_at=self.clock.seconds(), idle_since=None, active_tasks=3)

    def test_drains_margin_before_the_walltime_ends(self) -> None:
        self.build(max_blocks=1)
        self.start_block()
        drain = 20.0 + WALLTIME - MARGIN
        self.advance_to(drain - 1)
        self.assertEqual(self.load.drained, {})
        self.advance_to(drain)
        self.assertEqual(list(self.load.drained), ["0"])
        self.assertIn("ends in 60s", self.load.drained["0"])
        self.assertTrue(self.scaler.block("0").draining)
        self.assertIn("draining", self.scaler.describe_blocks()[0])

    def test_cancelled_once_idle(self) -> None:
        self.build(max_blocks=1)
        self.start_block()
        self.advance_to(20.0 + WALLTIME - MARGIN + 5)
        self.assertEqual(self.provider.cancelled, [])  # busy: left to finish its tasks
        self.assertIn("0", [b.block_id for b in self.scaler.blocks()])
        self.load.idle("0", self.clock.seconds())
        self.clock.advance(1)
        self.assertEqual(self.provider.cancelled, ["job-0"])
        self.assertEqual(self.load.retired[0][0], "0")

    def test_not_cancelled_while_the_scheduler_ends_it(self) -> None:
        """A manager of the draining block has gone (the scheduler kills the
        job at its walltime): the block is left to end so, not cancelled."""
        self.build(max_blocks=1)
        self.start_block()
        self.load.connect("0", registered_at=20.0, idle_since=None, active_tasks=1)
        self.advance_to(20.0 + WALLTIME - MARGIN + 1)
        self.assertIn("0", self.load.drained)
        self.load.disconnect_block("0")
        self.load.connect("0", registered_at=20.0, idle_since=0.0)  # one left, idle
        self.advance_to(20.0 + WALLTIME + 5)
        self.assertEqual(self.provider.cancelled, [])

    def test_replacement_requested_before_the_drain(self) -> None:
        """With max_blocks=1 and work to do, a second block is submitted one
        start-up time (20 s here) before the first drains."""
        self.build(max_blocks=1)
        self.load.tasks = 3
        self.start_block()
        replace = 20.0 + WALLTIME - MARGIN - 20.0
        self.advance_to(replace - 5)
        self.assertEqual(len(self.provider.submitted), 1)
        self.advance_to(replace + 5)  # the next strategy tick
        self.assertEqual(len(self.provider.submitted), 2)
        self.assertEqual(self.active(), ["0", "1"])
        self.advance_to(replace + 30)
        self.assertEqual(len(self.provider.submitted), 2)  # one replacement, not more

    def test_min_blocks_replaced_without_work(self) -> None:
        self.build(min_blocks=1, max_blocks=1)
        self.start_block(running_after=0.0)  # the initial top-up happens at the first tick
        self.advance_to(5)
        self.assertEqual(len(self.provider.submitted), 1)
        self.advance_to(WALLTIME - MARGIN + 5)
        self.assertEqual(len(self.provider.submitted), 2)

    def test_not_started_blocks_never_drain(self) -> None:
        self.build(max_blocks=1)
        self.successResultOf(self.scaler.scale_out(1))
        self.advance_to(2 * WALLTIME)
        self.assertEqual(self.load.drained, {})


class FromConfigTests(SynchronousTestCase):
    def build(self, executor: HighThroughputExecutor) -> ScalingService:
        load = FakeLoadSource()
        return scaling_from_config(
            executor,
            reactor=Clock(),
            load=load,
            command_template=TEMPLATE,
            working_dir=self.mktemp(),
        )

    def test_a_provider_with_a_walltime_gets_a_watch(self) -> None:
        provider = FakeProvider()
        provider.walltime = "00:10:00"  # type: ignore[attr-defined]
        service = self.build(HighThroughputExecutor(provider=provider, walltime_drain_margin=45))
        assert service.walltimes is not None
        self.assertEqual((service.walltimes.walltime, service.walltimes.margin), (600.0, 45.0))
        self.assertIs(service.strategy.walltimes, service.walltimes)
        default = self.build(HighThroughputExecutor(provider=provider))
        assert default.walltimes is not None
        self.assertEqual(default.walltimes.margin, 60.0)

    def test_no_walltime_no_watch(self) -> None:
        service = self.build(HighThroughputExecutor(provider=FakeProvider()))
        self.assertIsNone(service.walltimes)
        self.assertIsNone(service.strategy.walltimes)


class StatusTests(SynchronousTestCase):
    def test_draining_block_is_shown(self) -> None:
        status = {
            "blocks": {
                "provider": "slurm",
                "active": 1,
                "states": {"RUNNING": 1},
                "list": [
                    {
                        "block": "0",
                        "job_id": "17",
                        "state": "RUNNING",
                        "draining": True,
                        "nodes": ["n1"],
                        "managers": "1/1",
                        "walltime_left": 50,
                    }
                ],
            }
        }
        text = format_status(status)
        self.assertIn("job 17, RUNNING (draining)", text)
