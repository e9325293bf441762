"""The control socket (real UNIX socket) and the daemon's log files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

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
