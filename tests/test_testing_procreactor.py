"""Tests for funcx_endpoint.testing.procreactor, the fake process reactor."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IProcessTransport,
    IReactorProcess,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from funcx_endpoint.testing.procreactor import FakeProcess, MemoryProcessReactor


class RecordingProtocol(ProcessProtocol):
    """Records every IProcessProtocol call in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def makeConnection(self, transport: Any) -> None:
        self.events.append(("makeConnection", transport))
        super().makeConnection(transport)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.events.append(("data", childFD, data))

    def childConnectionLost(self, childFD: int) -> None:
        self.events.append(("lost", childFD))

    def processExited(self, reason: Failure) -> None:
        self.events.append(("exited", reason))

    def processEnded(self, reason: Failure) -> None:
        self.events.append(("ended", reason))

    def names(self) -> list[str]:
        return [e[0] if e[0] not in ("lost", "data") else f"{e[0]} {e[1]}" for e in self.events]


class MemoryProcessReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryProcessReactor()
        self.addCleanup(self.assertNoDelayedCalls)

    def assertNoDelayedCalls(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def spawn(self, **kwargs: Any) -> tuple[RecordingProtocol, FakeProcess]:
        proto = RecordingProtocol()
        transport = self.reactor.spawnProcess(
            proto, kwargs.pop("executable", "/bin/worker"), kwargs.pop("args", ["worker"]), **kwargs
        )
        return proto, transport

    def test_interfaces(self) -> None:
        """The reactor provides the process, time and TCP reactor interfaces; a spawned
        process provides IProcessTransport."""
        self.assertTrue(verifyObject(IReactorProcess, self.reactor))
        self.assertTrue(verifyObject(IReactorTime, self.reactor))
        self.assertTrue(verifyObject(IReactorTCP, self.reactor))
        _proto, transport = self.spawn()
        self.assertTrue(verifyObject(IProcessTransport, transport))

    def test_spawn_records_arguments(self) -> None:
        """Every spawnProcess argument is recorded on the FakeProcess."""
        proto, transport = self.spawn(
            executable="/usr/bin/python3",
            args=["python3", "-m", "worker"],
            env={"A": "1"},
            path="/tmp",
            uid=1,
            gid=2,
            childFDs={0: "w", 1: "r", 3: "r", 4: 7},
        )
        self.assertEqual(self.reactor.processes, [transport])
        self.assertEqual(transport.executable, "/usr/bin/python3")
        self.assertEqual(transport.args, ["python3", "-m", "worker"])
        self.assertEqual(transport.env, {"A": "1"})
        self.assertEqual(transport.path, "/tmp")
        self.assertEqual((transport.uid, transport.gid), (1, 2))
        self.assertFalse(transport.use_pty)
        self.assertEqual(transport.child_fds, {0: "w", 1: "r", 3: "r", 4: 7})
        # An fd mapped to a parent fd is not a pipe.
        self.assertEqual(transport.open_pipes, {0: "w", 1: "r", 3: "r"})
        self.assertIs(transport.proto, proto)

    def test_default_child_fds(self) -> None:
        """Without childFDs the child gets stdin, stdout and stderr pipes."""
        _proto, transport = self.spawn()
        self.assertEqual(transport.open_pipes, {0: "w", 1: "r", 2: "r"})

    def test_make_connection_during_spawn(self) -> None:
        """As with a real reactor, the protocol is connected inside spawnProcess."""
        proto, transport = self.spawn()
        self.assertEqual(proto.events, [("makeConnection", transport)])
        self.assertIs(proto.transport, transport)

    def test_pids(self) -> None:
        """Each process gets a new pid."""
        _p1, first = self.spawn()
        _p2, second = self.spawn()
        assert first.pid is not None
        self.assertEqual(second.pid, first.pid + 1)
        self.assertEqual(self.reactor.running_processes(), [first, second])

    def test_spawn_error(self) -> None:
        """spawn_error is raised by the next spawnProcess only."""
        self.reactor.spawn_error = OSError(11, "EAGAIN")
        self.assertRaises(OSError, self.spawn)
        self.assertEqual(self.reactor.processes, [])
        self.spawn()
        self.assertEqual(len(self.reactor.processes), 1)

    def test_args_must_be_sequence(self) -> None:
        """A string as args is a caller bug, refused."""
        self.assertRaises(TypeError, self.spawn, args="worker --x")

    def test_clock(self) -> None:
        """callLater runs on the fake clock."""
        called: list[str] = []
        self.reactor.callLater(5, called.append, "x")
        self.reactor.advance(4.9)
        self.assertEqual(called, [])
        self.reactor.advance(0.1)
        self.assertEqual(called, ["x"])
        self.assertEqual(self.reactor.seconds(), 5)


class FakeProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryProcessReactor()
        self.proto = RecordingProtocol()
        self.process = self.reactor.spawnProcess(
            self.proto, "/bin/worker", ["worker"], childFDs={0: "w", 1: "r", 2: "r", 3: "r"}
        )
        self.proto.events.clear()

    def test_output(self) -> None:
        """simulate_output delivers childDataReceived for that fd."""
        self.process.simulate_output(1, b"hello")
        self.process.simulate_output(3, b"frame")
        self.assertEqual(self.proto.events, [("data", 1, b"hello"), ("data", 3, b"frame")])

    def test_output_on_bad_fd(self) -> None:
        """Output on an fd that is not a pipe from the child is a test bug."""
        self.assertRaises(ValueError, self.process.simulate_output, 0, b"x")
        self.assertRaises(ValueError, self.process.simulate_output, 9, b"x")
        self.process.simulate_close(3)
        self.assertRaises(ValueError, self.process.simulate_output, 3, b"x")

    def test_write_to_child(self) -> None:
        """writeToChild and write record the bytes per fd."""
        self.process.writeToChild(0, b"ab")
        self.process.write(b"c")
        self.process.writeSequence([b"d", b"e"])
        self.assertEqual(self.process.data_written(0), b"abcde")

    def test_write_to_reader_fd(self) -> None:
        """writeToChild to an fd that is not an open 'w' pipe raises KeyError."""
        self.assertRaises(KeyError, self.process.writeToChild, 1, b"x")
        self.assertRaises(KeyError, self.process.writeToChild, 7, b"x")

    def test_write_without_stdin(self) -> None:
        """write() after stdin is closed drops the data, as Twisted does."""
        self.process.closeStdin()
        self.process.write(b"lost")
        self.assertEqual(self.process.data_written(0), b"")
        self.assertRaises(KeyError, self.process.writeToChild, 0, b"x")

    def test_close_child_fd(self) -> None:
        """closeChildFD closes the pipe and tells the protocol; twice is harmless."""
        self.process.closeChildFD(3)
        self.process.closeChildFD(3)
        self.assertEqual(self.proto.events, [("lost", 3)])
        self.assertEqual(self.process.closed_by_parent, [3])
        self.assertNotIn(3, self.process.open_pipes)

    def test_lose_connection(self) -> None:
        """loseConnection closes stdin, stderr, stdout in Twisted's order."""
        self.process.loseConnection()
        self.assertEqual(self.proto.names(), ["lost 0", "lost 2", "lost 1"])
        self.assertEqual(self.process.open_pipes, {3: "r"})

    def test_signals_recorded(self) -> None:
        """signalProcess records names and numbers as given."""
        self.process.signalProcess("TERM")
        self.process.signalProcess(signal.SIGUSR1)
        self.assertEqual(self.process.signals, ["TERM", signal.SIGUSR1])
        self.assertFalse(self.process.exited)

    def test_unknown_signal_name(self) -> None:
        """A signal name Twisted does not translate is refused."""
        self.assertRaises(TypeError, self.process.signalProcess, "USR1")

    def test_signal_after_exit(self) -> None:
        """After the child exited, signalProcess raises ProcessExitedAlready."""
        self.process.simulate_exit(0)
        self.assertRaises(ProcessExitedAlready, self.process.signalProcess, "KILL")
        self.assertEqual(self.process.signals, [])

    def test_exit_zero(self) -> None:
        """Exit 0: processExited(ProcessDone), the pipes close, processEnded(ProcessDone)."""
        self.process.simulate_exit(0)
        self.assertEqual(
            self.proto.names(),
            ["exited", "lost 0", "lost 1", "lost 2", "lost 3", "ended"],
        )
        exited, ended = self.proto.events[0][1], self.proto.events[-1][1]
        self.assertIsInstance(exited.value, ProcessDone)
        self.assertIsInstance(ended.value, ProcessDone)
        self.assertEqual(ended.value.exitCode, 0)
        self.assertEqual(ended.value.status, 0)
        self.assertIsNone(self.process.pid)
        self.assertTrue(self.process.exited)
        self.assertTrue(self.process.ended)
        self.assertEqual(self.reactor.running_processes(), [])

    def test_exit_code(self) -> None:
        """A non-zero exit is ProcessTerminated with that exitCode and no signal."""
        self.process.simulate_exit(3)
        reason = self.proto.events[-1][1]
        self.assertIsInstance(reason.value, ProcessTerminated)
        self.assertEqual(reason.value.exitCode, 3)
        self.assertIsNone(reason.value.signal)
        self.assertEqual(reason.value.status, 3 << 8)
        self.assertEqual(self.process.exit_code, 3)

    def test_killed(self) -> None:
        """Death by a signal is ProcessTerminated with that signal and no exitCode."""
        self.process.signalProcess("TERM")
        self.process.simulate_killed(signal.SIGTERM)
        reason = self.proto.events[-1][1]
        self.assertEqual(self.proto.events[-1][0], "ended")
        self.assertIsInstance(reason.value, ProcessTerminated)
        self.assertEqual(reason.value.signal, signal.SIGTERM)
        self.assertIsNone(reason.value.exitCode)
        self.assertEqual(self.process.exit_signal, signal.SIGTERM)

    def test_pipes_outlive_child(self) -> None:
        """With close_pipes=False, processEnded waits for the last pipe to close."""
        self.process.closeStdin()
        self.process.simulate_exit(0, close_pipes=False)
        self.assertEqual(self.proto.names(), ["lost 0", "exited"])
        self.process.simulate_output(3, b"late")
        self.process.simulate_close(1)
        self.process.simulate_close(2)
        self.assertFalse(self.process.ended)
        self.process.simulate_close(3)
        self.assertEqual(
            self.proto.names(),
            ["lost 0", "exited", "data 3", "lost 1", "lost 2", "lost 3", "ended"],
        )
        self.assertTrue(self.process.ended)

    def test_pipes_closed_before_exit(self) -> None:
        """Pipes closing first: processEnded only comes with the exit."""
        self.process.loseConnection()
        self.process.simulate_close(3)
        self.assertFalse(self.process.ended)
        self.process.simulate_exit(0)
        self.assertEqual(self.proto.names()[-2:], ["exited", "ended"])

    def test_exit_twice(self) -> None:
        """A process exits once."""
        self.process.simulate_exit(0)
        self.assertRaises(RuntimeError, self.process.simulate_exit, 0)
        self.assertRaises(RuntimeError, self.process.simulate_killed)
        self.assertEqual(self.proto.names().count("ended"), 1)

    def test_no_pipes(self) -> None:
        """A child with no pipes ends right when it exits."""
        proto = RecordingProtocol()
        process = self.reactor.spawnProcess(
            proto, "/bin/true", ["true"], childFDs={0: 0, 1: 1, 2: 2}
        )
        process.simulate_exit(0)
        self.assertEqual(proto.names(), ["makeConnection", "exited", "ended"])

    def test_addresses(self) -> None:
        """getHost and getPeer return an address object."""
        self.assertIsNotNone(self.process.getHost())
        self.assertIsNotNone(self.process.getPeer())
