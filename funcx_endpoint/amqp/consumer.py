"""Consuming a queue exclusively, with prefetch, and batched acknowledgements.

:class:`ExclusiveConsumer` declares the queue passively (the service owns
it), sets the prefetch and consumes it exclusively, so a second consumer of
the same queue is refused by the broker.  Refusals that retrying cannot cure
are raised as fatal :class:`~funcx_endpoint.amqp.connection.AMQPError`\\ s.

:class:`AckBatcher` settles the deliveries of one channel: it releases or
rejects those the owner gives up, and acknowledges those the owner says are
done: once per
reactor turn, the longest run of done tags below the oldest outstanding one
goes in a single ``basic.ack`` with ``multiple=True``; done tags above an
outstanding one (a long task holding the run up) are acked one by one, so
the prefetch window never fills with finished work.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Dict, List, Optional, Set

from twisted.internet.interfaces import IReactorTime
from txamqp.client import Closed

from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.connection import (
    ACCESS_REFUSED,
    NOT_FOUND,
    RESOURCE_LOCKED,
    AMQPError,
    close_reason,
)
from funcx_endpoint.amqp.interfaces import IAMQPChannel


class QueueHeldElsewhere(AMQPError):
    """The broker refused the exclusive consumer: someone else consumes the queue.

    Usually another instance of the endpoint; after a reconnect it may also be
    this endpoint's own previous connection, which the broker has not yet
    noticed is gone (its owner decides how long to keep trying).
    """


def _closed_error(
    closed: Closed,
    fatal: Callable[[Optional[int], str], Optional[AMQPError]],
    refused: str,
    doing: str,
) -> AMQPError:
    """The error of a step the broker closed the channel on: ``fatal(code, text)``
    if that names one; fatal too if the broker refused ``refused`` (access); else
    ``doing`` failed (and may work later)."""
    code, text = close_reason(closed)
    error = fatal(code, text)
    if error is not None:
        return error
    if code == ACCESS_REFUSED:
        return AMQPError(f"the broker refused {refused}: {text}", code, fatal=True)
    return AMQPError(f"{doing} failed: {text}", code)


class ExclusiveConsumer:
    """Consumes one queue on one channel, as its only consumer."""

    def __init__(
        self,
        channel: IAMQPChannel,
        queue: str,
        on_delivery: Callable[[Delivery], None],
        prefetch: int,
        consumer_tag: str,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.prefetch = prefetch
        self.consumer_tag = consumer_tag
        channel.handlers.consumers[consumer_tag] = on_delivery

    async def start(self, exchange: Optional[str] = None) -> None:
        """Declare passively, set the prefetch, and start consuming."""
        queue = self.queue
        try:
            if exchange:
                await self.channel.exchange_declare(exchange=exchange, passive=True)
            await self.channel.queue_declare(queue=queue, passive=True)
        except Closed as e:
            raise _closed_error(
                e,
                lambda code, text: self._missing(exchange, code, text),
                f"access to queue {queue!r}",
                f"declaring queue {queue!r}",
            ) from None
        await self.channel.basic_qos(prefetch_count=self.prefetch)
        try:
            await self.channel.basic_consume(
                queue=queue, consumer_tag=self.consumer_tag, exclusive=True
            )
        except Closed as e:
            raise _closed_error(
                e, self._held_elsewhere, f"consuming {queue!r}", f"consuming {queue!r}"
            ) from None

    def _missing(
        self, exchange: Optional[str], code: Optional[int], text: str
    ) -> Optional[AMQPError]:
        """Fatal: the exchange or queue is not there (the service owns them)."""
        if code != NOT_FOUND:
            return None
        what = f"exchange {exchange!r}" if "exchange" in text else f"queue {self.queue!r}"
        return AMQPError(
            f"the broker has no {what}; the funcX service owns it: register the "
            f"endpoint again (or ask the service's operator): {text}",
            code,
            fatal=True,
        )

    def _held_elsewhere(self, code: Optional[int], text: str) -> Optional[AMQPError]:
        """Fatal (:class:`QueueHeldElsewhere`): another consumer holds the queue."""
        if code not in (ACCESS_REFUSED, RESOURCE_LOCKED) or "exclusive" not in text:
            return None
        return QueueHeldElsewhere(
            f"queue {self.queue!r} is already consumed by another endpoint instance "
            f"(another `funcx-endpoint start` of this endpoint, here or elsewhere); "
            f"stop that one first ({text})",
            code,
            fatal=True,
        )

    async def cancel(self) -> None:
        """Stop receiving deliveries (those held stay unacked)."""
        if not self.channel.closed:
            await self.channel.basic_cancel(consumer_tag=self.consumer_tag)


class AckBatcher:
    """Acknowledges done deliveries of one channel, batched per reactor turn.

    A delivery may hold several parts (a batch of tasks): it is acknowledged
    once :meth:`done` was called for each.  A delivery given back
    (:meth:`release`, :meth:`reject`) is settled at once, whatever its parts;
    later :meth:`done` calls for it are ignored.
    """

    def __init__(self, channel: IAMQPChannel, clock: IReactorTime) -> None:
        self.channel = channel
        self._clock = clock
        self._outstanding: List[int] = []  # heap of delivered, not yet done tags
        self._done: Set[int] = set()  # done, not yet acked
        self._settled: Set[int] = set()  # rejected or released: no ack due
        self._given_back: Set[int] = set()  # rejected or released, ever, on this channel
        self._parts: Dict[int, int] = {}  # deliveries of several parts: parts not done
        self._scheduled: Optional[Any] = None
        self.ack_frames = 0

    def delivered(self, tag: int, parts: int = 1) -> None:
        """Delivery ``tag`` arrived, holding ``parts`` parts."""
        heapq.heappush(self._outstanding, tag)
        if parts > 1:
            self._parts[tag] = parts

    def settled(self, tag: int) -> None:
        """``tag`` was rejected or released: it needs no ack and holds nothing up."""
        self._settled.add(tag)

    def release(self, tag: int) -> None:
        """Give delivery ``tag`` back to the broker, to be delivered again (once)."""
        if self._give_back(tag):
            self.channel.reject(tag, requeue=True)

    def reject(self, tag: int) -> None:
        """Refuse delivery ``tag`` for good (a message nobody can use)."""
        if self._give_back(tag):
            self.channel.reject(tag, requeue=False)

    def _give_back(self, tag: int) -> bool:
        if tag in self._given_back:
            return False  # a second reject of a tag would close the channel
        self._given_back.add(tag)
        self._parts.pop(tag, None)
        self._done.discard(tag)
        self.settled(tag)
        return True

    def done(self, tag: int) -> None:
        """One part of ``tag`` may be acknowledged (its result is safe)."""
        if tag in self._given_back:
            return
        left = self._parts.get(tag)
        if left is not None:
            if left > 1:
                self._parts[tag] = left - 1
                return
            del self._parts[tag]
        self._done.add(tag)
        if self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._scheduled = None
        done = self._done
        if not done or self.channel.closed:
            return
        heap = self._outstanding
        settled = self._settled
        # Drop done (and settled) tags from the top of the heap: they form
        # the run one multiple ack can cover.
        highest_run = 0
        while heap and (heap[0] in done or heap[0] in settled):
            tag = heapq.heappop(heap)
            if tag in settled:
                settled.discard(tag)
            else:
                highest_run = tag
        singles = []
        if highest_run:
            for tag in list(done):
                if tag <= highest_run:
                    done.discard(tag)
            self.channel.ack(highest_run, multiple=True)
            self.ack_frames += 1
        # Tags above an outstanding one: ack individually.
        for tag in sorted(done):
            singles.append(tag)
            self.channel.ack(tag, multiple=False)
            self.ack_frames += 1
        if singles:
            done.clear()
            remaining = set(singles)
            self._outstanding = [t for t in heap if t not in remaining and t not in settled]
            heapq.heapify(self._outstanding)
            settled.clear()

    @property
    def unacked(self) -> int:
        """Deliveries neither acknowledged nor settled (rejected, released)."""
        # Settled tags stay in the heap until a flush drops them; every
        # settled tag is in it.
        return len(self._outstanding) - len(self._settled)
