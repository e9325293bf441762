"""Benchmark of the process layer: interchange -> manager -> workers and back.

An :class:`~funcx_endpoint.executor.interchange.Interchange` runs in this
process (real TLS listener); one real ``funcx-manager`` process with
``--workers`` workers connects to it.  No-op tasks are submitted straight to
the interchange, the way the endpoint's AMQP consumer does:

* throughput: ``--tasks`` tasks, keeping at most ``--window`` unanswered (the
  endpoint's ``amqp_prefetch`` bounds it the same way; 0 submits all at
  once); reported as tasks/s (median of ``--rounds``) with the CPU each
  process spent per task;
* latency: ``--latency-samples`` single tasks one after the other (nothing
  else running); reported as round-trip percentiles.

Example: ``benchmarks/interchange_workers/run --prefetch 1 --prefetch 16``
runs everything once per prefetch capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import react

from funcx_endpoint.config.model import HighThroughputExecutor
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.testing.managers import spawn_manager
from funcx_endpoint.wire import PackedResult, Task, pack_function, pack_payload


def noop() -> None:
    return None


class Feeder:
    """Submits tasks keeping a window of them unanswered; counts results (the
    interchange's result sink)."""

    interchange: Interchange

    def __init__(self, buffer: str) -> None:
        self.buffer = buffer
        self.to_submit = 0
        self.window = 0
        self.in_flight = 0
        self.answered = 0
        self.errors = 0
        self.done: Deferred[None] = Deferred()
        self.waiters: Dict[str, Deferred[PackedResult]] = {}

    def start(self, count: int, window: int) -> Deferred[None]:
        self.to_submit = count
        self.window = window or count
        self.answered = 0
        self.done = Deferred()
        self._top_up()
        return self.done

    def _top_up(self) -> None:
        room = min(self.window - self.in_flight, self.to_submit)
        if room > 0:
            self.to_submit -= room
            self.in_flight += room
            self.interchange.submit([Task(uuid.uuid4(), self.buffer) for _ in range(room)])

    def results_ready(self, results: List[PackedResult]) -> None:
        for result in results:
            if result.is_error:
                self.errors += 1
            waiter = self.waiters.pop(result.task_id, None)
            if waiter is not None:
                waiter.callback(result)
                continue
            self.in_flight -= 1
            self.answered += 1
        self._top_up()
        if self.to_submit == 0 and self.in_flight == 0 and not self.done.called:
            self.done.callback(None)

    def one(self) -> Deferred[PackedResult]:
        task = Task(uuid.uuid4(), self.buffer)
        waiter: Deferred[PackedResult] = Deferred()
        self.waiters[task.task_id] = waiter
        self.interchange.submit([task])
        return waiter


def cpu_seconds(processes: Dict[str, psutil.Process]) -> Dict[str, float]:
    out = {}
    for name, process in processes.items():
        times = process.cpu_times()
        out[name] = times.user + times.system
    return out


async def measure(reactor: Any, options: argparse.Namespace, prefetch: int) -> Dict[str, Any]:
    work_dir = tempfile.mkdtemp(prefix="bench-interchange-")
    buffer = pack_function(noop) + pack_payload(())
    feeder = Feeder(buffer)
    interchange = feeder.interchange = Interchange(
        reactor,
        work_dir,
        HighThroughputExecutor(prefetch_capacity=prefetch),
        feeder,
        batch_interval=options.batch_interval,
    )
    interchange.startService()
    manager = spawn_manager(
        reactor,
        interchange.info_file,
        "bench",
        log_dir=os.path.join(work_dir, "manager"),
        worker_count=options.workers,
    )
    try:
        await interchange.when_managers(1)
        await feeder.start(max(200, options.workers * 50), options.window)  # warm up
        me = psutil.Process()
        parent = psutil.Process(manager.pid)
        processes = {"interchange": me, "manager": parent}
        for index, child in enumerate(parent.children()):
            processes[f"worker{index}"] = child

        rounds = []
        cpu_per_task: Dict[str, List[float]] = {name: [] for name in processes}
        for _ in range(options.rounds):
            before = cpu_seconds(processes)
            started = time.perf_counter()
            await feeder.start(options.tasks, options.window)
            elapsed = time.perf_counter() - started
            after = cpu_seconds(processes)
            rounds.append(options.tasks / elapsed)
            for name in processes:
                cpu_per_task[name].append((after[name] - before[name]) / options.tasks * 1e6)

        latencies = []
        for _ in range(options.latency_samples):
            started = time.perf_counter()
            await feeder.one()
            latencies.append((time.perf_counter() - started) * 1e6)
        latencies.sort()

        workers_cpu = [
            statistics.median(v) for k, v in cpu_per_task.items() if k.startswith("worker")
        ]
        return {
            "prefetch_capacity": prefetch,
            "workers": options.workers,
            "window": options.window,
            "tasks_per_round": options.tasks,
            "tasks_per_second": statistics.median(rounds),
            "tasks_per_second_best": max(rounds),
            "tasks_per_second_rounds": [round(r) for r in rounds],
            "cpu_us_per_task": {
                "interchange": statistics.median(cpu_per_task["interchange"]),
                "manager": statistics.median(cpu_per_task["manager"]),
                "workers": sum(workers_cpu),
            },
            "latency_us": {
                "p50": latencies[len(latencies) // 2],
                "p90": latencies[int(len(latencies) * 0.9)],
                "p99": latencies[int(len(latencies) * 0.99)],
            },
            "errors": feeder.errors,
        }
    finally:
        await interchange.stopService()
        await manager.when_ended()


def report(result: Dict[str, Any]) -> None:
    cpu = result["cpu_us_per_task"]
    latency = result["latency_us"]
    print(
        f"prefetch_capacity={result['prefetch_capacity']} workers={result['workers']} "
        f"window={result['window'] or 'all'}: "
        f"{result['tasks_per_second']:.0f} tasks/s median, "
        f"{result['tasks_per_second_best']:.0f} best "
        f"(rounds: {', '.join(map(str, result['tasks_per_second_rounds']))})"
    )
    print(
        f"  CPU per task: interchange {cpu['interchange']:.0f} us, manager "
        f"{cpu['manager']:.0f} us, workers {cpu['workers']:.0f} us "
        f"(total {sum(cpu.values()):.0f} us)"
    )
    print(
        f"  single-task round trip: p50 {latency['p50']:.0f} us, p90 {latency['p90']:.0f} us, "
        f"p99 {latency['p99']:.0f} us"
    )
    if result["errors"]:
        print(f"  ERRORS: {result['errors']} tasks failed")


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10000, help="tasks per throughput round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=512, help="unanswered tasks at most")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--prefetch",
        type=int,
        action="append",
        help="prefetch_capacity (repeatable; default: 1, the config default, and 16)",
    )
    parser.add_argument("--batch-interval", type=float, default=0.001)
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead")
    options = parser.parse_args(argv)
    prefetches = options.prefetch or [1, 16]
    print(
        f"# {psutil.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
        f"{options.tasks} no-op tasks x {options.rounds} rounds",
        file=sys.stderr,
    )

    async def run_all(reactor: Any) -> None:
        for prefetch in prefetches:
            result = await measure(reactor, options, prefetch)
            if options.json:
                print(json.dumps(result))
            else:
                report(result)
            sys.stdout.flush()

    react(lambda r: Deferred.fromCoroutine(run_all(r)), _reactor=reactor)


if __name__ == "__main__":
    main(sys.argv[1:])
