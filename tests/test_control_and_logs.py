"""The control socket (real UNIX socket) and the daemon's log files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
from typing import Any, Dict, List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from funcx_endpoint.endpoint import logs
from funcx_endpoint.endpoint.control import ControlError, ask, control_service


class ControlSocketTests(TestCase):
    def setUp(self) -> None:
        # Short path: a UNIX socket path must fit in 108 bytes.
        directory = tempfile.mkdtemp(prefix="fx-ctl-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.path = os.path.join(directory, "c.sock")
        self.calls = 0

        async def status() -> dict:
            self.calls += 1
            return {"pid": os.getpid(), "calls": self.calls}

        def broken() -> dict:
            raise RuntimeError("cannot")

        self.service = control_service(reactor, self.path, {"status": status, "broken": broken})
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @inlineCallbacks
    def test_status(self):
        answer = yield deferToThread(ask, self.path, "status")
        self.assertEqual(answer, {"pid": os.getpid(), "calls": 1})
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    @inlineCallbacks
    def test_unknown_command(self):
        with self.assertRaises(ControlError) as cm:
            yield deferToThread(ask, self.path, "explode")
        self.assertIn("'command' one of ['broken', 'status']", str(cm.exception))

    @inlineCallbacks
    def test_failing_command(self):
        with self.assertRaises(ControlError) as cm:
            yield deferToThread(ask, self.path, "broken")
        self.assertIn("broken failed: cannot", str(cm.exception))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_garbage_then_good_request_on_one_connection(self):
        def talk() -> list:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(self.path)
                s.sendall(b"not json\n" + json.dumps({"command": "status"}).encode() + b"\n")
                data = b""
                while data.count(b"\n") < 2:
                    data += s.recv(65536)
            return [json.loads(line) for line in data.splitlines()]

        first, second = yield deferToThread(talk)
        self.assertFalse(first["ok"])
        self.assertTrue(second["ok"])

    def test_no_daemon(self) -> None:
        with self.assertRaises(ControlError) as cm:
            ask(self.path + ".missing", "status")
        self.assertIn("cannot reach the daemon", str(cm.exception))


_log = Logger(namespace="funcx_endpoint.test")


class LogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = _log

    def observe(self, settings: logs.LogSettings):
        observer = logs.observer_for(settings)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return observer

    def test_text_lines(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "endpoint.log")
        self.observe(logs.LogSettings(path=path))
        self.log.info("task {task_id} done", task_id="t-1")
        self.log.debug("hidden")
        with open(path) as f:
            text = f.read()
        self.assertRegex(
            text,
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[info\] "
            r"\[funcx_endpoint.test\] task t-1 done\n$",
        )
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_debug_level(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "endpoint.log")
        self.observe(logs.LogSettings(path=path, debug=True))
        self.log.debug("visible {n}", n=1)
        with open(path) as f:
            self.assertIn("[debug] [funcx_endpoint.test] visible 1", f.read())

    def test_json_lines_keep_fields(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "endpoint.log")
        self.observe(logs.LogSettings(path=path, json=True))
        self.log.warn("manager {manager_id} lost", manager_id="m-7")
        with open(path) as f:
            [line] = f.read().splitlines()
        event = json.loads(line)
        self.assertEqual(event["manager_id"], "m-7")
        self.assertEqual(event["text"], "manager m-7 lost")
        self.assertEqual(event["log_namespace"], "funcx_endpoint.test")
        self.assertEqual(event["log_level"]["name"], "warn")

    def test_failure_has_traceback(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "endpoint.log")
        self.observe(logs.LogSettings(path=path))
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            self.log.failure("computing")
        self.flushLoggedErrors(ZeroDivisionError)
        with open(path) as f:
            text = f.read()
        self.assertIn("[critical] [funcx_endpoint.test] computing", text)
        self.assertIn("ZeroDivisionError", text)

    def test_rotation_keeps_backup_count(self) -> None:
        directory = os.path.abspath(self.mktemp())
        path = os.path.join(directory, "endpoint.log")
        self.observe(logs.LogSettings(path=path, max_bytes=1024, backup_count=2))
        for i in range(200):
            self.log.info("line {i} {pad}", i=i, pad="x" * 50)
        names = sorted(os.listdir(directory))
        self.assertEqual(names, ["endpoint.log", "endpoint.log.1", "endpoint.log.2"])
        for name in names:
            self.assertLessEqual(os.path.getsize(os.path.join(directory, name)), 1024 + 200)
        with open(path) as f:
            self.assertIn("line 199", f.read())

    def test_make_observer_uses_configured_settings(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "x.log")
        self.addCleanup(logs.configure, logs.LogSettings())
        logs.configure(logs.LogSettings(path=path))
        observer = logs.make_observer()
        observer(
            {"log_format": "hello", "log_level": LogLevel.info, "log_namespace": "n", "log_time": 0}
        )
        with open(path) as f:
            self.assertIn("[info] [n] hello", f.read())


@implementer(IReactorFromThreads)
class FakeThreadsReactor:
    """``callFromThread`` that the test runs itself."""

    def __init__(self) -> None:
        self.calls: List[Tuple[Any, Tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append((f, args))


class PythonLoggingBridgeTests(SynchronousTestCase):
    """Records of Python's logging (Parsl's providers) go to the endpoint's log."""

    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.reactor = FakeThreadsReactor()
        self.root = logging.getLogger()
        self.saved_level = self.root.level
        self.root.setLevel(logging.WARNING)
        self.addCleanup(self.root.setLevel, self.saved_level)
        self.bridge = logs.PythonLoggingBridge(self.reactor, logging.INFO, self.events.append)

    def texts(self) -> List[Tuple[str, str, str]]:
        return [(e["log_namespace"], e["log_level"].name, formatEvent(e)) for e in self.events]

    def test_records_become_events_in_their_logger_namespace(self) -> None:
        self.bridge.install()
        try:
            self.assertEqual(self.root.level, logging.INFO)
            slurm = logging.getLogger("parsl.providers.slurm.slurm")
            slurm.error("Submit command failed")
            slurm.error("Retcode:%s STDOUT:%s STDERR:%s", 1, "", "sbatch: error: {bad} partition")
            logging.getLogger("parsl.channels").info("Submitted job %s", 7)
            logging.getLogger("parsl.channels").warning("sacct failed")
            logging.getLogger("parsl.channels").critical("gone")
            logging.getLogger("parsl.channels").debug("Executing sacct")  # below INFO
        finally:
            self.bridge.remove()
        self.assertEqual(
            self.texts(),
            [
                ("parsl.providers.slurm.slurm", "error", "Submit command failed"),
                (
                    "parsl.providers.slurm.slurm",
                    "error",
                    "Retcode:1 STDOUT: STDERR:sbatch: error: {bad} partition",
                ),
                ("parsl.channels", "info", "Submitted job 7"),
                ("parsl.channels", "warn", "sacct failed"),
                ("parsl.channels", "critical", "gone"),
            ],
        )
        # Stopped: the handler and the level are as they were.
        self.assertNotIn(self.bridge.handler, self.root.handlers)
        self.assertEqual(self.root.level, logging.WARNING)
        logging.getLogger("parsl").error("after the stop")
        self.assertEqual(len(self.events), 5)

    def test_traceback(self) -> None:
        self.bridge.install()
        self.addCleanup(self.bridge.remove)
        try:
            raise OSError("sbatch: not found")
        except OSError:
            logging.getLogger("parsl.providers").exception("Submit failed")
        [(namespace, level, text)] = self.texts()
        self.assertEqual((namespace, level), ("parsl.providers", "error"))
        self.assertIn("Submit failed\nTraceback (most recent call last):", text)
        self.assertIn("OSError: sbatch: not found", text)

    def test_records_of_other_threads_go_through_the_reactor_thread(self) -> None:
        self.bridge.install()
        self.addCleanup(self.bridge.remove)
        thread = threading.Thread(
            target=logging.getLogger("parsl.providers").warning, args=("from a thread",)
        )
        thread.start()
        thread.join()
        self.assertEqual(self.events, [])
        [(f, args)] = self.reactor.calls
        f(*args)
        self.assertEqual(self.texts(), [("parsl.providers", "warn", "from a thread")])

    def test_lower_level_is_kept(self) -> None:
        self.root.setLevel(logging.DEBUG)
        self.bridge.install()
        self.addCleanup(self.bridge.remove)
        self.assertEqual(self.root.level, logging.DEBUG)

    def test_make_observer_installs_it_for_the_daemon(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "endpoint.log")
        self.addCleanup(logs.configure, logs.LogSettings())
        logs.configure(logs.LogSettings(path=path, python_logging=True))
        observer = logs.make_observer()
        bridge = logs._bridge
        assert bridge is not None
        self.addCleanup(setattr, logs, "_bridge", None)
        self.addCleanup(bridge.remove)
        self.assertIn(bridge.handler, self.root.handlers)
        logs.make_observer()  # again: still the one bridge
        self.assertIs(logs._bridge, bridge)
        self.assertEqual(
            [h for h in self.root.handlers if isinstance(h, logs.TwistedLogHandler)],
            [bridge.handler],
        )
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        logging.getLogger("parsl.providers.slurm.slurm").info("Submitted batch job 7")
        with open(path) as f:
            self.assertIn("[info] [parsl.providers.slurm.slurm] Submitted batch job 7", f.read())

    def test_not_for_other_daemons(self) -> None:
        self.addCleanup(logs.configure, logs.LogSettings())
        logs.configure(logs.LogSettings(path=os.path.abspath(self.mktemp())))
        logs.make_observer()
        self.assertIsNone(logs._bridge)

    def test_levels(self) -> None:
        self.assertEqual(logs.twisted_level(logging.DEBUG), LogLevel.debug)
        self.assertEqual(logs.twisted_level(5), LogLevel.debug)
        self.assertEqual(logs.twisted_level(logging.INFO), LogLevel.info)
        self.assertEqual(logs.twisted_level(logging.WARNING), LogLevel.warn)
        self.assertEqual(logs.twisted_level(logging.ERROR), LogLevel.error)
        self.assertEqual(logs.twisted_level(logging.CRITICAL), LogLevel.critical)
