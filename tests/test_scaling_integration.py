"""Scaling with everything real: interchange, LocalProvider, strategy, managers, workers.

Under load the strategy starts a second block (manager); when the work is
done and the blocks idle past ``max_idletime`` it scales in to ``min_blocks``,
and the managers' processes go away.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, List, Tuple

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from funcx_endpoint.config import model as config_model
from funcx_endpoint.endpoint.tap import manager_command
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.executor.strategy import scaling_from_config
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.wire import Result, Task, deserialize, pack_function, pack_payload
from tests.support import alive


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.05)


class ScalingIntegrationTests(TestCase):
    timeout = 120

    def test_scale_out_under_load_and_in_when_idle(self) -> Deferred[None]:
        return ensureDeferred(self._scale())

    async def _scale(self) -> None:
        work = tempfile.mkdtemp(prefix="funcx-scale-")
        results: List[Result] = []
        executor = config_model.HighThroughputExecutor(
            provider=config_model.LocalProvider(init_blocks=1, min_blocks=0, max_blocks=2),
            strategy=config_model.SimpleStrategy(interval=0.2, max_idletime=1.0),
            max_workers_per_node=1,
            prefetch_capacity=0,
        )
        interchange, scaling = scaled_interchange(work, executor, results)
        scaling.startService()
        stopped = False
        try:
            await wait_until(lambda: len(interchange.managers()) == 1, 60, "the first manager")
            buffer = pack_function(nap) + pack_payload((0.5,), {})
            tasks = [Task(str(uuid.uuid4()), buffer) for _ in range(12)]
            interchange.submit(tasks)
            # One worker per block and 12 tasks of 0.5 s: a second block starts.
            await wait_until(lambda: len(interchange.managers()) == 2, 60, "a second manager")
            self.assertEqual(len(scaling.scaler.active_blocks()), 2)
            pids = [psutil.Process(p.pid) for p in _managers()]
            await wait_until(lambda: len(results) == 12, 60, "all results")
            self.assertEqual(sorted(deserialize(r.data) for r in results), [0.5] * 12)
            self.assertTrue(all(not r.is_error for r in results))
            # Idle past max_idletime: both blocks go (min_blocks is 0), processes too.
            await wait_until(lambda: not scaling.scaler.active_blocks(), 30, "scale-in")
            await wait_until(lambda: not interchange.managers(), 30, "managers to leave")
            await wait_until(lambda: not alive(pids), 30, "manager processes to exit")
            await scaling.stopService()
            await interchange.stopService()
            stopped = True
        finally:
            if not stopped:
                await scaling.stopService()
                await interchange.stopService()


def started_interchange(work: str, executor: Any, results: List[Result]) -> Interchange:
    """A real interchange (started) for ``executor`` in ``work`` on the global
    reactor, its results into ``results`` (short heartbeats and stop grace)."""
    interchange = Interchange(
        reactor,
        os.path.join(work, "interchange"),
        executor,
        CollectingSink(results.extend),
        heartbeat_period=1.0,
        heartbeat_threshold=10.0,
        stop_grace_period=3.0,
    )
    interchange.startService()
    return interchange


def scaled_interchange(work: str, executor: Any, results: List[Result]) -> Tuple[Interchange, Any]:
    """:func:`started_interchange` and its block scaling (not started) whose
    managers are real processes."""
    interchange = started_interchange(work, executor, results)
    scaling = scaling_from_config(
        executor,
        reactor=reactor,
        load=interchange,
        command_template=manager_command(interchange),
        working_dir=work,
        stop_grace_period=3.0,
    )
    return interchange, scaling


def _managers() -> List[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "funcx_endpoint.manager" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found
