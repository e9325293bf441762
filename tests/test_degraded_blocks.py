"""A block that lost some of its managers is drained and replaced (issue 12:
with nodes_per_block=2 and max_blocks=1, one manager killed left half the
workers until the other died too).

Unit tests on a Clock (a real BlockScaler and strategy over a fake provider
and load) and one with everything real: interchange, LocalProvider, managers.
"""

from __future__ import annotations

import os
import signal
import tempfile
import uuid
from typing import List

import psutil
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from funcx_endpoint.config import model as config_model
from funcx_endpoint.executor.blocks import BlockScaler
from funcx_endpoint.executor.degraded import DegradedBlocks
from funcx_endpoint.executor.providers import JobState, ProviderAdapter
from funcx_endpoint.executor.strategy import ScalingService, SimpleStrategy
from funcx_endpoint.wire import Result, Task, deserialize, pack_function, pack_payload
from tests.support import alive as _alive
from tests.test_blocks import TEMPLATE, FakeLoadSource, FakeProvider
from tests.test_scaling_integration import _managers, nap, scaled_interchange, wait_until

GRACE = 30.0


class DegradedBlocksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(max_blocks=1, nodes_per_block=2)
        self.load = FakeLoadSource()
        self.scaler = BlockScaler(
            ProviderAdapter(self.provider, self.clock), self.load, self.clock, TEMPLATE
        )
        self.strategy = SimpleStrategy(
            self.scaler, self.load, self.clock, interval=5.0, max_idletime=1000.0
        )
        self.degraded = DegradedBlocks(self.scaler, self.load, self.clock, grace=GRACE)
        self.service = ScalingService(self.scaler, self.strategy, degraded=self.degraded)
        self.service.startService()
        self.addCleanup(self.stop)
        # Block 0 runs two managers of 4 workers, busy, with more work waiting.
        self.successResultOf(self.scaler.scale_out(1))
        self.provider.set_all(JobState.RUNNING)
        self.load.tasks = 40
        for name in ("a", "b"):
            self.load.connect("0", manager_id=name, idle_since=None, active_tasks=4)
        self.advance(10)

    def stop(self) -> None:
        if self.service.running:
            self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds)):
            self.clock.advance(1)

    def kill(self, manager_id: str) -> None:
        del self.load._managers[manager_id]
        self.load.gone["0"] = self.load.gone.get("0", 0) + 1

    def active(self) -> List[str]:
        return [b.block_id for b in self.scaler.active_blocks() if not b.draining]

    def test_short_block_drained_replaced_then_cancelled(self) -> None:
        self.kill("b")
        self.advance(GRACE - 2)
        self.assertEqual(self.load.drained, {})
        self.assertEqual(len(self.provider.submitted), 1)
        self.advance(8)  # past the grace, and a strategy tick
        self.assertIn("lost managers: 1 of its 2 managers", self.load.drained["0"])
        self.assertTrue(self.scaler.block("0").draining)
        self.assertEqual(len(self.provider.submitted), 2)  # the replacement
        self.assertEqual(self.active(), ["1"])
        self.assertEqual(self.provider.cancelled, [])  # "a" still runs its tasks
        self.load.idle("0", self.clock.seconds())
        self.advance(1)
        self.assertEqual(self.provider.cancelled, ["job-0"])
        self.advance(60)
        self.assertEqual(len(self.provider.submitted), 2)  # one replacement, not more

    def test_not_while_no_task_waits(self) -> None:
        self.load.tasks = 4  # the remaining manager's 4 workers hold them all
        self.kill("b")
        self.advance(3 * GRACE)
        self.assertEqual(self.load.drained, {})
        self.assertEqual(len(self.provider.submitted), 1)
        self.load.tasks = 40
        self.advance(2)  # short for long enough already: drained as soon as tasks wait
        self.assertIn("0", self.load.drained)

    def test_a_manager_back_in_time_keeps_the_block(self) -> None:
        self.kill("b")
        self.advance(GRACE - 5)
        self.load.connect("0", manager_id="b2", idle_since=None, active_tasks=4)
        self.advance(3 * GRACE)
        self.assertEqual(self.load.drained, {})

    def test_a_node_whose_manager_never_came(self) -> None:
        """No manager left, but one never registered: the longer start grace."""
        del self.load._managers["b"]  # never there, not gone
        self.advance(GRACE + 5)
        self.assertEqual(self.load.drained, {})
        self.advance(self.degraded.start_grace)
        self.assertIn("0", self.load.drained)

    def test_full_and_empty_blocks_are_not_short(self) -> None:
        self.advance(3 * GRACE)
        self.kill("a")
        self.kill("b")
        self.advance(3 * GRACE)
        self.assertEqual(self.load.drained, {})


class DegradedBlockIntegrationTests(TestCase):
    """LocalProvider, nodes_per_block=2, max_blocks=1: kill -9 one manager under
    load; the block is replaced and every task answered."""

    timeout = 180

    def test_killed_manager_block_replaced(self) -> Deferred[None]:
        return ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        work = tempfile.mkdtemp(prefix="funcx-degraded-")
        results: List[Result] = []
        executor = config_model.HighThroughputExecutor(
            provider=config_model.LocalProvider(
                init_blocks=1, min_blocks=0, max_blocks=1, nodes_per_block=2
            ),
            strategy=config_model.SimpleStrategy(interval=0.5, max_idletime=60.0),
            max_workers_per_node=1,
            prefetch_capacity=0,
        )
        interchange, scaling = scaled_interchange(work, executor, results)
        degraded = scaling.degraded
        assert degraded is not None
        degraded.grace = 2.0
        scaling.startService()
        stopped = False
        try:
            await wait_until(lambda: len(interchange.managers()) == 2, 60, "two managers")
            buffer = pack_function(nap) + pack_payload((0.3,), {})
            tasks = [Task(str(uuid.uuid4()), buffer) for _ in range(60)]
            interchange.submit(tasks)
            await wait_until(lambda: len(results) >= 2, 60, "first results")
            # The manager process itself (not its rank's shell): as in the issue.
            [victim, *_] = [p for p in _managers() if _is_manager_process(p)]
            os.kill(victim.pid, signal.SIGKILL)
            # The block is drained; a replacement block brings two managers.
            await wait_until(lambda: degraded.replaced == 1, 30, "the block to be drained")
            await wait_until(
                lambda: any(m.block_id == "1" for m in interchange.managers()),
                60,
                "a manager of the replacement block",
            )
            await wait_until(
                lambda: sum(m.block_id == "1" for m in interchange.managers()) == 2,
                60,
                "both managers of the replacement",
            )
            await wait_until(lambda: len(results) == 60, 120, "all results")
            self.assertEqual(len({r.task_id for r in results}), 60)
            self.assertEqual([str(r.error_details) for r in results if r.is_error], [])
            self.assertEqual(sorted(deserialize(r.data) for r in results), [0.3] * 60)
            # The degraded block was cancelled: its surviving manager is gone.
            await wait_until(lambda: scaling.scaler.block("0") is None, 30, "block 0 to end")
            await wait_until(
                lambda: len([p for p in _alive(_managers()) if _is_manager_process(p)]) == 2,
                30,
                "two managers left",
            )
            await scaling.stopService()
            await interchange.stopService()
            stopped = True
        finally:
            if not stopped:
                await scaling.stopService()
                await interchange.stopService()


def _is_manager_process(proc: psutil.Process) -> bool:
    try:
        args = proc.cmdline()
    except psutil.Error:
        return False
    return "-m" in args[:-1] and args[args.index("-m") + 1].startswith("funcx_endpoint.manager")
