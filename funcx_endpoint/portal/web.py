"""The portal's HTTP side on ``twisted.web``: routes, sessions, CSRF, security headers.

Every answer carries a Content-Security-Policy that allows only the portal's own
script and style files (no inline script or style), forbids framing, and
sends a referrer to the portal's own origin only (with ``no-referrer`` Chromium
sends ``Origin: null`` on form posts, which this check refuses); pages are
not cached.  A ``POST`` must carry the form field
``csrf`` equal to the session's CSRF token (before sign-in: to the value of the
``funcx_portal_csrf`` cookie) and, if the browser sends an ``Origin``, come
from the portal's own origin; otherwise it is answered 403 and does nothing.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Awaitable, Callable, Dict, List, Optional, Pattern, Tuple, Union
from urllib.parse import quote, unquote, urlsplit

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from funcx_endpoint.portal.sessions import (
    COOKIE,
    CSRF_COOKIE,
    Sessions,
    csrf_matches,
    set_cookie,
)
from funcx_endpoint.portal.store import Session
from funcx_endpoint.webservice.http import answer_internal_error

__all__ = [
    "PREFIX",
    "SECURITY_HEADERS",
    "Dispatch",
    "Page",
    "PageCall",
    "PortalResource",
    "Redirect",
]

PREFIX = "/portal"

SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",
    b"x-content-type-options": b"nosniff",
    b"cross-origin-opener-policy": b"same-origin",
    b"cache-control": b"no-store",
}


@attr.s(auto_attribs=True, frozen=True)
class Page:
    """An HTML answer."""

    html: str
    status: int = 200


@attr.s(auto_attribs=True, frozen=True)
class Redirect:
    """A 303 to ``location`` (a path of the portal)."""

    location: str


#: The handler answered by itself (a live stream keeps the request open).
STREAMED = object()
Answer = Union[Page, Redirect, object]


class PageCall:
    """One request as a handler sees it: its parameters, form, session, CSRF token."""

    def __init__(
        self, request: server.Request, params: Dict[str, str], session: Optional[Session]
    ) -> None:
        self.request = request
        self.params = params
        self.session = session
        self.cookie_token = _cookie(request, COOKIE)
        self._csrf_cookie = _cookie(request, CSRF_COOKIE)

    def query(self, name: str) -> Optional[str]:
        values = (self.request.args or {}).get(name.encode())
        return values[-1].decode("utf-8", "replace") if values else None

    def form(self) -> Dict[str, str]:
        return {
            key.decode("utf-8", "replace"): values[-1].decode("utf-8", "replace")
            for key, values in (self.request.args or {}).items()
            if values
        }

    def csrf_token(self) -> str:
        """The token this page's forms carry (made, with its cookie, before sign-in)."""
        if self.session is not None:
            return self.session.csrf
        if self._csrf_cookie is None:
            self._csrf_cookie = secrets.token_urlsafe(24)
            set_cookie(self.request, CSRF_COOKIE, self._csrf_cookie, 3600, self.secure)
        return self._csrf_cookie

    def csrf_valid(self) -> bool:
        expected = self.session.csrf if self.session is not None else self._csrf_cookie
        return csrf_matches(expected, self.form().get("csrf"))

    @property
    def secure(self) -> bool:
        """Whether cookies get the Secure flag (always but on plain HTTP off localhost)."""
        if self.request.isSecure():
            return True
        host = (self.request.getRequestHostname() or b"").decode("latin-1")
        return host in ("localhost", "127.0.0.1", "::1")


def _cookie(request: server.Request, name: bytes) -> Optional[str]:
    value = request.getCookie(name)
    return None if value is None else value.decode("latin-1")


Handler = Callable[[PageCall], Awaitable[Answer]]


@attr.s(auto_attribs=True, frozen=True)
class Route:
    method: str
    pattern: Pattern[str]
    handler: Handler
    #: False: served without a session (sign-in, static files).
    signed_in: bool


class PortalResource(Resource):
    """Every path under ``/portal``: finds the session, checks CSRF, runs the handler."""

    isLeaf = True
    log = Logger()

    def __init__(self, sessions: Sessions, render_error: Callable[[int, str], str]) -> None:
        super().__init__()
        self._sessions = sessions
        self._render_error = render_error
        self._routes: List[Route] = []

    def add(self, method: str, path: str, handler: Handler, signed_in: bool = True) -> None:
        """``path`` below ``/portal``, a regular expression that may name groups."""
        self._routes.append(Route(method, re.compile(PREFIX + path + r"\Z"), handler, signed_in))

    def _match(self, method: str, path: str) -> Tuple[Optional[Route], Dict[str, str], bool]:
        other_method = False
        for route in self._routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method == method:
                return route, {k: unquote(v) for k, v in found.groupdict().items()}, False
            other_method = True
        return None, {}, other_method

    def render(self, request: server.Request) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        d = Deferred.fromCoroutine(self._handle(request))
        d.addErrback(self._internal_error, request)
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request) -> None:
        assert request.path is not None
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        if method == "HEAD":
            method = "GET"
        route, params, other_method = self._match(method, path)
        if route is None:
            if other_method:
                self._error(request, 405, "This page does not take that method.")
            else:
                self._error(request, 404, "There is no such page in the portal.")
            return
        # Pages served before sign-in check their forms against the CSRF cookie.
        session = None
        if route.signed_in:
            session = await self._sessions.find(_cookie(request, COOKIE))
        call = PageCall(request, params, session)
        if route.signed_in and session is None:
            if method == "GET":
                self._redirect(request, f"{PREFIX}/signin?next={quote(path, safe='/')}")
            else:
                self._error(request, 403, "Sign in first (your session ended).")
            return
        if method == "POST" and not (call.csrf_valid() and _same_origin(request)):
            self._error(
                request,
                403,
                "This form was not sent from a page of this portal (its CSRF token is "
                "missing or wrong); reload the page and try again.",
            )
            return
        answer = await route.handler(call)
        if answer is STREAMED or request.finished or request._disconnected:
            return
        if isinstance(answer, Redirect):
            self._redirect(request, answer.location)
        elif isinstance(answer, Page):
            self._write(request, answer.status, answer.html)
        else:
            raise TypeError(f"a portal handler answered {answer!r}")

    @staticmethod
    def _write(request: server.Request, status: int, html: str) -> None:
        data = html.encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()

    @staticmethod
    def _redirect(request: server.Request, location: str) -> None:
        # Only paths of the portal: never an address a form or a query chose.
        if not location.startswith(PREFIX + "/") or location.startswith("//"):
            location = PREFIX + "/"
        request.setResponseCode(303)
        request.setHeader(b"location", location.encode("utf-8"))
        request.setHeader(b"content-length", b"0")
        request.finish()

    def _error(self, request: server.Request, status: int, message: str) -> None:
        self._write(request, status, self._render_error(status, message))

    def _internal_error(self, failure: Failure, request: server.Request) -> None:
        answer_internal_error(
            self.log,
            failure,
            request,
            "portal ",
            lambda: self._error(
                request, 500, "The portal failed to answer; the service log says why."
            ),
        )


def _same_origin(request: server.Request) -> bool:
    """False if the browser says the request comes from another origin."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host")
    if not host or origin == b"null":
        return False
    return urlsplit(origin.decode("latin-1")).netloc == host.decode("latin-1")


class Dispatch(Resource):
    """The site's root: ``/`` and ``/portal/...`` to the portal, the rest to the API."""

    isLeaf = True

    def __init__(self, api: Resource, portal: Resource) -> None:
        super().__init__()
        self._api = api
        self._portal = portal

    def render(self, request: server.Request) -> Any:
        path = request.path or b""
        if path == PREFIX.encode() or path.startswith(PREFIX.encode() + b"/"):
            return self._portal.render(request)
        if path == b"/" and request.method in (b"GET", b"HEAD"):
            request.setResponseCode(303)
            request.setHeader(b"location", PREFIX.encode() + b"/")
            return b""
        return self._api.render(request)
