"""The funcX endpoint side of the benchmark: a real daemon, tasks straight to its queue.

:class:`RealEndpoint` starts a real ``funcx-service`` on the benchmark's
RabbitMQ node, registers a real endpoint daemon through the CLI
(``configure``, ``start``), waits until ``status`` shows the manager and its
workers, then stops the service: from then on the daemon talks only AMQP.

:class:`Driver` plays the service on the broker, as its administrator: it
binds a durable queue of its own to the ``results`` exchange with the
endpoint's routing key, deletes the service's ``results`` queue (nobody
consumes it any more), publishes persistent ``Task`` messages to the
``tasks`` exchange keeping a window of them unanswered, and checks every
result against the expected value.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil
from twisted.internet.defer import Deferred, ensureDeferred

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.client import AMQPClient
from funcx_endpoint.amqp.connection import AMQPURL, AMQPConnectionService
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.testing.service_on_node import NodeServiceProcess
from funcx_endpoint.webservice.api_checks import takes_batches
from funcx_endpoint.webservice.dispatch import TASK_BATCH_MAX
from funcx_endpoint.wire import (
    Task,
    TaskBatchMessage,
    pack,
    pack_function,
    pack_payload,
    serialize,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from workloads import WORKLOADS  # noqa: E402

ENDPOINT_NAME = "bench"
_RESULT_PREFIX = b'\x01{"message_type":"result",'
_BATCH_PREFIX = b'\x01{"message_type":"result_batch"'
_PREFIX_LEN = len(_RESULT_PREFIX)


def _env(extra: Dict[str, str], root: Optional[str] = ROOT) -> Dict[str, str]:
    """The environment of the endpoint's commands: ``root`` first on the
    Python path (None: this tree is kept off it, for another installation)."""
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT]
    if root is not None:
        parts.insert(0, root)
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    else:
        env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


class RealEndpoint:
    """A registered endpoint daemon whose web service has been stopped (blocking API)."""

    def __init__(
        self,
        node: Any,
        base_dir: str,
        *,
        workers: int = 2,
        prefetch_capacity: int = 8,
        amqp_prefetch: int = 512,
        task_states: bool = True,
        progress: Callable[[str], None] = print,
        python: str = sys.executable,
        root: Optional[str] = ROOT,
    ) -> None:
        """``python`` runs the endpoint's CLI (and so its daemon, managers and
        workers); ``root``, if given, is put first on their Python path."""
        self.node = node
        self.python = python
        self.root = root
        self.base_dir = base_dir
        self.config_dir = os.path.join(base_dir, "endpoints")
        self.workers = workers
        self.prefetch_capacity = prefetch_capacity
        self.amqp_prefetch = amqp_prefetch
        self.task_states = task_states
        self.progress = progress
        self.service: Optional[NodeServiceProcess] = None
        self.env: Dict[str, str] = {}
        self.ep = EndpointDir(self.config_dir, ENDPOINT_NAME)
        self.endpoint_id = ""
        self.batches = False
        self.admin_url = ""
        self._started = False
        self._known: Dict[int, psutil.Process] = {}

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.python, "-m", "funcx_endpoint.cli", "-c", self.config_dir, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(self.env, self.root),
            # Not this tree: ``-m`` puts the working directory first on the path.
            cwd=self.base_dir,
        )

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(
                f"funcx-endpoint {what} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )

    def start(self) -> None:
        os.makedirs(self.base_dir, mode=0o700, exist_ok=True)
        self.progress("starting funcx-service on the node (SQLite)")
        self.service = NodeServiceProcess(
            self.node, os.path.join(self.base_dir, "service"), env=None
        )
        os.makedirs(self.service.state_dir, mode=0o700, exist_ok=True)
        self.service.start()
        self.admin_url = str(self.service.admin_amqp_url)
        client = self.service.create_client("endpoint-bench")
        self.env = self.service.client_env(client)
        self.progress("configuring and starting the endpoint daemon (funcx-endpoint start)")
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
        self._started = True
        self._check(self.cli("start", ENDPOINT_NAME), "start")
        self.endpoint_id = str(self.ep.endpoint_id())
        # As the service decides: several tasks to a message if the endpoint asked.
        self.batches = takes_batches(self.service.endpoint_metadata(self.endpoint_id))
        self._wait_for_workers()
        self.progress(
            f"endpoint {self.endpoint_id} running; stopping funcx-service (AMQP only now)"
        )
        self.service.stop()

    def _edit_config(self) -> None:
        path = self.ep.config_file
        with open(path) as f:
            text = f.read()
        edits = [
            (r"max_workers_per_node=float\(\"inf\"\)", f"max_workers_per_node={self.workers}"),
            (r"prefetch_capacity=\d+", f"prefetch_capacity={self.prefetch_capacity}"),
            (
                r"amqp_prefetch=\d+",
                f"amqp_prefetch={self.amqp_prefetch}"
                + ("" if self.task_states else ", task_states=False"),
            ),
            # One block all along: no scaling in between phases.
            (r"min_blocks=0", "min_blocks=1"),
        ]
        for pattern, replacement in edits:
            text, n = re.subn(pattern, replacement, text)
            if n != 1:
                raise RuntimeError(f"config.py template changed: {pattern!r} matched {n} times")
        with open(path, "w") as f:
            f.write(text)

    def status(self) -> str:
        result = self.cli("status", ENDPOINT_NAME, timeout=30)
        return result.stdout + result.stderr

    def _wait_for_workers(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.status()
            managers = re.search(r"^\s*managers: (\d+)", text, re.M)
            workers = re.search(r"^\s*(?:total )?workers: (\d+)", text, re.M)
            if (
                managers
                and workers
                and int(managers.group(1)) >= 1
                and int(workers.group(1)) >= self.workers
            ):
                self.progress(
                    f"funcx-endpoint status: {managers.group(0).strip()}, "
                    f"{workers.group(0).strip()}"
                )
                return
            time.sleep(0.5)
        raise RuntimeError(f"the endpoint's workers did not come up:\n{text}")

    # -- processes ----------------------------------------------------------

    def processes(self) -> Dict[str, List[psutil.Process]]:
        """The daemon, its managers and its workers (cached: CPU times add up)."""
        pid = self.ep.read_pid()
        found: Dict[str, List[psutil.Process]] = {
            "daemon": [],
            "manager": [],
            "workers": [],
            "other": [],
        }
        if not pid:
            return found
        daemon = self._known.setdefault(pid, psutil.Process(pid))
        found["daemon"].append(daemon)
        for child in daemon.children(recursive=True):
            proc = self._known.setdefault(child.pid, child)
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if "funcx_endpoint.worker" in cmdline:
                kind = "workers"
            elif "manager" in cmdline:
                kind = "manager"
            else:
                kind = "other"
            found[kind].append(proc)
        return found

    def cpu_seconds(self) -> Dict[str, float]:
        totals = {}
        for kind, procs in self.processes().items():
            total = 0.0
            for proc in procs:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
            totals[kind] = total
        return totals

    def tree(self) -> List[psutil.Process]:
        pid = self.ep.read_pid()
        if not pid:
            return []
        try:
            daemon = psutil.Process(pid)
            return [daemon] + daemon.children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> List[str]:
        """Stop the daemon and the service; the processes left behind (should be none)."""
        left: List[str] = []
        procs = self.tree()
        if self._started:
            self.progress("funcx-endpoint stop")
            result = self.cli("stop", ENDPOINT_NAME)
            if result.returncode != 0:
                self.progress(f"funcx-endpoint stop exited {result.returncode}: {result.stderr}")
        if self.service is not None:
            self.service.stop()
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
            except psutil.Error:
                pass
        return left


# -- the driver -------------------------------------------------------------------


class Driver:
    """Publishes tasks to an endpoint's queue and times their results (in the reactor)."""

    def __init__(
        self, reactor: Any, admin_url: str, ca_file: str, endpoint_id: str, batches: bool = False
    ) -> None:
        """``batches``: publish several tasks to a message (``task_batch``), as the
        service does for an endpoint that asked for MESSAGE_BATCHES."""
        self.reactor = reactor
        self.endpoint_id = endpoint_id
        self.batches = batches
        self.task_key = topology.task_queue(endpoint_id)
        self.results_queue = f"bench-results-{uuid.uuid4().hex[:8]}"
        self.conn = AMQPConnectionService(
            reactor,
            AMQPURL.parse(admin_url),
            self._prepare,
            ca_file=ca_file,
            heartbeat=0,
            name="driver",
        )
        self.buffer = ""
        self.expected = ""
        self.sent_at: Dict[str, float] = {}
        self.to_send = 0
        self.window = 0
        self.in_flight = 0
        self.done: Optional[Deferred[None]] = None
        self.latencies: List[float] = []
        self.errors = 0
        self.first_error: Optional[str] = None
        self.status_reports = 0
        #: Result messages received in the current run (a batch counts once).
        self.result_messages = 0
        #: Sizes of the status reports seen during the last run(); its longest
        #: pause between two messages (seconds).
        self.phase_reports: List[int] = []
        self.last_received = 0.0
        self.longest_pause = 0.0
        self.channel: Any = None

    async def _prepare(self, client: AMQPClient) -> None:
        channel = await client.open_channel(1)
        # Our own results queue, durable like the service's.
        await channel.queue_declare(queue=self.results_queue, durable=True)
        await channel.queue_bind(
            queue=self.results_queue,
            exchange=topology.RESULTS_EXCHANGE,
            routing_key=topology.results_routing_key(self.endpoint_id),
        )
        # The service is stopped: its results queue would only fill up.
        await channel.queue_unbind(
            queue=topology.RESULTS_QUEUE,
            exchange=topology.RESULTS_EXCHANGE,
            routing_key=topology.RESULTS_BINDING,
        )
        await channel.queue_delete(queue=topology.RESULTS_QUEUE)
        await channel.queue_purge(queue=self.task_key)
        await channel.basic_qos(prefetch_count=2000)
        channel.handlers.consumers["driver"] = self._on_result
        await channel.basic_consume(queue=self.results_queue, consumer_tag="driver")
        channel.handlers.on_close = self._closed
        self.channel = channel

    def _closed(self, reason: Any) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            done.errback(RuntimeError(f"the driver's channel closed: {reason}"))

    async def start(self) -> None:
        self.conn.startService()
        await self.conn.when_connected()

    def set_workload(self, name: str) -> None:
        fn, args, expected = WORKLOADS[name]
        self.buffer = pack_function(fn) + pack_payload(args, {})
        self.expected = serialize(expected)

    def _publish(self, n: int) -> None:
        channel = self.channel
        now = time.perf_counter
        tasks = []
        for _ in range(n):
            task = Task(str(uuid.uuid4()), self.buffer)
            self.sent_at[task.task_id] = now()
            tasks.append(task)
        if self.batches:
            bodies = [
                pack(TaskBatchMessage(tasks[i : i + TASK_BATCH_MAX]))
                for i in range(0, len(tasks), TASK_BATCH_MAX)
            ]
        else:
            bodies = [pack(task) for task in tasks]
        for body in bodies:
            channel.publish(topology.TASKS_EXCHANGE, self.task_key, body, {"delivery-mode": 2})
        self.in_flight += n
        self.to_send -= n

    def _on_result(self, delivery: Delivery) -> None:
        received = time.perf_counter()
        if self.last_received:
            self.longest_pause = max(self.longest_pause, received - self.last_received)
        self.last_received = received
        body = delivery.body
        batch = bytes(body[: len(_BATCH_PREFIX)]) == _BATCH_PREFIX
        if batch or bytes(body[:_PREFIX_LEN]) == _RESULT_PREFIX:
            self.result_messages += 1
            data = json.loads(bytes(body[1:]))["data"]
            for result in data["results"] if batch else [data]:
                sent = self.sent_at.pop(result["task_id"], None)
                if sent is None:
                    continue
                self.latencies.append(received - sent)
                self.in_flight -= 1
                if result.get("error_details") is not None or result.get("data") != self.expected:
                    self.errors += 1
                    if self.first_error is None:
                        self.first_error = json.dumps(result)[:2000]
        else:
            # A status report (every heartbeat_period): not parsed, it can be big.
            self.status_reports += 1
            self.phase_reports.append(len(body))
        finished = self.to_send == 0 and self.in_flight == 0
        if delivery.delivery_tag % 100 == 0 or finished:
            self.channel.ack(delivery.delivery_tag, multiple=True)
        if self.to_send > 0 and self.in_flight < self.window:
            self._publish(min(self.to_send, self.window - self.in_flight))
        if finished and self.done is not None:
            done, self.done = self.done, None
            done.callback(None)

    async def run(self, count: int, window: int) -> float:
        """Seconds to get ``count`` results, keeping ``window`` unanswered."""
        self.latencies = []
        self.phase_reports = []
        self.result_messages = 0
        self.last_received = 0.0
        self.longest_pause = 0.0
        self.to_send = count
        self.window = window
        self.done = Deferred()
        started = time.perf_counter()
        self._publish(min(count, window))
        await self.done
        return time.perf_counter() - started

    async def round_trips(self, samples: int) -> List[float]:
        found: List[float] = []
        for _ in range(samples):
            await self.run(1, 1)
            found.extend(self.latencies)
        return found

    async def stop(self) -> None:
        if self.channel is not None and not self.channel.closed:
            try:
                await self.channel.queue_delete(queue=self.results_queue)
            except Exception:
                pass
        await self.conn.stopService()


class ReactorThread:
    """A Twisted reactor in a thread, for a benchmark whose main thread blocks."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.thread = threading.Thread(
            target=lambda: reactor.run(installSignalHandlers=False), daemon=True
        )
        self.thread.start()

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        """Run the coroutine function ``f(*args)`` in the reactor; its result (blocking)."""
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, lambda: ensureDeferred(f(*args)))

    def stop(self) -> None:
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(10)


def measure(
    endpoint: RealEndpoint,
    reactor_thread: ReactorThread,
    *,
    tasks: int,
    sleep_tasks: int,
    warmup: int,
    window: int,
    latency_samples: int,
    progress: Callable[[str], None] = print,
    broker: Optional[psutil.Process] = None,
) -> Dict[str, Any]:
    """Every workload on the endpoint; the figures as a dict."""
    driver = Driver(
        reactor_thread.reactor,
        endpoint.admin_url,
        endpoint.node.ca_cert_path,
        endpoint.endpoint_id,
        endpoint.batches,
    )
    call = reactor_thread.call
    call(driver.start)
    figures: Dict[str, Any] = {"system": "funcx-endpoint (ours)", "batches": endpoint.batches}
    try:
        for name, count in (("noop", tasks), ("echo", tasks), ("sleep", sleep_tasks)):
            driver.set_workload(name)
            call(driver.run, min(warmup, count, 200 if name == "sleep" else count), window)
            before = endpoint.cpu_seconds()
            me_before = _own_cpu()
            broker_before = _cpu(broker)
            elapsed = call(driver.run, count, window)
            reports, pause = list(driver.phase_reports), driver.longest_pause
            per_message = count / max(driver.result_messages, 1)
            after = endpoint.cpu_seconds()
            me_after = _own_cpu()
            broker_after = _cpu(broker)
            rate = count / elapsed
            cpu = {k: (after[k] - before.get(k, 0.0)) / count * 1e6 for k in after}
            cpu["driver"] = (me_after - me_before) / count * 1e6
            if broker is not None:
                cpu["broker"] = (broker_after - broker_before) / count * 1e6
            entry: Dict[str, Any] = {
                "tasks": count,
                "seconds": elapsed,
                "rate": rate,
                "cpu_us_per_task": cpu,
                "status_reports": len(reports),
                "status_report_bytes": reports,
                "longest_pause_ms": pause * 1000,
                "results_per_message": per_message,
            }
            line = (
                f"    {name:<6} {rate:>8,.0f} tasks/s ({count} in {elapsed:.2f} s); CPU us/task: "
                + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k != "other")
            )
            line += f"; {per_message:.1f} results/message; longest pause {pause * 1000:.0f} ms"
            if reports:
                line += (
                    f" ({len(reports)} status report(s) arrived meanwhile, "
                    f"{max(reports) / 1e6:.1f} MB)"
                )
            if name == "noop":
                lat = call(driver.round_trips, latency_samples)
                from workloads import latency_summary

                entry["latency"] = latency_summary(lat)
                line += (
                    f"; round trip p50 {entry['latency']['p50_ms']:.2f} ms, "
                    f"p90 {entry['latency']['p90_ms']:.2f}, p99 {entry['latency']['p99_ms']:.2f}"
                )
            figures[name] = entry
            progress(line)
        figures["errors"] = driver.errors
        figures["first_error"] = driver.first_error
        figures["status_reports_seen"] = driver.status_reports
    finally:
        call(driver.stop)
    return figures


def _own_cpu() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _cpu(proc: Optional[psutil.Process]) -> float:
    if proc is None:
        return 0.0
    try:
        times = proc.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return 0.0


def find_py_spy() -> Optional[str]:
    import shutil

    for candidate in (shutil.which("py-spy"), "/tmp/py-spy/bin/py-spy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def summarize_raw(path: str, top: int = 25) -> Dict[str, Any]:
    """Self and inclusive sample counts per function of a py-spy ``--format raw`` file."""
    self_counts: Dict[str, int] = {}
    incl_counts: Dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            try:
                count = int(count_text)
            except ValueError:
                continue
            frames = [fr for fr in stack.split(";") if fr]
            if not frames:
                continue
            total += count
            leaf = frames[-1]
            self_counts[leaf] = self_counts.get(leaf, 0) + count
            for frame in set(frames):
                incl_counts[frame] = incl_counts.get(frame, 0) + count

    def ranked(counts: Dict[str, int]) -> List[Tuple[str, float]]:
        items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, 100.0 * n / max(total, 1)) for name, n in items]

    return {"samples": total, "self": ranked(self_counts), "inclusive": ranked(incl_counts)}


def profile_daemon(
    endpoint: RealEndpoint,
    reactor_thread: ReactorThread,
    seconds: float,
    window: int,
    progress: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """py-spy record the daemon and the manager while no-op tasks flow; summaries."""
    py_spy = find_py_spy()
    if py_spy is None:
        progress("py-spy not found (pip install --target /tmp/py-spy py-spy, or put it on PATH)")
        return {}
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    procs = endpoint.processes()
    targets = {"daemon": procs["daemon"][0].pid}
    managers = [p for p in procs["manager"] if "python" in " ".join(p.cmdline())]
    if managers:
        targets["manager"] = managers[-1].pid
    spies = {}
    for label, pid in targets.items():
        raw = os.path.join(out_dir, f"endpoint_throughput-{label}.txt")
        spies[label] = (
            raw,
            subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "-o",
                    raw,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        )
    driver = Driver(
        reactor_thread.reactor,
        endpoint.admin_url,
        endpoint.node.ca_cert_path,
        endpoint.endpoint_id,
        endpoint.batches,
    )
    call = reactor_thread.call
    call(driver.start)
    driver.set_workload("noop")
    progress(f"py-spy recording {', '.join(targets)} for {seconds:g} s under no-op load")
    summaries: Dict[str, Any] = {}
    try:
        deadline = time.monotonic() + seconds + 1
        while time.monotonic() < deadline:
            call(driver.run, 2000, window)
    finally:
        call(driver.stop)
        for label, (raw, spy) in spies.items():
            spy.wait(60)
            if os.path.exists(raw):
                summaries[label] = summarize_raw(raw)
                summaries[label]["file"] = raw
    for label, summary in summaries.items():
        progress(f"{label}: {summary['samples']} samples ({summary['file']}); top self time:")
        for name, pct in summary["self"][:15]:
            progress(f"    {pct:5.1f}%  {name}")
        progress(f"{label}: top inclusive time:")
        for name, pct in summary["inclusive"][:25]:
            progress(f"    {pct:5.1f}%  {name}")
    return summaries
