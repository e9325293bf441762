"""Unit tests of the AMQP client's fast path and heartbeats, of the task
tracker and of the result spool's ordering (no broker)."""

from __future__ import annotations

import os
import struct
import uuid
from typing import Any, Callable, List, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txamqp.connection import Frame, Method

from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.client import AMQPClient
from funcx_endpoint.amqp.codec import (
    BASIC,
    BASIC_DELIVER,
    BASIC_PUBLISH,
    FRAME_BODY,
    FRAME_END_BYTE,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    decode_properties,
    encode_properties,
)
from funcx_endpoint.amqp.connection import AMQPURL, AMQPConnectionService, AMQPError
from funcx_endpoint.amqp.spec import load_spec
from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.endpoint.tasks import Decision, TaskTracker


def shortstr(value: str) -> bytes:
    data = value.encode()
    return bytes((len(data),)) + data


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack("!BHI", kind, channel, len(payload)) + payload + FRAME_END_BYTE


def deliver_frames(
    body: bytes, frame_max: int, tag: int = 1, consumer: str = "ctag", **properties: Any
) -> bytes:
    """What a broker sends for one ``basic.deliver`` on channel 1."""
    method = (
        struct.pack("!HH", BASIC, BASIC_DELIVER)
        + shortstr(consumer)
        + struct.pack("!Q", tag)
        + b"\x00"
        + shortstr("ex")
        + shortstr("rk")
    )
    flags, props = encode_properties(properties)
    header = struct.pack("!HHQH", BASIC, 0, len(body), flags) + props
    data = frame(FRAME_METHOD, 1, method) + frame(FRAME_HEADER, 1, header)
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        data += frame(FRAME_BODY, 1, body[start : start + chunk])
    return data


def parse_frames(data: bytes) -> List[Tuple[int, int, bytes]]:
    """(type, channel, payload) of each frame in ``data``; all bytes must be used."""
    frames = []
    offset = 0
    while offset < len(data):
        kind, channel, size = struct.unpack_from("!BHI", data, offset)
        payload = data[offset + 7 : offset + 7 + size]
        assert data[offset + 7 + size : offset + 8 + size] == FRAME_END_BYTE
        frames.append((kind, channel, payload))
        offset += 8 + size
    return frames


class ClientTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = AMQPClient(clock=self.clock)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.assertEqual(self.transport.value(), b"AMQP\x00\x00\x09\x01")
        self.transport.clear()
        self.deliveries: List[Delivery] = []
        self.channel = self.client.channel_sync(1)
        self.channel.handlers.consumers["ctag"] = self.deliveries.append

    def tearDown(self) -> None:
        self.client.flush_now()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FrameParserTests(ClientTestCase):
    """Incoming deliveries through the fast-path parser."""

    def test_body_over_several_frames(self) -> None:
        """A task body larger than one frame is put back together, whole."""
        body = bytes(range(256)) * 1000  # 256,000 bytes
        data = deliver_frames(body, 4096, tag=7, **{"message-id": "m1", "delivery-mode": 2})
        self.client.dataReceived(data)
        [delivery] = self.deliveries
        self.assertEqual(delivery.body, body)
        self.assertEqual(delivery.delivery_tag, 7)
        self.assertEqual((delivery.exchange, delivery.routing_key), ("ex", "rk"))
        self.assertEqual(delivery.properties, {"message-id": "m1", "delivery-mode": 2})
        self.assertEqual(self.client._buffer, bytearray())

    def test_fed_in_arbitrary_pieces(self) -> None:
        """Frames split anywhere between reads (even inside a frame header)
        give the same deliveries."""
        bodies = [b"a" * 10_000, b"", b"bc" * 3000, b"d"]
        data = b"".join(deliver_frames(body, 1024, tag=i + 1) for i, body in enumerate(bodies))
        for size in (1, 3, 7, 1000, 1031):
            self.deliveries.clear()
            for start in range(0, len(data), size):
                self.client.dataReceived(data[start : start + size])
            self.assertEqual([d.body for d in self.deliveries], bodies)
            self.assertEqual([d.delivery_tag for d in self.deliveries], [1, 2, 3, 4])
            self.assertEqual(self.client._buffer, bytearray())

    def test_bad_frame_end_aborts(self) -> None:
        """Bytes that are not AMQP framing drop the connection."""
        data = bytearray(deliver_frames(b"xyz", 4096))
        data[-1] = 0
        self.client.dataReceived(bytes(data))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.deliveries, [])
        self.flushLoggedErrors()


class PublishFramingTests(ClientTestCase):
    """Outgoing ``basic.publish``: body frames sized by the negotiated frame_max."""

    def published(self, body: bytes) -> List[Tuple[int, int, bytes]]:
        self.channel.publish("ex", "rk", body, {"message-id": "m"}, mandatory=True)
        self.client.flush_now()
        frames = parse_frames(self.transport.value())
        self.transport.clear()
        kind, channel, method = frames[0]
        self.assertEqual((kind, channel), (FRAME_METHOD, 1))
        self.assertEqual(struct.unpack_from("!HH", method), (BASIC, BASIC_PUBLISH))
        kind, _, header = frames[1]
        self.assertEqual(kind, FRAME_HEADER)
        _, _, size, flags = struct.unpack_from("!HHQH", header)
        self.assertEqual(size, len(body))
        self.assertEqual(decode_properties(flags, header, 14), {"message-id": "m"})
        body_frames = frames[2:]
        self.assertEqual({k for k, _, _ in body_frames} - {FRAME_BODY}, set())
        self.assertEqual(b"".join(p for _, _, p in body_frames), body)
        return body_frames

    def test_split_by_frame_max(self) -> None:
        self.client.MAX_LENGTH = 4096
        body_frames = self.published(b"x" * 10_000)
        self.assertEqual([len(p) for _, _, p in body_frames], [4088, 4088, 1824])

    def test_frame_max_zero_means_unlimited(self) -> None:
        """frame_max 0 (no limit): the whole body goes in one frame."""
        self.client.MAX_LENGTH = 0
        body_frames = self.published(b"y" * 300_000)
        self.assertEqual([len(p) for _, _, p in body_frames], [300_000])

    def test_empty_body(self) -> None:
        for frame_max in (0, 4096):
            self.client.MAX_LENGTH = frame_max
            self.assertEqual(self.published(b""), [])


class TaskTrackerTests(SynchronousTestCase):
    def test_duplicate_deliveries_all_settled(self) -> None:
        """Every delivery of a task that runs is returned when it finishes,
        also a second one on the same channel."""
        tracker = TaskTracker()
        self.assertIs(tracker.delivered("t", (1, 1)), Decision.RUN)
        self.assertIs(tracker.delivered("t", (1, 2)), Decision.ALREADY_RUNNING)
        self.assertIs(tracker.delivered("t", (2, 1)), Decision.ALREADY_RUNNING)
        self.assertEqual(tracker.finished("t"), [(1, 1), (1, 2), (2, 1)])
        self.assertEqual(len(tracker), 0)
        self.assertIs(tracker.delivered("t", (2, 5)), Decision.ALREADY_DONE)
        self.assertEqual(tracker.finished("t"), [])

    def test_withdraw_returns_every_delivery(self) -> None:
        tracker = TaskTracker()
        tracker.delivered("a", (1, 1))
        tracker.delivered("a", (1, 3))
        tracker.delivered("b", (1, 2))
        self.assertEqual(sorted(tracker.withdraw(["a", "b", "c"])), [(1, 1), (1, 2), (1, 3)])
        # Withdrawn tasks are not done: a new delivery runs them.
        self.assertIs(tracker.delivered("a", (2, 1)), Decision.RUN)

    def test_mark_done(self) -> None:
        """Tasks whose results were spooled by an earlier run are not run again."""
        tracker = TaskTracker()
        tracker.mark_done(["a", "b"])
        self.assertIs(tracker.delivered("a", (1, 1)), Decision.ALREADY_DONE)
        self.assertEqual(len(tracker), 0)

    def test_remembers_a_bounded_number(self) -> None:
        tracker = TaskTracker(remember_done=2)
        tracker.mark_done(["a", "b", "c"])
        self.assertIs(tracker.delivered("a", (1, 1)), Decision.RUN)
        self.assertIs(tracker.delivered("c", (1, 2)), Decision.ALREADY_DONE)


class FakeThreads:
    """A ``run_in_thread`` whose calls wait until the test runs them."""

    def __init__(self) -> None:
        self.calls: List[Tuple[Callable[..., Any], Tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def names(self) -> List[str]:
        return [f.__name__ for f, _, _ in self.calls]

    def run(self, index: int) -> None:
        """Run the call (as the thread would) and fire its Deferred."""
        f, args, d = self.calls[index]
        d.callback(f(*args))

    def fail(self, index: int, error: Exception) -> None:
        self.calls[index][2].errback(error)


class ResultSpoolOrderTests(SynchronousTestCase):
    """Operations on one task id run in call order, each in a thread."""

    def setUp(self) -> None:
        self.threads = FakeThreads()
        self.dir = os.path.abspath(self.mktemp())
        self.spool = ResultSpool(self.dir, self.threads)
        self.task = str(uuid.uuid4())

    def test_remove_after_write_waits_for_it(self) -> None:
        written = self.spool.write([(self.task, b"result")])
        removed = self.spool.remove([self.task])
        self.assertEqual(self.threads.names(), ["_write_many"])  # the remove waits
        other = str(uuid.uuid4())
        self.spool.write([(other, b"other")])  # another task's write does not
        self.assertEqual(self.threads.names(), ["_write_many", "_write_many"])
        self.threads.run(0)
        self.assertEqual(self.successResultOf(written), 1)
        self.assertEqual(self.threads.names(), ["_write_many", "_write_many", "_remove_many"])
        self.assertTrue(os.path.exists(os.path.join(self.dir, self.task)))
        self.threads.run(2)
        self.assertEqual(self.successResultOf(removed), 1)
        self.threads.run(1)
        self.assertEqual(os.listdir(self.dir), [other])  # no orphan

    def test_a_failed_write_does_not_stop_the_next(self) -> None:
        written = self.spool.write([(self.task, b"result")])
        removed = self.spool.remove([self.task])
        self.threads.fail(0, OSError("disk full"))
        self.failureResultOf(written, OSError)  # the writer's to handle
        self.assertEqual(self.threads.names(), ["_write_many", "_remove_many"])
        self.threads.run(1)
        self.assertEqual(self.successResultOf(removed), 0)

    def test_a_failed_remove_is_logged(self) -> None:
        removed = self.spool.remove([self.task])
        self.threads.fail(0, PermissionError("read-only"))
        self.assertEqual(self.successResultOf(removed), 0)  # no unhandled error
        self.assertEqual(len(self.flushLoggedErrors(PermissionError)), 1)
        written = self.spool.write([(self.task, b"again")])
        self.threads.run(1)
        self.assertEqual(self.successResultOf(written), 1)

    def test_load_waits_for_everything_before_and_everything_after_for_it(self) -> None:
        self.spool.write([(self.task, b"result")])
        loaded = self.spool.load()
        other = str(uuid.uuid4())
        self.spool.write([(other, b"other")])
        self.assertEqual(self.threads.names(), ["_write_many"])
        self.threads.run(0)
        self.assertEqual(self.threads.names(), ["_write_many", "_load_all"])
        self.threads.run(1)
        self.assertEqual(self.successResultOf(loaded), {self.task: b"result"})
        self.assertEqual(self.threads.names(), ["_write_many", "_load_all", "_write_many"])
        self.threads.run(2)
        self.assertEqual(self.spool._last, {})
        self.assertIsNone(self.spool._last_load)


class HeartbeatTests(SynchronousTestCase):
    """Heartbeats are sent and the peer is checked on the client's clock."""

    interval = 10

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = AMQPClient(heartbeat=self.interval, clock=self.clock)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.transport.clear()
        # The broker's connection.tune: the client answers tune-ok (with its
        # own interval) and starts its heartbeat timers.
        tune = load_spec().classes.byname["connection"].methods.byname["tune"]
        self.client.dataReceived(self.client._pack_frame(Frame(0, Method(tune, 2047, 131072, 60))))
        self.clock.advance(0)
        [(kind, channel, _)] = parse_frames(self.transport.value())
        self.assertEqual((kind, channel), (FRAME_METHOD, 0))  # tune-ok
        self.transport.clear()

    def tearDown(self) -> None:
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def sent_heartbeats(self) -> int:
        frames = parse_frames(self.transport.value())
        self.transport.clear()
        return sum(1 for kind, channel, payload in frames if kind == FRAME_HEARTBEAT)

    def test_idle_connection_sends_heartbeats(self) -> None:
        """Nothing else to send: a heartbeat every half interval."""
        self.clock.advance(self.interval / 2 - 0.1)
        self.assertEqual(self.sent_heartbeats(), 0)
        self.clock.advance(0.1)
        self.assertEqual(self.sent_heartbeats(), 1)
        self.clock.pump([self.interval / 2] * 4)
        self.assertEqual(self.sent_heartbeats(), 4)

    def test_busy_connection_sends_no_heartbeats(self) -> None:
        """Frames written less than half an interval ago make a heartbeat unneeded."""
        channel = self.client.channel_sync(1)
        for tag in range(1, 31):
            self.clock.advance(1)
            channel.ack(tag)
            self.clock.advance(0)
        frames = parse_frames(self.transport.value())
        self.assertEqual([kind for kind, _, _ in frames], [FRAME_METHOD] * 30)
        # Quiet again: heartbeats resume.
        self.transport.clear()
        self.clock.advance(self.interval / 2)
        self.assertEqual(self.sent_heartbeats(), 1)

    def test_silent_peer_dropped(self) -> None:
        """No data from the broker for more than MAX_UNSEEN_HEARTBEAT intervals
        (checked once an interval): the connection is aborted."""
        limit = self.interval * self.client.MAX_UNSEEN_HEARTBEAT
        self.clock.advance(limit)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(self.interval)
        self.assertTrue(self.transport.disconnected)  # aborted, not closed cleanly

    def test_peer_heard_from_is_kept(self) -> None:
        """Data from the broker (heartbeats included) resets the silence."""
        heartbeat = frame(FRAME_HEARTBEAT, 0, b"")
        for _ in range(20):
            self.clock.advance(self.interval * 2)
            self.client.dataReceived(heartbeat)
        self.assertFalse(self.transport.disconnecting)
        # Then the broker goes quiet.
        self.clock.advance(self.interval * (self.client.MAX_UNSEEN_HEARTBEAT + 1))
        self.assertTrue(self.transport.disconnected)


class _PendingEndpoint:
    """A client endpoint whose connection attempts never finish."""

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred()


class _ClosingClient:
    """What ``_setup_failed`` uses of a client: its transport and when it closed."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.closed: Deferred[None] = Deferred()

    def when_closed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.closed.addCallback(lambda _: d.callback(None))
        return d


class SetupFailureTests(SynchronousTestCase):
    def test_stop_on_fatal_waits_for_the_failed_connection(self) -> None:
        """A fatal set-up error's observers may stop the service at once (the
        endpoint does on startup): the stop still waits for that connection to
        close (it once left it open, and a test's reactor dirty)."""

        async def no_setup(client: Any) -> None:
            return None

        clock = Clock()
        service = AMQPConnectionService(
            clock,
            AMQPURL.parse("amqps://u:p@localhost:5671/"),
            no_setup,
            endpoint=_PendingEndpoint(),  # type: ignore[arg-type]
        )
        service.startService()
        client = _ClosingClient()
        stops: List[Deferred[None]] = []
        service.when_fatal().addCallback(lambda _: stops.append(service.stopService()))
        service._setup_failed(client, AMQPError("no queue", 404, fatal=True))  # type: ignore[arg-type]
        [stopped] = stops
        self.assertTrue(client.transport.disconnecting)
        clock.advance(0)
        self.assertNoResult(stopped)
        client.closed.callback(None)
        self.successResultOf(stopped)
