"""Unit tests of the manager: its worker pool on a fake process reactor, and its
service talking to a real interchange through an in-memory connection.

Nothing here starts a process or opens a socket; time is a Clock.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import uuid
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from funcx_endpoint.config.model import HighThroughputExecutor
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.manager.main import apply_options, parse_args
from funcx_endpoint.manager.pool import MAX_START_FAILURES, PIPE_CLOSE_GRACE, WorkerPool
from funcx_endpoint.manager.service import (
    EXIT_LOST,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_WORKERS,
    ManagerIdentity,
    ManagerService,
)
from funcx_endpoint.manager.workers_env import (
    count_workers,
    describe_exit,
    read_tail,
    worker_environment,
)
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.testing.procreactor import FakeProcess, MemoryProcessReactor
from funcx_endpoint.wire import (
    ErrorCode,
    Result,
    Task,
    frames,
    pack,
    pack_function,
    pack_payload,
    serialize,
)
from funcx_endpoint.wire.amp import (
    Heartbeat,
    Register,
)
from funcx_endpoint.wire.info import (
    ConnectionInfo,
    ManagerSettings,
    local_versions,
)
from funcx_endpoint.wire.results import read_result


def noop() -> None:
    return None


BUFFER = pack_function(noop) + pack_payload(())
WORKER_VERSIONS = {"python": "3.11.7", "dill": "0.4.1", "funcx": "0.1.0"}


def sent_tasks(child: FakeProcess) -> List[Tuple[str, int, bytes]]:
    """The task frames a fake worker was given."""
    decoder = frames.FrameDecoder()
    tasks = []
    for kind, body in decoder.feed(child.data_written(frames.TASK_FD)):
        assert kind == frames.KIND_TASK
        tasks.append(frames.decode_task(body))
    return tasks


def hello(child: FakeProcess, **versions: Any) -> None:
    info = dict(WORKER_VERSIONS, pid=child.original_pid)
    info.update(versions)
    child.simulate_output(frames.RESULT_FD, frames.encode_hello(info))


def answer(child: FakeProcess, task_id: str, value: Any = None) -> None:
    packed = pack(Result.success(task_id, serialize(value)))
    child.simulate_output(frames.RESULT_FD, frames.encode_frame(frames.KIND_RESULT, packed))


def phase(child: FakeProcess, which: bytes) -> None:
    child.simulate_output(frames.RESULT_FD, frames.encode_frame(frames.KIND_PHASE, which))


# ---------------------------------------------------------------------------
# Sizing and environment


class SizingTests(SynchronousTestCase):
    def test_cores(self) -> None:
        self.assertEqual(count_workers(ManagerSettings(), 8), 8)
        self.assertEqual(count_workers(ManagerSettings(cores_per_worker=2.5), 8), 3)
        self.assertEqual(count_workers(ManagerSettings(max_workers_per_node=3), 8), 3)
        self.assertEqual(count_workers(ManagerSettings(cores_per_worker=16), 8), 1)

    def test_memory(self) -> None:
        settings = ManagerSettings(mem_per_worker=4)
        self.assertEqual(count_workers(settings, 16, memory_gb=10.0), 2)
        self.assertEqual(count_workers(settings, 16, memory_gb=None), 16)

    def test_accelerators(self) -> None:
        settings = ManagerSettings(available_accelerators=["0", "1", "2"], cores_per_worker=8)
        self.assertEqual(count_workers(settings, 2), 3)
        limited = ManagerSettings(available_accelerators=["0", "1", "2"], max_workers_per_node=2)
        self.assertEqual(count_workers(limited, 2), 2)

    def test_environment(self) -> None:
        settings = ManagerSettings(available_accelerators=["3", "5"], worker_environment={"A": "1"})
        env = worker_environment({"PATH": "/bin", "A": "0"}, settings, 1)
        self.assertEqual(env["A"], "1")
        self.assertEqual(env["PATH"], "/bin")
        self.assertEqual(env["FUNCX_WORKER_ID"], "1")
        for name in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"):
            self.assertEqual(env[name], "5")
        plain = worker_environment({}, ManagerSettings(), 0)
        self.assertNotIn("CUDA_VISIBLE_DEVICES", plain)

    def test_options_override(self) -> None:
        options = parse_args(
            [
                "--info-file",
                "x",
                "--block-id",
                "b",
                "--max-workers",
                "3",
                "--cores-per-worker",
                "0.5",
                "--mem-per-worker",
                "2",
                "--available-accelerators",
                "0, 1",
                "--prefetch-capacity",
                "7",
                "--debug",
            ]
        )
        settings = apply_options(ManagerSettings(), options)
        self.assertEqual(settings.max_workers_per_node, 3)
        self.assertEqual(settings.cores_per_worker, 0.5)
        self.assertEqual(settings.mem_per_worker, 2)
        self.assertEqual(settings.available_accelerators, ("0", "1"))
        self.assertEqual(settings.prefetch_capacity, 7)
        self.assertTrue(settings.worker_debug)
        unchanged = apply_options(
            ManagerSettings(), argparse.Namespace(**{k: None for k in vars(options)})
        )
        self.assertEqual(unchanged, ManagerSettings())

    def test_describe_exit(self) -> None:
        from twisted.internet.error import ProcessDone, ProcessTerminated
        from twisted.python.failure import Failure

        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(None, signal.SIGKILL, 9))),
            "it was killed by SIGKILL (9)",
        )
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(3, None, 3 << 8))), "it exited with code 3"
        )
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), "it exited with code 0")

    def test_read_tail(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("old run\n")
            offset = f.tell()
            f.write("".join(f"line {i}\n" for i in range(100)))
        tail = read_tail(path, offset, limit=200)
        self.assertTrue(tail.endswith("line 99"))
        self.assertNotIn("old run", tail)
        self.assertLessEqual(len(tail.splitlines()), 15)
        self.assertEqual(read_tail(path + ".missing", 0), "")


# ---------------------------------------------------------------------------
# The pool


class PoolHarness:
    def __init__(self, testcase: SynchronousTestCase, count: int = 2, **settings: Any) -> None:
        self.reactor = MemoryProcessReactor()
        self.results: List[Result] = []
        self.fatal: List[str] = []
        self.log_dir = testcase.mktemp()
        settings.setdefault("stop_grace_period", 4.0)
        self.pool = WorkerPool(
            self.reactor,
            count,
            ManagerSettings(**settings),
            self.log_dir,
            on_result=lambda packed: self.results.append(read_result(packed)),  # type: ignore[arg-type]
            on_fatal=self.fatal.append,
            hostname="node1",
            worker_command=["/opt/python", "-m", "funcx_endpoint.worker"],
            environment={"PATH": "/bin"},
        )
        self.pool.start()
        testcase.addCleanup(self.cleanup, testcase)

    def child(self, index: int) -> FakeProcess:
        """The newest process of worker slot ``index``."""
        mine = [
            p
            for p in self.reactor.processes
            if p.args[p.args.index("--worker-id") + 1] == str(index)
        ]
        return mine[-1]

    def ready(self) -> None:
        for index in range(self.pool.worker_count):
            hello(self.child(index))

    def submit(self, count: int = 1) -> List[str]:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        self.pool.submit([(task_id, BUFFER.encode()) for task_id in ids])
        return ids

    def write_stderr(self, index: int, text: str) -> None:
        with open(os.path.join(self.log_dir, f"worker-{index}.err"), "a") as f:
            f.write(text)

    def cleanup(self, testcase: SynchronousTestCase) -> None:
        stopped = self.pool.stop()
        for child in self.reactor.running_processes():
            child.simulate_killed(signal.SIGTERM)
        testcase.successResultOf(stopped)
        testcase.assertEqual(self.reactor.getDelayedCalls(), [])


class PoolTests(SynchronousTestCase):
    def test_spawn(self) -> None:
        harness = PoolHarness(self, count=2, result_size_limit=777, worker_debug=True)
        self.assertEqual(len(harness.reactor.processes), 2)
        child = harness.child(1)
        self.assertEqual(
            child.args,
            [
                "/opt/python",
                "-m",
                "funcx_endpoint.worker",
                "--worker-id",
                "1",
                "--result-size-limit",
                "777",
                "--debug",
            ],
        )
        # The task pipe is the pool's own (written at once), given to the child.
        self.assertIsInstance(child.child_fds[frames.TASK_FD], int)
        self.assertEqual(child.child_fds[frames.RESULT_FD], "r")
        for fd in (0, 1, 2):
            self.assertIsInstance(child.child_fds[fd], int)
        assert child.env is not None
        self.assertEqual(child.env["FUNCX_WORKER_ID"], "1")
        for name in ("worker-0.out", "worker-0.err", "worker-1.out", "worker-1.err"):
            self.assertTrue(os.path.exists(os.path.join(harness.log_dir, name)))
        self.assertEqual(harness.pool.pids(), [p.original_pid for p in harness.reactor.processes])

    def test_tasks_wait_for_hello_then_one_at_a_time(self) -> None:
        harness = PoolHarness(self, count=2)
        ids = harness.submit(5)
        self.assertEqual(sent_tasks(harness.child(0)), [])
        hello(harness.child(0))
        [(task_id, running_ns, buffer)] = sent_tasks(harness.child(0))
        self.assertEqual((task_id, buffer), (ids[0], BUFFER.encode()))
        self.assertGreater(running_ns, 0)
        hello(harness.child(1))
        self.assertEqual([t[0] for t in sent_tasks(harness.child(1))], [ids[1]])
        self.assertEqual(harness.pool.counts()["queued"], 3)
        answer(harness.child(0), ids[0], "done")
        self.assertEqual([r.task_id for r in harness.results], [ids[0]])
        self.assertEqual([t[0] for t in sent_tasks(harness.child(0))], [ids[0], ids[2]])
        self.assertEqual(harness.pool.tasks_done, 1)

    def test_idle_worker_takes_new_task_at_once(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.ready()
        self.assertEqual(harness.pool.counts()["idle"], 1)
        [task_id] = harness.submit()
        self.assertEqual([t[0] for t in sent_tasks(harness.child(0))], [task_id])

    def test_worker_killed_mid_task(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.ready()
        first, second = harness.submit(2)
        child = harness.child(0)
        harness.write_stderr(0, "Segmentation fault in libfoo\n")
        child.simulate_killed(signal.SIGKILL)
        [lost] = harness.results
        assert lost.error_details is not None
        self.assertEqual(lost.task_id, first)
        self.assertEqual(lost.error_details.code, ErrorCode.WORKER_LOST)
        message = lost.error_details.user_message
        for expected in ("SIGKILL (9)", first, "node1", str(child.original_pid), "libfoo"):
            self.assertIn(expected, message)
        self.assertNotIn("deserializing", message)
        replacement = harness.child(0)
        self.assertIsNot(replacement, child)
        hello(replacement)
        self.assertEqual([t[0] for t in sent_tasks(replacement)], [second])
        answer(replacement, second)
        self.assertEqual(harness.results[-1].task_id, second)

    def test_stderr_tail_only_of_this_run(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.write_stderr(0, "from an earlier worker\n")
        harness.reactor.processes[-1].simulate_killed()  # dies before hello
        harness.reactor.advance(1)
        hello(harness.child(0))
        [task_id] = harness.submit()
        harness.child(0).simulate_exit(3)
        message = harness.results[0].error_details.user_message  # type: ignore[union-attr]
        self.assertIn("exited with code 3", message)
        self.assertNotIn("earlier worker", message)

    def test_died_while_loading_function(self) -> None:
        harness = PoolHarness(self, count=1)
        hello(harness.child(0), python="3.12.1", dill="0.3.9")
        [task_id] = harness.submit()
        phase(harness.child(0), frames.PHASE_LOADING)
        harness.child(0).simulate_killed(signal.SIGSEGV)
        message = harness.results[0].error_details.user_message  # type: ignore[union-attr]
        for expected in (
            "SIGSEGV",
            "deserializing the task's function",
            "Python 3.12.1",
            "dill 0.3.9",
        ):
            self.assertIn(expected, message)

    def test_phase_resets(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.ready()
        first, second = harness.submit(2)
        phase(harness.child(0), frames.PHASE_LOADING)
        answer(harness.child(0), first)  # failed to load: answered with an error
        harness.child(0).simulate_killed()
        message = harness.results[-1].error_details.user_message  # type: ignore[union-attr]
        self.assertNotIn("deserializing", message)

    def test_timeout(self) -> None:
        harness = PoolHarness(self, count=1, task_timeout=5.0)
        harness.ready()
        first, second = harness.submit(2)
        child = harness.child(0)
        harness.reactor.advance(4.9)
        self.assertEqual(child.signals, [])
        harness.reactor.advance(0.1)
        self.assertEqual(child.signals, ["KILL"])
        [timed_out] = harness.results
        assert timed_out.error_details is not None
        self.assertEqual(timed_out.error_details.code, ErrorCode.TASK_TIMEOUT)
        self.assertIn("5 s", timed_out.error_details.user_message)
        answer(child, first)  # finished as it was killed: ignored
        child.simulate_killed()
        self.assertEqual(len(harness.results), 1)
        hello(harness.child(0))
        self.assertEqual([t[0] for t in sent_tasks(harness.child(0))], [second])

    def test_result_cancels_timeout(self) -> None:
        harness = PoolHarness(self, count=1, task_timeout=5.0)
        harness.ready()
        [task_id] = harness.submit()
        answer(harness.child(0), task_id)
        harness.reactor.advance(10)
        self.assertEqual(harness.child(0).signals, [])

    def test_cancel(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.ready()
        running, queued = harness.submit(2)
        self.assertTrue(harness.pool.cancel(queued))
        self.assertFalse(harness.pool.cancel(str(uuid.uuid4())))
        child = harness.child(0)
        self.assertTrue(harness.pool.cancel(running))
        self.assertEqual(child.signals, ["KILL"])
        child.simulate_killed()
        self.assertEqual(harness.results, [])
        replacement = harness.child(0)
        self.assertIsNot(replacement, child)
        hello(replacement)
        self.assertEqual(sent_tasks(replacement), [])

    def test_result_after_exit_before_pipes_close(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.ready()
        [task_id] = harness.submit()
        child = harness.child(0)
        child.simulate_exit(0, close_pipes=False)
        answer(child, task_id, "last words")
        child.simulate_close(frames.RESULT_FD)
        child.simulate_close(frames.TASK_FD)
        self.assertEqual(len(harness.results), 1)
        self.assertIsNone(harness.results[0].error_details)

    def test_task_not_sent_to_an_exited_idle_worker(self) -> None:
        """A task arriving between a worker's exit and the end of its pipes waits
        for the replacement instead of being answered WorkerLost unrun."""
        harness = PoolHarness(self, count=1)
        harness.ready()
        dead = harness.child(0)
        dead.simulate_exit(1, close_pipes=False)
        [task_id] = harness.submit()
        self.assertEqual(sent_tasks(dead), [])
        self.assertEqual(harness.pool.counts()["queued"], 1)
        dead.simulate_close(frames.RESULT_FD)
        dead.simulate_close(frames.TASK_FD)
        self.assertEqual(harness.results, [])
        replacement = harness.child(0)
        self.assertIsNot(replacement, dead)
        hello(replacement)
        self.assertEqual([t[0] for t in sent_tasks(replacement)], [task_id])

    def test_last_result_after_exit_takes_no_new_task(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.ready()
        first, second = harness.submit(2)
        child = harness.child(0)
        child.simulate_exit(0, close_pipes=False)
        answer(child, first, "last words")
        self.assertEqual([t[0] for t in sent_tasks(child)], [first])  # not the second
        child.simulate_close(frames.RESULT_FD)
        child.simulate_close(frames.TASK_FD)
        self.assertEqual([r.task_id for r in harness.results], [first])
        self.assertIsNone(harness.results[0].error_details)
        hello(harness.child(0))
        self.assertEqual([t[0] for t in sent_tasks(harness.child(0))], [second])

    def test_pipes_held_open(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.ready()
        [task_id] = harness.submit()
        child = harness.child(0)
        child.simulate_exit(1, close_pipes=False)
        self.assertEqual(harness.results, [])
        harness.reactor.advance(PIPE_CLOSE_GRACE)
        self.assertEqual(sorted(child.closed_by_parent), [frames.TASK_FD, frames.RESULT_FD])
        self.assertEqual(harness.results[0].error_details.code, ErrorCode.WORKER_LOST)  # type: ignore[union-attr]

    def test_garbage_from_worker(self) -> None:
        harness = PoolHarness(self, count=1)
        child = harness.child(0)
        child.simulate_output(frames.RESULT_FD, b"\x00\x00\x00\x00")
        self.assertEqual(child.signals, ["KILL"])
        self.flushLoggedErrors()

    def test_unknown_kind_and_stray_result(self) -> None:
        harness = PoolHarness(self, count=2)
        harness.ready()
        answer(harness.child(0), str(uuid.uuid4()))  # no task: ignored
        self.assertEqual(harness.results, [])
        harness.child(1).simulate_output(frames.RESULT_FD, frames.encode_frame(b"Z", b""))
        self.assertEqual(harness.child(1).signals, ["KILL"])
        self.flushLoggedErrors()

    def test_stdout_is_ignored(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.pool._workers[0].protocol.childDataReceived(1, b"noise")  # type: ignore[union-attr]
        self.assertEqual(harness.child(0).signals, [])

    def test_bad_hello(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.child(0).simulate_output(
            frames.RESULT_FD, frames.encode_frame(frames.KIND_HELLO, b"[1]")
        )
        self.assertEqual(harness.child(0).signals, ["KILL"])
        self.flushLoggedErrors()

    def test_start_failures(self) -> None:
        harness = PoolHarness(self, count=1)
        delays = []
        for attempt in range(MAX_START_FAILURES):
            harness.write_stderr(0, f"ImportError number {attempt}\n")
            harness.child(0).simulate_exit(1)
            calls = harness.reactor.getDelayedCalls()
            if attempt < MAX_START_FAILURES - 1:
                [call] = [c for c in calls if getattr(c, "func", None) == harness.pool._spawn]
                delays.append(call.getTime() - harness.reactor.seconds())
                harness.reactor.advance(delays[-1])
        self.assertEqual(delays, sorted(delays))
        self.assertGreater(delays[-1], delays[0])
        [reason] = harness.fatal
        self.assertIn("died before they were ready", reason)
        self.assertIn("ImportError number 4", reason)

    def test_idle_worker_dies(self) -> None:
        harness = PoolHarness(self, count=1)
        harness.ready()
        first = harness.child(0)
        first.simulate_killed()
        self.assertEqual(harness.results, [])
        self.assertIsNot(harness.child(0), first)

    def test_spawn_error(self) -> None:
        reactor = MemoryProcessReactor()
        reactor.spawn_error = OSError("no such file")
        pool = WorkerPool(reactor, 1, ManagerSettings(), self.mktemp(), on_result=lambda b: None)
        pool.start()
        self.assertEqual(reactor.processes, [])
        self.flushLoggedErrors()
        reactor.advance(1)
        self.assertEqual(len(reactor.processes), 1)
        stopped = pool.stop()
        reactor.processes[0].simulate_killed(signal.SIGTERM)
        self.successResultOf(stopped)

    def test_stop(self) -> None:
        harness = PoolHarness(self, count=2, stop_grace_period=4.0)
        harness.ready()
        harness.submit(3)
        stopped = harness.pool.stop()
        first, second = harness.child(0), harness.child(1)
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))
        first.simulate_killed(signal.SIGTERM)
        harness.reactor.advance(1.9)
        self.assertNoResult(stopped)
        harness.reactor.advance(0.1)  # half the grace period
        self.assertEqual(second.signals, ["TERM", "KILL"])
        second.simulate_killed()
        self.successResultOf(stopped)
        self.assertEqual(harness.results, [])  # no WorkerLost while stopping
        self.assertEqual(len(harness.reactor.processes), 2)  # no respawn
        harness.pool.submit([("x", b"")])  # ignored
        self.successResultOf(harness.pool.stop())


# ---------------------------------------------------------------------------
# The service, connected in memory to a real interchange


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects a client factory to a server factory through an IOPump."""

    def __init__(self, server_factory: Any, clock: Any) -> None:
        self.server_factory = server_factory
        self.clock = clock
        self.pumps: List[iosim.IOPump] = []
        self.refuse = False

    def connect(self, factory: Any) -> Any:
        if self.refuse:
            return fail(ConnectionRefusedError())
        client = factory.buildProtocol(None)
        server = self.server_factory.buildProtocol(None)
        self.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=self.clock,
            )
        )
        return succeed(client)


class Link:
    """An interchange and a manager service sharing one fake reactor."""

    def __init__(
        self,
        testcase: SynchronousTestCase,
        worker_count: int = 2,
        secret: Optional[str] = None,
        server_factory: Any = None,
        service_options: Optional[Dict[str, Any]] = None,
        identity: Optional[ManagerIdentity] = None,
        **interchange_options: Any,
    ) -> None:
        self.testcase = testcase
        self.reactor = MemoryProcessReactor()
        self.results: List[Result] = []
        interchange_options.setdefault("heartbeat_period", 10.0)
        interchange_options.setdefault("heartbeat_threshold", 30.0)
        interchange_options.setdefault("stop_grace_period", 4.0)
        executor = interchange_options.pop("executor", HighThroughputExecutor())
        self.interchange = Interchange(
            self.reactor,
            testcase.mktemp(),
            executor,
            CollectingSink(self.results.extend),
            **interchange_options,
        )
        self.interchange.startService()
        info = ConnectionInfo.read(self.interchange.info_file)
        if secret is not None:
            import attr

            info = attr.evolve(info, secret=secret)
        self.endpoint = MemoryEndpoint(
            server_factory or self.reactor.sslServers[-1][1], self.reactor
        )
        self.log_dir = testcase.mktemp()
        self.service = ManagerService(
            self.reactor,
            info,
            identity or ManagerIdentity(manager_id="m1", block_id="b1", hostname="node1", pid=99),
            worker_count,
            self.log_dir,
            worker_command=["/opt/python", "-m", "funcx_endpoint.worker"],
            endpoint=self.endpoint,
            connect_attempts=3,
            **(service_options or {}),
        )
        self.codes: List[int] = []
        self.service.when_stopped().addCallback(self.codes.append)
        self.service.startService()
        self.flush()

    def flush(self) -> None:
        for _ in range(10):
            for pump in self.endpoint.pumps:
                pump.flush()
            self.reactor.advance(0)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.flush()

    def workers(self) -> List[FakeProcess]:
        return self.reactor.running_processes()

    def ready(self) -> None:
        for child in self.workers():
            hello(child)
        self.flush()

    def exit_workers(self) -> None:
        for child in self.workers():
            child.simulate_killed(signal.SIGTERM)
        self.flush()

    def finish(self) -> None:
        """Stop the interchange (managers are told to shut down), end everything."""
        stopped = self.interchange.stopService()
        self.flush()
        self.exit_workers()
        for _ in range(20):
            if stopped.called:
                break
            self.advance(1)
        self.testcase.successResultOf(stopped)
        self.testcase.assertEqual(self.reactor.getDelayedCalls(), [])


class ServiceTests(SynchronousTestCase):
    def test_register_run_and_shutdown(self) -> None:
        link = Link(self, worker_count=2)
        [info] = link.interchange.managers()
        self.assertEqual((info.manager_id, info.block_id, info.hostname), ("m1", "b1", "node1"))
        self.assertEqual(info.worker_count, 2)
        self.assertEqual(len(link.workers()), 2)
        link.ready()
        task = Task(uuid.uuid4(), BUFFER)
        link.interchange.submit([task])
        link.flush()
        [child] = [c for c in link.workers() if sent_tasks(c)]
        [(task_id, _, buffer)] = sent_tasks(child)
        self.assertEqual((task_id, buffer), (task.task_id, BUFFER.encode()))
        answer(child, task_id, 42)
        link.flush()
        [result] = link.results
        self.assertEqual(result.data, serialize(42))
        link.finish()
        self.assertEqual(link.codes, [EXIT_OK])
        self.assertEqual(link.interchange.managers(), [])

    def test_settings_from_registration(self) -> None:
        link = Link(self, task_timeout=3.0, result_size_limit=999, batch_interval=0.5)
        settings = link.service.settings
        self.assertEqual(
            (settings.task_timeout, settings.result_size_limit, settings.batch_interval),
            (3.0, 999, 0.5),
        )
        self.assertIn("999", link.workers()[0].args)
        link.finish()

    def test_cancel_kills_worker(self) -> None:
        link = Link(self, worker_count=1)
        link.ready()
        task = Task(uuid.uuid4(), BUFFER)
        link.interchange.submit([task])
        link.flush()
        [child] = link.workers()
        link.interchange.cancel(task.task_id)
        link.flush()
        self.assertEqual(child.signals, ["KILL"])
        child.simulate_killed()
        link.flush()
        [result] = link.results
        self.assertEqual(result.error_details.code, ErrorCode.TASK_CANCELLED)  # type: ignore[union-attr]
        link.finish()

    def two_busy_workers(self, prefetch: int, tasks: int) -> Tuple[Link, Any, Any]:
        """A manager of two workers (batch interval 1 s) given ``tasks`` tasks."""
        link = Link(
            self,
            worker_count=2,
            batch_interval=1.0,
            executor=HighThroughputExecutor(prefetch_capacity=prefetch),
        )
        link.ready()
        link.interchange.submit([Task(uuid.uuid4(), BUFFER) for _ in range(tasks)])
        link.flush()
        first, second = link.workers()
        return link, first, second

    def test_results_batched(self) -> None:
        link, first, second = self.two_busy_workers(prefetch=5, tasks=8)
        answer(first, sent_tasks(first)[0][0])
        link.flush()
        self.assertEqual(len(link.results), 1)  # after a quiet period: at once
        answer(second, sent_tasks(second)[0][0])
        link.flush()
        answer(first, sent_tasks(first)[1][0])
        link.flush()
        self.assertEqual(len(link.results), 1)  # these wait for the interval
        link.advance(1.0)
        self.assertEqual(len(link.results), 3)
        link.finish()

    def test_held_results_go_once_the_queue_runs_low(self) -> None:
        link, first, second = self.two_busy_workers(prefetch=2, tasks=5)
        answer(first, sent_tasks(first)[0][0])  # after a quiet period: at once
        link.flush()
        self.assertEqual(len(link.results), 1)
        answer(second, sent_tasks(second)[0][0])  # 2 still queued: held
        link.flush()
        self.assertEqual(len(link.results), 1)
        # 1 queued for 2 workers: the workers will soon wait, so what is held
        # goes now, not a batch interval after the previous batch.
        answer(first, sent_tasks(first)[1][0])
        link.flush()
        self.assertEqual(len(link.results), 3)
        link.finish()

    def test_connection_lost_stops_manager(self) -> None:
        link = Link(self, worker_count=2)
        link.ready()
        link.endpoint.pumps[0].client.transport.loseConnection()
        link.flush()
        self.assertEqual([c.signals for c in link.reactor.processes], [["TERM"], ["TERM"]])
        self.assertEqual(link.codes, [])
        link.exit_workers()
        self.assertEqual(link.codes, [EXIT_LOST])
        link.finish()

    def test_silent_interchange(self) -> None:
        class MuteInterchange(amp.AMP):
            @Register.responder
            def register(self, **details: Any) -> Dict[str, Any]:
                return dict(
                    task_timeout=0.0,
                    result_size_limit=100,
                    heartbeat_period=1.0,
                    heartbeat_threshold=3.0,
                    stop_grace_period=2.0,
                    worker_debug=False,
                    batch_interval=0.0,
                    **local_versions(),
                )

            @Heartbeat.responder
            def heartbeat(self) -> Dict[str, Any]:
                return {}

        from twisted.internet.protocol import Factory

        link = Link(self, server_factory=Factory.forProtocol(MuteInterchange))
        self.assertEqual(len(link.workers()), 2)
        link.advance(1)
        link.advance(1)
        link.advance(1)
        self.assertEqual(link.codes, [])
        link.advance(1)
        self.assertEqual([c.signals for c in link.reactor.processes], [["TERM"], ["TERM"]])
        link.exit_workers()
        self.assertEqual(link.codes, [EXIT_LOST])
        link.finish()

    def test_refused(self) -> None:
        link = Link(self, secret="not the secret")
        self.assertEqual(link.codes, [EXIT_REFUSED])
        self.assertEqual(link.reactor.processes, [])
        self.assertEqual(len(link.endpoint.pumps), 1)  # no second try
        link.finish()

    def test_cannot_connect(self) -> None:
        reactor = MemoryProcessReactor()
        endpoint = MemoryEndpoint(None, reactor)
        endpoint.refuse = True
        info = ConnectionInfo("127.0.0.1", 1, "", "s")
        service = ManagerService(
            reactor,
            info,
            ManagerIdentity(),
            1,
            self.mktemp(),
            endpoint=endpoint,
            connect_attempts=3,
        )
        codes: List[int] = []
        service.when_stopped().addCallback(codes.append)
        service.startService()
        for _ in range(10):
            reactor.advance(1)
        self.assertEqual(codes, [EXIT_LOST])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_stop_service_like_sigterm(self) -> None:
        link = Link(self, worker_count=1)
        link.ready()
        stopped = link.service.stopService()
        link.flush()
        self.assertEqual(link.workers()[0].signals, ["TERM"])
        self.assertNoResult(stopped)
        link.exit_workers()
        self.assertEqual(self.successResultOf(stopped), EXIT_OK)
        self.assertEqual(link.interchange.managers(), [])
        self.assertEqual(self.successResultOf(link.service.when_stopped()), EXIT_OK)
        link.finish()

    def test_workers_cannot_start(self) -> None:
        """The manager tells the interchange why it quits: its tasks say so."""
        link = Link(
            self, worker_count=1, executor=HighThroughputExecutor(max_retries_on_system_failure=0)
        )
        task = Task(uuid.uuid4(), BUFFER)
        link.interchange.submit([task])
        link.flush()
        for attempt in range(MAX_START_FAILURES):
            with open(os.path.join(link.log_dir, "worker-0.err"), "a") as f:
                f.write(f"ModuleNotFoundError: No module named 'dill' ({attempt})\n")
            link.workers()[0].simulate_exit(1)
            link.advance(20)
        self.assertEqual(link.codes, [EXIT_WORKERS])
        [result] = link.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.MANAGER_LOST)
        message = result.error_details.user_message
        self.assertIn("it quit: workers cannot start", message)
        self.assertIn("died before they were ready", message)
        self.assertIn("No module named 'dill' (4)", message)
        self.assertNotIn("connection closed", message)
        link.finish()

    def test_manager_heartbeats(self) -> None:
        link = Link(self, worker_count=1)
        [info] = link.interchange.managers()
        for _ in range(10):
            link.advance(10)
        self.assertEqual(len(link.interchange.managers()), 1)  # heartbeats kept it alive
        self.assertEqual(link.codes, [])
        link.finish()


def test_python() -> str:
    return sys.executable
