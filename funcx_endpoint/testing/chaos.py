"""The chaos suite: tasks streamed through the whole stack while parts of it fail.

:func:`run_chaos` starts a :class:`~funcx_endpoint.testing.chaos_stack.ChaosStack`
(RabbitMQ, a partitionable proxy, ``funcx-service``, an endpoint daemon with
its managers and workers), streams ``tasks`` tasks through the SDK
(:class:`~funcx_endpoint.sdk.FuncXClient`: ``POST /submit`` in batches, a
window of tasks in flight, ``POST /batch_status`` to collect answers) and the
service, and injects the faults of :data:`FAULTS` on a schedule drawn from
``seed``: their order, the point of the stream where each strikes, and which
manager or worker dies.

Each task runs :func:`record_run` with a unique number: the function appends
the number to a file of its worker process before answering, so the files
say how often each task's function ran, whatever the answers say.

What is counted, per fault (see :class:`FaultReport`), against the delivery
promise (``DESIGN.md``): every accepted task ends with exactly one answer, a
result or a named error.

- *lost*: an accepted task the service no longer knows, or an answer that
  belongs to another task (a wrong result);
- *duplicated*: the client saw a task's answer change after it first saw it
  (a second answer for the same task replacing the first);
- *hung*: a task still pending when the stream has drained (no answer within
  ``drain_timeout`` after the last submission);
- *run twice*: a task whose function ran more than once (allowed: execution
  is at-least-once after a kill), counted, not failed.

A task is counted under the first fault that struck while it was in flight
(submitted, not answered), else under the last fault before its submission
(``none`` before the first one).  *Time to recover* is from the fault's
injection until every task that was in flight then, or sent while the fault
lasted (a broker restart takes seconds), has its answer, and so has one sent
after it.
"""

from __future__ import annotations

import functools
import os
import random
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attr

__all__ = [
    "FAULTS",
    "ChaosResult",
    "FaultReport",
    "format_report",
    "record_run",
    "run_chaos",
    "schedule",
]


def record_run(log_dir: str, n: int) -> int:
    """The chaos task: note that task ``n`` ran (in a file of this worker), answer 2n+1."""
    import os

    path = os.path.join(log_dir, f"runs-{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d\n" % n)
    finally:
        os.close(fd)
    return 2 * n + 1


# -- the faults ------------------------------------------------------------------------------

#: name -> what it does to the stack (given the stack, a seeded Random and the
#: partition length in seconds); returns a description of what was done.
FAULTS: Dict[str, Callable[[Any, random.Random, float], str]] = {
    "broker-restart": lambda stack, rng, s: stack.restart_broker(),
    "broker-kill": lambda stack, rng, s: stack.kill_broker(),
    "broker-close-connections": lambda stack, rng, s: stack.close_broker_connections(),
    "daemon-kill": lambda stack, rng, s: stack.kill_daemon(),
    "manager-kill": lambda stack, rng, s: stack.kill_manager(rng),
    "worker-kill": lambda stack, rng, s: stack.kill_worker(rng),
    "service-kill": lambda stack, rng, s: stack.kill_service(),
    "partition": lambda stack, rng, s: stack.partition(s),
    "spool-disk-full": lambda stack, rng, s: stack.full_disk(s),
}


def schedule(
    seed: int, tasks: int, rounds: int = 1, faults: Sequence[str] = tuple(FAULTS)
) -> List[Tuple[int, int, str]]:
    """``(strike, gate, fault name)`` for each fault ``rounds`` times, in a
    seeded order, spread over the stream.

    The stream is cut into one slot per fault plus a quiet first one; each
    fault strikes once ``strike`` tasks were submitted, a seeded point in the
    first half of its slot, and no task past ``gate`` (the middle of its slot)
    is submitted before it struck: every fault meets tasks in flight however
    fast the stream runs and however long the fault before it lasted.
    """
    rng = random.Random(seed)
    names: List[str] = []
    for _ in range(rounds):
        batch = list(faults)
        rng.shuffle(batch)
        names.extend(batch)
    slot = tasks / (len(names) + 1)
    plan = []
    for i, name in enumerate(names):
        start = slot * (i + 1)
        plan.append((int(start + rng.uniform(0.0, 0.4) * slot), int(start + 0.5 * slot), name))
    return plan


# -- the figures -------------------------------------------------------------------------------


@attr.s(auto_attribs=True)
class FaultReport:
    """The figures of one fault (or of ``none``: tasks before any fault)."""

    name: str
    detail: str = ""
    submitted: int = 0
    answered: int = 0
    lost: int = 0
    duplicates: int = 0
    hung: int = 0
    run_twice: int = 0
    errors: Counter[str] = attr.ib(factory=Counter)
    #: Seconds the fault itself took (e.g. a broker restart).
    action_seconds: float = 0.0
    #: Seconds from injection until the tasks in flight then, or sent while the
    #: fault lasted, were all answered.
    recovery_seconds: Optional[float] = None
    in_flight_at_fault: int = 0
    #: When the fault struck (monotonic clock), and the tasks in flight then.
    struck: float = attr.ib(default=0.0, repr=False)
    #: Tasks numbered from this one were sent after the fault.
    canary_from: int = attr.ib(default=0, repr=False)
    watch: List[Any] = attr.ib(factory=list, repr=False)


@attr.s(auto_attribs=True)
class ChaosResult:
    seed: int
    tasks: int
    seconds: float
    faults: List[FaultReport]
    spool_fs: str
    #: Errors of the client's own calls (submit, status), by exception name.
    client_errors: Counter[str] = attr.ib(factory=Counter)
    #: Task numbers whose function never ran although answered with success.
    answered_without_run: int = 0

    def total(self, field: str) -> int:
        return sum(getattr(report, field) for report in self.faults)


@attr.s(auto_attribs=True, eq=False)
class _Task:
    n: int
    task_id: str
    submitted: float
    fault: int  # index into the fault list: where the task is counted
    answered: Optional[float] = None
    record: Any = None
    #: A fault struck while it was in flight (it is counted under the first).
    hit: bool = False


def _error_name(record: Dict[str, Any]) -> Optional[str]:
    error = record.get("exception")
    if error is None:
        return None
    return getattr(error, "error_code", None) or type(error).__name__


def _answer_key(record: Dict[str, Any]) -> Tuple[Any, ...]:
    return (record.get("status"), record.get("result"), _error_name(record))


# -- the stream ---------------------------------------------------------------------------


class _Stream:
    """Submits, collects and attributes tasks; the faults strike from another thread."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        endpoint_id: str,
        log_dir: str,
        *,
        tasks: int,
        window: int,
        batch: int,
        gates: Sequence[int],
        progress: Callable[[str], None],
    ) -> None:
        self.client_factory = client_factory
        self.endpoint_id = endpoint_id
        self.log_dir = log_dir
        self.count = tasks
        self.window = window
        self.batch = batch
        self.gates = list(gates)
        if self.gates:
            # The last batch waits for the last fault to be over: its canaries.
            self.gates.append(max(self.gates[-1], tasks - batch))
        self.progress = progress
        self.lock = threading.Lock()
        self.tasks: Dict[str, _Task] = {}
        #: The tasks in the order sent: task number n is order[n].
        self.order: List[_Task] = []
        self.pending: Dict[str, _Task] = {}
        self.submitted = 0
        self.answered = 0
        self.reports: List[FaultReport] = [FaultReport("none")]
        self.client_errors: Counter[str] = Counter()
        self.function_id = ""
        self.done_submitting = threading.Event()
        self.stop = threading.Event()
        self.progress_event = threading.Condition(self.lock)
        self.last_answer = self.last_sent = time.monotonic()

    # -- submitting ----------------------------------------------------------------------

    def register(self, client: Any) -> None:
        self.function_id = self._retry(lambda: client.register_function(record_run), "register")

    def _retry(self, call: Callable[[], Any], what: str) -> Any:
        while True:
            try:
                return call()
            except Exception as error:  # counted and tried again: the service may be down
                self._client_error(what, error)
                if self.stop.is_set():
                    raise
                time.sleep(0.5)

    def _client_error(self, what: str, error: Exception) -> None:
        """Count a failed SDK call, in all and under the fault of the moment."""
        name = f"{what}: {type(error).__name__}"
        with self.lock:
            self.client_errors[name] += 1
            self.reports[-1].errors[f"client {name}"] += 1

    def submit_loop(self) -> None:
        client = self.client_factory()
        try:
            n = 0
            while n < self.count and not self.stop.is_set():
                with self.lock:
                    while not self.stop.is_set():
                        struck = len(self.reports) - 1
                        gate = self.gates[struck] if struck < len(self.gates) else self.count
                        room = min(self.batch, gate - n, self.window - len(self.pending))
                        if room > 0:
                            break
                        self.progress_event.wait(0.5)
                    else:
                        return
                numbers = list(range(n, n + room))
                ids = self._submit(client, numbers)
                now = time.monotonic()
                with self.lock:
                    fault = len(self.reports) - 1
                    for number, task_id in zip(numbers, ids):
                        task = _Task(number, task_id, now, fault)
                        self.tasks[task_id] = task
                        self.order.append(task)
                        self.pending[task_id] = task
                    self.submitted += len(ids)
                    self.last_sent = now
                    self.progress_event.notify_all()
                n += room
        finally:
            self.done_submitting.set()
            client.close()

    def _submit(self, client: Any, numbers: List[int]) -> List[str]:
        def call() -> List[str]:
            batch = client.create_batch()
            for number in numbers:
                batch.add(
                    self.log_dir,
                    number,
                    endpoint_id=self.endpoint_id,
                    function_id=self.function_id,
                )
            return list(client.batch_run(batch))

        # A failed submit is made again with the same numbers: if the service
        # had taken the first one, its tasks run too (counted as run twice).
        return list(self._retry(call, "submit"))

    # -- collecting ----------------------------------------------------------------------

    def poll_loop(self, interval: float = 0.3) -> None:
        client = self.client_factory()
        try:
            while not self.stop.is_set():
                with self.lock:
                    ids = list(self.pending)
                if not ids:
                    if self.done_submitting.is_set():
                        return
                    time.sleep(interval)
                    continue
                try:
                    records = client.fetch_task_records(ids)
                except Exception as error:
                    self._client_error("status", error)
                    time.sleep(0.5)
                    continue
                now = time.monotonic()
                with self.lock:
                    for task_id, record in records.items():
                        task = self.pending.get(task_id)
                        if task is None or record.get("pending"):
                            continue
                        task.answered = now
                        task.record = record
                        del self.pending[task_id]
                        self.answered += 1
                        self.last_answer = now
                    self.progress_event.notify_all()
                time.sleep(interval)
        finally:
            client.close()

    # -- faults ------------------------------------------------------------------------

    def strike(self, name: str, action: Callable[[], str]) -> FaultReport:
        """Count the tasks in flight under a new fault, then run ``action``."""
        with self.lock:
            report = FaultReport(name)
            self.reports.append(report)
            index = len(self.reports) - 1
            in_flight = list(self.pending.values())
            for task in in_flight:
                if not task.hit:
                    # In flight at a fault for the first time: counted under it.
                    task.fault = index
                    task.hit = True
            report.in_flight_at_fault = len(in_flight)
            report.watch = in_flight
            report.struck = time.monotonic()
            self.progress_event.notify_all()
        try:
            report.detail = action()
        except Exception as error:
            report.detail = f"FAILED: {type(error).__name__}: {error}"
            self.progress(f"  fault {name} failed: {error}")
        report.action_seconds = time.monotonic() - report.struck
        with self.lock:
            # What was sent during the fault (e.g. while the broker was down)
            # is part of what has to come through once it is over.
            watched = {id(task) for task in report.watch}
            report.watch.extend(t for t in self.pending.values() if id(t) not in watched)
            # And new work must come through: the next tasks sent (let past
            # the next fault's gate if need be) are its canaries.
            report.canary_from = self.submitted
            index = len(self.reports) - 1
            if index < len(self.gates):
                # After the last fault, nothing is held back any more.
                last = index == len(self.gates) - 1
                floor = self.count if last else self.submitted + self.batch
                self.gates[index] = min(self.count, max(self.gates[index], floor))
            self.progress_event.notify_all()
        return report

    def top_up(self, fault: int, timeout: float = 30.0) -> None:
        """Before fault number ``fault`` strikes: if the stream has drained at
        its gate (the fault before lasted long), let up to a window of tasks
        past the gate, so that the fault meets tasks in flight."""
        deadline = time.monotonic() + timeout
        with self.lock:
            want = min(self.window // 2, self.count - self.submitted)
            if len(self.pending) >= want or fault >= len(self.gates):
                return
            self.gates[fault] = min(
                self.count, max(self.gates[fault], self.submitted + self.window // 2)
            )
            self.progress_event.notify_all()
            while len(self.pending) < want and self.submitted < self.gates[fault]:
                if time.monotonic() > deadline or self.stop.is_set():
                    return
                self.progress_event.wait(0.2)

    def wait_recovered(self, report: FaultReport, timeout: float) -> None:
        """Until the tasks in flight at ``report``'s fault, or sent while it
        lasted, are answered, and one sent after it (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        watch: List[_Task] = report.watch
        struck = report.struck
        with self.lock:
            while True:
                left = [t for t in watch if t.answered is None]
                canary = self._canary(report)
                if not left and canary is not None:
                    break
                if time.monotonic() > deadline or self.stop.is_set():
                    return
                self.progress_event.wait(0.5)
            times = [t.answered or struck for t in watch]
            if canary is not False and canary is not None:
                times.append(canary)
            report.recovery_seconds = max(times, default=struck) - struck

    def _canary(self, report: FaultReport) -> Any:
        """When the first task sent after the fault was answered; None: not
        yet; False: no task was left to send."""
        if report.canary_from >= self.count:
            return False
        start = report.canary_from
        answered = [
            t.answered for t in self.order[start : start + self.batch] if t.answered is not None
        ]
        return min(answered) if answered else None


# -- the whole run -----------------------------------------------------------------------------


def _read_runs(log_dir: str) -> Counter[int]:
    runs: Counter[int] = Counter()
    for name in os.listdir(log_dir):
        if not name.startswith("runs-"):
            continue
        with open(os.path.join(log_dir, name), "rb") as f:
            for line in f:
                line = line.strip()
                if line:
                    runs[int(line)] += 1
    return runs


def run_chaos(
    reactor: Any,
    base_dir: str,
    *,
    tasks: int = 50_000,
    seed: int = 1,
    rounds: int = 1,
    faults: Sequence[str] = tuple(FAULTS),
    window: int = 1000,
    batch: int = 200,
    partition_seconds: float = 6.0,
    recovery_timeout: float = 120.0,
    drain_timeout: float = 120.0,
    managers: int = 2,
    workers: int = 2,
    progress: Callable[[str], None] = print,
    topology: str = "single",
) -> ChaosResult:
    """Start the stack in ``base_dir``, stream ``tasks`` tasks under faults, stop
    the stack; the figures.  Blocking: call it from a thread, with the
    reactor running (the proxy runs on it).  ``topology`` is ``single`` (one
    broker node, one service on SQLite) or ``cluster`` (three broker nodes with
    quorum queues, two services on PostgreSQL:
    :mod:`~funcx_endpoint.testing.chaos_cluster`)."""
    from funcx_endpoint.testing.chaos_stack import ChaosStack

    plan = schedule(seed, tasks, rounds, faults)
    rng = random.Random(seed + 1)
    stack_class: Any = ChaosStack
    if topology == "cluster":
        from funcx_endpoint.testing.chaos_cluster import ClusterChaosStack

        stack_class = ClusterChaosStack
    elif topology != "single":
        raise ValueError(f"the topology is single or cluster, not {topology!r}")
    stack = stack_class(reactor, base_dir, managers=managers, workers=workers, progress=progress)
    log_dir = os.path.join(stack.base_dir, "runs")
    started = time.monotonic()
    try:
        stack.start()
        os.makedirs(log_dir, exist_ok=True)
        progress(
            f"stack up in {time.monotonic() - started:.0f} s (spool: {stack.spool_fs}); "
            f"{tasks} tasks, faults at: " + ", ".join(f"{name}@{at}" for at, _, name in plan)
        )

        def client_factory() -> Any:
            return _client(stack.env)

        stream = _Stream(
            client_factory,
            stack.endpoint_id,
            log_dir,
            tasks=tasks,
            window=window,
            batch=batch,
            gates=[gate for _, gate, _ in plan],
            progress=progress,
        )
        setup = client_factory()
        try:
            stream.register(setup)
        finally:
            setup.close()
        stream_started = time.monotonic()
        threads = [
            threading.Thread(target=stream.submit_loop, name="chaos-submit", daemon=True),
            threading.Thread(target=stream.poll_loop, name="chaos-poll", daemon=True),
        ]
        for thread in threads:
            thread.start()
        try:
            for index, (at, _, name) in enumerate(plan):
                while stream.submitted < at and not stream.done_submitting.is_set():
                    time.sleep(0.05)
                stream.top_up(index)
                progress(
                    f"  {time.monotonic() - stream_started:6.1f} s  {name} "
                    f"(submitted {stream.submitted}, answered {stream.answered})"
                )
                report = stream.strike(
                    name, functools.partial(FAULTS[name], stack, rng, partition_seconds)
                )
                stream.wait_recovered(report, recovery_timeout)
                progress(
                    f"           {report.detail}; recovered in "
                    + (
                        f"{report.recovery_seconds:.1f} s"
                        if report.recovery_seconds is not None
                        else f"NOT within {recovery_timeout:g} s"
                    )
                )
            # Drain: until every task is sent and answered, or nothing moved
            # (no task sent, none answered) for drain_timeout.
            while True:
                with stream.lock:
                    left = len(stream.pending)
                    quiet = time.monotonic() - max(stream.last_answer, stream.last_sent)
                if stream.done_submitting.is_set() and not left:
                    break
                if quiet > drain_timeout:
                    progress(f"nothing moved for {drain_timeout:g} s: giving up")
                    break
                time.sleep(0.2)
        finally:
            stream.stop.set()
            for thread in threads:
                thread.join(30)
        seconds = time.monotonic() - stream_started
        progress(f"stream done in {seconds:.0f} s; checking every answer again and the run logs")
        result = _account(stream, client_factory, log_dir, seed, tasks, seconds, stack.spool_fs)
    finally:
        try:
            stack.stop()
        except Exception as error:
            progress(f"stopping the stack failed: {type(error).__name__}: {error}")
    return result


#: The submit and poll threads both make clients: one at a time changes os.environ
#: (else one saves the other's values and puts them back for good).


def _client(env: Dict[str, str]) -> Any:
    from funcx_endpoint.testing.service import sdk_client

    return sdk_client(env, http_timeout=30)


def _account(
    stream: _Stream,
    client_factory: Callable[[], Any],
    log_dir: str,
    seed: int,
    tasks: int,
    seconds: float,
    spool_fs: str,
) -> ChaosResult:
    reports = stream.reports
    runs = _read_runs(log_dir)
    # Every task asked for again: an answer that changed is a second one.
    again: Dict[str, Any] = {}
    client = client_factory()
    try:
        ids = [t.task_id for t in stream.tasks.values()]
        for i in range(0, len(ids), 5000):
            again.update(client.fetch_task_records(ids[i : i + 5000]))
    finally:
        client.close()
    without_run = 0
    for task in stream.tasks.values():
        report = reports[task.fault]
        report.submitted += 1
        if runs.get(task.n, 0) > 1:
            report.run_twice += 1
        now = again.get(task.task_id)
        if task.record is None:
            # Unknown to the service: vanished; known but unanswered when
            # the stream gave up on it: hung.
            if now is None:
                report.lost += 1
            else:
                report.hung += 1
            continue
        report.answered += 1
        record = task.record
        name = _error_name(record)
        if name is not None:
            report.errors[name] += 1
        elif record.get("result") != 2 * task.n + 1:
            report.lost += 1  # someone else's answer
        elif runs.get(task.n, 0) == 0:
            without_run += 1
        if now is None or _answer_key(now) != _answer_key(record):
            report.duplicates += 1
    return ChaosResult(
        seed=seed,
        tasks=tasks,
        seconds=seconds,
        faults=reports,
        spool_fs=spool_fs,
        client_errors=stream.client_errors,
        answered_without_run=without_run,
    )


def format_report(result: ChaosResult) -> str:
    """The per-fault table and the totals, as text."""
    header = (
        f"{'fault':<26}{'submitted':>10}{'answered':>10}{'lost':>6}{'dup':>5}{'hung':>6}"
        f"{'run 2x':>8}{'in flight':>10}{'action s':>10}{'recover s':>11}  errors"
    )
    lines = [header, "-" * len(header)]
    for r in result.faults:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "-"
        recover = (
            "-"
            if r.name == "none"
            else (f"{r.recovery_seconds:.1f}" if r.recovery_seconds is not None else "NO")
        )
        lines.append(
            f"{r.name:<26}{r.submitted:>10}{r.answered:>10}{r.lost:>6}{r.duplicates:>5}"
            f"{r.hung:>6}{r.run_twice:>8}{r.in_flight_at_fault:>10}{r.action_seconds:>10.1f}"
            f"{recover:>11}  {errors}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<26}{result.total('submitted'):>10}{result.total('answered'):>10}"
        f"{result.total('lost'):>6}{result.total('duplicates'):>5}{result.total('hung'):>6}"
        f"{result.total('run_twice'):>8}"
    )
    lines.append(
        f"seed {result.seed}; {result.tasks} tasks in {result.seconds:.0f} s "
        f"({result.total('answered') / max(result.seconds, 1e-9):.0f}/s); spool: {result.spool_fs}"
    )
    if result.client_errors:
        lines.append(
            "client call errors (retried): "
            + ", ".join(f"{k} {v}" for k, v in sorted(result.client_errors.items()))
        )
    if result.answered_without_run:
        lines.append(f"answered with success but never ran: {result.answered_without_run}")
    for r in result.faults:
        if r.detail:
            lines.append(f"  {r.name}: {r.detail}")
    return "\n".join(lines)
