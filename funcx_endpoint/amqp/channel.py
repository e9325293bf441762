"""A channel of :class:`~funcx_endpoint.amqp.client.AMQPClient`: synchronous
handlers and one-write methods for the hot path, txAMQP's requests for the rest.

The client's frame parser hands the channel the messages it receives
(``basic.deliver`` and ``basic.return`` with their content frames, and
publisher confirms); the channel puts each message together and calls its
owner's :class:`ChannelHandlers`.  What the channel sends goes through the
client's writer in one piece per method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

import attr
from twisted.logger import Logger
from txamqp.protocol import AMQChannel
from zope.interface import implementer

from funcx_endpoint.amqp.codec import (
    ACK_PAYLOAD,
    BASIC,
    BASIC_ACK,
    BASIC_NACK,
    BASIC_REJECT,
    FRAME_METHOD,
    HEADER_HEAD,
    Body,
    Properties,
    ProtocolViolation,
    decode_properties,
)
from funcx_endpoint.amqp.interfaces import IAMQPChannel

if TYPE_CHECKING:
    from funcx_endpoint.amqp.client import AMQPClient

__all__ = ["ChannelHandlers", "Delivery", "FastChannel", "Returned"]


@attr.s(auto_attribs=True, slots=True, eq=False)
class _Message:
    """A message with its content: the basic properties and the body."""

    properties: Properties = attr.ib(factory=dict, kw_only=True)
    body: bytes = attr.ib(default=b"", repr=False, kw_only=True)


@attr.s(auto_attribs=True, slots=True, eq=False)
class Delivery(_Message):
    """A message delivered to a consumer."""

    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str


@attr.s(auto_attribs=True, slots=True, eq=False)
class Returned(_Message):
    """A mandatory message the broker could not route (``basic.return``)."""

    reply_code: int
    reply_text: str
    exchange: str
    routing_key: str


class ChannelHandlers:
    """What a channel's owner wants to hear about, all called synchronously."""

    def __init__(self) -> None:
        self.consumers: Dict[str, Callable[[Delivery], None]] = {}
        self.on_ack: Optional[Callable[[int, bool], None]] = None
        self.on_nack: Optional[Callable[[int, bool], None]] = None
        self.on_return: Optional[Callable[[Returned], None]] = None
        self.on_cancel: Optional[Callable[[str], None]] = None
        self.on_close: Optional[Callable[[Any], None]] = None
        self._close_notified = False

    def notify_closed(self, reason: Any) -> None:
        """Call ``on_close(reason)`` once: the channel is gone (and why)."""
        if self._close_notified:
            return
        self._close_notified = True
        if self.on_close is not None:
            self.on_close(reason)


@implementer(IAMQPChannel)
class FastChannel(AMQChannel):
    """A txAMQP channel with synchronous handlers for the hot path.

    (Its AMQP requests, ``exchange_declare`` and the others, come from the
    class txAMQP builds from the spec and mixes in: see
    ``AMQPClient.channelFactory``.)
    """

    log = Logger()

    def __init__(self, id: int, outgoing: Any, client: AMQPClient) -> None:
        super().__init__(id, outgoing, client)
        self.handlers = ChannelHandlers()

        # The message whose content is being received, its body size, the
        # body frames so far and their size.
        self._pending: Union[Delivery, Returned, None] = None
        self._pending_size = 0
        self._pending_chunks: List[bytes] = []
        self._pending_received = 0

    def notify_closed(self, reason: Any) -> None:
        """Tell the channel's owner, once, that the channel is gone (and why)."""
        self.handlers.notify_closed(reason)

    # -- sending ----------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: Body,
        properties: Optional[Properties] = None,
        mandatory: bool = False,
    ) -> None:
        """``basic.publish`` in one write (``body``: bytes, or pieces)."""
        self.client.write_publish(self.id, exchange, routing_key, body, properties or {}, mandatory)

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        """``basic.ack`` of a delivery (``multiple``: all up to this tag)."""
        self._settle(BASIC_ACK, delivery_tag, 1 if multiple else 0)

    def nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        """``basic.nack`` (RabbitMQ): give deliveries back, or drop them."""
        self._settle(BASIC_NACK, delivery_tag, (1 if multiple else 0) | (2 if requeue else 0))

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        """``basic.reject`` of one delivery."""
        self._settle(BASIC_REJECT, delivery_tag, 1 if requeue else 0)

    def _settle(self, method: int, delivery_tag: int, bits: int) -> None:
        self.client.write_frame_payload(
            self.id, FRAME_METHOD, ACK_PAYLOAD.pack(BASIC, method, delivery_tag, bits)
        )

    # -- receiving --------------------------------------------------------

    def confirmed(self, ack: bool, delivery_tag: int, multiple: bool) -> None:
        """The broker's ``basic.ack`` (``ack``) or ``basic.nack`` of our publishes."""
        handler = self.handlers.on_ack if ack else self.handlers.on_nack
        if handler is not None:
            handler(delivery_tag, multiple)

    def cancelled(self, consumer_tag: str) -> None:
        """The broker cancelled a consumer (its queue was deleted, say)."""
        self.handlers.consumers.pop(consumer_tag, None)
        if self.handlers.on_cancel is not None:
            self.handlers.on_cancel(consumer_tag)

    def begin_content(self, message: Union[Delivery, Returned]) -> None:
        """A ``basic.deliver`` or ``basic.return`` arrived: its content frames follow."""
        self._pending = message
        self._pending_size = 0
        self._pending_chunks = []
        self._pending_received = 0

    def content_header(self, payload: bytes) -> bool:
        """The content header frame of the message begun; False if no message
        awaits one (the content is then txAMQP's to read)."""
        message = self._pending
        if message is None:
            return False
        _, _, size, flags = HEADER_HEAD.unpack_from(payload, 0)
        if flags & 1:
            raise ProtocolViolation("more than 15 basic properties are not supported")
        message.properties = decode_properties(flags, payload, 14)
        self._pending_size = size
        if size == 0:
            self._finish_content()
        return True

    def content_body(self, payload: bytes) -> bool:
        """A body frame of the message begun; False if no message awaits one."""
        if self._pending is None:
            return False
        self._pending_chunks.append(payload)
        self._pending_received += len(payload)
        if self._pending_received >= self._pending_size:
            self._finish_content()
        return True

    def _finish_content(self) -> None:
        message = self._pending
        assert message is not None
        chunks = self._pending_chunks
        message.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._pending = None
        self._pending_chunks = []
        if isinstance(message, Delivery):
            consumer = self.handlers.consumers.get(message.consumer_tag)
            if consumer is None:
                self.log.warn(
                    "Delivery for unknown consumer {tag} on channel {channel}: rejected",
                    tag=message.consumer_tag,
                    channel=self.id,
                )
                self.reject(message.delivery_tag, requeue=True)
                return
            consumer(message)
        elif self.handlers.on_return is not None:
            self.handlers.on_return(message)
        else:
            self.log.warn(
                "Message returned by the broker ({code} {text}) and nobody listens",
                code=message.reply_code,
                text=message.reply_text,
            )
