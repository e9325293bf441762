"""The daemon's service tree: ordered start, readiness, failure, ordered stop."""

from __future__ import annotations

import json
import os
import socket
from typing import Any, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from funcx_endpoint.endpoint import service as service_module
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.endpoint.service import (
    EndpointService,
    IReadyPart,
    IStatusPart,
    Phase,
    StartupError,
    StartupReporter,
)


class FakeReactor:
    running = True

    def __init__(self) -> None:
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1


@implementer(IReadyPart, IStatusPart)
class Part(Service):
    def __init__(
        self,
        name: str,
        journal: List[str],
        ready: Optional[Deferred] = None,
        stopped: Optional[Deferred] = None,
    ) -> None:
        self.setName(name)
        self.journal = journal
        self.ready = ready
        self.stopped = stopped

    def startService(self) -> None:
        super().startService()
        self.journal.append(f"start {self.name}")

    def when_ready(self) -> Deferred:
        return self.ready if self.ready is not None else succeed(None)

    def stopService(self) -> Any:
        super().stopService()
        self.journal.append(f"stop {self.name}")
        return self.stopped

    def ready_info(self) -> dict:
        return {f"{self.name}_info": 1}

    def status_fields(self) -> dict:
        return {f"{self.name}_status": "ok"}


class EndpointServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        config_dir = os.path.abspath(self.mktemp())
        self.ep = EndpointDir(config_dir, "t")
        os.makedirs(self.ep.path)
        self.reactor = FakeReactor()
        read_fd, write_fd = os.pipe()
        self.read_fd = read_fd
        self.addCleanup(os.close, read_fd)
        self.service = EndpointService(self.ep, self.reactor, StartupReporter(write_fd))
        self.journal: List[str] = []
        self.addCleanup(setattr, service_module.exit_status, "code", 0)

    def report(self) -> dict:
        data = os.read(self.read_fd, 65536)
        self.assertTrue(data.endswith(b"\n"))
        # The reporter closed its end: nothing more will come.
        self.assertEqual(os.read(self.read_fd, 10), b"")
        return json.loads(data)

    def test_parts_start_in_order_each_after_ready(self) -> None:
        first_ready: Deferred = Deferred()
        self.service.add(Part("a", self.journal, ready=first_ready))
        self.service.add(Part("b", self.journal))
        self.service.startService()
        self.assertEqual(self.journal, ["start a"])
        self.assertEqual(self.service.phase, Phase.STARTING)
        first_ready.callback(None)
        self.assertEqual(self.journal, ["start a", "start b"])
        self.assertEqual(self.service.phase, Phase.RUNNING)
        report = self.report()
        self.assertEqual(report["state"], "ready")
        self.assertEqual(report["pid"], os.getpid())
        self.assertEqual(report["a_info"], 1)
        self.assertEqual(report["b_info"], 1)
        # The daemon recorded its pid (and no own session: this is no daemon).
        self.assertEqual(self.ep.daemon_session(os.getpid()), None)
        self.assertTrue(os.path.exists(self.ep.daemon_info_file))
        # ...and the host it runs on: another login node sharing the directory
        # sees it runs elsewhere.
        with open(self.ep.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        self.assertEqual(self.ep.daemon_host(), socket.gethostname())
        self.assertIsNone(self.ep.runs_elsewhere())

    def test_stop_in_reverse_waiting_for_each(self) -> None:
        b_stopped: Deferred = Deferred()
        self.service.add(Part("a", self.journal))
        self.service.add(Part("b", self.journal, stopped=b_stopped))
        self.service.startService()
        d = self.service.stopService()
        self.assertEqual(self.journal[-1], "stop b")
        self.assertNoResult(d)
        b_stopped.callback(None)
        self.successResultOf(d)
        self.assertEqual(self.journal, ["start a", "start b", "stop b", "stop a"])
        self.assertEqual(self.service.phase, Phase.STOPPED)
        self.assertFalse(os.path.exists(self.ep.daemon_info_file))

    def test_startup_error_is_reported_with_exit_code(self) -> None:
        ready: Deferred = Deferred()
        self.service.add(Part("a", self.journal, ready=ready))
        self.service.add(Part("b", self.journal))
        self.service.startService()
        ready.errback(StartupError("service refused: locked", exit_code=69))
        report = self.report()
        self.assertEqual(
            report,
            {
                "state": "failed",
                "exit_code": 69,
                "message": "service refused: locked",
                "pid": os.getpid(),
            },
        )

        self.assertEqual(self.journal, ["start a"])
        self.assertEqual(self.reactor.stopped, 1)
        self.assertEqual(service_module.exit_status.code, 69)
        self.assertEqual(self.service.phase, Phase.FAILED)
        self.flushLoggedErrors()

    def test_unexpected_error_is_reported_as_internal(self) -> None:
        ready: Deferred = Deferred()
        self.service.add(Part("a", self.journal, ready=ready))
        self.service.startService()
        ready.errback(ZeroDivisionError("boom"))
        report = self.report()
        self.assertEqual(report["state"], "failed")
        self.assertEqual(report["exit_code"], 70)
        self.assertIn("internal error: boom", report["message"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_stop_during_startup(self) -> None:
        ready: Deferred = Deferred()
        self.service.add(Part("a", self.journal, ready=ready))
        self.service.add(Part("b", self.journal))
        self.service.startService()
        d = self.service.stopService()
        self.successResultOf(d)
        self.assertEqual(self.journal, ["start a", "stop a"])
        report = self.report()
        self.assertEqual(report["state"], "failed")
        self.assertEqual(report["message"], "stopped before it was ready")

    def test_status_collects_parts(self) -> None:
        self.service.add(Part("a", self.journal))
        self.service.startService()
        status = self.successResultOf(Deferred.fromCoroutine(self.service.status()))
        self.assertEqual(status["name"], "t")
        self.assertEqual(status["phase"], "running")
        self.assertEqual(status["a_status"], "ok")
        self.assertGreaterEqual(status["uptime"], 0)

    def test_unnamed_part_refused(self) -> None:
        self.assertRaises(ValueError, self.service.add, Service())
