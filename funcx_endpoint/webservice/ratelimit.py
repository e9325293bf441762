"""Back-off for failed logins, so that guessing secrets is slow and cheap to refuse.

Every secret check (``POST /v2/oauth2/token`` and ``/introspect``) costs an
scrypt of about 50 ms on the thread pool.  :class:`LoginGuard` decides, before
that check, whether it runs at all:

* failures are counted per **pair** (client id, source address), per **client
  id** and per **source address**; each count forgives one failure every
  ``decay`` seconds (a leaky bucket);
* a count over its free allowance blocks its key: after the last failure, for
  ``first_delay`` seconds, doubling with each further failure up to
  ``max_delay``; a blocked caller is answered 429 with ``Retry-After`` and no
  secret check, after ``refusal_delay`` seconds (at most the time it must wait):
  a guesser that ignores ``Retry-After`` gets about one answer per second per
  connection instead of hundreds, which would load the service as much as the
  checks they replace;
* a pair that logged in successfully is **trusted** for ``trusted_for``
  seconds: its logins are held back only by failures of that very pair, so a
  brute force against a client id, from other addresses, does not lock out its
  owner;
* a **clean** address (no failure counted against it, no other check of it
  running) has its check run at once too: a new client's first login is not
  queued behind an attack from elsewhere;
* checks of other callers (suspect addresses) run at most ``untrusted_checks``
  at a time, ``suspect_interval`` seconds apart at least (5 per second), with
  at most ``untrusted_queue`` waiting (beyond that: 429): however
  many connections an attacker opens, his guesses use that many threads (plus
  one per address until its first failure), and legitimate logins keep the
  rest of the pool.

State lives in memory (one service instance), bounded by ``max_keys`` entries.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Awaitable, Callable, Dict, Optional, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from funcx_endpoint.webservice.http import APIError

__all__ = ["LoginGuard", "LoginLimits"]


@attr.s(auto_attribs=True, frozen=True)
class LoginLimits:
    """The knobs of :class:`LoginGuard` (defaults fit a service open to the Internet)."""

    #: Failures allowed before back-off, per (client id, address) pair, client id, address.
    pair_free: int = 5
    client_free: int = 10
    address_free: int = 20
    #: One failure of a count is forgiven every this many seconds.
    decay: float = 60.0
    #: Back-off after the free failures: first delay, doubled per failure, capped.
    first_delay: float = 1.0
    max_delay: float = 300.0
    #: A pair that logged in is trusted this long (seconds).
    trusted_for: float = 30 * 24 * 3600.0
    #: Secret checks of untrusted callers at once, and how many may wait.
    untrusted_checks: int = 1
    untrusted_queue: int = 64
    #: Entries kept in memory (counts, trusted pairs) before the oldest are forgotten.
    max_keys: int = 100_000
    #: Checks of suspect callers start at least this far apart (seconds).
    suspect_interval: float = 0.2
    #: A refusal is answered after this long (at most the wait it announces).
    refusal_delay: float = 1.0


@attr.s(auto_attribs=True)
class _Count:
    failures: float
    last: float


class _Counts:
    """Decaying failure counts by key, oldest first, at most ``max_keys``."""

    def __init__(self, limits: LoginLimits) -> None:
        self._limits = limits
        self._counts: OrderedDict[Tuple[str, ...], _Count] = OrderedDict()

    def _current(self, key: Tuple[str, ...], now: float) -> float:
        count = self._counts.get(key)
        if count is None:
            return 0.0
        return max(0.0, count.failures - (now - count.last) / self._limits.decay)

    def blocked_for(self, key: Tuple[str, ...], free: int, now: float) -> float:
        """Seconds ``key`` must still wait (0: not blocked)."""
        count = self._counts.get(key)
        if count is None:
            return 0.0
        # The count decays continuously; it is read to the nearest failure, so
        # that ``free`` failures in a row block, however little time they took.
        excess = self._current(key, now) - free
        if excess < -0.5:
            return 0.0
        over = max(0, math.floor(excess + 0.5))
        delay = min(self._limits.first_delay * 2.0**over, self._limits.max_delay)
        return max(0.0, count.last + delay - now)

    def clean(self, key: Tuple[str, ...], now: float) -> bool:
        """Whether no failure of ``key`` is counted (any there was has decayed)."""
        return self._current(key, now) <= 0.0

    def fail(self, key: Tuple[str, ...], now: float) -> None:
        failures = self._current(key, now) + 1
        self._counts.pop(key, None)
        self._counts[key] = _Count(failures, now)
        while len(self._counts) > self._limits.max_keys:
            self._counts.popitem(last=False)

    def clear(self, key: Tuple[str, ...]) -> None:
        self._counts.pop(key, None)


class LoginGuard:
    """Runs secret checks under the limits of :class:`LoginLimits`; see the module.

    Time is ``clock``'s.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, limits: Optional[LoginLimits] = None) -> None:
        self._clock = clock
        self.limits = limits or LoginLimits()
        self._counts = _Counts(self.limits)
        self._trusted: OrderedDict[Tuple[str, str], float] = OrderedDict()
        self._running = 0
        self._next_suspect = 0.0
        self._waiting: list[Deferred[None]] = []
        #: Addresses whose one check runs outside the queue (as a clean address).
        self._clean_running: set[str] = set()
        #: What was refused so far, by reason (for logs and benchmarks).
        self.refused: Dict[str, int] = {"blocked": 0, "busy": 0}

    def trusted(self, client_id: str, address: str) -> bool:
        until = self._trusted.get((client_id, address))
        return until is not None and until > self._clock.seconds()

    def _keys(
        self, client_id: str, address: str, trusted: bool
    ) -> list[tuple[Tuple[str, ...], int]]:
        limits = self.limits
        keys: list[tuple[Tuple[str, ...], int]] = [(("pair", client_id, address), limits.pair_free)]
        if not trusted:
            keys.append((("client", client_id), limits.client_free))
            keys.append((("address", address), limits.address_free))
        return keys

    async def check(
        self, client_id: str, address: Optional[str], verify: Callable[[], Awaitable[bool]]
    ) -> bool:
        """Whether ``verify()`` (the secret check) says yes; raises a 429
        :class:`APIError` instead of running it when the caller must wait."""
        where = address or "unknown"
        now = self._clock.seconds()
        trusted = self.trusted(client_id, where)
        keys = self._keys(client_id, where, trusted)
        wait = max(self._counts.blocked_for(key, free, now) for key, free in keys)
        if wait > 0:
            self.refused["blocked"] += 1
            pause = await self._pause(wait)
            raise _too_many(
                wait - pause, "too many failed logins from this address or for this client id"
            )
        if trusted:
            ok = await verify()
        elif where not in self._clean_running and self._counts.clean(("address", where), now):
            self._clean_running.add(where)
            try:
                ok = await verify()
            finally:
                self._clean_running.discard(where)
        else:
            ok = await self._untrusted(verify)
        now = self._clock.seconds()
        if ok:
            self._counts.clear(("pair", client_id, where))
            self._trusted.pop((client_id, where), None)
            self._trusted[(client_id, where)] = now + self.limits.trusted_for
            while len(self._trusted) > self.limits.max_keys:
                self._trusted.popitem(last=False)
        else:
            # Every count grows, a trusted pair's too.
            for key, _ in self._keys(client_id, where, False):
                self._counts.fail(key, now)
        return ok

    async def _pause(self, wait: float) -> float:
        """Hold a refusal back (see ``refusal_delay``); how long it was held."""
        pause = min(wait, self.limits.refusal_delay)
        if pause > 0:
            await deferLater(self._clock, pause)
        return pause

    async def _untrusted(self, verify: Callable[[], Awaitable[bool]]) -> bool:
        if self._running >= self.limits.untrusted_checks:
            if len(self._waiting) >= self.limits.untrusted_queue:
                self.refused["busy"] += 1
                await self._pause(1.0)
                raise _too_many(1.0, "too many logins are being checked now")
            turn: Deferred[None] = Deferred()
            self._waiting.append(turn)
            await turn
        else:
            self._running += 1
        try:
            gap = self._next_suspect - self._clock.seconds()
            if gap > 0:
                await deferLater(self._clock, gap)
            self._next_suspect = self._clock.seconds() + self.limits.suspect_interval
            return await verify()
        finally:
            if self._waiting:
                # The slot passes to the next in line (self._running unchanged).
                self._waiting.pop(0).callback(None)
            else:
                self._running -= 1


def _too_many(wait: float, why: str) -> APIError:
    seconds = max(1, math.ceil(wait))
    message = f"{why}; try again in {seconds} s"
    return APIError(
        429,
        "TOO_MANY_REQUESTS",
        message,
        headers={"Retry-After": str(seconds)},
        error="slow_down",
        error_description=message,
        retry_after=seconds,
    )
