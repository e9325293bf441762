"""The fake broker of funcx_endpoint.testing.amqp: same interfaces as the real
client, and RabbitMQ's answers to what the endpoint does."""

from __future__ import annotations

import re
from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from txamqp.client import ChannelClosed, Closed
from zope.interface.verify import verifyClass, verifyObject

from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.client import AMQPClient
from funcx_endpoint.amqp.connection import AMQPURL, AMQPConnectionService, AMQPError, close_reason
from funcx_endpoint.amqp.interfaces import IAMQPChannel, IAMQPClient, IAMQPConnectionService
from funcx_endpoint.amqp.publisher import _TOO_LARGE, ConfirmingPublisher, PublishFailed
from funcx_endpoint.testing.amqp import (
    FakeAMQPClient,
    FakeBroker,
    FakeChannel,
    FakeConnectionService,
)

URL = AMQPURL.parse("amqp://u:p@broker.example/")


async def no_setup(client: Any) -> None:
    return None


class InterfaceTests(SynchronousTestCase):
    """The fakes and the real things provide the same interfaces."""

    def test_channel(self) -> None:
        client = AMQPClient(clock=Clock())
        verifyObject(IAMQPChannel, client.channel_sync(1))
        verifyClass(IAMQPChannel, client.channelFactory)
        broker = FakeBroker(Clock())
        verifyObject(IAMQPChannel, FakeChannel(FakeAMQPClient(broker, broker.clock), 1))
        verifyClass(IAMQPChannel, FakeChannel)

    def test_client(self) -> None:
        verifyObject(IAMQPClient, AMQPClient(clock=Clock()))
        verifyObject(IAMQPClient, FakeAMQPClient(FakeBroker(Clock()), Clock()))

    def test_connection_service(self) -> None:
        clock = Clock()
        verifyObject(IAMQPConnectionService, AMQPConnectionService(clock, URL, no_setup))
        broker = FakeBroker(clock)
        verifyObject(IAMQPConnectionService, broker.connection_service(clock, URL, no_setup))


class FakeBrokerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = FakeBroker(self.clock)
        self.broker.declare_queue("q")
        self.broker.exchanges.add("x")
        self.client = FakeAMQPClient(self.broker, self.clock)
        self.channel = self.successResultOf(Deferred.fromCoroutine(self.client.open_channel(1)))
        self.closed: List[Any] = []
        self.channel.handlers.on_close = self.closed.append
        self.deliveries: List[Delivery] = []
        self.channel.handlers.consumers["c"] = self.deliveries.append

    def tearDown(self) -> None:
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def consume(self, channel: Any = None, prefetch: int = 0) -> None:
        channel = channel or self.channel
        self.successResultOf(channel.basic_qos(prefetch_count=prefetch))
        self.successResultOf(channel.basic_consume(queue="q", consumer_tag="c", exclusive=True))


class RefusalTests(FakeBrokerTestCase):
    def test_passive_declare_of_a_missing_queue(self) -> None:
        """RabbitMQ's 404 closes the channel (next turn); the request fails
        with the close, and the owner hears of it."""
        d = self.channel.queue_declare(queue="nope", passive=True)
        self.assertNoResult(d)
        self.clock.advance(0)
        error = self.failureResultOf(d, ChannelClosed).value
        self.assertEqual(close_reason(error), (404, "NOT_FOUND - no queue 'nope' in vhost '/'"))
        self.assertTrue(self.channel.closed)
        [reason] = self.closed
        self.assertEqual(close_reason(reason)[0], 404)
        # Requests on the closed channel fail at once.
        self.failureResultOf(self.channel.basic_qos(prefetch_count=1), Closed)

    def test_second_exclusive_consumer_refused(self) -> None:
        self.consume()
        other = self.successResultOf(Deferred.fromCoroutine(self.client.open_channel(2)))
        d = other.basic_consume(queue="q", consumer_tag="c2", exclusive=True)
        self.clock.advance(0)
        code, text = close_reason(self.failureResultOf(d, ChannelClosed).value)
        self.assertEqual(code, 403)
        self.assertIn("in exclusive use", text)
        self.assertFalse(self.channel.closed)

    def test_refusal_chosen_by_the_test(self) -> None:
        self.broker.refuse("confirm_select", 540, "NOT_IMPLEMENTED - no confirms")
        d = self.channel.confirm_select()
        self.clock.advance(0)
        self.assertEqual(close_reason(self.failureResultOf(d, Closed).value)[0], 540)

    def test_held_request_fails_when_the_connection_is_lost(self) -> None:
        self.consume()
        self.broker.hold("basic_cancel")
        d = self.channel.basic_cancel(consumer_tag="c")
        self.assertNoResult(d)
        self.broker.enqueue("q", b"still delivered: the cancel is not answered")
        self.clock.advance(0)
        self.assertEqual(len(self.deliveries), 1)
        assert self.client.transport is not None
        self.client.transport.loseConnection()
        self.clock.advance(0)
        self.failureResultOf(d, Closed)
        self.broker.answer_held("basic_cancel")  # nothing left to answer

    def test_held_request_answered(self) -> None:
        self.consume()
        self.broker.hold("basic_cancel")
        d = self.channel.basic_cancel(consumer_tag="c")
        self.broker.answer_held("basic_cancel")
        self.successResultOf(d)
        self.broker.enqueue("q", b"not delivered")
        self.clock.advance(0)
        self.assertEqual(self.deliveries, [])


class DeliveryTests(FakeBrokerTestCase):
    def test_prefetch_and_requeue_on_close(self) -> None:
        self.consume(prefetch=2)
        self.broker.enqueue("q", b"1", b"2", b"3")
        self.clock.advance(0)
        self.assertEqual([d.body for d in self.deliveries], [b"1", b"2"])
        self.channel.ack(1)
        self.clock.advance(0)
        self.assertEqual([d.delivery_tag for d in self.deliveries], [1, 2, 3])
        self.client.connection_lost(_lost())
        self.assertEqual(len(self.closed), 1)
        queue = self.broker.queues["q"]
        self.assertEqual(
            [(m.body, m.redelivered) for m in queue.messages], [(b"2", True), (b"3", True)]
        )
        self.assertEqual(queue.consumers, [])

    def test_unknown_delivery_tag_closes_the_channel(self) -> None:
        self.consume()
        self.broker.enqueue("q", b"1")
        self.clock.advance(0)
        self.channel.ack(1)
        self.channel.ack(1)
        self.assertEqual(self.broker.violations, ["ack of unknown delivery tag 1 on channel 1"])
        self.clock.advance(0)
        self.assertEqual(close_reason(self.closed[0])[0], 406)

    def test_reject(self) -> None:
        self.consume()
        self.broker.enqueue("q", b"poison", b"again")
        self.clock.advance(0)
        self.channel.reject(1, requeue=False)
        self.channel.reject(2, requeue=True)
        self.clock.advance(0)
        queue = self.broker.queues["q"]
        self.assertEqual([m.body for m in queue.dead], [b"poison"])
        self.assertEqual([(d.body, d.redelivered) for d in self.deliveries[2:]], [(b"again", True)])

    def test_nack_multiple(self) -> None:
        self.consume()
        self.broker.enqueue("q", b"1", b"2", b"3")
        self.clock.advance(0)
        self.channel.nack(2, multiple=True, requeue=True)
        self.channel.nack(3, requeue=False)
        self.assertEqual([m.body for m in self.broker.queues["q"].dead], [b"3"])
        self.clock.advance(0)
        redelivered = [(d.body, d.delivery_tag, d.redelivered) for d in self.deliveries[3:]]
        self.assertEqual(redelivered, [(b"1", 4, True), (b"2", 5, True)])

    def test_half_open_connection_keeps_its_consumer(self) -> None:
        self.consume()
        self.broker.enqueue("q", b"1")
        self.clock.advance(0)
        self.client.connection_lost(_lost(), half_open=True)
        other = FakeAMQPClient(self.broker, self.clock)
        channel = self.successResultOf(Deferred.fromCoroutine(other.open_channel(1)))
        d = channel.basic_consume(queue="q", consumer_tag="c", exclusive=True)
        self.clock.advance(0)
        self.failureResultOf(d, ChannelClosed)
        self.broker.drop_half_open()
        self.assertEqual([m.redelivered for m in self.broker.queues["q"].messages], [True])

    def test_using_a_closed_channel_is_a_violation(self) -> None:
        self.channel.close_by_broker(406, "PRECONDITION_FAILED - whatever")
        self.channel.ack(1)
        self.assertEqual(self.broker.violations, ["basic.ack on closed channel 1"])
        self.broker.violations.clear()


class ConfirmTests(FakeBrokerTestCase):
    """The fake's confirms drive the real ConfirmingPublisher."""

    def setUp(self) -> None:
        super().setUp()
        self.publisher = ConfirmingPublisher(self.channel, on_closed=self.closed.append)
        self.successResultOf(Deferred.fromCoroutine(self.publisher.start()))

    def test_ack_nack_return(self) -> None:
        ds = [
            self.publisher.publish("x", "k", b"m%d" % i, {"message-id": str(i)}) for i in range(4)
        ]
        self.assertEqual([m.seq for m in self.broker.published], [1, 2, 3, 4])
        self.channel.confirm(2, multiple=True)
        self.successResultOf(ds[0])
        self.successResultOf(ds[1])
        self.channel.nack_publish(3)
        self.assertTrue(self.failureResultOf(ds[2], PublishFailed).value.nacked)
        self.channel.return_publish(4)
        self.assertTrue(self.failureResultOf(ds[3], PublishFailed).value.returned)

    def test_too_large(self) -> None:
        """The broker's close names its limit in RabbitMQ's words."""
        self.broker.max_message_size = 10
        big = self.publisher.publish("x", "k", [b"0123456789", b"!"])
        small = self.publisher.publish("x", "k", b"ok")
        self.assertEqual(self.broker.published, [])
        self.clock.advance(0)
        self.assertEqual(self.failureResultOf(big, PublishFailed).value.too_large, 10)
        self.assertIsNone(self.failureResultOf(small, PublishFailed).value.too_large)
        self.assertTrue(_TOO_LARGE.search(close_reason(self.closed[0])[1]))

    def test_unknown_exchange(self) -> None:
        d = self.publisher.publish("nope", "k", b"m")
        self.clock.advance(0)
        self.assertEqual(self.failureResultOf(d, PublishFailed).value.code, 404)
        self.assertTrue(re.search("no exchange 'nope'", close_reason(self.closed[0])[1]))

    def test_bad_properties_raise(self) -> None:
        d = self.publisher.publish("x", "k", b"m", {"no-such-property": 1})
        self.failureResultOf(d, PublishFailed)
        self.assertEqual(self.broker.published, [])


class ConnectionServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = FakeBroker(self.clock)
        self.prepared: List[Any] = []

    async def prepare(self, client: Any) -> None:
        self.prepared.append(client)
        channel = await client.open_channel(1)
        await channel.queue_declare(queue="q", passive=True)

    def test_fatal_set_up_error(self) -> None:
        async def fatal(client: Any) -> None:
            raise AMQPError("no such queue", 404, fatal=True)

        service = self.broker.connection_service(self.clock, URL, fatal, name="tasks")
        service.startService()
        fatal_errors: List[AMQPError] = []
        service.when_fatal().addCallback(fatal_errors.append)
        self.failureResultOf(service.connect(), AMQPError)
        self.assertEqual([e.message for e in fatal_errors], ["no such queue"])
        self.assertEqual(service.state(), "failed")
        self.clock.advance(0)
        self.assertIsNone(self.broker.clients[0].transport)
        self.successResultOf(service.stopService())

    def test_connect_lose_reconnect(self) -> None:
        self.broker.declare_queue("q")
        service = self.broker.connection_service(self.clock, URL, self.prepare, name="tasks")
        self.assertIsInstance(service, FakeConnectionService)
        service.startService()
        connected = service.when_connected()
        self.assertNoResult(connected)
        client = self.successResultOf(service.connect())
        self.assertIs(self.successResultOf(connected), client)
        self.assertEqual((service.state(), service.connections), ("connected", 1))
        self.clock.advance(5)
        service.lose()
        self.assertEqual((service.state(), service.lost_at), ("connecting", 5))
        self.successResultOf(service.connect())
        self.assertEqual(service.connections, 2)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(service.state(), "stopped")

    def test_non_fatal_set_up_error(self) -> None:
        service = self.broker.connection_service(self.clock, URL, self.prepare, name="tasks")
        service.startService()
        d = service.connect()
        self.clock.advance(0)
        self.failureResultOf(d, ChannelClosed)
        self.assertEqual(service.state(), "connecting")
        self.assertEqual(len(service.setup_errors), 1)
        self.successResultOf(service.stopService())


def _lost() -> Any:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    return Failure(ConnectionLost())
