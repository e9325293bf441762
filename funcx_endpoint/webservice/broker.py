"""The service's connection to RabbitMQ: topology, publishing, the results queue.

:class:`ServiceBroker` keeps one connection (reconnecting with backoff)
with three kinds of channel:

* channel 1 declares the topology of PROTOCOL.md section 3 and consumes
  the ``results`` queue (results and status reports of every endpoint);
  deliveries go to ``on_delivery(delivery, channel)``, which acks them on
  that channel once they are stored;
* channel 2 publishes with confirms (tasks, and copies of results for
  FuncXExecutor's per-task-group queues);
* a control channel declares, counts and deletes queues; a refused
  operation closes only it, and the next operation opens another.

Nothing here decides anything: :mod:`funcx_endpoint.webservice.dispatch`
does.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Set

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.channel import Delivery, FastChannel
from funcx_endpoint.amqp.client import AMQPClient
from funcx_endpoint.amqp.codec import Properties
from funcx_endpoint.amqp.connection import AMQPURL, AMQPConnectionService, close_reason
from funcx_endpoint.amqp.publisher import ConfirmingPublisher, PublishFailed
from funcx_endpoint.webservice.cluster import queue_arguments
from funcx_endpoint.webservice.management import BrokerUnavailable

__all__ = ["IServiceBroker", "ServiceBroker"]

RESULTS_CONSUMER_TAG = "funcx-service-results"
_FIRST_CONTROL_CHANNEL = 3


class IServiceBroker(Interface):
    """What the API and the task sender need of the broker (see the module docstring).

    Deliveries from the ``results`` queue go to the ``on_delivery`` callback
    the implementation was built with.
    """

    connected = Attribute("Whether publishing and queue operations can be tried now.")

    def on_connect(callback: Callable[[], None]) -> None:
        """Call ``callback()`` after each (re)connection is set up."""

    def publish(
        exchange: str, routing_key: str, body: bytes, properties: Optional[Properties] = None
    ) -> Deferred[None]:
        """Publish (mandatory); fires once the broker confirmed, fails with
        :class:`~funcx_endpoint.amqp.publisher.PublishFailed` otherwise."""

    def flush() -> None:
        """Write what was published in this reactor turn now."""

    async def declare_task_queue(endpoint_id: str) -> int:
        """Declare an endpoint's task queue (idempotent); its consumer count.
        :class:`~funcx_endpoint.webservice.management.BrokerUnavailable` if not connected."""

    async def task_queue_consumers(endpoint_id: str) -> Optional[int]:
        """Consumers of an endpoint's task queue (None if not connected)."""

    async def delete_queue(queue: str) -> None:
        """Delete a queue."""

    async def ensure_result_queue(queue: str, ttl_seconds: int) -> None:
        """Declare a per-task-group result queue that expires unused after ``ttl_seconds``."""

    def forget_queue(queue: str) -> None:
        """``queue`` may be gone: declare it again the next time it is ensured."""


@implementer(IServiceBroker)
@attr.s(auto_attribs=True, eq=False, repr=False)
class ServiceBroker(Service):
    """The service's AMQP connection; see the module docstring."""

    log = Logger()
    name = "broker"

    _reactor: Any
    url: AMQPURL
    _on_delivery: Callable[[Delivery, FastChannel], None]
    _ca_file: Optional[str] = attr.ib(default=None, kw_only=True)
    _prefetch: int = attr.ib(default=2000, kw_only=True)
    _heartbeat: int = attr.ib(default=30, kw_only=True)
    #: ``classic`` or ``quorum``: the type of every queue declared here.
    queue_type: str = attr.ib(default="classic", kw_only=True)
    #: Other service instances share this virtual host (and its results queue).
    shared: bool = attr.ib(default=False, kw_only=True)
    #: How to reach the broker (default: ``url``'s host); e.g. a cluster's nodes.
    _endpoint: Optional[IStreamClientEndpoint] = attr.ib(default=None, kw_only=True)
    _publisher: Optional[ConfirmingPublisher] = attr.ib(default=None, init=False)
    _client: Optional[AMQPClient] = attr.ib(default=None, init=False)
    _control: Optional[FastChannel] = attr.ib(default=None, init=False)
    _next_channel: int = attr.ib(default=_FIRST_CONTROL_CHANNEL, init=False)
    _control_lock: DeferredLock = attr.ib(factory=DeferredLock, init=False)
    _declared_queues: Set[str] = attr.ib(factory=set, init=False)
    _on_connect: List[Callable[[], None]] = attr.ib(factory=list, init=False)
    connection: AMQPConnectionService = attr.ib(init=False)

    @connection.default
    def _connection(self) -> AMQPConnectionService:
        return AMQPConnectionService(
            self._reactor,
            self.url,
            self._prepare,
            ca_file=self._ca_file,
            heartbeat=self._heartbeat,
            name="amqp",
            endpoint=self._endpoint,
        )

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.connection.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._publisher = None
        return self.connection.stopService()

    def when_connected(self) -> Deferred[Any]:
        return self.connection.when_connected()

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after each (re)connection is set up."""
        self._on_connect.append(callback)

    @property
    def connected(self) -> bool:
        return (
            self._publisher is not None and not self._publisher.closed and self.connection.connected
        )

    async def _prepare(self, client: AMQPClient) -> None:
        channel = await client.open_channel(1)
        await topology.declare_service_topology(channel, queue_arguments(self.queue_type))
        await channel.basic_qos(prefetch_count=self._prefetch)
        reply = await channel.queue_declare(
            queue=topology.RESULTS_QUEUE, durable=True, arguments=queue_arguments(self.queue_type)
        )
        if reply.consumer_count and not self.shared:
            self.log.warn(
                "The results queue already has {n} consumer(s): is another funcx-service "
                "using this broker's virtual host {vhost}? Each service needs its own (they "
                "would take each other's results).",
                n=reply.consumer_count,
                vhost=self.url.vhost,
            )
        channel.handlers.consumers[RESULTS_CONSUMER_TAG] = lambda d: self._on_delivery(d, channel)
        channel.handlers.on_cancel = lambda tag: self._consumer_cancelled(client, tag)
        await channel.basic_consume(queue=topology.RESULTS_QUEUE, consumer_tag=RESULTS_CONSUMER_TAG)
        publish_channel = await client.open_channel(2)
        publisher = ConfirmingPublisher(publish_channel)
        await publisher.start()
        self._client = client
        self._publisher = publisher
        self._control = None
        self._next_channel = _FIRST_CONTROL_CHANNEL
        self._declared_queues = set()
        for callback in self._on_connect:
            try:
                callback()
            except Exception:
                self.log.failure("Error in an on-connect callback")

    def _consumer_cancelled(self, client: AMQPClient, tag: str) -> None:
        self.log.warn(
            "The broker cancelled the results consumer (was the results queue deleted?); "
            "reconnecting to declare it again"
        )
        if client.transport is not None:
            client.transport.loseConnection()

    # -- publishing -----------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Optional[Properties] = None,
    ) -> Deferred[None]:
        """Publish (mandatory) with a confirm; fails at once if not connected."""
        publisher = self._publisher
        if publisher is None or publisher.closed or not self.connection.connected:
            return fail(PublishFailed("not connected to the broker"))
        return publisher.publish(exchange, routing_key, body, properties, mandatory=True)

    def flush(self) -> None:
        """Write what was published in this reactor turn now."""
        client = self._client
        if client is not None and client.transport is not None:
            client.flush_now()

    # -- queues -----------------------------------------------------------------

    async def _channel(self) -> FastChannel:
        if not self.connection.connected or self._client is None:
            raise BrokerUnavailable(f"not connected to the broker at {self.url.redacted()}")
        control = self._control
        if control is None or control.closed:
            channel_id = self._next_channel
            self._next_channel += 1
            control = await self._client.open_channel(channel_id)
            self._control = control
        return control

    async def _control_op(self, operation: Callable[[FastChannel], Any]) -> Any:
        await self._control_lock.acquire()
        try:
            channel = await self._channel()
            try:
                return await operation(channel)
            except Exception as e:
                if channel.closed or self._control is not channel:
                    code, text = close_reason(e)
                    if not self.connection.connected:
                        raise BrokerUnavailable(
                            f"lost the broker at {self.url.redacted()}: {text}"
                        ) from None
                raise
        finally:
            self._control_lock.release()

    async def declare_task_queue(self, endpoint_id: str) -> int:
        """Declare (idempotently) an endpoint's task queue; its consumer count now."""
        queue = topology.task_queue(endpoint_id)

        async def declare(channel: FastChannel) -> int:
            reply = await channel.queue_declare(
                queue=queue, durable=True, arguments=queue_arguments(self.queue_type)
            )
            await channel.queue_bind(
                queue=queue, exchange=topology.TASKS_EXCHANGE, routing_key=queue
            )
            return int(reply.consumer_count)

        count: int = await self._control_op(declare)
        return count

    async def task_queue_consumers(self, endpoint_id: str) -> Optional[int]:
        """Consumers of an endpoint's task queue (None if not connected)."""
        try:
            return await self.declare_task_queue(endpoint_id)
        except BrokerUnavailable:
            return None

    async def delete_queue(self, queue: str) -> None:
        async def delete(channel: FastChannel) -> None:
            await channel.queue_delete(queue=queue)

        await self._control_op(delete)
        self._declared_queues.discard(queue)

    async def ensure_result_queue(self, queue: str, ttl_seconds: int) -> None:
        """Declare a per-task-group result queue, once per connection."""
        if queue in self._declared_queues:
            return

        async def declare(channel: FastChannel) -> None:
            await channel.queue_declare(
                queue=queue,
                durable=True,
                arguments=queue_arguments(
                    self.queue_type, **{"x-expires": int(ttl_seconds * 1000)}
                ),
            )

        await self._control_op(declare)
        self._declared_queues.add(queue)

    def forget_queue(self, queue: str) -> None:
        """``queue`` may be gone (a publish to it came back): declare it again next time."""
        self._declared_queues.discard(queue)
