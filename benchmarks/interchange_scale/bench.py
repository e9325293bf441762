"""Scaling benchmark of the interchange: one real Interchange, thousands of simulated managers.

For each scale (``--managers``, default 16, 128, 1,024 and 8,192 managers
of 8 workers each: 128 to 65,536 workers) a fresh process runs a real
:class:`~funcx_endpoint.executor.interchange.Interchange` (TLS listener,
info file, secret) and starts a few processes of simulated managers
(``managers.py``: many AMP connections each, registering exactly as real
managers do and answering every task at once with a packed result).  A
feeder, the interchange's result sink, keeps a window of no-op tasks in
flight, the way the endpoint's AMQP consumer does.  Measured:

* registration: the time until all managers are registered (from the first
  connection), with the interchange's CPU for it;
* single-task round trip (submit to result at the sink), p50 and p99: idle
  (one task at a time, nothing else in flight) and under load (a probe task
  every 20 ms while the window is kept full; it queues behind the window);
* dispatch rate: tasks/s, the median of ``--rounds`` rounds of ``--measure``
  seconds, after a ``--warm-up``, with the window full;
* CPU per task of the interchange process (the feeder's share, making and
  submitting tasks, is measured apart and shown) and of the simulated
  managers; the longest reactor turn of the interchange under load;
* memory: RSS growth of the interchange process per registered manager (and
  of the simulated managers' processes).

At the end, the rate change from the smallest to the largest scale against
the target (less than 20 % of the rate lost from 128 to 65,536 workers),
with funcX's published per-endpoint figure for context.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List, Tuple

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

#: Less than this fraction of the dispatch rate may be lost from the smallest
#: to the largest scale (issue 9).
TARGET_LOSS = 0.20
#: funcX's published per-endpoint throughput (no-op tasks), for context.
FUNCX_FIGURE = (
    "funcX (published): 1,500-1,700 tasks/s per endpoint, flat from 512 to 65,536 workers"
)
DEFAULT_SCALES = [16, 128, 1024, 8192]


def noop() -> None:
    return None


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def percentile(values: List[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# One scale, in its own process


def run_scale(options: argparse.Namespace) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    def go(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(measure_scale(reactor, options))

    react(go, _reactor=reactor)


def daemon_gc(setting: str) -> List[int]:
    """Set up the collector as the endpoint daemon does (``daemon``), with Python's
    defaults (``python``) or as given (``A,B,C``); the thresholds in force."""
    if setting == "daemon":
        try:
            from funcx_endpoint.twistd import tune_garbage_collector
        except ImportError:  # code from before it existed (an A/B run)
            pass
        else:
            tune_garbage_collector()
    elif setting != "python":
        gc.set_threshold(*(int(part) for part in setting.split(",")))
    return list(gc.get_threshold())


class Feeder:
    """The interchange's result sink: keeps a window of tasks in flight, times probes."""

    def __init__(self, clock: Any, buffer: str, chunk: int) -> None:
        from funcx_endpoint.wire import Task

        self.Task = Task
        self.clock = clock
        self.buffer = buffer
        self.chunk = chunk
        self._top_up_call: Any = None
        self.interchange: Any = None
        self.window = 0
        self.feeding = False
        self.in_flight = 0
        self.answered = 0
        self.errors = 0
        self.probes: Dict[str, Any] = {}
        self._drained: List[Any] = []

    def start(self, window: int) -> None:
        self.window = window
        self.feeding = True
        self._top_up()

    def stop(self) -> Any:
        """Stop topping up; a Deferred that fires once nothing is in flight."""
        from twisted.internet.defer import Deferred, succeed

        self.feeding = False
        if self.in_flight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drained.append(waiter)
        return waiter

    def _top_up(self) -> None:
        """Fill the window now, or (with ``chunk``) submit that many tasks now and the
        rest of the room on the next turns."""
        self._top_up_call = None
        room = self.window - self.in_flight
        if self.feeding and room > 0:
            count = min(room, self.chunk) if self.chunk else room
            self.in_flight += count
            task, buffer, new_id = self.Task, self.buffer, uuid.uuid4
            self.interchange.submit([task(new_id(), buffer) for _ in range(count)])
            if count < room:
                self._top_up_call = self.clock.callLater(0, self._top_up)

    def results_ready(self, results: List[Any]) -> None:
        now = time.perf_counter()
        probes = self.probes
        for result in results:
            if result.is_error:
                self.errors += 1
            probe = probes.pop(result.task_id, None)
            if probe is not None:
                started, waiter = probe
                waiter.callback(now - started)
                continue
            self.in_flight -= 1
            self.answered += 1
        if self._top_up_call is None:
            self._top_up()
        if self.in_flight == 0 and self._drained:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

    def probe(self) -> Any:
        """Submit one task; a Deferred firing with its round trip in seconds."""
        from twisted.internet.defer import Deferred

        task = self.Task(uuid.uuid4(), self.buffer)
        waiter: Deferred[float] = Deferred()
        self.probes[task.task_id] = (time.perf_counter(), waiter)
        self.interchange.submit([task])
        return waiter


def feeder_cost_us(buffer: str, count: int = 20_000) -> float:
    """CPU the feeder spends per task (making it) apart from the interchange."""
    from funcx_endpoint.wire import Task

    started = time.process_time()
    tasks = [Task(uuid.uuid4(), buffer) for _ in range(count)]
    elapsed = time.process_time() - started
    del tasks
    return elapsed / count * 1e6


class StallMeter:
    """How late a 5 ms timer fires: the longest reactor turns."""

    def __init__(self, clock: Any, period: float = 0.005) -> None:
        self.clock = clock
        self.period = period
        self.lateness: List[float] = []
        self._call: Any = None
        self._due = 0.0

    def start(self) -> None:
        self._due = time.perf_counter() + self.period
        self._call = self.clock.callLater(self.period, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.lateness.append(max(0.0, now - self._due))
        self._due = now + self.period
        self._call = self.clock.callLater(self.period, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()


class GcMeter:
    """Pauses of Python's cyclic garbage collector (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.pauses: List[Tuple[int, float]] = []  # (generation, seconds)
        self._started = 0.0
        self.measuring = False
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self.measuring:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def summary(self) -> Dict[str, Any]:
        full = [seconds for generation, seconds in self.pauses if generation == 2]
        return {
            "collections": len(self.pauses),
            "full_collections": len(full),
            "full_ms_max": max(full, default=0.0) * 1e3,
            "total_ms": sum(seconds for _, seconds in self.pauses) * 1e3,
        }


class ClientProcess:
    """A process of simulated managers, as the benchmark sees it."""

    def __init__(self, name: str) -> None:
        from twisted.internet.defer import Deferred
        from twisted.internet.protocol import ProcessProtocol

        owner = self
        self.name = name
        self.events: Dict[str, Dict[str, Any]] = {}
        self.ended: Deferred[None] = Deferred()
        self.transport: Any = None
        self._buffer = b""

        class Protocol(ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                owner._buffer += data
                *lines, owner._buffer = owner._buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        owner.events[event["event"]] = event

            def processEnded(self, reason: Any) -> None:
                owner.ended.callback(None)

        self.protocol = Protocol()

    @property
    def pid(self) -> int:
        return int(self.transport.pid)


async def measure_scale(reactor: Any, options: argparse.Namespace) -> None:
    from twisted.internet.defer import DeferredList
    from twisted.internet.task import LoopingCall, deferLater
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from funcx_endpoint.config.model import HighThroughputExecutor
    from funcx_endpoint.executor.interchange import Interchange
    from funcx_endpoint.wire import pack_function, pack_payload

    def sleep(seconds: float) -> Any:
        return deferLater(reactor, seconds, lambda: None)

    managers = options.managers
    workers = managers * options.worker_count
    window = options.window or options.window_per_worker * workers
    file_limit = raise_file_limit()
    cpus = sorted(os.sched_getaffinity(0))
    pinned = options.pin and len(cpus) >= 2
    if pinned:
        # The interchange has a core of its own; the simulated managers share the rest.
        os.sched_setaffinity(0, cpus[:1])
    work_dir = tempfile.mkdtemp(prefix="bench-scale-")
    log_file = open(os.path.join(work_dir, "interchange.log"), "w")
    warnings: List[str] = []

    def count_warnings(event: Dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            from twisted.logger import formatEvent

            warnings.append(formatEvent(event))

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(log_file), [LogLevelFilterPredicate(LogLevel.info)]
            ),
            count_warnings,
        ],
        redirectStandardIO=False,
    )

    buffer = pack_function(noop) + pack_payload(())
    feeder = Feeder(reactor, buffer, options.submit_chunk)
    feeder_us = feeder_cost_us(buffer)
    interchange = Interchange(
        reactor,
        work_dir,
        HighThroughputExecutor(prefetch_capacity=options.prefetch),
        feeder,
        heartbeat_period=options.heartbeat_period,
        heartbeat_threshold=4 * options.heartbeat_period,
        batch_interval=options.batch_interval,
    )
    feeder.interchange = interchange
    gc_thresholds = daemon_gc(options.gc)
    interchange.startService()
    me = psutil.Process()
    gc.collect()
    objects_start = len(gc.get_objects())
    rss_start = me.memory_info().rss
    cpu_start = cpu_seconds(me)

    # -- registration ------------------------------------------------------------
    process_count = max(1, min(options.client_processes, managers))
    clients: List[ClientProcess] = []
    started = time.perf_counter()
    for index in range(process_count):
        count = managers // process_count + (1 if index < managers % process_count else 0)
        client = ClientProcess(str(index))
        args = [
            sys.executable,
            os.path.join(HERE, "managers.py"),
            "--info-file",
            interchange.info_file,
            "--count",
            str(count),
            "--name",
            str(index),
            "--worker-count",
            str(options.worker_count),
            "--prefetch",
            str(options.prefetch),
            "--concurrency",
            str(options.concurrency),
        ]
        client.transport = reactor.spawnProcess(
            client.protocol, sys.executable, args, env=dict(os.environ), childFDs={1: "r", 2: 2}
        )
        clients.append(client)
    processes = [psutil.Process(c.pid) for c in clients]
    if pinned:
        for process in processes:
            process.cpu_affinity(cpus[1:])

    def report_registration() -> None:
        progress(
            f"registered {len(interchange.registry.managers):,}/{managers:,} managers "
            f"({time.perf_counter() - started:.1f} s)"
        )

    reporter = LoopingCall(report_registration)
    reporter.clock = reactor
    reporter.start(2.0, now=False)
    registered = interchange.when_managers(managers)
    registered.addTimeout(options.registration_timeout, reactor)

    def ended_early(_: Any) -> None:
        if not registered.called:
            registered.errback(RuntimeError("a process of simulated managers ended"))

    for client in clients:
        client.ended.addCallback(ended_early)
    try:
        await registered
    finally:
        reporter.stop()
    registration_s = time.perf_counter() - started
    registration_cpu = cpu_seconds(me) - cpu_start
    progress(f"all {managers:,} managers registered in {registration_s:.1f} s")
    while not all("registered" in c.events for c in clients):
        await sleep(0.05)
    await sleep(0.5)
    gc.collect()
    objects_registered = len(gc.get_objects())
    rss_registered = me.memory_info().rss
    client_rss = sum(
        c.events["registered"]["rss_after"] - c.events["registered"]["rss_before"] for c in clients
    )
    connect_failures = sum(c.events["registered"]["connect_failures"] for c in clients)

    def time_calls() -> Dict[str, float]:
        timings = {}
        for name in ("status", "managers"):
            call = getattr(interchange, name)
            started = time.perf_counter()
            call()
            timings[name] = (time.perf_counter() - started) * 1e3
        return timings

    idle_calls = time_calls()

    # -- idle round trips ----------------------------------------------------------
    progress(f"{options.latency_samples} single tasks, one at a time (idle)")
    idle: List[float] = []
    for _ in range(options.latency_samples):
        idle.append(await feeder.probe())

    # -- under load ------------------------------------------------------------------
    progress(f"window of {window:,} tasks in flight: {options.warm_up:g} s warm-up")
    feeder.start(window)
    await sleep(options.warm_up)
    progress(f"measuring: {options.rounds} rounds of {options.measure:g} s")
    loaded: List[float] = []
    per_second: List[float] = []
    last = [feeder.answered, time.perf_counter()]

    def probe() -> None:
        feeder.probe().addCallback(loaded.append)

    def sample_rate() -> None:
        now = time.perf_counter()
        per_second.append((feeder.answered - last[0]) / (now - last[1]))
        last[:] = [feeder.answered, now]

    probing = LoopingCall(probe)
    probing.clock = reactor
    sampling = LoopingCall(sample_rate)
    sampling.clock = reactor
    stalls = StallMeter(reactor)
    collections = GcMeter()
    answered_before = feeder.answered
    switches_before = me.num_ctx_switches().involuntary
    cpu_before = cpu_seconds(me)
    clients_before = sum(cpu_seconds(p) for p in processes)
    measure_started = time.perf_counter()
    probing.start(0.02, now=False)
    sampling.start(1.0, now=False)
    stalls.start()
    collections.measuring = True
    round_rates: List[float] = []
    loaded_calls: Dict[str, float] = {}
    for round_index in range(options.rounds):
        round_started, round_answered = time.perf_counter(), feeder.answered
        await sleep(options.measure / 2)
        if round_index == 0:
            loaded_calls = time_calls()
        await sleep(options.measure / 2)
        round_rates.append(
            (feeder.answered - round_answered) / (time.perf_counter() - round_started)
        )
        progress(f"round {round_index + 1}: {round_rates[-1]:,.0f} tasks/s")
    elapsed = time.perf_counter() - measure_started
    answered = feeder.answered - answered_before
    interchange_cpu = cpu_seconds(me) - cpu_before
    preempted = me.num_ctx_switches().involuntary - switches_before
    load_average = os.getloadavg()[0]
    clients_cpu = sum(cpu_seconds(p) for p in processes) - clients_before
    probing.stop()
    sampling.stop()
    stalls.stop()
    collections.measuring = False
    rss_loaded = me.memory_info().rss
    progress("draining")
    await feeder.stop()
    while feeder.probes:
        await sleep(0.01)

    # -- stop ------------------------------------------------------------------------
    stop_started = time.perf_counter()
    await interchange.stopService()
    stop_s = time.perf_counter() - stop_started
    ended = DeferredList([c.ended for c in clients])
    ended.addTimeout(30, reactor)
    try:
        await ended
    except Exception:
        for client in clients:
            if not client.ended.called:
                client.transport.signalProcess("KILL")
    done = [c.events.get("done", {}) for c in clients]
    log_file.close()
    if not options.keep:
        shutil.rmtree(work_dir, ignore_errors=True)

    result = {
        "managers": managers,
        "worker_count": options.worker_count,
        "workers": workers,
        "prefetch_capacity": options.prefetch,
        "window": window,
        "client_processes": process_count,
        "pinned": pinned,
        "file_limit": file_limit,
        "heartbeat_period": options.heartbeat_period,
        "registration_s": registration_s,
        "registration_cpu_s": registration_cpu,
        "connect_failures": connect_failures,
        "tasks_per_second": sorted(round_rates)[len(round_rates) // 2],
        "tasks_per_second_rounds": [round(r) for r in round_rates],
        "tasks_per_second_overall": answered / elapsed,
        "tasks_per_second_each_second": [round(r) for r in per_second],
        "tasks_measured": answered,
        "latency_idle_ms": {
            "p50": percentile(idle, 0.5) * 1e3,
            "p99": percentile(idle, 0.99) * 1e3,
        },
        "latency_loaded_ms": {
            "p50": percentile(loaded, 0.5) * 1e3,
            "p99": percentile(loaded, 0.99) * 1e3,
            "samples": len(loaded),
        },
        "interchange_cpu_us_per_task": interchange_cpu / max(answered, 1) * 1e6,
        "feeder_cpu_us_per_task": feeder_us,
        "interchange_busy": interchange_cpu / elapsed,
        "interchange_preempted": preempted,
        "load_average": load_average,
        "managers_cpu_us_per_task": clients_cpu / max(answered, 1) * 1e6,
        "longest_turn_ms": max(stalls.lateness, default=0.0) * 1e3,
        "turn_p99_ms": percentile(stalls.lateness, 0.99) * 1e3,
        "gc": dict(collections.summary(), thresholds=gc_thresholds),
        "rss_per_manager_kib": (rss_registered - rss_start) / managers / 1024,
        "gc_objects_per_manager": (objects_registered - objects_start) / managers,
        "rss_registered_mib": rss_registered / 2**20,
        "rss_loaded_mib": rss_loaded / 2**20,
        "managers_rss_per_manager_kib": client_rss / managers / 1024,
        "stop_s": stop_s,
        "status_ms": {"idle": idle_calls["status"], "loaded": loaded_calls["status"]},
        "managers_ms": {"idle": idle_calls["managers"], "loaded": loaded_calls["managers"]},
        "errors": feeder.errors,
        "warnings": len(warnings),
        "first_warnings": warnings[:3],
        "heartbeats_to_managers": sum(d.get("heartbeats_received", 0) for d in done),
        "heartbeats_from_managers": sum(d.get("heartbeats_sent", 0) for d in done),
        "batches_to_managers": sum(d.get("batches_received", 0) for d in done),
        "tasks_to_managers": sum(d.get("tasks_answered", 0) for d in done),
    }
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# The runs and the report


def report(result: Dict[str, Any]) -> None:
    r = result
    idle, loaded = r["latency_idle_ms"], r["latency_loaded_ms"]
    rates = r["tasks_per_second_each_second"]
    spread = f" (each second: {min(rates):,}-{max(rates):,})" if rates else ""
    print(
        f"{r['managers']:,} managers x {r['worker_count']} workers = {r['workers']:,} workers "
        f"(prefetch_capacity {r['prefetch_capacity']}, window {r['window']:,} tasks, "
        f"{r['client_processes']} process(es) of simulated managers"
        + (", interchange on a core of its own)" if r["pinned"] else ")")
    )
    rows = [
        (
            "registration",
            f"{r['registration_s']:.1f} s for all ({r['managers'] / r['registration_s']:,.0f} "
            f"managers/s), interchange CPU {r['registration_cpu_s'] / r['managers'] * 1e3:.2f} "
            f"ms/manager, {r['connect_failures']} failed attempts",
        ),
        (
            "dispatch rate",
            f"{r['tasks_per_second']:,.0f} tasks/s median of rounds "
            f"({', '.join(f'{x:,}' for x in r['tasks_per_second_rounds'])}){spread}",
        ),
        ("round trip, idle", f"p50 {idle['p50']:.2f} ms, p99 {idle['p99']:.2f} ms"),
        (
            "round trip, loaded",
            f"p50 {loaded['p50']:.1f} ms, p99 {loaded['p99']:.1f} ms "
            f"({loaded['samples']} probes, queued behind the window)",
        ),
        (
            "interchange CPU",
            f"{r['interchange_cpu_us_per_task']:.1f} us/task (of which the feeder "
            f"~{r['feeder_cpu_us_per_task']:.1f}), {r['interchange_busy'] * 100:.0f}% of a core; "
            f"preempted {r['interchange_preempted']:,} times (load average "
            f"{r['load_average']:.1f})",
        ),
        (
            "longest turn",
            f"{r['longest_turn_ms']:.1f} ms (p99 {r['turn_p99_ms']:.1f} ms) under load",
        ),
        (
            "garbage collector",
            f"{r['gc']['total_ms']:.0f} ms in {r['gc']['collections']} collections under load, "
            f"{r['gc']['full_collections']} full (longest {r['gc']['full_ms_max']:.0f} ms); "
            f"thresholds {', '.join(map(str, r['gc']['thresholds']))}",
        ),
        (
            "status(), managers()",
            f"{r['status_ms']['idle']:.2f} ms, {r['managers_ms']['idle']:.2f} ms idle; "
            f"{r['status_ms']['loaded']:.2f} ms, {r['managers_ms']['loaded']:.2f} ms loaded",
        ),
        (
            "memory",
            f"interchange {r['rss_per_manager_kib']:.1f} KiB and "
            f"{r['gc_objects_per_manager']:.0f} objects tracked by the collector per manager "
            f"(RSS {r['rss_registered_mib']:.0f} MiB registered, {r['rss_loaded_mib']:.0f} MiB "
            f"loaded); simulated managers {r['managers_rss_per_manager_kib']:.0f} KiB/manager",
        ),
        (
            "simulated managers",
            f"{r['managers_cpu_us_per_task']:.1f} us/task CPU; {r['batches_to_managers']:,} "
            f"SubmitTasks, {r['tasks_to_managers'] / max(r['batches_to_managers'], 1):.1f} "
            f"tasks each on average",
        ),
        ("stop", f"{r['stop_s']:.1f} s (every manager told to shut down and gone)"),
    ]
    for name, text in rows:
        print(f"  {name:<20} {text}")
    if r["errors"]:
        print(f"  ERRORS: {r['errors']} tasks failed")
    if r["warnings"]:
        print(f"  {r['warnings']} warnings logged, first: {r['first_warnings']}")


def summary(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    first, last = results[0], results[-1]
    change = last["tasks_per_second"] / first["tasks_per_second"] - 1
    return {
        "from_workers": first["workers"],
        "to_workers": last["workers"],
        "from_rate": first["tasks_per_second"],
        "to_rate": last["tasks_per_second"],
        "change": change,
        "from_cpu_us_per_task": first["interchange_cpu_us_per_task"],
        "to_cpu_us_per_task": last["interchange_cpu_us_per_task"],
        "target_loss": TARGET_LOSS,
        "met": change > -TARGET_LOSS,
    }


def orchestrate(options: argparse.Namespace, argv: List[str]) -> None:
    scales = options.managers_list
    print(
        f"# {psutil.cpu_count()} CPUs, Python {sys.version.split()[0]}; scales "
        f"{', '.join(f'{m:,}' for m in scales)} managers x {options.worker_count} workers; "
        f"heartbeats every {options.heartbeat_period:g} s both ways",
        file=sys.stderr,
        flush=True,
    )
    results = []
    for managers in scales:
        print(
            f"# {managers:,} managers ({managers * options.worker_count:,} workers)",
            file=sys.stderr,
            flush=True,
        )
        args = [sys.executable, os.path.abspath(__file__), *argv, "--role", "scale"]
        args += ["--managers", str(managers)]
        done = subprocess.run(args, stdout=subprocess.PIPE, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"the run of {managers} managers failed ({done.returncode})", file=sys.stderr)
            sys.exit(1)
        result = json.loads(lines[-1])
        results.append(result)
        if options.json:
            print(json.dumps(result))
        else:
            report(result)
        sys.stdout.flush()
    if len(results) > 1:
        outcome = summary(results)
        if options.json:
            print(json.dumps({"summary": outcome}))
            return
        print(
            f"Rate from {outcome['from_workers']:,} to {outcome['to_workers']:,} workers: "
            f"{outcome['from_rate']:,.0f} -> {outcome['to_rate']:,.0f} tasks/s "
            f"({outcome['change'] * 100:+.1f}%); target: less than {TARGET_LOSS * 100:.0f}% "
            f"lost: {'MET' if outcome['met'] else 'NOT MET'}"
        )
        print(
            f"Interchange CPU per task: {outcome['from_cpu_us_per_task']:.1f} -> "
            f"{outcome['to_cpu_us_per_task']:.1f} us (the rate at small scales is bound by "
            f"the round trip rather than the interchange's CPU: see '% of a core')"
        )
        print(FUNCX_FIGURE)


def parse_scales(text: str) -> List[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--managers",
        default=",".join(map(str, DEFAULT_SCALES)),
        help="comma-separated manager counts (default: %(default)s)",
    )
    parser.add_argument("--worker-count", type=int, default=8, help="workers per manager")
    parser.add_argument(
        "--prefetch", type=int, default=8, help="prefetch_capacity (default: the config's)"
    )
    parser.add_argument(
        "--window-per-worker",
        type=int,
        default=2,
        help="tasks in flight per worker (the same load per manager at every scale)",
    )
    parser.add_argument("--window", type=int, default=0, help="tasks in flight (a fixed number)")
    parser.add_argument(
        "--submit-chunk",
        type=int,
        default=0,
        help="tasks submitted per reactor turn at most (default: the whole room at once)",
    )
    parser.add_argument("--warm-up", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument(
        "--measure",
        type=float,
        default=6.0,
        help="seconds per measured round (rounds x measure should cover --heartbeat-period: "
        "the measurement then holds a liveness tick)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds (the rate is their median)"
    )
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not give the interchange a core of its own (the managers get the others)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="connections being made at once per process"
    )
    parser.add_argument("--heartbeat-period", type=float, default=10.0)
    parser.add_argument("--batch-interval", type=float, default=0.001)
    parser.add_argument(
        "--gc",
        default="daemon",
        help="collector thresholds: daemon (as the endpoint daemon sets them), python "
        "(Python's defaults) or A,B,C",
    )
    parser.add_argument("--registration-timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead")
    parser.add_argument("--role", default="all", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.role == "scale":
        options.managers = int(options.managers)
        run_scale(options)
        return
    options.managers_list = parse_scales(options.managers)
    forwarded = _without(argv, "--managers", "--json")
    orchestrate(options, forwarded)


def _without(argv: List[str], *names: str) -> List[str]:
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = name != "--json" and "=" not in arg
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
