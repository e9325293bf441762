"""Browser sessions of the portal: opened at sign-in, found by cookie, revoked.

A session is a random token in a cookie that is ``Secure``, ``HttpOnly``,
``SameSite=Strict`` and expires; the database keeps its SHA-256 hash, its
owner, its CSRF token and its expiry (:mod:`funcx_endpoint.portal.store`), so
signing out, ``funcx-service portal-revoke NAME`` and revoking the client end
it at once, on every instance.  Found sessions are cached for a second at
most (a page and its live stream ask together).
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any, Dict, Optional, Tuple

from twisted.internet.interfaces import IReactorTime

from funcx_endpoint.portal import store
from funcx_endpoint.portal.store import Session
from funcx_endpoint.webservice.storage import Storage

__all__ = ["COOKIE", "CSRF_COOKIE", "LINK_SECONDS", "SESSION_SECONDS", "Sessions", "csrf_matches"]

#: The session cookie's name.
COOKIE = b"funcx_portal"
#: Before sign-in: the cookie the sign-in forms' CSRF token is checked against.
CSRF_COOKIE = b"funcx_portal_csrf"
#: How long a session lasts.
SESSION_SECONDS = 8 * 3600
#: How long a sign-in link printed by ``funcx-service portal-link`` works.
LINK_SECONDS = 15 * 60
_CACHE_SECONDS = 1.0


def csrf_matches(expected: Optional[str], given: Optional[str]) -> bool:
    """Whether a form's CSRF token is the expected one (constant time)."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def set_cookie(request: Any, name: bytes, value: str, max_age: int, secure: bool = True) -> None:
    """Set a portal cookie: HttpOnly, SameSite=Strict, Secure, for /portal only."""
    request.addCookie(
        name,
        value.encode(),
        path=b"/portal",
        max_age=str(max_age).encode(),
        secure=secure,
        httpOnly=True,
        sameSite="strict",
    )


class Sessions:
    """Opens, finds and closes sessions in ``storage``, by ``clock``'s time."""

    def __init__(
        self, storage: Storage, clock: IReactorTime, lifetime: float = SESSION_SECONDS
    ) -> None:
        self._storage = storage
        self._clock = clock
        self.lifetime = lifetime
        self._cache: Dict[str, Tuple[Session, float]] = {}

    async def open(self, identity_id: str, client_id: str) -> Tuple[str, Session]:
        """A new session of ``identity_id``: ``(cookie token, session)``."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        now = self._clock.seconds()
        await self._storage.run(
            store.insert_session,
            store.token_hash(token),
            identity_id,
            client_id,
            csrf,
            now,
            now + self.lifetime,
        )
        found = await self.find(token)
        assert found is not None
        return token, found

    async def find(self, token: Optional[str]) -> Optional[Session]:
        """The active session of cookie value ``token``, if there is one."""
        if not token or len(token) > 128:
            return None
        hashed = store.token_hash(token)
        now = self._clock.seconds()
        cached = self._cache.get(hashed)
        if cached is not None and cached[1] > now:
            return cached[0] if cached[0].expires > now else None
        found = await self._storage.run(store.find_session, hashed, now)
        if found is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[hashed] = (found, now + _CACHE_SECONDS)
        else:
            self._cache.pop(hashed, None)
        return found

    async def close(self, token: Optional[str]) -> None:
        """Revoke the session of cookie value ``token`` (sign-out)."""
        if not token:
            return
        hashed = store.token_hash(token)
        self._cache.pop(hashed, None)
        await self._storage.run(store.revoke_session, hashed)

    async def use_link(self, token: str) -> Optional[Tuple[str, str]]:
        """``(identity_id, client_id)`` of a valid one-time link token, now used up."""
        if not token or len(token) > 128:
            return None
        return await self._storage.run(
            store.use_link, store.token_hash(token), self._clock.seconds()
        )

    async def purge(self) -> int:
        self._cache.clear()
        return await self._storage.run(store.purge, self._clock.seconds())


def new_link(call: Any, name: str, now: float) -> Optional[Tuple[str, Any]]:
    """For ``funcx-service portal-link``: a one-time sign-in token for the active client
    ``name`` (``call`` from :func:`~funcx_endpoint.webservice.storage.open_sync`),
    and the client; None if there is no such client."""
    client = call(store.active_client_named)(name)
    if client is None:
        return None
    token = secrets.token_urlsafe(32)
    call(store.insert_link)(
        store.token_hash(token), client.identity_id, client.client_id, now, now + LINK_SECONDS
    )
    return token, client
