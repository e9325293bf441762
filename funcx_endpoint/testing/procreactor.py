"""A fake reactor for unit tests of code that spawns processes.

:class:`MemoryProcessReactor` is a :class:`twisted.internet.testing.MemoryReactorClock`
(fake TCP/SSL/UNIX, ``callLater`` on a :class:`~twisted.internet.task.Clock`) with an
``IReactorProcess.spawnProcess`` that runs nothing. Each spawn is recorded as a
:class:`FakeProcess`, which is the ``IProcessTransport`` handed to the protocol and
also the test's handle on the "child": the test makes the child write to a pipe,
close it, exit with a code or die of a signal, and the protocol sees the same calls
in the same order as with a real process::

    reactor = MemoryProcessReactor()
    proto = MyProtocol()
    reactor.spawnProcess(proto, "/bin/worker", ["worker"], childFDs={0: "w", 1: "r", 3: "r"})
    child = reactor.processes[-1]
    child.simulate_output(3, b"frame")
    proto.stop()                       # which calls transport.signalProcess("TERM")
    assert child.signals == ["TERM"]
    child.simulate_killed(signal.SIGTERM)

As in Twisted: ``makeConnection`` is called inside ``spawnProcess``;
``processExited`` as soon as the child exits; ``processEnded`` once the child has
exited *and* every pipe to it is closed (:meth:`FakeProcess.simulate_exit` closes the
child's pipes unless told not to, as when a grandchild keeps them open); the reason
is a :class:`~twisted.python.failure.Failure` of ``ProcessDone`` (exit code 0) or
``ProcessTerminated`` (non-zero code, or a signal); ``pid`` is ``None`` from the
exit on, and ``signalProcess`` then raises ``ProcessExitedAlready``.
"""

from __future__ import annotations

import os
import signal as _signal
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, AnyStr, Union

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IAddress,
    IProcessProtocol,
    IProcessTransport,
    IReactorProcess,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["FakeProcess", "MemoryProcessReactor", "ProcessAddress"]

_DEFAULT_CHILD_FDS: Mapping[int, Union[int, str]] = {0: "w", 1: "r", 2: "r"}
# The names IProcessTransport.signalProcess accepts besides signal numbers.
_SIGNAL_NAMES = ("HUP", "STOP", "INT", "KILL", "TERM")


@implementer(IAddress)
class ProcessAddress:
    """The address of a process transport (there is none, as in Twisted)."""

    def __repr__(self) -> str:
        return "ProcessAddress()"


@implementer(IProcessTransport)
class FakeProcess:
    """A spawned "process": the transport its protocol sees and the test's handle.

    Recorded spawn arguments: :attr:`executable`, :attr:`args`, :attr:`env`,
    :attr:`path`, :attr:`uid`, :attr:`gid`, :attr:`use_pty`, :attr:`child_fds` and
    :attr:`proto`. What the parent did: :attr:`signals` (each ``signalProcess``
    argument, as given), :attr:`written` (bytes per child fd), :attr:`closed_by_parent`
    (fds the parent closed). Outcome: :attr:`exited`, :attr:`ended`,
    :attr:`exit_code`, :attr:`exit_signal`.
    """

    def __init__(
        self,
        reactor: MemoryProcessReactor,
        proto: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[Any, Any] | None,
        path: bytes | str | None,
        uid: int | None,
        gid: int | None,
        use_pty: bool,
        child_fds: Mapping[int, int | str] | None,
        pid: int,
    ) -> None:
        self.reactor = reactor
        self.proto: IProcessProtocol | None = proto
        self.executable = executable
        self.args = list(args)
        self.env = env
        self.path = path
        self.uid = uid
        self.gid = gid
        self.use_pty = use_pty
        self.child_fds: dict[int, int | str] = dict(
            _DEFAULT_CHILD_FDS if child_fds is None else child_fds
        )
        self.pid: int | None = pid
        self.original_pid = pid
        self.signals: list[str | int] = []
        self.written: dict[int, bytes] = {}
        self._closed_by_parent: list[int] = []
        self.exited = False
        self.ended = False
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self._status = 0
        # Pipes still open, fd -> "r" (child writes, we read) or "w" (we write).
        # With a PTY, Twisted has no per-fd pipes; we model the usual three.
        self.open_pipes: dict[int, str] = {
            fd: kind for fd, kind in self.child_fds.items() if kind in ("r", "w")
        }
        # File descriptors the parent gave the child (an int in childFDs): the
        # child holds a copy, as after a real fork, until it closes it or exits.
        # What the parent writes into such a pipe is read back by data_written.
        self.inherited: dict[int, int] = {}
        for fd, given in self.child_fds.items():
            if isinstance(given, int) and fd > 2:
                try:
                    copy = os.dup(given)
                except OSError:
                    continue  # not a real descriptor (a test's stand-in number)
                os.set_blocking(copy, False)
                self.inherited[fd] = copy

    def __repr__(self) -> str:
        state = "ended" if self.ended else "exited" if self.exited else "running"
        return f"<FakeProcess pid={self.original_pid} {self.executable!r} {state}>"

    # -- IProcessTransport (what the code under test calls) ----------------------

    def signalProcess(self, signalID: str | int) -> None:
        """Record the signal; raise ``ProcessExitedAlready`` once the child exited."""
        if isinstance(signalID, str) and signalID not in _SIGNAL_NAMES:
            # os.kill would refuse a string, as it does in Twisted.
            raise TypeError(f"unknown signal name {signalID!r}")
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(signalID)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        """Record ``data`` for ``childFD``; ``KeyError`` unless it is an open 'w' pipe."""
        if not isinstance(data, bytes):
            raise TypeError("data must be bytes")
        if self.open_pipes.get(childFD) != "w":
            raise KeyError(childFD)
        self.written[childFD] = self.written.get(childFD, b"") + data

    def write(self, data: bytes) -> None:
        """Write to the child's stdin; silently dropped if there is none (as Twisted)."""
        if self.open_pipes.get(0) == "w":
            self.writeToChild(0, data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def closeChildFD(self, descriptor: int) -> None:
        """Close our end of a pipe; the protocol gets ``childConnectionLost``."""
        if descriptor in self.open_pipes:
            self._closed_by_parent.append(descriptor)
            self._pipe_closed(descriptor)

    def closeStdin(self) -> None:
        self.closeChildFD(0)

    def closeStdout(self) -> None:
        self.closeChildFD(1)

    def closeStderr(self) -> None:
        self.closeChildFD(2)

    def loseConnection(self) -> None:
        """Close stdin, stderr and stdout (in Twisted's order)."""
        self.closeStdin()
        self.closeStderr()
        self.closeStdout()

    def getPeer(self) -> ProcessAddress:
        return ProcessAddress()

    def getHost(self) -> ProcessAddress:
        return ProcessAddress()

    # -- test helpers: what the child does ----------------------------------------

    def data_written(self, fd: int = 0) -> bytes:
        """Everything the parent wrote to the child's ``fd`` so far (a pipe of
        ours, or one the parent gave the child)."""
        self._read_inherited(fd)
        return self.written.get(fd, b"")

    def _read_inherited(self, fd: int) -> None:
        copy = self.inherited.get(fd)
        if copy is None:
            return
        while True:
            try:
                data = os.read(copy, 65536)
            except BlockingIOError:
                return
            if not data:  # the parent closed its end
                if fd not in self._closed_by_parent:
                    self._closed_by_parent.append(fd)
                return
            self.written[fd] = self.written.get(fd, b"") + data

    @property
    def closed_by_parent(self) -> list[int]:
        """The fds whose parent end the parent closed (pipes given to the child
        included: seen by the end of file the child's copy reads)."""
        for fd in list(self.inherited):
            self._read_inherited(fd)
        return list(self._closed_by_parent)

    def _close_inherited(self, fd: int) -> None:
        self._read_inherited(fd)  # what was written before stays readable
        copy = self.inherited.pop(fd, None)
        if copy is not None:
            os.close(copy)

    def simulate_output(self, fd: int, data: bytes) -> None:
        """The child writes ``data`` to its ``fd``: ``childDataReceived(fd, data)``."""
        if self.open_pipes.get(fd) != "r":
            raise ValueError(f"fd {fd} is not an open pipe from the child")
        assert self.proto is not None
        self.proto.childDataReceived(fd, data)

    def simulate_close(self, fd: int) -> None:
        """The child closes its end of pipe ``fd``: ``childConnectionLost(fd)``
        (for a pipe the parent gave it: the parent's writes then fail)."""
        if fd in self.inherited:
            self._close_inherited(fd)
            return
        if fd not in self.open_pipes:
            raise ValueError(f"fd {fd} is not an open pipe")
        self._pipe_closed(fd)

    def simulate_exit(self, code: int = 0, close_pipes: bool = True) -> None:
        """The child exits with ``code``.

        ``processExited`` is called at once with ``ProcessDone`` (code 0) or
        ``ProcessTerminated``; then, unless ``close_pipes`` is false, the child's
        pipes close (``childConnectionLost`` for each) and ``processEnded`` follows.
        """
        self._exit(code, None, close_pipes)

    def simulate_killed(self, signal: int = _signal.SIGKILL, close_pipes: bool = True) -> None:
        """The child dies of ``signal``: ``ProcessTerminated`` with ``signal`` set."""
        self._exit(None, signal, close_pipes)

    # -- internals ------------------------------------------------------------------

    def _exit(self, code: int | None, sig: int | None, close_pipes: bool) -> None:
        if self.exited:
            raise RuntimeError(f"{self!r} has already exited")
        self.exited = True
        self.exit_code = code
        self.exit_signal = sig
        # The os.wait() status that Twisted passes on as the reason's .status.
        self._status = (code << 8) if code is not None else (sig or 0)
        self.pid = None
        if self.proto is not None:
            self.proto.processExited(self._reason())
        if close_pipes:
            for fd in list(self.inherited):
                self._close_inherited(fd)
            for fd in sorted(self.open_pipes):
                if fd in self.open_pipes:
                    self._pipe_closed(fd)
        self._maybe_end()

    def _pipe_closed(self, fd: int) -> None:
        del self.open_pipes[fd]
        if self.proto is not None:
            self.proto.childConnectionLost(fd)
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self.ended or not self.exited or self.open_pipes or self.proto is None:
            return
        self.ended = True
        proto, self.proto = self.proto, None
        proto.processEnded(self._reason())

    def _reason(self) -> Failure:
        # A new exception each time, like Twisted's _getReason.
        if self.exit_code == 0:
            return Failure(ProcessDone(self._status))
        return Failure(ProcessTerminated(self.exit_code, self.exit_signal, self._status))


@implementer(IReactorProcess)
class MemoryProcessReactor(MemoryReactorClock):
    """A ``MemoryReactorClock`` whose ``spawnProcess`` records :class:`FakeProcess`es.

    :attr:`processes` lists every spawn in order. Set :attr:`spawn_error` to an
    exception to make the next ``spawnProcess`` raise it (as a real reactor raises
    ``OSError`` when fork fails); it is cleared after raising once.
    """

    def __init__(self, first_pid: int = 1000) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.spawn_error: BaseException | None = None
        self._next_pid = first_pid

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: None | bytes | str = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> FakeProcess:
        """Record the spawn, connect the protocol, return the fake transport."""
        if self.spawn_error is not None:
            error, self.spawn_error = self.spawn_error, None
            raise error
        if isinstance(args, (str, bytes)):
            raise TypeError("args must be a sequence of arguments, not a string")
        process = FakeProcess(
            self,
            processProtocol,
            executable,
            args,
            env,
            path,
            uid,
            gid,
            bool(usePTY),
            childFDs,
            self._next_pid,
        )
        self._next_pid += 1
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process

    def running_processes(self) -> list[FakeProcess]:
        """Spawned processes that have not exited."""
        return [p for p in self.processes if not p.exited]
