"""Tests for L{funcx_endpoint.amqp.spec}: the AMQP 0-9-1 spec file as txAMQP reads it."""

from __future__ import annotations

import os
from io import BytesIO
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from txamqp.client import ChannelClosed, TwistedDelegate
from txamqp.codec import Codec
from txamqp.connection import Body, Frame, Header, Method
from txamqp.message import Message
from txamqp.protocol import AMQChannel, AMQClient
from txamqp.spec import Spec, pythonize

from funcx_endpoint.amqp.spec import SPEC_PATH, load_spec

# (class id, method id, [(field name, wire type), ...]) for the methods the
# endpoint relies on, from the AMQP 0-9-1 definition and RabbitMQ's extensions.
EXPECTED_METHODS: dict[str, tuple[int, int, list[tuple[str, str]]]] = {
    "connection.start": (
        10,
        10,
        [
            ("version-major", "octet"),
            ("version-minor", "octet"),
            ("server-properties", "table"),
            ("mechanisms", "longstr"),
            ("locales", "longstr"),
        ],
    ),
    "connection.start-ok": (
        10,
        11,
        [
            ("client-properties", "table"),
            ("mechanism", "shortstr"),
            ("response", "longstr"),
            ("locale", "shortstr"),
        ],
    ),
    "connection.tune": (
        10,
        30,
        [
            ("channel-max", "short"),
            ("frame-max", "long"),
            ("heartbeat", "short"),
        ],
    ),
    "connection.tune-ok": (
        10,
        31,
        [
            ("channel-max", "short"),
            ("frame-max", "long"),
            ("heartbeat", "short"),
        ],
    ),
    "connection.open": (
        10,
        40,
        [
            ("virtual-host", "shortstr"),
            ("reserved-1", "shortstr"),
            ("reserved-2", "bit"),
        ],
    ),
    "connection.open-ok": (10, 41, [("reserved-1", "shortstr")]),
    "connection.close": (
        10,
        50,
        [
            ("reply-code", "short"),
            ("reply-text", "shortstr"),
            ("class-id", "short"),
            ("method-id", "short"),
        ],
    ),
    "connection.close-ok": (10, 51, []),
    "connection.blocked": (10, 60, [("reason", "shortstr")]),
    "connection.unblocked": (10, 61, []),
    "connection.update-secret": (
        10,
        70,
        [
            ("new-secret", "longstr"),
            ("reason", "shortstr"),
        ],
    ),
    "connection.update-secret-ok": (10, 71, []),
    "channel.open": (20, 10, [("reserved-1", "shortstr")]),
    "channel.open-ok": (20, 11, [("reserved-1", "longstr")]),
    "channel.close": (
        20,
        40,
        [
            ("reply-code", "short"),
            ("reply-text", "shortstr"),
            ("class-id", "short"),
            ("method-id", "short"),
        ],
    ),
    "channel.close-ok": (20, 41, []),
    "exchange.declare": (
        40,
        10,
        [
            ("reserved-1", "short"),
            ("exchange", "shortstr"),
            ("type", "shortstr"),
            ("passive", "bit"),
            ("durable", "bit"),
            ("auto-delete", "bit"),
            ("internal", "bit"),
            ("nowait", "bit"),
            ("arguments", "table"),
        ],
    ),
    "exchange.declare-ok": (40, 11, []),
    "exchange.bind": (
        40,
        30,
        [
            ("reserved-1", "short"),
            ("destination", "shortstr"),
            ("source", "shortstr"),
            ("routing-key", "shortstr"),
            ("nowait", "bit"),
            ("arguments", "table"),
        ],
    ),
    "exchange.bind-ok": (40, 31, []),
    "exchange.unbind": (
        40,
        40,
        [
            ("reserved-1", "short"),
            ("destination", "shortstr"),
            ("source", "shortstr"),
            ("routing-key", "shortstr"),
            ("nowait", "bit"),
            ("arguments", "table"),
        ],
    ),
    # RabbitMQ's wire id; not 41.
    "exchange.unbind-ok": (40, 51, []),
    "queue.declare": (
        50,
        10,
        [
            ("reserved-1", "short"),
            ("queue", "shortstr"),
            ("passive", "bit"),
            ("durable", "bit"),
            ("exclusive", "bit"),
            ("auto-delete", "bit"),
            ("nowait", "bit"),
            ("arguments", "table"),
        ],
    ),
    "queue.declare-ok": (
        50,
        11,
        [
            ("queue", "shortstr"),
            ("message-count", "long"),
            ("consumer-count", "long"),
        ],
    ),
    "queue.bind": (
        50,
        20,
        [
            ("reserved-1", "short"),
            ("queue", "shortstr"),
            ("exchange", "shortstr"),
            ("routing-key", "shortstr"),
            ("nowait", "bit"),
            ("arguments", "table"),
        ],
    ),
    "queue.unbind": (
        50,
        50,
        [
            ("reserved-1", "short"),
            ("queue", "shortstr"),
            ("exchange", "shortstr"),
            ("routing-key", "shortstr"),
            ("arguments", "table"),
        ],
    ),
    "queue.purge": (
        50,
        30,
        [
            ("reserved-1", "short"),
            ("queue", "shortstr"),
            ("nowait", "bit"),
        ],
    ),
    "queue.delete": (
        50,
        40,
        [
            ("reserved-1", "short"),
            ("queue", "shortstr"),
            ("if-unused", "bit"),
            ("if-empty", "bit"),
            ("nowait", "bit"),
        ],
    ),
    "basic.qos": (
        60,
        10,
        [
            ("prefetch-size", "long"),
            ("prefetch-count", "short"),
            ("global", "bit"),
        ],
    ),
    "basic.qos-ok": (60, 11, []),
    "basic.consume": (
        60,
        20,
        [
            ("reserved-1", "short"),
            ("queue", "shortstr"),
            ("consumer-tag", "shortstr"),
            ("no-local", "bit"),
            ("no-ack", "bit"),
            ("exclusive", "bit"),
            ("nowait", "bit"),
            ("arguments", "table"),
        ],
    ),
    "basic.consume-ok": (60, 21, [("consumer-tag", "shortstr")]),
    "basic.cancel": (60, 30, [("consumer-tag", "shortstr"), ("nowait", "bit")]),
    "basic.cancel-ok": (60, 31, [("consumer-tag", "shortstr")]),
    "basic.publish": (
        60,
        40,
        [
            ("reserved-1", "short"),
            ("exchange", "shortstr"),
            ("routing-key", "shortstr"),
            ("mandatory", "bit"),
            ("immediate", "bit"),
        ],
    ),
    "basic.return": (
        60,
        50,
        [
            ("reply-code", "short"),
            ("reply-text", "shortstr"),
            ("exchange", "shortstr"),
            ("routing-key", "shortstr"),
        ],
    ),
    "basic.deliver": (
        60,
        60,
        [
            ("consumer-tag", "shortstr"),
            ("delivery-tag", "longlong"),
            ("redelivered", "bit"),
            ("exchange", "shortstr"),
            ("routing-key", "shortstr"),
        ],
    ),
    "basic.get": (
        60,
        70,
        [
            ("reserved-1", "short"),
            ("queue", "shortstr"),
            ("no-ack", "bit"),
        ],
    ),
    "basic.get-ok": (
        60,
        71,
        [
            ("delivery-tag", "longlong"),
            ("redelivered", "bit"),
            ("exchange", "shortstr"),
            ("routing-key", "shortstr"),
            ("message-count", "long"),
        ],
    ),
    "basic.get-empty": (60, 72, [("reserved-1", "shortstr")]),
    "basic.ack": (60, 80, [("delivery-tag", "longlong"), ("multiple", "bit")]),
    "basic.reject": (60, 90, [("delivery-tag", "longlong"), ("requeue", "bit")]),
    "basic.recover": (60, 110, [("requeue", "bit")]),
    "basic.recover-ok": (60, 111, []),
    "basic.nack": (
        60,
        120,
        [
            ("delivery-tag", "longlong"),
            ("multiple", "bit"),
            ("requeue", "bit"),
        ],
    ),
    "confirm.select": (85, 10, [("nowait", "bit")]),
    "confirm.select-ok": (85, 11, []),
    "tx.select": (90, 10, []),
    "tx.commit": (90, 20, []),
    "tx.rollback": (90, 30, []),
}

BASIC_PROPERTIES: list[tuple[str, str]] = [
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
]

# Synchronous requests and the replies txAMQP waits for.
EXPECTED_RESPONSES: dict[str, list[str]] = {
    "connection.open": ["open-ok"],
    "connection.close": ["close-ok"],
    "connection.update-secret": ["update-secret-ok"],
    "channel.open": ["open-ok"],
    "channel.close": ["close-ok"],
    "exchange.declare": ["declare-ok"],
    "exchange.bind": ["bind-ok"],
    "exchange.unbind": ["unbind-ok"],
    "queue.declare": ["declare-ok"],
    "queue.bind": ["bind-ok"],
    "queue.unbind": ["unbind-ok"],
    "queue.delete": ["delete-ok"],
    "basic.qos": ["qos-ok"],
    "basic.consume": ["consume-ok"],
    "basic.cancel": ["cancel-ok"],
    "basic.get": ["get-ok", "get-empty"],
    "basic.recover": ["recover-ok"],
    "confirm.select": ["select-ok"],
    "tx.commit": ["commit-ok"],
}

# Methods the server sends on its own; txAMQP must hand them to the delegate,
# which it does only for methods that are nobody's response.
SERVER_INITIATED = [
    "connection.start",
    "connection.tune",
    "connection.close",
    "connection.blocked",
    "connection.unblocked",
    "channel.close",
    "basic.deliver",
    "basic.return",
    "basic.ack",
    "basic.nack",
    "basic.cancel",
]


def encode_frame(spec: Spec, frame: Frame) -> bytes:
    """Serialize C{frame} as it goes on the wire (type, channel, payload, frame-end)."""
    stream = BytesIO()
    codec = Codec(stream)
    codec.encode_octet(spec.constants.bypyname[frame.payload.type].id)
    codec.encode_short(frame.channel)
    frame.payload.encode(codec)
    codec.encode_octet(spec.constants.byname["frame-end"].id)
    return stream.getvalue()


def decode_frames(spec: Spec, data: bytes) -> list[Frame]:
    """Parse every frame in C{data}, checking each frame-end octet."""
    stream = BytesIO(data)
    codec = Codec(stream)
    frames = []
    while stream.tell() < len(data):
        kind = pythonize(spec.constants.byid[codec.decode_octet()].name)
        channel = codec.decode_short()
        payload = Frame.DECODERS[kind].decode(spec, codec)
        if codec.decode_octet() != spec.constants.byname["frame-end"].id:
            raise AssertionError("bad frame-end")
        frames.append(Frame(channel, payload))
    return frames


class SpecFileTests(SynchronousTestCase):
    """The shipped spec file and its loader."""

    def test_loads(self) -> None:
        """
        L{load_spec} parses the file at L{SPEC_PATH}, which is inside the
        package, as AMQP 0-9.
        """
        spec = load_spec()
        self.assertIsInstance(spec, Spec)
        self.assertEqual((spec.major, spec.minor), (0, 9))
        self.assertEqual(spec.file, SPEC_PATH)
        self.assertTrue(os.path.isfile(SPEC_PATH))

    def test_cached(self) -> None:
        """L{load_spec} parses once: every call returns the same object."""
        self.assertIs(load_spec(), load_spec())

    def test_classes(self) -> None:
        """The spec has the 0-9-1 classes plus RabbitMQ's confirm class."""
        self.assertEqual(
            [(c.name, c.id) for c in load_spec().classes],
            [
                ("connection", 10),
                ("channel", 20),
                ("exchange", 40),
                ("queue", 50),
                ("basic", 60),
                ("confirm", 85),
                ("tx", 90),
            ],
        )

    def test_constants(self) -> None:
        """Frame types, framing constants and reply codes have their wire values."""
        constants = {c.name: c.id for c in load_spec().constants}
        expected = {
            "frame-method": 1,
            "frame-header": 2,
            "frame-body": 3,
            "frame-heartbeat": 8,
            "frame-min-size": 4096,
            "frame-end": 206,
            "reply-success": 200,
            "content-too-large": 311,
            "no-route": 312,
            "no-consumers": 313,
            "connection-forced": 320,
            "access-refused": 403,
            "not-found": 404,
            "resource-locked": 405,
            "precondition-failed": 406,
            "frame-error": 501,
            "channel-error": 504,
            "not-allowed": 530,
            "internal-error": 541,
        }
        self.assertEqual({k: constants.get(k) for k in expected}, expected)

    def test_methods(self) -> None:
        """Each method has its class id, method id, and fields in wire order."""
        spec = load_spec()
        for name, (class_id, method_id, fields) in EXPECTED_METHODS.items():
            method = spec.parse_method(name)
            self.assertEqual(
                (method.klass.id, method.id, [(f.name, f.type) for f in method.fields]),
                (class_id, method_id, fields),
                name,
            )

    def test_content_methods(self) -> None:
        """Exactly publish, return, deliver and get-ok carry content."""
        spec = load_spec()
        carrying = sorted(
            f"{c.name}.{m.name}" for c in spec.classes for m in c.methods if m.content
        )
        self.assertEqual(
            carrying, ["basic.deliver", "basic.get-ok", "basic.publish", "basic.return"]
        )

    def test_basic_properties(self) -> None:
        """The basic class's content properties are in property-flag order."""
        basic = load_spec().classes.byname["basic"]
        self.assertEqual([(f.name, f.type) for f in basic.fields], BASIC_PROPERTIES)

    def test_responses(self) -> None:
        """Synchronous requests wait for their replies."""
        spec = load_spec()
        for name, responses in EXPECTED_RESPONSES.items():
            method = spec.parse_method(name)
            self.assertTrue(method.synchronous, name)
            self.assertEqual([r.name for r in method.responses], responses, name)
            for reply in method.responses:
                self.assertTrue(reply.response, f"{name} -> {reply.name}")

    def test_server_initiated_not_responses(self) -> None:
        """
        Methods the server sends unprompted, such as publisher-confirm
        C{basic.ack}/C{basic.nack}, are no method's response.
        """
        spec = load_spec()
        for name in SERVER_INITIATED:
            self.assertFalse(spec.parse_method(name).response, name)
        for klass in spec.classes:
            for method in klass.methods:
                names = [r.name for r in method.responses]
                if klass.name == "basic":
                    self.assertNotIn("ack", names)
                    self.assertNotIn("nack", names)

    def test_no_wait_fields_named_nowait(self) -> None:
        """
        Every no-wait flag is named C{nowait}, the only name txAMQP looks at
        when deciding not to wait for a reply.
        """
        spec = load_spec()
        flagged = sorted(
            f"{c.name}.{m.name}"
            for c in spec.classes
            for m in c.methods
            if "nowait" in m.fields.byname
        )
        self.assertEqual(
            flagged,
            [
                "basic.cancel",
                "basic.consume",
                "confirm.select",
                "exchange.bind",
                "exchange.declare",
                "exchange.delete",
                "exchange.unbind",
                "queue.bind",
                "queue.declare",
                "queue.delete",
                "queue.purge",
            ],
        )
        for klass in spec.classes:
            for method in klass.methods:
                self.assertNotIn("no-wait", method.fields.byname, method.name)


class CodecTests(SynchronousTestCase):
    """Frames encoded with the spec decode back to what went in."""

    def test_publish_round_trip(self) -> None:
        """
        A C{basic.publish} method frame, its content header with every
        property set, and its body survive encoding and decoding, and the
        method frame has the expected bytes.
        """
        spec = load_spec()
        publish = spec.parse_method("basic.publish")
        basic = spec.classes.byname["basic"]
        # Not valid UTF-8: txAMQP hands back str for bodies that decode as UTF-8.
        body = b"\x80\x04payload"
        properties: dict[str, Any] = {
            "content-type": "application/octet-stream",
            "content-encoding": "identity",
            "headers": {"task-id": "t-1", "attempt": 3},
            "delivery-mode": 2,
            "priority": 5,
            "correlation-id": "c-7",
            "reply-to": "results",
            "expiration": "60000",
            "message-id": "m-9",
            "timestamp": 1700000000,
            "type": "task",
            "user-id": "guest",
            "app-id": "funcx-endpoint",
            "cluster-id": "c",
        }
        frames = [
            Frame(3, Method(publish, 0, "tasks", "endpoint.1", True, False)),
            Frame(3, Header(basic, 0, len(body), **properties)),
            Frame(3, Body(body)),
        ]
        method_bytes = encode_frame(spec, frames[0])
        self.assertEqual(
            method_bytes,
            b"\x01\x00\x03"  # method frame on channel 3
            + b"\x00\x00\x00\x18"  # payload size 24
            + b"\x00\x3c\x00\x28"  # basic (60) . publish (40)
            + b"\x00\x00"  # reserved-1
            + b"\x05tasks"
            + b"\x0aendpoint.1"
            + b"\x01"  # mandatory=1, immediate=0, packed into one octet
            + b"\xce",
        )
        header_bytes = encode_frame(spec, frames[1])
        # class 60, weight 0, body size, then all 14 property flags set
        self.assertEqual(
            header_bytes[7:21],
            b"\x00\x3c\x00\x00" + len(body).to_bytes(8, "big") + b"\xff\xfc",
        )

        decoded = decode_frames(spec, method_bytes + header_bytes + encode_frame(spec, frames[2]))

        self.assertEqual([f.channel for f in decoded], [3, 3, 3])
        method = decoded[0].payload
        self.assertIs(method.method, publish)
        self.assertEqual(method.args, (0, "tasks", "endpoint.1", True, False))
        header = decoded[1].payload
        self.assertIs(header.klass, basic)
        self.assertEqual((header.weight, header.size), (0, len(body)))
        self.assertEqual(header.properties, properties)
        self.assertEqual(decoded[2].payload.content, body)

    def test_sparse_properties(self) -> None:
        """Only the properties that are set are flagged and encoded."""
        spec = load_spec()
        basic = spec.classes.byname["basic"]
        header = Header(basic, 0, 0, **{"delivery-mode": 2, "app-id": "x"})
        data = encode_frame(spec, Frame(1, header))
        # delivery-mode is flag bit 12, app-id flag bit 3
        self.assertEqual(data[19:21], b"\x10\x08")
        self.assertEqual(data[21:-1], b"\x02\x01x")
        [decoded] = decode_frames(spec, data)
        self.assertEqual(decoded.payload.properties, {"delivery-mode": 2, "app-id": "x"})


class RecordingDelegate(TwistedDelegate):
    """A delegate that records publisher confirms from the server."""

    def __init__(self) -> None:
        super().__init__()
        self.confirms: list[tuple[str, int, bool]] = []

    def basic_ack(self, ch: AMQChannel, msg: Message) -> None:
        self.confirms.append(("ack", msg.delivery_tag, msg.multiple))

    def basic_nack(self, ch: AMQChannel, msg: Message) -> None:
        self.confirms.append(("nack", msg.delivery_tag, msg.multiple))


class DispatchTests(SynchronousTestCase):
    """txAMQP, driven by this spec, routes incoming methods where they belong."""

    def setUp(self) -> None:
        self.spec = load_spec()
        self.clock = Clock()
        self.delegate = RecordingDelegate()
        self.client = AMQClient(self.delegate, "/", self.spec, clock=self.clock)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        # txAMQP sends the pre-0-9-1 style header "AMQP", 1, 1, major, minor;
        # RabbitMQ answers it with 0-9-1.
        self.assertEqual(self.transport.value(), b"AMQP\x01\x01\x00\x09")
        self.transport.clear()

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def receive(self, *frames: Frame) -> None:
        """Feed frames to the client as if the server had sent them."""
        self.client.dataReceived(b"".join(encode_frame(self.spec, f) for f in frames))

    def method(self, name: str, *args: Any) -> Method:
        """Build the method payload C{name} ("class.method") with C{args}."""
        return Method(self.spec.parse_method(name), *args)

    def test_server_confirms_reach_delegate(self) -> None:
        """The server's C{basic.ack} and C{basic.nack} go to the delegate."""
        self.receive(
            Frame(1, self.method("basic.ack", 7, True)),
            Frame(1, self.method("basic.nack", 8, False, False)),
        )
        self.assertEqual(self.delegate.confirms, [("ack", 7, True), ("nack", 8, False)])

    def test_return_reaches_return_queue(self) -> None:
        """A C{basic.return} with its content lands on C{basic_return_queue}."""
        basic = self.spec.classes.byname["basic"]
        self.receive(
            Frame(1, self.method("basic.return", 312, "NO_ROUTE", "tasks", "nowhere")),
            Frame(1, Header(basic, 0, 3, **{"delivery-mode": 2})),
            Frame(1, Body(b"\xff\x00\x01")),
        )
        returned = self.successResultOf(self.client.basic_return_queue.get())
        self.assertEqual(
            (returned.reply_code, returned.reply_text, returned.exchange, returned.routing_key),
            (312, "NO_ROUTE", "tasks", "nowhere"),
        )
        self.assertEqual(returned.content.body, b"\xff\x00\x01")
        self.assertEqual(returned.content.properties, {"delivery-mode": 2})

    def test_synchronous_call_gets_its_reply(self) -> None:
        """
        C{confirm_select} waits for C{select-ok}; a C{basic.ack} arriving
        meanwhile still goes to the delegate, not to the waiting call.
        """
        channel = self.successResultOf(self.client.channel(1))
        d = channel.confirm_select()
        self.assertNoResult(d)
        [sent] = decode_frames(self.spec, self.transport.value())
        self.assertEqual(sent.payload.method.name, "select")
        self.assertEqual(sent.payload.method.klass.name, "confirm")
        self.receive(Frame(1, self.method("basic.ack", 1, False)))
        self.assertNoResult(d)
        self.receive(Frame(1, self.method("confirm.select-ok")))
        reply = self.successResultOf(d)
        self.assertEqual(reply.method, self.spec.parse_method("confirm.select-ok"))
        self.assertEqual(self.delegate.confirms, [("ack", 1, False)])

    def test_nowait_does_not_wait(self) -> None:
        """With C{nowait=True} a synchronous request returns at once."""
        channel = self.successResultOf(self.client.channel(1))
        self.assertIsNone(self.successResultOf(channel.queue_declare(queue="q", nowait=True)))
        self.assertNoResult(channel.queue_declare(queue="q"))

    def test_channel_close_fails_waiting_call(self) -> None:
        """
        A passive declare answered by C{channel.close} 404 fails with that
        reply, and the client answers C{close-ok}.
        """
        channel = self.successResultOf(self.client.channel(1))
        d = channel.queue_declare(queue="missing", passive=True)
        self.transport.clear()
        self.receive(Frame(1, self.method("channel.close", 404, "NOT_FOUND - no queue", 50, 10)))
        failure = self.failureResultOf(d, ChannelClosed)
        reason = failure.value.args[0]
        self.assertEqual((reason.reply_code, reason.class_id, reason.method_id), (404, 50, 10))
        [sent] = decode_frames(self.spec, self.transport.value())
        self.assertEqual(sent.payload.method, self.spec.parse_method("channel.close-ok"))
