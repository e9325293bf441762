"""Throughput of a real funcx-service: POST /submit (batches of 100 and 1,000 tasks)
and POST /batch_status (1,000 ids), with several concurrent HTTPS clients.

Starts a RabbitMQ node and a service of its own (SQLite, then PostgreSQL
unless --sqlite-only), or measures a running service (--state-dir).  Each
client is a process with a keep-alive HTTPS session (requests) sending
prepared bodies for a fixed time; every answer is checked (200, and every
task of a submit accepted), so the figures count only work the service did.
The tasks pile up in an endpoint queue that is purged between phases.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from funcx_endpoint.wire import pack_function, pack_payload  # noqa: E402


def double(x):
    return 2 * x


def _session(ca_file: str) -> requests.Session:
    session = requests.Session()
    # REQUESTS_CA_BUNDLE (if set) would override session.verify.
    session.trust_env = False
    session.verify = ca_file
    return session


def _worker(
    url: str,
    token: str,
    ca_file: str,
    body: bytes,
    expect_tasks: int,
    start_at: float,
    seconds: float,
    out: Any,
) -> None:
    session = _session(ca_file)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: List[float] = []
    errors = 0
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = start_at + seconds
    while time.time() < deadline:
        sent = time.perf_counter()
        response = session.post(url, data=body, headers=headers, timeout=120)
        latencies.append(time.perf_counter() - sent)
        if response.status_code != 200:
            errors += 1
            continue
        answer = response.json()
        if expect_tasks:
            accepted = sum(1 for r in answer["results"] if r["http_status_code"] == 200)
            if accepted != expect_tasks:
                errors += 1
        elif len(answer["results"]) == 0:
            errors += 1
    out.put((latencies, errors, time.time() - start_at))


def run_phase(
    name: str,
    url: str,
    token: str,
    ca_file: str,
    body: bytes,
    tasks_per_request: int,
    clients: int,
    seconds: float,
) -> Dict[str, Any]:
    out: Any = multiprocessing.Queue()
    start_at = time.time() + 1.0
    procs = [
        multiprocessing.Process(
            target=_worker,
            args=(url, token, ca_file, body, tasks_per_request, start_at, seconds, out),
        )
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for proc in procs:
        proc.join()
    latencies = [lat for r in results for lat in r[0]]
    errors = sum(r[1] for r in results)
    elapsed = max(r[2] for r in results)
    requests_done = len(latencies) - errors
    latencies.sort()
    figures = {
        "phase": name,
        "requests": requests_done,
        "errors": errors,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(requests_done / elapsed, 1),
        "tasks_per_s": round(requests_done * tasks_per_request / elapsed)
        if tasks_per_request
        else None,
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1)
        if latencies
        else None,
    }
    return figures


def purge(service: Any, queue: str) -> None:
    """Empty a queue through the management API (the shared node's admin)."""
    import base64
    from urllib.parse import quote
    from urllib.request import Request, urlopen

    from funcx_endpoint.testing.rabbitmq import shared_node

    node = shared_node()
    vhost = service.admin_amqp_url.rsplit("/", 1)[1]
    auth = base64.b64encode(f"{node.admin_user}:{node.admin_password}".encode()).decode()
    request = Request(
        f"{node.management_url.rstrip('/')}/api/queues/{vhost}/{quote(queue, safe='')}/contents",
        headers={"Authorization": f"Basic {auth}"},
        method="DELETE",
    )
    with urlopen(request, timeout=60) as response:
        response.read()


def prepare(service: Any) -> Tuple[str, str, str, str]:
    """A client's token, a function and an endpoint of a service."""
    client_id, secret = service.create_client(f"bench-{uuid.uuid4().hex[:6]}")
    session = _session(service.ca_file)
    token = session.post(
        service.root_url + "/v2/oauth2/token",
        auth=(client_id, secret),
        data={
            "grant_type": "client_credentials",
            "scope": "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all",
        },
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    function_id = session.post(
        service.base_url + "/functions",
        json={"function_name": "double", "function_code": pack_function(double)},
        headers=headers,
    ).json()["function_uuid"]
    endpoint_id = session.post(
        service.base_url + "/endpoints",
        json={"endpoint_name": "bench", "endpoint_uuid": str(uuid.uuid4()), "metadata": {}},
        headers=headers,
    ).json()["endpoint_id"]
    return token, function_id, endpoint_id, service.ca_file


def measure(
    label: str, service: Any, clients: int, seconds: float, purge_queue: bool
) -> List[Dict[str, Any]]:
    token, function_id, endpoint_id, ca_file = prepare(service)
    payload = pack_payload((21,), {})
    figures = []
    task_ids: List[str] = []
    for batch in (100, 1000):
        body = json.dumps(
            {
                "tasks": [[function_id, endpoint_id, payload]] * batch,
                "task_group_id": str(uuid.uuid4()),
            }
        ).encode()
        if not task_ids:
            answer = (
                _session(ca_file)
                .post(
                    service.base_url + "/submit",
                    data=body,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                    },
                )
                .json()
            )
            task_ids = [r["task_uuid"] for r in answer["results"]]
        print(
            f"[{label}] POST /submit, {batch} tasks per request, {clients} clients, "
            f"{seconds:g} s ...",
            flush=True,
        )
        result = run_phase(
            f"submit {batch}",
            service.base_url + "/submit",
            token,
            ca_file,
            body,
            batch,
            clients,
            seconds,
        )
        figures.append(result)
        print(f"    {json.dumps(result)}", flush=True)
        if purge_queue:
            time.sleep(2)  # let the service record the last confirms
            purge(service, f"{endpoint_id}.tasks")
    while len(task_ids) < 1000:
        answer = (
            _session(ca_file)
            .post(
                service.base_url + "/submit",
                json={"tasks": [[function_id, endpoint_id, payload]] * 1000},
                headers={"Authorization": f"Bearer {token}"},
            )
            .json()
        )
        task_ids += [r["task_uuid"] for r in answer["results"]]
    body = json.dumps({"task_ids": task_ids[:1000]}).encode()
    print(
        f"[{label}] POST /batch_status, 1000 ids per request, {clients} clients, {seconds:g} s ...",
        flush=True,
    )
    result = run_phase(
        "batch_status 1000",
        service.base_url + "/batch_status",
        token,
        ca_file,
        body,
        0,
        clients,
        seconds,
    )
    figures.append(result)
    print(f"    {json.dumps(result)}", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", type=int, default=4, help="concurrent HTTP clients (processes)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--sqlite-only", action="store_true", help="skip the PostgreSQL run")
    parser.add_argument("--state-dir", help="measure the running service of this state directory")
    args = parser.parse_args()

    from funcx_endpoint.testing.service import ServiceProcess

    summary: Dict[str, List[Dict[str, Any]]] = {}
    if args.state_dir:
        service = ServiceProcess(args.state_dir)
        from funcx_endpoint.webservice.settings import ServiceSettings

        service.info = ServiceSettings.load(os.path.abspath(args.state_dir)).read_runtime()
        if not service.info:
            print(f"no running service in {args.state_dir}", file=sys.stderr)
            return 1
        summary["running service"] = measure("running", service, args.clients, args.seconds, False)
    else:
        runs: List[Tuple[str, Optional[str]]] = [("SQLite", None)]
        pg = None
        if not args.sqlite_only:
            try:
                from funcx_endpoint.testing.postgres import PostgresServer

                pg = PostgresServer()
                pg.start()
                runs.append(("PostgreSQL", pg.create_database()))
            except Exception as e:  # PostgreSQL missing: SQLite figures only
                print(f"(PostgreSQL skipped: {e})", file=sys.stderr)
        try:
            for label, database_url in runs:
                # Every submitted task stays unfinished (no endpoint takes them): lift
                # the per-user quota of tasks in flight for this measure.
                service = ServiceProcess(
                    database_url=database_url, args=["--max-tasks-in-flight", "100000000"]
                )
                print(f"[{label}] starting a service ...", flush=True)
                service.start()
                try:
                    summary[label] = measure(label, service, args.clients, args.seconds, True)
                finally:
                    service.destroy()
        finally:
            if pg is not None:
                pg.stop()
    print()
    print(
        f"funcx-service throughput ({args.clients} concurrent HTTPS clients, "
        f"{os.cpu_count()} CPUs, service + broker + clients on one machine)"
    )
    print(
        f"{'database':<12} {'call':<22} {'requests/s':>11} {'tasks/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    for label, figures in summary.items():
        for f in figures:
            print(
                f"{label:<12} {f['phase']:<22} {f['requests_per_s']:>11} "
                f"{f['tasks_per_s'] if f['tasks_per_s'] is not None else '-':>9} "
                f"{f['p50_ms']:>8} {f['p99_ms']:>8}"
            )
    bad = sum(f["errors"] for figures in summary.values() for f in figures)
    if bad:
        print(f"{bad} requests failed or were not fully accepted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
