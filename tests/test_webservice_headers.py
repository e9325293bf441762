"""Request heads the service must answer whatever bytes they hold.

Header values are bytes on the wire; any byte may come, and a bad one gets a
4xx answer, never a 500 with a traceback.  A header line longer than the
channel's limit gets 431 and a closed connection at once, over TLS too.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from funcx_endpoint import tls
from funcx_endpoint.testing.inprocess import InProcessService
from funcx_endpoint.webservice.http import APIResource, JSONSite, Router


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
            context = ssl.create_default_context(cafile=files.ca_cert)
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                    conn.sendall(
                        b"GET /v2/version HTTP/1.1\r\nHost: x\r\nX-Big: "
                        + b"a" * 20000
                        + b"\r\n\r\n"
                    )
                    data = b""
                    while True:
                        try:
                            chunk = conn.recv(65536)
                        except (ssl.SSLError, ConnectionResetError):
                            break
                        if not chunk:
                            break
                        data += chunk
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
