"""An AMQP 0-9-1 client protocol: txAMQP with a fast, synchronous hot path.

txAMQP's :class:`~txamqp.protocol.AMQClient` handles the connection
handshake, channels and synchronous requests (declare, consume, qos, ...)
through Deferred queues.  That costs several Deferreds and a lock per frame,
and it guesses whether bodies are text.  This subclass keeps txAMQP for all
of that, and takes over the frames that are on the hot path of a task
pipeline:

* incoming ``basic.deliver`` (+ header + body frames), ``basic.return``,
  and the broker's ``basic.ack``/``basic.nack`` (publisher confirms) are
  decoded with ``struct`` and handed synchronously to the channel's handlers;
  bodies are always ``bytes``;
* outgoing ``basic.publish`` and ``basic.ack``/``basic.nack`` are encoded in
  one piece;
* everything written in one reactor turn leaves in one ``transport.write``
  (one TLS record instead of one per frame);
* heartbeats are sent and checked by two cheap timers instead of rescheduling
  a timer on every frame.

Other frames go through txAMQP's own codec and dispatch, unchanged.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed, TwistedDelegate
from txamqp.codec import Codec
from txamqp.connection import Frame, Header, Method
from txamqp.content import Content
from txamqp.message import Message
from txamqp.protocol import AMQChannel, AMQClient
from zope.interface import implementer

from funcx_endpoint.amqp.interfaces import IAMQPChannel, IAMQPClient
from funcx_endpoint.amqp.spec import load_spec

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
FRAME_END_BYTE = b"\xce"

BASIC = 60
BASIC_PUBLISH = 40
BASIC_RETURN = 50
BASIC_DELIVER = 60
BASIC_ACK = 80
BASIC_REJECT = 90
BASIC_NACK = 120

_frame_head = struct.Struct("!BHI")
_class_method = struct.Struct("!HH")
_header_head = struct.Struct("!HHQH")
_ulonglong = struct.Struct("!Q")
_ushort = struct.Struct("!H")
_ulong = struct.Struct("!L")
_ack_payload = struct.Struct("!HHQB")

# Basic properties, in wire order, with their wire types.
PROPERTIES: Tuple[Tuple[str, str], ...] = (
    ("content-type", "shortstr"),
    ("content-encoding", "shortstr"),
    ("headers", "table"),
    ("delivery-mode", "octet"),
    ("priority", "octet"),
    ("correlation-id", "shortstr"),
    ("reply-to", "shortstr"),
    ("expiration", "shortstr"),
    ("message-id", "shortstr"),
    ("timestamp", "timestamp"),
    ("type", "shortstr"),
    ("user-id", "shortstr"),
    ("app-id", "shortstr"),
    ("cluster-id", "shortstr"),
)
_PROPERTY_BIT = {name: 1 << (15 - i) for i, (name, _) in enumerate(PROPERTIES)}

Properties = Dict[str, Any]
Buffer = Union[bytes, bytearray, memoryview]
#: A message body: bytes, or pieces sent one after the other.
Body = Union[bytes, Sequence[Buffer]]
# Bodies above this are written in pieces instead of joined first.
_LARGE_BODY = 256 * 1024


def _split_frames(pieces: Sequence[Buffer], chunk: int) -> Iterator[List[Buffer]]:
    """``pieces`` regrouped into frames of ``chunk`` bytes (the last may be
    shorter), as views: nothing is copied."""
    frame: List[Buffer] = []
    room = chunk
    for piece in pieces:
        view = memoryview(piece)
        while len(view):
            take = view[:room]
            frame.append(take)
            view = view[len(take) :]
            room -= len(take)
            if room == 0:
                yield frame
                frame, room = [], chunk
    if frame:
        yield frame


class ProtocolViolation(Exception):
    """The peer sent bytes that are not AMQP framing."""


def _shortstr(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


def encode_table(table: Dict[str, Any]) -> bytes:
    """An AMQP field table (RabbitMQ's field types), with its length prefix."""
    parts: List[bytes] = []
    for key, value in table.items():
        parts.append(_shortstr(key))
        parts.append(_encode_field(value))
    body = b"".join(parts)
    return _ulong.pack(len(body)) + body


def _encode_field(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"t" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + struct.pack("!i", value)
        return b"l" + struct.pack("!q", value)
    if isinstance(value, float):
        return b"d" + struct.pack("!d", value)
    if isinstance(value, str):
        data = value.encode()
        return b"S" + _ulong.pack(len(data)) + data
    if isinstance(value, (bytes, bytearray)):
        return b"x" + _ulong.pack(len(value)) + bytes(value)
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, (list, tuple)):
        body = b"".join(_encode_field(item) for item in value)
        return b"A" + _ulong.pack(len(body)) + body
    if value is None:
        return b"V"
    raise TypeError(f"cannot encode {type(value).__name__} in an AMQP table")


_FIXED = {
    ord("b"): struct.Struct("!b"),
    ord("B"): struct.Struct("!B"),
    ord("s"): struct.Struct("!h"),
    ord("u"): struct.Struct("!H"),
    ord("I"): struct.Struct("!i"),
    ord("i"): struct.Struct("!I"),
    ord("l"): struct.Struct("!q"),
    ord("L"): struct.Struct("!Q"),
    ord("f"): struct.Struct("!f"),
    ord("d"): struct.Struct("!d"),
    ord("T"): struct.Struct("!Q"),
}


def decode_table(data: bytes, offset: int) -> Tuple[Dict[str, Any], int]:
    """Decode the field table at ``offset``; the table and the offset after it."""
    (size,) = _ulong.unpack_from(data, offset)
    offset += 4
    end = offset + size
    table: Dict[str, Any] = {}
    while offset < end:
        key, offset = _read_shortstr(data, offset)
        table[key], offset = _decode_field(data, offset)
    return table, end


def _decode_field(data: bytes, offset: int) -> Tuple[Any, int]:
    kind = data[offset]
    offset += 1
    fixed = _FIXED.get(kind)
    if fixed is not None:
        return fixed.unpack_from(data, offset)[0], offset + fixed.size
    if kind == ord("t"):
        return data[offset] != 0, offset + 1
    if kind in (ord("S"), ord("x")):
        (size,) = _ulong.unpack_from(data, offset)
        raw = bytes(data[offset + 4 : offset + 4 + size])
        return (raw.decode("utf-8", "replace") if kind == ord("S") else raw), offset + 4 + size
    if kind == ord("F"):
        return decode_table(data, offset)
    if kind == ord("A"):
        (size,) = _ulong.unpack_from(data, offset)
        offset += 4
        end = offset + size
        items = []
        while offset < end:
            item, offset = _decode_field(data, offset)
            items.append(item)
        return items, end
    if kind == ord("D"):
        scale = data[offset]
        (raw,) = struct.unpack_from("!i", data, offset + 1)
        return raw / (10**scale), offset + 5
    if kind == ord("V"):
        return None, offset
    raise ProtocolViolation(f"unknown AMQP field type {chr(kind)!r}")


CLIENT_PROPERTIES: Dict[str, Any] = {
    "product": "funcx-endpoint",
    "platform": "Python/Twisted",
    "capabilities": {
        "publisher_confirms": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "authentication_failure_close": True,
        "exchange_exchange_bindings": True,
        "per_consumer_qos": True,
    },
}


def encode_properties(properties: Properties) -> Tuple[int, bytes]:
    """The property flags and the encoded property list."""
    flags = 0
    parts: List[bytes] = []
    for name, kind in PROPERTIES:
        value = properties.get(name)
        if value is None:
            continue
        flags |= _PROPERTY_BIT[name]
        if kind == "shortstr":
            parts.append(_shortstr(value))
        elif kind == "octet":
            parts.append(bytes((value,)))
        elif kind == "timestamp":
            parts.append(_ulonglong.pack(int(value)))
        else:  # table
            parts.append(encode_table(value))
    for name in properties:
        if name not in _PROPERTY_BIT:
            raise ValueError(f"unknown AMQP basic property {name!r}")
    return flags, b"".join(parts)


def decode_properties(flags: int, data: bytes, offset: int) -> Properties:
    """Decode the property list that starts at ``offset``."""
    properties: Properties = {}
    if not flags:
        return properties
    for name, kind in PROPERTIES:
        if not flags & _PROPERTY_BIT[name]:
            continue
        if kind == "shortstr":
            size = data[offset]
            properties[name] = data[offset + 1 : offset + 1 + size].decode("utf-8", "replace")
            offset += 1 + size
        elif kind == "octet":
            properties[name] = data[offset]
            offset += 1
        elif kind == "timestamp":
            (properties[name],) = _ulonglong.unpack_from(data, offset)
            offset += 8
        else:
            properties[name], offset = decode_table(data, offset)
    return properties


def _read_shortstr(data: bytes, offset: int) -> Tuple[str, int]:
    size = data[offset]
    return data[offset + 1 : offset + 1 + size].decode("utf-8", "replace"), offset + 1 + size


class Delivery:
    """A message delivered to a consumer."""

    __slots__ = (
        "consumer_tag",
        "delivery_tag",
        "redelivered",
        "exchange",
        "routing_key",
        "properties",
        "body",
    )

    def __init__(
        self,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
    ) -> None:
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties: Properties = {}
        self.body = b""


class Returned:
    """A mandatory message the broker could not route (``basic.return``)."""

    __slots__ = ("reply_code", "reply_text", "exchange", "routing_key", "properties", "body")

    def __init__(self, reply_code: int, reply_text: str, exchange: str, routing_key: str) -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties: Properties = {}
        self.body = b""


class ChannelHandlers:
    """What a channel's owner wants to hear about, all called synchronously."""

    def __init__(self) -> None:
        self.consumers: Dict[str, Callable[[Delivery], None]] = {}
        self.on_ack: Optional[Callable[[int, bool], None]] = None
        self.on_nack: Optional[Callable[[int, bool], None]] = None
        self.on_return: Optional[Callable[[Returned], None]] = None
        self.on_cancel: Optional[Callable[[str], None]] = None
        self.on_close: Optional[Callable[[Any], None]] = None


@implementer(IAMQPChannel)
class FastChannel(AMQChannel):
    """A txAMQP channel with synchronous handlers for the hot path.

    (Its AMQP requests, ``exchange_declare`` and the others, come from the
    class txAMQP builds from the spec and mixes in: see
    ``AMQPClient.channelFactory``.)
    """

    def __init__(self, id: int, outgoing: Any, client: AMQPClient) -> None:
        super().__init__(id, outgoing, client)
        self.handlers = ChannelHandlers()
        self._close_notified = False

        # content being assembled: (message, header size, chunks, received)
        self._pending: Any = None
        self._pending_size = 0
        self._pending_chunks: List[bytes] = []
        self._pending_received = 0

    def notify_closed(self, reason: Any) -> None:
        """Tell the channel's owner, once, that the channel is gone (and why)."""
        if self._close_notified:
            return
        self._close_notified = True
        if self.handlers.on_close is not None:
            self.handlers.on_close(reason)

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
        self.client.write_frame_payload(
            self.id,
            FRAME_METHOD,
            _ack_payload.pack(BASIC, BASIC_ACK, delivery_tag, 1 if multiple else 0),
        )

    def nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        """``basic.nack`` (RabbitMQ): give deliveries back, or drop them."""
        bits = (1 if multiple else 0) | (2 if requeue else 0)
        self.client.write_frame_payload(
            self.id, FRAME_METHOD, _ack_payload.pack(BASIC, BASIC_NACK, delivery_tag, bits)
        )

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        """``basic.reject`` of one delivery."""
        self.client.write_frame_payload(
            self.id,
            FRAME_METHOD,
            _ack_payload.pack(BASIC, BASIC_REJECT, delivery_tag, 1 if requeue else 0),
        )


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
        response = client.response
        if isinstance(response, dict):  # AMQPLAIN
            response_bytes = encode_table(response)[4:]
        else:
            response_bytes = response.encode() if isinstance(response, str) else response
        payload = (
            _class_method.pack(10, 11)
            + encode_table(CLIENT_PROPERTIES)
            + _shortstr(client.mechanism)
            + _ulong.pack(len(response_bytes))
            + response_bytes
            + _shortstr(client.locale)
        )
        client.write_frame_payload(0, FRAME_METHOD, payload)

    def basic_ack(self, ch: FastChannel, msg: Message) -> None:
        if ch.handlers.on_ack is not None:
            ch.handlers.on_ack(msg.delivery_tag, msg.multiple)

    def basic_nack(self, ch: FastChannel, msg: Message) -> None:
        if ch.handlers.on_nack is not None:
            ch.handlers.on_nack(msg.delivery_tag, msg.multiple)

    def basic_cancel(self, ch: FastChannel, msg: Message) -> None:
        tag = msg.consumer_tag
        ch.handlers.consumers.pop(tag, None)
        if ch.handlers.on_cancel is not None:
            ch.handlers.on_cancel(tag)

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
        self._out: List[Buffer] = []
        self._flush_call: Optional[IDelayedCall] = None
        self._buffer = bytearray()
        self._heartbeat_calls: List[Any] = []
        self._closed_waiters: List[Deferred[Any]] = []
        self.close_reason: Any = None
        self.shield: Any = None  # set by the connection service's endpoint
        super().__init__(delegate or AMQPDelegate(), vhost, load_spec(), heartbeat=0, clock=clock)
        # When data last came in and went out, on the injected clock (the one
        # the heartbeat timers run on).
        self._last_received = self._last_sent = self.clock.seconds()
        # txAMQP reschedules a timer on every frame when heartbeats are on;
        # we keep its handshake (tune-ok carries our interval) and run two
        # cheap periodic checks of our own instead.
        self.heartbeatInterval = heartbeat
        self.started.wait().addCallbacks(lambda _: self._start_heartbeats(), lambda _: None)

    # -- connection state -------------------------------------------------

    def when_closed(self) -> Deferred[Any]:
        """A Deferred that fires when the connection is lost, with the reason
        (an exception, or the broker's ``connection.close`` message)."""
        d: Deferred[Any] = Deferred()
        if self.transport is None and self.close_reason is not None:
            d.callback(self._reason_value())
        else:
            self._closed_waiters.append(d)
        return d

    def _reason_value(self) -> Any:
        reason = self.close_reason
        # Never fire a Deferred's callback with a Failure: it would become an errback.
        return reason.value if isinstance(reason, Failure) else reason

    def connectionLost(self, reason: Failure) -> None:
        self._stop_heartbeats()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self.close_reason is None:
            self.close_reason = reason
        for ch in list(self.channels.values()):
            ch.notify_closed(reason)
        # What AMQClient.connectionLost does, minus its per-frame heartbeat timers
        # (ours are stopped above).
        self.close(reason)
        self.disconnected.fire()
        self.transport = None
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(self._reason_value())

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
        if self.heartbeatInterval <= 0 or self.transport is None:
            return
        from twisted.internet.task import LoopingCall

        send = LoopingCall(self._maybe_send_heartbeat)
        send.clock = self.clock
        check = LoopingCall(self._check_peer)
        check.clock = self.clock
        self._heartbeat_calls = [send, check]
        send.start(self.heartbeatInterval / 2.0, now=False)
        check.start(self.heartbeatInterval, now=False)

    def _stop_heartbeats(self) -> None:
        for call in self._heartbeat_calls:
            if call.running:
                call.stop()
        self._heartbeat_calls = []

    def _maybe_send_heartbeat(self) -> None:
        if self.clock.seconds() - self._last_sent >= self.heartbeatInterval / 2.0:
            self.write_frame_payload(0, FRAME_HEARTBEAT, b"")

    def _check_peer(self) -> None:
        silent = self.clock.seconds() - self._last_received
        if silent > self.heartbeatInterval * self.MAX_UNSEEN_HEARTBEAT:
            self.log.warn(
                "No data from the broker for {silent:.0f} s: dropping the connection",
                silent=silent,
            )
            if self.transport is not None:
                self.transport.abortConnection()

    # -- writing ----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        out, self._out = self._out, []
        if out and self.transport is not None:
            self._last_sent = self.clock.seconds()
            self.transport.write(b"".join(out))

    def _write_many(self, parts: Sequence[Buffer]) -> None:
        self._out.extend(parts)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def flush_now(self) -> None:
        """Write what is buffered without waiting for the reactor turn to end."""
        if self._flush_call is not None:
            self._flush_call.cancel()
        self._flush()

    def send_frame(self, frame: Frame) -> None:
        # txAMQP's generic frames join the same ordered output.
        self._write(self._pack_frame(frame))

    def send_init_string(self) -> None:
        # Written at once: nothing else can be queued before it.
        if self.transport is not None:
            self.transport.write(b"AMQP\x00\x00\x09\x01")

    def write_frame_payload(self, channel: int, kind: int, payload: bytes) -> None:
        self._write(_frame_head.pack(kind, channel, len(payload)) + payload + FRAME_END_BYTE)

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
        method = (
            _class_method.pack(BASIC, BASIC_PUBLISH)
            + b"\x00\x00"
            + _shortstr(exchange)
            + _shortstr(routing_key)
            + (b"\x01" if mandatory else b"\x00")
        )
        flags, props = encode_properties(properties)
        header = _header_head.pack(BASIC, 0, size, flags) + props
        parts: List[Buffer] = [
            _frame_head.pack(FRAME_METHOD, channel, len(method)),
            method,
            FRAME_END_BYTE,
            _frame_head.pack(FRAME_HEADER, channel, len(header)),
            header,
            FRAME_END_BYTE,
        ]
        # A frame is 8 bytes of framing around its payload; frame_max 0 means
        # no limit: the whole body in one frame.
        chunk = self.MAX_LENGTH - 8 if self.MAX_LENGTH > 0 else max(size, 1)
        if size <= chunk:
            if size:
                parts.append(_frame_head.pack(FRAME_BODY, channel, size))
                parts.extend(pieces)
                parts.append(FRAME_END_BYTE)
        else:
            for frame in _split_frames(pieces, chunk):
                parts.append(_frame_head.pack(FRAME_BODY, channel, sum(map(len, frame))))
                parts.extend(frame)
                parts.append(FRAME_END_BYTE)
        if size > _LARGE_BODY:
            # Written as it is: joining would copy the payload once more.
            self._write_many(parts)
        else:
            self._write(b"".join(parts))

    # -- reading ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._last_received = self.clock.seconds()
        buffer = self._buffer
        buffer += data
        offset = 0
        end = len(buffer)
        try:
            while end - offset >= 8:
                kind, channel, size = _frame_head.unpack_from(buffer, offset)
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
            if self.transport is not None:
                self.transport.abortConnection()
            return
        del buffer[:offset]

    def _frame(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == FRAME_HEARTBEAT:
            return
        ch = self.channel_sync(channel)
        if kind == FRAME_METHOD:
            class_id, method_id = _class_method.unpack_from(payload, 0)
            if class_id == BASIC:
                if method_id == BASIC_DELIVER:
                    tag, offset = _read_shortstr(payload, 4)
                    (delivery_tag,) = _ulonglong.unpack_from(payload, offset)
                    redelivered = bool(payload[offset + 8] & 1)
                    exchange, offset = _read_shortstr(payload, offset + 9)
                    routing_key, _ = _read_shortstr(payload, offset)
                    self._begin_content(
                        ch, Delivery(tag, delivery_tag, redelivered, exchange, routing_key)
                    )
                    return
                if method_id == BASIC_ACK or method_id == BASIC_NACK:
                    (delivery_tag,) = _ulonglong.unpack_from(payload, 4)
                    multiple = bool(payload[12] & 1)
                    handler = ch.handlers.on_ack if method_id == BASIC_ACK else ch.handlers.on_nack
                    if handler is not None:
                        handler(delivery_tag, multiple)
                    return
                if method_id == BASIC_RETURN:
                    (code,) = _ushort.unpack_from(payload, 4)
                    text, offset = _read_shortstr(payload, 6)
                    exchange, offset = _read_shortstr(payload, offset)
                    routing_key, _ = _read_shortstr(payload, offset)
                    self._begin_content(ch, Returned(code, text, exchange, routing_key))
                    return
            self._generic_method(ch, channel, payload)
        elif kind == FRAME_HEADER:
            if ch._pending is None:
                # Content of a generic (txAMQP-handled) method.
                ch.dispatch(Frame(channel, Header.decode(self.spec, _codec(payload))), self.work)
                return
            _, _, size, flags = _header_head.unpack_from(payload, 0)
            if flags & 1:
                raise ProtocolViolation("more than 15 basic properties are not supported")
            ch._pending.properties = decode_properties(flags, payload, 14)
            ch._pending_size = size
            if size == 0:
                self._finish_content(ch)
        elif kind == FRAME_BODY:
            if ch._pending is None:
                from txamqp.connection import Body

                ch.dispatch(Frame(channel, Body(payload)), self.work)
                return
            ch._pending_chunks.append(payload)
            ch._pending_received += len(payload)
            if ch._pending_received >= ch._pending_size:
                self._finish_content(ch)
        else:
            raise ProtocolViolation(f"unknown frame type {kind}")

    def _begin_content(self, ch: FastChannel, message: Any) -> None:
        ch._pending = message
        ch._pending_size = 0
        ch._pending_chunks = []
        ch._pending_received = 0

    def _finish_content(self, ch: FastChannel) -> None:
        message = ch._pending
        chunks = ch._pending_chunks
        message.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        ch._pending = None
        ch._pending_chunks = []
        if isinstance(message, Delivery):
            consumer = ch.handlers.consumers.get(message.consumer_tag)
            if consumer is None:
                self.log.warn(
                    "Delivery for unknown consumer {tag} on channel {channel}: rejected",
                    tag=message.consumer_tag,
                    channel=ch.id,
                )
                ch.reject(message.delivery_tag, requeue=True)
                return
            consumer(message)
        elif ch.handlers.on_return is not None:
            ch.handlers.on_return(message)
        else:
            self.log.warn(
                "Message returned by the broker ({code} {text}) and nobody listens",
                code=message.reply_code,
                text=message.reply_text,
            )

    def _generic_method(self, ch: FastChannel, channel: int, payload: bytes) -> None:
        frame = Frame(channel, Method.decode(self.spec, _codec_longbytes(payload)))
        method = frame.payload.method
        if method.response:
            ch.dispatch(frame, self.work)
            return
        if method.content:
            # e.g. a server method with content we do not expect: let txAMQP read it.
            ch.dispatch(frame, self.work)
            return
        message = Message(method, frame.payload.args, None)
        try:
            self.delegate.dispatch(ch, message)
        except Exception:
            self.log.failure("Error handling {method} from the broker", method=method.name)
            self.close(Failure())


def _codec(payload: bytes) -> Codec:
    """A codec reading a frame payload the way txAMQP's decoders expect."""
    return Codec(BytesIO(_ulong.pack(len(payload)) + payload))


def _codec_longbytes(payload: bytes) -> Codec:
    return _codec(payload)


def content(body: bytes, **properties: Any) -> Content:
    """A txAMQP Content object (for txAMQP's generic publish)."""
    return Content(body, properties=properties)


__all__ = [
    "AMQPClient",
    "AMQPDelegate",
    "ChannelHandlers",
    "Closed",
    "Delivery",
    "FastChannel",
    "PROPERTIES",
    "ProtocolViolation",
    "Returned",
    "decode_properties",
    "encode_properties",
]
