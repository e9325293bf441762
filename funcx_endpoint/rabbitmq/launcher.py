"""Starting, probing and stopping the processes of one RabbitMQ node, on the reactor.

:class:`NodeLauncher` is the mechanism: it spawns ``epmd`` and
``rabbitmq-server`` with ``reactor.spawnProcess`` (output to files in the
node's ``log/``), waits until each answers, and stops them (``rabbitmqctl
stop``, SIGTERM, SIGKILL to every marked process).  It keeps no state beyond
the two processes and decides nothing: when to start, restart or give up is
:class:`~funcx_endpoint.rabbitmq.service.RabbitMQNodeService`'s business.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint.observer import OneShotObserver
from funcx_endpoint.rabbitmq.commands import CommandResult, CommandRunner, describe_exit
from funcx_endpoint.rabbitmq.node import NodeDirectory, NodeIdentity, RabbitMQStartError, tail
from funcx_endpoint.rabbitmq.processes import IProcessTable, Programs

__all__ = ["NodeLauncher", "NodeProcess"]

#: How often the process table is looked at while waiting for processes to go.
POLL_INTERVAL = 0.1
#: How long epmd may take to answer after it was started.
EPMD_TIMEOUT = 10.0


def first_of(ds: Sequence[Deferred[Any]]) -> Deferred[tuple[int, Any]]:
    """Fires with ``(index, result)`` of the first of ``ds`` to fire, or with its
    failure; the others are cancelled.  Cancelling it cancels them all (and it
    fails with ``CancelledError``, where :func:`twisted.internet.defer.race`
    would fail with a ``FailureGroup``)."""
    settled = False

    def cancel(_: Deferred[tuple[int, Any]]) -> None:
        # Whatever the cancelled Deferreds fire with (a probe's failure may be
        # turned into a value), this one fails with CancelledError.
        nonlocal settled
        settled = True
        for d in ds:
            d.cancel()

    result: Deferred[tuple[int, Any]] = Deferred(cancel)

    def fired(value: Any, index: int) -> None:
        nonlocal settled
        if settled:
            return None
        settled = True
        for other, d in enumerate(ds):
            if other != index:
                d.cancel()
        if isinstance(value, Failure):
            result.errback(value)
        else:
            result.callback((index, value))
        return None

    for index, d in enumerate(ds):
        d.addBoth(fired, index)
    return result


class _Failed:
    """A failure carried as a value (a probe's failure is an answer, not an error)."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure


def _settled(d: Deferred[Any]) -> Deferred[Any]:
    return d.addErrback(_Failed)


def _why(result: CommandResult | _Failed) -> str:
    return result.failure.getErrorMessage() if isinstance(result, _Failed) else result.describe()


class NodeProcess(ProcessProtocol):
    """``epmd`` or ``rabbitmq-server``: its pid, and an observable end."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.pid: int | None = None
        self.exit: str | None = None
        self._ended: OneShotObserver[str] = OneShotObserver()

    def __repr__(self) -> str:
        return f"<NodeProcess {self.label} pid={self.pid} {self.exit or 'running'}>"

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        self.pid = getattr(transport, "pid", None)

    @property
    def alive(self) -> bool:
        return not self._ended.fired

    def processEnded(self, reason: Failure) -> None:
        self.exit = describe_exit(reason)
        self._ended.fire(self.exit)

    def when_ended(self) -> Deferred[str]:
        """Fires with how the process ended (``killed by signal 9``, ...)."""
        return self._ended.when_fired()

    def signal(self, name: str) -> None:
        if self.transport is not None and self.alive:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass


@attr.s(auto_attribs=True, eq=False)
class NodeLauncher:
    """The processes of the node ``identity`` in ``directory``.

    ``stop_timeout`` bounds a graceful stop, ``kill_timeout`` each wait after
    SIGTERM or SIGKILL.  ``environ`` is the environment the programs' own is
    built on (default ``os.environ``).
    """

    log = Logger()

    directory: NodeDirectory
    identity: NodeIdentity
    programs: Programs
    _reactor: IReactorProcess = attr.ib(kw_only=True)
    _clock: IReactorTime = attr.ib(kw_only=True)
    _table: IProcessTable = attr.ib(kw_only=True)
    _commands: CommandRunner = attr.ib(kw_only=True)
    stop_timeout: float = attr.ib(kw_only=True)
    kill_timeout: float = attr.ib(kw_only=True)
    _environ: Mapping[str, str] | None = attr.ib(default=None, kw_only=True)
    epmd: NodeProcess | None = attr.ib(default=None, init=False)
    server: NodeProcess | None = attr.ib(default=None, init=False)

    @property
    def epmd_alive(self) -> bool:
        return self.epmd is not None and self.epmd.alive

    @property
    def server_alive(self) -> bool:
        return self.server is not None and self.server.alive

    def _ctl_env(self) -> dict[str, str]:
        return self.directory.ctl_env(self.identity, self._environ)

    async def _within(self, d: Deferred[Any], seconds: float) -> bool:
        """Whether ``d`` fires within ``seconds`` (``d`` is cancelled if not)."""
        index, _ = await first_of([d, deferLater(self._clock, seconds)])
        return index == 0

    async def _pause(self, seconds: float) -> None:
        await deferLater(self._clock, seconds)

    # -- starting -----------------------------------------------------------------------

    def _spawn(self, label: str, argv: list[str], out_path: str) -> NodeProcess:
        protocol = NodeProcess(label)
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            self._reactor.spawnProcess(
                protocol,
                argv[0],
                argv,
                env=self.directory.server_env(self.identity, self._environ),
                path=self.directory.base_dir,
                childFDs={0: stdin, 1: out, 2: out},
            )
        finally:
            os.close(out)
            os.close(stdin)
        return protocol

    async def start_epmd(self) -> None:
        """Start the node's own epmd and return once it answers.

        Whatever is left of an earlier run of the node (of this process or of one
        that was killed) is killed first: it would hold the node's ports.
        """
        leftovers = await self.kill_marked()
        if leftovers:
            self.log.warn(
                "Killed processes {pids} left over by an earlier run of node {name}",
                pids=leftovers,
                name=self.identity.name,
            )
        epmd = self.epmd = self._spawn(
            "epmd", self.programs.epmd_argv(self.identity), self.directory.epmd_output
        )
        env = self._ctl_env()
        deadline = self._clock.seconds() + EPMD_TIMEOUT
        while True:
            probe = self._commands.run(
                self.programs.epmd_names_argv(self.identity), env, timeout=5.0
            )
            index, result = await first_of([_settled(probe), epmd.when_ended()])
            if index == 1:
                raise RabbitMQStartError(
                    f"epmd of RabbitMQ node {self.identity.name} {result}:\n"
                    + tail(self.directory.epmd_output)
                )
            if not isinstance(result, _Failed) and result.ok:
                return
            if self._clock.seconds() >= deadline:
                raise RabbitMQStartError(
                    f"epmd of RabbitMQ node {self.identity.name} did not answer on port "
                    f"{self.identity.ports.epmd} within {EPMD_TIMEOUT:g} s ({_why(result)})"
                )
            await self._pause(0.05)

    async def start_server(self, start_timeout: float) -> None:
        """Start ``rabbitmq-server`` (epmd must run) and return once it is ready.

        Ready means ``rabbitmqctl wait`` saw RabbitMQ and its plugins running.
        Fails with :class:`RabbitMQStartError` (quoting the logs) at once if the
        server or epmd exits first.  Bound it with a timeout: it retries the probe
        as long as the server lives.
        """
        epmd = self.epmd
        assert epmd is not None
        try:
            os.unlink(self.directory.pid_file)
        except FileNotFoundError:
            pass
        server = self.server = self._spawn(
            "server", self.programs.server_argv(), self.directory.server_output
        )
        env = self._ctl_env()
        while True:
            probe = self._commands.run(
                self.programs.wait_argv(self.directory, self.identity, start_timeout),
                env,
                path=self.directory.base_dir,
                timeout=start_timeout + 15,
            )
            index, result = await first_of(
                [_settled(probe), server.when_ended(), epmd.when_ended()]
            )
            if index == 1:
                raise RabbitMQStartError(
                    self.directory.failure_report(self.identity, f"{result} while starting")
                )
            if index == 2:
                raise RabbitMQStartError(
                    self.directory.failure_report(self.identity, f"lost its epmd ({result})")
                )
            if not isinstance(result, _Failed) and result.ok:
                return
            self.log.debug("rabbitmqctl wait: {why}; trying again", why=_why(result))
            await self._pause(0.5)

    async def when_either_ends(self) -> str:
        """Wait until the server or epmd ends; say which and how."""
        assert self.server is not None and self.epmd is not None
        index, how = await first_of([self.server.when_ended(), self.epmd.when_ended()])
        return f"died ({how})" if index == 0 else f"lost its epmd ({how})"

    # -- stopping -----------------------------------------------------------------------

    async def stop_server(self, graceful: bool) -> None:
        """Stop the server: ``rabbitmqctl stop`` if ``graceful`` (and epmd runs),
        SIGTERM after ``stop_timeout``, then, ``kill_timeout`` later, SIGKILL to
        every process of the node but epmd."""
        server = self.server
        if server is None or not server.alive:
            return
        name = self.identity.name
        ended = False
        if graceful and self.epmd_alive:
            self.log.info("Stopping RabbitMQ node {name}", name=name)
            deadline = self._clock.seconds() + self.stop_timeout
            ctl = self._commands.run(
                self.programs.ctl_argv(self.identity, "stop"),
                self._ctl_env(),
                path=self.directory.base_dir,
                timeout=self.stop_timeout,
            )
            index, result = await first_of([server.when_ended(), _settled(ctl)])
            ended = index == 0
            if not ended and not isinstance(result, _Failed) and result.ok:
                remaining = max(0.0, deadline - self._clock.seconds())
                ended = await self._within(server.when_ended(), remaining)
            elif not ended:
                self.log.warn("rabbitmqctl stop failed ({why})", why=_why(result))
        if not ended:
            self.log.info("Sending SIGTERM to RabbitMQ node {name}", name=name)
            server.signal("TERM")
            ended = await self._within(server.when_ended(), self.kill_timeout)
        if not ended:
            self.log.warn(
                "RabbitMQ node {name} did not stop within {seconds:g} s of SIGTERM; killing it",
                name=name,
                seconds=self.kill_timeout,
            )
            server.signal("KILL")
            self._table.signal_all(name, signal.SIGKILL, exclude=self._epmd_pids())
            if not await self._within(server.when_ended(), self.kill_timeout):
                self.log.error("RabbitMQ node {name} survived SIGKILL", name=name)

    async def stop_epmd(self) -> None:
        """SIGTERM to epmd; SIGKILL after ``kill_timeout``."""
        epmd = self.epmd
        if epmd is None or not epmd.alive:
            return
        epmd.signal("TERM")
        if not await self._within(epmd.when_ended(), self.kill_timeout):
            epmd.signal("KILL")
            await self._within(epmd.when_ended(), self.kill_timeout)

    def _epmd_pids(self) -> list[int]:
        epmd = self.epmd
        return [epmd.pid] if epmd is not None and epmd.alive and epmd.pid else []

    async def kill_marked(self, keep_epmd: bool = False) -> list[int]:
        """SIGKILL every process of the node (but a live epmd of ours, if
        ``keep_epmd``) and wait until they are gone; return the pids killed."""
        name = self.identity.name
        skip = set(self._epmd_pids() if keep_epmd else ())
        killed = self._table.signal_all(name, signal.SIGKILL, exclude=skip)
        deadline = self._clock.seconds() + self.kill_timeout
        while killed:
            left = [pid for pid in self._table.find(name) if pid not in skip]
            if not left:
                break
            if self._clock.seconds() >= deadline:
                self.log.error(
                    "Processes {pids} of RabbitMQ node {name} survived SIGKILL",
                    pids=left,
                    name=name,
                )
                break
            self._table.signal_all(name, signal.SIGKILL, exclude=skip)
            await self._pause(POLL_INTERVAL)
        return killed

    async def stop_all(self, graceful: bool) -> None:
        """Stop the server, epmd and any command still running; return once no
        process of the node is left."""
        await self.stop_server(graceful)
        await self.stop_epmd()
        self._commands.kill_all()
        await self._commands.when_idle()
        await self.kill_marked()
