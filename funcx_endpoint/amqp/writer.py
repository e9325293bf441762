"""Coalesced writes: what a protocol writes in one reactor turn leaves in one
``transport.write`` (one TLS record instead of one per frame)."""

from __future__ import annotations

from typing import List, Optional, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol

from funcx_endpoint.amqp.codec import Buffer
from funcx_endpoint.lifecycle import cancel_call

__all__ = ["CoalescingWriter"]


class CoalescingWriter:
    """Buffers what is written to ``protocol``'s transport until the end of the
    reactor turn (a ``callLater(0)`` on ``clock``), then writes it at once.

    Parts written with :meth:`write_many` are kept as they are until the
    flush joins everything once (a large body is not copied twice).  What is
    written while the protocol has no transport is dropped at the flush.
    """

    def __init__(self, clock: IReactorTime, protocol: Protocol) -> None:
        self._clock = clock
        self._protocol = protocol
        self._out: List[Buffer] = []
        self._flush_call: Optional[IDelayedCall] = None
        #: when data last went out, on ``clock``
        self.last_sent = clock.seconds()

    def write(self, data: bytes) -> None:
        """Write ``data`` at the end of this reactor turn."""
        self._out.append(data)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def write_many(self, parts: Sequence[Buffer]) -> None:
        """Write ``parts``, one after the other, at the end of this reactor turn."""
        self._out.extend(parts)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def flush_now(self) -> None:
        """Write what is buffered without waiting for the reactor turn to end."""
        if self._flush_call is not None:
            self._flush_call.cancel()
        self._flush()

    def stop(self) -> None:
        """Cancel the pending flush (the connection is gone)."""
        cancel_call(self._flush_call)
        self._flush_call = None

    def _flush(self) -> None:
        self._flush_call = None
        out, self._out = self._out, []
        transport = self._protocol.transport
        if out and transport is not None:
            self.last_sent = self._clock.seconds()
            transport.write(b"".join(out))
