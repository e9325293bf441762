"""Publishing with RabbitMQ publisher confirms, many messages in flight.

Each :meth:`ConfirmingPublisher.publish` returns a Deferred that fires when
the broker confirms the message (``basic.ack``) and fails with
:class:`PublishFailed` when the broker refuses it (``basic.nack``), returns it
as unroutable (``basic.return`` of a mandatory message), or when the channel
or connection goes away before the confirm arrives.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from funcx_endpoint.amqp.channel import Returned
from funcx_endpoint.amqp.codec import Body, Properties
from funcx_endpoint.amqp.connection import close_reason
from funcx_endpoint.amqp.interfaces import IAMQPChannel

_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


@attr.s(auto_attribs=True, eq=False, repr=False)
class PublishFailed(Exception):
    """A message was not confirmed by the broker.

    ``returned``: the broker could not route it; ``nacked``: the broker
    refused it; otherwise the channel or connection was lost (``code`` and
    ``text`` say why if the broker said).  ``too_large`` holds the broker's
    size limit when the broker closed the channel because *this* message
    exceeded it.
    """

    text: str
    code: Optional[int] = attr.ib(default=None, kw_only=True)
    returned: bool = attr.ib(default=False, kw_only=True)
    nacked: bool = attr.ib(default=False, kw_only=True)
    too_large: Optional[int] = attr.ib(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        super().__init__(self.text)  # its args: the text alone


class ConfirmingPublisher:
    """Publishes on one channel in confirm mode and tracks each confirm."""

    log = Logger()

    def __init__(
        self, channel: IAMQPChannel, on_closed: Optional[Callable[[Any], None]] = None
    ) -> None:
        """``on_closed(reason)`` is called once when the channel goes away."""
        self.channel = channel
        self._on_closed = on_closed
        self._next_seq = 1
        # seq -> (deferred, body size, message id); insertion order is seq order
        self._pending: Dict[int, Tuple[Deferred[None], int, Optional[str]]] = {}
        self._by_message_id: Dict[str, int] = {}
        self._returned: Dict[int, Returned] = {}
        self.closed = False
        self.confirmed = 0
        handlers = channel.handlers
        handlers.on_ack = self._acked
        handlers.on_nack = self._nacked
        handlers.on_return = self._returned_message
        handlers.on_close = self._channel_closed

    async def start(self) -> None:
        """Put the channel in confirm mode."""
        await self.channel.confirm_select()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: Body,
        properties: Optional[Properties] = None,
        mandatory: bool = True,
    ) -> Deferred[None]:
        """Publish ``body`` (bytes, or pieces); the Deferred fires when the
        broker confirms it."""
        d: Deferred[None] = Deferred()
        if self.closed:
            d.errback(PublishFailed("the channel is closed"))
            return d
        seq = self._next_seq
        props = dict(properties) if properties else {}
        message_id = props.get("message-id")
        if message_id is None:
            message_id = props["message-id"] = f"seq-{seq}"
        try:
            self.channel.publish(exchange, routing_key, body, props, mandatory)
        except Exception as e:  # nothing was sent (bad properties): no sequence number used
            d.errback(PublishFailed(f"the message could not be published: {e}"))
            return d
        # The broker's confirm cannot arrive before the reactor runs again.
        self._next_seq += 1
        size = len(body) if isinstance(body, bytes) else sum(len(piece) for piece in body)
        self._pending[seq] = (d, size, message_id)
        self._by_message_id[message_id] = seq
        return d

    def _settle(self, seq: int, error: Optional[PublishFailed]) -> None:
        entry = self._pending.pop(seq, None)
        if entry is None:
            return
        d, _, message_id = entry
        if message_id is not None and self._by_message_id.get(message_id) == seq:
            del self._by_message_id[message_id]
        returned = self._returned.pop(seq, None)
        if error is None and returned is not None:
            error = PublishFailed(
                f"the broker could not route the message ({returned.reply_code} "
                f"{returned.reply_text}, exchange {returned.exchange!r}, "
                f"routing key {returned.routing_key!r})",
                code=returned.reply_code,
                returned=True,
            )
        if d.called:  # cancelled by its owner
            return
        if error is None:
            self.confirmed += 1
            d.callback(None)
        else:
            d.errback(error)

    def _up_to(self, tag: int, multiple: bool) -> list[int]:
        if not multiple:
            return [tag] if tag in self._pending else []
        seqs = []
        for seq in self._pending:
            if seq > tag:
                break
            seqs.append(seq)
        return seqs

    def _acked(self, tag: int, multiple: bool) -> None:
        for seq in self._up_to(tag, multiple):
            self._settle(seq, None)

    def _nacked(self, tag: int, multiple: bool) -> None:
        for seq in self._up_to(tag, multiple):
            self._settle(seq, PublishFailed("the broker refused the message (nack)", nacked=True))

    def _returned_message(self, returned: Returned) -> None:
        message_id = returned.properties.get("message-id")
        seq = self._by_message_id.get(message_id) if message_id is not None else None
        if seq is None:
            self.log.warn("A returned message matches nothing in flight ({id})", id=message_id)
            return
        self._returned[seq] = returned

    def _channel_closed(self, reason: Any) -> None:
        if self.closed:
            return
        self.closed = True
        code, text = close_reason(reason)
        too_large = _TOO_LARGE.search(text)
        limit = int(too_large.group(2)) if too_large else None
        pending, self._pending = self._pending, {}
        self._by_message_id = {}
        self._returned = {}
        if self._on_closed is not None:
            self._on_closed(reason)
        for d, length, _ in pending.values():
            if d.called:
                continue
            d.errback(
                PublishFailed(
                    f"the channel closed before the broker confirmed: {text}",
                    code=code,
                    # Every message over the limit the broker named (not only
                    # the one it refused) would be refused too.
                    too_large=limit if limit is not None and length > limit else None,
                )
            )
