"""Parsl's HighThroughputExecutor with 2 workers (LocalProvider), ``@python_app`` tasks.

Run by bench.py with the comparison virtualenv's Python.  Progress on
stderr; the figures as JSON on the last line of stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# The workers import the workloads module (Parsl pickles module functions by reference).
os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
# Parsl starts interchange.py and process_worker_pool.py from PATH: this venv's bin.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

from common import emit, measure_system, progress  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--sleep-tasks", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--latency-samples", type=int, required=True)
    parser.add_argument("--prefetch-capacity", type=int, default=0)
    parser.add_argument(
        "--debug-log",
        action="store_true",
        help="keep Parsl's default DEBUG log file (parsl.log); off by default",
    )
    args = parser.parse_args()

    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    run_dir = tempfile.mkdtemp(prefix="parsl-bench-")
    progress(
        f"    parsl {parsl.__version__}: HighThroughputExecutor, max_workers_per_node=2, "
        f"prefetch_capacity={args.prefetch_capacity}, LocalProvider (1 block)"
    )
    htex = HighThroughputExecutor(
        label="htex",
        address="127.0.0.1",
        max_workers_per_node=2,
        cores_per_worker=1,
        prefetch_capacity=args.prefetch_capacity,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
        worker_logdir_root=run_dir,
    )
    config = Config(
        executors=[htex],
        run_dir=run_dir,
        strategy="none",
        initialize_logging=args.debug_log,
    )
    if not args.debug_log:
        logging.getLogger("parsl").setLevel(logging.WARNING)
    dfk = None
    try:
        dfk = parsl.load(config)
        apps = {
            name: parsl.python_app(fn, executors=["htex"]) for name, (fn, _, _) in WORKLOADS.items()
        }

        def one(name: str):
            return apps[name](*WORKLOADS[name][1]).result(timeout=120)

        one("noop")  # wait for the workers

        def batch(name: str, count: int):
            app = apps[name]
            fargs = WORKLOADS[name][1]
            futures = [app(*fargs) for _ in range(count)]
            return [f.result(timeout=600) for f in futures]

        figures = measure_system(
            "Parsl HTEX",
            batch,
            one,
            tasks=args.tasks,
            sleep_tasks=args.sleep_tasks,
            warmup=args.warmup,
            latency_samples=args.latency_samples,
        )
        figures["settings"] = {
            "parsl": parsl.__version__,
            "max_workers_per_node": 2,
            "prefetch_capacity": args.prefetch_capacity,
            "encrypted": htex.encrypted,
            "debug_log": args.debug_log,
        }
    finally:
        if dfk is not None:
            dfk.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
