"""Playing the web service's broker side in tests and benchmarks.

:class:`ServiceSide` connects as the broker's administrator, declares the
topology the service owns (PROTOCOL.md section 3), publishes tasks to an
endpoint's queue with publisher confirms (re-publishing what the broker did
not confirm, as the service does) and consumes the ``results`` queue,
keeping every result it receives, so tests can count lost and duplicated
task ids.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.client import AMQPClient
from funcx_endpoint.amqp.connection import AMQPURL, AMQPConnectionService
from funcx_endpoint.amqp.publisher import ConfirmingPublisher
from funcx_endpoint.endpoint.transport import BrokerInfo
from funcx_endpoint.wire import EPStatusReport, Result, ResultBatchMessage, Task, pack, unpack


class ServiceSide:
    """Admin connection: topology, task publishing, result collection."""

    log = Logger()

    def __init__(self, reactor: Any, admin_url: str, ca_file: Optional[str] = None) -> None:
        self.reactor = reactor
        self.url = AMQPURL.parse(admin_url)
        self.ca_file = ca_file
        self.results: Dict[str, List[Result]] = {}
        self.reports: List[EPStatusReport] = []
        self.bad_messages: List[bytes] = []
        self.first_result_at: Dict[str, float] = {}
        self._endpoints: List[str] = []
        self._publisher: Optional[ConfirmingPublisher] = None
        self._waiters: List[Any] = []
        self.conn = AMQPConnectionService(
            reactor, self.url, self._prepare, ca_file=ca_file, heartbeat=10, name="service"
        )

    async def _prepare(self, client: AMQPClient) -> None:
        channel = await client.open_channel(1)
        await topology.declare_service_topology(channel)
        for endpoint_id in self._endpoints:
            await topology.declare_endpoint_queue(channel, endpoint_id)
        await channel.basic_qos(prefetch_count=1000)
        channel.handlers.consumers["service-results"] = lambda d: self._on_result(channel, d)
        await channel.basic_consume(queue=topology.RESULTS_QUEUE, consumer_tag="service-results")
        publish_channel = await client.open_channel(2)
        publisher = ConfirmingPublisher(publish_channel)
        await publisher.start()
        self._publisher = publisher
        self._channel = channel

    async def start(self) -> None:
        self.conn.startService()
        await self.conn.when_connected()

    async def stop(self) -> None:
        await self.conn.stopService()

    async def add_endpoint(self, endpoint_id: str) -> None:
        """Declare the endpoint's task queue (now and after reconnects)."""
        self._endpoints.append(endpoint_id)
        await topology.declare_endpoint_queue(self._channel, endpoint_id)

    def broker_info(self, endpoint_id: str, url: Optional[str] = None) -> BrokerInfo:
        """What a registration would answer, using ``url`` (default: the admin URL)."""
        connection_url = url or _unredacted(self.url)
        return BrokerInfo.from_registration(
            {
                "endpoint_id": endpoint_id,
                **topology.registration_queue_info(endpoint_id, connection_url, connection_url),
            }
        )

    # -- tasks ------------------------------------------------------------

    async def publish_raw(self, endpoint_id: str, bodies: Iterable[bytes]) -> None:
        """Publish message bodies to the endpoint's queue until all are confirmed."""
        pending = list(bodies)
        queue = topology.task_queue(endpoint_id)
        while pending:
            if self._publisher is None or self._publisher.closed:
                await self.conn.when_connected()
                await _sleep(self.reactor, 0.05)
                continue
            publisher = self._publisher
            ds = [
                publisher.publish(
                    topology.TASKS_EXCHANGE, queue, body, {"delivery-mode": 2}, mandatory=True
                )
                for body in pending
            ]
            outcome = await DeferredList(ds, consumeErrors=True)
            pending = [body for body, (ok, _) in zip(pending, outcome) if not ok]
            if pending:
                await _sleep(self.reactor, 0.2)

    async def publish_tasks(self, endpoint_id: str, tasks: Iterable[Task]) -> None:
        await self.publish_raw(endpoint_id, [pack(task) for task in tasks])

    # -- results ----------------------------------------------------------

    def _on_result(self, channel: Any, delivery: Delivery) -> None:
        try:
            message = unpack(delivery.body)
        except ValueError:
            self.bad_messages.append(delivery.body)
        else:
            results = message.results if isinstance(message, ResultBatchMessage) else [message]
            for result in results:
                if isinstance(result, Result):
                    self.results.setdefault(result.task_id, []).append(result)
                    self.first_result_at.setdefault(result.task_id, time.monotonic())
            if isinstance(message, EPStatusReport):
                self.reports.append(message)
        channel.ack(delivery.delivery_tag)
        self._wake()

    def _wake(self) -> None:
        still = []
        for predicate, d in self._waiters:
            if predicate():
                d.callback(None)
            else:
                still.append((predicate, d))
        self._waiters = still

    def when(self, predicate: Any, timeout: float = 60.0) -> Deferred[None]:
        """Fires when ``predicate()`` is true; fails with TimeoutError after ``timeout``."""
        d: Deferred[None] = Deferred()
        if predicate():
            d.callback(None)
            return d
        self._waiters.append((predicate, d))

        def expire() -> None:
            if not d.called:
                self._waiters = [(p, w) for p, w in self._waiters if w is not d]
                d.errback(TimeoutError(f"condition not met within {timeout:g} s"))

        call = self.reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def answered(self, task_ids: Iterable[str]) -> bool:
        return all(t in self.results for t in task_ids)

    def counts(self, task_ids: Iterable[str]) -> Dict[str, int]:
        """submitted, answered, lost, duplicated (received more than once)."""
        ids = list(task_ids)
        answered = sum(1 for t in ids if t in self.results)
        duplicated = sum(1 for t in ids if len(self.results.get(t, ())) > 1)
        return {
            "submitted": len(ids),
            "answered": answered,
            "lost": len(ids) - answered,
            "duplicated": duplicated,
        }


def _unredacted(url: AMQPURL) -> str:
    from urllib.parse import quote

    return (
        f"{url.scheme}://{quote(url.username)}:{quote(url.password)}@{url.host}:{url.port}/"
        f"{quote(url.vhost, safe='')}"
    )


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
