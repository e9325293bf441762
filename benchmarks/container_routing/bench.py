"""Warm-aware routing against random routing: the funcX TPDS paper's container experiment.

One process runs a real :class:`~funcx_endpoint.executor.interchange.Interchange`
(TLS listener, info file, secret, AMP) and connects simulated container
managers to it (:mod:`funcx_endpoint.testing.warm_managers`: each has a few
warm slots; a task whose type has no idle warm slot pays a cold start, in an
unused slot or by retiring the least recently used idle container).  All
``--tasks`` tasks, of ``--types`` container types drawn at random, are
submitted at once; measured: the time until the last result, and the cold
starts the managers made, for

* **soft** routing (:class:`~funcx_endpoint.executor.soft_routing.WarmFirstRouting`,
  ``scheduler_mode="soft"``): a manager with a warm worker of the task's type
  first, else one with an idle worker at random;
* **random** routing (:class:`~funcx_endpoint.executor.soft_routing.RandomRouting`):
  every task to a random manager with room.

The same managers' behaviour and the same task sequence for both; a fresh
interchange and fresh managers for each run.  The cold start cost is
simulated (``--cold-start`` seconds, default 1.0 s: container cold starts
measured by the funcX paper were 1.79 s for Docker and 1.22 s for Singularity
on EC2); so is every task's run time (``--task-seconds``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred

from funcx_endpoint.config.model import HighThroughputExecutor
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.executor.soft_routing import RandomRouting, WarmFirstRouting
from funcx_endpoint.testing.warm_managers import SlotSettings, connect_managers
from funcx_endpoint.wire import Container, PackedResult, Task

#: At least this fraction less completion time with soft routing (issue 11).
TARGET = 0.50
PAPER = "funcX TPDS paper: up to 61% less completion time with warm-aware routing"


class Sink:
    """Counts results; fires ``done`` at the ``expected``-th."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.failed = 0
        self.done: Deferred[float] = Deferred()

    def results_ready(self, results: List[PackedResult]) -> None:
        self.count += len(results)
        self.failed += sum(1 for r in results if r.is_error)
        if self.count >= self.expected and not self.done.called:
            self.done.callback(time.perf_counter())


def make_tasks(options: argparse.Namespace) -> List[Task]:
    rng = random.Random(options.seed)
    containers = [
        Container(uuid.UUID(int=rng.getrandbits(128)), f"type-{i}") for i in range(options.types)
    ]
    return [
        Task(uuid.UUID(int=rng.getrandbits(128)), "buffer", container=rng.choice(containers))
        for _ in range(options.tasks)
    ]


async def run_once(options: argparse.Namespace, policy: str) -> Dict[str, Any]:
    work_dir = tempfile.mkdtemp(prefix="container-routing-")
    sink = Sink(options.tasks)
    if policy == "soft":
        routing: Any = WarmFirstRouting(
            reactor,
            cold_routing_interval=options.cold_routing_interval,
            rng=random.Random(options.seed),
        )
    else:
        routing = RandomRouting(rng=random.Random(options.seed))
    interchange = Interchange(reactor, work_dir, HighThroughputExecutor(), sink, routing=routing)
    interchange.startService()
    settings = SlotSettings(
        worker_count=options.workers,
        prefetch_capacity=options.prefetch,
        cold_start=options.cold_start,
        task_seconds=options.task_seconds,
    )
    try:
        managers = await connect_managers(
            reactor, interchange.info_file, options.managers, settings
        )
        await interchange.when_managers(options.managers)
        tasks = make_tasks(options)
        started = time.perf_counter()
        interchange.submit(tasks)
        finished = await sink.done
        elapsed = finished - started
        cold_starts = sum(m.cold_starts for m in managers)
        warm, reported = interchange.dispatcher.warm_totals()
        return {
            "policy": policy,
            "seconds": round(elapsed, 3),
            "cold_starts": cold_starts,
            "cold_starts_reported": reported,
            "tasks": sink.count,
            "failed": sink.failed,
        }
    finally:
        await interchange.stopService()
        shutil.rmtree(work_dir, ignore_errors=True)


async def main(options: argparse.Namespace) -> None:
    runs: Dict[str, List[Dict[str, Any]]] = {"soft": [], "random": []}
    for _ in range(options.repeat):
        for policy in ("soft", "random"):
            outcome = await run_once(options, policy)
            runs[policy].append(outcome)
            if not options.json:
                print(
                    f"  {policy:6s}: {outcome['seconds']:7.2f} s, "
                    f"{outcome['cold_starts']:5d} cold starts",
                    flush=True,
                )
    soft = statistics.median(r["seconds"] for r in runs["soft"])
    rand = statistics.median(r["seconds"] for r in runs["random"])
    soft_cold = statistics.median(r["cold_starts"] for r in runs["soft"])
    rand_cold = statistics.median(r["cold_starts"] for r in runs["random"])
    reduction = 1 - soft / rand if rand else 0.0
    summary = {
        "setup": {
            "tasks": options.tasks,
            "types": options.types,
            "managers": options.managers,
            "warm_slots_per_manager": options.workers,
            "prefetch_capacity": options.prefetch,
            "task_seconds": options.task_seconds,
            "cold_start_seconds": options.cold_start,
            "cold_start_simulated": True,
            "cold_routing_interval": options.cold_routing_interval,
            "repeat": options.repeat,
        },
        "runs": runs,
        "soft_seconds": soft,
        "random_seconds": rand,
        "soft_cold_starts": soft_cold,
        "random_cold_starts": rand_cold,
        "completion_time_reduction": round(reduction, 3),
        "cold_start_reduction": round(1 - soft_cold / rand_cold, 3) if rand_cold else 0.0,
        "target": TARGET,
        "met": reduction >= TARGET,
    }
    if options.json:
        print(json.dumps(summary, indent=1))
        return
    print()
    print(
        f"Completion time: soft {soft:.2f} s, random {rand:.2f} s: "
        f"{reduction:.0%} less with warm-aware routing "
        f"(target {TARGET:.0%}: {'met' if reduction >= TARGET else 'NOT met'}; {PAPER})"
    )
    print(
        f"Cold starts: soft {soft_cold:g}, random {rand_cold:g} "
        f"({summary['cold_start_reduction']:.0%} fewer)"
    )
    print(
        f"The cold start cost is SIMULATED ({options.cold_start:g} s per cold start; "
        f"tasks {options.task_seconds:g} s each): managers are simulated, the interchange "
        f"and its routing are real."
    )


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--types", type=int, default=5, help="container types")
    parser.add_argument("--managers", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="warm slots per manager")
    parser.add_argument("--prefetch", type=int, default=1, help="prefetch_capacity")
    parser.add_argument(
        "--cold-start", type=float, default=1.0, help="seconds per cold start (simulated)"
    )
    parser.add_argument("--task-seconds", type=float, default=0.05)
    parser.add_argument("--cold-routing-interval", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    if not options.json:
        print(
            f"{options.tasks} tasks of {options.types} container types on {options.managers} "
            f"simulated managers x {options.workers} warm slots; cold start "
            f"{options.cold_start:g} s (simulated), tasks {options.task_seconds:g} s",
            flush=True,
        )
    failures: List[Any] = []

    def run() -> None:
        d = ensureDeferred(main(options))
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if failures:
        failures[0].printTraceback()
        sys.exit(1)
