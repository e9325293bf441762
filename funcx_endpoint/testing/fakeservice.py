"""An in-memory fake of the funcX web service, for tests of the SDK.

:class:`FakeFuncXService` answers the REST API of PROTOCOL.md section 2 (the
part the SDK uses) and the client-credentials token call of section 6, as a
``twisted.web`` resource tree.  Serve it with :meth:`FakeFuncXService.listen`
on a free port of 127.0.0.1 (plain HTTP, or HTTPS with certificates from
:mod:`funcx_endpoint.tls`) and point the SDK at it::

    fake = FakeFuncXService()
    served = fake.listen(reactor)
    client = FuncXClient(served.service_address,
                         authorizer=AccessTokenAuthorizer(fake.issue_token()))

globus-sdk blocks, so a trial test calls the SDK with ``deferToThread`` while
the reactor serves the fake.  All state lives on the reactor thread: change
and inspect it from there (test methods, callbacks), not from SDK threads.

This fake doubles as the statement of what the SDK needs from the real
service; the answers below are the shapes the real service must give:

* every error answer is JSON ``{"code", "message", "reason",
  "http_status_code", "error_args"}``; a missing or unknown token gets 401;
* ``POST /v2/oauth2/token`` (HTTP Basic client id and secret, form
  ``grant_type=client_credentials``, ``scope``) answers ``{"access_token",
  "expires_in", "token_type", "scope", "resource_server", "other_tokens"}``;
* ``POST /submit`` answers 200 with one result per task in the order of the
  tasks: ``{"task_uuid", "http_status_code": 200}`` for a created task,
  ``{"task_uuid": null, "http_status_code": 4xx, "reason"}`` for a refused
  one (unknown function or endpoint, function not allowed on the endpoint,
  bad payload); a refused task does not stop the others.  It never answers
  5xx after creating tasks, and 429/503 only when it created nothing (the
  SDK retries those);
* ``GET /tasks/<id>`` and each value of ``POST /batch_status``'s
  ``results`` are ``{"task_id", "status"}`` while pending, plus
  ``completion_t`` and ``result`` (serialized) or ``exception`` (traceback
  text) and ``error_details`` (``{"code", "user_message"}``) once done;
  ``batch_status`` takes at most 1000 ids and leaves out ids the caller
  does not own.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Pattern, Tuple

from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorSSL, IReactorTCP
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.resource import IResource, Resource

from funcx_endpoint.tls import TLSFiles
from funcx_endpoint.wire import (
    DeserializationError,
    ErrorCode,
    pack_task_buffer,
    serialize,
    unpack_buffers,
    unpack_task_buffer,
)

__all__ = [
    "AUTH_RESOURCE_SERVER",
    "DEFAULT_IDENTITY",
    "FUNCX_RESOURCE_SERVER",
    "FUNCX_SCOPE",
    "MAX_BATCH_STATUS_IDS",
    "FakeEndpoint",
    "FakeFuncXService",
    "FakeTask",
    "RecordedRequest",
    "ServedFake",
]

FUNCX_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
FUNCX_RESOURCE_SERVER = "funcx_service"
AUTH_RESOURCE_SERVER = "auth.globus.org"
_AUTH_SCOPES = frozenset({"openid", "profile", "email"})
#: The identity tokens from :meth:`FakeFuncXService.issue_token` act for by default.
DEFAULT_IDENTITY = "test-user"
#: The most ids ``POST /batch_status`` accepts in one request.
MAX_BATCH_STATUS_IDS = 1000
_REMOTE_ERROR_MESSAGE = "An error occurred during the execution of this task"


@dataclass
class RecordedRequest:
    """One request the fake received (recorded before it was answered)."""

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
class FakeEndpoint:
    """An endpoint known to the fake."""

    endpoint_id: str
    name: str
    owner: str
    status: str = "online"
    locked: bool = False
    logs: List[Dict[str, Any]] = field(default_factory=list)
    whitelist: List[str] = field(default_factory=list)

    def describe(self) -> Dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            "endpoint_name": self.name,
            "status": self.status,
            "locked": self.locked,
        }


@dataclass
class FakeTask:
    """A task known to the fake; see :meth:`FakeFuncXService.set_result` & co."""

    task_id: str
    function_id: str
    endpoint_id: str
    payload: str
    task_group_id: str
    owner: str
    status: str = "waiting-for-ep"
    result: Optional[str] = None
    exception: Optional[str] = None
    error_details: Optional[Dict[str, str]] = None
    completion_t: Optional[str] = None

    def to_wire(self) -> Dict[str, Any]:
        """The answer of ``GET /tasks/<id>`` for this task."""
        answer: Dict[str, Any] = {"task_id": self.task_id, "status": self.status}
        if self.completion_t is not None:
            answer["completion_t"] = self.completion_t
        if self.result is not None:
            answer["result"] = self.result
        if self.exception is not None:
            answer["exception"] = self.exception
            answer["error_details"] = self.error_details
        return answer


@dataclass
class _Failure:
    method: str
    path: str
    status: Optional[int]
    body: Any
    headers: Dict[str, str]
    times: int


class _TrackingFactory(WrappingFactory):
    """Keeps the open connections of a site, so that they can all be closed."""

    def __init__(self, wrapped: server.Site) -> None:
        super().__init__(wrapped)
        self._when_idle: List[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._when_idle = self._when_idle, []
            for waiter in waiters:
                waiter.callback(None)

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
class ServedFake:
    """Where a listening fake is: ``root_url`` is ``http(s)://127.0.0.1:<port>``."""

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


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_body(status: int, code: str, message: str) -> Dict[str, Any]:
    """The JSON body of an error answer (globus-sdk reads ``code``/``message``)."""
    return {
        "code": code,
        "message": message,
        "reason": message,
        "http_status_code": status,
        "error_args": [],
    }


def _oauth_error(status: int, error: str, message: str) -> Tuple[int, Dict[str, Any]]:
    """An OAuth2 error answer, with the fields of :func:`error_body` too."""
    code = "UNAUTHORIZED" if status == 401 else "BAD_REQUEST"
    return status, {**error_body(status, code, message), "error": error}


def _user_traceback(error: BaseException) -> str:
    """Traceback text starting at the user's function (the runner's frame cut)."""
    tb = error.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


_Handler = Callable[..., Tuple[int, Any]]


class FakeFuncXService:
    """The state and behaviour of a fake funcX web service.

    ``runner``, if given, is called with ``(service, task)`` for each task
    as it is created (on the reactor thread); :meth:`run_inline` runs it at
    once in this process.  Without a runner tasks stay ``waiting-for-ep``
    until a test calls :meth:`set_result`, :meth:`set_exception` or
    :meth:`run_task`.  ``clock`` gives ``completion_t``.
    """

    def __init__(
        self,
        *,
        runner: Optional[Callable[[FakeFuncXService, FakeTask], None]] = None,
        funcx_scope: str = FUNCX_SCOPE,
        token_lifetime: int = 172800,
        min_sdk_version: str = "1.0.0",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runner = runner
        self.funcx_scope = funcx_scope
        self.token_lifetime = token_lifetime
        #: The answer of ``GET /version``.
        self.version = {
            "api": "1.0.13",
            "min_ep_version": "1.0.0",
            "min_sdk_version": min_sdk_version,
        }
        self.clock = clock
        #: client id -> (secret, identity)
        self.clients: Dict[str, Tuple[str, str]] = {}
        #: access token -> identity
        self.tokens: Dict[str, str] = {}
        self.endpoints: Dict[str, FakeEndpoint] = {}
        #: function id -> the registration body, plus "owner"
        self.functions: Dict[str, Dict[str, Any]] = {}
        self.tasks: Dict[str, FakeTask] = {}
        self.task_groups: Dict[str, List[str]] = {}
        #: Every request received, in order.
        self.requests: List[RecordedRequest] = []
        self._failures: List[_Failure] = []
        self._routes: List[Tuple[str, Pattern[str], _Handler, bool]] = []
        for method, pattern, handler, needs_token in (
            ("POST", r"/v2/oauth2/token", self._token, False),
            ("GET", r"/v2/version", self._get_version, False),
            ("POST", r"/v2/functions", self._register_function, True),
            ("POST", r"/v2/submit", self._submit, True),
            ("GET", r"/v2/tasks/(?P<task_id>[^/]+)", self._get_task, True),
            ("POST", r"/v2/batch_status", self._batch_status, True),
            ("GET", r"/v2/taskgroup/(?P<task_group_id>[^/]+)", self._get_taskgroup, True),
            ("GET", r"/v2/endpoints", self._get_endpoints, True),
            ("GET", r"/v2/endpoints/(?P<endpoint_id>[^/]+)", self._get_endpoint, True),
            ("DELETE", r"/v2/endpoints/(?P<endpoint_id>[^/]+)", self._delete_endpoint, True),
            ("GET", r"/v2/endpoints/(?P<endpoint_id>[^/]+)/status", self._get_status, True),
            ("POST", r"/v2/endpoints/(?P<endpoint_id>[^/]+)/lock", self._lock, True),
            ("GET", r"/v2/endpoints/(?P<endpoint_id>[^/]+)/whitelist", self._get_wl, True),
            ("POST", r"/v2/endpoints/(?P<endpoint_id>[^/]+)/whitelist", self._add_wl, True),
            (
                "DELETE",
                r"/v2/endpoints/(?P<endpoint_id>[^/]+)/whitelist/(?P<function_id>[^/]+)",
                self._delete_wl,
                True,
            ),
        ):
            self._routes.append((method, re.compile(pattern + r"/?\Z"), handler, needs_token))

    # -- set-up and inspection for tests ----------------------------------------

    def add_client(
        self,
        client_id: Optional[str] = None,
        secret: Optional[str] = None,
        identity: Optional[str] = None,
    ) -> Tuple[str, str]:
        """Register a confidential client; its ``(client_id, secret)``.

        Its tokens act for ``identity`` (default: the client id).
        """
        client_id = client_id or str(uuid.uuid4())
        secret = secret or secrets.token_urlsafe(24)
        self.clients[client_id] = (secret, identity or client_id)
        return client_id, secret

    def issue_token(self, identity: str = DEFAULT_IDENTITY) -> str:
        """A valid funcX access token for ``identity``."""
        token = secrets.token_urlsafe(24)
        self.tokens[token] = identity
        return token

    def revoke_tokens(self) -> None:
        """Forget every access token (the next call with one gets 401)."""
        self.tokens.clear()

    def add_endpoint(
        self,
        endpoint_id: Optional[str] = None,
        name: str = "test-endpoint",
        owner: str = DEFAULT_IDENTITY,
        status: str = "online",
    ) -> str:
        """Create an endpoint owned by ``owner``; its id."""
        endpoint_id = str(uuid.UUID(endpoint_id)) if endpoint_id else str(uuid.uuid4())
        self.endpoints[endpoint_id] = FakeEndpoint(endpoint_id, name, owner, status)
        return endpoint_id

    def set_status(self, task_id: str, status: str) -> None:
        """Set a pending task's status (e.g. ``running``)."""
        self.tasks[task_id].status = status

    def set_serialized_result(self, task_id: str, result: str) -> None:
        """Finish a task successfully with an already serialized result."""
        task = self.tasks[task_id]
        task.status = "success"
        task.result = result
        task.exception = task.error_details = None
        task.completion_t = f"{self.clock():.3f}"

    def set_result(self, task_id: str, value: Any) -> None:
        """Finish a task successfully with ``value`` as its result."""
        self.set_serialized_result(task_id, serialize(value))

    def set_exception(
        self,
        task_id: str,
        traceback_text: str,
        code: str = ErrorCode.REMOTE_EXECUTION_ERROR,
        user_message: str = _REMOTE_ERROR_MESSAGE,
    ) -> None:
        """Fail a task with ``traceback_text`` and error ``code``."""
        task = self.tasks[task_id]
        task.status = "failed"
        task.result = None
        task.exception = traceback_text
        task.error_details = {"code": code, "user_message": user_message}
        task.completion_t = f"{self.clock():.3f}"

    def run_task(self, task_id: str) -> None:
        """Run a task here and now, and record its result or error."""
        task = self.tasks[task_id]
        function_code = self.functions[task.function_id]["function_code"]
        try:
            fn, args, kwargs = unpack_task_buffer(pack_task_buffer(function_code, task.payload))
        except DeserializationError as error:
            self.set_exception(
                task_id,
                f"{type(error).__name__}: {error}\n",
                ErrorCode.DESERIALIZATION_ERROR,
                f"the task could not be loaded: {error}",
            )
            return
        try:
            value = fn(*args, **kwargs)
        except Exception as error:
            self.set_exception(task_id, _user_traceback(error))
            return
        self.set_result(task_id, value)

    @staticmethod
    def run_inline(service: FakeFuncXService, task: FakeTask) -> None:
        """A ``runner`` that runs each task as soon as it is submitted."""
        service.run_task(task.task_id)

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
        """Answer the next ``times`` ``method path`` requests with an error.

        ``path`` is the request path (``/v2/submit``).  ``body`` defaults to
        the standard error body; ``status=None`` drops the connection
        without any answer instead (the request was received).
        """
        self._failures.append(
            _Failure(method.upper(), path, status, body, dict(headers or {}), times)
        )

    def requests_to(self, method: str, path: str) -> List[RecordedRequest]:
        """The recorded requests for ``method path`` (e.g. ``"POST", "/v2/submit"``)."""
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    # -- serving --------------------------------------------------------------

    def resource(self) -> IResource:
        """The root resource of the fake (serve it at ``/``)."""
        return _FakeRoot(self)

    def listen(
        self,
        reactor: IReactorTCP,
        *,
        interface: str = "127.0.0.1",
        port: int = 0,
        tls_files: Optional[TLSFiles] = None,
    ) -> ServedFake:
        """Serve the fake on ``interface`` (a free port by default); where it is.

        With ``tls_files`` (from :func:`funcx_endpoint.tls.ensure_ca_and_server_cert`)
        it serves HTTPS with that server certificate; clients verify it with
        ``tls_files.ca_cert``.  Stop it with ``served.stop()``, which also
        closes the connections clients keep open (trial insists).
        """
        site = server.Site(self.resource())
        site.displayTracebacks = False
        factory = _TrackingFactory(site)
        # WrappingFactory is typed as a client factory; it serves fine.
        serving: Any = factory
        if tls_files is None:
            listening = reactor.listenTCP(port, serving, interface=interface)
            scheme = "http"
        else:
            assert IReactorSSL.providedBy(reactor), "this reactor cannot serve TLS"
            with open(tls_files.server_cert, "rb") as f:
                cert_pem = f.read()
            with open(tls_files.server_key, "rb") as f:
                key_pem = f.read()
            certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
            # ALPN must be explicit: behind the WrappingFactory Twisted cannot
            # tell that the site speaks http/1.1, and clients that offer ALPN
            # (urllib3 2) get a TLS "internal error" alert otherwise.
            options = ssl.CertificateOptions(
                privateKey=certificate.privateKey.original,
                certificate=certificate.original,
                acceptableProtocols=[b"http/1.1"],
            )
            listening = IReactorSSL(reactor).listenSSL(port, serving, options, interface=interface)
            scheme = "https"
        address = listening.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))
        return ServedFake(listening, f"{scheme}://{interface}:{address.port}", factory)

    # -- request handling -----------------------------------------------------

    def handle(self, request: server.Request) -> Any:
        """Answer ``request`` (called by the resource); returns the body bytes."""
        recorded = self._record(request)
        failure = self._take_failure(recorded)
        if failure is not None:
            if failure.status is None:
                request.transport.abortConnection()  # type: ignore[union-attr]
                return server.NOT_DONE_YET
            for name, value in failure.headers.items():
                request.setHeader(name, value)
            body = failure.body
            if body is None:
                body = error_body(failure.status, "INJECTED_FAILURE", "a failure set by the test")
            return self._json(request, failure.status, body)
        try:
            status, answer = self._dispatch(request, recorded)
        except _HTTPError as error:
            status, answer = error.status, error_body(error.status, error.code, error.message)
        return self._json(request, status, answer)

    def _record(self, request: server.Request) -> RecordedRequest:
        assert request.content is not None
        raw = request.content.read()
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
        path = request.path.decode("latin-1")
        query = {
            key.decode(): [v.decode() for v in values]
            for key, values in (request.args or {}).items()
        }
        recorded = RecordedRequest(
            request.method.decode("latin-1"), path, query, headers, body, raw
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

    @staticmethod
    def _json(request: server.Request, status: int, answer: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer).encode("utf-8")

    def _dispatch(self, request: server.Request, recorded: RecordedRequest) -> Tuple[int, Any]:
        path_matched = False
        for method, pattern, handler, needs_token in self._routes:
            match = pattern.match(recorded.path)
            if match is None:
                continue
            path_matched = True
            if method != recorded.method:
                continue
            if needs_token:
                identity = self._identity(recorded)
                return handler(recorded, identity, **match.groupdict())
            return handler(request, recorded, **match.groupdict())
        if path_matched:
            raise _HTTPError(405, "METHOD_NOT_ALLOWED", f"{recorded.method} is not allowed here")
        raise _HTTPError(404, "NOT_FOUND", f"no such API path: {recorded.path}")

    def _identity(self, recorded: RecordedRequest) -> str:
        scheme, _, token = recorded.headers.get("authorization", "").partition(" ")
        identity = self.tokens.get(token) if scheme.lower() == "bearer" else None
        if identity is None:
            raise _HTTPError(401, "UNAUTHORIZED", "a valid Bearer access token is required")
        return identity

    @staticmethod
    def _json_body(recorded: RecordedRequest) -> Dict[str, Any]:
        if not recorded.headers.get("content-type", "").startswith("application/json"):
            raise _HTTPError(415, "BAD_REQUEST", "the body must be application/json")
        if not isinstance(recorded.body, dict):
            raise _HTTPError(400, "BAD_REQUEST", "the body must be a JSON object")
        return recorded.body

    @staticmethod
    def _uuid(value: Any, what: str) -> str:
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            raise _HTTPError(400, "BAD_REQUEST", f"{what} is not a UUID: {value!r}") from None

    # -- auth -------------------------------------------------------------------

    def _token(self, request: server.Request, recorded: RecordedRequest) -> Tuple[int, Any]:
        scheme, _, encoded = recorded.headers.get("authorization", "").partition(" ")
        client_id = secret = ""
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                pass
        known = self.clients.get(client_id)
        if known is None or not secrets.compare_digest(known[0], secret):
            return _oauth_error(401, "invalid_client", "bad client credentials")
        form = recorded.body if isinstance(recorded.body, dict) else {}
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "only client_credentials")
        by_server: Dict[str, List[str]] = {}
        for scope in str(form.get("scope", "")).split():
            if scope == self.funcx_scope:
                by_server.setdefault(FUNCX_RESOURCE_SERVER, []).append(scope)
            elif scope in _AUTH_SCOPES:
                by_server.setdefault(AUTH_RESOURCE_SERVER, []).append(scope)
            else:
                return _oauth_error(400, "invalid_scope", f"unknown scope {scope}")
        if not by_server:
            return _oauth_error(400, "invalid_scope", "no scope requested")
        identity = known[1]
        tokens = []
        for resource_server, scopes in by_server.items():
            token = self.issue_token(identity)
            tokens.append(
                {
                    "access_token": token,
                    "expires_in": self.token_lifetime,
                    "token_type": "Bearer",
                    "scope": " ".join(scopes),
                    "resource_server": resource_server,
                }
            )
        return 200, {**tokens[0], "other_tokens": tokens[1:]}

    def _get_version(self, request: server.Request, recorded: RecordedRequest) -> Tuple[int, Any]:
        return 200, dict(self.version)

    # -- functions and tasks ------------------------------------------------------

    def _register_function(self, recorded: RecordedRequest, identity: str) -> Tuple[int, Any]:
        body = self._json_body(recorded)
        name, code = body.get("function_name"), body.get("function_code")
        if not isinstance(name, str) or not isinstance(code, str):
            raise _HTTPError(400, "BAD_REQUEST", "function_name and function_code are required")
        try:
            parts = len(unpack_buffers(code))
        except DeserializationError as error:
            raise _HTTPError(400, "BAD_REQUEST", f"function_code: {error}") from None
        if parts != 1:
            raise _HTTPError(400, "BAD_REQUEST", "function_code must be one packed part")
        function_id = str(uuid.uuid4())
        self.functions[function_id] = {**body, "owner": identity}
        return 200, {"function_uuid": function_id}

    def _refusal(self, status: int, reason: str) -> Dict[str, Any]:
        return {"task_uuid": None, "http_status_code": status, "reason": reason}

    def _create_task(self, identity: str, task_group_id: str, item: Any) -> Dict[str, Any]:
        if not (
            isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) for x in item)
        ):
            return self._refusal(400, "a task must be [function_id, endpoint_id, payload]")
        function_id, endpoint_id, payload = item
        function = self.functions.get(function_id)
        if function is None or not (function.get("public") or function["owner"] == identity):
            return self._refusal(404, f"Function {function_id} not found")
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None:
            return self._refusal(404, f"Endpoint {endpoint_id} not found")
        if endpoint.whitelist and function_id not in endpoint.whitelist:
            return self._refusal(
                403, f"Function {function_id} is not allowed on endpoint {endpoint_id}"
            )
        try:
            parts = len(unpack_buffers(payload))
        except DeserializationError as error:
            return self._refusal(400, f"bad payload: {error}")
        if parts != 2:
            return self._refusal(400, "the payload must be 2 packed parts (args, kwargs)")
        task = FakeTask(
            str(uuid.uuid4()), function_id, endpoint_id, payload, task_group_id, identity
        )
        self.tasks[task.task_id] = task
        self.task_groups.setdefault(task_group_id, []).append(task.task_id)
        if self.runner is not None:
            self.runner(self, task)
        return {"task_uuid": task.task_id, "http_status_code": 200}

    def _submit(self, recorded: RecordedRequest, identity: str) -> Tuple[int, Any]:
        body = self._json_body(recorded)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise _HTTPError(400, "BAD_REQUEST", "tasks must be a list")
        raw_group = body.get("task_group_id")
        task_group_id = self._uuid(raw_group, "task_group_id") if raw_group else str(uuid.uuid4())
        results = [self._create_task(identity, task_group_id, item) for item in tasks]
        return 200, {"response": "batch", "task_group_id": task_group_id, "results": results}

    def _owned_task(self, task_id: str, identity: str) -> Optional[FakeTask]:
        task = self.tasks.get(task_id)
        return task if task is not None and task.owner == identity else None

    def _get_task(self, recorded: RecordedRequest, identity: str, task_id: str) -> Tuple[int, Any]:
        task = self._owned_task(task_id, identity)
        if task is None:
            raise _HTTPError(404, "TASK_NOT_FOUND", f"Task {task_id} not found")
        return 200, task.to_wire()

    def _batch_status(self, recorded: RecordedRequest, identity: str) -> Tuple[int, Any]:
        task_ids = self._json_body(recorded).get("task_ids")
        if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
            raise _HTTPError(400, "BAD_REQUEST", "task_ids must be a list of strings")
        if len(task_ids) > MAX_BATCH_STATUS_IDS:
            raise _HTTPError(
                400, "BAD_REQUEST", f"at most {MAX_BATCH_STATUS_IDS} task ids per request"
            )
        results = {}
        for task_id in task_ids:
            task = self._owned_task(task_id, identity)
            if task is not None:
                results[task_id] = task.to_wire()
        return 200, {"response": "batch", "results": results}

    def _get_taskgroup(
        self, recorded: RecordedRequest, identity: str, task_group_id: str
    ) -> Tuple[int, Any]:
        owned = [
            task_id
            for task_id in self.task_groups.get(task_group_id, [])
            if self._owned_task(task_id, identity) is not None
        ]
        if not owned:
            raise _HTTPError(404, "TASK_GROUP_NOT_FOUND", f"Task group {task_group_id} not found")
        return 200, {"taskgroup_id": task_group_id, "tasks": [{"id": t} for t in owned]}

    # -- endpoints ----------------------------------------------------------------

    def _endpoint(self, endpoint_id: str, identity: str) -> FakeEndpoint:
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None or endpoint.owner != identity:
            raise _HTTPError(404, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_id} not found")
        return endpoint

    def _get_endpoints(self, recorded: RecordedRequest, identity: str) -> Tuple[int, Any]:
        return 200, [e.describe() for e in self.endpoints.values() if e.owner == identity]

    def _get_endpoint(
        self, recorded: RecordedRequest, identity: str, endpoint_id: str
    ) -> Tuple[int, Any]:
        return 200, self._endpoint(endpoint_id, identity).describe()

    def _delete_endpoint(
        self, recorded: RecordedRequest, identity: str, endpoint_id: str
    ) -> Tuple[int, Any]:
        self._endpoint(endpoint_id, identity)
        del self.endpoints[endpoint_id]
        return 200, {"endpoint_id": endpoint_id, "deleted": True}

    def _get_status(
        self, recorded: RecordedRequest, identity: str, endpoint_id: str
    ) -> Tuple[int, Any]:
        endpoint = self._endpoint(endpoint_id, identity)
        return 200, {"status": endpoint.status, "logs": list(endpoint.logs)}

    def _lock(self, recorded: RecordedRequest, identity: str, endpoint_id: str) -> Tuple[int, Any]:
        endpoint = self._endpoint(endpoint_id, identity)
        endpoint.locked = True
        return 200, {"endpoint_id": endpoint_id, "locked": True}

    def _whitelist(self, endpoint: FakeEndpoint) -> Dict[str, Any]:
        return {"endpoint_id": endpoint.endpoint_id, "functions": list(endpoint.whitelist)}

    def _get_wl(
        self, recorded: RecordedRequest, identity: str, endpoint_id: str
    ) -> Tuple[int, Any]:
        return 200, self._whitelist(self._endpoint(endpoint_id, identity))

    def _add_wl(
        self, recorded: RecordedRequest, identity: str, endpoint_id: str
    ) -> Tuple[int, Any]:
        endpoint = self._endpoint(endpoint_id, identity)
        function_ids = self._json_body(recorded).get("func")
        if not isinstance(function_ids, list):
            raise _HTTPError(400, "BAD_REQUEST", "func must be a list of function ids")
        for function_id in function_ids:
            function_id = self._uuid(function_id, "function id")
            if function_id not in endpoint.whitelist:
                endpoint.whitelist.append(function_id)
        return 200, self._whitelist(endpoint)

    def _delete_wl(
        self, recorded: RecordedRequest, identity: str, endpoint_id: str, function_id: str
    ) -> Tuple[int, Any]:
        endpoint = self._endpoint(endpoint_id, identity)
        if function_id not in endpoint.whitelist:
            raise _HTTPError(
                404, "FUNCTION_NOT_FOUND", f"Function {function_id} is not in the whitelist"
            )
        endpoint.whitelist.remove(function_id)
        return 200, self._whitelist(endpoint)


class _FakeRoot(Resource):
    """Every path goes to :meth:`FakeFuncXService.handle`."""

    isLeaf = True

    def __init__(self, service: FakeFuncXService) -> None:
        super().__init__()
        self._service = service

    def render(self, request: server.Request) -> Any:
        return self._service.handle(request)
