"""Integration tests: a real interchange (TLS listener in trial's reactor), real
``funcx-manager`` processes and their real workers.

Each test starts its own interchange and managers (a manager is ready in about
half a second) and stops them, checking that no process is left behind.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

import attr
import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.trial.unittest import TestCase

from funcx_endpoint.config.model import HighThroughputExecutor
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.manager.service import EXIT_REFUSED
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.testing.managers import ManagerProcess, spawn_manager
from funcx_endpoint.tls import make_ca
from funcx_endpoint.wire import (
    ErrorCode,
    Result,
    Task,
    deserialize,
    pack,
    pack_buffers,
    pack_function,
    pack_payload,
    serialize,
)
from funcx_endpoint.wire.amp import (
    Register,
    RegistrationRefused,
    SendResults,
)
from funcx_endpoint.wire.info import (
    ConnectionInfo,
    local_versions,
)

# -- functions the tests run (sent as source: self-contained) ----------------


def add(a: int, b: int) -> int:
    return a + b


def fail_deeply(x: int) -> float:
    def helper(y: int) -> float:
        return y / 0

    return helper(x)


def echo(data: bytes) -> bytes:
    return data


def big_result(size: int) -> str:
    return "x" * size


def parent_pid() -> int:
    import os

    return os.getppid()


def sleeper(marker_dir: str, seconds: float) -> int:
    import os
    import time

    with open(os.path.join(marker_dir, str(os.getpid())), "w") as f:
        f.write(str(os.getppid()))
    time.sleep(seconds)
    return os.getpid()


class _Exit:
    """Unpickling this ends the process, like bytecode from another Python can."""

    def __reduce__(self) -> Any:
        return (os._exit, (7,))


def buffer_for(fn: Callable[..., Any], *args: Any) -> str:
    return pack_function(fn) + pack_payload(args)


def deadly_buffer() -> str:
    import base64
    import pickle

    part = "01\n" + base64.encodebytes(pickle.dumps(_Exit())).decode()
    return pack_buffers([part]) + pack_payload(())


# -- the harness ----------------------------------------------------------------


class Cluster:
    """An interchange in this reactor and the manager processes started for it."""

    def __init__(
        self, testcase: TestCase, executor: Optional[HighThroughputExecutor] = None, **options: Any
    ) -> None:
        self.testcase = testcase
        self.dir = os.path.abspath(testcase.mktemp())
        os.makedirs(self.dir)
        options.setdefault("heartbeat_period", 1.0)
        options.setdefault("heartbeat_threshold", 4.0)
        options.setdefault("stop_grace_period", 4.0)
        options.setdefault("registration_timeout", 2.0)
        self.results: Dict[str, Result] = {}
        self.duplicates: List[Result] = []  # a second result for a task: a failure
        self._waiters: Dict[str, List[Deferred[Result]]] = {}
        self.interchange = Interchange(
            reactor,
            os.path.join(self.dir, "interchange"),
            executor or HighThroughputExecutor(),
            CollectingSink(self._on_results),
            **options,
        )
        self.interchange.startService()
        self.managers: List[ManagerProcess] = []
        self.seen_pids: List[int] = []
        testcase.addCleanup(self.close)

    def _on_results(self, results: List[Result]) -> None:
        for result in results:
            if result.task_id in self.results:
                self.duplicates.append(result)
                continue
            self.results[result.task_id] = result
            for waiter in self._waiters.pop(result.task_id, []):
                waiter.callback(result)

    def start_manager(self, workers: int = 1, **kwargs: Any) -> ManagerProcess:
        name = f"manager-{len(self.managers)}"
        manager = spawn_manager(
            reactor,
            kwargs.pop("info_file", self.interchange.info_file),
            kwargs.pop("block_id", "block-0"),
            manager_id=kwargs.pop("manager_id", name),
            log_dir=os.path.join(self.dir, name),
            worker_count=workers,
            **kwargs,
        )
        self.managers.append(manager)
        return manager

    async def ready(self, count: int = 1) -> None:
        waiting = self.interchange.when_managers(count)
        waiting.addTimeout(30, reactor)
        await waiting

    def submit(self, buffer: str) -> str:
        task = Task(uuid.uuid4(), buffer)
        self.interchange.submit([task])
        return task.task_id

    async def result(self, task_id: str, timeout: float = 30) -> Result:
        if task_id in self.results:
            return self.results[task_id]
        waiter: Deferred[Result] = Deferred()
        self._waiters.setdefault(task_id, []).append(waiter)
        waiter.addTimeout(timeout, reactor)
        return await waiter

    async def run(self, buffer: str, timeout: float = 30) -> Result:
        return await self.result(self.submit(buffer), timeout)

    def processes(self) -> List[psutil.Process]:
        """Managers and their workers, alive now; remembered for the final check."""
        found = []
        for manager in self.managers:
            if manager.pid is None or manager.ended:
                continue
            try:
                process = psutil.Process(manager.pid)
                found.append(process)
                found.extend(process.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        self.seen_pids.extend(p.pid for p in found if p.pid not in self.seen_pids)
        return found

    async def close(self) -> None:
        self.processes()
        await self.interchange.stopService()
        for manager in self.managers:
            ended = manager.when_ended()
            ended.addTimeout(20, reactor)
            try:
                await ended
            except Exception:
                manager.kill()
                await manager.when_ended()
                self.testcase.fail(
                    f"manager {manager.args} did not exit:\n{manager.output.decode()}"
                )
        deadline = time.monotonic() + 10
        while alive(self.seen_pids) and time.monotonic() < deadline:
            await sleep(0.05)
        left = alive(self.seen_pids)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        self.testcase.assertEqual(left, [], "processes left behind")
        self.testcase.assertEqual(
            [(r.task_id, r.error_details) for r in self.duplicates],
            [],
            "tasks answered more than once",
        )


def alive(pids: List[int]) -> List[int]:
    result = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
        except psutil.NoSuchProcess:
            pass
    return result


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await sleep(0.02)


def markers(directory: str) -> Dict[int, int]:
    """pid -> parent pid of each sleeper that started, from its marker file."""
    found = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name)) as f:
            text = f.read()
        if text:
            found[int(name)] = int(text)
    return found


def error_code(result: Result) -> Optional[str]:
    return result.error_details.code if result.error_details else None


def message(result: Result) -> str:
    assert result.error_details is not None, result
    return result.error_details.user_message


# -- tests --------------------------------------------------------------------------


class ExecutionTests(TestCase):
    async def test_outcomes(self) -> None:
        """Results, the user's exceptions, bad input, size limits, big payloads."""
        cluster = Cluster(self, result_size_limit=5 * 1024 * 1024)
        cluster.start_manager(workers=2)
        await cluster.ready()

        ok = await cluster.run(buffer_for(add, 20, 22))
        self.assertIsNone(ok.error_details)
        self.assertEqual(deserialize(ok.data), 42)
        self.assertEqual(
            [t.state.value for t in ok.task_statuses or []],
            [
                "waiting-for-nodes",
                "waiting-for-launch",
                "running",
                "execution-start",
                "execution-end",
            ],
        )

        failed = await cluster.run(buffer_for(fail_deeply, 1))
        self.assertEqual(error_code(failed), ErrorCode.REMOTE_EXECUTION_ERROR)
        self.assertEqual(message(failed), "ZeroDivisionError: division by zero")
        lines = failed.data.splitlines()
        self.assertEqual(lines[0], "Traceback (most recent call last):")
        self.assertIn("in fail_deeply", lines[1])
        self.assertIn("in helper", failed.data)
        self.assertNotIn("funcx_endpoint", failed.data)

        bad = await cluster.run("not a task buffer")
        self.assertEqual(error_code(bad), ErrorCode.DESERIALIZATION_ERROR)
        self.assertIn("could not be deserialized", message(bad))

        unknown = await cluster.run(pack_buffers(["42\nxx", serialize(()), serialize({})]))
        self.assertEqual(error_code(unknown), ErrorCode.DESERIALIZATION_ERROR)
        self.assertIn("header", message(unknown))

        oversized = await cluster.run(buffer_for(big_result, 6 * 1024 * 1024))
        self.assertEqual(error_code(oversized), ErrorCode.MAX_RESULT_SIZE_EXCEEDED)
        self.assertIn("limit of 5242880 bytes", message(oversized))

        payload = os.urandom(3 * 1024 * 1024)
        echoed = await cluster.run(buffer_for(echo, payload))
        self.assertIsNone(echoed.error_details)
        self.assertEqual(deserialize(echoed.data), payload)

    async def test_function_that_kills_its_deserializer(self) -> None:
        """A worker dying while loading a function says so, with its versions."""
        cluster = Cluster(self)
        cluster.start_manager(workers=1)
        await cluster.ready()
        lost = await cluster.run(deadly_buffer())
        self.assertEqual(error_code(lost), ErrorCode.WORKER_LOST)
        versions = local_versions()
        for expected in (
            "exited with code 7",
            "deserializing the task's function",
            f"Python {versions['python_version']}",
            f"dill {versions['dill_version']}",
        ):
            self.assertIn(expected, message(lost))
        after = await cluster.run(buffer_for(add, 1, 1))
        self.assertEqual(deserialize(after.data), 2)

    async def test_worker_killed(self) -> None:
        cluster = Cluster(self)
        manager = cluster.start_manager(workers=1)
        await cluster.ready()
        marker_dir = os.path.join(cluster.dir, "markers")
        os.makedirs(marker_dir)
        task_id = cluster.submit(buffer_for(sleeper, marker_dir, 60))
        [(worker_pid, parent)] = (
            await wait_for(lambda: markers(marker_dir), what="sleeper")
        ).items()
        self.assertEqual(parent, manager.pid)
        os.kill(worker_pid, signal.SIGKILL)
        lost = await cluster.result(task_id)
        self.assertEqual(error_code(lost), ErrorCode.WORKER_LOST)
        self.assertIn("SIGKILL (9)", message(lost))
        self.assertIn(str(worker_pid), message(lost))
        replacement = await cluster.run(buffer_for(parent_pid))
        self.assertEqual(deserialize(replacement.data), manager.pid)
        [worker] = psutil.Process(manager.pid).children()
        self.assertNotEqual(worker.pid, worker_pid)

    async def test_manager_killed(self) -> None:
        """Tasks of a killed manager run again elsewhere, then fail with ManagerLost."""
        cluster = Cluster(self, HighThroughputExecutor(max_retries_on_system_failure=1))
        marker_dir = os.path.join(cluster.dir, "markers")
        os.makedirs(marker_dir)
        first = cluster.start_manager(workers=1, manager_id="first")
        await cluster.ready()
        task_id = cluster.submit(buffer_for(sleeper, marker_dir, 60))
        [(first_worker, parent)] = (await wait_for(lambda: markers(marker_dir))).items()
        self.assertEqual(parent, first.pid)
        first.kill()
        await first.when_ended()
        # Its worker dies with it (PR_SET_PDEATHSIG), leaving no orphan.
        await wait_for(lambda: not alive([first_worker]), what="the orphaned worker to die")
        self.assertNotIn(task_id, cluster.results)
        second = cluster.start_manager(workers=1, manager_id="second", block_id="block-1")
        await wait_for(lambda: len(markers(marker_dir)) == 2, what="the retry")
        self.assertEqual(sorted(markers(marker_dir).values()), sorted([first.pid, second.pid]))
        cluster.processes()
        second.kill()
        lost = await cluster.result(task_id)
        self.assertEqual(error_code(lost), ErrorCode.MANAGER_LOST)
        for expected in (
            "manager second",
            "block block-1",
            "connection closed",
            "2 time(s)",
            "max_retries_on_system_failure is 1",
        ):
            self.assertIn(expected, message(lost))
        await wait_for(lambda: not alive(cluster.seen_pids), what="all processes to end")

    async def test_workers_cannot_start(self) -> None:
        """A manager whose workers cannot start says so; its tasks' errors show why."""
        cluster = Cluster(
            self,
            HighThroughputExecutor(
                max_retries_on_system_failure=0,
                # PYTHONPATH too: under `trial -j` it holds the standard
                # library, which would let the workers start after all.
                worker_environment={"PYTHONHOME": "/nonexistent-python-home", "PYTHONPATH": ""},
            ),
        )
        manager = cluster.start_manager(workers=1)
        await cluster.ready()
        task_id = cluster.submit(buffer_for(sum, [1, 2]))
        lost = await cluster.result(task_id, timeout=60)
        self.assertEqual(error_code(lost), ErrorCode.MANAGER_LOST)
        for expected in ("it quit: workers cannot start", "died before they were ready"):
            self.assertIn(expected, message(lost))
        self.assertIn("stderr ends with", message(lost))
        self.assertNotIn("connection closed", message(lost))
        await manager.when_ended()

    async def test_timeout(self) -> None:
        cluster = Cluster(self, task_timeout=1.0)
        marker_dir = os.path.join(cluster.dir, "markers")
        os.makedirs(marker_dir)
        cluster.start_manager(workers=1)
        await cluster.ready()
        started = time.monotonic()
        hung = await cluster.run(buffer_for(sleeper, marker_dir, 60))
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(error_code(hung), ErrorCode.TASK_TIMEOUT)
        self.assertIn("task timeout of 1 s", message(hung))
        [worker_pid] = markers(marker_dir)
        await wait_for(lambda: not alive([worker_pid]), what="the hung worker to die")
        after = await cluster.run(buffer_for(add, 2, 3))
        self.assertEqual(deserialize(after.data), 5)

    async def test_cancel(self) -> None:
        cluster = Cluster(self, HighThroughputExecutor(prefetch_capacity=0))
        marker_dir = os.path.join(cluster.dir, "markers")
        os.makedirs(marker_dir)
        cluster.start_manager(workers=1)
        await cluster.ready()
        running = cluster.submit(buffer_for(sleeper, marker_dir, 60))
        queued = cluster.submit(buffer_for(add, 1, 2))
        [worker_pid] = await wait_for(lambda: markers(marker_dir), what="the sleeper")
        self.assertTrue(cluster.interchange.cancel(queued))
        self.assertTrue(cluster.interchange.cancel(running))
        for task_id in (queued, running):
            cancelled = await cluster.result(task_id)
            self.assertEqual(error_code(cancelled), ErrorCode.TASK_CANCELLED)
        await wait_for(lambda: not alive([worker_pid]), what="the cancelled task's worker")
        after = await cluster.run(buffer_for(add, 3, 4))
        self.assertEqual(deserialize(after.data), 7)

    async def test_two_managers_share_the_load(self) -> None:
        cluster = Cluster(self)
        managers = [cluster.start_manager(workers=1), cluster.start_manager(workers=1)]
        await cluster.ready(2)
        task_ids = [cluster.submit(buffer_for(parent_pid)) for _ in range(40)]
        parents = {deserialize((await cluster.result(t)).data) for t in task_ids}
        self.assertEqual(parents, {m.pid for m in managers})
        status = cluster.interchange.status()
        self.assertEqual((status["managers"], status["total_workers"]), (2, 2))

    async def test_graceful_stop(self) -> None:
        cluster = Cluster(self)
        managers = [cluster.start_manager(workers=2), cluster.start_manager(workers=2)]
        await cluster.ready(2)
        await cluster.run(buffer_for(add, 1, 1))
        await wait_for(lambda: len(cluster.processes()) == 6, what="2 managers and 4 workers")
        started = time.monotonic()
        await cluster.interchange.stopService()
        for manager in managers:
            self.assertEqual(await manager.when_ended(), 0, manager.output.decode())
        self.assertLess(time.monotonic() - started, 5)
        await wait_for(lambda: not alive(cluster.seen_pids), timeout=5, what="no process left")
        log_dir = os.path.join(cluster.dir, "manager-0")
        for name in ("manager.log", "worker-0.out", "worker-0.err", "worker-1.err"):
            self.assertTrue(os.path.exists(os.path.join(log_dir, name)), name)
        with open(os.path.join(log_dir, "manager.log")) as f:
            text = f.read()
        self.assertIn("Registered as manager manager-0", text)
        self.assertNotIn(ConnectionInfo.read(cluster.interchange.info_file).secret, text)

    async def test_sizing_from_options(self) -> None:
        cluster = Cluster(self, HighThroughputExecutor(max_workers_per_node=8))
        manager = spawn_manager(
            reactor,
            cluster.interchange.info_file,
            "sized",
            log_dir=os.path.join(cluster.dir, "sized"),
            extra_args=["--max-workers", "1", "--cores-per-worker", "0.25"],
        )
        cluster.managers.append(manager)
        await cluster.ready()
        [info] = cluster.interchange.managers()
        self.assertEqual(info.worker_count, 1)

    async def test_missing_info_file(self) -> None:
        manager = spawn_manager(reactor, os.path.abspath("no-such-info.json"), "b")
        self.assertEqual(await manager.when_ended(), 2)
        self.assertIn(b"cannot read the manager info file", manager.output)

    async def test_manager_sigterm(self) -> None:
        cluster = Cluster(self)
        manager = cluster.start_manager(workers=2)
        await cluster.ready()
        await wait_for(lambda: len(cluster.processes()) == 3, what="a manager and 2 workers")
        manager.terminate()
        self.assertEqual(await manager.when_ended(), 0)
        await wait_for(lambda: not alive(cluster.seen_pids), timeout=5, what="its workers to end")
        await wait_for(lambda: not cluster.interchange.managers(), what="the interchange to notice")


class ForgedManagerTests(TestCase):
    """Whoever lacks the CA-signed interchange's trust or the secret gets nothing."""

    async def connect_tls(self, cluster: Cluster, ca_pem: Optional[bytes] = None) -> Forged:
        info = ConnectionInfo.read(cluster.interchange.info_file)
        trust = Certificate.loadPEM(ca_pem or info.ca_cert_pem.encode())
        endpoint = wrapClientTLS(
            optionsForClientTLS("127.0.0.1", trustRoot=trust),
            HostnameEndpoint(reactor, "127.0.0.1", info.port),
        )
        protocol = Forged()
        await connectProtocol(endpoint, protocol)
        return protocol

    async def test_wrong_secret(self) -> None:
        cluster = Cluster(self)
        queued = cluster.submit(buffer_for(add, 1, 1))
        forged = await self.connect_tls(cluster)
        details = dict(
            secret="guessed",
            manager_id="forged",
            block_id="b",
            hostname="evil",
            pid=1,
            worker_count=8,
            prefetch_capacity=8,
            worker_type="no_container",
            container_type="RAW",
            **local_versions(),
        )
        with self.assertRaises(RegistrationRefused):
            await forged.callRemote(Register, **details)
        await forged.closed
        self.assertEqual(cluster.interchange.managers(), [])
        self.assertEqual(cluster.interchange.status()["pending_tasks"], 1)
        self.assertNotIn(queued, cluster.results)

    async def test_unregistered_cannot_inject(self) -> None:
        cluster = Cluster(self)
        queued = cluster.submit(buffer_for(add, 1, 1))
        forged = await self.connect_tls(cluster)
        forged.callRemote(SendResults, results=[pack(Result.success(queued, serialize(666)))])
        await forged.closed
        await sleep(0.2)
        self.assertNotIn(queued, cluster.results)
        self.assertEqual(forged.tasks, [])
        cluster.start_manager(workers=1)
        self.assertEqual(deserialize((await cluster.result(queued)).data), 2)

    async def test_never_registers(self) -> None:
        cluster = Cluster(self, registration_timeout=0.5)
        forged = await self.connect_tls(cluster)
        started = time.monotonic()
        await forged.closed
        self.assertLess(time.monotonic() - started, 3)

    async def test_plain_tcp(self) -> None:
        cluster = Cluster(self)
        info = ConnectionInfo.read(cluster.interchange.info_file)
        forged = Forged()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", info.port), forged)
        attempt = forged.callRemote(
            Register,
            secret=info.secret,  # even with the secret: no TLS, no deal
            manager_id="plain",
            block_id="b",
            hostname="h",
            pid=1,
            worker_count=1,
            prefetch_capacity=0,
            worker_type="no_container",
            container_type="RAW",
            **local_versions(),
        )
        with self.assertRaises(ConnectionDone):
            await attempt
        await forged.closed
        self.assertEqual(cluster.interchange.managers(), [])

    async def test_wrong_ca(self) -> None:
        cluster = Cluster(self)
        other_ca = make_ca("someone else's CA").cert_pem
        forged = await self.connect_tls(cluster, ca_pem=other_ca)
        info = ConnectionInfo.read(cluster.interchange.info_file)
        with self.assertRaises(Exception) as caught:
            await forged.callRemote(
                Register,
                secret=info.secret,
                manager_id="m",
                block_id="b",
                hostname="h",
                pid=1,
                worker_count=1,
                prefetch_capacity=0,
                worker_type="no_container",
                container_type="RAW",
                **local_versions(),
            )
        await forged.closed
        self.assertIn("certificate verify failed", str(caught.exception))
        self.assertEqual(cluster.interchange.managers(), [])

    async def test_manager_with_stale_info_file(self) -> None:
        cluster = Cluster(self)
        info = ConnectionInfo.read(cluster.interchange.info_file)
        stale = os.path.join(cluster.dir, "stale-info.json")
        attr.evolve(info, secret="from a previous run").write(stale)
        manager = cluster.start_manager(workers=1, info_file=stale)
        self.assertEqual(await manager.when_ended(), EXIT_REFUSED)
        self.assertEqual(cluster.interchange.managers(), [])


class Forged(amp.AMP):
    """An AMP client that records tasks it gets (it should get none)."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: List[Any] = []
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)
