"""AMQP 0-9-1 wire encoding for the client's fast path: pure functions and tables.

Frame and method numbers, the ``struct`` layouts the fast path reads and
writes, field tables (RabbitMQ's field types), basic properties, and the
frames of a ``basic.publish``.  Nothing here holds state or does I/O;
:class:`~funcx_endpoint.amqp.client.AMQPClient` and
:class:`~funcx_endpoint.amqp.channel.FastChannel` use it.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, Iterator, List, Sequence, Tuple, Union

__all__ = [
    "BASIC",
    "BASIC_ACK",
    "BASIC_DELIVER",
    "BASIC_NACK",
    "BASIC_PUBLISH",
    "BASIC_REJECT",
    "BASIC_RETURN",
    "CLIENT_PROPERTIES",
    "FRAME_BODY",
    "FRAME_END",
    "FRAME_END_BYTE",
    "FRAME_HEADER",
    "FRAME_HEARTBEAT",
    "FRAME_METHOD",
    "PROPERTIES",
    "Body",
    "Buffer",
    "Properties",
    "ProtocolViolation",
    "decode_properties",
    "decode_table",
    "encode_frame",
    "encode_properties",
    "encode_table",
    "publish_frames",
    "read_shortstr",
    "shortstr",
    "split_frames",
    "start_ok_payload",
]

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

#: frame type, channel, payload size
FRAME_HEAD = struct.Struct("!BHI")
#: class id, method id
CLASS_METHOD = struct.Struct("!HH")
#: content header: class id, weight, body size, property flags
HEADER_HEAD = struct.Struct("!HHQH")
#: basic.ack, basic.nack and basic.reject: class, method, delivery tag, bits
ACK_PAYLOAD = struct.Struct("!HHQB")
ULONGLONG = struct.Struct("!Q")
USHORT = struct.Struct("!H")
ULONG = struct.Struct("!L")

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


class ProtocolViolation(Exception):
    """The peer sent bytes that are not AMQP framing."""


def split_frames(pieces: Sequence[Buffer], chunk: int) -> Iterator[List[Buffer]]:
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


def encode_frame(kind: int, channel: int, payload: bytes) -> bytes:
    """One whole frame around ``payload``."""
    return FRAME_HEAD.pack(kind, channel, len(payload)) + payload + FRAME_END_BYTE


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    pieces: Sequence[Buffer],
    size: int,
    properties: Properties,
    mandatory: bool,
    frame_max: int,
) -> List[Buffer]:
    """The frames of a ``basic.publish`` of ``pieces`` (``size`` bytes in all),
    as parts to be written one after the other: the body is never copied.

    Body frames hold at most ``frame_max`` bytes with their framing;
    ``frame_max`` 0 means no limit: the whole body in one frame.
    """
    method = (
        CLASS_METHOD.pack(BASIC, BASIC_PUBLISH)
        + b"\x00\x00"
        + shortstr(exchange)
        + shortstr(routing_key)
        + (b"\x01" if mandatory else b"\x00")
    )
    flags, props = encode_properties(properties)
    header = HEADER_HEAD.pack(BASIC, 0, size, flags) + props
    parts: List[Buffer] = [
        FRAME_HEAD.pack(FRAME_METHOD, channel, len(method)),
        method,
        FRAME_END_BYTE,
        FRAME_HEAD.pack(FRAME_HEADER, channel, len(header)),
        header,
        FRAME_END_BYTE,
    ]
    # A frame is 8 bytes of framing around its payload.
    chunk = frame_max - 8 if frame_max > 0 else max(size, 1)
    if size <= chunk:
        if size:
            parts.append(FRAME_HEAD.pack(FRAME_BODY, channel, size))
            parts.extend(pieces)
            parts.append(FRAME_END_BYTE)
    else:
        for body_frame in split_frames(pieces, chunk):
            parts.append(FRAME_HEAD.pack(FRAME_BODY, channel, sum(map(len, body_frame))))
            parts.extend(body_frame)
            parts.append(FRAME_END_BYTE)
    return parts


def start_ok_payload(mechanism: str, response: Any, locale: str) -> bytes:
    """The ``connection.start-ok`` method payload, with :data:`CLIENT_PROPERTIES`.

    ``response``: a table (AMQPLAIN), or text or bytes (PLAIN).
    """
    if isinstance(response, dict):  # AMQPLAIN
        response_bytes = encode_table(response)[4:]
    else:
        response_bytes = response.encode() if isinstance(response, str) else response
    return (
        CLASS_METHOD.pack(10, 11)
        + encode_table(CLIENT_PROPERTIES)
        + shortstr(mechanism)
        + ULONG.pack(len(response_bytes))
        + response_bytes
        + shortstr(locale)
    )


def shortstr(value: str) -> bytes:
    """An AMQP short string (at most 255 bytes of UTF-8)."""
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(data),)) + data


def read_shortstr(data: bytes, offset: int) -> Tuple[str, int]:
    """The short string at ``offset`` and the offset after it."""
    size = data[offset]
    return data[offset + 1 : offset + 1 + size].decode("utf-8", "replace"), offset + 1 + size


def encode_table(table: Dict[str, Any]) -> bytes:
    """An AMQP field table (RabbitMQ's field types), with its length prefix."""
    parts: List[bytes] = []
    for key, value in table.items():
        parts.append(shortstr(key))
        parts.append(_encode_field(value))
    body = b"".join(parts)
    return ULONG.pack(len(body)) + body


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
        return b"S" + ULONG.pack(len(data)) + data
    if isinstance(value, (bytes, bytearray)):
        return b"x" + ULONG.pack(len(value)) + bytes(value)
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, (list, tuple)):
        body = b"".join(_encode_field(item) for item in value)
        return b"A" + ULONG.pack(len(body)) + body
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
    (size,) = ULONG.unpack_from(data, offset)
    offset += 4
    end = offset + size
    table: Dict[str, Any] = {}
    while offset < end:
        key, offset = read_shortstr(data, offset)
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
        (size,) = ULONG.unpack_from(data, offset)
        raw = bytes(data[offset + 4 : offset + 4 + size])
        return (raw.decode("utf-8", "replace") if kind == ord("S") else raw), offset + 4 + size
    if kind == ord("F"):
        return decode_table(data, offset)
    if kind == ord("A"):
        (size,) = ULONG.unpack_from(data, offset)
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
            parts.append(shortstr(value))
        elif kind == "octet":
            parts.append(bytes((value,)))
        elif kind == "timestamp":
            parts.append(ULONGLONG.pack(int(value)))
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
            (properties[name],) = ULONGLONG.unpack_from(data, offset)
            offset += 8
        else:
            properties[name], offset = decode_table(data, offset)
    return properties
