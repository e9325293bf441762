"""State latency: task start on a worker -> ``running`` seen by the SDK.

Starts a RabbitMQ node and a funcx-service of its own, configures and starts
an endpoint daemon with 2 workers (``task_states`` on, then off), and runs
``--tasks`` tasks, two at a time, each sleeping ``--seconds``.  Each task
returns ``time.time()`` as it started (same machine, same clock); the SDK
(:class:`FuncXClient`) polls ``POST /batch_status`` every 10 ms and notes
when it first sees the task ``running``.  With states off, a task is seen
running only if a status report (every 30 s) falls inside its run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from funcx_endpoint.endpoint.layout import EndpointDir  # noqa: E402


def started_at(seconds):
    import time

    start = time.time()
    time.sleep(seconds)
    return start


def cli(config_dir: str, env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "funcx_endpoint.cli", "-c", config_dir, *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=180,
    )


def start_endpoint(service: Any, env: Dict[str, str], base: str, states: bool) -> EndpointDir:
    config_dir = os.path.join(base, "on" if states else "off")
    name = "states"
    done = cli(
        config_dir,
        env,
        "configure",
        name,
        "--service-address",
        service.base_url,
        "--service-ca-file",
        service.ca_file,
        "--amqp-ca-file",
        service.broker_ca_file,
    )
    assert done.returncode == 0, done.stderr
    ep = EndpointDir(config_dir, name)
    with open(ep.config_file) as f:
        text = f.read()
    text = text.replace('max_workers_per_node=float("inf"),', "max_workers_per_node=2,")
    if not states:
        text = text.replace("amqp_prefetch=512,", "amqp_prefetch=512, task_states=False,")
    with open(ep.config_file, "w") as f:
        f.write(text)
    done = cli(config_dir, env, "start", name)
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.time() + 60
    while "workers: 2" not in cli(config_dir, env, "status", name).stdout:
        if time.time() > deadline:
            raise RuntimeError("the endpoint's workers did not come up")
        time.sleep(0.5)
    return ep


def measure(client: Any, endpoint_id: str, tasks: int, seconds: float) -> Dict[str, Any]:
    function_id = client.register_function(started_at)
    latencies: List[float] = []
    unseen = 0
    remaining = tasks
    while remaining:
        count = min(2, remaining)
        remaining -= count
        ids = [
            client.run(seconds, endpoint_id=endpoint_id, function_id=function_id)
            for _ in range(count)
        ]
        seen: Dict[str, float] = {}
        done: Dict[str, Any] = {}
        while len(done) < len(ids):
            records = client.fetch_task_records([t for t in ids if t not in done])
            now = time.time()
            for task_id, record in records.items():
                if record["status"] == "running" and task_id not in seen:
                    seen[task_id] = now
                if not record["pending"]:
                    done[task_id] = record
            time.sleep(0.01)
        for task_id in ids:
            record = done[task_id]
            if "result" not in record:
                raise RuntimeError(f"task {task_id} failed: {record.get('exception')}")
            if task_id in seen:
                latencies.append(seen[task_id] - record["result"])
            else:
                unseen += 1
    figures: Dict[str, Any] = {"tasks": tasks, "seen_running": len(latencies), "unseen": unseen}
    if latencies:
        latencies.sort()
        figures["p50_s"] = round(statistics.median(latencies), 3)
        figures["p99_s"] = round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)
        figures["max_s"] = round(latencies[-1], 3)
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40, help="tasks per mode [40]")
    parser.add_argument("--seconds", type=float, default=1.5, help="each task's run [1.5]")
    parser.add_argument("--modes", default="on,off", help="task_states modes to run [on,off]")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    from funcx_endpoint.testing.service import sdk_client, shared_service, stop_shared_service

    service = shared_service()
    env = service.client_env(service.create_client())
    base = tempfile.mkdtemp(prefix="funcx-bench-states-")
    results: Dict[str, Any] = {}
    try:
        for mode in args.modes.split(","):
            ep = start_endpoint(service, env, base, mode == "on")
            client = sdk_client(env)
            try:
                endpoint_id = ep.endpoint_id()
                assert endpoint_id is not None
                results[mode] = measure(client, endpoint_id, args.tasks, args.seconds)
            finally:
                client.close()
                cli(ep.config_dir, env, "stop", ep.name)
            print(f"task_states {mode}: {json.dumps(results[mode])}", flush=True)
    finally:
        stop_shared_service()
    print()
    print(f"{'task_states':<12}{'seen running':>14}{'p50 (s)':>10}{'p99 (s)':>10}{'max (s)':>10}")
    for mode, figures in results.items():
        print(
            f"{mode:<12}{figures['seen_running']:>9}/{figures['tasks']:<4}"
            f"{figures.get('p50_s', '-'):>10}{figures.get('p99_s', '-'):>10}"
            f"{figures.get('max_s', '-'):>10}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
