"""Celery on the benchmark's RabbitMQ node: a prefork worker (--concurrency 2) and a client.

Run by bench.py with the comparison virtualenv's Python.  The broker URL
comes in ``BENCH_CELERY_BROKER`` (environment, not the command line).
Progress on stderr; the figures as JSON on the last line of stdout.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import emit, measure_system, progress  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--sleep-tasks", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--latency-samples", type=int, required=True)
    parser.add_argument("--prefetch-multiplier", type=int, default=64)
    args = parser.parse_args()

    os.environ["BENCH_CELERY_PREFETCH"] = str(args.prefetch_multiplier)
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    import celery

    progress(
        f"    celery {celery.__version__}: starting a worker (prefork, concurrency 2, "
        f"prefetch multiplier {args.prefetch_multiplier}, result backend rpc://)"
    )
    log_dir = os.environ.get("BENCH_LOG_DIR") or tempfile.gettempdir()
    log_path = os.path.join(log_dir, "celery-worker.log")
    log = open(log_path, "ab")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_tasks",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "2",
            "--prefetch-multiplier",
            str(args.prefetch_multiplier),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
        ],
        cwd=HERE,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    try:
        from celery.result import ResultSet
        from celery_tasks import TASKS

        def one(name: str):
            _, fargs, _ = WORKLOADS[name]
            return TASKS[name].delay(*fargs).get(timeout=60)

        deadline = time.monotonic() + 60
        while True:  # the worker is ready when a task comes back
            try:
                one("noop")
                break
            except Exception:
                if time.monotonic() > deadline or worker.poll() is not None:
                    with open(log_path, errors="replace") as f:
                        sys.stderr.write(f.read()[-3000:])
                    raise
                time.sleep(0.5)

        def batch(name: str, count: int):
            task = TASKS[name]
            _, fargs, _ = WORKLOADS[name]
            pending = [task.delay(*fargs) for _ in range(count)]
            return ResultSet(pending).join_native(timeout=600)

        figures = measure_system(
            "Celery",
            batch,
            one,
            tasks=args.tasks,
            sleep_tasks=args.sleep_tasks,
            warmup=args.warmup,
            latency_samples=args.latency_samples,
        )
        figures["settings"] = {
            "celery": celery.__version__,
            "prefetch_multiplier": args.prefetch_multiplier,
            "pool": "prefork",
            "concurrency": 2,
            "result_backend": "rpc://",
        }
    finally:
        try:
            os.killpg(worker.pid, signal.SIGTERM)  # warm shutdown of the worker and its pool
        except ProcessLookupError:
            pass
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        # The pool's children are in the worker's session; make sure none is left.
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
