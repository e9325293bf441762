"""An AMQP 0-9-1 client protocol: txAMQP with a fast, synchronous hot path.

txAMQP's :class:`~txamqp.protocol.AMQClient` handles the connection
handshake, channels and synchronous requests (declare, consume, qos, ...)
through Deferred queues.  That costs several Deferreds and a lock per frame,
and it guesses whether bodies are text.  This subclass keeps txAMQP for all
of that, and takes over the frames that are on the hot path of a task
pipeline:

* incoming ``basic.deliver`` (+ header + body frames), ``basic.return``,
  and the broker's ``basic.ack``/``basic.nack`` (publisher confirms) are
  decoded with ``struct`` and handed synchronously to the channel
  (:class:`~funcx_endpoint.amqp.channel.FastChannel`), which calls its
  owner's handlers; bodies are always ``bytes``;
* outgoing ``basic.publish`` and ``basic.ack``/``basic.nack`` are encoded in
  one piece (:mod:`~funcx_endpoint.amqp.codec`);
* everything written in one reactor turn leaves in one ``transport.write``
  (:class:`~funcx_endpoint.amqp.writer.CoalescingWriter`: one TLS record
  instead of one per frame);
* heartbeats are sent and checked by two cheap timers instead of rescheduling
  a timer on every frame (:class:`~funcx_endpoint.amqp.heartbeat.Heartbeats`).

Other frames go through txAMQP's own codec and dispatch, unchanged.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import TwistedDelegate
from txamqp.codec import Codec
from txamqp.connection import Body as BodyFrame
from txamqp.connection import Frame, Header, Method
from txamqp.message import Message
from txamqp.protocol import AMQClient
from zope.interface import implementer

from funcx_endpoint.amqp.channel import Delivery, FastChannel, Returned
from funcx_endpoint.amqp.codec import (
    BASIC,
    BASIC_ACK,
    BASIC_DELIVER,
    BASIC_NACK,
    BASIC_RETURN,
    CLASS_METHOD,
    FRAME_BODY,
    FRAME_END,
    FRAME_END_BYTE,
    FRAME_HEAD,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    ULONG,
    ULONGLONG,
    USHORT,
    Body,
    Buffer,
    Properties,
    ProtocolViolation,
    publish_frames,
    read_shortstr,
    start_ok_payload,
)
from funcx_endpoint.amqp.heartbeat import Heartbeats
from funcx_endpoint.amqp.interfaces import IAMQPClient
from funcx_endpoint.amqp.spec import load_spec
from funcx_endpoint.amqp.writer import CoalescingWriter
from funcx_endpoint.observer import OneShotObserver

__all__ = ["AMQPClient", "AMQPDelegate"]

# Bodies above this are written in pieces instead of joined first.
_LARGE_BODY = 256 * 1024


class AMQPDelegate(TwistedDelegate):
    """Handles the methods txAMQP's delegate does not (confirms, cancel, flow).

    ``connection.start-ok`` is written here rather than by txAMQP, whose
    table codec cannot say ``authentication_failure_close: true``: without
    it RabbitMQ answers a wrong password by dropping the connection, which
    looks like a network error and invites retrying forever.
    """

    log = Logger()

    def connection_start(self, ch: FastChannel, msg: Message) -> None:
        client = self.client
        payload = start_ok_payload(client.mechanism, client.response, client.locale)
        client.write_frame_payload(0, FRAME_METHOD, payload)

    def basic_ack(self, ch: FastChannel, msg: Message) -> None:
        ch.confirmed(True, msg.delivery_tag, msg.multiple)

    def basic_nack(self, ch: FastChannel, msg: Message) -> None:
        ch.confirmed(False, msg.delivery_tag, msg.multiple)

    def basic_cancel(self, ch: FastChannel, msg: Message) -> None:
        ch.cancelled(msg.consumer_tag)

    def connection_blocked(self, ch: FastChannel, msg: Message) -> None:
        self.log.warn(
            "The broker blocked publishing on this connection: {reason}", reason=msg.reason
        )

    def connection_unblocked(self, ch: FastChannel, msg: Message) -> None:
        self.log.info("The broker unblocked publishing on this connection")

    def channel_close(self, ch: FastChannel, msg: Message) -> None:
        super().channel_close(ch, msg)
        ch.notify_closed(msg)


@implementer(IAMQPClient)
class AMQPClient(AMQClient):
    """txAMQP's client with the hot path above; see the module docstring."""

    channelClass = FastChannel
    log = Logger()

    def __init__(
        self,
        vhost: str = "/",
        heartbeat: int = 0,
        clock: Optional[IReactorTime] = None,
        delegate: Optional[TwistedDelegate] = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._buffer = bytearray()
        self._closed: OneShotObserver[Any] = OneShotObserver()
        self.close_reason: Any = None
        self.shield: Any = None  # set by the connection service's endpoint
        super().__init__(delegate or AMQPDelegate(), vhost, load_spec(), heartbeat=0, clock=clock)
        self._writer = CoalescingWriter(self.clock, self)
        self._heartbeats = Heartbeats(
            self.clock, self._writer, self._abort_connection, self.MAX_UNSEEN_HEARTBEAT
        )
        # txAMQP reschedules a timer on every frame when heartbeats are on;
        # we keep its handshake (tune-ok carries our interval) and run our
        # own heartbeats instead.
        self.heartbeatInterval = heartbeat
        self.started.wait().addCallbacks(lambda _: self._start_heartbeats(), lambda _: None)

    # -- connection state -------------------------------------------------

    def when_closed(self) -> Deferred[Any]:
        """A Deferred that fires when the connection is lost, with the reason
        (an exception, or the broker's ``connection.close`` message)."""
        return self._closed.when_fired()

    def connectionLost(self, reason: Failure) -> None:
        self._heartbeats.stop()
        self._writer.stop()
        if self.close_reason is None:
            self.close_reason = reason
        for ch in list(self.channels.values()):
            ch.notify_closed(reason)
        # What AMQClient.connectionLost does, minus its per-frame heartbeat timers
        # (ours are stopped above).
        self.close(reason)
        self.disconnected.fire()
        self.transport = None
        closed = self.close_reason
        # Never fire a Deferred's callback with a Failure: it would become an errback.
        self._closed.fire(closed.value if isinstance(closed, Failure) else closed)

    def _abort_connection(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def do_close(self, reason: Any) -> None:
        # Called when the broker closes the connection (or we do): remember why.
        if self.close_reason is None:
            self.close_reason = reason
        super().do_close(reason)
        for ch in list(self.channels.values()):
            ch.notify_closed(reason)

    def channel_sync(self, id: int) -> FastChannel:
        """The channel ``id``, created if needed, without a Deferred."""
        ch = self.channels.get(id)
        if ch is None:
            ch = self.channelFactory(id, self.outgoing, self)
            self.channels[id] = ch
        return ch

    async def open_channel(self, id: int) -> FastChannel:
        """Open channel ``id`` with the broker."""
        ch = self.channel_sync(id)
        await ch.channel_open()
        return ch

    # -- heartbeats -------------------------------------------------------

    def reschedule_send_heartbeat(self) -> None:  # txAMQP calls this per frame
        pass

    def reschedule_check_heartbeat(self) -> None:
        pass

    def _start_heartbeats(self) -> None:
        if self.transport is not None:
            self._heartbeats.start(self.heartbeatInterval)

    # -- writing ----------------------------------------------------------

    def flush_now(self) -> None:
        """Write what is buffered without waiting for the reactor turn to end."""
        self._writer.flush_now()

    def send_frame(self, frame: Frame) -> None:
        # txAMQP's generic frames join the same ordered output.
        self._writer.write(self._pack_frame(frame))

    def send_init_string(self) -> None:
        # Written at once: nothing else can be queued before it.
        if self.transport is not None:
            self.transport.write(b"AMQP\x00\x00\x09\x01")

    def write_frame_payload(self, channel: int, kind: int, payload: bytes) -> None:
        self._writer.write(FRAME_HEAD.pack(kind, channel, len(payload)) + payload + FRAME_END_BYTE)

    def write_publish(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        body: Body,
        properties: Properties,
        mandatory: bool,
    ) -> None:
        """``basic.publish`` of ``body`` (bytes, or a sequence of pieces to be
        sent one after the other: a large payload is then never copied into
        one string here)."""
        pieces: Sequence[Buffer] = (body,) if isinstance(body, (bytes, bytearray)) else body
        size = sum(len(piece) for piece in pieces)
        parts = publish_frames(
            channel, exchange, routing_key, pieces, size, properties, mandatory, self.MAX_LENGTH
        )
        if size > _LARGE_BODY:
            # Written as it is: joining would copy the payload once more.
            self._writer.write_many(parts)
        else:
            self._writer.write(b"".join(parts))

    # -- reading ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._heartbeats.heard()
        buffer = self._buffer
        buffer += data
        offset = 0
        end = len(buffer)
        try:
            while end - offset >= 8:
                kind, channel, size = FRAME_HEAD.unpack_from(buffer, offset)
                frame_end = offset + 7 + size
                if frame_end >= end:
                    break
                if buffer[frame_end] != FRAME_END:
                    raise ProtocolViolation(
                        f"bad frame end {buffer[frame_end]:#x} (frame type {kind}, "
                        f"channel {channel}, size {size})"
                    )
                payload = bytes(buffer[offset + 7 : frame_end])
                offset = frame_end + 1
                self._frame(kind, channel, payload)
                if self.transport is None or self.transport.disconnecting:
                    break
        except ProtocolViolation as e:
            self.log.error("AMQP framing error, closing: {error}", error=e)
            del buffer[:]
            self._abort_connection()
            return
        del buffer[:offset]

    def _frame(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == FRAME_HEARTBEAT:
            return
        ch = self.channel_sync(channel)
        if kind == FRAME_METHOD:
            class_id, method_id = CLASS_METHOD.unpack_from(payload, 0)
            if class_id == BASIC:
                if method_id == BASIC_DELIVER:
                    tag, offset = read_shortstr(payload, 4)
                    (delivery_tag,) = ULONGLONG.unpack_from(payload, offset)
                    redelivered = bool(payload[offset + 8] & 1)
                    exchange, offset = read_shortstr(payload, offset + 9)
                    routing_key, _ = read_shortstr(payload, offset)
                    delivery = Delivery(tag, delivery_tag, redelivered, exchange, routing_key)
                    ch.begin_content(delivery)
                    return
                if method_id == BASIC_ACK or method_id == BASIC_NACK:
                    (delivery_tag,) = ULONGLONG.unpack_from(payload, 4)
                    ch.confirmed(method_id == BASIC_ACK, delivery_tag, bool(payload[12] & 1))
                    return
                if method_id == BASIC_RETURN:
                    (code,) = USHORT.unpack_from(payload, 4)
                    text, offset = read_shortstr(payload, 6)
                    exchange, offset = read_shortstr(payload, offset)
                    routing_key, _ = read_shortstr(payload, offset)
                    ch.begin_content(Returned(code, text, exchange, routing_key))
                    return
            self._generic_method(ch, channel, payload)
        elif kind == FRAME_HEADER:
            if not ch.content_header(payload):
                # Content of a generic (txAMQP-handled) method.
                ch.dispatch(Frame(channel, Header.decode(self.spec, _codec(payload))), self.work)
        elif kind == FRAME_BODY:
            if not ch.content_body(payload):
                ch.dispatch(Frame(channel, BodyFrame(payload)), self.work)
        else:
            raise ProtocolViolation(f"unknown frame type {kind}")

    def _generic_method(self, ch: FastChannel, channel: int, payload: bytes) -> None:
        method_frame = Frame(channel, Method.decode(self.spec, _codec(payload)))
        method = method_frame.payload.method
        if method.response or method.content:
            # A response to a request of ours, or e.g. a server method with
            # content we do not expect: let txAMQP read it.
            ch.dispatch(method_frame, self.work)
            return
        message = Message(method, method_frame.payload.args, None)
        try:
            self.delegate.dispatch(ch, message)
        except Exception:
            self.log.failure("Error handling {method} from the broker", method=method.name)
            self.close(Failure())


def _codec(payload: bytes) -> Codec:
    """A codec reading a frame payload the way txAMQP's decoders expect."""
    return Codec(BytesIO(ULONG.pack(len(payload)) + payload))
