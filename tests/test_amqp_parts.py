"""Unit tests of the AMQP client's parts on their own: the coalescing writer,
the heartbeat checks, the channel's content assembly and the codec's
publish frames (the client as a whole: tests.test_amqp_units)."""

from __future__ import annotations

import struct
from typing import Any, List, Optional

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.amqp.channel import Delivery, FastChannel, Returned
from funcx_endpoint.amqp.client import AMQPClient
from funcx_endpoint.amqp.codec import (
    BASIC,
    FRAME_BODY,
    FRAME_END_BYTE,
    FRAME_HEARTBEAT,
    HEADER_HEAD,
    ProtocolViolation,
    encode_frame,
    encode_properties,
    publish_frames,
)
from funcx_endpoint.amqp.heartbeat import Heartbeats
from funcx_endpoint.amqp.writer import CoalescingWriter


def connected(transport: Optional[StringTransport]) -> Protocol:
    protocol = Protocol()
    protocol.transport = transport
    return protocol


class CoalescingWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.writes: List[bytes] = []
        self.transport.write = self.writes.append  # type: ignore[method-assign]
        self.writer = CoalescingWriter(self.clock, connected(self.transport))

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_write_per_turn(self) -> None:
        """Everything written in a reactor turn leaves in one transport write, in order."""
        self.writer.write(b"a")
        self.writer.write_many([b"b", memoryview(b"cd")])
        self.writer.write(b"e")
        self.assertEqual(self.writes, [])
        self.clock.advance(1)
        self.assertEqual(self.writes, [b"abcde"])
        self.assertEqual(self.writer.last_sent, 1)

    def test_flush_now(self) -> None:
        self.writer.write(b"a")
        self.writer.flush_now()
        self.assertEqual(self.writes, [b"a"])
        self.writer.flush_now()  # nothing buffered: nothing written
        self.assertEqual(self.writes, [b"a"])

    def test_stop_cancels_the_flush(self) -> None:
        self.writer.write(b"a")
        self.writer.stop()
        self.assertEqual(self.writes, [])

    def test_no_transport_drops(self) -> None:
        writer = CoalescingWriter(self.clock, connected(None))
        writer.write(b"a")
        self.clock.advance(0)
        self.assertEqual(writer.last_sent, 0)


class HeartbeatsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.writer = CoalescingWriter(self.clock, connected(self.transport))
        self.dropped: List[None] = []
        self.heartbeats = Heartbeats(self.clock, self.writer, lambda: self.dropped.append(None), 3)

    def tearDown(self) -> None:
        self.heartbeats.stop()
        self.writer.flush_now()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_off_at_interval_zero(self) -> None:
        self.heartbeats.start(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sends_and_drops(self) -> None:
        self.heartbeats.start(10)
        self.clock.advance(5)
        self.clock.advance(0)
        self.assertEqual(self.transport.value(), encode_frame(FRAME_HEARTBEAT, 0, b""))
        self.clock.advance(20)
        self.heartbeats.heard()
        self.clock.pump([5] * 2)
        self.assertEqual(self.dropped, [])  # heard 10 s ago
        self.clock.pump([5] * 6)
        self.assertEqual(self.dropped, [None])  # silent for 40 s > 3 intervals

    def test_stop(self) -> None:
        self.heartbeats.start(10)
        self.heartbeats.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


def content_header(size: int, **properties: Any) -> bytes:
    flags, props = encode_properties(properties)
    return HEADER_HEAD.pack(BASIC, 0, size, flags) + props


class ChannelContentTests(SynchronousTestCase):
    """The channel puts a message together from its content frames."""

    def setUp(self) -> None:
        self.client = AMQPClient(clock=Clock())
        self.channel: FastChannel = self.client.channel_sync(1)
        self.got: List[Any] = []
        self.channel.handlers.consumers["c"] = self.got.append
        self.channel.handlers.on_return = self.got.append

    def test_no_message_begun(self) -> None:
        """Content frames without a fast-path method are not the channel's."""
        self.assertFalse(self.channel.content_header(content_header(0)))
        self.assertFalse(self.channel.content_body(b"x"))

    def test_delivery(self) -> None:
        self.channel.begin_content(Delivery("c", 1, False, "e", "r"))
        self.assertTrue(self.channel.content_header(content_header(5, **{"message-id": "m"})))
        self.assertTrue(self.channel.content_body(b"ab"))
        self.assertEqual(self.got, [])
        self.assertTrue(self.channel.content_body(b"cde"))
        [delivery] = self.got
        self.assertEqual((delivery.body, delivery.properties), (b"abcde", {"message-id": "m"}))
        self.assertFalse(self.channel.content_body(b"x"))  # the message is done

    def test_empty_return(self) -> None:
        self.channel.begin_content(Returned(312, "NO_ROUTE", "e", "r"))
        self.assertTrue(self.channel.content_header(content_header(0)))
        [returned] = self.got
        self.assertEqual((returned.reply_code, returned.body), (312, b""))

    def test_sixteen_properties_refused(self) -> None:
        self.channel.begin_content(Delivery("c", 1, False, "e", "r"))
        header = HEADER_HEAD.pack(BASIC, 0, 0, 1)
        self.assertRaises(ProtocolViolation, self.channel.content_header, header)


class PublishFramesTests(SynchronousTestCase):
    def test_pieces_split_without_copies(self) -> None:
        """Body frames hold frame_max - 8 bytes, as views of the pieces given."""
        parts = publish_frames(1, "ex", "rk", [b"a" * 5, b"b" * 5], 10, {}, False, 8 + 4)
        bodies = []
        index = 6  # after the method and header frames
        while index < len(parts):
            kind, channel, size = struct.unpack("!BHI", parts[index])
            self.assertEqual((kind, channel), (FRAME_BODY, 1))
            index += 1
            body = b""
            while len(body) < size:
                self.assertIsInstance(parts[index], memoryview)
                body += bytes(parts[index])
                index += 1
            self.assertEqual(parts[index], FRAME_END_BYTE)
            index += 1
            bodies.append(body)
        self.assertEqual(bodies, [b"aaaa", b"abbb", b"bb"])
