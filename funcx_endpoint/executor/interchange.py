"""The interchange: where the endpoint's tasks meet its managers.

:class:`Interchange` is a thin facade, a Twisted service, over three objects
that each hold one concern:

* a :class:`~funcx_endpoint.executor.registry.ManagerRegistry`: manager
  connections (:class:`~funcx_endpoint.executor.connection.ManagerConnection`,
  AMP over TLS), registration and the secret, liveness, retiring;
* a :class:`~funcx_endpoint.executor.dispatcher.TaskDispatcher`: queues per
  container type, batches to managers, results back to the
  :class:`~funcx_endpoint.executor.interface.IResultSink` given at
  construction, retries;
* a routing policy (:mod:`funcx_endpoint.executor.routing`) the dispatcher
  asks where tasks go, chosen by :mod:`funcx_endpoint.executor.routing_mode`.

The facade itself makes the TLS files and the secret, listens, writes the
manager info file, and runs the lifecycle::

    idle ──start──► running ──stop──► stopping ──managers gone──► stopped

Stopping tells managers to shut down and waits for them to disconnect, at
most ``stop_grace_period`` seconds, then drops the rest.  Tasks still at
managers then get no result: the endpoint leaves them to the broker, which
delivers them again.

It provides :class:`~funcx_endpoint.executor.interface.IInterchange` (what
the task intake calls) and
:class:`~funcx_endpoint.executor.interface.ILoadSource` (what the scaling
strategy reads).
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import secrets
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence

from automat import MethodicalMachine
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from funcx_endpoint.config.model import HighThroughputExecutor, MiB
from funcx_endpoint.executor.blocks import CONTAINER_TYPE
from funcx_endpoint.executor.connection import MAX_UNREGISTERED_BYTES, ManagerConnectionFactory
from funcx_endpoint.executor.dispatcher import TaskDispatcher
from funcx_endpoint.executor.interface import (
    IInterchange,
    ILoadSource,
    IResultSink,
    IRoutingPolicy,
    ITypedLoadSource,
    ManagerInfo,
)
from funcx_endpoint.executor.registry import ManagerRegistry
from funcx_endpoint.executor.routing import RAW
from funcx_endpoint.executor.routing_mode import hard_routing, routing_for, scheduler_mode
from funcx_endpoint.lifecycle import IStatusPart
from funcx_endpoint.tls import ensure_ca_and_server_cert
from funcx_endpoint.wire import Task, TaskTransition
from funcx_endpoint.wire.info import ConnectionInfo, ManagerSettings, local_versions

__all__ = [
    "CONTAINER_TYPE",
    "INFO_FILE_NAME",
    "MAX_UNREGISTERED_BYTES",
    "RAW",
    "Interchange",
    "hard_routing",
    "routing_for",
    "scheduler_mode",
]

#: The name of the info file in the interchange's working directory.
INFO_FILE_NAME = "manager-info.json"
#: The directory (in the working directory) of the CA and server certificate.
TLS_DIR_NAME = "interchange-tls"
#: The managers whose cold starts ``funcx-endpoint status`` lists (those with the most).
COLD_STARTS_SHOWN = 20


@implementer(IInterchange, ILoadSource, ITypedLoadSource, IStatusPart)
class Interchange(Service):
    """Dispatches tasks to managers over TLS+AMP and hands their results to a sink.

    ``reactor`` provides ``listenSSL`` and time; ``work_dir`` receives the
    TLS files and the manager info file (:attr:`info_file`); ``executor``
    gives worker counts, prefetch, retries, the address and port range;
    ``result_sink`` receives every result.  After :meth:`startService`,
    :attr:`port` is the port managers connect to and
    :meth:`manager_command` the command that starts one.
    """

    name = "interchange"
    log = Logger()
    _machine = MethodicalMachine()

    def __init__(
        self,
        reactor: Any,
        work_dir: str,
        executor: HighThroughputExecutor,
        result_sink: IResultSink,
        *,
        routing: Optional[IRoutingPolicy] = None,
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
        self.heartbeat_period = heartbeat_period
        self.heartbeat_threshold = heartbeat_threshold
        self.task_timeout = task_timeout
        self.result_size_limit = result_size_limit
        self.stop_grace_period = stop_grace_period
        self.batch_interval = batch_interval
        self.info_file = os.path.join(self.work_dir, INFO_FILE_NAME)
        self.port: Optional[int] = None
        self.versions = local_versions()
        self.dispatcher = TaskDispatcher(
            reactor,
            result_sink,
            routing or routing_for(executor, reactor),
            max_retries=executor.max_retries_on_system_failure,
            batch_interval=batch_interval,
            max_recorded_tasks=max_recorded_tasks,
        )
        self.registry = ManagerRegistry(
            reactor,
            self.dispatcher,
            secret=secrets.token_urlsafe(32),
            versions=self.versions,
            answer=dict(
                task_timeout=float(task_timeout or 0.0),
                result_size_limit=result_size_limit,
                heartbeat_period=float(heartbeat_period),
                heartbeat_threshold=float(heartbeat_threshold),
                stop_grace_period=float(stop_grace_period),
                worker_debug=bool(executor.worker_debug),
                batch_interval=float(batch_interval),
            ),
            heartbeat_period=heartbeat_period,
            heartbeat_threshold=heartbeat_threshold,
            registration_timeout=registration_timeout,
        )
        self._listening: Optional[IListeningPort] = None
        self._stop_waiters: List[Deferred[None]] = []

    @classmethod
    def from_config(
        cls, reactor: Any, work_dir: str, config: Any, result_sink: IResultSink
    ) -> Interchange:
        """An interchange for ``config`` (a :class:`~funcx_endpoint.config.model.Config`)."""
        executor = config.executors[0]
        return cls(
            reactor,
            work_dir,
            executor,
            result_sink,
            heartbeat_period=config.manager_heartbeat_period(executor),
            heartbeat_threshold=config.manager_heartbeat_threshold(executor),
            task_timeout=config.task_timeout,
            result_size_limit=config.result_size_limit,
            stop_grace_period=config.stop_grace_period,
        )

    # -- lifecycle ------------------------------------------------------------

    @_machine.state(initial=True)
    def _idle(self) -> None:
        """Not started."""

    @_machine.state()
    def _running(self) -> None:
        """Listening; managers register and take tasks."""

    @_machine.state()
    def _stopping(self) -> None:
        """Managers told to shut down; waiting for them to go."""

    @_machine.state()
    def _stopped(self) -> None:
        """Nothing left: no connection, no port."""

    @_machine.input()
    def _start(self) -> None:
        """startService."""

    @_machine.input()
    def _stop(self, waiter: Deferred[None]) -> None:
        """stopService (``waiter`` fires once stopped)."""

    @_machine.input()
    def _finished(self) -> None:
        """The managers have gone and the port is closed."""

    @_machine.output()
    def _listen_and_publish(self) -> None:
        os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        address = self.executor.address
        hostnames, ips = ["localhost"], ["127.0.0.1"]
        (ips if _is_ip(address) else hostnames).append(address)
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
        self._listening = self._listen(ManagerConnectionFactory(self.registry), options)
        host: Any = self._listening.getHost()
        self.port = host.port
        self.connection_info(ca_pem.decode("ascii")).write(self.info_file)
        self.registry.start()
        self.log.info(
            "Interchange listening on {address}:{port} (TLS); managers read {info_file}",
            address=address,
            port=self.port,
            info_file=self.info_file,
        )

    @_machine.output()
    def _wait(self, waiter: Deferred[None]) -> None:
        self._stop_waiters.append(waiter)

    @_machine.output()
    def _begin_stopping(self, waiter: Deferred[None]) -> None:
        stopping = Deferred.fromCoroutine(self._shut_down())
        stopping.addErrback(self._stop_failed)
        stopping.addCallback(lambda _: self._finished())

    @_machine.output()
    def _already_stopped(self, waiter: Deferred[None]) -> None:
        waiter.callback(None)

    @_machine.output()
    def _notify_stopped(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    _idle.upon(_start, enter=_running, outputs=[_listen_and_publish])
    _idle.upon(_stop, enter=_stopped, outputs=[_already_stopped])
    _running.upon(_stop, enter=_stopping, outputs=[_wait, _begin_stopping])
    _stopping.upon(_stop, enter=_stopping, outputs=[_wait])
    _stopping.upon(_finished, enter=_stopped, outputs=[_notify_stopped])
    _stopped.upon(_stop, enter=_stopped, outputs=[_already_stopped])

    def startService(self) -> None:
        """Make the TLS files and secret, listen, write the manager info file."""
        self._start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Shut managers down, wait for them (up to the grace period), stop listening.

        Each call returns a new Deferred that fires when every connection is
        closed and the port too.
        """
        Service.stopService(self)
        waiter: Deferred[None] = Deferred()
        self._stop(waiter)
        return waiter

    def _stop_failed(self, failure: Failure) -> None:
        self.log.failure("Stopping the interchange failed", failure)

    async def _shut_down(self) -> None:
        registry = self.registry
        registry.stop_accepting()
        self.dispatcher.stop()
        registry.shut_down_all("the endpoint is stopping")
        if registry.connection_count:
            waiting = registry.when_disconnected()
            waiting.addTimeout(self.stop_grace_period, self.clock)
            try:
                await waiting
            except Exception:
                self.log.warn(
                    "{count} managers did not disconnect within {grace} s; dropping them",
                    count=registry.connection_count,
                    grace=self.stop_grace_period,
                )
                registry.drop_all()
                await registry.when_disconnected()
        if self._listening is not None:
            await maybeDeferred(self._listening.stopListening)
            self._listening = None
        abandoned = self.dispatcher.outstanding_tasks()
        if abandoned:
            self.log.info(
                "Interchange stopped with {count} tasks unanswered (the broker will "
                "deliver them again)",
                count=abandoned,
            )
        self.dispatcher.deliver()

    def _listen(self, factory: Factory, options: Any) -> IListeningPort:
        address = self.executor.address
        interface = address if _is_ip(address) else ""
        low, high = self.executor.listen_port_range()
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
            secret=self.registry.secret,
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
                worker_environment=executor.manager_worker_environment(),
                batch_interval=self.batch_interval,
                worker_mode=executor.worker_mode,
                container_uri=getattr(executor, "container_uri", None),
                container_cmd_options=executor.container_cmd_options or "",
            ),
        )

    def manager_command(
        self,
        block_id: str,
        manager_id: Optional[str] = None,
        container_type: Optional[str] = None,
    ) -> List[str]:
        """The command line that starts a manager for this interchange.

        It runs this Python (``sys.executable``), which on a cluster with a
        shared file system is the same installation on every node, without
        relying on ``funcx-manager`` being on the nodes' PATH.  With hard
        routing, ``container_type`` (or, by default, the placeholder
        :data:`CONTAINER_TYPE` the block scaler replaces) is the one type the
        manager serves: ``--container-type TYPE``.
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
        if hard_routing(self.executor):
            command += ["--container-type", container_type or CONTAINER_TYPE]
        return command

    def when_managers(self, count: int = 1) -> Deferred[None]:
        """A Deferred that fires once at least ``count`` managers are registered."""
        return self.registry.when_managers(count)

    # -- IInterchange -------------------------------------------------------

    def submit(self, tasks: Sequence[Task]) -> None:
        """Queue ``tasks`` (see :meth:`TaskDispatcher.submit`)."""
        self.dispatcher.submit(tasks)

    def cancel(self, task_id: str) -> bool:
        """Cancel a task queued here or at a manager; it is answered ``TaskCancelled``."""
        return self.dispatcher.cancel(task_id)

    def withdraw_unstarted(self) -> List[str]:
        """Stop accepting; remove the tasks not sent to a manager and return their ids."""
        return self.dispatcher.withdraw_unstarted()

    @property
    def accepting(self) -> bool:
        """Whether tasks are taken (False once withdrawn or stopping)."""
        return self.dispatcher.accepting

    def status(self) -> Dict[str, Any]:
        """Counts for status reports, like funcX's ``global_state``.

        From totals kept up to date as tasks and managers come and go: its
        cost does not grow with the number of managers.
        """
        dispatcher = self.dispatcher
        queued = dispatcher.queued()
        workers, idle, held = dispatcher.load_totals()
        outstanding = dict(queued)
        for container_type, count in held.items():
            outstanding[container_type] = outstanding.get(container_type, 0) + count
        return {
            "managers": len(self.registry.managers),
            "total_workers": workers,
            "idle_workers": idle,
            "pending_tasks": sum(queued.values()),
            "outstanding_tasks": outstanding,
            "mismatched_managers": [
                dict(manager_id=m.manager_id, hostname=m.hostname, **m.versions)
                for m in self.registry.mismatched.values()
            ],
        }

    def status_fields(self) -> Dict[str, Any]:
        """What ``funcx-endpoint status`` shows of the interchange.

        With containers, ``routing``: the scheduler mode, warm workers by
        container type, the cold starts of all managers since the start, and
        those of the :data:`COLD_STARTS_SHOWN` managers here that made the
        most (by manager id).  Asked for only by ``funcx-endpoint status``
        (not by the periodic status reports): finding those managers looks at
        every manager once.
        """
        status = self.status()
        fields: Dict[str, Any] = {
            "managers": status["managers"],
            "workers": status["total_workers"],
            "idle_workers": status["idle_workers"],
            "tasks_queued": status["pending_tasks"],
            "tasks_outstanding": sum(status["outstanding_tasks"].values()),
        }
        mode = scheduler_mode(self.executor)
        if mode != "raw":
            warm, cold_starts = self.dispatcher.warm_totals()
            by_manager = [
                (self.dispatcher.cold_starts_of(m), m.manager_id)
                for m in self.registry.managers.values()
            ]
            top = heapq.nlargest(COLD_STARTS_SHOWN, (pair for pair in by_manager if pair[0]))
            fields["routing"] = {
                "scheduler_mode": mode,
                "cold_starts": cold_starts,
                "warm_workers": warm,
                "cold_starts_by_manager": {manager_id: n for n, manager_id in top},
            }
        return fields

    def pop_transitions(self) -> Dict[str, List[TaskTransition]]:
        """Transitions recorded since the last call (the interchange's)."""
        return self.dispatcher.pop_transitions()

    # -- ILoadSource ----------------------------------------------------------

    def outstanding_tasks(self) -> int:
        """Tasks accepted and not answered yet: queued here plus at managers."""
        return self.dispatcher.outstanding_tasks()

    def outstanding_by_type(self) -> Dict[str, int]:
        """Tasks accepted and not answered yet, by container type."""
        outstanding = self.status()["outstanding_tasks"]
        return {container_type: n for container_type, n in outstanding.items() if n}

    def managers(self) -> List[ManagerInfo]:
        """The registered managers."""
        infos = []
        for manager in self.registry.managers.values():
            held, idle_since, completed = self.dispatcher.load_of(manager)
            infos.append(
                ManagerInfo(
                    manager_id=manager.manager_id,
                    block_id=manager.block_id,
                    hostname=manager.hostname,
                    worker_count=manager.worker_count,
                    idle_workers=max(0, manager.worker_count - held),
                    active_tasks=held,
                    registered_at=manager.registered_at,
                    idle_since=idle_since,
                    tasks_completed=completed,
                    container_type=manager.container_type,
                )
            )
        return infos

    def shutdown_manager(self, manager_id: str, reason: str = "scaling in") -> bool:
        """Tell one manager to stop; it gets no more tasks.

        Its unanswered tasks, if any, are retried elsewhere when it has gone
        (without losing an attempt).  False if no such manager is connected.
        """
        manager = self.registry.managers.get(manager_id)
        if manager is None:
            return False
        manager.retire(reason)
        return True

    def retire_block(
        self, block_id: str, reason: str = "scaling in", only_idle: bool = True
    ) -> bool:
        """Retire the managers of a block the endpoint is ending (see
        :meth:`ILoadSource.retire_block`)."""
        if only_idle and any(self.dispatcher.held_by(m) for m in self.registry.of_block(block_id)):
            return False
        self.registry.retire_block(block_id, reason)
        return True

    def drain_block(self, block_id: str, why: str) -> bool:
        """Give the managers of a block whose walltime ends soon no new task
        (see :meth:`ILoadSource.drain_block`)."""
        drained = self.dispatcher.drain_block(block_id, why)
        if drained:
            self.log.info(
                "Block {block_id} drains: {why}; its managers get no new task",
                block_id=block_id,
                why=why,
            )
        return drained

    def departures(self) -> Dict[str, int]:
        """Managers gone so far, by block id (see :meth:`ILoadSource.departures`)."""
        return dict(self.registry.departures)

    def fail_waiting(self, code: str, message: str) -> int:
        """Fail the tasks waiting for a manager (see :meth:`ILoadSource.fail_waiting`)."""
        return self.dispatcher.fail_waiting(code, message)

    def manager_versions(self) -> Dict[str, Dict[str, str]]:
        """Python, dill and funcx versions of each registered manager, by manager id."""
        return {m.manager_id: dict(m.versions) for m in self.registry.managers.values()}


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
