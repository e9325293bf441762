"""Live parts of the portal's pages: server-sent events over ``twisted.web``.

A :class:`Stream` answers one ``GET`` with ``text/event-stream`` and sends an
event whenever what it shows changed: it reads again when the service stored
results or status reports (:meth:`LiveHub.changed`, an observer of the result
ingest; at most every 0.1 s), and every ``period`` seconds in any case (an endpoint goes offline
when its reports stop, with nothing stored).  A stream ends after ``lifetime``
seconds, or when its session ends (it sends ``signedout`` first); the browser's
``EventSource`` opens a new one by itself.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional, Set

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import server

from funcx_endpoint.lifecycle import cancel_call

__all__ = ["LiveHub", "Stream"]

#: How soon after a wake-up a stream reads (wake-ups within it are one read).
_SETTLE = 0.02
#: Reads of one stream start at least this far apart (a busy ingest wakes it often).
_MIN_GAP = 0.1
#: A comment line at least this often keeps proxies from closing a quiet stream.
_KEEPALIVE = 15.0


class LiveHub:
    """The open streams; :meth:`changed` wakes them all."""

    def __init__(self) -> None:
        self.streams: Set[Stream] = set()

    def changed(self) -> None:
        for stream in list(self.streams):
            stream.wake()

    def close_all(self) -> None:
        for stream in list(self.streams):
            stream.close()


class Stream:
    """One event stream: ``event`` with the JSON of ``snapshot()`` each time it changes.

    ``snapshot()`` returns None when the viewer may no longer see it (the session
    ended): the stream then sends ``signedout`` and ends.
    """

    log = Logger()

    def __init__(
        self,
        hub: LiveHub,
        clock: IReactorTime,
        request: server.Request,
        event: str,
        snapshot: Callable[[], Awaitable[Optional[Any]]],
        period: float = 5.0,
        lifetime: float = 300.0,
    ) -> None:
        self._hub = hub
        self._clock = clock
        self._request = request
        self._event = event
        self._snapshot = snapshot
        self._period = period
        self._ends_at = clock.seconds() + lifetime
        self._last: Optional[str] = None
        self._last_write = clock.seconds()
        self._last_read = float("-inf")
        self._call: Optional[IDelayedCall] = None
        self._busy = False
        self._again = False
        self.closed = False
        self.sent = 0

    def start(self) -> None:
        request = self._request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"retry: 1000\n\n")
        request.notifyFinish().addBoth(lambda _: self._stop())
        self._hub.streams.add(self)
        self._schedule(0.0)

    def wake(self) -> None:
        """Read again soon (something was stored)."""
        if self._busy:
            self._again = True
            return
        delay = max(_SETTLE, self._last_read + _MIN_GAP - self._clock.seconds())
        if self._call is not None and self._call.active():
            if self._call.getTime() - self._clock.seconds() <= delay:
                return
            self._call.cancel()
        self._schedule(delay)

    def close(self) -> None:
        """End the stream (the service stops, the session ended, the lifetime is over)."""
        if self.closed:
            return
        self._stop()
        if not self._request.finished and not getattr(self._request, "_disconnected", False):
            self._request.finish()

    def _stop(self) -> None:
        self.closed = True
        self._hub.streams.discard(self)
        cancel_call(self._call)
        self._call = None

    def _schedule(self, delay: float) -> None:
        if self.closed:
            return
        self._call = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        d = Deferred.fromCoroutine(self._read())
        d.addErrback(lambda f: self.log.failure("A live stream failed; closing it", f))
        d.addErrback(lambda _: self.close())

    async def _read(self) -> None:
        self._busy = True
        self._last_read = self._clock.seconds()
        try:
            value = await self._snapshot()
        finally:
            self._busy = False
        if self.closed:
            return
        now = self._clock.seconds()
        if value is None:
            self._write("signedout", "{}")
            self.close()
            return
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        if text != self._last:
            self._last = text
            self._write(self._event, text)
        elif now - self._last_write >= _KEEPALIVE:
            self._request.write(b": keep-alive\n\n")
            self._last_write = now
        if now >= self._ends_at:
            self.close()
            return
        if self._again:
            self._again = False
            self._schedule(_SETTLE)
        else:
            self._schedule(self._period)

    def _write(self, event: str, data: str) -> None:
        self._request.write(f"event: {event}\ndata: {data}\n\n".encode())
        self._last_write = self._clock.seconds()
        self.sent += 1
