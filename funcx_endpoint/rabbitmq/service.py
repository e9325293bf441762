"""A private RabbitMQ node as a supervised Twisted service.

:class:`RabbitMQNodeService` prepares the node's directory
(:class:`~funcx_endpoint.rabbitmq.node.NodeDirectory`), starts its own
``epmd`` and then ``rabbitmq-server`` with ``reactor.spawnProcess``, and says
when the node is ready (:meth:`~RabbitMQNodeService.when_ready`): once
``rabbitmqctl wait`` reports RabbitMQ and its plugins running.

While the service runs, a node that dies (or whose epmd dies) is reported,
with the tail of its logs, and started again after a delay from the retry
policy (:func:`twisted.application.internet.backoffPolicy` by default); the
delays grow while restarts keep failing and start over once a node has stayed
up for ``stable_after`` seconds.  A node that does not come up at the first
start is not retried: :meth:`~RabbitMQNodeService.when_ready` fails with the
reason and the logs, and the service is ``failed``.

``stopService`` stops the node with ``rabbitmqctl stop``, then SIGTERM after
``stop_timeout`` seconds, then SIGKILL to every process of the node after
``kill_timeout`` more; then epmd the same way.  Its Deferred fires once no
process of the node is left (they are found by their marker, see
:mod:`funcx_endpoint.rabbitmq.processes`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint import tls
from funcx_endpoint.observer import OneShotObserver, fire_all
from funcx_endpoint.rabbitmq.commands import CommandRunner
from funcx_endpoint.rabbitmq.launcher import NodeLauncher
from funcx_endpoint.rabbitmq.node import (
    LISTEN_IP,
    NodeDirectory,
    NodeIdentity,
    NodePorts,
    RabbitMQError,
    RabbitMQStartError,
)
from funcx_endpoint.rabbitmq.processes import IProcessTable, MarkedProcessTable, Programs

__all__ = ["NodeState", "NodeStatus", "RabbitMQNodeService"]


class NodeState(enum.Enum):
    """Where a node is in its life."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True)
class NodeStatus:
    """What :meth:`RabbitMQNodeService.status` reports (for ``funcx-service status``)."""

    state: NodeState
    name: str | None
    restarts: int
    last_exit: str | None
    last_error: str | None
    server_pid: int | None
    epmd_pid: int | None
    since: float

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "name": self.name,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "server_pid": self.server_pid,
            "epmd_pid": self.epmd_pid,
            "since": self.since,
        }


class RabbitMQNodeService(Service):
    """A RabbitMQ node in ``directory``, started, watched and restarted; see the module.

    ``tls_files`` serve AMQPS (on ``amqps_address``, 127.0.0.1 by default);
    ``name`` and ``ports`` are used when the directory holds no node yet
    (default: a random name, free ports); ``extra_config`` adds to or overrides
    ``rabbitmq.conf``.  ``reactor`` spawns processes, ``clock`` (default: the
    reactor) times everything.  ``programs`` (default: found at start),
    ``process_table`` (default: ``/proc``) and ``retry_policy`` (delay before the
    n-th restart in a row) can be replaced, for tests.
    """

    log = Logger()

    def __init__(
        self,
        directory: NodeDirectory,
        tls_files: tls.TLSFiles,
        *,
        reactor: IReactorProcess,
        clock: IReactorTime | None = None,
        name: str | None = None,
        ports: NodePorts | None = None,
        extra_config: Mapping[str, str] | None = None,
        amqps_address: str = LISTEN_IP,
        programs: Programs | None = None,
        process_table: IProcessTable | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        kill_timeout: float = 10.0,
        retry_policy: Callable[[int], float] | None = None,
        stable_after: float = 60.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self._tls_files = tls_files
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._requested_name = name
        self._requested_ports = ports
        self._extra_config = dict(extra_config or {})
        self._amqps_address = amqps_address
        self._programs = programs
        self._table: IProcessTable = process_table or MarkedProcessTable()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.kill_timeout = kill_timeout
        # The first restart after 1 to 2 s, then 2 to 3, 4 to 5, ... up to a minute.
        self._retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.5, maxDelay=60.0, factor=2.0
        )
        self.stable_after = stable_after
        self._environ = environ
        self._commands = CommandRunner(reactor, self._clock)

        self._launcher: NodeLauncher | None = None
        self._state = NodeState.STOPPED
        self._since = self._clock.seconds()
        self._running_since = 0.0
        self._restarts = 0
        self._last_exit: str | None = None
        self._last_error: str | None = None
        self._ready_waiters: list[Deferred[None]] = []
        self._start_failure: Failure | None = None
        self._supervisor: Deferred[None] | None = None
        self._stopped: OneShotObserver[None] | None = None

    def __repr__(self) -> str:
        name = self._launcher.identity.name if self._launcher else "(not started)"
        return f"<RabbitMQNodeService {name} {self._state.value}>"

    # -- what others see ------------------------------------------------------------

    @property
    def state(self) -> NodeState:
        return self._state

    @property
    def identity(self) -> NodeIdentity:
        """Name, ports and admin credentials (known once the service has started)."""
        if self._launcher is None:
            raise RabbitMQError("the node's identity is known once the service has started")
        return self._launcher.identity

    @property
    def server_pid(self) -> int | None:
        """The pid of the Erlang VM (``beam.smp``) while it runs."""
        launcher = self._launcher
        if launcher is None or launcher.server is None or not launcher.server.alive:
            return None
        return launcher.server.pid

    def status(self) -> NodeStatus:
        """The state, restarts so far, how the node last died, the last start error."""
        launcher = self._launcher
        epmd = launcher.epmd if launcher is not None else None
        return NodeStatus(
            state=self._state,
            name=launcher.identity.name if launcher is not None else None,
            restarts=self._restarts,
            last_exit=self._last_exit,
            last_error=self._last_error,
            server_pid=self.server_pid,
            epmd_pid=epmd.pid if epmd is not None and epmd.alive else None,
            since=self._since,
        )

    def when_ready(self) -> Deferred[None]:
        """Fires when the node is (next) ready: at once while it runs.

        Fails with :class:`RabbitMQStartError` (or :class:`RabbitMQNotInstalled`)
        if the first start fails, and with :class:`RabbitMQError` if the service
        stops before the node is ready.
        """
        d: Deferred[None] = Deferred()
        if self._state is NodeState.RUNNING:
            d.callback(None)
        elif self._state is NodeState.FAILED and self._start_failure is not None:
            d.errback(self._start_failure)
        elif self._state in (NodeState.STOPPED, NodeState.STOPPING):
            d.errback(RabbitMQError("the RabbitMQ node service is not running"))
        else:
            self._ready_waiters.append(d)
        return d

    def _set_state(self, state: NodeState) -> None:
        self._state = state
        self._since = self._clock.seconds()

    # -- the service ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = None
        self._set_state(NodeState.STARTING)
        self._supervisor = Deferred.fromCoroutine(self._supervise())
        self._supervisor.addErrback(self._supervisor_ended)

    def _supervisor_ended(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.log.failure("The RabbitMQ node's supervisor failed", failure)

    def stopService(self) -> Deferred[None]:
        """Stop the node; the Deferred fires once none of its processes is left."""
        super().stopService()
        if self._stopped is None:
            stopped = self._stopped = OneShotObserver()
            # Only a node that is up is asked to stop by rabbitmqctl; one still
            # booting gets SIGTERM.
            graceful = self._state is NodeState.RUNNING
            if self._state is not NodeState.FAILED:
                self._set_state(NodeState.STOPPING)
            supervisor, self._supervisor = self._supervisor, None
            if supervisor is not None:
                supervisor.cancel()
            fire_all(
                self._ready_waiters,
                Failure(RabbitMQError("the RabbitMQ node service stopped before it was ready")),
            )
            Deferred.fromCoroutine(self._shut_down(graceful)).addBoth(stopped.fire)
        return self._stopped.when_fired()

    # -- supervision ------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._boot()
        except CancelledError:
            raise
        except Exception:
            failure = self._start_failure = Failure()
            self._last_error = str(failure.value)
            self.log.error("{error}", error=self._last_error)
            if self._launcher is not None:
                await self._launcher.stop_all(graceful=False)
            self._set_state(NodeState.FAILED)
            fire_all(self._ready_waiters, failure)
            return
        self._now_running()
        launcher = self._launcher
        assert launcher is not None
        failures = 0
        while True:
            cause = await launcher.when_either_ends()
            self._restarts += 1
            self._last_exit = cause
            if self._clock.seconds() - self._running_since >= self.stable_after:
                failures = 0
            self._set_state(NodeState.RESTARTING)
            self.log.error(
                "{report}",
                report=self.directory.failure_report(
                    launcher.identity, f"{cause}; restarting it (restart {self._restarts})"
                ),
            )
            while True:
                failures += 1
                # What is left of the server (all of it if epmd died), and its
                # helpers; a live epmd is kept.
                await launcher.stop_server(graceful=False)
                await launcher.kill_marked(keep_epmd=True)
                delay = self._retry_policy(failures)
                self.log.info(
                    "Starting RabbitMQ node {name} again in {delay:.1f} s",
                    name=launcher.identity.name,
                    delay=delay,
                )
                await deferLater(self._clock, delay)
                try:
                    await self._boot()
                    break
                except CancelledError:
                    raise
                except Exception as e:
                    self._last_error = str(e)
                    self.log.error("RabbitMQ node did not start again: {error}", error=e)
            self._now_running()

    def _now_running(self) -> None:
        self._running_since = self._clock.seconds()
        self._set_state(NodeState.RUNNING)
        fire_all(self._ready_waiters, None)

    def _prepare(self) -> NodeLauncher:
        """Programs, identity and config files (small local files: written in place)."""
        if self._launcher is None:
            programs = self._programs or Programs.find()
            identity = self.directory.ensure_identity(self._requested_name, self._requested_ports)
            self._launcher = NodeLauncher(
                self.directory,
                identity,
                programs,
                reactor=self._reactor,
                clock=self._clock,
                table=self._table,
                commands=self._commands,
                stop_timeout=self.stop_timeout,
                kill_timeout=self.kill_timeout,
                environ=self._environ,
            )
        launcher = self._launcher
        self.directory.write_config(
            launcher.identity, self._tls_files, self._extra_config, self._amqps_address
        )
        return launcher

    async def _boot(self) -> None:
        """Start epmd (unless it runs) and the server, within the start timeout.

        On failure nothing of the server is left running (epmd may be).
        """
        launcher = self._prepare()
        identity = launcher.identity
        self.log.info(
            "Starting RabbitMQ node {name}{again} in {dir}",
            name=identity.name,
            again="" if self._restarts == 0 else " again",
            dir=self.directory.base_dir,
        )
        started = self._clock.seconds()

        async def boot() -> None:
            if not launcher.epmd_alive:
                await launcher.start_epmd()
            await launcher.start_server(self.start_timeout)

        booting = Deferred.fromCoroutine(boot())
        booting.addTimeout(self.start_timeout, self._clock)
        try:
            await booting
        except TimeoutError:
            await launcher.stop_server(graceful=False)
            raise RabbitMQStartError(
                self.directory.failure_report(
                    identity, f"did not start within {self.start_timeout:g} s"
                )
            ) from None
        except CancelledError:
            raise
        except Exception:
            await launcher.stop_server(graceful=False)
            raise
        self.log.info(
            "RabbitMQ node {name} ready in {seconds:.1f} s (amqp={amqp} amqps={amqps} "
            "management={management})",
            name=identity.name,
            seconds=self._clock.seconds() - started,
            amqp=identity.ports.amqp,
            amqps=identity.ports.amqps,
            management=identity.ports.management,
        )

    async def _shut_down(self, graceful: bool) -> None:
        launcher = self._launcher
        try:
            if launcher is not None:
                await launcher.stop_all(graceful)
        finally:
            self._set_state(NodeState.STOPPED)
        name = launcher.identity.name if launcher is not None else "(none)"
        self.log.info("RabbitMQ node {name} stopped", name=name)
