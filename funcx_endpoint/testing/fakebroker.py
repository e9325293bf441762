"""Fakes of the web service's two outside components: the broker and its administrator.

:class:`FakeServiceBroker` stands in for
:class:`~funcx_endpoint.webservice.broker.ServiceBroker` (the AMQP side:
task publishing, queue declarations, the ``results`` consumer) and
:class:`FakeBrokerAdministrator` for
:class:`~funcx_endpoint.webservice.management.ManagementAPI` (the RabbitMQ
management API that provisions broker users).  Both keep everything in
memory and answer at once; tests can take the broker away and give it back.
They implement the same interfaces as the real ones
(:class:`~funcx_endpoint.webservice.broker.IServiceBroker`,
:class:`~funcx_endpoint.webservice.management.IBrokerAdministrator`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.codec import Properties
from funcx_endpoint.amqp.publisher import PublishFailed
from funcx_endpoint.webservice.broker import RESULTS_CONSUMER_TAG, IServiceBroker
from funcx_endpoint.webservice.management import (
    BrokerUnavailable,
    IBrokerAdministrator,
    ManagementError,
    endpoint_permissions,
    user_permissions,
)

__all__ = [
    "BrokerUser",
    "FakeBrokerAdministrator",
    "FakeResultsChannel",
    "FakeServiceBroker",
    "PublishedMessage",
]


@attr.s(auto_attribs=True, frozen=True)
class PublishedMessage:
    """A message the service published and the fake broker routed to ``queue``."""

    exchange: str
    routing_key: str
    queue: str
    body: bytes
    properties: Dict[str, Any]


class FakeResultsChannel:
    """The channel results are delivered on: records acks, tells waiters about them."""

    def __init__(self) -> None:
        self.closed = False
        #: ``(delivery_tag, multiple)`` of every ack, in order.
        self.acks: List[Tuple[int, bool]] = []
        self._acked_up_to = 0
        self._acked: set[int] = set()
        self._waiters: Dict[int, List[Deferred[None]]] = {}

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acks.append((delivery_tag, multiple))
        if multiple:
            self._acked_up_to = max(self._acked_up_to, delivery_tag)
        else:
            self._acked.add(delivery_tag)
        for tag in [t for t in self._waiters if self.is_acked(t)]:
            for waiter in self._waiters.pop(tag):
                waiter.callback(None)

    def is_acked(self, delivery_tag: int) -> bool:
        return delivery_tag <= self._acked_up_to or delivery_tag in self._acked

    def when_acked(self, delivery_tag: int) -> Deferred[None]:
        """Fires once the delivery with this tag is acknowledged."""
        if self.is_acked(delivery_tag):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.setdefault(delivery_tag, []).append(waiter)
        return waiter

    @property
    def unacked(self) -> List[int]:
        """Tags of deliveries someone waits for that are not acknowledged yet."""
        return sorted(self._waiters)


@implementer(IServiceBroker)
class FakeServiceBroker:
    """The broker as the service sees it, in memory.

    Publishing routes like RabbitMQ with the mandatory flag: to the queue the
    routing key names (the ``tasks`` exchange binds each task queue under its
    own name, the default exchange every queue), or the publish fails as
    returned.  Routed messages are kept in :attr:`queues` and confirmed at
    once; each is also given to the :meth:`on_publish` listeners.

    :meth:`deliver` plays an endpoint publishing to the ``results`` exchange:
    the message goes to the ``on_delivery(delivery, channel)`` callback the
    fake was built with, as the real one's results consumer would.
    """

    def __init__(self, on_delivery: Callable[[Delivery, Any], None]) -> None:
        self._on_delivery = on_delivery
        self.connected = True
        #: queue name -> the messages routed to it, oldest first.
        self.queues: Dict[str, List[PublishedMessage]] = {}
        #: queue name -> the consumer count the broker reports for it.
        self.consumers: Dict[str, int] = {}
        #: result queue name -> its expiry (seconds) when last declared.
        self.result_queue_ttls: Dict[str, int] = {}
        self.forgotten: List[str] = []
        self.results_channel = FakeResultsChannel()
        self._on_connect: List[Callable[[], None]] = []
        self._listeners: List[Callable[[PublishedMessage], None]] = []
        self._next_tag = 1

    # -- the test's controls -------------------------------------------------------

    def disconnect(self) -> None:
        """Lose the broker: publishes and queue operations fail until :meth:`reconnect`."""
        self.connected = False

    def reconnect(self) -> None:
        """The broker is back: the on-connect callbacks run, as after a real reconnection."""
        self.connected = True
        for callback in list(self._on_connect):
            callback()

    def on_publish(self, listener: Callable[[PublishedMessage], None]) -> None:
        """Call ``listener(message)`` for each message routed from now on."""
        self._listeners.append(listener)

    def deliver(self, routing_key: str, body: bytes) -> Deferred[None]:
        """Deliver ``body`` from the ``results`` queue; fires once the service acked it."""
        tag = self._next_tag
        self._next_tag += 1
        exchange = topology.RESULTS_EXCHANGE
        delivery = Delivery(RESULTS_CONSUMER_TAG, tag, False, exchange, routing_key, body=body)
        acked = self.results_channel.when_acked(tag)
        self._on_delivery(delivery, self.results_channel)
        return acked

    def when_settled(self) -> Deferred[None]:
        """Fires once every delivery made so far is acknowledged."""
        pending = self.results_channel.unacked
        if not pending:
            return succeed(None)
        return self.results_channel.when_acked(pending[-1]).addCallback(
            lambda _: self.when_settled()
        )

    # -- IServiceBroker ------------------------------------------------------------

    def on_connect(self, callback: Callable[[], None]) -> None:
        self._on_connect.append(callback)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Optional[Properties] = None,
    ) -> Deferred[None]:
        if not self.connected:
            return fail(PublishFailed("not connected to the broker"))
        if exchange not in ("", topology.TASKS_EXCHANGE) or routing_key not in self.queues:
            return fail(PublishFailed(f"{exchange!r}/{routing_key!r} is unroutable", returned=True))
        message = PublishedMessage(exchange, routing_key, routing_key, body, dict(properties or {}))
        self.queues[routing_key].append(message)
        for listener in list(self._listeners):
            listener(message)
        return succeed(None)

    def flush(self) -> None:
        pass

    def _check(self) -> None:
        if not self.connected:
            raise BrokerUnavailable("not connected to the (fake) broker")

    async def declare_task_queue(self, endpoint_id: str) -> int:
        self._check()
        queue = topology.task_queue(endpoint_id)
        self.queues.setdefault(queue, [])
        return self.consumers.get(queue, 0)

    async def task_queue_consumers(self, endpoint_id: str) -> Optional[int]:
        if not self.connected:
            return None
        return await self.declare_task_queue(endpoint_id)

    async def delete_queue(self, queue: str) -> None:
        self._check()
        self.queues.pop(queue, None)
        self.result_queue_ttls.pop(queue, None)

    async def ensure_result_queue(self, queue: str, ttl_seconds: int) -> None:
        self._check()
        self.queues.setdefault(queue, [])
        self.result_queue_ttls[queue] = ttl_seconds

    def forget_queue(self, queue: str) -> None:
        self.forgotten.append(queue)


@attr.s(auto_attribs=True, frozen=True)
class BrokerUser:
    """A broker user as provisioned: its password and what it may do."""

    password: str
    permissions: Dict[str, str]
    topic_permissions: Optional[Dict[str, str]] = None


@implementer(IBrokerAdministrator)
class FakeBrokerAdministrator:
    """The management API, in memory: :attr:`users` holds who may do what.

    ``unavailable`` makes every call fail with BrokerUnavailable (the broker
    is down), ``refusing`` with a ManagementError (the service's broker user
    is no administrator).
    """

    def __init__(self) -> None:
        self.users: Dict[str, BrokerUser] = {}
        self.unavailable = False
        self.refusing = False

    def _check(self) -> None:
        if self.unavailable:
            raise BrokerUnavailable("the (fake) management API cannot be reached")
        if self.refusing:
            raise ManagementError(401, "Not management user")

    async def provision_endpoint(self, user: str, password: str, endpoint_id: str) -> None:
        self._check()
        rules = endpoint_permissions(endpoint_id)
        self.users[user] = BrokerUser(password, rules["permissions"], rules["topic"])

    async def provision_user(self, user: str, password: str, queue_prefix: str) -> None:
        self._check()
        self.users[user] = BrokerUser(password, user_permissions(queue_prefix))

    async def delete_user(self, name: str) -> bool:
        self._check()
        return self.users.pop(name, None) is not None
