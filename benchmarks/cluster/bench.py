"""The endpoint on a real two-node Slurm cluster (the private cluster of the tests).

A private RabbitMQ node, the real ``funcx-service``, the private Slurm cluster
(:mod:`funcx_endpoint.testing.slurm`: two ``slurmd`` nodes, each in its own
network namespace) and a real endpoint daemon whose ``config.py`` has Parsl's
``SlurmProvider`` (``nodes_per_block=2``, ``SrunLauncher``,
``max_workers_per_node=2``: 2 nodes x 2 workers) with a one-minute walltime.
The service is stopped once the daemon has registered; tasks then go straight
to the endpoint's RabbitMQ queue (the driver of ``benchmarks/endpoint_throughput``).

Figures:

1. *start to first result*: from ``funcx-endpoint start`` to the first result
   of a task published as soon as ``start`` returned: the daemon, its
   interchange, ``sbatch``, the job, ``srun``, two managers and their workers;
2. *10 ms sleep rate*: ``--tasks`` tasks of ``time.sleep(0.01)`` keeping
   ``--window`` unanswered, over the block's 4 workers, as a % of the ideal
   (4 workers / 10 ms = 400 tasks/s; the target is 90%);
3. *walltime stream*: 10 ms tasks for as long as it takes two blocks to reach
   the end of their walltime (``walltime_drain_margin`` before it, they drain
   and are replaced); tasks lost (never answered) and failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "endpoint_throughput"))

import ours  # noqa: E402
from ours import ENDPOINT_NAME, Driver, ReactorThread, RealEndpoint  # noqa: E402


def _other_load_class() -> Any:
    """``OtherLoad`` of ``benchmarks/endpoint_throughput/bench.py`` (the CPU that
    other processes of a shared machine use meanwhile)."""
    import importlib.util

    path = os.path.join(ROOT, "benchmarks", "endpoint_throughput", "bench.py")
    spec = importlib.util.spec_from_file_location("endpoint_throughput_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OtherLoad


NODES = 2
WORKERS_PER_NODE = 2
SLEEP = 0.01
IDEAL = NODES * WORKERS_PER_NODE / SLEEP


def cpu_by_kind(mark: str) -> Dict[str, float]:
    """CPU seconds used so far by this run's processes, by kind: this process
    and its descendants (RabbitMQ, the cluster's daemons, the managers and
    workers under ``slurmd``), and processes whose command line names
    ``mark`` (this run's directory: the endpoint daemon) and theirs."""
    infos = {}
    children: Dict[int, List[int]] = {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "cpu_times", "name"]):
        info = proc.info
        if info["cpu_times"] is None:
            continue
        infos[info["pid"]] = info
        children.setdefault(info["ppid"] or 0, []).append(info["pid"])
    roots = [os.getpid()]
    roots += [pid for pid, i in infos.items() if mark in " ".join(i["cmdline"] or [])]
    ours_: set = set()
    while roots:
        pid = roots.pop()
        if pid not in ours_:
            ours_.add(pid)
            roots.extend(children.get(pid, []))
    totals: Dict[str, float] = {}
    for pid in ours_:
        info = infos.get(pid)
        if info is None:
            continue
        cmdline = " ".join(info["cmdline"] or [])
        name = info["name"] or ""
        if pid == os.getpid():
            kind = "driver"
        elif "funcx_endpoint.worker" in cmdline:
            kind = "workers"
        elif "funcx_endpoint.manager" in cmdline:
            kind = "managers"
        elif "twistd" in cmdline or "funcx-endpoint" in cmdline or "funcx_endpoint" in cmdline:
            kind = "daemon"
        elif "beam" in name or "erl" in name:
            kind = "broker"
        elif name.startswith(("slurm", "srun")):
            kind = "slurm"
        else:
            kind = "other"
        times = info["cpu_times"]
        totals[kind] = totals.get(kind, 0.0) + times.user + times.system
    return totals


def say(text: str) -> None:
    print(f"[cluster] {text}", flush=True)


class SlurmEndpoint(RealEndpoint):
    """A real endpoint daemon whose blocks are Slurm jobs on ``cluster``."""

    def __init__(self, node: Any, base_dir: str, cluster: Any, args: argparse.Namespace) -> None:
        super().__init__(
            node,
            base_dir,
            workers=NODES * WORKERS_PER_NODE,
            prefetch_capacity=args.prefetch_capacity,
            amqp_prefetch=args.amqp_prefetch,
            progress=say,
        )
        self.cluster = cluster
        self.walltime = args.walltime
        self.margin = args.drain_margin
        self.start_called = 0.0

    def start(self) -> None:
        """``configure``, ``start``; stop the service once the daemon registered."""
        os.makedirs(self.base_dir, mode=0o700, exist_ok=True)
        say("starting funcx-service on the node (SQLite)")
        self.service = ours.NodeServiceProcess(
            self.node, os.path.join(self.base_dir, "service"), env=None
        )
        os.makedirs(self.service.state_dir, mode=0o700, exist_ok=True)
        self.service.start()
        self.admin_url = str(self.service.admin_amqp_url)
        client = self.service.create_client("cluster-bench")
        self.env = self.service.client_env(client)
        self.env.update(self.cluster.env)  # the daemon's sbatch, squeue, sacct, scancel
        self._check(
            self.cli(
                "configure",
                ENDPOINT_NAME,
                "--service-address",
                self.service.base_url,
                "--service-ca-file",
                self.service.ca_file,
                "--amqp-ca-file",
                self.node.ca_cert_path,
            ),
            "configure",
        )
        self._edit_config()
        say("funcx-endpoint start (a Slurm block of 2 nodes x 2 workers)")
        self._started = True
        self.start_called = time.perf_counter()
        self._check(self.cli("start", ENDPOINT_NAME), "start")
        self.endpoint_id = str(self.ep.endpoint_id())
        self.batches = ours.takes_batches(self.service.endpoint_metadata(self.endpoint_id))
        say(
            f"start returned after {time.perf_counter() - self.start_called:.1f} s "
            f"(task batches: {self.batches}); "
            f"stopping funcx-service (AMQP only now)"
        )
        self.service.stop()

    def _edit_config(self) -> None:
        with open(self.ep.config_file) as f:
            text = f.read()
        provider = (
            "provider=SlurmProvider(\n"
            f"                partition={self.cluster.partition!r},\n"
            f"                nodes_per_block={NODES},\n"
            "                init_blocks=1,\n"
            "                min_blocks=1,\n"
            "                max_blocks=1,\n"
            f"                walltime={self.walltime!r},\n"
            "                exclusive=False,\n"
            "                launcher=SrunLauncher(),\n"
            "            ),\n"
        )
        start = text.index("provider=LocalProvider(")
        end = text.index("# Scale out under load")
        text = text[:start] + provider + "            " + text[end:]
        text = (
            "from parsl.launchers import SrunLauncher\n"
            "from parsl.providers import SlurmProvider\n" + text
        )
        edits = [
            (
                r'address="127\.0\.0\.1"',
                f"address={self.cluster.address!r}, walltime_drain_margin={self.margin}",
            ),
            (r"max_workers_per_node=float\(\"inf\"\)", f"max_workers_per_node={WORKERS_PER_NODE}"),
            (r"prefetch_capacity=\d+", f"prefetch_capacity={self.prefetch_capacity}"),
            (r"amqp_prefetch=\d+", f"amqp_prefetch={self.amqp_prefetch}"),
            (r"SimpleStrategy\(interval=5,", "SimpleStrategy(interval=1,"),
        ]
        for pattern, replacement in edits:
            text, n = re.subn(pattern, replacement, text)
            if n != 1:
                raise RuntimeError(f"config.py template changed: {pattern!r} matched {n} times")
        with open(self.ep.config_file, "w") as f:
            f.write(text)

    def log_text(self) -> str:
        try:
            with open(self.ep.log_file(None), errors="replace") as f:
                return f.read()
        except OSError:
            return ""


async def stream(driver: Driver, until: Any, window: int, chunk_timeout: float) -> Dict[str, int]:
    """10 ms tasks, ``window`` unanswered, in chunks until ``until()`` says so;
    the tasks sent, answered, failed and lost (not answered within ``chunk_timeout``)."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    sent = answered = failed = lost = 0
    while not until():
        chunk = window * 50
        errors_before = driver.errors
        driver.latencies = []
        driver.to_send = chunk
        driver.window = window
        done = driver.done = Deferred()
        timer = reactor.callLater(chunk_timeout, lambda d=done: d.called or d.callback(None))
        driver._publish(min(chunk, window))
        await done
        if timer.active():
            timer.cancel()
        sent += chunk - driver.to_send
        answered += len(driver.latencies)
        failed += driver.errors - errors_before
        if driver.in_flight:
            lost += driver.in_flight
            say(f"{driver.in_flight} task(s) not answered within {chunk_timeout:.0f} s")
            driver.in_flight = 0
            driver.sent_at.clear()
            driver.to_send = 0
            driver.done = None
    return {"sent": sent, "answered": answered, "failed": failed, "lost": lost}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from funcx_endpoint.testing.rabbitmq import RabbitMQNode
    from funcx_endpoint.testing.slurm import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cluster: no Slurm cluster can run here: {reason}")
    base = tempfile.mkdtemp(prefix="funcx-bench-cluster-")
    figures: Dict[str, Any] = {"ideal_rate": IDEAL, "walltime": args.walltime}
    node = cluster = endpoint = None
    reactor_thread: Optional[ReactorThread] = None
    others = _other_load_class()([base])
    try:
        node = RabbitMQNode(os.path.join(base, "rabbitmq"))
        say("starting a private RabbitMQ node (about 10 s)")
        node.start()
        cluster = SlurmCluster(NODES)
        cluster.start()
        say(f"Slurm cluster up in {cluster.started_in:.1f} s: nodes {cluster.nodes}")
        endpoint = SlurmEndpoint(node, os.path.join(base, "endpoint"), cluster, args)
        reactor_thread = ReactorThread()
        endpoint.start()
        driver = Driver(
            reactor_thread.reactor,
            endpoint.admin_url,
            node.ca_cert_path,
            endpoint.endpoint_id,
            endpoint.batches,
        )
        call = reactor_thread.call
        call(driver.start)
        driver.set_workload("noop")
        call(driver.run, 1, 1)
        first = time.perf_counter() - endpoint.start_called
        figures["start_to_first_result_s"] = first
        say(f"1. start to first result through a Slurm block: {first:.1f} s")

        driver.set_workload("sleep")
        call(driver.run, min(args.tasks, 400), args.window)  # every worker started
        others.mark()
        cpu_before = psutil.cpu_times()
        kinds_before = cpu_by_kind(base)
        elapsed = call(driver.run, args.tasks, args.window)
        cpu_after = psutil.cpu_times()
        kinds_after = cpu_by_kind(base)
        kinds = {
            k: (v - kinds_before.get(k, 0.0)) / args.tasks * 1e6 for k, v in kinds_after.items()
        }
        figures["sleep_cpu_us_per_task"] = kinds
        say("   CPU us/task: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items())))
        total = max(1e-9, sum(cpu_after) - sum(cpu_before))
        idle = (cpu_after.idle - cpu_before.idle) / total
        iowait = (cpu_after.iowait - cpu_before.iowait) / total
        steal = (cpu_after.steal - cpu_before.steal) / total
        rate = args.tasks / elapsed
        figures["sleep_rate"] = rate
        figures["sleep_rate_percent_of_ideal"] = 100 * rate / IDEAL
        figures["sleep_errors"] = driver.errors
        figures["sleep_other_load_cores"] = busy = others.mark()
        figures["sleep_cpu_idle_percent"] = 100 * idle
        say(
            f"2. 10 ms sleep, {NODES} nodes x {WORKERS_PER_NODE} workers: {rate:.0f} tasks/s "
            f"({args.tasks} in {elapsed:.1f} s) = {100 * rate / IDEAL:.1f}% of the ideal "
            f"{IDEAL:.0f}/s (target 90%); {driver.errors} failed; other processes on "
            f"this machine used {busy:.2f} of its {os.cpu_count()} cores meanwhile, "
            f"{100 * idle:.0f}% of the CPU time was idle ({100 * iowait:.0f}% waiting for I/O, "
            f"{100 * steal:.0f}% stolen)"
        )

        def drained_blocks() -> int:
            return len(re.findall(r"Block \d+ drains", endpoint.log_text()))

        crossed: List[float] = []

        def enough() -> bool:
            """Once the last walltime's block drained, 15 s more on its replacement."""
            if not crossed and drained_blocks() >= args.walltimes:
                crossed.append(time.perf_counter())
            return bool(crossed) and time.perf_counter() - crossed[0] >= 15.0

        say(
            f"3. a stream of 10 ms tasks (window {args.stream_window}) until {args.walltimes} "
            f"blocks have reached their walltime's drain point..."
        )
        started = time.perf_counter()
        counts = call(
            stream,
            driver,
            enough,
            args.stream_window,
            60.0,
        )
        took = time.perf_counter() - started
        log = endpoint.log_text()
        figures["stream"] = dict(
            counts,
            seconds=took,
            blocks_drained=drained_blocks(),
            blocks_started=len(re.findall(r"Block \d+ submitted as slurm job", log)),
            retried_at_walltime_end=len(re.findall(r"its block's walltime ended", log)),
            manager_lost=log.count("ManagerLost"),
        )
        s = figures["stream"]
        say(
            f"3. walltime stream: {s['sent']} tasks over {took:.0f} s across "
            f"{s['blocks_drained']} walltime ends ({s['blocks_started']} blocks): "
            f"{s['lost']} lost, {s['failed']} failed"
        )
        call(driver.stop)
    finally:
        others.stop()
        if endpoint is not None:
            left = endpoint.stop()
            if left:
                say(f"processes left behind: {left}")
        if reactor_thread is not None:
            reactor_thread.stop()
        if cluster is not None:
            cluster.stop()
        if node is not None:
            node.destroy()
    return figures


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=4000, help="10 ms tasks for the rate")
    parser.add_argument("--window", type=int, default=1000, help="tasks kept unanswered")
    parser.add_argument("--stream-window", type=int, default=8, help="the stream's window")
    parser.add_argument("--walltime", default="00:01:00", help="the blocks' walltime")
    parser.add_argument("--drain-margin", type=float, default=10.0, help="walltime_drain_margin")
    parser.add_argument("--walltimes", type=int, default=2, help="walltime ends the stream crosses")
    parser.add_argument("--prefetch-capacity", type=int, default=32)
    parser.add_argument("--amqp-prefetch", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    return parser.parse_args()


def main() -> int:
    args = parse()
    load = os.getloadavg()
    say(f"cluster: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    figures = run(args)
    if args.json:
        print(json.dumps(figures, indent=2))
    ok = (
        figures["sleep_rate_percent_of_ideal"] >= 90
        and figures["stream"]["lost"] == 0
        and figures["stream"]["failed"] == 0
    )
    say("targets met" if ok else "TARGETS MISSED (see above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
