"""The interchange: queues tasks, hands them to managers, collects their results.

:class:`Interchange` is a Twisted service providing
:class:`~funcx_endpoint.executor.interface.IInterchange` (what the
endpoint's AMQP side calls) and
:class:`~funcx_endpoint.executor.interface.ILoadSource` (what the scaling
strategy reads).  Managers connect to it over TLS and speak the AMP protocol
of :mod:`funcx_endpoint.executor.amp`; :class:`ManagerConnection` does that
I/O and the interchange holds the policy:

* Tasks wait in a queue per container type (``"RAW"`` without containers)
  and go, in batches once per reactor turn, to the managers of that type
  that have room (``workers + prefetch_capacity * workers`` tasks each),
  the least loaded first.
* Results come back in batches and go to ``on_results`` in batches, one
  call per reactor turn, with the interchange's transitions
  (``waiting-for-nodes``, ``waiting-for-launch``) added before the manager's
  and worker's.
* A manager that sends nothing for ``heartbeat_threshold`` seconds, or
  whose connection closes, is lost: its tasks are queued again up to
  ``max_retries_on_system_failure`` times, then fail with ``ManagerLost``.
* Stopping tells managers to shut down and waits for them to disconnect,
  at most ``stop_grace_period`` seconds.  Tasks still at managers then get
  no result: the endpoint leaves them to the broker, which delivers them
  again.
"""

from __future__ import annotations

import heapq
import hmac
import ipaddress
import os
import secrets
import sys
from collections import OrderedDict, deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp as _amp
from twisted.python.failure import Failure
from zope.interface import implementer

from funcx_endpoint.config.model import HighThroughputExecutor, MiB
from funcx_endpoint.executor.amp import (
    CancelTask,
    ConnectionInfo,
    Heartbeat,
    ManagerSettings,
    Quitting,
    RateMeter,
    Register,
    RegistrationRefused,
    SendResults,
    Shutdown,
    SubmitTasks,
    local_versions,
    read_unanswered,
    send_unanswered,
    versions_differ,
)
from funcx_endpoint.executor.interface import (
    IInterchange,
    ILoadSource,
    ManagerInfo,
    ResultsCallback,
)
from funcx_endpoint.protocol import (
    ActorName,
    ErrorCode,
    Message,
    MessageError,
    Result,
    Task,
    TaskState,
    TaskTransition,
    unpack,
)
from funcx_endpoint.tls import ensure_ca_and_server_cert

__all__ = ["RAW", "Interchange", "ManagerConnection"]

#: The container type of tasks that run directly on workers.
RAW = "RAW"
#: The name of the info file in the interchange's working directory.
INFO_FILE_NAME = "manager-info.json"
#: The directory (in the working directory) of the CA and server certificate.
TLS_DIR_NAME = "interchange-tls"
#: Blocks retired (being ended by the endpoint) remembered, for their
#: managers that register late.
RETIRED_BLOCKS_KEPT = 1000
#: Bytes a connection may send before it has registered (a Register box is
#: well under 1 KiB); past this it is dropped, so that a stranger cannot
#: fill the interchange's memory with one endless AMP box meanwhile.
MAX_UNREGISTERED_BYTES = 64 * 1024


class _TaskRecord:
    """One task the interchange accepted and has not answered yet."""

    __slots__ = ("task", "container_type", "transitions", "attempts", "manager")

    def __init__(self, task: Task, container_type: str, transition: TaskTransition) -> None:
        self.task = task
        self.container_type = container_type
        self.transitions: List[TaskTransition] = [transition]
        self.attempts = 0  # times sent to a manager
        self.manager: Optional[_Manager] = None


class _Manager:
    """A registered manager and the tasks it holds."""

    __slots__ = (
        "connection",
        "manager_id",
        "block_id",
        "hostname",
        "pid",
        "worker_count",
        "prefetch_capacity",
        "capacity",
        "worker_type",
        "container_type",
        "versions",
        "version_mismatch",
        "registered_at",
        "last_heard",
        "idle_since",
        "outstanding",
        "lost",
        "sequence",
        "unsent",
        "push_call",
        "last_push",
        "completions",
        "tasks_completed",
        "retiring",
        "quit_reason",
    )

    def __init__(
        self,
        connection: ManagerConnection,
        details: Dict[str, Any],
        now: float,
        sequence: int,
        version_mismatch: bool,
    ) -> None:
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
        self.idle_since: Optional[float] = now
        self.outstanding: Dict[str, _TaskRecord] = {}
        self.lost = False
        self.sequence = sequence
        # Tasks assigned to this manager and not sent yet: they go at most
        # one batch per batch_interval.
        self.unsent: List[Tuple[str, bytes]] = []
        self.push_call: Optional[IDelayedCall] = None
        self.last_push = -1.0
        self.completions = RateMeter()
        self.tasks_completed = 0  # results received
        # Told to shut down by the endpoint (scaling in): no new tasks, and its
        # tasks are queued again without counting an attempt if it goes.
        self.retiring = False
        # What it said when it announced it was quitting (no new tasks then).
        self.quit_reason: Optional[str] = None

    @property
    def free(self) -> int:
        """Tasks it can take now."""
        return self.capacity - len(self.outstanding)

    def describe(self) -> str:
        """ "manager ID (block B, host H, pid P)", for messages."""
        return (
            f"manager {self.manager_id} (block {self.block_id}, host {self.hostname}, "
            f"pid {self.pid})"
        )

    def info(self) -> ManagerInfo:
        """Its ManagerInfo for the scaling strategy."""
        active = len(self.outstanding)
        return ManagerInfo(
            manager_id=self.manager_id,
            block_id=self.block_id,
            hostname=self.hostname,
            worker_count=self.worker_count,
            idle_workers=max(0, self.worker_count - active),
            active_tasks=active,
            registered_at=self.registered_at,
            idle_since=self.idle_since,
            tasks_completed=self.tasks_completed,
        )


def set_no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off: batches and their answers must not wait 40 ms."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not TCP (tests)


def _describe_peer(transport: Any) -> str:
    try:
        peer: Any = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "an unknown peer"


class ManagerConnection(_amp.AMP):
    """The interchange's end of one manager connection: AMP I/O, no policy.

    Until it has registered, a connection may send only ``Register``, and
    at most :data:`MAX_UNREGISTERED_BYTES`; anything else closes it.  Every
    box received counts as a sign of life.
    """

    log = Logger()

    def __init__(self, interchange: Interchange) -> None:
        super().__init__()
        self._interchange = interchange
        self.manager: Optional[_Manager] = None
        self.peer = "an unknown peer"
        self.registration_deadline: Optional[IDelayedCall] = None
        self.unregistered_bytes = 0

    def connectionMade(self) -> None:
        self.peer = _describe_peer(self.transport)
        set_no_delay(self.transport)
        self._interchange._connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._interchange._connection_lost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        if self.manager is None:
            if self.unregistered_bytes > MAX_UNREGISTERED_BYTES:
                return  # dropped already
            self.unregistered_bytes += len(data)
            if self.unregistered_bytes > MAX_UNREGISTERED_BYTES:
                self.log.warn(
                    "Dropped a connection from {peer}: it sent more than {limit} bytes "
                    "without registering",
                    peer=self.peer,
                    limit=MAX_UNREGISTERED_BYTES,
                )
                self.drop()
                return
        super().dataReceived(data)

    def ampBoxReceived(self, box: _amp.AmpBox) -> None:
        manager = self.manager
        if manager is not None:
            manager.last_heard = self._interchange.clock.seconds()
            try:
                results = read_unanswered(SendResults, box, self)
            except (ValueError, KeyError) as exc:
                self.log.warn(
                    "Dropped {manager}: it sent an unreadable batch of results ({error})",
                    manager=manager.describe(),
                    error=exc,
                )
                self.drop()
                return
            if results is not None:
                self._interchange._results_received(manager, results)
                return
        super().ampBoxReceived(box)

    def locateResponder(self, name: bytes) -> Any:
        if self.manager is None and name != Register.commandName:
            return self._refuse_unregistered
        return super().locateResponder(name)

    def _refuse_unregistered(self, box: _amp.AmpBox) -> Deferred[Any]:
        command = box.get(b"_command", b"?").decode("ascii", "replace")
        self.log.warn(
            "Dropped a connection from {peer}: it sent {command} before registering",
            peer=self.peer,
            command=command,
        )
        if b"_ask" not in box:
            self.drop()
            return succeed(_amp.AmpBox())
        # A fatal error is answered, then the connection is closed.
        return fail(_amp.RemoteAmpError(b"NOT_REGISTERED", "register first", fatal=True))

    def drop(self) -> None:
        """Close the connection at once, without waiting for buffers to drain."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    @Register.responder
    def register(self, **details: Any) -> Dict[str, Any]:
        """Register: checked and recorded by the interchange."""
        return self._interchange._register(self, details)

    @SendResults.responder
    def send_results(self, results: List[bytes]) -> Dict[str, Any]:
        """Results sent with callRemote (the fast path in ampBoxReceived takes most)."""
        if self.manager is not None:
            self._interchange._results_received(self.manager, results)
        return {}

    @Heartbeat.responder
    def heartbeat(self) -> Dict[str, Any]:
        """Nothing to do: receiving any box counts as a sign of life."""
        return {}

    @Quitting.responder
    def quitting(self, reason: str) -> Dict[str, Any]:
        """The manager is about to exit: recorded by the interchange."""
        if self.manager is not None:
            self._interchange._manager_quitting(self.manager, reason)
        return {}


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, interchange: Interchange) -> None:
        self._interchange = interchange

    def buildProtocol(self, addr: Any) -> ManagerConnection:
        return ManagerConnection(self._interchange)


@implementer(IInterchange, ILoadSource)
class Interchange(Service):
    """Dispatches tasks to managers over TLS+AMP and returns their results.

    ``reactor`` provides ``listenSSL`` and time; ``work_dir`` receives the
    TLS files and the manager info file (:attr:`info_file`); ``executor``
    gives worker counts, prefetch, retries, the address and port range.
    After :meth:`startService`, :attr:`port` is the port managers connect to
    and :meth:`manager_command` the command that starts one.
    """

    name = "interchange"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        work_dir: str,
        executor: HighThroughputExecutor,
        *,
        on_results: Optional[ResultsCallback] = None,
        heartbeat_period: float = 30.0,
        heartbeat_threshold: float = 120.0,
        task_timeout: Optional[float] = None,
        result_size_limit: int = 10 * MiB,
        stop_grace_period: float = 10.0,
        registration_timeout: float = 5.0,
        batch_interval: float = 0.001,
        max_recorded_tasks: int = 10_000,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.work_dir = os.path.abspath(work_dir)
        self.executor = executor
        self.on_results: ResultsCallback = on_results or (lambda results: None)
        self.heartbeat_period = heartbeat_period
        self.heartbeat_threshold = heartbeat_threshold
        self.task_timeout = task_timeout
        self.result_size_limit = result_size_limit
        self.stop_grace_period = stop_grace_period
        self.registration_timeout = registration_timeout
        self.batch_interval = batch_interval
        self.max_retries = executor.max_retries_on_system_failure
        self.info_file = os.path.join(self.work_dir, INFO_FILE_NAME)
        self.port: Optional[int] = None
        self.accepting = True
        self.versions = local_versions()

        self._secret = ""
        self._listening: Optional[IListeningPort] = None
        self._ticker: Optional[LoopingCall] = None
        self._stopping = False
        self._stop_state = "running"  # then "stopping", "stopped"
        self._stop_waiters: List[Deferred[None]] = []

        self._tasks: Dict[str, _TaskRecord] = {}
        self._queues: Dict[str, Deque[_TaskRecord]] = {RAW: deque()}
        self._managers: Dict[str, _Manager] = {}
        self._connections: set[ManagerConnection] = set()
        self._registrations = 0
        self._ready: List[Result] = []
        self._deliver_call: Optional[IDelayedCall] = None
        self._dispatch_call: Optional[IDelayedCall] = None
        self._transitions: Dict[str, List[TaskTransition]] = {}
        self._max_recorded = max_recorded_tasks
        self._dropped_transitions = 0
        self._disconnect_waiters: List[Deferred[None]] = []
        self._manager_waiters: List[Tuple[int, Deferred[None]]] = []
        self._retired_blocks: OrderedDict[str, str] = OrderedDict()

    @classmethod
    def from_config(
        cls,
        reactor: Any,
        work_dir: str,
        config: Any,
        on_results: Optional[ResultsCallback] = None,
    ) -> Interchange:
        """An interchange for ``config`` (a :class:`~funcx_endpoint.config.model.Config`)."""
        return cls(
            reactor,
            work_dir,
            config.executors[0],
            on_results=on_results,
            heartbeat_period=config.heartbeat_period,
            heartbeat_threshold=config.heartbeat_threshold,
            task_timeout=config.task_timeout,
            result_size_limit=config.result_size_limit,
            stop_grace_period=config.stop_grace_period,
        )

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        """Make the TLS files and secret, listen, write the manager info file."""
        os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        address = self.executor.address
        hostnames, ips = ["localhost"], ["127.0.0.1"]
        if _is_ip(address):
            ips.append(address)
        else:
            hostnames.append(address)
        tls_files = ensure_ca_and_server_cert(
            os.path.join(self.work_dir, TLS_DIR_NAME),
            sorted(set(hostnames)),
            sorted(set(ips)),
            ca_common_name="funcX endpoint interchange CA",
        )
        with open(tls_files.server_cert, "rb") as f:
            cert_pem = f.read()
        with open(tls_files.server_key, "rb") as f:
            key_pem = f.read()
        with open(tls_files.ca_cert, "rb") as f:
            ca_pem = f.read()
        options = PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        self._secret = secrets.token_urlsafe(32)
        self._listening = self._listen(_ConnectionFactory(self), options)
        host: Any = self._listening.getHost()
        self.port = host.port
        self.connection_info(ca_pem.decode("ascii")).write(self.info_file)
        ticker = LoopingCall(self._tick)
        ticker.clock = self.clock
        ticker.start(self.heartbeat_period, now=False)
        self._ticker = ticker
        super().startService()
        self.log.info(
            "Interchange listening on {address}:{port} (TLS); managers read {info_file}",
            address=address,
            port=self.port,
            info_file=self.info_file,
        )

    def _listen(self, factory: Factory, options: Any) -> IListeningPort:
        address = self.executor.address
        interface = address if _is_ip(address) else ""
        low, high = self.executor.interchange_port_range
        candidates: Iterable[int] = [0] if high == 0 else range(max(low, 1), high + 1)
        failure: Optional[CannotListenError] = None
        for port in candidates:
            try:
                listening: IListeningPort = self.reactor.listenSSL(
                    port, factory, options, interface=interface
                )
                return listening
            except CannotListenError as exc:
                failure = exc
        raise CannotListenError(
            interface, f"{low}-{high}", failure.socketError if failure else None
        )

    def connection_info(self, ca_cert_pem: str) -> ConnectionInfo:
        """What the info file tells managers (address, port, CA, secret, settings)."""
        executor = self.executor
        max_workers = executor.max_workers_per_node
        return ConnectionInfo(
            address=executor.address,
            port=self.port or 0,
            ca_cert_pem=ca_cert_pem,
            secret=self._secret,
            settings=ManagerSettings(
                heartbeat_period=self.heartbeat_period,
                heartbeat_threshold=self.heartbeat_threshold,
                task_timeout=self.task_timeout,
                result_size_limit=self.result_size_limit,
                stop_grace_period=self.stop_grace_period,
                worker_debug=executor.worker_debug,
                max_workers_per_node=None if max_workers == float("inf") else max_workers,
                cores_per_worker=executor.cores_per_worker,
                mem_per_worker=executor.mem_per_worker,
                available_accelerators=tuple(executor.available_accelerators),
                prefetch_capacity=executor.prefetch_capacity,
                worker_environment=dict(executor.worker_environment),
                batch_interval=self.batch_interval,
            ),
        )

    def status_fields(self) -> Dict[str, Any]:
        """What ``funcx-endpoint status`` shows of the interchange."""
        status = self.status()
        outstanding = status.get("outstanding_tasks") or {}
        return {
            "managers": status.get("managers", 0),
            "workers": status.get("total_workers", 0),
            "idle_workers": status.get("idle_workers", 0),
            "tasks_queued": status.get("pending_tasks", 0),
            "tasks_outstanding": sum(outstanding.values())
            if isinstance(outstanding, dict)
            else outstanding,
        }

    def manager_command(self, block_id: str, manager_id: Optional[str] = None) -> List[str]:
        """The command line that starts a manager for this interchange.

        It runs this Python (``sys.executable``), which on a cluster with a
        shared file system is the same installation on every node, without
        relying on ``funcx-manager`` being on the nodes' PATH.
        """
        command = [
            sys.executable,
            "-m",
            "funcx_endpoint.manager",
            "--info-file",
            self.info_file,
            "--block-id",
            block_id,
        ]

        if manager_id is not None:
            command += ["--manager-id", manager_id]
        return command

    def stopService(self) -> Deferred[None]:
        """Shut managers down, wait for them (up to the grace period), stop listening.

        Each call returns a new Deferred that fires when every connection is
        closed and the port too.
        """
        waiter: Deferred[None] = Deferred()
        if self._stop_state == "stopped":
            waiter.callback(None)
            return waiter
        self._stop_waiters.append(waiter)
        if self._stop_state == "running":
            self._stop_state = "stopping"
            Service.stopService(self)
            stopping = Deferred.fromCoroutine(self._stop())
            stopping.addErrback(self._stop_failed)
            stopping.addCallback(self._stop_finished)
        return waiter

    def _stop_failed(self, failure: Failure) -> None:
        self.log.failure("Stopping the interchange failed", failure)

    def _stop_finished(self, _: None) -> None:
        self._stop_state = "stopped"
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _stop(self) -> None:
        self._stopping = True
        self.accepting = False
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._dispatch_call is not None:
            self._dispatch_call.cancel()
            self._dispatch_call = None
        self._deliver()
        for manager in list(self._managers.values()):
            try:
                manager.connection.callRemote(Shutdown, reason="the endpoint is stopping")
            except Exception:
                manager.connection.drop()
        for connection in list(self._connections):
            if connection.manager is None:
                connection.drop()
        if self._connections:
            waiting = self._when_disconnected()
            waiting.addTimeout(self.stop_grace_period, self.clock)
            try:
                await waiting
            except Exception:
                self.log.warn(
                    "{count} managers did not disconnect within {grace} s; dropping them",
                    count=len(self._connections),
                    grace=self.stop_grace_period,
                )
                for connection in list(self._connections):
                    connection.drop()
                await self._when_disconnected()
        if self._listening is not None:
            await maybeDeferred(self._listening.stopListening)
            self._listening = None
        abandoned = len(self._tasks)
        if abandoned:
            self.log.info(
                "Interchange stopped with {count} tasks unanswered (the broker will "
                "deliver them again)",
                count=abandoned,
            )
        self._deliver()

    def _when_disconnected(self) -> Deferred[None]:
        if not self._connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._disconnect_waiters.append(waiter)
        return waiter

    def when_managers(self, count: int = 1) -> Deferred[None]:
        """A Deferred that fires once at least ``count`` managers are registered."""
        waiter: Deferred[None] = Deferred()
        if len(self._managers) >= count:
            waiter.callback(None)
        else:
            self._manager_waiters.append((count, waiter))
        return waiter

    # -- IInterchange -------------------------------------------------------

    def submit(self, tasks: Sequence[Task]) -> None:
        """Queue ``tasks``; they go to managers at the end of this reactor turn.

        A task whose id is already queued or running here is ignored (its
        first copy will be answered).
        """
        if not self.accepting:
            raise RuntimeError("the interchange is stopping and takes no more tasks")
        transition = TaskTransition.now(TaskState.WAITING_FOR_NODES, ActorName.INTERCHANGE)
        known = self._tasks
        for task in tasks:
            task_id = task.task_id
            if task_id in known:
                self.log.warn(
                    "Task {task_id} is already here; ignoring a second copy", task_id=task_id
                )
                continue
            container_type = self._container_type(task)
            record = _TaskRecord(task, container_type, transition)
            known[task_id] = record
            self._queue(container_type).append(record)
            self._note(task_id, transition)
        self._schedule_dispatch()

    def cancel(self, task_id: str) -> bool:
        """Cancel a task queued here or at a manager; it is answered ``TaskCancelled``."""
        record = self._tasks.pop(task_id, None)
        if record is None:
            return False
        manager = record.manager
        if manager is None:
            self._queues[record.container_type].remove(record)
            where = "while it waited for a worker"
        else:
            del manager.outstanding[task_id]
            if not manager.outstanding:
                manager.idle_since = self.clock.seconds()
            where = f"at {manager.describe()}"
            unsent = [pair for pair in manager.unsent if pair[0] != task_id]
            if len(unsent) < len(manager.unsent):
                manager.unsent = unsent  # it never left: nothing to tell the manager
            else:
                self._forward_cancel(manager, task_id)
            self._schedule_dispatch()
        self.log.info("Task {task_id} cancelled {where}", task_id=task_id, where=where)
        self._answer(
            Result.failure(
                task_id,
                ErrorCode.TASK_CANCELLED,
                f"Task {task_id} was cancelled {where}",
                task_statuses=record.transitions,
            )
        )
        return True

    def _forward_cancel(self, manager: _Manager, task_id: str) -> None:
        try:
            answer = manager.connection.callRemote(CancelTask, task_id=task_id)
        except Exception as exc:
            self.log.warn(
                "Could not forward the cancel of task {task_id}: {error}",
                task_id=task_id,
                error=exc,
            )
            return
        answer.addErrback(self._cancel_failed, task_id, manager)

    def _cancel_failed(self, failure: Failure, task_id: str, manager: _Manager) -> None:
        # The manager is gone or broken; its loss is handled elsewhere, and
        # the task has been answered already.
        self.log.warn(
            "Cancelling task {task_id} at {manager} failed: {error}",
            task_id=task_id,
            manager=manager.describe(),
            error=failure.getErrorMessage(),
        )

    def withdraw_unstarted(self) -> List[str]:
        """Stop accepting; remove the tasks not sent to a manager and return their ids.

        Tasks assigned to a manager but still waiting for the next batch to it
        are withdrawn too.
        """
        self.accepting = False
        withdrawn = []
        for queue in self._queues.values():
            for record in queue:
                task_id = record.task.task_id
                del self._tasks[task_id]
                withdrawn.append(task_id)
            queue.clear()
        for manager in self._managers.values():
            for task_id, _ in manager.unsent:
                del manager.outstanding[task_id]
                del self._tasks[task_id]
                withdrawn.append(task_id)
            manager.unsent = []
        return withdrawn

    def status(self) -> Dict[str, Any]:
        """Counts for status reports, like funcX's ``global_state``."""
        managers = list(self._managers.values())
        outstanding = {container_type: len(queue) for container_type, queue in self._queues.items()}
        for manager in managers:
            outstanding[manager.container_type] = outstanding.get(manager.container_type, 0) + len(
                manager.outstanding
            )
        return {
            "managers": len(managers),
            "total_workers": sum(m.worker_count for m in managers),
            "idle_workers": sum(max(0, m.worker_count - len(m.outstanding)) for m in managers),
            "pending_tasks": sum(len(queue) for queue in self._queues.values()),
            "outstanding_tasks": outstanding,
            "mismatched_managers": [
                dict(manager_id=m.manager_id, hostname=m.hostname, **m.versions)
                for m in managers
                if m.version_mismatch
            ],
        }

    def pop_transitions(self) -> Dict[str, List[TaskTransition]]:
        """Transitions recorded since the last call (the interchange's and those in results)."""
        transitions, self._transitions = self._transitions, {}
        if self._dropped_transitions:
            self.log.warn(
                "Dropped transitions of {count} tasks: more than {limit} tasks between two "
                "status reports",
                count=self._dropped_transitions,
                limit=self._max_recorded,
            )
            self._dropped_transitions = 0
        return transitions

    # -- ILoadSource ----------------------------------------------------------

    def outstanding_tasks(self) -> int:
        """Tasks accepted and not answered yet: queued here plus at managers."""
        return len(self._tasks)

    def managers(self) -> List[ManagerInfo]:
        """The registered managers."""
        return [manager.info() for manager in self._managers.values()]

    def shutdown_manager(self, manager_id: str, reason: str = "scaling in") -> bool:
        """Tell one manager to stop (e.g. an idle one, to scale in); it gets no more tasks.

        Its unanswered tasks, if any, are retried elsewhere when it has gone,
        like those of a lost manager.  False if no such manager is connected.
        """
        manager = self._managers.get(manager_id)
        if manager is None:
            return False
        manager.retiring = True
        self._tell_to_shut_down(manager, reason)
        return True

    def _tell_to_shut_down(self, manager: _Manager, reason: str) -> None:
        if manager.lost:
            return
        self.log.info(
            "Shutting down {manager}: {reason}", manager=manager.describe(), reason=reason
        )
        try:
            manager.connection.callRemote(Shutdown, reason=reason)
        except Exception:
            manager.connection.drop()

    def retire_block(
        self, block_id: str, reason: str = "scaling in", only_idle: bool = True
    ) -> bool:
        """Retire the managers of a block the endpoint is ending (see
        :meth:`ILoadSource.retire_block`): no more tasks for them, ``Shutdown``
        sent, late registrations of the block retired too."""
        managers = [m for m in self._managers.values() if m.block_id == block_id]
        if only_idle and any(m.outstanding for m in managers):
            return False
        self._retired_blocks[block_id] = reason
        self._retired_blocks.move_to_end(block_id)
        while len(self._retired_blocks) > RETIRED_BLOCKS_KEPT:
            self._retired_blocks.popitem(last=False)
        for manager in managers:
            if not manager.retiring:
                manager.retiring = True
                self._tell_to_shut_down(manager, reason)
        return True

    def manager_versions(self) -> Dict[str, Dict[str, str]]:
        """Python, dill and funcx versions of each registered manager, by manager id."""
        return {m.manager_id: dict(m.versions) for m in self._managers.values()}

    # -- tasks ----------------------------------------------------------------

    def _container_type(self, task: Task) -> str:
        if self.executor.worker_mode == "no_container":
            return RAW
        if task.container is not None:
            return task.container.container_id
        return task.container_id or RAW

    def _queue(self, container_type: str) -> Deque[_TaskRecord]:
        queue = self._queues.get(container_type)
        if queue is None:
            queue = self._queues[container_type] = deque()
        return queue

    def _note(self, task_id: str, transition: TaskTransition) -> None:
        recorded = self._transitions.get(task_id)
        if recorded is not None:
            recorded.append(transition)
        elif len(self._transitions) < self._max_recorded:
            self._transitions[task_id] = [transition]
        else:
            self._dropped_transitions += 1

    def _schedule_dispatch(self) -> None:
        if self._dispatch_call is None and not self._stopping:
            self._dispatch_call = self.clock.callLater(0, self._dispatch)

    def _dispatch(self) -> None:
        """Send queued tasks to managers with room, the least loaded first."""
        self._dispatch_call = None
        for container_type, queue in self._queues.items():
            if not queue:
                continue
            managers = [
                m
                for m in self._managers.values()
                if m.container_type == container_type
                and m.free > 0
                and not m.retiring
                and m.quit_reason is None
            ]
            if not managers:
                continue
            for manager, batch in _assign(queue, managers):
                self._send_tasks(manager, batch)

    def _send_tasks(self, manager: _Manager, batch: List[_TaskRecord]) -> None:
        transition = TaskTransition.now(TaskState.WAITING_FOR_LAUNCH, ActorName.INTERCHANGE)
        outstanding = manager.outstanding
        note = self._note
        unsent = manager.unsent
        for record in batch:
            task = record.task
            record.manager = manager
            record.attempts += 1
            record.transitions.append(transition)
            outstanding[task.task_id] = record
            note(task.task_id, transition)
            unsent.append((task.task_id, task.task_buffer.encode("utf-8")))
        manager.idle_since = None
        self._push(manager)

    def _push(self, manager: _Manager) -> None:
        """Send the manager its unsent tasks now, or when ``batch_interval`` allows.

        They go at once after a quiet period, or when the manager holds no more
        tasks than it has workers (they would wait for these).
        """
        if manager.push_call is not None or not manager.unsent or manager.lost:
            return
        wait = manager.last_push + self.batch_interval - self.clock.seconds()
        # Tasks the manager has beyond one per worker: while they last longer
        # than the wait, its workers do not wait for this batch, which may
        # grow meanwhile.
        spare = len(manager.outstanding) - len(manager.unsent) - manager.worker_count
        if wait > 0 and spare > manager.completions.rate * wait:
            manager.push_call = self.clock.callLater(wait, self._push_now, manager)
        else:
            self._push_now(manager)

    def _push_now(self, manager: _Manager) -> None:
        manager.push_call = None
        if not manager.unsent or manager.lost:
            return
        manager.last_push = self.clock.seconds()
        batch, manager.unsent = manager.unsent, []
        try:
            send_unanswered(manager.connection, SubmitTasks, tasks=batch)
        except Exception as exc:
            self._manager_lost(manager, f"sending it tasks failed ({exc})")
            manager.connection.drop()

    def _answer(self, result: Result) -> None:
        self._ready.append(result)
        if self._deliver_call is None:
            self._deliver_call = self.clock.callLater(0, self._deliver)

    def _deliver(self) -> None:
        if self._deliver_call is not None and self._deliver_call.active():
            self._deliver_call.cancel()
        self._deliver_call = None
        ready, self._ready = self._ready, []
        if not ready:
            return
        # A result carries its task's transitions itself: status reports need
        # only those of tasks still in flight (and stay small).
        transitions = self._transitions
        for result in ready:
            transitions.pop(result.task_id, None)
        try:
            self.on_results(ready)
        except Exception:
            self.log.failure("on_results failed for {count} results", count=len(ready))

    # -- managers -----------------------------------------------------------

    def _connection_made(self, connection: ManagerConnection) -> None:
        self._connections.add(connection)
        if self._stopping:
            connection.drop()
            return
        connection.registration_deadline = self.clock.callLater(
            self.registration_timeout, self._registration_expired, connection
        )

    def _registration_expired(self, connection: ManagerConnection) -> None:
        connection.registration_deadline = None
        if connection.manager is None:
            self.log.warn(
                "Dropped a connection from {peer}: it did not register within {timeout} s",
                peer=connection.peer,
                timeout=self.registration_timeout,
            )
            connection.drop()

    def _register(self, connection: ManagerConnection, details: Dict[str, Any]) -> Dict[str, Any]:
        secret = details.pop("secret", "")
        if not hmac.compare_digest(secret.encode("utf-8"), self._secret.encode("utf-8")):
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
        elif self._stopping:
            problem = "the interchange is stopping"
        elif manager_id in self._managers:
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
        manager = _Manager(connection, details, self.clock.seconds(), self._registrations, mismatch)
        if connection.registration_deadline is not None:
            connection.registration_deadline.cancel()
            connection.registration_deadline = None
        connection.manager = manager
        self._managers[manager_id] = manager
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
        retired = self._retired_blocks.get(manager.block_id)
        if retired is not None:
            # Its block is being ended: it gets no task, and is told to go
            # once it has its answer.
            manager.retiring = True
            self.clock.callLater(0, self._tell_to_shut_down, manager, retired)
        waiting = [w for w in self._manager_waiters if len(self._managers) >= w[0]]
        self._manager_waiters = [w for w in self._manager_waiters if w not in waiting]
        for _, waiter in waiting:
            waiter.callback(None)
        self._schedule_dispatch()
        return dict(
            task_timeout=float(self.task_timeout or 0.0),
            result_size_limit=self.result_size_limit,
            heartbeat_period=float(self.heartbeat_period),
            heartbeat_threshold=float(self.heartbeat_threshold),
            stop_grace_period=float(self.stop_grace_period),
            worker_debug=bool(self.executor.worker_debug),
            batch_interval=float(self.batch_interval),
            **self.versions,
        )

    def _results_received(self, manager: _Manager, packed_results: List[bytes]) -> None:
        outstanding = manager.outstanding
        tasks = self._tasks
        answer = self._ready.append
        for packed in packed_results:
            result: Optional[Message]
            try:
                result = unpack(packed)
            except MessageError as exc:
                result = self._unreadable_result(manager, exc)
                if result is None:
                    continue
            if type(result) is not Result:
                self.log.warn(
                    "Ignored a {kind} message sent as a result by {manager}",
                    kind=type(result).__name__,
                    manager=manager.describe(),
                )
                continue
            task_id = result.task_id
            record = outstanding.pop(task_id, None)
            if record is None:
                # Cancelled meanwhile, or never sent there.
                self.log.debug(
                    "Ignored a result for task {task_id}, which {manager} does not hold",
                    task_id=task_id,
                    manager=manager.describe(),
                )
                continue
            del tasks[task_id]
            # The result carries every transition itself; none is noted here
            # (_deliver would only forget it again in this reactor turn).
            theirs = result.task_statuses
            result.task_statuses = record.transitions + theirs if theirs else record.transitions
            answer(result)

        now = self.clock.seconds()
        manager.completions.add(len(packed_results), now)
        manager.tasks_completed += len(packed_results)
        if not outstanding:
            manager.idle_since = now
        if self._ready and self._deliver_call is None:
            self._deliver_call = self.clock.callLater(0, self._deliver)
        self._schedule_dispatch()

    def _unreadable_result(self, manager: _Manager, error: MessageError) -> Optional[Result]:
        """The failure that answers a result this endpoint cannot read, if it
        names a task (else None: nothing to answer, it is only logged).

        A manager of another version may send what this one does not accept;
        its task must still end, not wait at the manager forever.
        """
        self.log.warn(
            "Unreadable result from {manager}: {error}", manager=manager.describe(), error=error
        )
        if error.task_id is None:
            return None
        return Result.failure(
            error.task_id,
            ErrorCode.VERSION_MISMATCH,
            f"the manager on {manager.hostname} sent a result this endpoint cannot read "
            f"(are the endpoint and the manager the same version?): {error}",
        )

    def _connection_lost(self, connection: ManagerConnection, reason: Failure) -> None:

        self._connections.discard(connection)
        if connection.registration_deadline is not None:
            connection.registration_deadline.cancel()
            connection.registration_deadline = None
        manager = connection.manager
        if manager is not None and not manager.lost:
            if self._stopping or (manager.retiring and not manager.outstanding):
                self._forget(manager)
                self.log.info("{manager} disconnected", manager=manager.describe())
            elif manager.quit_reason is not None:
                self._manager_lost(manager, f"it quit: {manager.quit_reason}")
            else:
                self._manager_lost(manager, f"its connection closed ({reason.getErrorMessage()})")
        if not self._connections:
            waiters, self._disconnect_waiters = self._disconnect_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _manager_quitting(self, manager: _Manager, reason: str) -> None:
        """The manager said it is about to exit: no more tasks for it; its
        tasks, when it has gone, fail (or are retried) saying why."""
        if manager.quit_reason is not None or manager.lost:
            return
        manager.quit_reason = reason
        log = self.log.info if manager.retiring or self._stopping else self.log.warn
        log(
            "{manager} is quitting, holding {count} tasks: {reason}",
            manager=manager.describe(),
            count=len(manager.outstanding),
            reason=reason,
        )

    def _forget(self, manager: _Manager) -> List[_TaskRecord]:
        manager.lost = True
        if self._managers.get(manager.manager_id) is manager:
            del self._managers[manager.manager_id]
        records = list(manager.outstanding.values())
        manager.outstanding.clear()
        manager.unsent = []
        if manager.push_call is not None:
            manager.push_call.cancel()
            manager.push_call = None
        for record in records:
            record.manager = None
        return records

    def _manager_lost(self, manager: _Manager, what: str) -> None:
        """Retry or fail the tasks of a manager that is gone."""
        if manager.lost:
            return
        records = self._forget(manager)
        if self._stopping or not self.accepting:
            # The endpoint is stopping (tasks were withdrawn): the broker will
            # deliver these tasks again; failing them now would be wrong.
            return
        if manager.retiring:
            # The endpoint ended it on purpose: that costs its tasks no attempt.
            for record in records:
                record.attempts -= 1
        retry = [r for r in records if r.attempts <= self.max_retries]
        failed = [r for r in records if r.attempts > self.max_retries]
        if retry:
            transition = TaskTransition.now(TaskState.WAITING_FOR_NODES, ActorName.INTERCHANGE)
            for record in reversed(retry):
                record.transitions.append(transition)
                self._note(record.task.task_id, transition)
                self._queue(record.container_type).appendleft(record)
            self._schedule_dispatch()
        for record in failed:
            task_id = record.task.task_id
            del self._tasks[task_id]
            self._answer(
                Result.failure(
                    task_id,
                    ErrorCode.MANAGER_LOST,
                    f"Task {task_id} was lost with {manager.describe()}: {what}. It was "
                    f"tried {record.attempts} time(s) (max_retries_on_system_failure is "
                    f"{self.max_retries}).",
                    task_statuses=record.transitions,
                )
            )
        self.log.warn(
            "Lost {manager}: {what}; {retried} tasks queued again, {failed} failed",
            manager=manager.describe(),
            what=what,
            retried=len(retry),
            failed=len(failed),
        )

    def _tick(self) -> None:
        """Every heartbeat period: heartbeats out, silent managers declared lost."""
        now = self.clock.seconds()
        for manager in list(self._managers.values()):
            silence = now - manager.last_heard
            if silence > self.heartbeat_threshold:
                self._manager_lost(
                    manager,
                    f"it sent nothing for {silence:.0f} s (heartbeat_threshold is "
                    f"{self.heartbeat_threshold:g} s)",
                )
                manager.connection.drop()
                continue
            try:
                send_unanswered(manager.connection, Heartbeat)
            except Exception as exc:
                self._manager_lost(manager, f"a heartbeat could not be sent ({exc})")
                manager.connection.drop()


def _assign(
    queue: Deque[_TaskRecord], managers: List[_Manager]
) -> List[Tuple[_Manager, List[_TaskRecord]]]:
    """Take tasks from ``queue`` for ``managers``, one at a time to the least loaded.

    Load is tasks held per worker; ties go to the manager that registered
    first.  Stops when the queue is empty or every manager is full.
    """
    popleft = queue.popleft
    if len(managers) == 1:
        manager = managers[0]
        count = min(manager.free, len(queue))
        return [(manager, [popleft() for _ in range(count)])]

    batches: Dict[int, List[_TaskRecord]] = {}
    heap = []
    for manager in managers:
        held = len(manager.outstanding)
        heap.append((held / max(manager.worker_count, 1), manager.sequence, held, manager))
    heapq.heapify(heap)
    while queue and heap:
        _, sequence, held, manager = heap[0]
        batches.setdefault(sequence, []).append(popleft())
        held += 1
        if held >= manager.capacity:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (held / max(manager.worker_count, 1), sequence, held, manager))
    by_sequence = {manager.sequence: manager for manager in managers}
    return [(by_sequence[sequence], batch) for sequence, batch in batches.items()]


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
