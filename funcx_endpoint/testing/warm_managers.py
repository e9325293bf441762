"""Simulated container managers: a few warm slots each, cold starts that cost time.

For routing tests and ``benchmarks/container_routing``: each
:class:`SimulatedContainerManager` is one AMP connection to a real
interchange (TLS, trusting the CA of its info file), registering as a real
manager does, with ``worker_count`` slots.  A slot runs one task at a time
in a container of one type; a task whose type has no idle slot warm for it
starts one (a *cold start*, which takes ``cold_start`` seconds more than the
task itself): in an unused slot if there is one, else in the idle slot used
least recently, whose container is retired.  Soft managers take tasks of
any type; a hard one (``container_type`` given) takes its own only.
After every change of its warm slots the manager sends ``WarmContainers``
(warm slots per type, cold starts so far), as the real manager does.

Which task runs next when a slot frees: a queued task of a type with an idle
warm slot first (the oldest such), else the oldest task.  Every task takes
``task_seconds``, and answers ``None``.  Time is the reactor's
(``callLater``): the cold starts are simulated, not measured.

:func:`connect_managers` starts ``count`` of them and fires once all are
registered.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols import amp
from twisted.python.failure import Failure

from funcx_endpoint.executor.routing import RAW
from funcx_endpoint.wire import ActorName, PackedResult, TaskState, TaskTransition, serialize
from funcx_endpoint.wire.amp import (
    CancelTask,
    Heartbeat,
    Register,
    SendResults,
    Shutdown,
    SubmitTasks,
    WarmContainers,
    read_unanswered_arguments,
    send_unanswered,
)
from funcx_endpoint.wire.info import ConnectionInfo, local_versions
from funcx_endpoint.wire.results import transitions_json

__all__ = ["SimulatedContainerManager", "SlotSettings", "connect_managers"]

_RESULT = PackedResult.success("", serialize(None)).data


@attr.s(auto_attribs=True, frozen=True)
class SlotSettings:
    """How a simulated manager behaves."""

    worker_count: int = 4
    prefetch_capacity: int = 1
    cold_start: float = 1.0  # seconds a cold start adds to its task
    task_seconds: float = 0.01
    container_type: Optional[str] = None  # hard: the only type it serves; None: soft


class _Slot:
    __slots__ = ("container_type", "busy", "last_used")

    def __init__(self) -> None:
        self.container_type: Optional[str] = None
        self.busy = False
        self.last_used = -1.0


class SimulatedContainerManager(amp.AMP):
    """One simulated manager (see the module)."""

    def __init__(self, clock: Any, settings: SlotSettings, block_id: str = "sim") -> None:
        super().__init__()
        self.clock = clock
        self.settings = settings
        self.block_id = block_id
        self.manager_id = str(uuid.uuid4())
        self.slots = [_Slot() for _ in range(settings.worker_count)]
        self.queue: Dict[str, Deque[Tuple[int, str]]] = {}  # type: (arrival, task id)
        self.arrivals = 0
        self.cold_starts = 0
        self.tasks_run = 0
        self.tasks_by_type: Dict[str, int] = {}
        self.wrong_type: List[str] = []  # task ids of another type (hard managers)
        self._answers: List[bytes] = []
        self._flush_call: Any = None
        self.closed: Deferred[None] = Deferred()

    # -- the interchange's commands ----------------------------------------------

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        arguments = read_unanswered_arguments(SubmitTasks, box, self)
        if arguments is not None:
            containers = arguments.get("containers") or {}
            for task_id, _ in arguments["tasks"]:
                container = containers.get(task_id)
                self.task_received(task_id, RAW if container is None else container.container_id)
            self._run_next()
            return
        super().ampBoxReceived(box)

    @Heartbeat.responder
    def heartbeat(self) -> Dict[str, Any]:
        return {}

    @CancelTask.responder
    def cancel_task(self, task_id: str) -> Dict[str, Any]:
        return {"found": False}

    @Shutdown.responder
    def shutdown(self, reason: str) -> Dict[str, Any]:
        self.clock.callLater(0, self.transport.loseConnection)  # type: ignore[union-attr]
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback(None)

    # -- registering ------------------------------------------------------------------

    def register(self, secret: str) -> Deferred[Any]:
        """Send ``Register``; fires with the answer."""
        kind = self.settings.container_type
        return self.callRemote(
            Register,
            secret=secret,
            manager_id=self.manager_id,
            block_id=self.block_id,
            hostname=f"sim-{self.manager_id[:8]}",
            pid=0,
            worker_count=self.settings.worker_count,
            prefetch_capacity=self.settings.prefetch_capacity,
            worker_type="simulated",
            container_type=kind if kind is not None else RAW,
            **local_versions(),
        )

    # -- running tasks ----------------------------------------------------------------

    def task_received(self, task_id: str, container_type: str) -> None:
        kind = self.settings.container_type
        if kind is not None and container_type != kind:
            self.wrong_type.append(task_id)
        self.arrivals += 1
        self.queue.setdefault(container_type, deque()).append((self.arrivals, task_id))

    def warm(self) -> Dict[str, int]:
        """Slots per container type."""
        counts: Dict[str, int] = {}
        for slot in self.slots:
            if slot.container_type is not None:
                counts[slot.container_type] = counts.get(slot.container_type, 0) + 1
        return counts

    def _run_next(self) -> None:
        changed = False
        while True:
            idle = [slot for slot in self.slots if not slot.busy]
            if not idle or not any(self.queue.values()):
                break
            # A queued task of a type with an idle warm slot: the oldest such.
            best: Optional[Tuple[int, str, _Slot]] = None
            for slot in idle:
                waiting = self.queue.get(slot.container_type or "")
                if waiting and (best is None or waiting[0][0] < best[0]):
                    best = (waiting[0][0], slot.container_type or "", slot)
            if best is not None:
                _, container_type, slot = best
                self._start(slot, container_type, cold=False)
                continue
            # Else the oldest task, cold: an unused slot, else the least recently used.
            container_type = min(
                (t for t, q in self.queue.items() if q), key=lambda t: self.queue[t][0][0]
            )
            unused = [slot for slot in idle if slot.container_type is None]
            slot = unused[0] if unused else min(idle, key=lambda s: s.last_used)
            slot.container_type = container_type
            self.cold_starts += 1
            changed = True
            self._start(slot, container_type, cold=True)
        if changed:
            self.send_warm()

    def _start(self, slot: _Slot, container_type: str, cold: bool) -> None:
        queue = self.queue[container_type]
        _, task_id = queue.popleft()
        if not queue:
            del self.queue[container_type]
        slot.busy = True
        seconds = self.settings.task_seconds + (self.settings.cold_start if cold else 0.0)
        self.clock.callLater(seconds, self._done, slot, task_id, container_type)

    def _done(self, slot: _Slot, task_id: str, container_type: str) -> None:
        slot.busy = False
        slot.last_used = self.clock.seconds()
        self.tasks_run += 1
        self.tasks_by_type[container_type] = self.tasks_by_type.get(container_type, 0) + 1
        statuses = transitions_json([TaskTransition.now(TaskState.EXECUTION_END, ActorName.WORKER)])
        self._answers.append(PackedResult(task_id, _RESULT, b"null", statuses).encode())
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)
        self._run_next()

    def _flush(self) -> None:
        self._flush_call = None
        answers, self._answers = self._answers, []
        if answers and self.transport is not None:
            send_unanswered(self, SendResults, results=answers)

    def send_warm(self) -> None:
        """Tell the interchange the warm slots and cold starts."""
        if self.transport is not None:
            send_unanswered(self, WarmContainers, warm=self.warm(), cold_starts=self.cold_starts)


async def _connect_one(
    reactor: Any, info: ConnectionInfo, settings: SlotSettings, block_id: str
) -> SimulatedContainerManager:
    trust = Certificate.loadPEM(info.ca_cert_pem.encode("ascii"))
    tls = optionsForClientTLS(info.address, trustRoot=trust)
    endpoint = wrapClientTLS(tls, TCP4ClientEndpoint(reactor, info.address, info.port))
    factory = Factory.forProtocol(lambda: SimulatedContainerManager(reactor, settings, block_id))
    factory.noisy = False
    connected: Any = await endpoint.connect(factory)
    manager: SimulatedContainerManager = connected
    await manager.register(info.secret)
    manager.send_warm()
    return manager


def connect_managers(
    reactor: Any, info_file: str, count: int, settings: SlotSettings, block_id: str = "sim"
) -> Deferred[List[SimulatedContainerManager]]:
    """Connect and register ``count`` simulated managers to the interchange of
    ``info_file``; fires with them once all are registered."""
    info = ConnectionInfo.read(info_file)
    return gatherResults(
        [
            Deferred.fromCoroutine(_connect_one(reactor, info, settings, f"{block_id}-{i}"))
            for i in range(count)
        ],
        consumeErrors=True,
    )
