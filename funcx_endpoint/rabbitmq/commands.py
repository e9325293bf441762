"""Short-lived helper commands (``rabbitmqctl``, ``epmd -names``) run on the reactor.

:class:`CommandRunner` runs a command with ``reactor.spawnProcess``, collects its
output and gives a Deferred of the :class:`CommandResult`.  A command that
outlives its timeout, or whose Deferred is cancelled, is killed (SIGKILL).
The runner remembers the commands still running, so that whoever owns it can
wait until none is left (:meth:`CommandRunner.when_idle`) before saying it
has stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from funcx_endpoint.observer import OneShotObserver

__all__ = ["CommandResult", "CommandRunner", "CommandTimeout", "describe_exit"]


class CommandTimeout(Exception):
    """A command did not finish in time and was killed."""


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: ``code`` (None if killed by ``signal``) and its output."""

    argv: tuple[str, ...]
    code: int | None
    signal: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        """``exited with code 3: <output tail>`` or ``killed by signal 9``."""
        if self.signal is not None:
            how = f"killed by signal {self.signal}"
        else:
            how = f"exited with code {self.code}"
        text = (self.stderr or self.stdout).strip()[-2000:]
        return f"{how}: {text}" if text else how


def describe_exit(reason: Failure) -> str:
    """``exited with code 0``, ``exited with code 1`` or ``killed by signal 9``
    for the reason a process ended."""
    value = reason.value
    code = getattr(value, "exitCode", None)
    signal = getattr(value, "signal", None)
    if signal is not None:
        return f"killed by signal {signal}"
    return f"exited with code {code if code is not None else 0}"


class _Collect(ProcessProtocol):
    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = tuple(argv)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: OneShotObserver[CommandResult] = OneShotObserver()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.ended.fire(
            CommandResult(
                self.argv,
                getattr(value, "exitCode", 0),
                getattr(value, "signal", None),
                b"".join(self.out).decode("utf-8", "replace"),
                b"".join(self.err).decode("utf-8", "replace"),
            )
        )

    def kill(self) -> None:
        if self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass


class CommandRunner:
    """Runs commands on ``reactor`` (an ``IReactorProcess``) with timeouts on ``clock``."""

    def __init__(self, reactor: IReactorProcess, clock: IReactorTime) -> None:
        self._reactor = reactor
        self._clock = clock
        self._running: set[_Collect] = set()

    @property
    def running(self) -> int:
        """How many commands are running."""
        return len(self._running)

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        path: str | None = None,
        timeout: float = 60.0,
    ) -> Deferred[CommandResult]:
        """Run ``argv``; the Deferred fires with its result once it has ended.

        After ``timeout`` seconds it is killed and the Deferred fails with
        :class:`CommandTimeout`.  Cancelling the Deferred kills it too.  A
        failure to spawn fails the Deferred at once.
        """
        protocol = _Collect(argv)
        try:
            self._reactor.spawnProcess(
                protocol, argv[0], list(argv), env=dict(env), path=path, childFDs={1: "r", 2: "r"}
            )
        except Exception:
            return fail(Failure())
        self._running.add(protocol)
        timer: list[IDelayedCall] = []

        def cancel(d: Deferred[CommandResult]) -> None:
            protocol.kill()

        result: Deferred[CommandResult] = Deferred(cancel)

        def expire() -> None:
            timer.clear()
            protocol.kill()
            if not result.called:
                result.errback(
                    CommandTimeout(f"{' '.join(argv[:4])} did not finish within {timeout:g} s")
                )

        timer.append(self._clock.callLater(timeout, expire))

        def ended(outcome: CommandResult) -> None:
            self._running.discard(protocol)
            if timer:
                timer.pop().cancel()
            if not result.called:
                result.callback(outcome)

        protocol.ended.when_fired().addCallback(ended)
        return result

    def kill_all(self) -> None:
        """Kill every running command."""
        for protocol in list(self._running):
            protocol.kill()

    def when_idle(self) -> Deferred[None]:
        """Fires once no command is running (at once if none is)."""
        if not self._running:
            return succeed(None)
        pending = [p.ended.when_fired() for p in self._running]

        def check(_: Any) -> Deferred[None]:
            return self.when_idle()

        return gatherResults(pending).addCallback(check)
