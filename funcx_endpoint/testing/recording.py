"""Test instruments around a ``twisted.web`` resource, and serving it on loopback.

:class:`RecordingResource` wraps a resource (the web service's API): it
records every request (method, path, query, headers, decoded body) before
passing it on, and answers the ones a test chose with an injected failure
instead: an error status and body, or a dropped connection.

:func:`serve` listens on a free port of 127.0.0.1 with the service's own
site class (body limits, no access log), over plain HTTP or HTTPS, and
:meth:`ServedService.stop` closes the connections clients keep open as well
(trial insists on a clean reactor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorSSL
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.resource import IResource, Resource

from funcx_endpoint.observer import fire_all
from funcx_endpoint.tls import TLSFiles
from funcx_endpoint.webservice.http import JSONSite, error_body
from funcx_endpoint.webservice.service import load_tls_options

__all__ = ["RecordedRequest", "RecordingResource", "ServedService", "serve"]


@dataclass
class RecordedRequest:
    """One request received (recorded before it was answered)."""

    method: str
    #: The path, e.g. ``/v2/submit``.
    path: str
    query: Dict[str, List[str]]
    #: Header names lower-cased; one value each.
    headers: Dict[str, str]
    #: The decoded body: JSON for JSON requests, a dict for forms, else None.
    body: Any
    raw_body: bytes


@dataclass
class _Failure:
    method: str
    path: str
    status: Optional[int]
    body: Any
    headers: Dict[str, str]
    times: int


class RecordingResource(Resource):
    """Records each request, then answers it with an injected failure or by ``wrapped``."""

    isLeaf = True

    def __init__(self, wrapped: IResource) -> None:
        super().__init__()
        self._wrapped = wrapped
        #: Every request received, in order.
        self.requests: List[RecordedRequest] = []
        self._failures: List[_Failure] = []

    def requests_to(self, method: str, path: str) -> List[RecordedRequest]:
        """The recorded requests for ``method path``."""
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def fail_next(
        self,
        method: str,
        path: str,
        status: Optional[int] = 500,
        body: Any = None,
        *,
        times: int = 1,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Answer the next ``times`` ``method path`` requests with ``status`` and ``body``
        (default: an error body like the service's); ``status=None`` drops the
        connection without any answer instead."""
        self._failures.append(
            _Failure(method.upper(), path, status, body, dict(headers or {}), times)
        )

    def render(self, request: server.Request) -> Any:
        recorded = self._record(request)
        failure = self._take_failure(recorded)
        if failure is None:
            return self._wrapped.render(request)
        if failure.status is None:
            request.transport.abortConnection()  # type: ignore[union-attr]
            return server.NOT_DONE_YET
        for name, value in failure.headers.items():
            request.setHeader(name, value)
        body = failure.body
        if body is None:
            body = error_body(failure.status, "INJECTED_FAILURE", "a failure set by the test")
        request.setResponseCode(failure.status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode("utf-8")

    def _record(self, request: server.Request) -> RecordedRequest:
        assert request.content is not None
        raw = request.content.read()
        request.content.seek(0)
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        content_type = headers.get("content-type", "")
        body: Any = None
        if content_type.startswith("application/json") and raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        elif content_type.startswith("application/x-www-form-urlencoded"):
            body = {
                key.decode(): values[-1].decode() for key, values in (request.args or {}).items()
            }
        assert request.path is not None
        query = {
            key.decode(): [v.decode() for v in values]
            for key, values in (request.args or {}).items()
        }
        recorded = RecordedRequest(
            request.method.decode("latin-1"),
            request.path.decode("latin-1"),
            query,
            headers,
            body,
            raw,
        )
        self.requests.append(recorded)
        return recorded

    def _take_failure(self, recorded: RecordedRequest) -> Optional[_Failure]:
        for failure in self._failures:
            if failure.method == recorded.method and failure.path == recorded.path:
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                return failure
        return None


class _TrackingFactory(WrappingFactory):
    """Keeps the open connections of a site, so that they can all be closed."""

    def __init__(self, wrapped: server.Site) -> None:
        super().__init__(wrapped)
        self._when_idle: List[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            fire_all(self._when_idle, None)

    def close_all(self) -> Deferred[None]:
        """Abort every open connection; fires when all are gone."""
        if not self.protocols:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._when_idle.append(waiter)
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        return waiter


@dataclass(frozen=True)
class ServedService:
    """Where a served resource is: ``root_url`` is ``http(s)://127.0.0.1:<port>``."""

    port: IListeningPort
    root_url: str
    _factory: _TrackingFactory

    @property
    def service_address(self) -> str:
        """The funcX API base URL (``FuncXClient(funcx_service_address=...)``)."""
        return self.root_url + "/v2"

    @property
    def auth_url(self) -> str:
        """The value for ``GLOBUS_SDK_SERVICE_URL_AUTH``."""
        return self.root_url + "/"

    def stop(self) -> Deferred[None]:
        """Stop listening and drop open connections; fires when all are closed."""

        async def stop() -> None:
            await maybeDeferred(self.port.stopListening)
            await self._factory.close_all()

        return Deferred.fromCoroutine(stop())


def serve(
    reactor: Any,
    resource: IResource,
    max_body: int,
    interface: str = "127.0.0.1",
    port: int = 0,
    tls_files: Optional[TLSFiles] = None,
) -> ServedService:
    """Serve ``resource`` with a :class:`~funcx_endpoint.webservice.http.JSONSite` on
    ``interface`` (HTTPS with ``tls_files``' server certificate, if given)."""
    site = JSONSite(resource, max_body)  # type: ignore[arg-type]
    factory = _TrackingFactory(site)
    # WrappingFactory is typed as a client factory; it serves fine.
    serving: Any = factory
    if tls_files is None:
        listening = reactor.listenTCP(port, serving, interface=interface)
        scheme = "http"
    else:
        assert IReactorSSL.providedBy(reactor), "this reactor cannot serve TLS"
        # The service's own TLS options (HTTP/1.1 by ALPN: behind the WrappingFactory
        # Twisted could not tell, and urllib3 2 offers ALPN).
        options = load_tls_options(tls_files.server_cert, tls_files.server_key)
        listening = reactor.listenSSL(port, serving, options, interface=interface)
        scheme = "https"
    address = listening.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address))
    return ServedService(listening, f"{scheme}://{interface}:{address.port}", factory)
