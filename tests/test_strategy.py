"""Tests for funcx_endpoint.executor.strategy: SimpleStrategy and its wiring, on a Clock."""

from __future__ import annotations

import os
import signal
import time
from typing import Any, List

import psutil
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from funcx_endpoint.config import model as config_model
from funcx_endpoint.executor.blocks import BlockScaler
from funcx_endpoint.executor.providers import JobState, JobStatus, LocalProvider, ProviderAdapter
from funcx_endpoint.executor.providers.ranks import GROUP_POLL_INTERVAL
from funcx_endpoint.executor.strategy import (
    Decision,
    ScalingService,
    SimpleStrategy,
    estimate_workers_per_node,
    scaling_from_config,
)
from funcx_endpoint.testing.procreactor import MemoryProcessReactor
from funcx_endpoint.wire.errors import ErrorCode
from tests.test_blocks import TEMPLATE, FakeLoadSource, FakeProvider, LogCollector
from tests.test_interchange import Harness, make_task


def _make_dir(test: Any) -> str:
    """A new empty directory under trial's temporary directory."""
    path = test.mktemp()
    os.makedirs(path)
    return os.path.abspath(path)


class StrategyTestCase(SynchronousTestCase):
    """A strategy over a real BlockScaler, a fake provider and a fake load."""

    interval = 5.0
    max_idletime = 60.0

    def build(self, workers_per_node: int = 4, **provider_args: Any) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(**provider_args)
        self.load = FakeLoadSource()
        self.scaler = BlockScaler(
            ProviderAdapter(self.provider, self.clock), self.load, self.clock, TEMPLATE
        )
        self.logs = LogCollector()
        self.scaler.log = self.logs.logger()
        self.strategy = SimpleStrategy(
            self.scaler,
            self.load,
            self.clock,
            interval=self.interval,
            max_idletime=self.max_idletime,
            workers_per_node=workers_per_node,
        )
        self.strategy.log = self.logs.logger()
        self.service = ScalingService(self.scaler, self.strategy)
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.service.running:
            self.successResultOf(self.service.stopService())
        self.assertEqual(self.provider.active_jobs(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def active(self) -> List[str]:
        return [b.block_id for b in self.scaler.active_blocks()]

    def tick(self) -> Decision:
        """Advance to the next strategy tick and return its decision."""
        decisions: List[Decision] = []
        original = self.strategy.decide

        def spy() -> Decision:
            decision = original()
            decisions.append(decision)
            return decision

        self.strategy.decide = spy  # type: ignore[method-assign]
        try:
            now = self.clock.seconds()
            self.clock.advance(self.interval - (now % self.interval))
        finally:
            del self.strategy.decide
        [decision] = decisions
        return decision

    def run_blocks(self) -> None:
        """Every pending job starts running (seen at the next status poll)."""
        self.provider.set_all(JobState.RUNNING)


class StartTests(StrategyTestCase):
    def test_init_blocks(self) -> None:
        self.build(init_blocks=3, max_blocks=5)
        self.assertEqual(self.active(), ["0", "1", "2"])
        self.assertEqual(len(self.provider.submitted), 3)

    def test_init_blocks_capped_by_max(self) -> None:
        self.build(init_blocks=3, max_blocks=2)
        self.assertEqual(self.active(), ["0", "1"])

    def test_min_blocks(self) -> None:
        self.build(init_blocks=0, min_blocks=2)
        self.assertEqual(self.active(), [])
        decision = self.tick()
        self.assertEqual(decision.scale_out, 2)
        self.assertIn("min_blocks", decision.reason)
        self.assertEqual(self.active(), ["0", "1"])
        self.assertEqual(self.tick().scale_out, 0)

    def test_first_tick_after_interval(self) -> None:
        self.build(init_blocks=0, min_blocks=1)
        self.clock.advance(self.interval - 0.1)
        self.assertEqual(self.active(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.active(), ["0"])

    def test_stop_cancels_blocks(self) -> None:
        self.build(init_blocks=2)
        self.successResultOf(self.service.stopService())
        self.assertEqual(sorted(self.provider.cancelled), ["job-0", "job-1"])
        self.assertTrue(self.provider.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ScaleOutTests(StrategyTestCase):
    def test_scale_up_under_load(self) -> None:
        self.build(init_blocks=1, max_blocks=10)
        self.load.connect("0", workers=4, idle_since=None, active_tasks=4)
        self.load.tasks = 20
        decision = self.tick()
        # 20 tasks, 4 slots: ceil(16 * 1.0 / 4) = 4 more blocks.
        self.assertEqual(decision.scale_out, 4)
        self.assertEqual(len(self.active()), 5)
        self.assertIn("20 outstanding task(s) > 4 slot(s)", decision.reason)
        # The new blocks count (pending) at once: no second scale-out for the same load.
        self.assertEqual(self.tick().scale_out, 0)
        self.assertEqual(len(self.provider.submitted), 5)

    def test_max_blocks(self) -> None:
        self.build(init_blocks=1, max_blocks=3)
        self.load.tasks = 1000
        self.assertEqual(self.tick().scale_out, 2)
        self.assertEqual(self.tick().scale_out, 0)
        self.assertEqual(len(self.active()), 3)

    def test_parallelism(self) -> None:
        for parallelism, blocks in ((1.0, 4), (0.5, 2), (0.25, 1), (0.0, 1)):
            self.build(init_blocks=0, max_blocks=10, parallelism=parallelism)
            self.load.tasks = 16  # 4 workers per node estimated: 16 slots would do
            decision = self.tick()
            self.assertEqual(decision.scale_out, blocks, f"parallelism {parallelism}")
            self.stop()

    def test_parallelism_zero_keeps_one_block(self) -> None:
        self.build(init_blocks=1, max_blocks=10, parallelism=0.0)
        self.load.tasks = 100
        self.assertEqual(self.tick().scale_out, 0)
        self.assertEqual(len(self.active()), 1)

    def test_parallelism_half_with_running_blocks(self) -> None:
        self.build(init_blocks=1, max_blocks=10, parallelism=0.5)
        self.load.connect("0", workers=4, idle_since=None, active_tasks=4)
        self.load.tasks = 20  # excess 16: ceil(16 * 0.5 / 4) = 2
        self.assertEqual(self.tick().scale_out, 2)

    def test_nodes_per_block(self) -> None:
        self.build(init_blocks=0, max_blocks=10, nodes_per_block=2)
        self.load.tasks = 17  # 8 slots per block: ceil(17 / 8) = 3
        self.assertEqual(self.tick().scale_out, 3)

    def test_estimate_until_managers_report(self) -> None:
        self.build(workers_per_node=2, init_blocks=1, max_blocks=10)
        self.load.tasks = 10  # 2 slots estimated: 4 more blocks
        self.assertEqual(self.tick().scale_out, 4)
        for block_id in self.active():
            self.load.connect(block_id, workers=8, idle_since=None, active_tasks=2)
        self.load.tasks = 50  # 5 blocks of 8: 40 slots; excess 10: 2 blocks
        self.assertEqual(self.tick().scale_out, 2)

    def test_a_block_for_tasks_when_none(self) -> None:
        self.build(init_blocks=0, max_blocks=1, parallelism=0.1)
        self.load.tasks = 1
        self.assertEqual(self.tick().scale_out, 1)

    def test_no_tasks_no_blocks(self) -> None:
        self.build(init_blocks=0)
        self.assertEqual(self.tick(), Decision(reason="steady"))
        self.assertEqual(self.provider.submitted, [])


class ScaleInTests(StrategyTestCase):
    def test_idle_blocks_scale_in_after_max_idletime(self) -> None:
        self.build(init_blocks=3, min_blocks=1, max_blocks=5)
        self.run_blocks()
        for block_id in self.active():
            self.load.connect(block_id, idle_since=0.0)
        self.tick()  # t=5
        self.clock.advance(50)  # t=55 < 60
        self.assertEqual(len(self.active()), 3)
        decision = self.tick()  # t=60
        self.assertEqual(decision.scale_in, ("0", "1"))
        self.assertEqual(self.active(), ["2"])
        self.assertEqual(sorted(self.provider.cancelled), ["job-0", "job-1"])
        # Never below min_blocks.
        self.clock.advance(600)
        self.assertEqual(self.active(), ["2"])

    def test_busy_blocks_stay(self) -> None:
        self.build(init_blocks=2, max_blocks=5)
        self.load.connect("0", idle_since=0.0)
        self.load.connect("1", idle_since=None, active_tasks=1)
        self.load.tasks = 1
        self.clock.advance(120)
        self.assertEqual(self.active(), ["1"])
        self.load.tasks = 0
        self.load.idle("1", since=self.clock.seconds())
        self.clock.advance(55)
        self.assertEqual(self.active(), ["1"])
        self.clock.advance(5)
        self.assertEqual(self.active(), [])

    def test_block_idle_clock_restarts_when_busy(self) -> None:
        self.build(init_blocks=1)
        self.load.connect("0", idle_since=0.0)
        self.clock.advance(40)
        self.load.busy("0")
        self.load.tasks = 1
        self.clock.advance(40)
        self.load.tasks = 0
        self.load.idle("0", since=self.clock.seconds())  # t=80
        self.clock.advance(55)
        self.assertEqual(self.active(), ["0"])
        self.clock.advance(5)
        self.assertEqual(self.active(), [])

    def test_idle_block_kept_for_queued_tasks(self) -> None:
        """Idle blocks go only while the others keep a slot for every outstanding task."""
        self.build(workers_per_node=4, init_blocks=3, max_blocks=3)
        for block_id in ("0", "1", "2"):
            self.load.connect(block_id, workers=4, idle_since=0.0)
        self.load.busy("0", tasks=4)
        self.load.tasks = 6  # 4 running on block 0, 2 more: two blocks needed
        self.clock.advance(120)
        self.assertEqual(self.active(), ["0", "2"])  # equally idle: the older goes

    def test_unmanned_block_scaled_in_when_no_work(self) -> None:
        """A block whose managers never came (still queued) goes after max_idletime."""
        self.build(init_blocks=1)
        self.tick()  # t=5: first seen without managers
        self.clock.advance(55)
        self.assertEqual(self.active(), ["0"])
        self.tick()  # t=65
        self.assertEqual(self.active(), [])

    def test_unmanned_block_kept_while_needed(self) -> None:
        self.build(init_blocks=1)
        self.load.tasks = 3
        self.clock.advance(300)
        self.assertEqual(self.active(), ["0"])

    def test_max_idletime_zero(self) -> None:
        self.max_idletime = 0.0
        self.build(init_blocks=2)
        self.load.connect("0", idle_since=0.0)
        self.load.connect("1", idle_since=0.0)
        self.assertEqual(self.tick().scale_in, ("0", "1"))


class BackoffTests(StrategyTestCase):
    def test_failing_blocks_back_off(self) -> None:
        """Blocks that fail at start are retried ever more slowly: 10, 20, 40... 300 s."""
        self.build(init_blocks=0, min_blocks=1, max_blocks=1, status_polling_interval=1.0)
        submitted_at: List[float] = []
        real_submit = self.provider.submit

        def submit(*args: Any, **kwargs: Any) -> Any:
            submitted_at.append(self.clock.seconds())
            return real_submit(*args, **kwargs)

        self.provider.submit = submit  # type: ignore[method-assign]
        for _ in range(3000):
            self.clock.advance(1.0)
            self.provider.set_all(JobState.FAILED, exit_code=1)  # dies at once
        gaps = [round(b - a) for a, b in zip(submitted_at, submitted_at[1:])]
        # Submit at t, failure seen at the next poll (t+1); held until
        # failure + 10 * 2**(k-1) (cap 300), then the next tick (every 5 s).
        self.assertEqual(gaps[:6], [15, 25, 45, 85, 165, 305])
        self.assertTrue(all(gap == 305 for gap in gaps[5:]))
        self.assertEqual(self.scaler.consecutive_failures, len(submitted_at))
        warnings = [t for t in self.logs.texts("warn") if "Not starting blocks" in t]
        self.assertEqual(len(warnings), len(submitted_at))  # once per hold, not per tick
        self.assertGreater(self.strategy.status_fields()["strategy"]["backoff_remaining"], 0)

    def test_success_resets_backoff(self) -> None:
        self.build(init_blocks=1, max_blocks=2, status_polling_interval=1.0)
        self.clock.advance(1.0)
        self.provider.set_all(JobState.FAILED, exit_code=1)
        self.clock.advance(1.0)
        self.assertEqual(self.scaler.consecutive_failures, 1)
        self.load.tasks = 10
        self.assertTrue(self.tick().held)  # t=5, held until 12
        decision = self.tick()  # t=10
        self.assertTrue(decision.held)
        self.assertEqual(self.tick().scale_out, 2)  # t=15
        self.load.connect("1", idle_since=None, active_tasks=4, manager_id="m1")
        self.clock.advance(1.0)
        self.assertEqual(self.scaler.consecutive_failures, 1)  # connected, not proven
        self.load.update("m1", tasks_completed=3)
        self.clock.advance(1.0)
        self.assertEqual(self.scaler.consecutive_failures, 0)
        self.assertIsNone(self.strategy.backoff_until())

    def test_managers_that_connect_then_quit_back_off(self) -> None:
        """A block whose manager registers, then exits because its workers cannot
        start, is retried ever more slowly, not every 10 s forever."""
        self.build(init_blocks=0, min_blocks=0, max_blocks=1, status_polling_interval=1.0)
        self.load.tasks = 5
        for _ in range(1000):
            self.clock.advance(1.0)
            for job_id, status in list(self.provider.resources.items()):
                block_id = job_id.split("-")[1]
                if status.state is JobState.PENDING:
                    self.provider.set_state(job_id, JobState.RUNNING)
                    self.load.connect(
                        block_id,
                        workers=1,
                        idle_since=None,
                        active_tasks=1,
                        manager_id="m" + block_id,
                        registered_at=self.clock.seconds(),
                    )
                elif status.state is JobState.RUNNING:
                    self.load.disconnect_block(block_id)
                    self.provider.set_state(job_id, JobState.FAILED, exit_code=4)
        # Gaps of 10, 20, 40, 80, 160, 300, 300 s (plus polls and ticks) fit
        # in 1000 s; without backoff there would be about 60 blocks.
        self.assertLessEqual(len(self.provider.submitted), 8)
        self.assertEqual(self.scaler.consecutive_failures, len(self.provider.submitted))
        self.load.tasks = 0

    def test_backoff_rule(self) -> None:
        self.build()
        self.scaler.last_failure_at = 100.0
        for failures, until in ((0, None), (1, 110.0), (2, 120.0), (5, 260.0), (6, 400.0)):
            self.scaler.consecutive_failures = failures
            self.assertEqual(self.strategy.backoff_until(), until)
        self.scaler.consecutive_failures = 10_000
        self.assertEqual(self.strategy.backoff_until(), 400.0)
        self.scaler.consecutive_failures = 0


class StrategyErrorTests(StrategyTestCase):
    def test_error_in_a_tick_is_logged_and_the_loop_goes_on(self) -> None:
        self.build(init_blocks=0, min_blocks=1)
        self.load.outstanding_tasks = lambda: 1 // 0  # type: ignore[method-assign]
        self.clock.advance(5)
        self.assertTrue(any(e.get("log_failure") for e in self.logs.events))
        del self.load.outstanding_tasks
        self.clock.advance(5)
        self.assertEqual(self.active(), ["0"])


class PendingCancelProvider:
    """An async provider whose cancel stays pending until the test fires it
    (like a Parsl provider's ``scancel`` in a thread)."""

    label = "slow"
    init_blocks = 1
    min_blocks = 0
    max_blocks = 2
    nodes_per_block = 1
    parallelism = 1.0
    status_polling_interval = 1000.0
    cores_per_node = None

    def __init__(self) -> None:
        self.cancels: List[Deferred[List[bool]]] = []

    def submit(self, command: str, tasks_per_node: int, job_name: str) -> Deferred[str]:
        return succeed("job-0")

    def status(self, job_ids: Any) -> Deferred[List[JobStatus]]:
        return succeed([JobStatus(JobState.RUNNING) for _ in job_ids])

    def cancel(self, job_ids: Any) -> Deferred[List[bool]]:
        d: Deferred[List[bool]] = Deferred()
        self.cancels.append(d)
        return d

    def read_tail(self, path: Any, max_bytes: int = 0) -> Deferred[None]:
        return succeed(None)


class ScaleInWithInterchangeTests(SynchronousTestCase):
    """Scale-in against the real interchange: the block's managers are retired
    before the provider is asked to end it."""

    def setUp(self) -> None:
        self.harness = Harness(self)
        self.provider = PendingCancelProvider()
        self.scaler = BlockScaler(
            self.provider,  # type: ignore[arg-type]
            self.harness.interchange,
            self.harness.reactor,
            "x {block_id}",
        )
        self.scaler.startService()
        self.strategy = SimpleStrategy(
            self.scaler, self.harness.interchange, self.harness.reactor, interval=5, max_idletime=10
        )
        self.addCleanup(self.stop)

    def stop(self) -> None:
        for cancel in self.provider.cancels:
            if not cancel.called:
                cancel.callback([True])
        self.strategy.stopService()
        stopped = self.scaler.stopService()
        for cancel in self.provider.cancels:
            if not cancel.called:
                cancel.callback([True])
        self.successResultOf(stopped)

    def test_no_tasks_to_a_block_being_cancelled(self) -> None:
        harness = self.harness
        self.successResultOf(self.scaler.scale_out(1))
        doomed = harness.manager(manager_id="m0", block_id="0", worker_count=2)
        self.strategy.startService()
        harness.advance(5)
        self.assertEqual(self.provider.cancels, [])
        harness.advance(5)  # idle for 10 s: scaled in
        self.assertEqual(len(self.provider.cancels), 1)
        self.assertEqual(len(doomed.shutdowns), 1)
        self.assertIn("scaling in", doomed.shutdowns[0])
        # A burst while the provider's cancel is in progress: nothing for m0.
        tasks = [make_task() for _ in range(3)]
        harness.interchange.submit(tasks)
        harness.flush()
        self.assertEqual(doomed.task_ids, [])
        self.assertEqual(harness.interchange.status()["pending_tasks"], 3)
        # The job ends; its manager's connection goes; no task lost an attempt.
        self.provider.cancels[0].callback([True])
        doomed.disconnect()
        harness.flush()
        self.assertEqual(harness.results, [])
        records = [harness.interchange.dispatcher.record(t.task_id) for t in tasks]
        self.assertEqual([r.attempts for r in records if r is not None], [0] * 3)
        fresh = harness.manager(manager_id="m1", block_id="1", worker_count=3, prefetch_capacity=0)
        self.assertEqual(sorted(fresh.task_ids), sorted(t.task_id for t in tasks))

    def test_block_busy_since_the_decision_is_kept(self) -> None:
        harness = self.harness
        self.successResultOf(self.scaler.scale_out(1))
        manager = harness.manager(manager_id="m0", block_id="0", worker_count=1)
        task = make_task()
        harness.interchange.submit([task])
        harness.flush()
        self.assertEqual(manager.task_ids, [task.task_id])
        # As if the strategy had decided on what it saw a moment earlier.
        self.assertEqual(
            self.successResultOf(self.scaler.scale_in(block_ids=["0"], only_idle=True)), []
        )
        self.assertEqual(self.provider.cancels, [])
        self.assertEqual(manager.shutdowns, [])
        self.assertEqual([b.block_id for b in self.scaler.active_blocks()], ["0"])
        manager.answer(task.task_id)
        harness.flush()


class EstimateTests(SynchronousTestCase):
    def test_estimate(self) -> None:
        self.assertEqual(estimate_workers_per_node(float("inf"), 1.0, 8), 8)
        self.assertEqual(estimate_workers_per_node(float("inf"), 2.0, 8), 4)
        self.assertEqual(estimate_workers_per_node(3, 1.0, 8), 3)
        self.assertEqual(estimate_workers_per_node(float("inf"), 16.0, 8), 1)
        self.assertEqual(estimate_workers_per_node(float("inf"), 0.5, 3), 6)
        self.assertEqual(estimate_workers_per_node(float("inf"), 1.0), os.cpu_count() or 1)


class FakeGroups:
    """Process groups that die with their leaders (see tests.test_providers)."""

    def __init__(self, reactor: MemoryProcessReactor) -> None:
        self.reactor = reactor
        self.sent: List[Any] = []

    def alive(self, pgid: int) -> bool:
        return any(p.original_pid == pgid and not p.exited for p in self.reactor.processes)

    def signal(self, pgid: int, signum: int) -> None:
        if not self.alive(pgid):
            raise ProcessLookupError(pgid)
        self.sent.append((pgid, signum))


class FromConfigTests(SynchronousTestCase):
    """The whole scaling part, built from config objects, on the fake process reactor."""

    def test_scaling_from_config(self) -> None:
        reactor = MemoryProcessReactor()
        groups = FakeGroups(reactor)
        executor = config_model.HighThroughputExecutor(
            label="htex",
            provider=config_model.LocalProvider(
                init_blocks=2, min_blocks=1, max_blocks=3, nodes_per_block=2, worker_init="true"
            ),
            strategy=config_model.SimpleStrategy(interval=2.0, max_idletime=30.0),
            max_workers_per_node=3,
        )
        load = FakeLoadSource()
        work = _make_dir(self)
        service = scaling_from_config(
            executor,
            reactor=reactor,
            load=load,
            command_template="funcx-manager --block-id {block_id}",
            working_dir=work,
            stop_grace_period=5.0,
            local_options={"groups": groups},
        )
        self.assertEqual(service.name, "providers")
        self.assertEqual(service.strategy.interval, 2.0)
        self.assertEqual(service.strategy.max_idletime, 30.0)
        self.assertEqual(service.strategy.workers_per_node, min(3, os.cpu_count() or 1))
        provider = service.scaler.provider.provider
        self.assertIsInstance(provider, LocalProvider)
        service.startService()
        self.assertEqual(len(reactor.processes), 4)  # 2 blocks of 2 nodes
        self.assertEqual(
            [p.args[-1] for p in reactor.processes],
            ["true\nfuncx-manager --block-id 0"] * 2 + ["true\nfuncx-manager --block-id 1"] * 2,
        )
        self.assertTrue(os.path.isdir(os.path.join(work, "blocks")))
        reactor.advance(1.0)  # a status poll
        self.assertEqual(service.status_fields()["blocks"]["states"], {"RUNNING": 2})
        # Block 0 idles out; block 1 stays (min_blocks).
        load.connect("0", idle_since=0.0)
        load.connect("1", idle_since=5.0)
        reactor.pump([1.0] * 32)
        self.assertEqual([b.block_id for b in service.scaler.active_blocks()], ["1"])
        self.assertEqual([p.signals for p in reactor.processes], [[], [], [], []])
        block0 = [p.original_pid for p in reactor.processes[:2]]
        self.assertEqual(groups.sent, [(pid, signal.SIGTERM) for pid in block0])
        for process in reactor.processes[:2]:
            process.simulate_killed(signal.SIGTERM)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        for process in reactor.processes[2:]:
            process.simulate_exit(0)
        reactor.advance(GROUP_POLL_INTERVAL)
        self.successResultOf(stopped)
        self.assertEqual(reactor.running_processes(), [])
        self.assertEqual(reactor.getDelayedCalls(), [])


class RealProcessScalingTests(TestCase):
    """Provider, scaler and strategy from config, with real processes and the real reactor."""

    timeout = 60

    def test_scale_out_in_and_stop(self) -> Deferred[None]:
        return ensureDeferred(self._scale_out_in_and_stop())

    async def _scale_out_in_and_stop(self) -> None:
        work = _make_dir(self)
        executor = config_model.HighThroughputExecutor(
            provider=config_model.LocalProvider(init_blocks=1, min_blocks=0, max_blocks=2),
            strategy=config_model.SimpleStrategy(interval=0.1, max_idletime=0.5),
            max_workers_per_node=1,
        )
        load = FakeLoadSource()
        service = scaling_from_config(
            executor,
            reactor=global_reactor,
            load=load,
            command_template=f"echo $$ > {work}/pid.{{block_id}}; exec sleep 60",
            working_dir=work,
            stop_grace_period=2.0,
        )
        service.startService()
        stopped = False
        try:
            pids = [await self.wait_for_pid(work, "0")]
            load.tasks = 2  # one slot per block: one more block
            pids.append(await self.wait_for_pid(work, "1"))
            self.assertEqual(len(service.scaler.active_blocks()), 2)
            self.assertTrue(all(_running(p) for p in pids))
            # Their managers connect and idle: both blocks go after max_idletime.
            load.tasks = 0
            now = global_reactor.seconds()
            load.connect("0", workers=1, idle_since=now)
            load.connect("1", workers=1, idle_since=now)
            await self.wait_until(lambda: not service.scaler.active_blocks())
            await self.wait_until(lambda: not any(_running(p) for p in pids))
            counts = service.status_fields()["blocks"]
            self.assertEqual(counts["active"], 0)
            await service.stopService()
            stopped = True
            blocks = os.path.join(work, "blocks")
            self.assertEqual(
                sorted(os.listdir(blocks)),
                ["local.0.0.stderr", "local.0.0.stdout", "local.1.0.stderr", "local.1.0.stdout"],
            )
        finally:
            if not stopped:
                await service.stopService()

    def test_failing_block_is_logged(self) -> Deferred[None]:
        return ensureDeferred(self._failing_block_is_logged())

    async def _failing_block_is_logged(self) -> None:
        work = _make_dir(self)
        executor = config_model.HighThroughputExecutor(
            provider=config_model.LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
            strategy=config_model.SimpleStrategy(interval=0.1, max_idletime=10),
        )
        service = scaling_from_config(
            executor,
            reactor=global_reactor,
            load=FakeLoadSource(),
            command_template="echo 'manager {block_id}: cannot connect' >&2; exit 4",
            working_dir=work,
        )
        logs = LogCollector()
        service.scaler.log = logs.logger()
        service.strategy.log = logs.logger()
        service.startService()
        try:
            await self.wait_until(lambda: service.scaler.consecutive_failures >= 1)
            [text] = logs.texts("error")
            self.assertIn("Block 0 (job local.0) ended before any of its managers connected", text)
            self.assertIn("exited with code 4", text)
            self.assertIn("manager 0: cannot connect", text)
            # Held back: no second block for 10 s.
            await deferLater(global_reactor, 0.5)
            self.assertEqual(service.scaler.active_blocks(), [])
            self.assertEqual(len(service.scaler.ended_blocks()), 1)
        finally:
            await service.stopService()

    async def wait_for_pid(self, work: str, block_id: str) -> int:
        path = os.path.join(work, f"pid.{block_id}")
        await self.wait_until(lambda: os.path.exists(path) and open(path).read().endswith("\n"))
        with open(path) as f:
            return int(f.read())

    async def wait_until(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out")
            await deferLater(global_reactor, 0.02)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class GiveUpTests(StrategyTestCase):
    """Once blocks have failed to start past the backoff limit, waiting tasks fail
    with the last error instead of waiting forever."""

    def fail_submissions(self, stderr: str = "sbatch: error: invalid partition") -> None:
        error = RuntimeError("Could not read job ID")
        error.stderr = stderr  # type: ignore[attr-defined]
        self.provider.submit_error = error

    def test_default_limit_is_where_the_backoff_reaches_its_cap(self) -> None:
        self.build()
        self.assertEqual(self.strategy.failures_before_giving_up(), 6)  # 10*2**5 >= 300
        self.strategy.give_up_after = 2
        self.assertEqual(self.strategy.failures_before_giving_up(), 2)

    def test_waiting_tasks_fail_after_the_limit(self) -> None:
        self.build(init_blocks=0, max_blocks=1)
        self.fail_submissions()
        self.load.tasks = 3
        for _ in range(400):  # 2000 s: attempts at 5, 20, 45, 90, 175, 340 s...
            self.clock.advance(self.interval)
            if self.load.failed:
                break
        self.assertEqual(self.scaler.consecutive_failures, 6)
        [(code, message, count)] = self.load.failed
        self.assertEqual(code, ErrorCode.BLOCK_START_FAILED)
        self.assertEqual(count, 3)
        self.assertEqual(
            message,
            "no block of managers could start: 6 failed start(s) in a row with the fake "
            "provider; the last: block 5 could not be submitted to the fake provider: the fake "
            "scheduler refused funcx.block-5: sbatch: error: invalid partition",
        )
        self.assertEqual(
            self.strategy.status_fields()["strategy"]["tasks_failed_for_want_of_blocks"], 3
        )
        [text] = [t for t in self.logs.texts("error") if "Failed 3 waiting task(s)" in t]
        self.assertIn("sbatch: error: invalid partition", text)
        # Tasks arriving later fail at the next tick; a block is still tried
        # when there is work, once per backoff_cap seconds.
        before = self.scaler.failed_starts
        self.load.tasks = 2
        self.clock.advance(self.interval)
        self.assertEqual(self.load.failed[-1][2], 2)
        self.assertEqual(self.scaler.failed_starts, before)  # held back
        self.clock.pump([self.interval] * 60)
        self.load.tasks = 1
        self.clock.advance(self.interval)
        self.assertEqual(self.scaler.failed_starts, before + 1)
        self.assertEqual(self.load.failed[-1][2], 1)

    def test_not_before_the_limit(self) -> None:
        self.build(init_blocks=0, max_blocks=1)
        self.strategy.give_up_after = 4
        self.fail_submissions()
        self.load.tasks = 1
        for _ in range(8):  # attempts at 5, 20 and 40 s
            self.clock.advance(self.interval)
        self.assertEqual(self.scaler.consecutive_failures, 3)
        self.assertEqual(self.load.failed, [])

    def test_not_while_a_manager_is_connected(self) -> None:
        self.build(init_blocks=0, max_blocks=2)
        self.strategy.give_up_after = 1
        self.load.connect("old", idle_since=None, active_tasks=4)  # of an earlier block
        self.fail_submissions()
        self.load.tasks = 10
        for _ in range(10):
            self.clock.advance(self.interval)
        self.assertGreaterEqual(self.scaler.consecutive_failures, 1)
        self.assertEqual(self.load.failed, [])

    def test_failures_of_blocks_that_start_and_die(self) -> None:
        """Jobs that are accepted but end before any manager connects count too."""
        self.build(init_blocks=0, max_blocks=1, status_polling_interval=1.0)
        self.strategy.give_up_after = 2
        self.load.tasks = 1
        for _ in range(60):
            self.clock.advance(1.0)
            self.provider.set_all(JobState.FAILED, exit_code=1, message="NODE_FAIL")
            if self.load.failed:
                break
        [(code, message, count)] = self.load.failed
        self.assertIn("2 failed start(s) in a row", message)
        self.assertIn("ended before any of its managers connected: FAILED (NODE_FAIL)", message)
