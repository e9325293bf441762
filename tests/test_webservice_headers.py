"""Request heads the service must answer whatever bytes they hold.

Header values are bytes on the wire; any byte may come, and a bad one gets a
4xx answer, never a 500 with a traceback.  A header line longer than the
channel's limit gets 431 and a closed connection at once, over TLS too.  A
request head Twisted cannot parse gets one JSON 400, one warning in the log, and
a closed connection; what the client sends after it is not parsed.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from typing import Any, Dict, List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from funcx_endpoint import tls
from funcx_endpoint.testing.inprocess import InProcessService
from funcx_endpoint.webservice.http import APIResource, JSONSite, Router, WarningBudget


def _answer(site: JSONSite, raw: bytes) -> Tuple[bytes, bool]:
    """What the site writes back to ``raw``, and whether it closes the connection."""
    site.timeOut = None  # no idle timer on the global reactor
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    return transport.value(), bool(transport.disconnecting)


def _status_and_body(raw: bytes) -> Tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _exchange_over_tls(port: int, ca_file: str, request: bytes) -> Tuple[bytes, str]:
    """Send ``request`` over TLS to ``port``; what came back, and how the connection
    ended (``"closed"``: a clean end of stream; else the error)."""
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(request)
            data = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except (ssl.SSLError, OSError) as e:
                    return data, repr(e)
                if not chunk:
                    return data, "closed"
                data += chunk


class HeaderBytesTests(SynchronousTestCase):
    """Non-UTF-8 bytes in Authorization and Content-Type, through the real API."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.service = InProcessService(self.mktemp(), self.clock)
        self.service.startService()
        self.addCleanup(lambda: self.successResultOf(self.service.stopService()))
        self.site = JSONSite(self.service.api_resource, 1024 * 1024)

    def ask(self, head: bytes, body: bytes = b"") -> Tuple[int, Any]:
        raw, _ = _answer(self.site, head + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        self.assertNotEqual(raw, b"", "no answer")
        status, answer = _status_and_body(raw)
        self.assertEqual(self.flushLoggedErrors(), [])
        return status, answer

    def test_authorization_bearer(self) -> None:
        status, answer = self.ask(
            b"GET /v2/endpoints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80"
        )
        self.assertEqual((status, answer["code"]), (401, "UNAUTHORIZED"))

    def test_authorization_scheme(self) -> None:
        status, _ = self.ask(b"GET /v2/endpoints HTTP/1.1\r\nHost: x\r\nAuthorization: \xc3\x28 t")
        self.assertEqual(status, 401)

    def test_basic_on_token_call(self) -> None:
        status, answer = self.ask(
            b"POST /v2/oauth2/token HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xff",
            b"grant_type=client_credentials",
        )
        self.assertEqual((status, answer["error"]), (401, "invalid_client"))

    def test_content_type(self) -> None:
        token = self.service.issue_token().encode()
        status, answer = self.ask(
            b"POST /v2/functions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + token
            + b"\r\nContent-Type: application/\xff\xfejson",
            b"{}",
        )
        self.assertEqual((status, answer["code"]), (415, "UNSUPPORTED_MEDIA_TYPE"))

    def test_content_type_on_revoke(self) -> None:
        status, _ = self.ask(
            b"POST /v2/oauth2/token/revoke HTTP/1.1\r\nHost: x\r\nContent-Type: \xe9t\xe9",
            b"{}",
        )
        self.assertEqual(status, 400)


class LongHeaderTests(SynchronousTestCase):
    def test_answered_431_and_closed(self) -> None:
        site = JSONSite(APIResource(Router(), None), 1024)  # type: ignore[arg-type]
        raw, closed = _answer(
            site, b"GET /v2/version HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n"
        )
        status, answer = _status_and_body(raw)
        self.assertEqual((status, answer["code"]), (431, "HEADER_TOO_LARGE"))
        self.assertTrue(closed)


class LongHeaderOverTLSTests(TestCase):
    """Over a real TLS connection the client gets its answer and the end of the
    connection within a second (it was held, unanswered, for a minute)."""

    timeout = 30

    def test_long_header_over_tls(self) -> Deferred[None]:
        files = tls.ensure_ca_and_server_cert(self.mktemp(), ["localhost"], ["127.0.0.1"])
        service = InProcessService(self.mktemp(), reactor)
        service.startService()
        served = service.listen(tls_files=files)

        def talk() -> Tuple[bytes, float]:
            port = int(served.root_url.rsplit(":", 1)[1])
            started = time.monotonic()
            data, _ = _exchange_over_tls(
                port,
                files.ca_cert,
                b"GET /v2/version HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            )
            return data, time.monotonic() - started

        async def run() -> None:
            try:
                data, took = await deferToThread(talk)
            finally:
                await served.stop()
                await service.stopService()
            self.assertTrue(data.startswith(b"HTTP/1.1 431 "), data[:200])
            self.assertLess(took, 5.0)

        return Deferred.fromCoroutine(run())


#: The fuzz finding (issue 12, rest-tcp): CR LF in the path ends the request line
#: early, so the head is refused; a blank line and a header line longer than one TLS
#: record follow.
_BROKEN_HEAD = b"POST \r\n\r\n HTTP/1.1\r\nHost: localhost\r\nContent-Length: \r\n"
_LONG_TAIL = b"X-Long: " + b"a" * 24000 + b"\r\nConnection: close\r\n\r\n"


def _warnings(test: Any) -> List[Dict[str, Any]]:
    """The warning (and worse) events logged while ``test`` runs."""
    events: List[Dict[str, Any]] = []

    def observe(event: Dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def _site(clock: Any = None) -> JSONSite:
    """A JSON site with no routes and no idle timeout (on ``clock``, if given)."""
    site = JSONSite(APIResource(Router(), None), 1024, clock)  # type: ignore[arg-type]
    site.timeOut = None
    return site


def _connect(site: JSONSite) -> Tuple[Any, StringTransport]:
    """A new connection to ``site``: its channel and the transport it writes to."""
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class BadHeadTests(SynchronousTestCase):
    """A head Twisted refuses gets a JSON 400; input after it is dropped."""

    def test_answered_400_once_and_closed(self) -> None:
        warnings = _warnings(self)
        protocol, transport = _connect(_site())
        # The rest arrives later, as over TLS; it held a blank line, which Twisted
        # read as the end of a head whose request line it never parsed (AttributeError).
        protocol.dataReceived(_BROKEN_HEAD)
        protocol.dataReceived(b"\r\n HTTP/1.1\r\n" + _LONG_TAIL)
        status, answer = _status_and_body(transport.value())
        self.assertEqual((status, answer["code"]), (400, "BAD_REQUEST"))
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["log_level"] for e in warnings], [LogLevel.warn])
        self.assertNotIn("log_failure", warnings[0])

    def test_long_line_after_refusal_not_answered_twice(self) -> None:
        warnings = _warnings(self)
        protocol, transport = _connect(_site())
        protocol.dataReceived(b"GET / HTTP/1.1\r\nBad Name: x\r\nHost: x\r\n")
        protocol.dataReceived(b"X: " + b"a" * 20000 + b"\r\n\r\n")
        self.assertEqual(len(re.findall(rb"HTTP/1\.1 \d{3} ", transport.value())), 1)
        status, _ = _status_and_body(transport.value())
        self.assertEqual(status, 400)
        self.assertEqual(len(warnings), 1)


class RefusalBudgetTests(SynchronousTestCase):
    """A flood of bad heads: each is answered 400, but the log gets the first 20
    of a minute, one line saying the rest are counted, and their count."""

    def refuse(self, site: JSONSite, times: int) -> None:
        for _ in range(times):
            protocol, transport = _connect(site)
            protocol.dataReceived(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n")
            status, answer = _status_and_body(transport.value())
            self.assertEqual((status, answer["code"]), (400, "BAD_REQUEST"))

    def test_flood_logged_within_budget(self) -> None:
        warnings = _warnings(self)
        clock = Clock()
        site = _site(clock)
        self.refuse(site, 25)
        texts = [formatEvent(e) for e in warnings]
        self.assertEqual(len([t for t in texts if t.startswith("Request head refused")]), 20)
        self.assertEqual(len([t for t in texts if t.startswith("More than 20 refused")]), 1)
        self.assertEqual(len(texts), 21)
        # The next minute: the count of the 5 not logged, then one by one again.
        clock.advance(60)
        self.refuse(site, 1)
        self.assertIn(
            "5 more refused request heads were not logged one by one", formatEvent(warnings[21])
        )
        self.assertTrue(formatEvent(warnings[22]).startswith("Request head refused"))
        # 1 + 21 in this period: 2 counted, reported when the site stops.
        self.refuse(site, 21)
        site.doStart()
        site.doStop()
        self.assertIn("2 more refused request heads were not logged", formatEvent(warnings[-1]))

    def test_budget_alone(self) -> None:
        clock = Clock()
        budget = WarningBudget("things", clock, burst=2, period=10.0)
        self.assertEqual([budget.admit() for _ in range(4)], [True, True, False, False])
        clock.advance(9.9)
        self.assertFalse(budget.admit())
        clock.advance(0.1)
        self.assertTrue(budget.admit())
        budget.close()  # nothing counted in this period: nothing to say


class BadHeadOverTLSTests(TestCase):
    """The fuzz finding over a real TLS connection: a JSON 400, a clean end of the
    stream, one warning and no traceback (it was an unhandled AttributeError, and
    the client got no answer)."""

    timeout = 30

    def test_broken_request_line_then_long_header(self) -> Deferred[None]:
        warnings = _warnings(self)
        files = tls.ensure_ca_and_server_cert(self.mktemp(), ["localhost"], ["127.0.0.1"])
        service = InProcessService(self.mktemp(), reactor)
        service.startService()
        served = service.listen(tls_files=files)
        port = int(served.root_url.rsplit(":", 1)[1])

        async def run() -> None:
            try:
                data, ended = await deferToThread(
                    _exchange_over_tls, port, files.ca_cert, _BROKEN_HEAD + _LONG_TAIL
                )
            finally:
                await served.stop()
                await service.stopService()
            self.assertTrue(data.startswith(b"HTTP/1.1 400 "), data[:200])
            status, answer = _status_and_body(data)
            self.assertEqual((status, answer["code"]), (400, "BAD_REQUEST"))
            self.assertEqual(ended, "closed")
            self.assertEqual(self.flushLoggedErrors(), [])
            refusals = [e for e in warnings if "refused" in e.get("log_format", "")]
            self.assertEqual(len(refusals), 1, warnings)
            self.assertEqual([e for e in warnings if "log_failure" in e], [])

        return Deferred.fromCoroutine(run())
