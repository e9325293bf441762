"""The measuring loop shared by the comparison systems (standard library only).

A system supplies ``batch(workload, count)``, which submits ``count`` tasks
of a workload at once and returns their results when all are in, and
``one(workload)``, one task's result.  :func:`measure_system` warms up,
times each workload, checks every result, and times single round trips of
the no-op.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Dict, List

from workloads import WORKLOADS, latency_summary


def progress(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def measure_system(
    system: str,
    batch: Callable[[str, int], List[Any]],
    one: Callable[[str], Any],
    *,
    tasks: int,
    sleep_tasks: int,
    warmup: int,
    latency_samples: int,
    say: Callable[[str], None] = progress,
) -> Dict[str, Any]:
    figures: Dict[str, Any] = {"system": system, "errors": 0}
    for name, count in (("noop", tasks), ("echo", tasks), ("sleep", sleep_tasks)):
        expected = WORKLOADS[name][2]
        batch(name, min(warmup, count, 200 if name == "sleep" else count))
        started = time.perf_counter()
        results = batch(name, count)
        elapsed = time.perf_counter() - started
        bad = sum(1 for r in results if r != expected) + (count - len(results))
        figures["errors"] += bad
        rate = count / elapsed
        entry: Dict[str, Any] = {"tasks": count, "seconds": elapsed, "rate": rate}
        line = f"    {name:<6} {rate:>8,.0f} tasks/s ({count} in {elapsed:.2f} s)"
        if bad:
            line += f"  {bad} WRONG RESULTS"
        if name == "noop":
            found = []
            for _ in range(latency_samples):
                sent = time.perf_counter()
                one("noop")
                found.append(time.perf_counter() - sent)
            entry["latency"] = latency_summary(found)
            line += (
                f"; round trip p50 {entry['latency']['p50_ms']:.2f} ms, "
                f"p90 {entry['latency']['p90_ms']:.2f}, p99 {entry['latency']['p99_ms']:.2f}"
            )
        figures[name] = entry
        say(line)
    return figures


def emit(figures: Dict[str, Any]) -> None:
    """The figures as the last line of stdout, for the benchmark to read."""
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()
