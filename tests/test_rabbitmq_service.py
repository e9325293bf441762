"""Unit tests for funcx_endpoint.rabbitmq: the node service on a fake process reactor.

Nothing is started: ``MemoryProcessReactor`` records the processes the
service spawns, the test plays their part (a probe exits 0, the server dies
of SIGKILL, ...), and time is the reactor's Clock.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from funcx_endpoint import tls
from funcx_endpoint.rabbitmq.commands import CommandRunner, CommandTimeout
from funcx_endpoint.rabbitmq.node import (
    MARKER_ENV,
    NodeDirectory,
    NodePorts,
    RabbitMQError,
    RabbitMQStartError,
)
from funcx_endpoint.rabbitmq.processes import IProcessTable, MarkedProcessTable, Programs
from funcx_endpoint.rabbitmq.service import NodeState, RabbitMQNodeService
from funcx_endpoint.testing.processtable import FakeProcessTable
from funcx_endpoint.testing.procreactor import FakeProcess, MemoryProcessReactor

PROGRAMS = Programs("/rmq/rabbitmq-server", "/rmq/rabbitmqctl", "/erl/epmd", None)
PORTS = NodePorts(amqp=5001, amqps=5002, management=5003, dist=5004, epmd=5005)
TLS_FILES = tls.TLSFiles("/tls/ca.pem", "/tls/server.pem", "/tls/server.key", "")
NAME = "unit@localhost"


class Harness(SynchronousTestCase):
    """A service on a fake reactor, and helpers to play the processes' part."""

    def setUp(self) -> None:
        self.reactor = MemoryProcessReactor()
        self.table = FakeProcessTable(self.reactor)
        self.directory = NodeDirectory(self.mktemp())
        self.delays: list[int] = []
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def make_service(self, **kwargs: Any) -> RabbitMQNodeService:
        def policy(attempt: int) -> float:
            self.delays.append(attempt)
            return float(attempt)

        options: dict[str, Any] = dict(
            reactor=self.reactor,
            name="unit",
            ports=PORTS,
            programs=PROGRAMS,
            process_table=self.table,
            start_timeout=60.0,
            stop_timeout=30.0,
            kill_timeout=10.0,
            retry_policy=policy,
            stable_after=100.0,
            environ={"PATH": "/usr/bin", "RABBITMQ_NODENAME": "not-this-one"},
        )
        options.update(kwargs)
        self.service = RabbitMQNodeService(self.directory, TLS_FILES, **options)
        return self.service

    # -- finding the fake processes --------------------------------------------------

    def spawned(self, kind: str, running: bool = True) -> list[FakeProcess]:
        def is_kind(p: FakeProcess) -> bool:
            args = [str(a) for a in p.args]
            if kind == "epmd":
                return args[0] == PROGRAMS.epmd and "-address" in args
            if kind == "names":
                return args[0] == PROGRAMS.epmd and "-names" in args
            if kind == "server":
                return args[0] == PROGRAMS.server
            return args[0] == PROGRAMS.ctl and kind in args

        return [p for p in self.reactor.processes if is_kind(p) and (not running or not p.exited)]

    def one(self, kind: str) -> FakeProcess:
        found = self.spawned(kind)
        self.assertEqual(len(found), 1, f"running {kind}: {found}")
        return found[0]

    def epmd_answers(self) -> None:
        self.one("names").simulate_exit(0)

    def node_ready(self) -> None:
        self.one("wait").simulate_exit(0)

    def start_running(self, **kwargs: Any) -> RabbitMQNodeService:
        service = self.make_service(**kwargs)
        service.startService()
        self.epmd_answers()
        self.node_ready()
        self.assertIs(service.state, NodeState.RUNNING)
        return service

    def stop_fully(self, service: RabbitMQNodeService) -> Deferred[None]:
        """stopService, with every process obeying at once."""
        stopping = service.stopService()
        for _ in range(5):
            for process in self.reactor.running_processes():
                process.simulate_exit(0)
        self.successResultOf(stopping)
        return stopping

    def assert_clock_clean(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def logged(self, text: str) -> list[str]:
        from twisted.logger import formatEvent

        messages = [formatEvent(e) for e in self.events]
        return [m for m in messages if text in m]


class StartTests(Harness):
    def test_fake_table_provides_interface(self) -> None:
        """The fake and the real process table provide IProcessTable."""
        verifyObject(IProcessTable, self.table)
        verifyObject(IProcessTable, MarkedProcessTable())

    def test_epmd_first_then_server(self) -> None:
        """startService writes the node's files, spawns epmd, and spawns the
        server only once epmd answers; both carry the marker and get files, not
        pipes, for their output."""
        service = self.make_service()
        service.startService()
        self.assertIs(service.state, NodeState.STARTING)
        epmd = self.one("epmd")
        self.assertEqual(
            [str(a) for a in epmd.args], [PROGRAMS.epmd, "-port", "5005", "-address", "127.0.0.1"]
        )
        assert epmd.env is not None
        self.assertEqual(epmd.env[MARKER_ENV], NAME)
        self.assertEqual(epmd.env["RABBITMQ_NODENAME"], NAME)
        self.assertEqual(epmd.env["PATH"], "/usr/bin")
        self.assertEqual(epmd.open_pipes, {})
        self.assertEqual(self.spawned("server"), [])
        with open(self.directory.path("rabbitmq.conf")) as f:
            config = f.read()
        self.assertIn("listeners.ssl.default = 127.0.0.1:5002", config)
        self.assertIn("ssl_options.certfile = /tls/server.pem", config)
        self.assertIn("management.tcp.port = 5003", config)
        self.assertEqual(self.directory.load_identity(), service.identity)

        self.epmd_answers()
        server = self.one("server")
        assert server.env is not None
        self.assertEqual(server.env[MARKER_ENV], NAME)
        self.assertEqual(server.env["RABBITMQ_ALLOW_INPUT"], "1")
        self.assertEqual(server.path, self.directory.base_dir)
        wait = self.one("wait")
        self.assertIn(self.directory.pid_file, [str(a) for a in wait.args])
        assert wait.env is not None
        self.assertNotIn(MARKER_ENV, wait.env)
        self.assertEqual(service.server_pid, server.original_pid)

    def test_ready(self) -> None:
        """when_ready fires once `rabbitmqctl wait` succeeds, with a fresh Deferred
        for each caller; afterwards at once."""
        service = self.make_service()
        service.startService()
        first, second = service.when_ready(), service.when_ready()
        self.assertIsNot(first, second)
        # One caller's callbacks do not change what another sees.
        first.addCallback(lambda _: "changed")
        self.epmd_answers()
        self.assertNoResult(second)
        self.node_ready()
        self.assertEqual(self.successResultOf(first), "changed")
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(service.when_ready()))
        self.assertIs(service.state, NodeState.RUNNING)
        status = service.status()
        self.assertEqual(status.to_json()["state"], "running")
        self.assertEqual((status.name, status.restarts, status.last_exit), (NAME, 0, None))
        self.stop_fully(service)
        self.assert_clock_clean()

    def test_probes_retry(self) -> None:
        """A failed epmd probe is repeated after 50 ms, a failed `rabbitmqctl wait`
        (the node's distribution not up yet) after 0.5 s."""
        service = self.make_service()
        service.startService()
        self.one("names").simulate_exit(1)
        self.assertEqual(self.spawned("names"), [])
        self.reactor.advance(0.05)
        self.epmd_answers()
        self.one("wait").simulate_exit(69)
        self.reactor.advance(0.4)
        self.assertEqual(self.spawned("wait"), [])
        self.reactor.advance(0.1)
        self.node_ready()
        self.successResultOf(service.when_ready())
        self.assertEqual(len(self.spawned("server", running=False)), 1)
        self.stop_fully(service)

    def test_server_exits_while_starting(self) -> None:
        """A server that exits while booting fails the start at once, quoting its
        output; the probe is killed, epmd stopped, the service is `failed`."""
        service = self.make_service()
        service.startService()
        with open(self.directory.path("log", "server.out"), "w") as f:
            f.write("[error] no_such_setting.at_all is not a known setting\n")
        ready = service.when_ready()
        self.epmd_answers()
        wait = self.one("wait")
        self.one("server").simulate_exit(1)
        self.assertEqual(wait.signals, ["KILL"])
        wait.simulate_killed()
        epmd = self.one("epmd")
        self.assertEqual(epmd.signals, ["TERM"])
        epmd.simulate_killed(signal.SIGTERM)
        error = self.failureResultOf(ready, RabbitMQStartError).value
        self.assertIn("exited with code 1 while starting", str(error))
        self.assertIn("no_such_setting", str(error))
        self.assertIs(service.state, NodeState.FAILED)
        self.failureResultOf(service.when_ready(), RabbitMQStartError)
        self.assertIn("no_such_setting", service.status().last_error or "")
        self.successResultOf(service.stopService())
        self.assert_clock_clean()

    def test_start_timeout(self) -> None:
        """A node not ready within the start timeout: the probe is killed, the
        server gets SIGTERM, and when_ready fails saying so, with the logs."""
        service = self.make_service()
        service.startService()
        ready = service.when_ready()
        self.epmd_answers()
        wait, server = self.one("wait"), self.one("server")
        self.reactor.advance(59.9)
        self.assertNoResult(ready)
        self.reactor.advance(0.1)
        self.assertEqual(wait.signals, ["KILL"])
        self.assertEqual(server.signals, ["TERM"])
        wait.simulate_killed()
        server.simulate_killed(signal.SIGTERM)
        self.one("epmd").simulate_exit(0)
        error = self.failureResultOf(ready, RabbitMQStartError).value
        self.assertIn("did not start within 60 s", str(error))
        self.assertIn("server.out", str(error))
        self.assertIs(service.state, NodeState.FAILED)
        self.assert_clock_clean()

    def test_spawn_failure(self) -> None:
        """A program that cannot be spawned fails the start."""
        service = self.make_service()
        self.reactor.spawn_error = OSError("no such file: epmd")
        service.startService()
        self.failureResultOf(service.when_ready(), OSError)
        self.assertIs(service.state, NodeState.FAILED)
        self.successResultOf(service.stopService())
        self.assert_clock_clean()

    def test_leftovers_killed_first(self) -> None:
        """Processes of the node left by an earlier run are killed before epmd starts."""
        self.table.add(NAME, 4242)
        self.table.add("other@localhost", 4343)
        service = self.make_service()
        service.startService()
        self.assertEqual(self.table.signals, [(4242, signal.SIGKILL)])
        self.assertEqual(self.table.extra, {4343: "other@localhost"})
        self.assertTrue(self.logged("left over by an earlier run"))
        self.one("epmd")

    def test_leftover_that_will_not_die(self) -> None:
        """A leftover that survives SIGKILL is waited for, then reported."""
        self.table.add(NAME, 4242)
        self.table.immortal.add(4242)
        service = self.make_service()
        service.startService()
        self.assertEqual(self.spawned("epmd"), [])
        self.reactor.advance(5)
        self.assertEqual(self.spawned("epmd"), [])
        self.reactor.advance(5)
        self.assertTrue(self.logged("survived SIGKILL"))
        self.one("epmd")


class RestartTests(Harness):
    def test_death_restarts_with_backoff(self) -> None:
        """A node that dies is reported with its log tail and started again after
        the policy's delay, keeping its epmd; restarts and the exit are counted."""
        service = self.start_running()
        epmd = self.one("epmd")
        with open(self.directory.log_file(service.identity), "w") as f:
            f.write("last words of the node\n")
        self.table.add(NAME, 777)  # erl_child_setup, left behind
        self.one("server").simulate_killed(signal.SIGKILL)
        self.assertIs(service.state, NodeState.RESTARTING)
        status = service.status()
        self.assertEqual(status.restarts, 1)
        self.assertEqual(status.last_exit, "died (killed by signal 9)")
        reports = self.logged("died (killed by signal 9); restarting it (restart 1)")
        self.assertEqual(len(reports), 1)
        self.assertIn("last words of the node", reports[0])
        self.assertEqual(self.table.extra, {})
        self.assertNotIn((epmd.original_pid, signal.SIGKILL), self.table.signals)

        ready = service.when_ready()
        self.assertEqual(self.delays, [1])
        self.reactor.advance(0.99)
        self.assertEqual(self.spawned("server"), [])
        self.reactor.advance(0.01)
        self.one("server")
        self.assertEqual(len(self.spawned("epmd", running=False)), 1)
        self.assertNoResult(ready)
        self.node_ready()
        self.successResultOf(ready)
        self.assertIs(service.state, NodeState.RUNNING)

        # Dying again soon: a longer delay.  After a stable run: short again.
        self.one("server").simulate_killed(signal.SIGKILL)
        self.assertEqual(self.delays, [1, 2])
        self.reactor.advance(2)
        self.node_ready()
        self.reactor.advance(100)
        self.one("server").simulate_exit(0)
        self.assertEqual(service.status().last_exit, "died (exited with code 0)")
        self.assertEqual(self.delays, [1, 2, 1])
        self.reactor.advance(1)
        self.node_ready()
        self.assertEqual(service.status().restarts, 3)
        self.stop_fully(service)
        self.assert_clock_clean()

    def test_failed_restart_is_retried(self) -> None:
        """A restart that fails is logged and tried again after a longer delay."""
        service = self.start_running()
        self.one("server").simulate_killed(signal.SIGKILL)
        self.reactor.advance(1)
        self.one("server").simulate_exit(1)
        self.one("wait").simulate_killed()
        self.assertTrue(self.logged("did not start again"))
        self.assertIs(service.state, NodeState.RESTARTING)
        self.assertIn("exited with code 1 while starting", service.status().last_error or "")
        self.assertEqual(self.delays, [1, 2])
        self.reactor.advance(2)
        self.node_ready()
        self.assertIs(service.state, NodeState.RUNNING)
        self.stop_fully(service)
        self.assert_clock_clean()

    def test_epmd_death_restarts_node(self) -> None:
        """If epmd dies the node is stopped (SIGTERM) and both are started again."""
        service = self.start_running()
        server = self.one("server")
        self.one("epmd").simulate_killed(signal.SIGKILL)
        self.assertEqual(service.status().last_exit, "lost its epmd (killed by signal 9)")
        self.assertEqual(server.signals, ["TERM"])
        server.simulate_exit(0)
        self.reactor.advance(1)
        self.epmd_answers()
        self.node_ready()
        self.assertIs(service.state, NodeState.RUNNING)
        self.assertEqual(len(self.spawned("epmd", running=False)), 2)
        self.stop_fully(service)

    def test_stop_while_waiting_to_restart(self) -> None:
        """Stopping during the backoff delay cancels the restart."""
        service = self.start_running()
        self.one("server").simulate_killed(signal.SIGKILL)
        stopping = service.stopService()
        self.one("epmd").simulate_exit(0)
        self.successResultOf(stopping)
        self.reactor.advance(10)
        self.assertEqual(self.spawned("server"), [])
        self.assertIs(service.state, NodeState.STOPPED)
        self.assert_clock_clean()


class StopTests(Harness):
    def test_graceful_stop(self) -> None:
        """stopService runs `rabbitmqctl stop`, then stops epmd, and fires only
        once every process of the node is gone."""
        service = self.start_running()
        server, epmd = self.one("server"), self.one("epmd")
        stopping = service.stopService()
        self.assertIs(service.state, NodeState.STOPPING)
        ctl = self.one("stop")
        self.assertEqual([str(a) for a in ctl.args], [PROGRAMS.ctl, "-n", NAME, "stop"])
        self.assertEqual(server.signals, [])
        ctl.simulate_exit(0)
        self.assertNoResult(stopping)
        server.simulate_exit(0)
        self.assertEqual(epmd.signals, ["TERM"])
        self.assertNoResult(stopping)
        epmd.simulate_killed(signal.SIGTERM)
        self.successResultOf(stopping)
        self.assertIs(service.state, NodeState.STOPPED)
        self.assertEqual(self.table.find(NAME), [])
        self.assert_clock_clean()

    def test_each_caller_of_stop_waits(self) -> None:
        """A second stopService waits for the same stop."""
        service = self.start_running()
        first = service.stopService()
        second = service.stopService()
        self.assertNoResult(second)
        self.one("server").simulate_exit(0)
        self.one("stop").simulate_exit(0)
        self.one("epmd").simulate_exit(0)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_term_after_stop_timeout_then_kill(self) -> None:
        """A node that does not stop: SIGTERM after stop_timeout, SIGKILL to all of
        its processes kill_timeout later; stop still waits for them."""
        service = self.start_running()
        server = self.one("server")
        self.table.add(NAME, 888)
        stopping = service.stopService()
        self.one("stop").simulate_exit(0)
        self.reactor.advance(29.9)
        self.assertEqual(server.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(server.signals, ["TERM"])
        self.reactor.advance(10)
        self.assertEqual(server.signals, ["TERM", "KILL"])
        self.assertTrue(server.exited)
        self.assertIn((888, signal.SIGKILL), self.table.signals)
        self.assertNoResult(stopping)
        self.one("epmd").simulate_exit(0)
        self.successResultOf(stopping)
        self.assert_clock_clean()

    def test_failed_ctl_stop_falls_back_to_term(self) -> None:
        """If `rabbitmqctl stop` fails, SIGTERM goes out at once."""
        service = self.start_running()
        server = self.one("server")
        stopping = service.stopService()
        self.one("stop").simulate_exit(69)
        self.assertEqual(server.signals, ["TERM"])
        self.assertTrue(self.logged("rabbitmqctl stop failed"))
        server.simulate_killed(signal.SIGTERM)
        self.one("epmd").simulate_exit(0)
        self.successResultOf(stopping)

    def test_epmd_killed_after_grace(self) -> None:
        """An epmd that ignores SIGTERM gets SIGKILL after kill_timeout."""
        service = self.start_running()
        stopping = service.stopService()
        self.one("stop").simulate_exit(0)
        self.one("server").simulate_exit(0)
        epmd = self.one("epmd")
        self.reactor.advance(10)
        self.assertEqual(epmd.signals, ["TERM", "KILL"])
        epmd.simulate_killed()
        self.successResultOf(stopping)
        self.assert_clock_clean()

    def test_stop_waits_for_helpers(self) -> None:
        """Processes of the node that are not children (found by marker) are
        killed, and the stop waits until they are gone."""
        service = self.start_running()
        self.table.add(NAME, 999)
        self.table.immortal.add(999)
        stopping = service.stopService()
        self.one("stop").simulate_exit(0)
        self.one("server").simulate_exit(0)
        self.one("epmd").simulate_exit(0)
        self.assertNoResult(stopping)
        self.reactor.advance(5)
        self.assertNoResult(stopping)
        self.assertIn((999, signal.SIGKILL), self.table.signals)
        self.table.immortal.clear()  # the kernel lets it go: the next SIGKILL works
        self.reactor.pump([0.1, 0.1])
        self.successResultOf(stopping)
        self.assert_clock_clean()

    def test_stop_while_starting(self) -> None:
        """Stopping a node still booting: no rabbitmqctl stop, SIGTERM; the probe is
        killed and waiters of when_ready fail."""
        service = self.make_service()
        service.startService()
        ready = service.when_ready()
        self.epmd_answers()
        server, wait = self.one("server"), self.one("wait")
        stopping = service.stopService()
        self.failureResultOf(ready, RabbitMQError)
        self.assertEqual(self.spawned("stop"), [])
        self.assertEqual(server.signals, ["TERM"])
        self.assertEqual(wait.signals, ["KILL"])
        server.simulate_killed(signal.SIGTERM)
        self.one("epmd").simulate_exit(0)
        self.assertNoResult(stopping)
        wait.simulate_killed()
        self.successResultOf(stopping)
        self.assertIs(service.state, NodeState.STOPPED)
        self.failureResultOf(service.when_ready(), RabbitMQError)
        self.assert_clock_clean()

    def test_stop_before_start(self) -> None:
        """A service stopped without having started stops at once."""
        service = self.make_service()
        self.successResultOf(service.stopService())


class CommandRunnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryProcessReactor()
        self.runner = CommandRunner(self.reactor, self.reactor)

    def test_output_and_code(self) -> None:
        d = self.runner.run(["/bin/tool", "x"], {}, timeout=5)
        process = self.reactor.processes[-1]
        process.simulate_output(1, b"out")
        process.simulate_output(2, b"err")
        self.assertEqual(self.runner.running, 1)
        process.simulate_exit(3)
        result = self.successResultOf(d)
        self.assertEqual((result.code, result.stdout, result.stderr), (3, "out", "err"))
        self.assertEqual(result.describe(), "exited with code 3: err")
        self.assertEqual(self.runner.running, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timeout_kills(self) -> None:
        d = self.runner.run(["/bin/tool"], {}, timeout=5)
        process = self.reactor.processes[-1]
        self.reactor.advance(5)
        self.assertEqual(process.signals, ["KILL"])
        self.failureResultOf(d, CommandTimeout)
        idle = self.runner.when_idle()
        self.assertNoResult(idle)
        process.simulate_killed()
        self.successResultOf(idle)

    def test_cancel_kills(self) -> None:
        d = self.runner.run(["/bin/tool"], {}, timeout=5)
        process = self.reactor.processes[-1]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(process.signals, ["KILL"])
        process.simulate_killed()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_spawn_error(self) -> None:
        self.reactor.spawn_error = OSError("nope")
        failure: Failure = self.failureResultOf(self.runner.run(["/x"], {}), OSError)
        self.assertIn("nope", str(failure.value))


class NodeDirectoryTests(SynchronousTestCase):
    def test_identity_kept(self) -> None:
        """The identity is made once and kept, whatever ports are asked later;
        another name is refused."""
        directory = NodeDirectory(self.mktemp())
        first = directory.ensure_identity("keep", PORTS)
        self.assertEqual(first.name, "keep@localhost")
        self.assertEqual(os.stat(directory.state_file).st_mode & 0o777, 0o600)
        again = NodeDirectory(directory.base_dir).ensure_identity(None, NodePorts(1, 2, 3, 4, 5))
        self.assertEqual(again, first)
        with self.assertRaises(RabbitMQError):
            directory.ensure_identity("other")
        self.assertEqual(
            first.management_url(with_credentials=True),
            f"http://funcx-admin:{first.admin_password}@localhost:5003/",
        )

    def test_environments(self) -> None:
        """The caller's RABBITMQ_*/ERL_* variables do not leak into the node's."""
        directory = NodeDirectory(self.mktemp())
        identity = directory.ensure_identity("env", PORTS)
        base = {"PATH": "/bin", "RABBITMQ_CONFIG_FILE": "/etc/x", "ERL_FLAGS": "-x"}
        ctl = directory.ctl_env(identity, base)
        self.assertEqual(ctl["RABBITMQ_CONFIG_FILE"], directory.path("rabbitmq.conf"))
        self.assertNotIn("ERL_FLAGS", ctl)
        self.assertEqual(ctl["ERL_EPMD_PORT"], "5005")
        server = directory.server_env(identity, base)
        self.assertEqual(server[MARKER_ENV], "env@localhost")
        self.assertEqual(server["RABBITMQ_DIST_PORT"], "5004")
