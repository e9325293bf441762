"""Cold start of one container per engine, and a warm container's per-task cost.

For each mode (raw worker, Podman, Docker): ``--cold`` times, a fresh one-slot
worker pool runs one no-op task (the time from submit to result includes
starting the worker: the container's cold start); then one pool runs
``--tasks`` no-op tasks one after another in its warm worker (median and 90th
percentile of submit-to-result).  The engines are the test harness's private
Podman setup and Docker daemon (:mod:`funcx_endpoint.testing.engines`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from typing import Any, Dict, List

from twisted.internet import defer, reactor

from funcx_endpoint.manager.containers import RAW, WorkerImage
from funcx_endpoint.manager.images import OneImagePlacement
from funcx_endpoint.manager.launcher import WorkerLauncher
from funcx_endpoint.manager.pool import WorkerPool
from funcx_endpoint.testing.engines import WORKER_IMAGE, shared_docker, shared_podman
from funcx_endpoint.wire import pack_function, pack_payload
from funcx_endpoint.wire.info import ManagerSettings
from funcx_endpoint.wire.results import read_result


def noop(x: int) -> int:
    return x


BUFFER = (pack_function(noop) + pack_payload((1,))).encode()


class Runner:
    def __init__(self, mode: str, env: Dict[str, str]) -> None:
        self.mode = mode
        self.env = env
        self.image = RAW if mode == "no_container" else WorkerImage(mode, WORKER_IMAGE)
        self.waiting: Dict[str, defer.Deferred[Any]] = {}
        self.log_dir = tempfile.mkdtemp(prefix="fx-bench-")

    def _result(self, packed: bytes) -> None:
        result = read_result(packed)
        self.waiting.pop(result.task_id).callback(result)

    def pool(self) -> WorkerPool:
        settings = ManagerSettings(worker_mode=self.mode, stop_grace_period=10)
        launcher = WorkerLauncher(reactor, settings, None, self.env)
        pool = WorkerPool(
            reactor,
            1,
            settings,
            self.log_dir,
            self._result,
            launcher=launcher,
            placement=OneImagePlacement(None),
        )
        pool.start()
        return pool

    @defer.inlineCallbacks
    def one(self, pool: WorkerPool) -> Any:
        task_id = str(uuid.uuid4())
        waiter: defer.Deferred[Any] = defer.Deferred()
        self.waiting[task_id] = waiter
        started = time.perf_counter()
        pool.submit([(task_id, BUFFER)], self.image)
        result = yield waiter
        if result.error_details is not None:
            raise RuntimeError(result.error_details.user_message)
        return time.perf_counter() - started


@defer.inlineCallbacks
def measure(runner: Runner, cold: int, tasks: int) -> Any:
    colds: List[float] = []
    for _ in range(cold):
        pool = runner.pool()
        colds.append((yield runner.one(pool)))
        yield pool.stop()
    pool = runner.pool()
    yield runner.one(pool)
    warm = []
    for _ in range(tasks):
        warm.append((yield runner.one(pool)))
    yield pool.stop()
    warm.sort()
    return colds, warm


@defer.inlineCallbacks
def main(options: argparse.Namespace) -> Any:
    rows = []
    modes = [("no_container", dict(os.environ))]
    for shared in (shared_podman, shared_docker):
        engine = shared.get()
        engine.import_worker_image()
        modes.append((engine.name, engine.env()))
    for mode, env in modes:
        runner = Runner(mode, env)
        try:
            colds, warm = yield measure(runner, options.cold, options.tasks)
        finally:
            shutil.rmtree(runner.log_dir, ignore_errors=True)
        rows.append(
            (
                mode,
                statistics.median(colds),
                min(colds),
                max(colds),
                warm[len(warm) // 2] * 1000,
                warm[int(len(warm) * 0.9)] * 1000,
            )
        )
    print("worker        cold start + first task (s)   warm task (ms)")
    print("              median    min    max         median    p90")
    for mode, median, low, high, warm_median, warm_p90 in rows:
        print(
            f"{mode:<13} {median:>6.2f} {low:>6.2f} {high:>6.2f}"
            f"         {warm_median:>6.2f} {warm_p90:>6.2f}"
        )
    raw = rows[0][4]
    for mode, *_, warm_median, _p90 in rows[1:]:
        added = warm_median - raw
        print(f"{mode}: a warm container adds {added:.2f} ms per task to a raw worker's")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=5, help="cold starts per engine")
    parser.add_argument("--tasks", type=int, default=500, help="warm tasks per engine")
    options = parser.parse_args()
    failure: List[Any] = []

    def go() -> None:
        done = main(options)
        done.addErrback(failure.append)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if failure:
        failure[0].raiseException()


if __name__ == "__main__":
    run()
