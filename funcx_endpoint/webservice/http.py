"""A small JSON-over-HTTP framework on ``twisted.web``: routes, errors, body limits.

Every answer is JSON.  Errors are :class:`APIError`\\ s, answered as
``{"code", "message", "reason", "http_status_code", "error_args"}``
(globus-sdk reads ``code`` and ``message``; funcX 1.0 clients read
``reason``).  A handler is ``async def handler(call) -> (status, body)``; a
:class:`Call` gives it the request, the caller's identity (checked before
the handler runs, unless the route is public) and the parsed body.

Request bodies larger than the limit are not kept: the request is read to
its end and answered 413 (a client that sent a body too big sees the
answer instead of a broken connection).
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    FrozenSet,
    List,
    Optional,
    Pattern,
    Tuple,
    cast,
)
from urllib.parse import unquote

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

__all__ = ["APIError", "Call", "JSONSite", "Router", "WarningBudget", "error_body"]

#: Bodies up to this size are parsed on the reactor thread, bigger ones in a thread.
_INLINE_PARSE = 256 * 1024
#: A request body this many times the limit is not even read: the connection is dropped.
_DISCARD_FACTOR = 4

Handler = Callable[["Call"], Awaitable[Tuple[int, Any]]]


def error_body(status: int, code: str, message: str, **extra: Any) -> Dict[str, Any]:
    """The JSON body of an error answer."""
    return {
        "code": code,
        "message": message,
        "reason": message,
        "http_status_code": status,
        "error_args": [],
        **extra,
    }


class APIError(Exception):
    """An answer other than success: status, a code, and a message a person can act on."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Optional[Dict[str, str]] = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> Dict[str, Any]:
        return error_body(self.status, self.code, self.message, **self.extra)


def bad_request(message: str, code: str = "BAD_REQUEST") -> APIError:
    return APIError(400, code, message)


def not_found(message: str, code: str = "NOT_FOUND") -> APIError:
    return APIError(404, code, message)


#: What may spell a lone surrogate in a JSON body: a ``\\uD800``-``\\uDFFF`` escape, or
#: its UTF-8-style encoding (which ``json.loads`` of bytes lets through).
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _not_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: valid JSON syntax, but no float holds it
        raise ValueError(f"{text} is out of range (numbers must be finite)")
    return value


def utf8_encodable(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(raw: bytes, check_text: bool = True) -> Any:
    """``raw`` as JSON, or a 400 APIError: no NaN/Infinity; no lone surrogates if ``check_text``."""
    try:
        value = json.loads(raw, parse_constant=_not_json_constant, parse_float=_finite_float)

    except (ValueError, RecursionError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", "INVALID_JSON") from None
    if check_text and _SURROGATE_HINT.search(raw) is not None:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(
                "the body holds text that is not valid Unicode (a lone surrogate such as "
                "\\ud800); send UTF-8 text",
                "INVALID_TEXT",
            ) from None
    return value


class LimitedRequest(server.Request):
    """A request whose body is kept only up to the site's ``max_body`` bytes."""

    body_too_large = False
    _body_seen = 0

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_body", 10 * 1024 * 1024))

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self._limit():
            self._too_large()
            return
        super().gotLength(length)

    def _too_large(self) -> None:
        self.body_too_large = True
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self.body_too_large:
            transport: Any = self.transport
            if self._body_seen > _DISCARD_FACTOR * self._limit() and transport is not None:
                transport.abortConnection()
            return
        if self._body_seen > self._limit():
            self._too_large()
            return
        super().handleContentChunk(data)


class JSONChannel(http.HTTPChannel):
    """HTTP/1.1 whose refusals of a request head are JSON answers, each one logged as
    one warning, after which the connection is closed and its input no longer read.

    A header line too long (over ``MAX_LENGTH``, 16 KiB) gets 431; a head Twisted
    cannot parse (request line, header name or value, framing, too many or too big
    headers) gets 400.  Twisted's own handling falls short in three ways:

    - its line receiver stops reading only for the rest of the current chunk, so
      input that arrives later (the next TLS record) is parsed again, from inside a
      refused head: a blank line there made ``allHeadersReceived`` run for a request
      line never parsed (``AttributeError``, an unhandled-error traceback, and no
      answer to the client);
    - on a too-long line it only calls ``transport.loseConnection()``, with the
      channel still the transport's producer: over TLS the connection then stays
      open, unanswered, until a timeout;
    - its 400 is a bare status line, no body.
    """

    log = Logger()
    #: True once the connection is being closed: input after that point is dropped.
    _closing = False

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        super().dataReceived(data)

    def loseConnection(self) -> None:
        if self._closing:
            return
        self._closing = True
        super().loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(
            431,
            b"Request Header Fields Too Large",
            "HEADER_TOO_LARGE",
            f"a line of the request head is longer than {self.MAX_LENGTH} bytes; "
            f"send shorter headers",
        )

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's one exit for a request head it cannot parse (a private name, but
        # the only seam; tests/test_webservice_headers.py notices if it goes away).
        self._refuse(
            400,
            b"Bad Request",
            "BAD_REQUEST",
            "the request head is not valid HTTP/1.1 (request line, header names and "
            "values, Content-Length or Transfer-Encoding, header count and size)",
        )

    def _refuse(self, status: int, phrase: bytes, code: str, message: str) -> None:
        """Answer ``status`` with a JSON error, log one warning, close the connection."""
        if self._closing:
            return
        peer = getattr(self.transport.getPeer(), "host", None) if self.transport else None
        if self.factory.refusals.admit():  # a JSONSite's budget
            self.log.warn(
                "Request head refused ({status} {code}) from {peer}",
                status=status,
                code=code,
                peer=peer,
            )
        body = json.dumps(error_body(status, code, message), separators=(",", ":")).encode()
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\n" % (status, phrase)
            + b"Content-Type: application/json\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        self.loseConnection()


class WarningBudget:
    """How many warnings of one kind are logged: the first ``burst`` in each
    ``period`` seconds one by one, the rest counted.

    :meth:`admit` says whether to log one; the first time it says no in a
    period it logs that the rest are counted, and the count is logged when the
    next period's first warning comes, or at :meth:`close`.  A flood of bad
    requests then writes a few lines a minute, not one per connection.
    """

    log = Logger()

    def __init__(
        self, what: str, clock: IReactorTime, burst: int = 20, period: float = 60.0
    ) -> None:
        self.what = what
        self.clock = clock
        self.burst = burst
        self.period = period
        self._ends = -math.inf  # when the current period ends
        self._logged = 0
        self._counted = 0

    def admit(self) -> bool:
        now = self.clock.seconds()
        if now >= self._ends:
            self.close()
            self._ends = now + self.period
            self._logged = 0
        if self._logged < self.burst:
            self._logged += 1
            return True
        if self._counted == 0:
            self.log.warn(
                "More than {burst} {what} in {period:g} s: the rest of this period's "
                "are counted, not logged one by one",
                burst=self.burst,
                what=self.what,
                period=self.period,
            )
        self._counted += 1
        return False

    def close(self) -> None:
        """Log the count of the warnings not logged (if any)."""
        if self._counted:
            self.log.warn(
                "{count} more {what} were not logged one by one",
                count=self._counted,
                what=self.what,
            )
            self._counted = 0


class JSONSite(server.Site):
    """A site with :class:`LimitedRequest`\\ s and no access log (it costs at high rates).

    Refused request heads are logged within a :class:`WarningBudget` (on
    ``clock``, the reactor's by default).
    """

    requestFactory = LimitedRequest
    # HTTP/1.1 only (the TLS options offer no h2), with the long-line answer above.
    protocol = JSONChannel  # type: ignore[assignment]

    def __init__(
        self, resource: Resource, max_body: int, clock: Optional[IReactorTime] = None
    ) -> None:
        super().__init__(resource)
        self.max_body = max_body
        self.displayTracebacks = False
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.refusals = WarningBudget("refused request heads", clock)

    def stopFactory(self) -> None:
        self.refusals.close()
        super().stopFactory()

    def log(self, request: Any) -> None:
        pass


@attr.s(auto_attribs=True)
class Route:
    method: str
    pattern: Pattern[str]
    handler: Handler
    #: None: public; else the resource servers whose tokens are accepted.
    audiences: Optional[Tuple[str, ...]]


class Router:
    """Routes ``(method, path)`` to handlers; paths are regular expressions."""

    def __init__(self) -> None:
        self.routes: List[Route] = []

    def add(
        self,
        method: str,
        path: str,
        handler: Handler,
        audiences: Optional[Tuple[str, ...]] = None,
    ) -> None:
        """``path`` may name groups: ``/v2/tasks/(?P<task_id>[^/]+)``."""
        pattern = re.compile(path + r"/?\Z")
        self.routes.append(Route(method, pattern, handler, audiences))

    def match(self, method: str, path: str) -> Tuple[Route, Dict[str, str]]:
        allowed = []
        for route in self.routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method == method:
                return route, {k: unquote(v) for k, v in found.groupdict().items()}
            allowed.append(route.method)
        if allowed:
            raise APIError(
                405,
                "METHOD_NOT_ALLOWED",
                f"{method} is not allowed on {path}; use {', '.join(sorted(set(allowed)))}",
                headers={"Allow": ", ".join(sorted(set(allowed)))},
            )
        raise not_found(f"no such API path: {path}")


class Call:
    """One request, as a handler sees it."""

    def __init__(
        self,
        request: server.Request,
        params: Dict[str, str],
        trusted_proxies: FrozenSet[str] = frozenset(),
    ) -> None:
        self.request = request
        self.params = params
        self.identity: Any = None  # set by the authenticator
        self._trusted_proxies = trusted_proxies

    @property
    def method(self) -> str:
        return self.request.method.decode("latin-1")

    def header(self, name: str) -> Optional[str]:
        """The last value of header ``name``, its bytes read as Latin-1.

        Any byte sequence is an answer: ``request.getHeader`` with a ``str`` name
        decodes as UTF-8 and raises on other bytes.
        """
        values = self.request.requestHeaders.getRawHeaders(name.encode("latin-1"))
        return values[-1].decode("latin-1") if values else None

    def query(self, name: str) -> List[str]:
        values = (self.request.args or {}).get(name.encode(), [])
        return [v.decode("utf-8", "replace") for v in values]

    def form(self) -> Dict[str, str]:
        """Form fields (``application/x-www-form-urlencoded`` body), last value of each."""
        return {
            key.decode("utf-8", "replace"): values[-1].decode("utf-8", "replace")
            for key, values in (self.request.args or {}).items()
            if values
        }

    def client_ip(self) -> Optional[str]:
        """The caller's address; behind a trusted proxy (a load balancer in front of
        several instances), the last address its ``X-Forwarded-For`` names that is
        not a trusted proxy's."""
        peer: Optional[str] = getattr(self.request.getClientAddress(), "host", None)
        if peer is None or peer not in self._trusted_proxies:
            return peer
        hops: List[str] = []
        for raw in self.request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []:
            hops += [h.strip() for h in raw.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if hop not in self._trusted_proxies:
                return hop
        return peer

    def raw_body(self) -> bytes:
        content = self.request.content
        if content is None:
            return b""
        content.seek(0)
        return content.read()

    async def json_body(self, required: bool = True, check_text: bool = True) -> Any:
        """The body as JSON (a 400/415 APIError says what is wrong with it).

        An empty body is ``None`` when not ``required``.  NaN and Infinity are
        refused (they are not JSON), and so, unless ``check_text`` is false (the
        handler then checks the strings it keeps), is text that cannot be stored
        as UTF-8 (lone surrogates such as ``"\\ud800"``).
        """
        raw = self.raw_body()
        if not raw.strip():
            if required:
                raise bad_request("this call needs a JSON body", "MISSING_BODY")
            return None
        content_type = (self.header("content-type") or "").split(";")[0].strip().lower()
        if (
            content_type
            and content_type != "application/json"
            and not content_type.endswith("+json")
        ):
            raise APIError(
                415,
                "UNSUPPORTED_MEDIA_TYPE",
                f"the body must be JSON (Content-Type: application/json), not {content_type}",
            )
        if len(raw) > _INLINE_PARSE:
            return await deferToThread(parse_json, raw, check_text)
        return parse_json(raw, check_text)

    async def json_object(self, required: bool = True, check_text: bool = True) -> Dict[str, Any]:
        body = await self.json_body(required, check_text)
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise bad_request(
                f"the body must be a JSON object, not a JSON {type(body).__name__}",
                "INVALID_BODY",
            )
        return body


Authenticator = Callable[[Call, Tuple[str, ...]], Awaitable[Any]]


class APIResource(Resource):
    """The whole service as one leaf resource: routes, auth, JSON answers."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        router: Router,
        authenticate: Authenticator,
        trusted_proxies: FrozenSet[str] = frozenset(),
    ) -> None:
        super().__init__()
        self._router = router
        self._authenticate = authenticate
        self._trusted_proxies = trusted_proxies

    def render(self, request: server.Request) -> Any:
        d = Deferred.fromCoroutine(self._handle(request))
        d.addErrback(self._internal_error, request)
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request) -> None:
        finished: List[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        try:
            if getattr(request, "body_too_large", False):
                limit = getattr(getattr(request.channel, "site", None), "max_body", 0)
                raise APIError(
                    413,
                    "REQUEST_TOO_LARGE",
                    f"the request body is larger than this service accepts ({limit} bytes); "
                    f"send less per request (for /submit: fewer tasks per batch or smaller "
                    f"arguments)",
                    max_request_size=limit,
                )
            assert request.path is not None
            path = request.path.decode("latin-1")
            method = request.method.decode("latin-1")
            route, params = self._router.match(method, path)
            call = Call(request, params, self._trusted_proxies)
            if route.audiences is not None:
                call.identity = await self._authenticate(call, route.audiences)
            status, body = await route.handler(call)
        except APIError as error:
            status, body = error.status, error.body()
            for name, value in error.headers.items():
                request.setHeader(name, value)
        if not finished:
            self._write(request, status, body)

    @staticmethod
    def _write(request: server.Request, status: int, body: Any) -> None:
        # allow_nan=False: NaN and Infinity are not JSON; an answer holding one is an error.
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()

    def _internal_error(self, failure: Failure, request: server.Request) -> None:
        answer_internal_error(
            self.log,
            failure,
            request,
            "",
            lambda: self._write(
                request,
                500,
                error_body(
                    500,
                    "INTERNAL_ERROR",
                    "the service failed to answer this request; its log says why "
                    "(funcx-service.log in its state directory)",
                ),
            ),
        )


def answer_internal_error(
    log: Logger, failure: Failure, request: server.Request, what: str, answer: Callable[[], None]
) -> None:
    """Log ``failure`` (answering ``request``; ``what`` names the part of the
    service, with a trailing space) and ``answer()`` with a 500, unless the
    request is over or its client gone."""
    log.failure(
        "Internal error answering {what}{method} {path}",
        failure,
        what=what,
        method=request.method,
        path=request.path,
    )
    if request.finished or request._disconnected:
        return
    try:
        if request.startedWriting:
            request.finish()  # too late for a status: end what was sent
            return
        answer()
    except Exception:
        log.failure("Could not answer with an error")
