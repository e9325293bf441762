"""Malformed AMP boxes from strangers and managers, against a real interchange
over TLS: one warning and the connection closed, never a traceback (issue 12,
"Interchange")."""

from __future__ import annotations

from typing import Any, Dict, List, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from funcx_endpoint.config import HighThroughputExecutor
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.testing.rawamp import box_bytes, parse_boxes, register_box, send_raw
from funcx_endpoint.wire.info import ConnectionInfo


class RealInterchange:
    """An interchange on the real reactor, and the log events while it runs."""

    def __init__(self, testcase: TestCase) -> None:
        self.events: List[Dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, observer)
        self.interchange = Interchange(
            reactor, testcase.mktemp(), HighThroughputExecutor(), CollectingSink()
        )
        self.interchange.startService()
        testcase.addCleanup(self.interchange.stopService)
        self.info = ConnectionInfo.read(self.interchange.info_file)

    def warnings(self) -> List[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]

    def failures(self) -> List[Dict[str, Any]]:
        return [
            e
            for e in self.events
            if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]


class MalformedRegisterTests(TestCase):
    def setUp(self) -> None:
        self.real = RealInterchange(self)

    async def _send(self, fields: Dict[bytes, bytes]) -> None:
        outcome = await send_raw(reactor, self.real.info, [box_bytes(fields)])
        self.assertTrue(outcome.closed_by_peer, "the interchange kept the connection")
        boxes = parse_boxes(outcome.received)
        if b"_ask" in fields:
            # Answered with an error (which closes the connection), not settings.
            self.assertIsNotNone(boxes)
            assert boxes is not None
            self.assertEqual([b"_error" in box for box in boxes], [True])

    def _check(self, fields: Dict[bytes, bytes], expected: str) -> Deferred[None]:
        async def run() -> None:
            await self._send(fields)
            self.assertEqual(self.real.failures(), [])
            [warning] = [w for w in self.real.warnings() if "Dropped" in w]
            self.assertIn(expected, warning)
            self.assertEqual(len(warning.splitlines()), 1)
            self.assertNotIn(self.real.info.secret, warning)
            self.assertEqual(self.real.interchange.managers(), [])

        return Deferred.fromCoroutine(run())

    def test_bad_pid(self) -> Deferred[None]:
        return self._check(register_box(self.real.info, pid=b"abc"), "a malformed Register")

    def test_bad_pid_not_asked(self) -> Deferred[None]:
        fields = register_box(self.real.info, pid=b"1e400")
        del fields[b"_ask"]
        return self._check(fields, "a malformed Register")

    def test_missing_field(self) -> Deferred[None]:
        fields = register_box(self.real.info)
        del fields[b"hostname"]
        return self._check(fields, "a malformed Register")

    def test_bad_utf8(self) -> Deferred[None]:
        return self._check(register_box(self.real.info, manager_id=b"\xff\xfe"), "malformed")

    def test_wrong_secret_and_bad_pid(self) -> Deferred[None]:
        return self._check(register_box(self.real.info, secret=b"guess", pid=b"x"), "malformed")

    def test_answer_to_nothing(self) -> Deferred[None]:
        return self._check({b"_answer": b"77"}, "an unreadable AMP box")

    def test_no_command(self) -> Deferred[None]:
        return self._check({b"hello": b"world"}, "an unreadable AMP box")


class RegisteredManagerMalformedTests(TestCase):
    def setUp(self) -> None:
        self.real = RealInterchange(self)

    def test_unknown_and_malformed_commands_after_registering(self) -> Deferred[None]:
        async def run() -> None:
            register = box_bytes(register_box(self.real.info))
            for fields, expected in [
                ({b"_command": b"NoSuchCommand", b"_ask": b"2"}, "an unknown command"),
                ({b"_command": b"Quitting", b"_ask": b"2"}, "a malformed Quitting"),
                ({b"_command": b"NoSuchCommand"}, "an unknown command"),
            ]:
                del self.real.events[:]
                outcome = await send_raw(reactor, self.real.info, [register, box_bytes(fields)])
                self.assertTrue(outcome.closed_by_peer)
                self.assertEqual(self.real.failures(), [])
                self.assertTrue(
                    any(expected in w for w in self.real.warnings()), self.real.warnings()
                )

        return Deferred.fromCoroutine(run())
