"""The three workloads, shared by every system measured (no project imports).

funcX serializes these functions by their source (method ``04``): a worker
runs the ``def`` text alone, so what a function needs is imported inside it.
Celery, Parsl and ProcessPoolExecutor import this module (by reference).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

#: The 1 KB echo argument (a str of exactly 1,024 characters).
ECHO_PAYLOAD = "x" * 1024
#: The ideal rate of 10 ms sleep tasks on 2 workers (tasks/s).
SLEEP_IDEAL = 200.0


def noop():
    return None


def echo(x):
    return x


def sleep10():
    import time

    time.sleep(0.01)


#: name -> (function, args, expected result)
WORKLOADS: Dict[str, Tuple[Any, Tuple[Any, ...], Any]] = {
    "noop": (noop, (), None),
    "echo": (echo, (ECHO_PAYLOAD,), ECHO_PAYLOAD),
    "sleep": (sleep10, (), None),
}

#: Labels for the table.
LABELS = {"noop": "no-op", "echo": "1 KB echo", "sleep": "10 ms sleep"}


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(seconds):
    """p50/p90/p99 in milliseconds of a list of round trips in seconds."""
    return {
        "p50_ms": percentile(seconds, 0.5) * 1000,
        "p90_ms": percentile(seconds, 0.9) * 1000,
        "p99_ms": percentile(seconds, 0.99) * 1000,
        "samples": len(seconds),
    }
