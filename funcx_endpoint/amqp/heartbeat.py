"""AMQP heartbeats on two cheap periodic checks.

txAMQP reschedules a timer on every frame when heartbeats are on;
:class:`Heartbeats` instead looks twice an interval at when data last went
out, and once an interval at when data last came in.
"""

from __future__ import annotations

from typing import Callable, List

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from funcx_endpoint.amqp.codec import FRAME_HEARTBEAT, encode_frame
from funcx_endpoint.amqp.writer import CoalescingWriter
from funcx_endpoint.lifecycle import stop_loop

__all__ = ["Heartbeats"]

_HEARTBEAT = encode_frame(FRAME_HEARTBEAT, 0, b"")


@attr.s(auto_attribs=True, eq=False, repr=False)
class Heartbeats:
    """Keeps a connection's heartbeats, on ``clock``.

    Once :meth:`start` is called with the negotiated interval, a heartbeat frame is
    written through ``writer`` when nothing else went out for half an
    interval, and ``drop()`` is called (to abort the connection) when nothing
    came in (:meth:`heard`) for more than ``max_unseen`` intervals.
    """

    log = Logger()

    _clock: IReactorTime
    _writer: CoalescingWriter
    _drop: Callable[[], None]
    _max_unseen: int
    _interval: float = attr.ib(default=0.0, init=False)
    _calls: List[LoopingCall] = attr.ib(factory=list, init=False)
    _last_received: float = attr.ib(init=False)

    @_last_received.default
    def _now(self) -> float:
        return self._clock.seconds()

    def heard(self) -> None:
        """Data came in from the peer."""
        self._last_received = self._clock.seconds()

    def start(self, interval: float) -> None:
        """Start the checks (nothing happens for an interval of 0: heartbeats are off)."""
        if interval <= 0:
            return
        self._interval = interval
        send = LoopingCall(self._maybe_send)
        send.clock = self._clock
        check = LoopingCall(self._check_peer)
        check.clock = self._clock
        self._calls = [send, check]
        send.start(interval / 2.0, now=False)
        check.start(interval, now=False)

    def stop(self) -> None:
        """Stop the checks."""
        for call in self._calls:
            stop_loop(call)
        self._calls = []

    def _maybe_send(self) -> None:
        if self._clock.seconds() - self._writer.last_sent >= self._interval / 2.0:
            self._writer.write(_HEARTBEAT)

    def _check_peer(self) -> None:
        silent = self._clock.seconds() - self._last_received
        if silent > self._interval * self._max_unseen:
            self.log.warn(
                "No data from the broker for {silent:.0f} s: dropping the connection",
                silent=silent,
            )
            self._drop()
