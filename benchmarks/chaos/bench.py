"""The chaos suite as one command: see ``run`` beside this file and
:mod:`funcx_endpoint.testing.chaos`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from funcx_endpoint.testing.chaos import FAULTS, format_report, run_chaos  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=50_000, help="tasks to stream (50,000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (1)")
    parser.add_argument("--rounds", type=int, default=1, help="times each fault strikes (1)")
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="comma-separated faults (default: all): " + ", ".join(FAULTS),
    )
    parser.add_argument("--window", type=int, default=1000, help="tasks in flight (1000)")
    parser.add_argument("--batch", type=int, default=200, help="tasks per submit (200)")
    parser.add_argument(
        "--partition-seconds", type=float, default=6.0, help="length of a partition (6)"
    )
    parser.add_argument("--managers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="workers per manager (2)")
    parser.add_argument(
        "--topology",
        choices=("single", "cluster"),
        default="single",
        help="single: one broker node, one service (SQLite); cluster: three broker nodes "
        "(quorum queues), two services (PostgreSQL) behind one address each",
    )
    parser.add_argument("--state-dir", help="keep the stack's files here (default: a temp dir)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown faults: {', '.join(unknown)}")

    from twisted.internet import reactor

    thread = threading.Thread(
        target=lambda: reactor.run(installSignalHandlers=False),
        daemon=True,  # type: ignore[attr-defined]
    )
    thread.start()
    base_dir = args.state_dir or tempfile.mkdtemp(prefix="funcx-chaos-")
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}] {message}", flush=True)

    try:
        result = run_chaos(
            reactor,
            base_dir,
            tasks=args.tasks,
            seed=args.seed,
            rounds=args.rounds,
            faults=faults,
            window=args.window,
            batch=args.batch,
            partition_seconds=args.partition_seconds,
            managers=args.managers,
            workers=args.workers,
            progress=progress,
            topology=args.topology,
        )
    finally:
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]
        thread.join(10)
        if not args.state_dir:
            shutil.rmtree(base_dir, ignore_errors=True)
    print()
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_as_json(result), f, indent=2)
    bad = result.total("lost") + result.total("duplicates") + result.total("hung")
    return 1 if bad else 0


def _as_json(result: Any) -> Any:
    return {
        "seed": result.seed,
        "tasks": result.tasks,
        "seconds": result.seconds,
        "spool_fs": result.spool_fs,
        "client_errors": dict(result.client_errors),
        "answered_without_run": result.answered_without_run,
        "faults": [
            {
                "name": r.name,
                "detail": r.detail,
                "submitted": r.submitted,
                "answered": r.answered,
                "lost": r.lost,
                "duplicates": r.duplicates,
                "hung": r.hung,
                "run_twice": r.run_twice,
                "errors": dict(r.errors),
                "in_flight_at_fault": r.in_flight_at_fault,
                "action_seconds": r.action_seconds,
                "recovery_seconds": r.recovery_seconds,
            }
            for r in result.faults
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
