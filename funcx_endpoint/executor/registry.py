"""The manager registry: who is connected, whether they may take tasks, whether they live.

:class:`ManagerRegistry` accepts managers' connections, checks their
registration (the endpoint's secret first, with a constant-time compare),
keeps one :class:`Manager` per registered manager, declares lost the
managers that fall silent for ``heartbeat_threshold`` seconds, and retires
managers the endpoint ends on purpose (scaling in), including those of a
retired block that register late.  It tells the task dispatcher about all
of it through :class:`~funcx_endpoint.executor.interface.IManagerEvents`.

A :class:`Manager`'s lifecycle is a state machine::

    serving ──retire──► retiring ──┐
       │ └──quit_announced──► quitting ──┤── gone
       └─────────────────────────────────┘

``serving``: registered, the only state in which a manager is given tasks;
``retiring``: the endpoint is ending it (scaling in); ``quitting``: it said
it is about to exit; ``gone``: disconnected, or declared lost.  When it
goes, the dispatcher hears why: a retired manager's tasks are queued again
without losing an attempt; a quitting one's say what it said when it quit.
"""

from __future__ import annotations

import heapq
import hmac
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Set, Tuple

import attr
from automat import MethodicalMachine
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint.executor.connection import ManagerConnection
from funcx_endpoint.executor.interface import IManagerEvents
from funcx_endpoint.observer import fire_all
from funcx_endpoint.wire.amp import (
    CancelTask,
    Heartbeat,
    RegistrationRefused,
    Shutdown,
    SubmitTasks,
    send_unanswered,
)
from funcx_endpoint.wire.containers import Container
from funcx_endpoint.wire.info import versions_differ

__all__ = ["RETIRED_BLOCKS_KEPT", "Manager", "ManagerRegistry"]

#: Blocks retired (being ended by the endpoint) remembered, for their
#: managers that register late.
RETIRED_BLOCKS_KEPT = 1000
#: Liveness checks run this many times per heartbeat period, each for the
#: managers whose turn has come.
LIVENESS_TICKS_PER_PERIOD = 10
#: A liveness tick checks at least this many managers whose turn has come
#: (and at least twice its share of all managers); the rest wait for the next.
LIVENESS_BATCH = 256


class Manager:
    """A registered manager: who it is, how to reach it, and where it is in its life."""

    log = Logger()
    _machine = MethodicalMachine()

    def __init__(
        self,
        registry: ManagerRegistry,
        connection: ManagerConnection,
        details: Dict[str, Any],
        now: float,
        sequence: int,
        version_mismatch: bool,
    ) -> None:
        self._registry = registry
        self.connection = connection
        self.manager_id: str = details["manager_id"]
        self.block_id: str = details["block_id"]
        self.hostname: str = details["hostname"]
        self.pid: int = details["pid"]
        self.worker_count: int = details["worker_count"]
        self.prefetch_capacity: int = details["prefetch_capacity"]
        self.capacity = self.worker_count + self.prefetch_capacity * self.worker_count
        self.worker_type: str = details["worker_type"]
        self.container_type: str = details["container_type"]
        self.versions = {
            key: details[key] for key in ("python_version", "dill_version", "funcx_version")
        }
        self.version_mismatch = version_mismatch
        self.registered_at = now
        self.last_heard = now
        self.sequence = sequence
        self.retiring = False
        self.quit_reason: Optional[str] = None
        # Declared lost after heartbeat_threshold of silence (not a closed
        # connection): its end says nothing about its block's other managers.
        self.silent = False

    def describe(self) -> str:
        """ "manager ID (block B, host H, pid P)", for messages."""
        return (
            f"manager {self.manager_id} (block {self.block_id}, host {self.hostname}, "
            f"pid {self.pid})"
        )

    # -- talking to it ------------------------------------------------------------

    def send_tasks(
        self, batch: List[Tuple[str, bytes]], containers: Optional[Dict[str, Container]] = None
    ) -> None:
        """Send ``(task_id, buffer)`` pairs, and the containers of those that name one;
        a broken link makes the manager lost."""
        try:
            send_unanswered(self.connection, SubmitTasks, tasks=batch, containers=containers)
        except Exception as exc:
            self.lost(f"sending it tasks failed ({exc})")

    def cancel_task(self, task_id: str) -> None:
        """Tell it to drop or kill ``task_id`` (answered already by the interchange)."""
        try:
            answer = self.connection.callRemote(CancelTask, task_id=task_id)
        except Exception as exc:
            self.log.warn(
                "Could not forward the cancel of task {task_id}: {error}",
                task_id=task_id,
                error=exc,
            )
            return
        # If it fails, the manager is gone or broken; its loss is handled
        # elsewhere, and the task has been answered already.
        answer.addErrback(
            lambda failure: self.log.warn(
                "Cancelling task {task_id} at {manager} failed: {error}",
                task_id=task_id,
                manager=self.describe(),
                error=failure.getErrorMessage(),
            )
        )

    def tell_to_shut_down(self, reason: str) -> None:
        """Send ``Shutdown``; if that fails, drop the connection."""
        try:
            self.connection.callRemote(Shutdown, reason=reason)
        except Exception:
            self.connection.drop()

    def heartbeat(self) -> None:
        """Send a heartbeat; a broken link makes the manager lost."""
        try:
            send_unanswered(self.connection, Heartbeat)
        except Exception as exc:
            self.lost(f"a heartbeat could not be sent ({exc})")

    def lost(self, why: str) -> None:
        """Declare it lost now (silent, broken link) and drop the connection."""
        self.gone(why, on_purpose=False)
        self.connection.drop()

    # -- lifecycle (its states are described in the module docstring) ---------------

    @_machine.state(initial=True)
    def _serving(self) -> None: ...
    @_machine.state()
    def _retiring(self) -> None: ...
    @_machine.state()
    def _quitting(self) -> None: ...
    @_machine.state()
    def _gone(self) -> None: ...

    @_machine.input()
    def retire(self, reason: str, tell_now: bool = True) -> None:
        """The endpoint ends it on purpose (scaling in).  Without ``tell_now``
        it is told on the next reactor turn (after its registration answer)."""

    @_machine.input()
    def quit_announced(self, reason: str) -> None:
        """It sent ``Quitting``."""

    @_machine.input()
    def gone(self, why: str, on_purpose: bool) -> None:
        """Its connection closed, or it was declared lost."""

    @_machine.output()
    def _close_to_tasks_and_shut_down(self, reason: str, tell_now: bool = True) -> None:
        self.retiring = True
        self._registry.events.manager_closed(self)
        self.log.info("Shutting down {manager}: {reason}", manager=self.describe(), reason=reason)
        if tell_now:
            self.tell_to_shut_down(reason)
        else:
            self._registry.clock.callLater(0, self.tell_to_shut_down, reason)

    @_machine.output()
    def _close_to_tasks(self, reason: str) -> None:
        self.quit_reason = reason
        self._registry.events.manager_closed(self)
        held = self._registry.held_by(self)
        log = self.log.info if self.retiring or self._registry.stopping else self.log.warn
        log(
            "{manager} is quitting, holding {count} tasks: {reason}",
            manager=self.describe(),
            count=held,
            reason=reason,
        )

    @_machine.output()
    def _leave(self, why: str, on_purpose: bool) -> None:
        self._registry.forget(self)
        if self.quit_reason is not None and not on_purpose:
            why = f"it quit: {self.quit_reason}"
        if (self.retiring or self._registry.stopping) and not self._registry.held_by(self):
            self.log.info("{manager} disconnected", manager=self.describe())
        self._registry.events.manager_left(self, why, on_purpose or self.retiring)

    _serving.upon(retire, enter=_retiring, outputs=[_close_to_tasks_and_shut_down])
    _serving.upon(quit_announced, enter=_quitting, outputs=[_close_to_tasks])
    _serving.upon(gone, enter=_gone, outputs=[_leave])
    _retiring.upon(retire, enter=_retiring, outputs=[])
    _retiring.upon(quit_announced, enter=_quitting, outputs=[_close_to_tasks])
    _retiring.upon(gone, enter=_gone, outputs=[_leave])
    _quitting.upon(retire, enter=_quitting, outputs=[])
    _quitting.upon(quit_announced, enter=_quitting, outputs=[])
    _quitting.upon(gone, enter=_gone, outputs=[_leave])
    _gone.upon(retire, enter=_gone, outputs=[])
    _gone.upon(quit_announced, enter=_gone, outputs=[])
    _gone.upon(gone, enter=_gone, outputs=[])


@attr.s(auto_attribs=True, eq=False, repr=False)
class ManagerRegistry:
    """Registered managers and the connections that may become managers."""

    log = Logger()

    clock: IReactorTime
    events: IManagerEvents
    secret: str = attr.ib(kw_only=True)
    #: this side's Python/dill/funcx versions
    versions: Dict[str, str] = attr.ib(kw_only=True)
    #: what a registration is answered with (the settings a manager applies)
    answer: Dict[str, Any] = attr.ib(kw_only=True)
    heartbeat_period: float = attr.ib(default=30.0, kw_only=True)
    heartbeat_threshold: float = attr.ib(default=120.0, kw_only=True)
    registration_timeout: float = attr.ib(default=5.0, kw_only=True)
    managers: Dict[str, Manager] = attr.ib(factory=dict, init=False)
    #: The registered managers whose Python or dill differ from the endpoint's.
    mismatched: Dict[str, Manager] = attr.ib(factory=dict, init=False)
    # registered, in order
    _by_block: Dict[str, Dict[Manager, None]] = attr.ib(factory=dict, init=False)
    stopping: bool = attr.ib(default=False, init=False)
    _connections: Set[ManagerConnection] = attr.ib(factory=set, init=False)
    _registrations: int = attr.ib(default=0, init=False)
    _retired_blocks: OrderedDict[str, str] = attr.ib(factory=OrderedDict, init=False)
    #: Managers gone so far, by block id (the most recent blocks).
    departures: OrderedDict[str, int] = attr.ib(factory=OrderedDict, init=False)
    _disconnect_waiters: List[Deferred[None]] = attr.ib(factory=list, init=False)
    _manager_waiters: List[Tuple[int, Deferred[None]]] = attr.ib(factory=list, init=False)
    _ticker: Optional[LoopingCall] = attr.ib(default=None, init=False)
    # (when, registration sequence, manager): each manager's next liveness check.
    _checks: List[Tuple[float, int, Manager]] = attr.ib(factory=list, init=False)

    def held_by(self, manager: Manager) -> int:
        """Tasks ``manager`` holds, as the dispatcher counts them."""
        return int(self.events.held_by(manager))

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the liveness checks: each manager's every ``heartbeat_period``
        from its registration, a tenth of the period at a time."""
        ticker = LoopingCall(self._tick)
        ticker.clock = self.clock
        ticker.start(self.heartbeat_period / LIVENESS_TICKS_PER_PERIOD, now=False)
        self._ticker = ticker

    def stop_accepting(self) -> None:
        """Take no more managers; stop the liveness checks."""
        self.stopping = True
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()

    def shut_down_all(self, reason: str) -> None:
        """Tell every manager to shut down; drop connections that never registered."""
        for manager in list(self.managers.values()):
            manager.tell_to_shut_down(reason)
        for connection in list(self._connections):
            if connection.manager is None:
                connection.drop()

    def drop_all(self) -> None:
        """Drop every connection at once."""
        for connection in list(self._connections):
            connection.drop()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def when_disconnected(self) -> Deferred[None]:
        """A new Deferred that fires once no connection is left."""
        if not self._connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._disconnect_waiters.append(waiter)
        return waiter

    def when_managers(self, count: int = 1) -> Deferred[None]:
        """A new Deferred that fires once at least ``count`` managers are registered."""
        waiter: Deferred[None] = Deferred()
        if len(self.managers) >= count:
            waiter.callback(None)
        else:
            self._manager_waiters.append((count, waiter))
        return waiter

    # -- connections ---------------------------------------------------------------

    def connection_made(self, connection: ManagerConnection) -> None:
        self._connections.add(connection)
        if self.stopping:
            connection.drop()

    def connection_closed(
        self, connection: ManagerConnection, manager: Optional[Manager], reason: Failure
    ) -> None:
        self._connections.discard(connection)
        if manager is not None:
            manager.gone(f"its connection closed ({reason.getErrorMessage()})", on_purpose=False)
        if not self._connections:
            fire_all(self._disconnect_waiters, None)

    def register(self, connection: ManagerConnection, details: Dict[str, Any]) -> Dict[str, Any]:
        """Check a registration; the settings it is answered with, or RegistrationRefused."""
        secret = details.pop("secret", "")
        if not hmac.compare_digest(secret.encode("utf-8"), self.secret.encode("utf-8")):
            self.log.warn(
                "Refused manager {manager_id} from {peer}: wrong secret",
                manager_id=details.get("manager_id"),
                peer=connection.peer,
            )
            raise RegistrationRefused("wrong secret")
        manager_id = details["manager_id"]
        problem = None
        if connection.manager is not None:
            problem = "this connection has registered already"
        elif self.stopping:
            problem = "the interchange is stopping"
        elif manager_id in self.managers:
            problem = f"a manager with id {manager_id} is connected already"
        elif details["worker_count"] < 0 or details["prefetch_capacity"] < 0:
            problem = "worker_count and prefetch_capacity must not be negative"
        if problem is not None:
            self.log.warn(
                "Refused manager {manager_id} from {peer}: {problem}",
                manager_id=manager_id,
                peer=connection.peer,
                problem=problem,
            )
            raise RegistrationRefused(problem)
        mismatch = versions_differ(self.versions, details)
        self._registrations += 1
        manager = Manager(
            self, connection, details, self.clock.seconds(), self._registrations, mismatch
        )
        connection.accepted(manager)
        self.managers[manager_id] = manager
        self._by_block.setdefault(manager.block_id, {})[manager] = None
        if mismatch:
            self.mismatched[manager_id] = manager
        self.log.info(
            "Registered {manager}: {workers} workers, prefetch {prefetch}, type "
            "{container_type}, from {peer}",
            manager=manager.describe(),
            workers=manager.worker_count,
            prefetch=manager.prefetch_capacity,
            container_type=manager.container_type,
            peer=connection.peer,
        )
        if mismatch:
            self.log.warn(
                "{manager} runs Python {python} and dill {dill}; this endpoint runs Python "
                "{my_python} and dill {my_dill}: functions serialized on one may not load "
                "on the other",
                manager=manager.describe(),
                python=manager.versions["python_version"],
                dill=manager.versions["dill_version"],
                my_python=self.versions["python_version"],
                my_dill=self.versions["dill_version"],
            )
        heapq.heappush(
            self._checks, (manager.registered_at + self.heartbeat_period, manager.sequence, manager)
        )
        self.events.manager_joined(manager)
        retired = self._retired_blocks.get(manager.block_id)
        if retired is not None:
            # Its block is being ended: it gets no task, and is told to go
            # once it has its answer.
            manager.retire(retired, tell_now=False)
        waiting = [w for w in self._manager_waiters if len(self.managers) >= w[0]]
        self._manager_waiters = [w for w in self._manager_waiters if w not in waiting]
        for _, waiter in waiting:
            waiter.callback(None)
        return dict(self.answer, **self.versions)

    def results_received(self, manager: Manager, results: List[bytes]) -> None:
        self.events.results_received(manager, results)

    def warm_containers(self, manager: Manager, warm: Dict[str, int], cold_starts: int) -> None:
        self.events.warm_containers(manager, warm, cold_starts)

    def tasks_started(self, manager: Manager, started: List[Tuple[str, int]]) -> None:
        self.events.tasks_started(manager, started)

    def forget(self, manager: Manager) -> None:
        """Remove a manager that is gone (its connection may still be closing)."""
        if self.managers.get(manager.manager_id) is manager:
            del self.managers[manager.manager_id]
            self.mismatched.pop(manager.manager_id, None)
            of_block = self._by_block.get(manager.block_id, {})
            of_block.pop(manager, None)
            if not of_block:
                self._by_block.pop(manager.block_id, None)
            block_id = manager.block_id
            self.departures[block_id] = self.departures.get(block_id, 0) + 1
            self.departures.move_to_end(block_id)
            while len(self.departures) > RETIRED_BLOCKS_KEPT:
                self.departures.popitem(last=False)

    # -- retiring --------------------------------------------------------------------

    def retire_block(self, block_id: str, reason: str) -> List[Manager]:
        """Retire the managers of ``block_id``, and those of it that register later."""
        self._retired_blocks[block_id] = reason
        self._retired_blocks.move_to_end(block_id)
        while len(self._retired_blocks) > RETIRED_BLOCKS_KEPT:
            self._retired_blocks.popitem(last=False)
        managers = self.of_block(block_id)
        for manager in managers:
            manager.retire(reason)
        return managers

    def of_block(self, block_id: str) -> List[Manager]:
        """The registered managers of ``block_id``."""
        return list(self._by_block.get(block_id, ()))

    # -- liveness ----------------------------------------------------------------------

    def _tick(self) -> None:
        """For each manager whose turn has come (one period after its last):
        a heartbeat out, or, if it has been silent too long, declared lost.

        The managers' turns are spread over the period as their registrations
        were, and a tick takes at most the larger of ``LIVENESS_BATCH`` and twice
        its share of all managers (the rest wait for the next tick), so that
        thousands of managers registered at once do not all get a heartbeat in
        one reactor turn.
        """
        now = self.clock.seconds()
        period = self.heartbeat_period
        checks, managers = self._checks, self.managers
        budget = max(LIVENESS_BATCH, 2 * len(managers) // LIVENESS_TICKS_PER_PERIOD + 1)
        due: List[Manager] = []
        while checks and checks[0][0] <= now and len(due) < budget:
            when, sequence, manager = heapq.heappop(checks)
            if managers.get(manager.manager_id) is manager:
                due.append(manager)
                when = when + period if when + period > now else now + period
                heapq.heappush(checks, (when, sequence, manager))
        for manager in due:
            silence = now - manager.last_heard
            if silence > self.heartbeat_threshold:
                manager.silent = True
                manager.lost(
                    f"it sent nothing for {silence:.0f} s (heartbeat_threshold is "
                    f"{self.heartbeat_threshold:g} s)"
                )
                continue
            manager.heartbeat()
