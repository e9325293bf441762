"""Unit tests of the interchange and its AMP protocol, on a Clock, in memory.

Managers here are AMP clients driven by the test (:class:`FakeManager`),
connected to the interchange's own protocol through in-memory transports;
no sockets, no processes, no real time.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import uuid
from typing import Any, Dict, List, Optional, Tuple, cast

from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from funcx_endpoint.config.model import HighThroughputExecutor
from funcx_endpoint.executor.dispatcher import TaskDispatcher
from funcx_endpoint.executor.interchange import MAX_UNREGISTERED_BYTES, Interchange
from funcx_endpoint.executor.interface import IInterchange, ILoadSource, IResultSink, ManagerInfo
from funcx_endpoint.executor.registry import LIVENESS_BATCH, ManagerRegistry
from funcx_endpoint.executor.routing import LeastLoadedRouting
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.wire import (
    ActorName,
    ErrorCode,
    PackedResult,
    Result,
    Task,
    TaskState,
    TaskTransition,
    pack,
    pack_function,
    pack_payload,
    serialize,
)
from funcx_endpoint.wire.amp import (
    MAX_CHUNK,
    CancelTask,
    ChunkedBytes,
    ChunkedList,
    Heartbeat,
    Quitting,
    RateMeter,
    Register,
    RegistrationRefused,
    SendResults,
    Shutdown,
    SubmitTasks,
    TaskBatch,
    TasksStarted,
    send_unanswered,
)
from funcx_endpoint.wire.framing import (
    decode_list,
    encode_list,
)
from funcx_endpoint.wire.info import (
    ConnectionInfo,
    InfoFileError,
    ManagerSettings,
    local_versions,
    versions_differ,
)


def noop() -> None:
    return None


BUFFER = pack_function(noop) + pack_payload(())


def make_task(buffer: str = BUFFER) -> Task:
    return Task(uuid.uuid4(), buffer)


class FakeManager(amp.AMP):
    """A manager played by the test: records what the interchange sends."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: List[List[Tuple[str, bytes]]] = []
        self.containers: Dict[str, Any] = {}
        self.cancelled: List[str] = []
        self.shutdowns: List[str] = []
        self.heartbeats = 0
        self.lost = False

    @property
    def task_ids(self) -> List[str]:
        return [task_id for batch in self.batches for task_id, _ in batch]

    @SubmitTasks.responder
    def submit_tasks(
        self, tasks: List[Tuple[str, bytes]], containers: Optional[Dict[str, Any]] = None
    ) -> Dict[str, Any]:
        self.batches.append(tasks)
        self.containers.update(containers or {})
        return {}

    @CancelTask.responder
    def cancel_task(self, task_id: str) -> Dict[str, Any]:
        self.cancelled.append(task_id)
        return {"found": True}

    @Shutdown.responder
    def shutdown(self, reason: str) -> Dict[str, Any]:
        self.shutdowns.append(reason)
        return {}

    @Heartbeat.responder
    def heartbeat(self) -> Dict[str, Any]:
        self.heartbeats += 1
        return {}

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        super().connectionLost(reason)

    def disconnect(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()

    def send_results(self, *results: Result) -> None:
        self.callRemote(
            SendResults, results=[PackedResult.from_result(r).encode() for r in results]
        )

    def answer(self, task_id: str, value: Any = None) -> Result:
        statuses = [
            TaskTransition.now(TaskState.RUNNING, ActorName.MANAGER),
            TaskTransition.now(TaskState.EXECUTION_START, ActorName.WORKER),
            TaskTransition.now(TaskState.EXECUTION_END, ActorName.WORKER),
        ]
        result = Result.success(task_id, serialize(value), statuses)
        self.send_results(result)
        return result


def manager_id(harness: Any) -> str:
    [info] = harness.interchange.managers()
    return str(info.manager_id)


def outcome(deferred: Any) -> List[Any]:
    """Collect a remote call's result or failure as it arrives.

    AMP hands a failure nobody handles yet to its connection's error logger
    (and drops the connection): the handler must be there before the answer.
    """
    box: List[Any] = []
    deferred.addBoth(box.append)
    return box


class Link:
    """A registered manager's connection as the registry uses it, without I/O."""

    def __init__(self) -> None:
        self.manager: Any = None
        self.peer = "test"
        self.heartbeats = 0
        self.dropped = False

    def details(self, index: int) -> Dict[str, Any]:
        return dict(
            secret="s3cret",
            manager_id=f"m{index}",
            block_id="b",
            hostname=f"node{index}",
            pid=index,
            worker_count=1,
            prefetch_capacity=0,
            worker_type="no_container",
            container_type="RAW",
            **local_versions(),
        )

    def accepted(self, manager: Any) -> None:
        self.manager = manager

    def sendBox(self, box: amp.AmpBox) -> None:
        if box[b"_command"] == Heartbeat.commandName:
            self.heartbeats += 1

    def drop(self) -> None:
        if not self.dropped:
            self.dropped = True
            self.manager.gone("dropped", on_purpose=False)


class CapturedLog:
    """Log events of this test (trial keeps errors; we keep warnings too)."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.events: List[Dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, observer)

    def warnings(self) -> List[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]


class Harness:
    """An interchange on a MemoryReactorClock and managers connected to it."""

    def __init__(
        self,
        testcase: SynchronousTestCase,
        executor: Optional[HighThroughputExecutor] = None,
        result_sink: Optional[IResultSink] = None,
        **options: Any,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.results: List[Result] = []
        self.deliveries: List[int] = []
        self.sink = result_sink or CollectingSink(self._on_results)
        self.work_dir = testcase.mktemp()
        options.setdefault("heartbeat_period", 10.0)
        options.setdefault("heartbeat_threshold", 30.0)
        options.setdefault("batch_interval", 0.0)
        self.interchange = Interchange(
            self.reactor,
            self.work_dir,
            executor or HighThroughputExecutor(),
            self.sink,
            **options,
        )
        self.interchange.startService()
        self.factory = self.reactor.sslServers[-1][1]
        self.pumps: List[iosim.IOPump] = []
        testcase.addCleanup(self.cleanup, testcase)

    def _on_results(self, results: List[Result]) -> None:
        self.deliveries.append(len(results))
        self.results.extend(results)

    def connect(self, client: amp.AMP) -> Tuple[Any, iosim.IOPump]:
        server = self.factory.buildProtocol(None)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.reactor,
        )
        self.pumps.append(pump)
        pump.flush()
        return server, pump

    def register_details(self, **overrides: Any) -> Dict[str, Any]:
        details = dict(
            secret=self.secret,
            manager_id=str(uuid.uuid4()),
            block_id="block-0",
            hostname="node1",
            pid=4242,
            worker_count=2,
            prefetch_capacity=1,
            worker_type="no_container",
            container_type="RAW",
            **local_versions(),
        )
        details.update(overrides)
        return details

    @property
    def secret(self) -> str:
        return ConnectionInfo.read(self.interchange.info_file).secret

    def manager(self, **overrides: Any) -> FakeManager:
        """A registered FakeManager."""
        manager = FakeManager()
        self.connect(manager)
        answer = manager.callRemote(Register, **self.register_details(**overrides))
        self.flush()
        self.last_answer = answer.result
        return manager

    def submit_one(self) -> Task:
        """Submit a new task and let it reach the managers."""
        task = make_task()
        self.interchange.submit([task])
        self.flush()
        return task

    def flush(self) -> None:
        for _ in range(5):
            for pump in self.pumps:
                pump.flush()
            self.reactor.advance(0)

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.flush()

    def stop(self) -> Any:
        stopped = self.interchange.stopService()
        self.flush()
        return stopped

    def cleanup(self, testcase: SynchronousTestCase) -> None:
        if self.interchange.running:
            stopped = self.stop()
            for _ in range(100):
                if stopped.called:
                    break
                self.advance(1)
            testcase.successResultOf(stopped)
        testcase.assertEqual(self.reactor.getDelayedCalls(), [])


# ---------------------------------------------------------------------------
# The chunked AMP arguments


class Carry(amp.Command):
    arguments = [(b"blob", ChunkedBytes()), (b"items", ChunkedList()), (b"tasks", TaskBatch())]
    response = [(b"size", amp.Integer())]


class ChunkedArgumentTests(SynchronousTestCase):
    def roundtrip(self, argument: amp.Argument, value: Any) -> Tuple[Dict[bytes, bytes], Any]:
        strings: Dict[bytes, bytes] = {}
        argument.toBox(b"value", strings, {"value": value}, None)
        for key, data in strings.items():
            self.assertLessEqual(len(data), amp.MAX_VALUE_LENGTH)
            self.assertLessEqual(len(key), amp.MAX_KEY_LENGTH)
        objects: Dict[str, Any] = {}
        argument.fromBox(b"value", dict(strings), objects, None)
        return strings, objects["value"]

    def test_small_value_uses_one_key(self) -> None:
        strings, value = self.roundtrip(ChunkedBytes(), b"abc")
        self.assertEqual(strings, {b"value": b"abc"})
        self.assertEqual(value, b"abc")

    def test_boundaries(self) -> None:
        for size in (0, 1, MAX_CHUNK - 1, MAX_CHUNK, MAX_CHUNK + 1, 3 * MAX_CHUNK):
            data = os.urandom(size)
            strings, value = self.roundtrip(ChunkedBytes(), data)
            self.assertEqual(value, data, size)
            self.assertEqual(len(strings), max(1, -(-size // MAX_CHUNK)), size)

    def test_multi_megabyte(self) -> None:
        data = os.urandom(12 * 1024 * 1024 + 17)
        strings, value = self.roundtrip(ChunkedBytes(), data)
        self.assertEqual(value, data)
        self.assertIn(b"value.192", strings)

    def test_list(self) -> None:
        items = [b"", b"x", os.urandom(200_000), b"y" * MAX_CHUNK]
        _, value = self.roundtrip(ChunkedList(), items)
        self.assertEqual(value, items)

    def test_task_batch(self) -> None:
        tasks = [(str(uuid.uuid4()), b"buffer"), (str(uuid.uuid4()), os.urandom(100_000))]
        _, value = self.roundtrip(TaskBatch(), tasks)
        self.assertEqual(value, tasks)

    def test_task_batch_odd(self) -> None:
        with self.assertRaises(ValueError):
            TaskBatch().from_bytes(encode_list([b"one"]))

    def test_truncated_lists(self) -> None:
        data = encode_list([b"hello", b"world"])
        self.assertEqual(decode_list(data), [b"hello", b"world"])
        for cut in (1, 3, len(data) - 1):
            with self.assertRaises(ValueError):
                decode_list(data[:cut])

    def test_to_bytes_refuses_str(self) -> None:
        with self.assertRaises(TypeError):
            ChunkedBytes().to_bytes("text")

    def test_optional_missing(self) -> None:
        objects: Dict[str, Any] = {}
        ChunkedBytes(optional=True).fromBox(b"value", {}, objects, None)
        self.assertIsNone(objects["value"])
        strings: Dict[bytes, bytes] = {}
        ChunkedBytes(optional=True).toBox(b"value", strings, {"value": None}, None)
        self.assertEqual(strings, {})

    def test_over_amp_connection(self) -> None:
        """Megabytes through a real AMP parser and serializer."""
        received: Dict[str, Any] = {}

        class Server(amp.AMP):
            @Carry.responder
            def carry(self, blob: bytes, items: List[bytes], tasks: Any) -> Dict[str, Any]:
                received.update(blob=blob, items=items, tasks=tasks)
                return {"size": len(blob)}

        client, server, pump = iosim.connectedServerAndClient(Server, amp.AMP)
        blob = os.urandom(5 * 1024 * 1024)
        items = [os.urandom(3 * 1024 * 1024), b"small"]
        tasks = [(str(uuid.uuid4()), os.urandom(2 * 1024 * 1024))]
        answer = client.callRemote(Carry, blob=blob, items=items, tasks=tasks)
        pump.flush()
        self.assertEqual(self.successResultOf(answer), {"size": len(blob)})
        self.assertEqual(received, {"blob": blob, "items": items, "tasks": tasks})


class RateMeterTests(SynchronousTestCase):
    def test_rate(self) -> None:
        meter = RateMeter(window=0.1)
        meter.add(5, 0.0)  # starts the clock
        self.assertEqual(meter.rate, 0.0)
        meter.add(50, 0.05)
        self.assertEqual(meter.rate, 0.0)
        meter.add(50, 0.1)
        self.assertEqual(meter.rate, 1000.0)
        meter.add(0, 0.3)  # a quiet spell halves it
        self.assertEqual(meter.rate, 500.0)


class VersionTests(SynchronousTestCase):
    def test_versions_differ(self) -> None:
        mine = {"python_version": "3.11.7", "dill_version": "0.3.8"}
        self.assertFalse(
            versions_differ(mine, {"python_version": "3.11.2", "dill_version": "0.3.8"})
        )
        self.assertTrue(
            versions_differ(mine, {"python_version": "3.10.7", "dill_version": "0.3.8"})
        )
        self.assertTrue(
            versions_differ(mine, {"python_version": "3.11.7", "dill_version": "0.3.6"})
        )


class InfoFileTests(SynchronousTestCase):
    def test_roundtrip_private(self) -> None:
        path = self.mktemp()
        info = ConnectionInfo(
            "10.0.0.1",
            5000,
            "PEM",
            "s3cret",
            ManagerSettings(task_timeout=3.0, available_accelerators=["0", "1"]),
        )
        info.write(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(ConnectionInfo.read(path), info)
        self.assertNotIn("s3cret", repr(info))

    def test_errors(self) -> None:
        path = self.mktemp()
        with self.assertRaises(InfoFileError):
            ConnectionInfo.read(path)
        with open(path, "w") as f:
            f.write("not json")
        with self.assertRaises(InfoFileError):
            ConnectionInfo.read(path)
        with open(path, "w") as f:
            json.dump({"address": "x"}, f)
        self.assertRaisesRegex(InfoFileError, "port", ConnectionInfo.read, path)
        with open(path, "w") as f:
            json.dump(
                {"address": "x", "port": 1, "ca_cert_pem": "", "secret": "", "settings": 3}, f
            )
        self.assertRaisesRegex(InfoFileError, "settings", ConnectionInfo.read, path)
        with open(path, "w") as f:
            json.dump(
                {
                    "address": "x",
                    "port": 1,
                    "ca_cert_pem": "",
                    "secret": "",
                    "settings": {"prefetch_capacity": "many"},
                },
                f,
            )
        self.assertRaisesRegex(InfoFileError, "bad settings", ConnectionInfo.read, path)

    def test_unknown_settings_ignored(self) -> None:
        settings = ManagerSettings.from_json({"future_option": 1, "max_workers_per_node": None})
        self.assertEqual(settings, ManagerSettings())


# ---------------------------------------------------------------------------
# The interchange


class StartTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        harness = Harness(self)
        verifyObject(IInterchange, harness.interchange)
        verifyObject(ILoadSource, harness.interchange)

    def test_info_file_and_tls(self) -> None:
        harness = Harness(
            self,
            HighThroughputExecutor(
                address="10.1.2.3", prefetch_capacity=3, available_accelerators=["0"]
            ),
            task_timeout=7.0,
            result_size_limit=1234,
        )
        interchange = harness.interchange
        self.assertEqual(stat.S_IMODE(os.stat(interchange.info_file).st_mode), 0o600)
        info = ConnectionInfo.read(interchange.info_file)
        self.assertEqual((info.address, info.port), ("10.1.2.3", interchange.port))
        self.assertIn("BEGIN CERTIFICATE", info.ca_cert_pem)
        self.assertGreater(len(info.secret), 30)
        self.assertEqual(info.settings.task_timeout, 7.0)
        self.assertEqual(info.settings.result_size_limit, 1234)
        self.assertEqual(info.settings.prefetch_capacity, 3)
        self.assertEqual(info.settings.available_accelerators, ("0",))
        self.assertIsNone(info.settings.max_workers_per_node)
        port, _, options, _, interface = harness.reactor.sslServers[-1]
        self.assertEqual((port, interface), (0, "10.1.2.3"))
        self.assertIsNotNone(options)
        from cryptography import x509

        with open(os.path.join(harness.work_dir, "interchange-tls", "server.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("10.1.2.3", [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])
        self.assertEqual(
            interchange.manager_command("b1", "m1"),
            [
                sys.executable,
                "-m",
                "funcx_endpoint.manager",
                "--info-file",
                interchange.info_file,
                "--block-id",
                "b1",
                "--manager-id",
                "m1",
            ],
        )

    def test_host_name_address_listens_everywhere(self) -> None:
        harness = Harness(self, HighThroughputExecutor(address="login1.example.org"))
        self.assertEqual(harness.reactor.sslServers[-1][4], "")

    def test_port_range(self) -> None:
        class BusyReactor(MemoryReactorClock):
            def listenSSL(self, port: int, *args: Any, **kwargs: Any) -> Any:
                if port < 50002:
                    raise CannotListenError("", port, OSError("in use"))
                return super().listenSSL(port, *args, **kwargs)

        reactor = BusyReactor()
        interchange = Interchange(
            reactor,
            self.mktemp(),
            HighThroughputExecutor(interchange_port_range=(50000, 50003)),
            CollectingSink(),
        )
        interchange.startService()
        self.assertEqual(reactor.sslServers[-1][0], 50002)
        self.successResultOf(interchange.stopService())

        full = Interchange(
            reactor,
            self.mktemp(),
            HighThroughputExecutor(interchange_port_range=(50000, 50001)),
            CollectingSink(),
        )
        self.assertRaises(CannotListenError, full.startService)


class RegistrationTests(SynchronousTestCase):
    def test_register(self) -> None:
        harness = Harness(self, task_timeout=9.0)
        manager = harness.manager(manager_id="m1", worker_count=3, prefetch_capacity=2)
        answer = harness.last_answer
        self.assertEqual(answer["task_timeout"], 9.0)
        self.assertEqual(answer["heartbeat_period"], 10.0)
        self.assertEqual(answer["heartbeat_threshold"], 30.0)
        self.assertEqual(answer["result_size_limit"], 10 * 1024 * 1024)
        self.assertEqual(answer["python_version"], local_versions()["python_version"])
        [info] = harness.interchange.managers()
        self.assertIsInstance(info, ManagerInfo)
        self.assertEqual(
            (info.manager_id, info.block_id, info.hostname, info.worker_count),
            ("m1", "block-0", "node1", 3),
        )
        self.assertEqual((info.idle_workers, info.active_tasks), (3, 0))
        self.assertFalse(manager.lost)

    def test_wrong_secret(self) -> None:
        harness = Harness(self)
        log = CapturedLog(self)
        manager = FakeManager()
        harness.connect(manager)
        answer = outcome(manager.callRemote(Register, **harness.register_details(secret="guess")))
        harness.flush()
        answer[0].trap(RegistrationRefused)
        self.assertTrue(manager.lost)
        self.assertEqual(harness.interchange.managers(), [])
        self.assertTrue(any("wrong secret" in w for w in log.warnings()))
        self.assertFalse(any(harness.secret in w for w in log.warnings()))

    def test_registration_timeout(self) -> None:
        harness = Harness(self, registration_timeout=3.0)
        manager = FakeManager()
        harness.connect(manager)
        harness.advance(2.9)
        self.assertFalse(manager.lost)
        harness.advance(0.2)
        self.assertTrue(manager.lost)

    def test_unregistered_cannot_take_or_inject(self) -> None:
        harness = Harness(self)
        task = make_task()
        harness.interchange.submit([task])
        forged = FakeManager()
        harness.connect(forged)
        forged.send_results(Result.success(task.task_id, serialize("forged")))
        harness.flush()
        self.assertTrue(forged.lost)
        self.assertEqual(forged.batches, [])
        self.assertEqual(harness.results, [])
        self.assertEqual(harness.interchange.status()["pending_tasks"], 1)

    def test_unregistered_flood_dropped(self) -> None:
        """A stranger streaming one endless AMP box is dropped after 64 KiB."""
        harness = Harness(self)
        log = CapturedLog(self)
        stranger = FakeManager()
        server, pump = harness.connect(stranger)
        transport: Any = stranger.transport
        # AMP keys and values as they go on the wire: a box that never ends.
        chunk = b"".join(b"\x00\x03k%02d\x00\x05vvvvv" % (i % 100) for i in range(1000))
        sent = 0
        while not stranger.lost and sent < 1024 * 1024:
            transport.write(chunk)
            sent += len(chunk)
            pump.flush()
        self.assertTrue(stranger.lost)
        self.assertLessEqual(sent, MAX_UNREGISTERED_BYTES + 2 * len(chunk))
        self.assertLessEqual(server.unregistered_bytes, MAX_UNREGISTERED_BYTES + len(chunk))
        self.assertTrue(any("without registering" in w for w in log.warnings()))
        self.assertEqual(harness.interchange.managers(), [])

    def test_registered_manager_may_send_more(self) -> None:
        harness = Harness(self)
        manager = harness.manager(worker_count=1, prefetch_capacity=0)
        task = harness.submit_one()
        manager.answer(task.task_id, "y" * (4 * MAX_UNREGISTERED_BYTES))
        harness.flush()
        self.assertFalse(manager.lost)
        [result] = harness.results
        self.assertIsNone(result.error_details)

    def test_unregistered_asking_command(self) -> None:
        harness = Harness(self)
        forged = FakeManager()
        harness.connect(forged)
        beat = outcome(forged.callRemote(CancelTask, task_id="x"))  # any answered command
        harness.flush()
        self.assertIn("register first", beat[0].getErrorMessage())
        self.assertTrue(forged.lost)

    def test_duplicate_manager_id(self) -> None:
        harness = Harness(self)
        harness.manager(manager_id="same")
        second = FakeManager()
        harness.connect(second)
        answer = outcome(second.callRemote(Register, **harness.register_details(manager_id="same")))
        harness.flush()
        self.assertIn("connected already", answer[0].getErrorMessage())
        self.assertEqual(len(harness.interchange.managers()), 1)

    def test_register_twice_and_negative(self) -> None:
        harness = Harness(self)
        manager = harness.manager(manager_id="m1")
        again = outcome(manager.callRemote(Register, **harness.register_details(manager_id="m2")))
        harness.flush()
        again[0].trap(RegistrationRefused)
        bad = FakeManager()
        harness.connect(bad)
        refused = outcome(bad.callRemote(Register, **harness.register_details(worker_count=-1)))
        harness.flush()
        refused[0].trap(RegistrationRefused)

    def test_version_mismatch_accepted_with_warning(self) -> None:
        harness = Harness(self)
        log = CapturedLog(self)
        harness.manager(manager_id="old", python_version="3.8.10", dill_version="0.3.4")
        self.assertEqual(len(harness.interchange.managers()), 1)
        self.assertTrue(any("3.8.10" in w and "0.3.4" in w for w in log.warnings()))
        [mismatched] = harness.interchange.status()["mismatched_managers"]
        self.assertEqual(mismatched["manager_id"], "old")
        self.assertEqual(mismatched["python_version"], "3.8.10")
        self.assertEqual(harness.interchange.manager_versions()["old"]["dill_version"], "0.3.4")


class DispatchTests(SynchronousTestCase):
    def test_queued_until_a_manager_comes(self) -> None:
        harness = Harness(self)
        tasks = [make_task() for _ in range(3)]
        harness.interchange.submit(tasks)
        harness.flush()
        status = harness.interchange.status()
        self.assertEqual((status["pending_tasks"], status["outstanding_tasks"]), (3, {"RAW": 3}))
        manager = harness.manager()
        self.assertEqual(manager.task_ids, [t.task_id for t in tasks])
        self.assertEqual(len(manager.batches), 1)
        self.assertEqual(manager.batches[0][0][1], BUFFER.encode())

    def test_capacity(self) -> None:
        harness = Harness(self)
        manager = harness.manager(worker_count=2, prefetch_capacity=1)
        tasks = [make_task() for _ in range(10)]
        harness.interchange.submit(tasks)
        harness.flush()
        self.assertEqual(manager.task_ids, [t.task_id for t in tasks[:4]])
        status = harness.interchange.status()
        self.assertEqual(status["pending_tasks"], 6)
        self.assertEqual(status["outstanding_tasks"], {"RAW": 10})
        self.assertEqual(status["idle_workers"], 0)
        self.assertEqual(harness.interchange.outstanding_tasks(), 10)
        manager.answer(tasks[0].task_id)
        harness.flush()
        self.assertEqual(manager.task_ids, [t.task_id for t in tasks[:5]])

    def test_least_loaded_first(self) -> None:
        harness = Harness(self)
        first = harness.manager(manager_id="a", worker_count=4, prefetch_capacity=0)
        second = harness.manager(manager_id="b", worker_count=4, prefetch_capacity=0)
        tasks = [make_task() for _ in range(4)]
        harness.interchange.submit(tasks)
        harness.flush()
        self.assertEqual(len(first.task_ids), 2)
        self.assertEqual(len(second.task_ids), 2)
        for task_id in first.task_ids:
            first.answer(task_id)
        harness.flush()
        more = [make_task() for _ in range(3)]
        harness.interchange.submit(more)
        harness.flush()
        # first: 0 -> 3 tasks; second keeps its 2 (ties go to the older manager)
        self.assertEqual(len(first.task_ids), 5)
        self.assertEqual(len(second.task_ids), 2)

    def test_heterogeneous_managers_by_load_per_worker(self) -> None:
        harness = Harness(self)
        big = harness.manager(manager_id="big", worker_count=8, prefetch_capacity=0)
        small = harness.manager(manager_id="small", worker_count=1, prefetch_capacity=0)
        harness.interchange.submit([make_task() for _ in range(9)])
        harness.flush()
        self.assertEqual((len(big.task_ids), len(small.task_ids)), (8, 1))

    def test_container_types(self) -> None:
        from funcx_endpoint.wire import Container

        container = Container(uuid.uuid4(), "image")
        direct = Harness(self)
        raw = direct.manager()
        task = Task(uuid.uuid4(), BUFFER, container=container)
        direct.interchange.submit([task])
        direct.flush()
        self.assertEqual(raw.task_ids, [task.task_id])  # no containers: everything is RAW

        # config.py refuses container modes until containers exist; the
        # interchange's routing by container type is ready for them.
        executor = HighThroughputExecutor()
        executor.worker_mode = "docker"
        routed = Harness(self, executor)

        raw = routed.manager()
        routed.interchange.submit([task])
        routed.flush()
        self.assertEqual(raw.task_ids, [])
        self.assertEqual(
            routed.interchange.status()["outstanding_tasks"],
            {"RAW": 0, container.container_id: 1},
        )
        typed = routed.manager(container_type=container.container_id)
        self.assertEqual(typed.task_ids, [task.task_id])

    def test_duplicate_submission_ignored(self) -> None:
        harness = Harness(self)
        task = make_task()
        harness.interchange.submit([task, task])
        harness.interchange.submit([task])
        manager = harness.manager()
        self.assertEqual(manager.task_ids, [task.task_id])

    def test_batch_interval(self) -> None:
        harness = Harness(self, batch_interval=0.01)
        manager = harness.manager(worker_count=1, prefetch_capacity=10)
        harness.interchange.submit([make_task()])
        harness.flush()
        self.assertEqual(len(manager.batches), 1)  # after a quiet period: at once
        harness.interchange.submit([make_task()])
        harness.flush()
        # Starving (no more tasks than workers there): at once too.
        self.assertEqual(len(manager.batches), 2)
        harness.interchange.submit([make_task()])
        harness.flush()
        harness.interchange.submit([make_task()])
        harness.flush()
        self.assertEqual(len(manager.batches), 2)  # it has spare tasks: these wait
        harness.advance(0.01)
        self.assertEqual([len(b) for b in manager.batches], [1, 1, 2])

    def test_batches_wait_only_while_the_manager_has_work(self) -> None:
        harness = Harness(self, batch_interval=0.01)
        manager = harness.manager(worker_count=1, prefetch_capacity=200)
        first = [make_task() for _ in range(150)]
        harness.interchange.submit(first)
        harness.flush()
        for task in first[:145]:  # 1000 tasks/s
            harness.advance(0.001)
            manager.answer(task.task_id)
            harness.flush()
        harness.interchange.submit([make_task()])
        harness.flush()
        batches = len(manager.batches)
        harness.interchange.submit([make_task() for _ in range(3)])
        harness.flush()
        # Its 6 queued tasks last 6 ms, less than the wait: sent at once.
        self.assertEqual(len(manager.batches), batches + 1)
        harness.interchange.submit([make_task() for _ in range(20)])
        harness.flush()
        # 8 queued there (beyond its one worker) last 8 ms: at once again.
        self.assertEqual(len(manager.batches), batches + 2)
        harness.interchange.submit([make_task()])
        harness.flush()
        # Now it has work for 28 ms: this one waits for the interval.
        self.assertEqual(len(manager.batches), batches + 2)
        harness.advance(0.01)
        self.assertEqual(len(manager.batches), batches + 3)


class ResultTests(SynchronousTestCase):
    def test_result_with_transitions(self) -> None:
        harness = Harness(self)
        manager = harness.manager()
        task = harness.submit_one()
        sent = manager.answer(task.task_id, 42)
        harness.flush()
        [result] = harness.results
        self.assertEqual((result.task_id, result.data), (task.task_id, sent.data))
        states = [(t.state, t.actor) for t in result.task_statuses or []]
        self.assertEqual(
            states,
            [
                (TaskState.WAITING_FOR_NODES, ActorName.INTERCHANGE),
                (TaskState.WAITING_FOR_LAUNCH, ActorName.INTERCHANGE),
                (TaskState.RUNNING, ActorName.MANAGER),
                (TaskState.EXECUTION_START, ActorName.WORKER),
                (TaskState.EXECUTION_END, ActorName.WORKER),
            ],
        )
        # The result carries them: status reports don't repeat them.
        self.assertEqual(harness.interchange.pop_transitions(), {})

        self.assertEqual(harness.interchange.outstanding_tasks(), 0)
        [info] = harness.interchange.managers()
        self.assertEqual(info.idle_since, harness.reactor.seconds())

    def test_results_batched_per_turn(self) -> None:
        harness = Harness(self)
        manager = harness.manager(worker_count=4)
        tasks = [make_task() for _ in range(4)]
        harness.interchange.submit(tasks)
        harness.flush()
        for task in tasks:
            manager.answer(task.task_id)
        harness.flush()
        self.assertEqual(harness.deliveries, [4])

    def test_result_for_task_not_sent_there(self) -> None:
        harness = Harness(self)
        honest = harness.manager()
        other = harness.manager()
        task = harness.submit_one()
        holder, intruder = (honest, other) if honest.task_ids else (other, honest)
        intruder.answer(task.task_id, "injected")
        intruder.answer(str(uuid.uuid4()), "unknown")
        harness.flush()
        self.assertEqual(harness.results, [])
        holder.answer(task.task_id, "real")
        harness.flush()
        self.assertEqual(harness.results[0].data, serialize("real"))

    def test_unreadable_results_ignored(self) -> None:
        harness = Harness(self)
        log = CapturedLog(self)
        manager = harness.manager()
        manager.callRemote(SendResults, results=[b"garbage", pack(Task(uuid.uuid4(), "x"))])
        harness.flush()
        self.assertEqual(harness.results, [])
        self.assertFalse(manager.lost)
        self.assertEqual(len(log.warnings()), 2)

    def test_unreadable_result_of_a_held_task_answers_it(self) -> None:
        # A result naming its task but failing validation (a manager of another
        # version): the task ends with an error instead of waiting forever.
        harness = Harness(self)
        log = CapturedLog(self)
        manager = harness.manager()
        task = harness.submit_one()
        bad = (
            b'\x01{"message_type":"result","data":{"task_id":"%s","data":"x",'
            b'"error_details":null,"task_statuses":[{"state":"no-such-state",'
            b'"actor":"worker","timestamp":1}]}}' % str(task.task_id).encode()
        )
        manager.callRemote(SendResults, results=[bad])
        harness.flush()
        [result] = harness.results
        self.assertEqual(str(result.task_id), str(task.task_id))
        self.assertEqual(result.error_details.code, ErrorCode.VERSION_MISMATCH)
        self.assertIn("unknown task state 'no-such-state'", result.error_details.user_message)
        self.assertEqual(harness.interchange.outstanding_tasks(), 0)
        self.assertEqual(len(log.warnings()), 1)
        # A second copy finds nothing held and answers nothing more.
        manager.callRemote(SendResults, results=[bad])
        harness.flush()
        self.assertEqual(len(harness.results), 1)

    def test_malformed_batch_drops_manager(self) -> None:

        harness = Harness(self)
        log = CapturedLog(self)
        manager = harness.manager()
        box = amp.AmpBox(_command=b"SendResults", results=b"\x00\x00\x00\x09short")
        manager.sendBox(box)
        harness.flush()
        self.assertTrue(manager.lost)
        self.assertTrue(any("unreadable batch" in w for w in log.warnings()))

    def test_started_tasks_reach_the_dispatcher(self) -> None:
        # TasksStarted takes the fast path (no AMP dispatch): the task held
        # here is marked running at the manager's time.
        harness = Harness(self)
        manager = harness.manager()
        task = harness.submit_one()
        send_unanswered(manager, TasksStarted, started=[(str(task.task_id), 123)])
        harness.flush()
        noted = harness.interchange.dispatcher.outbox.pop_transitions()[str(task.task_id)]
        self.assertIn(
            (123, TaskState.RUNNING, ActorName.MANAGER),
            [(t.timestamp, t.state, t.actor) for t in noted],
        )
        self.assertFalse(manager.lost)

    def test_malformed_start_report_drops_manager(self) -> None:
        harness = Harness(self)
        log = CapturedLog(self)
        manager = harness.manager()
        manager.sendBox(amp.AmpBox(_command=b"TasksStarted", started=b"not json"))
        harness.flush()
        self.assertTrue(manager.lost)
        self.assertTrue(any("unreadable report of started tasks" in w for w in log.warnings()))

    def test_on_results_failure_logged(self) -> None:
        @implementer(IResultSink)
        class BrokenSink:
            def results_ready(self, results: List[PackedResult]) -> None:
                raise RuntimeError("boom")

        harness = Harness(self, result_sink=BrokenSink())
        task = make_task()
        harness.interchange.submit([task])
        harness.interchange.cancel(task.task_id)
        harness.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class LivenessTests(SynchronousTestCase):
    def test_heartbeats_sent(self) -> None:
        harness = Harness(self)
        manager = harness.manager()
        harness.advance(10)
        harness.advance(10)
        self.assertEqual(manager.heartbeats, 2)

    def test_silent_manager_lost_tasks_retried(self) -> None:
        harness = Harness(self)
        silent = harness.manager(manager_id="silent", worker_count=1, prefetch_capacity=0)
        task = harness.submit_one()
        self.assertEqual(silent.task_ids, [task.task_id])
        talker = harness.manager(manager_id="talker", worker_count=1, prefetch_capacity=0)
        for _ in range(4):
            harness.advance(10)
            talker.callRemote(Heartbeat)
        self.assertTrue(silent.lost)
        self.assertEqual(talker.task_ids, [task.task_id])
        self.assertEqual([m.manager_id for m in harness.interchange.managers()], ["talker"])
        talker.answer(task.task_id, "done")
        harness.flush()
        [result] = harness.results
        self.assertIsNone(result.error_details)
        states = [t.state for t in result.task_statuses or []][:4]
        self.assertEqual(
            states,
            [
                TaskState.WAITING_FOR_NODES,
                TaskState.WAITING_FOR_LAUNCH,
                TaskState.WAITING_FOR_NODES,
                TaskState.WAITING_FOR_LAUNCH,
            ],
        )

    def test_manager_lost_after_retries(self) -> None:
        harness = Harness(self)
        task = make_task()
        harness.interchange.submit([task])
        first = harness.manager(manager_id="m1", hostname="nodeA", block_id="b7")
        first.disconnect()
        harness.flush()
        self.assertEqual(harness.results, [])
        second = harness.manager(manager_id="m2", hostname="nodeB")
        self.assertEqual(second.task_ids, [task.task_id])
        harness.advance(40)  # second never speaks
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.MANAGER_LOST)
        message = result.error_details.user_message
        for expected in ("m2", "nodeB", "sent nothing for", "2 time(s)", task.task_id):
            self.assertIn(expected, message)
        self.assertEqual(harness.interchange.outstanding_tasks(), 0)

    def test_no_retries(self) -> None:
        harness = Harness(self, HighThroughputExecutor(max_retries_on_system_failure=0))
        task = make_task()
        harness.interchange.submit([task])
        manager = harness.manager(manager_id="m1", block_id="b3")
        manager.disconnect()
        harness.flush()
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.MANAGER_LOST)
        self.assertIn("connection closed", result.error_details.user_message)
        self.assertIn("block b3", result.error_details.user_message)

    def test_heartbeats_follow_registration(self) -> None:
        """Each manager's liveness check comes a period after its registration,
        not at one tick for all."""
        harness = Harness(self)
        early = harness.manager(manager_id="early")
        harness.advance(5)
        late = harness.manager(manager_id="late")
        harness.advance(5)
        self.assertEqual((early.heartbeats, late.heartbeats), (1, 0))
        harness.advance(5)
        self.assertEqual((early.heartbeats, late.heartbeats), (1, 1))
        harness.advance(10)
        self.assertEqual((early.heartbeats, late.heartbeats), (2, 2))

    def test_liveness_ticks_take_a_bounded_share(self) -> None:
        """Managers registered at once get their heartbeats over several ticks."""
        clock = Clock()
        registry = ManagerRegistry(
            clock,
            TaskDispatcher(clock, CollectingSink(), LeastLoadedRouting()),
            secret="s3cret",
            versions=local_versions(),
            answer={},
            heartbeat_period=10.0,
            heartbeat_threshold=30.0,
        )
        registry.start()
        links = [Link() for _ in range(LIVENESS_BATCH + 44)]
        for index, link in enumerate(links):
            registry.register(link, link.details(index))
        clock.advance(10)
        self.assertEqual(sum(link.heartbeats for link in links), LIVENESS_BATCH)
        clock.advance(1)
        self.assertEqual([link.heartbeats for link in links], [1] * len(links))
        clock.pump([1] * 10)
        self.assertEqual([link.heartbeats for link in links], [2] * len(links))
        clock.pump([1] * 35)  # silent for longer than the threshold: all lost
        self.assertEqual(registry.managers, {})
        self.assertTrue(all(link.dropped for link in links))
        registry.stop_accepting()
        self.assertEqual(clock.getDelayedCalls(), [])


class ScaleInTests(SynchronousTestCase):
    def test_shutdown_manager(self) -> None:
        harness = Harness(self)
        log = CapturedLog(self)
        leaving = harness.manager(manager_id="leaving", worker_count=1, prefetch_capacity=0)
        staying = harness.manager(manager_id="staying", worker_count=1, prefetch_capacity=0)
        self.assertTrue(harness.interchange.shutdown_manager("leaving"))
        self.assertFalse(harness.interchange.shutdown_manager("nobody"))
        harness.flush()
        self.assertEqual(leaving.shutdowns, ["scaling in"])
        tasks = [make_task(), make_task()]
        harness.interchange.submit(tasks)
        harness.flush()
        self.assertEqual(leaving.task_ids, [])
        self.assertEqual(staying.task_ids, [tasks[0].task_id])
        leaving.disconnect()
        harness.flush()
        self.assertEqual([m.manager_id for m in harness.interchange.managers()], ["staying"])
        self.assertEqual(log.warnings(), [])

    def test_shutdown_busy_manager_retries_its_tasks(self) -> None:
        harness = Harness(self)
        busy = harness.manager(manager_id="busy", worker_count=1, prefetch_capacity=0)
        task = harness.submit_one()
        harness.interchange.shutdown_manager("busy")
        harness.flush()
        busy.disconnect()
        harness.flush()
        other = harness.manager(manager_id="other")
        self.assertEqual(other.task_ids, [task.task_id])

    def test_retired_busy_manager_costs_no_attempt(self) -> None:
        """Tasks lost with a manager the endpoint retired are queued again, free."""
        harness = Harness(self, HighThroughputExecutor(max_retries_on_system_failure=0))
        busy = harness.manager(manager_id="busy", worker_count=1, prefetch_capacity=0)
        task = harness.submit_one()
        self.assertEqual(busy.task_ids, [task.task_id])
        self.assertTrue(harness.interchange.retire_block("block-0", "scaling in", False))
        busy.disconnect()
        harness.flush()
        self.assertEqual(harness.results, [])  # not ManagerLost, although no retries allowed
        other = harness.manager(manager_id="other", block_id="block-1")
        self.assertEqual(other.task_ids, [task.task_id])
        record = harness.interchange.dispatcher.record(task.task_id)
        assert record is not None
        self.assertEqual(record.attempts, 1)
        other.disconnect()  # a real loss now: that one counts
        harness.flush()
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.MANAGER_LOST)

    def test_retire_block(self) -> None:
        harness = Harness(self)
        a = harness.manager(manager_id="a", block_id="7", worker_count=1, prefetch_capacity=0)
        b = harness.manager(manager_id="b", block_id="7", worker_count=1, prefetch_capacity=0)
        c = harness.manager(manager_id="c", block_id="8", worker_count=1, prefetch_capacity=0)
        task = harness.submit_one()
        self.assertEqual(a.task_ids, [task.task_id])  # the first registered of equals
        # Busy: refused with only_idle, nothing changes.
        self.assertFalse(harness.interchange.retire_block("7", "scaling in", True))
        harness.flush()
        self.assertEqual((a.shutdowns, b.shutdowns), ([], []))
        a.answer(task.task_id)
        harness.flush()
        self.assertTrue(harness.interchange.retire_block("7", "scaling in: idle", True))
        harness.flush()
        self.assertEqual(a.shutdowns, ["scaling in: idle"])
        self.assertEqual(b.shutdowns, ["scaling in: idle"])
        self.assertEqual(c.shutdowns, [])
        more = [make_task(), make_task()]
        harness.interchange.submit(more)
        harness.flush()
        self.assertEqual(a.task_ids, [task.task_id])
        self.assertEqual(b.task_ids, [])
        self.assertEqual(c.task_ids, [more[0].task_id])
        # A manager of the block that registers late gets nothing and is told to go.
        late = harness.manager(manager_id="late", block_id="7")
        self.assertEqual(late.task_ids, [])
        self.assertEqual(late.shutdowns, ["scaling in: idle"])
        # A block without managers yet: its managers are retired when they come.
        self.assertTrue(harness.interchange.retire_block("9", "scaling in", True))
        later = harness.manager(manager_id="later", block_id="9")
        self.assertEqual(later.task_ids, [])
        self.assertEqual(later.shutdowns, ["scaling in"])
        counts = {m.manager_id: m.tasks_completed for m in harness.interchange.managers()}
        self.assertEqual(counts["a"], 1)
        self.assertEqual(counts["c"], 0)


class QuittingTests(SynchronousTestCase):
    def test_quitting_manager_says_why(self) -> None:
        harness = Harness(self, HighThroughputExecutor(max_retries_on_system_failure=0))
        log = CapturedLog(self)
        manager = harness.manager(manager_id="m1", worker_count=1, prefetch_capacity=1)
        first = make_task()
        harness.interchange.submit([first])
        harness.flush()
        self.assertEqual(manager.task_ids, [first.task_id])
        manager.callRemote(Quitting, reason="workers cannot start: ImportError: no dill")
        harness.flush()
        self.assertTrue(any("is quitting" in w and "no dill" in w for w in log.warnings()))
        later = make_task()
        harness.interchange.submit([later])
        harness.flush()
        self.assertEqual(manager.task_ids, [first.task_id])  # nothing more for it
        manager.disconnect()
        harness.flush()
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.task_id, first.task_id)
        self.assertEqual(result.error_details.code, ErrorCode.MANAGER_LOST)
        self.assertIn(
            "it quit: workers cannot start: ImportError: no dill", result.error_details.user_message
        )
        self.assertEqual(harness.interchange.status()["pending_tasks"], 1)

    def test_quitting_unregistered_is_refused(self) -> None:
        harness = Harness(self)
        stranger = FakeManager()
        harness.connect(stranger)
        stranger.callRemote(Quitting, reason="x")
        harness.flush()
        self.assertTrue(stranger.lost)


class CancelTests(SynchronousTestCase):
    def test_cancel_queued(self) -> None:
        harness = Harness(self)
        task = make_task()
        harness.interchange.submit([task])
        self.assertTrue(harness.interchange.cancel(task.task_id))
        self.assertFalse(harness.interchange.cancel(task.task_id))
        self.assertFalse(harness.interchange.cancel(str(uuid.uuid4())))
        harness.flush()
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.TASK_CANCELLED)
        self.assertEqual(harness.interchange.status()["pending_tasks"], 0)
        manager = harness.manager()
        self.assertEqual(manager.task_ids, [])

    def test_cancel_at_manager(self) -> None:
        harness = Harness(self)
        manager = harness.manager(worker_count=1, prefetch_capacity=0)
        first, second = make_task(), make_task()
        harness.interchange.submit([first, second])
        harness.flush()
        self.assertTrue(harness.interchange.cancel(first.task_id))
        harness.flush()
        self.assertEqual(manager.cancelled, [first.task_id])
        self.assertEqual(manager.task_ids, [first.task_id, second.task_id])
        manager.answer(first.task_id, "too late")
        harness.flush()
        [result] = harness.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.TASK_CANCELLED)
        self.assertIn("at manager", result.error_details.user_message)

    def test_cancel_before_sent(self) -> None:
        harness = Harness(self, batch_interval=1.0)
        manager = harness.manager(worker_count=1, prefetch_capacity=5)
        harness.interchange.submit([make_task(), make_task()])
        harness.flush()
        waiting = make_task()
        harness.interchange.submit([waiting])
        harness.flush()
        self.assertTrue(harness.interchange.cancel(waiting.task_id))
        harness.advance(1.0)
        self.assertEqual(manager.cancelled, [])
        self.assertNotIn(waiting.task_id, manager.task_ids)

    def test_cancel_when_connection_breaks(self) -> None:
        harness = Harness(self)
        log = CapturedLog(self)
        manager = harness.manager()
        task = harness.submit_one()
        harness.interchange.cancel(task.task_id)
        manager.disconnect()  # before the cancel arrives
        harness.flush()
        self.assertEqual(len(harness.results), 1)
        self.assertTrue(any("Cancelling task" in w for w in log.warnings()))


class StopTests(SynchronousTestCase):
    def test_withdraw_unstarted(self) -> None:
        harness = Harness(self)
        manager = harness.manager(worker_count=1, prefetch_capacity=0)
        tasks = [make_task() for _ in range(3)]
        harness.interchange.submit(tasks)
        harness.flush()
        withdrawn = harness.interchange.withdraw_unstarted()
        self.assertEqual(withdrawn, [t.task_id for t in tasks[1:]])
        self.assertRaises(RuntimeError, harness.interchange.submit, [make_task()])
        manager.answer(tasks[0].task_id)
        harness.flush()
        self.assertEqual([r.task_id for r in harness.results], [tasks[0].task_id])
        self.assertEqual(harness.interchange.outstanding_tasks(), 0)

    def test_withdraw_takes_unsent_batches(self) -> None:
        harness = Harness(self, batch_interval=1.0)
        manager = harness.manager(worker_count=1, prefetch_capacity=5)
        harness.interchange.submit([make_task(), make_task()])
        harness.flush()
        held = make_task()
        harness.interchange.submit([held])
        harness.flush()
        self.assertEqual(harness.interchange.withdraw_unstarted(), [held.task_id])
        harness.advance(1.0)
        self.assertNotIn(held.task_id, manager.task_ids)
        self.assertEqual(harness.interchange.outstanding_tasks(), 2)

    def test_stop_waits_for_managers(self) -> None:
        harness = Harness(self)
        manager = harness.manager()
        unregistered = FakeManager()
        harness.connect(unregistered)
        stopped = harness.stop()
        self.assertEqual(manager.shutdowns, ["the endpoint is stopping"])
        self.assertTrue(unregistered.lost)
        self.assertNoResult(stopped)
        manager.disconnect()
        harness.flush()
        self.successResultOf(stopped)
        self.successResultOf(harness.interchange.stopService())  # again: at once

    def test_stop_grace(self) -> None:
        harness = Harness(self, stop_grace_period=5.0)
        log = CapturedLog(self)
        manager = harness.manager()
        harness.submit_one()
        stopped = harness.stop()
        harness.advance(4.9)
        self.assertNoResult(stopped)
        harness.advance(0.2)
        self.successResultOf(stopped)
        self.assertTrue(manager.lost)
        self.assertTrue(any("did not disconnect" in w for w in log.warnings()))
        self.assertEqual(harness.results, [])  # left to the broker

    def test_connections_refused_while_stopping(self) -> None:
        harness = Harness(self)
        manager = harness.manager()
        stopped = harness.stop()
        late = FakeManager()
        harness.connect(late)
        self.assertTrue(late.lost)
        manager.disconnect()
        harness.flush()
        self.successResultOf(stopped)

    def test_stop_before_start(self) -> None:
        interchange = Interchange(
            MemoryReactorClock(), self.mktemp(), HighThroughputExecutor(), CollectingSink()
        )
        self.successResultOf(interchange.stopService())

    def test_when_managers(self) -> None:
        harness = Harness(self)
        waiting = harness.interchange.when_managers(2)
        harness.manager()
        self.assertNoResult(waiting)
        harness.manager()
        self.successResultOf(waiting)
        self.successResultOf(harness.interchange.when_managers(1))


def counted_status(interchange: Interchange) -> Dict[str, Any]:
    """status() as the interchange computed it before it kept totals: by
    looking at every manager."""
    managers = list(interchange.registry.managers.values())
    dispatcher = interchange.dispatcher
    outstanding = dispatcher.queued()
    idle = 0
    for manager in managers:
        held = dispatcher.held_by(manager)
        outstanding[manager.container_type] = outstanding.get(manager.container_type, 0) + held
        idle += max(0, manager.worker_count - held)
    return {
        "managers": len(managers),
        "total_workers": sum(m.worker_count for m in managers),
        "idle_workers": idle,
        "pending_tasks": sum(dispatcher.queued().values()),
        "outstanding_tasks": outstanding,
        "mismatched_managers": [
            dict(manager_id=m.manager_id, hostname=m.hostname, **m.versions)
            for m in managers
            if m.version_mismatch
        ],
    }


class StatusTotalsTests(SynchronousTestCase):
    def test_totals_match_a_count_of_every_manager(self) -> None:
        from funcx_endpoint.wire import Container

        executor = HighThroughputExecutor()
        executor.worker_mode = "docker"  # tasks typed by container
        harness = Harness(self, executor)
        interchange, registry = harness.interchange, harness.interchange.registry
        container = Container(uuid.uuid4(), "image")

        def check() -> None:
            harness.flush()
            self.assertEqual(interchange.status(), counted_status(interchange))
            for block in ("b1", "b2", "b3"):
                self.assertEqual(
                    registry.of_block(block),
                    [m for m in registry.managers.values() if m.block_id == block],
                )

        check()
        raw = harness.manager(manager_id="raw", block_id="b1", worker_count=2, prefetch_capacity=1)
        typed = harness.manager(
            manager_id="typed",
            block_id="b2",
            worker_count=3,
            prefetch_capacity=0,
            container_type=container.container_id,
        )
        old = harness.manager(
            manager_id="old", block_id="b1", worker_count=1, python_version="3.8.10"
        )
        check()
        raw_tasks = [make_task() for _ in range(8)]
        typed_tasks = [Task(uuid.uuid4(), BUFFER, container=container) for _ in range(5)]
        interchange.submit(raw_tasks + typed_tasks)
        check()
        raw.answer(raw.task_ids[0])
        typed.answer(typed.task_ids[0])
        check()
        interchange.cancel(typed.task_ids[1])
        interchange.cancel(raw_tasks[-1].task_id)  # still queued
        check()
        self.assertTrue(interchange.retire_block("b1", "scaling in", only_idle=False))
        check()
        old.disconnect()
        check()
        typed.callRemote(Quitting, reason="going")
        check()
        late = harness.manager(manager_id="late", block_id="b3", worker_count=4)
        check()
        for manager in (raw, typed, late):
            for task_id in manager.task_ids:
                manager.answer(task_id)
        check()
        raw.disconnect()
        typed.disconnect()
        check()
        self.assertEqual(interchange.status()["managers"], 1)
        self.assertEqual(interchange.status()["mismatched_managers"], [])


class StatusTransitionsTests(SynchronousTestCase):
    def test_reports_carry_only_tasks_in_flight(self) -> None:
        harness = Harness(self)
        manager = harness.manager(worker_count=1, prefetch_capacity=0)
        first, second = make_task(), make_task()
        harness.interchange.submit([first, second])
        harness.flush()
        manager.answer(first.task_id, 1)
        harness.flush()
        popped = harness.interchange.pop_transitions()
        # The answered task's transitions went with its result; the other
        # task is still in flight and its transitions are reported.
        self.assertNotIn(first.task_id, popped)
        self.assertIn(second.task_id, popped)
        self.assertEqual(popped[second.task_id][0].state, TaskState.WAITING_FOR_NODES)


class BlockFailureTests(SynchronousTestCase):
    """What the interchange does for the scaling when blocks fail."""

    def test_siblings_of_a_lost_manager_get_no_new_task_for_a_moment(self) -> None:
        """scancel ends a block's managers one after the other: a retried task
        does not go to a sibling that is about to go too."""
        harness = Harness(self)
        a = harness.manager(manager_id="a", block_id="7", worker_count=1, prefetch_capacity=0)
        b = harness.manager(manager_id="b", block_id="7", worker_count=1, prefetch_capacity=0)
        task = harness.submit_one()
        self.assertEqual(a.task_ids, [task.task_id])
        a.disconnect()
        harness.flush()
        self.assertEqual(b.task_ids, [])  # held back
        other = harness.manager(manager_id="c", block_id="8", worker_count=1, prefetch_capacity=0)
        self.assertEqual(other.task_ids, [task.task_id])  # another block: at once
        more = make_task()
        harness.interchange.submit([more])
        harness.advance(1.9)
        self.assertEqual(b.task_ids, [])
        harness.advance(0.1)  # block_holdoff (2 s) over: b is fine after all
        self.assertEqual(b.task_ids, [more.task_id])

    def test_departures(self) -> None:
        harness = Harness(self)
        a = harness.manager(manager_id="a", block_id="7")
        harness.manager(manager_id="b", block_id="7")
        c = harness.manager(manager_id="c", block_id="8")
        self.assertEqual(harness.interchange.departures(), {})
        a.disconnect()
        c.disconnect()
        harness.flush()
        self.assertEqual(harness.interchange.departures(), {"7": 1, "8": 1})

    def test_fail_waiting(self) -> None:
        harness = Harness(self)
        busy = harness.manager(manager_id="busy", worker_count=1, prefetch_capacity=0)
        tasks = [make_task() for _ in range(3)]
        harness.interchange.submit(tasks)
        harness.flush()
        self.assertEqual(busy.task_ids, [tasks[0].task_id])
        failed = harness.interchange.fail_waiting("BlockStartFailed", "no block could start")
        harness.flush()
        self.assertEqual(failed, 2)
        self.assertEqual(
            sorted(r.task_id for r in harness.results), sorted(t.task_id for t in tasks[1:])
        )
        for result in harness.results:
            assert result.error_details is not None
            self.assertEqual(result.error_details.code, "BlockStartFailed")
            self.assertEqual(
                result.data, f"Task {result.task_id} was not run: no block could start"
            )
            states = [t.state for t in result.task_statuses or []]
            self.assertEqual(states, [TaskState.WAITING_FOR_NODES])
        self.assertEqual(harness.interchange.outstanding_tasks(), 1)  # the one at a manager
        self.assertEqual(harness.interchange.fail_waiting("x", "y"), 0)
