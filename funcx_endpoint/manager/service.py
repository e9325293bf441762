"""The manager's service: connect to the interchange, register, run its tasks.

:class:`ManagerService` connects (TLS, verifying the interchange's
certificate against the CA from the info file, for the info file's
address), registers, then starts its :class:`~funcx_endpoint.manager.pool.WorkerPool`
with the settings the interchange answered.  Tasks from the interchange go
to the pool; results from the pool go back in batches, one ``SendResults``
per reactor turn.  Heartbeats go out every ``heartbeat_period``; an
interchange silent for ``heartbeat_threshold``, a closed connection, a
``Shutdown`` command or :meth:`stopService` (SIGTERM) stop the workers
(TERM, then KILL after a grace) and end the service; :meth:`when_stopped`
then fires with the process's exit status.

:class:`InterchangeConnection` is the AMP I/O and holds no policy.  The
connection is made once: a manager whose interchange went away exits, and
the endpoint's scaling starts new ones.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from funcx_endpoint.manager.batching import ResultBatching
from funcx_endpoint.manager.containers import (
    NO_CONTAINER,
    RAW,
    ImageUnavailable,
    WorkerImage,
    image_for_task,
)
from funcx_endpoint.manager.images import IWorkerPlacement, OneImagePlacement
from funcx_endpoint.manager.launcher import WorkerLauncher
from funcx_endpoint.manager.pool import WorkerPool
from funcx_endpoint.manager.started import StartReports
from funcx_endpoint.manager.warm import WarmReport
from funcx_endpoint.wire import Container, ErrorCode, PackedResult
from funcx_endpoint.wire.amp import (
    MAX_QUIT_REASON,
    CancelTask,
    Heartbeat,
    Quitting,
    Register,
    RegistrationRefused,
    SendResults,
    Shutdown,
    SubmitTasks,
    WarmContainers,
    read_unanswered_arguments,
    send_unanswered,
    set_no_delay,
)
from funcx_endpoint.wire.info import (
    ConnectionInfo,
    ManagerSettings,
    local_versions,
    versions_differ,
)
from funcx_endpoint.worker.execute import clip

__all__ = [
    "EXIT_CONFIG",
    "EXIT_LOST",
    "EXIT_OK",
    "EXIT_REFUSED",
    "InterchangeConnection",
    "ManagerService",
]

#: Exit statuses of a manager process.
EXIT_OK = 0
EXIT_LOST = 1  # the interchange went away or could not be reached
EXIT_REFUSED = 3  # the interchange refused the registration
EXIT_WORKERS = 4  # workers could not be started
EXIT_CONFIG = 78  # the settings cannot work here (EX_CONFIG): e.g. no container engine


class InterchangeConnection(amp.AMP):
    """The manager's end of the connection: AMP I/O, events to the manager."""

    def __init__(self, manager: ManagerService) -> None:
        super().__init__()
        self._manager = manager

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        super().connectionMade()
        self._manager.connection_made(self)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        manager = self._manager
        manager.last_heard = manager.clock.seconds()
        try:
            batch = read_unanswered_arguments(SubmitTasks, box, self)
        except (ValueError, KeyError) as exc:
            manager.log.error("Unreadable batch of tasks from the interchange: {error}", error=exc)
            transport: Any = self.transport
            transport.loseConnection()
            return
        if batch is not None:
            manager.tasks_received(batch["tasks"], batch.get("containers"))
            return
        super().ampBoxReceived(box)

    @SubmitTasks.responder
    def submit_tasks(
        self, tasks: List[Tuple[str, bytes]], containers: Optional[Dict[str, Container]] = None
    ) -> Dict[str, Any]:
        """Tasks sent with callRemote (the fast path in ampBoxReceived takes most)."""
        self._manager.tasks_received(tasks, containers)
        return {}

    @CancelTask.responder
    def cancel_task(self, task_id: str) -> Dict[str, Any]:
        """Cancel a task here; say whether it was here."""
        return {"found": self._manager.cancel(task_id)}

    @Heartbeat.responder
    def heartbeat(self) -> Dict[str, Any]:
        """Nothing to do: receiving any box counts as a sign of life."""
        return {}

    @Shutdown.responder
    def shutdown(self, reason: str) -> Dict[str, Any]:
        """The interchange says stop."""
        self._manager.shutdown(f"the interchange asked: {reason}", EXIT_OK, tell=False)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._manager.connection_lost(self, reason)


@attr.s(auto_attribs=True, frozen=True)
class ManagerIdentity:
    """Who a manager says it is when it registers."""

    manager_id: str = attr.Factory(lambda: str(uuid.uuid4()))
    block_id: str = "0"
    hostname: str = attr.Factory(socket.gethostname)
    pid: int = attr.Factory(os.getpid)
    worker_type: str = "no_container"
    container_type: str = "RAW"


@attr.s(auto_attribs=True, eq=False, repr=False)
class ManagerService(Service):
    """One manager: a connection to the interchange and a pool of workers."""

    log = Logger()

    reactor: Any
    info: ConnectionInfo
    identity: ManagerIdentity
    worker_count: int
    log_dir: str
    _given_settings: Optional[ManagerSettings] = attr.ib(
        default=None, kw_only=True, alias="settings"
    )
    worker_command: Optional[Sequence[str]] = attr.ib(default=None, kw_only=True)
    #: The workers' base environment, where the container engine is looked up
    #: (None: this process's).
    environment: Optional[Mapping[str, str]] = attr.ib(default=None, kw_only=True)
    #: Which image each worker slot runs (None: one image at a time,
    #: :meth:`first_image` first; soft routing gives a WarmPlacement).
    placement: Optional[IWorkerPlacement] = attr.ib(default=None, kw_only=True)
    connect_attempts: int = attr.ib(default=10, kw_only=True)
    connect_timeout: float = attr.ib(default=10.0, kw_only=True)
    _endpoint: Optional[IStreamClientEndpoint] = attr.ib(default=None, kw_only=True)
    clock: Any = attr.ib(init=False)
    #: The settings given, else the info file's (updated by the registration's answer).
    settings: ManagerSettings = attr.ib(init=False)
    pool: Optional[WorkerPool] = attr.ib(default=None, init=False)
    connection: Optional[InterchangeConnection] = attr.ib(default=None, init=False)
    _connecting: Optional[InterchangeConnection] = attr.ib(default=None, init=False)
    last_heard: float = attr.ib(default=0.0, init=False)
    _attempt: Optional[Deferred[Any]] = attr.ib(default=None, init=False)
    _disconnected: Optional[Deferred[None]] = attr.ib(default=None, init=False)
    _heartbeats: Optional[LoopingCall] = attr.ib(default=None, init=False)
    _outbox: List[bytes] = attr.ib(factory=list, init=False)
    _batching: ResultBatching = attr.ib(factory=ResultBatching, init=False)
    _flush_call: Optional[IDelayedCall] = attr.ib(default=None, init=False)
    _finishing: bool = attr.ib(default=False, init=False)
    _exit_code: Optional[int] = attr.ib(default=None, init=False)
    _stop_waiters: List[Deferred[int]] = attr.ib(factory=list, init=False)
    results_sent: int = attr.ib(default=0, init=False)
    warm_report: WarmReport = attr.ib(factory=WarmReport, init=False)
    _starts: StartReports = attr.ib(init=False)

    @clock.default
    def _the_reactor(self) -> Any:
        return self.reactor

    @_starts.default
    def _start_reports(self) -> StartReports:
        return StartReports(self.clock, lambda: self.connection)

    @settings.default
    def _given_or_info_settings(self) -> ManagerSettings:
        return self._given_settings or self.info.settings

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        """Start connecting to the interchange (workers start once registered)."""
        super().startService()
        connecting = Deferred.fromCoroutine(self._connect())
        connecting.addErrback(self._connect_failed)

    async def _connect(self) -> None:
        """Connect and register, retrying a few times; then the workers start.

        A manager connects once: if its connection breaks later it exits, and
        the endpoint's scaling starts a new one.  (So this is a bounded first
        attempt, not a reconnecting ClientService.)
        """
        endpoint = self._endpoint or self.client_endpoint()
        factory = Factory.forProtocol(lambda: InterchangeConnection(self))
        factory.noisy = False
        delay = 0.2
        problem = "no attempt made"
        for attempt in range(1, self.connect_attempts + 1):
            try:
                if attempt > 1:
                    self._attempt = deferLater(self.clock, delay, lambda: None)
                    await self._attempt
                    delay = min(delay * 2, 5.0)
                self._attempt = endpoint.connect(factory)
                connection = await self._attempt
                # Not cancellable (AMP answers cannot be): shutdown drops the
                # connection instead, which fails the call.
                self._attempt = None
                answer = await self._send_registration(connection)
            except RegistrationRefused as exc:
                self.log.error("The interchange refused this manager: {why}", why=exc)
                self.shutdown(f"the interchange refused this manager: {exc}", EXIT_REFUSED)
                return
            except Exception as exc:
                if self._finishing:
                    return
                problem = f"{type(exc).__name__}: {exc}"
                self.log.warn(
                    "Could not connect to the interchange at {address}:{port} "
                    "(attempt {attempt} of {attempts}): {problem}",
                    address=self.info.address,
                    port=self.info.port,
                    attempt=attempt,
                    attempts=self.connect_attempts,
                    problem=problem,
                )
                self._drop(self._connecting)
                continue
            finally:
                self._attempt = None
            if self._finishing:
                self._drop(self._connecting)
                return
            self._registered(answer, self._connecting)
            return
        self.shutdown(
            f"could not connect to the interchange at {self.info.address}:{self.info.port} "
            f"after {self.connect_attempts} attempts: {problem}",
            EXIT_LOST,
        )

    def _connect_failed(self, failure: Failure) -> None:
        self.log.failure("Connecting to the interchange failed", failure)
        self.shutdown(f"connecting failed: {failure.getErrorMessage()}", EXIT_LOST)

    @staticmethod
    def _drop(connection: Optional[InterchangeConnection]) -> None:
        transport: Any = connection.transport if connection is not None else None
        if transport is not None:
            transport.loseConnection()

    def client_endpoint(self) -> IStreamClientEndpoint:
        """TLS to the info file's address and port, trusting only the info file's CA."""
        trust = Certificate.loadPEM(self.info.ca_cert_pem.encode("ascii"))
        tcp = HostnameEndpoint(
            self.reactor, self.info.address, self.info.port, timeout=self.connect_timeout
        )
        return wrapClientTLS(optionsForClientTLS(self.info.address, trustRoot=trust), tcp)

    def stopService(self) -> Deferred[int]:
        """Stop workers and disconnect; fires (with the exit status) when done."""
        Service.stopService(self)
        self.shutdown("asked to stop (signal)", EXIT_OK)
        return self.when_stopped()

    def when_stopped(self) -> Deferred[int]:
        """A new Deferred firing with the exit status once the manager has stopped."""
        waiter: Deferred[int] = Deferred()
        if self._exit_code is not None and not self._finishing:
            waiter.callback(self._exit_code)
        else:
            self._stop_waiters.append(waiter)
        return waiter

    # -- registration -------------------------------------------------------

    def connection_made(self, connection: InterchangeConnection) -> None:
        """A connection is up (not registered yet)."""
        self._connecting = connection

    def _send_registration(self, connection: Any) -> Deferred[Dict[str, Any]]:
        identity = self.identity
        details = dict(
            secret=self.info.secret,
            manager_id=identity.manager_id,
            block_id=identity.block_id,
            hostname=identity.hostname,
            pid=identity.pid,
            worker_count=self.worker_count,
            prefetch_capacity=self.settings.prefetch_capacity,
            worker_type=identity.worker_type,
            container_type=identity.container_type,
            **local_versions(),
        )
        answer: Deferred[Dict[str, Any]] = connection.callRemote(Register, **details)
        return answer

    def _registered(
        self, answer: Dict[str, Any], connection: Optional[InterchangeConnection]
    ) -> None:
        assert connection is not None
        if self._finishing:
            self._drop(connection)
            return
        timeout = answer["task_timeout"]
        self.settings = attr.evolve(
            self.settings,
            task_timeout=timeout if timeout > 0 else None,
            result_size_limit=answer["result_size_limit"],
            heartbeat_period=answer["heartbeat_period"],
            heartbeat_threshold=answer["heartbeat_threshold"],
            stop_grace_period=answer["stop_grace_period"],
            worker_debug=answer["worker_debug"] or self.settings.worker_debug,
            batch_interval=answer["batch_interval"],
        )
        self.connection = connection
        self.last_heard = self.clock.seconds()
        theirs = {k: answer[k] for k in ("python_version", "dill_version", "funcx_version")}
        self.log.info(
            "Registered as manager {manager_id} (block {block_id}) with the interchange at "
            "{address}:{port}; starting {count} workers",
            manager_id=self.identity.manager_id,
            block_id=self.identity.block_id,
            address=self.info.address,
            port=self.info.port,
            count=self.worker_count,
        )
        if versions_differ(local_versions(), theirs):
            self.log.warn(
                "The endpoint runs Python {python} and dill {dill}; this manager runs "
                "{mine}: functions serialized there may not load here",
                python=theirs["python_version"],
                dill=theirs["dill_version"],
                mine=local_versions(),
            )
        launcher = WorkerLauncher(
            self.reactor, self.settings, self.worker_command, self.environment
        )
        problem = launcher.problem(self.identity.hostname)
        if problem is not None:
            self.shutdown(problem, EXIT_CONFIG)
            return
        self.pool = WorkerPool(
            self.reactor,
            self.worker_count,
            self.settings,
            self.log_dir,
            on_result=self._result_ready,
            on_fatal=self._workers_failed,
            hostname=self.identity.hostname,
            launcher=launcher,
            placement=self.placement or OneImagePlacement(self.first_image()),
            on_change=self._report_warm,
            on_started=self._starts.started,
            on_finished=self._starts.finished,
        )
        self.pool.start()
        self._report_warm()
        heartbeats = LoopingCall(self._heartbeat)
        heartbeats.clock = self.clock
        heartbeats.start(self.settings.heartbeat_period, now=False)
        self._heartbeats = heartbeats

    def _report_warm(self) -> None:
        """Tell the interchange its warm workers per container type and its cold
        starts (``WarmContainers``), when they changed; managers of raw workers
        say nothing."""
        pool, connection = self.pool, self.connection
        if pool is None or connection is None or self.settings.worker_mode == NO_CONTAINER:
            return
        report = self.warm_report.update(pool.images(), pool.cold_starts)
        if report is None:
            return
        try:
            send_unanswered(connection, WarmContainers, warm=report[0], cold_starts=report[1])
        except Exception as exc:
            self.log.warn("Could not send the warm containers: {error}", error=exc)

    def first_image(self) -> Optional[WorkerImage]:
        """What the workers run before any task asks: the endpoint-wide image; no
        container for a manager of raw tasks; nothing yet for a manager of one
        container's tasks (hard routing), which starts its workers for the first."""
        settings = self.settings
        if settings.worker_mode != NO_CONTAINER and settings.container_uri:
            return WorkerImage(settings.worker_mode, settings.container_uri)
        return RAW if self.identity.container_type == "RAW" else None

    # -- traffic --------------------------------------------------------------

    def tasks_received(
        self, tasks: List[Tuple[str, bytes]], containers: Optional[Dict[str, Container]] = None
    ) -> None:
        """Tasks from the interchange: to the pool, each for the image it runs in.

        A task whose container this manager cannot run (no image of its
        engine's type) is answered ``ContainerError`` here.
        """
        pool = self.pool
        if pool is None:
            return
        settings = self.settings
        if settings.worker_mode == NO_CONTAINER or not (containers or settings.container_uri):
            pool.submit(tasks)
            return
        if settings.container_uri:
            image = WorkerImage(settings.worker_mode, settings.container_uri)
            for task_id, _ in tasks:
                box = containers.get(task_id) if containers else None
                self.warm_report.served(image, box.container_id if box else None)
            pool.submit(tasks, image)
            self._report_warm()
            return
        assert containers is not None
        groups: Dict[WorkerImage, List[Tuple[str, bytes]]] = {}
        for task in tasks:
            box = containers.get(task[0])
            try:
                image = image_for_task(settings, box)
            except ImageUnavailable as exc:
                message = f"Task {task[0]} cannot run on {self.identity.hostname}: {exc}"
                self.log.warn("{message}", message=message)
                failed = PackedResult.failure(task[0], ErrorCode.CONTAINER_ERROR, message)
                self._result_ready(failed.encode())
                continue
            groups.setdefault(image, []).append(task)
            self.warm_report.served(image, box.container_id if box else None)
        for image, group in groups.items():
            pool.submit(group, image)
        self._report_warm()

    def cancel(self, task_id: str) -> bool:
        """Cancel a task here; whether it was found."""
        return self.pool is not None and self.pool.cancel(task_id)

    def _result_ready(self, packed: bytes) -> None:
        self._outbox.append(packed)
        pool = self.pool
        queued, workers = (pool.queued, pool.worker_count) if pool is not None else (0, 1)
        wait = self._batching.result_ready(
            self.clock.seconds(), queued, workers, self.settings.batch_interval
        )
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(wait, self._flush)
        elif wait == 0.0:
            self._flush()  # the workers will soon wait: what is held goes now

    def _flush(self) -> None:
        """Send the results gathered so far, in one batch."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._outbox or self.connection is None:
            return
        self._batching.last_batch = self.clock.seconds()
        outbox, self._outbox = self._outbox, []
        try:
            send_unanswered(self.connection, SendResults, results=outbox)
        except Exception as exc:
            self.log.warn("Could not send {count} results: {error}", count=len(outbox), error=exc)
            return
        self.results_sent += len(outbox)

    def _heartbeat(self) -> None:
        silence = self.clock.seconds() - self.last_heard
        if silence > self.settings.heartbeat_threshold:
            self.shutdown(
                f"the interchange sent nothing for {silence:.0f} s (heartbeat_threshold "
                f"is {self.settings.heartbeat_threshold:g} s)",
                EXIT_LOST,
                tell=False,
            )
            return
        if self.connection is not None:
            try:
                send_unanswered(self.connection, Heartbeat)
            except Exception as exc:
                self.log.warn("Could not send a heartbeat: {error}", error=exc)

    def connection_lost(self, connection: InterchangeConnection, reason: Failure) -> None:
        """The connection closed: a registered manager has nothing left to do."""
        if self._disconnected is not None and connection in (self.connection, self._connecting):
            waiter, self._disconnected = self._disconnected, None
            waiter.callback(None)
        if connection is self.connection:
            self.connection = None
            self.shutdown(
                f"lost the connection to the interchange ({reason.getErrorMessage()})",
                EXIT_LOST,
                tell=False,
            )

    def _workers_failed(self, reason: str) -> None:
        self.shutdown(f"workers cannot start: {reason}", EXIT_WORKERS)

    # -- stopping -------------------------------------------------------------

    def shutdown(self, reason: str, exit_code: int, tell: bool = True) -> None:
        """Stop everything once; :meth:`when_stopped` fires with ``exit_code``.

        With ``tell``, the interchange is told why first (``Quitting``), so
        that the tasks it loses with this manager say why.
        """
        if self._finishing or self._exit_code is not None:
            return
        self._finishing = True
        self._exit_code = exit_code
        if tell and self.connection is not None:
            try:
                send_unanswered(self.connection, Quitting, reason=clip(reason, MAX_QUIT_REASON))
            except Exception as exc:
                self.log.warn("Could not tell the interchange why: {error}", error=exc)
        log = self.log.info if exit_code == EXIT_OK else self.log.warn
        log(
            "Manager {manager_id} stopping: {reason}",
            manager_id=self.identity.manager_id,
            reason=reason,
        )
        if self._attempt is not None:
            self._attempt.cancel()
        # On the next turn: this may be called from a connection's callbacks.
        self.clock.callLater(0, self._begin_shutdown)

    def _begin_shutdown(self) -> None:
        done = Deferred.fromCoroutine(self._shutdown())
        done.addErrback(lambda failure: self.log.failure("Stopping failed", failure))
        done.addBoth(self._stopped)

    async def _shutdown(self) -> None:
        if self._heartbeats is not None and self._heartbeats.running:
            self._heartbeats.stop()
        if self.pool is not None:
            self._flush()
            await self.pool.stop()
        self._flush()
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        self._starts.stop()
        connection = self.connection or self._connecting
        transport: Any = connection.transport if connection is not None else None
        if transport is not None:
            lost = Deferred()  # type: Deferred[None]
            self._disconnected = lost
            transport.loseConnection()
            await lost

    def _stopped(self, _: Any) -> None:
        self._finishing = False
        code = self._exit_code if self._exit_code is not None else EXIT_LOST
        self.log.info(
            "Manager {manager_id} stopped (exit status {code})",
            manager_id=self.identity.manager_id,
            code=code,
        )
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(code)
