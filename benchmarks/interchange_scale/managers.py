"""Simulated managers: many AMP connections in one process, each one a manager to the interchange.

Run by ``bench.py`` (a few of these processes per scale).  Every simulated
manager connects over TLS, trusting only the CA of the interchange's info
file, and registers exactly as ``funcx_endpoint.manager`` does (the
``Register`` command with the secret, ``worker_count`` and
``prefetch_capacity``).  It then answers every ``SubmitTasks`` at once: one
``SendResults`` per connection per reactor turn, holding a successful
:class:`~funcx_endpoint.wire.results.PackedResult` per task with the
transitions a real manager and worker add (``running``, ``execution-start``,
``execution-end``).  It sends a ``Heartbeat`` every ``heartbeat_period``
(from the registration answer) and disconnects when told ``Shutdown``.

At most ``--concurrency`` connections are being made or registered at a
time (the real managers of a block start together, but a block is rarely
thousands of nodes); a connection that fails or is dropped before its
registration is answered is tried again, up to 10 times.

The process reports on stdout, one JSON object a line: ``registered`` once
all its managers are registered (with its RSS before and after), ``done``
when all its connections have closed (with counts).  It exits then, or on
SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import uuid
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.protocols import amp
from twisted.python.failure import Failure

from funcx_endpoint.wire import ActorName, PackedResult, TaskState, TaskTransition, serialize
from funcx_endpoint.wire.amp import (
    CancelTask,
    Heartbeat,
    Register,
    SendResults,
    Shutdown,
    SubmitTasks,
    read_unanswered,
    send_unanswered,
    set_no_delay,
)
from funcx_endpoint.wire.info import ConnectionInfo, local_versions
from funcx_endpoint.wire.results import transitions_json

#: The result every task gets (a no-op function's None), already serialized.
RESULT_DATA = serialize(None)
CONNECT_ATTEMPTS = 10


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SimulatedManager(amp.AMP):
    """One manager's connection: answers tasks at once, through the process's :class:`Swarm`."""

    def __init__(self, swarm: Swarm) -> None:
        super().__init__()
        self.swarm = swarm
        self.answering: List[str] = []  # ids of tasks received this turn
        self.registered = False

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        super().connectionMade()

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        tasks = read_unanswered(SubmitTasks, box, self)
        if tasks is not None:
            self.swarm.tasks_received(self, tasks)
            return
        super().ampBoxReceived(box)

    @Heartbeat.responder
    def heartbeat(self) -> Dict[str, Any]:
        self.swarm.heartbeats_received += 1
        return {}

    @CancelTask.responder
    def cancel_task(self, task_id: str) -> Dict[str, Any]:
        return {"found": False}  # answered at once: never held

    @Shutdown.responder
    def shutdown(self, reason: str) -> Dict[str, Any]:
        self.swarm.shutdowns += 1
        transport: Any = self.transport
        self.swarm.clock.callLater(0, transport.loseConnection)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.swarm.connection_lost(self)


class Swarm:
    """The simulated managers of this process."""

    def __init__(self, clock: Any, options: argparse.Namespace) -> None:
        self.clock = clock
        self.options = options
        self.info = ConnectionInfo.read(options.info_file)
        trust = Certificate.loadPEM(self.info.ca_cert_pem.encode("ascii"))
        self.tls = optionsForClientTLS(self.info.address, trustRoot=trust)
        self.versions = local_versions()
        self.to_start: Deque[Tuple[int, int]] = deque((i, 1) for i in range(options.count))
        self.connecting = 0
        self.connections: Set[SimulatedManager] = set()
        self.registered = 0
        self.connect_failures = 0
        self.heartbeats_received = 0
        self.heartbeats_sent = 0
        self.shutdowns = 0
        self.tasks_answered = 0
        self.batches_received = 0
        self.batches_sent = 0
        self.rss_before = psutil.Process().memory_info().rss
        self.started = time.perf_counter()
        self._pending: List[SimulatedManager] = []
        self._flush_call: Optional[IDelayedCall] = None
        self._beats: Deque[Tuple[float, SimulatedManager]] = deque()
        self._beat_loop: Optional[LoopingCall] = None
        self.finished: Deferred[None] = Deferred()

    # -- connecting and registering ---------------------------------------------

    def endpoint(self) -> Any:
        address, port = self.info.address, self.info.port
        try:
            import ipaddress

            ipaddress.IPv4Address(address)
            tcp: Any = TCP4ClientEndpoint(self.clock, address, port, timeout=30)
        except ValueError:
            tcp = HostnameEndpoint(self.clock, address, port, timeout=30)
        return wrapClientTLS(self.tls, tcp)

    def start(self) -> None:
        for _ in range(min(self.options.concurrency, len(self.to_start))):
            self._start_next()

    def _start_next(self) -> None:
        if not self.to_start:
            return
        index, attempt = self.to_start.popleft()
        self.connecting += 1
        attempt_done = Deferred.fromCoroutine(self._connect_and_register(index, attempt))
        attempt_done.addErrback(self._attempt_failed, index, attempt)
        attempt_done.addBoth(self._attempt_over)

    async def _connect_and_register(self, index: int, attempt: int) -> None:
        factory = Factory.forProtocol(lambda: SimulatedManager(self))
        factory.noisy = False
        connection: SimulatedManager = await self.endpoint().connect(factory)
        self.connections.add(connection)
        options = self.options
        answer = await connection.callRemote(
            Register,
            secret=self.info.secret,
            manager_id=str(uuid.uuid4()),
            block_id=f"sim-{options.name}-{index // options.managers_per_block}",
            hostname=f"sim-{options.name}-{index}",
            pid=os.getpid(),
            worker_count=options.worker_count,
            prefetch_capacity=options.prefetch,
            worker_type="no_container",
            container_type="RAW",
            **self.versions,
        )
        connection.registered = True
        self.registered += 1
        period = float(answer["heartbeat_period"])
        # Spread over the period, as managers that started at different times are.
        self._beats.append((self.clock.seconds() + period * (index % 97) / 97, connection))
        if self._beat_loop is None:
            self._beat_loop = LoopingCall(self._send_heartbeats, period)
            self._beat_loop.clock = self.clock
            self._beat_loop.start(min(1.0, period / 10), now=False)
        if self.registered == options.count:
            self.report(
                "registered",
                seconds=time.perf_counter() - self.started,
                rss_before=self.rss_before,
                rss_after=psutil.Process().memory_info().rss,
                connect_failures=self.connect_failures,
            )

    def _attempt_failed(self, failure: Failure, index: int, attempt: int) -> None:
        self.connect_failures += 1
        if attempt >= CONNECT_ATTEMPTS:
            print(
                f"simulated manager {index}: giving up after {attempt} attempts: "
                f"{failure.getErrorMessage()}",
                file=sys.stderr,
            )
            return
        delay = min(0.2 * 2 ** (attempt - 1), 5.0)
        self.clock.callLater(delay, self._retry, index, attempt + 1)

    def _retry(self, index: int, attempt: int) -> None:
        self.to_start.append((index, attempt))
        if self.connecting < self.options.concurrency:
            self._start_next()

    def _attempt_over(self, _: Any) -> None:
        self.connecting -= 1
        self._start_next()

    # -- traffic --------------------------------------------------------------------

    def tasks_received(self, connection: SimulatedManager, tasks: List[Tuple[str, bytes]]) -> None:
        self.batches_received += 1
        if not connection.answering:
            self._pending.append(connection)
        # The ids now, the results when flushing (one set of timestamps per turn).
        connection.answering.extend(task_id for task_id, _ in tasks)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        """One SendResults per connection that got tasks since the last turn."""
        self._flush_call = None
        pending, self._pending = self._pending, []
        statuses = transitions_json(
            [
                TaskTransition.now(TaskState.RUNNING, ActorName.MANAGER),
                TaskTransition.now(TaskState.EXECUTION_START, ActorName.WORKER),
                TaskTransition.now(TaskState.EXECUTION_END, ActorName.WORKER),
            ]
        )
        data = PackedResult.success("", RESULT_DATA).data
        for connection in pending:
            task_ids, connection.answering = connection.answering, []
            results = [
                PackedResult(task_id, data, b"null", statuses).encode() for task_id in task_ids
            ]
            try:
                send_unanswered(connection, SendResults, results=results)
            except Exception as exc:
                print(f"could not send results: {exc}", file=sys.stderr)
                continue
            self.tasks_answered += len(results)
            self.batches_sent += 1

    def _send_heartbeats(self, period: float) -> None:
        now = self.clock.seconds()
        beats = self._beats
        while beats and beats[0][0] <= now:
            _, connection = beats.popleft()
            if connection not in self.connections:
                continue
            try:
                send_unanswered(connection, Heartbeat)
            except Exception:
                continue
            self.heartbeats_sent += 1
            beats.append((now + period, connection))

    def connection_lost(self, connection: SimulatedManager) -> None:
        self.connections.discard(connection)
        if connection.registered and not self.connections and not self.to_start:
            self.finish()

    def finish(self) -> None:
        if self.finished.called:
            return
        if self._beat_loop is not None and self._beat_loop.running:
            self._beat_loop.stop()
        self.report(
            "done",
            registered=self.registered,
            connect_failures=self.connect_failures,
            tasks_answered=self.tasks_answered,
            batches_received=self.batches_received,
            batches_sent=self.batches_sent,
            heartbeats_received=self.heartbeats_received,
            heartbeats_sent=self.heartbeats_sent,
            shutdowns=self.shutdowns,
        )
        self.finished.callback(None)

    def report(self, event: str, **fields: Any) -> None:
        print(json.dumps(dict(event=event, name=self.options.name, **fields)), flush=True)


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--info-file", required=True)
    parser.add_argument("--count", type=int, required=True, help="managers in this process")
    parser.add_argument("--name", default="0", help="this process's name (in host names)")
    parser.add_argument("--worker-count", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--managers-per-block", type=int, default=16)
    options = parser.parse_args(argv)
    raise_file_limit()
    swarm = Swarm(reactor, options)
    stopping: List[bool] = []

    def on_signal() -> None:
        stopping.append(True)
        swarm.finish()

    swarm.finished.addCallback(lambda _: None if stopping else reactor.stop())  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", on_signal)  # type: ignore[attr-defined]
    reactor.callWhenRunning(swarm.start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
