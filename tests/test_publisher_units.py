"""ConfirmingPublisher and the registration's publish properties, without a broker."""

from __future__ import annotations

from typing import Any, List

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.amqp.channel import ChannelHandlers
from funcx_endpoint.amqp.publisher import ConfirmingPublisher, PublishFailed
from funcx_endpoint.endpoint.transport import BrokerInfo


class FakeChannel:
    """Records publishes; refuses properties it is told to refuse."""

    def __init__(self) -> None:
        self.handlers = ChannelHandlers()
        self.published: List[Any] = []

    def publish(self, exchange: str, routing_key: str, body: bytes, props: Any, mandatory: bool):
        if "bad" in props:
            raise ValueError("unknown AMQP basic property 'bad'")
        self.published.append((body, props))


class PublisherTests(SynchronousTestCase):
    def test_a_publish_that_raises_fails_its_deferred_and_uses_no_sequence_number(self) -> None:
        channel = FakeChannel()
        publisher = ConfirmingPublisher(channel)  # type: ignore[arg-type]
        failed = publisher.publish("x", "k", b"one", {"bad": 1})
        error = self.failureResultOf(failed, PublishFailed).value
        self.assertIn("unknown AMQP basic property 'bad'", str(error))
        self.assertEqual(publisher.in_flight, 0)
        # The next message is the broker's delivery tag 1: its confirm settles it.
        ok = publisher.publish("x", "k", b"two", {"message-id": "t2"})
        self.assertNoResult(ok)
        channel.handlers.on_ack(1, False)
        self.assertIsNone(self.successResultOf(ok))


class RegistrationPropertiesTests(SynchronousTestCase):
    def answer(self, properties: Any) -> dict:
        url = "amqps://u:p@broker.example:5671/"
        return {
            "endpoint_id": "e1",
            "task_queue_info": {"connection_url": url, "exchange": "tasks", "queue": "e1.tasks"},
            "result_queue_info": {
                "connection_url": url,
                "exchange": "results",
                "queue": "results",
                "queue_publish_kwargs": {"properties": properties},
            },
        }

    def test_good_properties_kept(self) -> None:
        info = BrokerInfo.from_registration(self.answer({"delivery_mode": 2}))
        self.assertEqual(info.results.properties, {"delivery_mode": 2})
        default = BrokerInfo.from_registration(self.answer(None))
        self.assertEqual(default.results.properties, {"delivery_mode": 2})

    def test_bad_properties_refused_at_registration(self) -> None:
        for bad in ({"no_such_property": 1}, {"delivery_mode": 300}):
            with self.assertRaises(ValueError) as cm:
                BrokerInfo.from_registration(self.answer(bad))
            self.assertIn("bad publish properties", str(cm.exception))
