"""A fake RabbitMQ for unit tests of the endpoint's AMQP side: no sockets, no real time.

* :class:`FakeBroker` holds exchanges and queues (declare them as the
  service would, e.g. :meth:`FakeBroker.declare_endpoint`), the messages in
  the queues, and their consumers.  It delivers to consumers at the next
  reactor turn (``clock.callLater(0)``), within each channel's prefetch, and
  puts unacknowledged deliveries back in their queue (redelivered) when a
  channel closes, as RabbitMQ does.  It refuses what RabbitMQ refuses, with
  RabbitMQ's reply codes and texts: passive declares of missing objects,
  a second consumer of a queue consumed exclusively, a message over its
  :attr:`~FakeBroker.max_message_size`, an unknown delivery tag (those three
  close the channel).  Tests can also make it refuse or hold back any request
  (:meth:`FakeBroker.refuse`, :meth:`FakeBroker.hold`).
* :class:`FakeConnectionService` stands in for
  :class:`~funcx_endpoint.amqp.connection.AMQPConnectionService`: pass
  :meth:`FakeBroker.connection_service` as ``build_transport(connect=...)``.
  It connects when the test says so (:meth:`~FakeConnectionService.connect`
  runs the owner's set-up with a new :class:`FakeAMQPClient`), loses the
  connection when the test says so (:meth:`~FakeConnectionService.lose`),
  and reports fatal set-up errors like the real one.
* :class:`FakeChannel` is the channel its set-up opens.  Publishes are
  recorded (:attr:`FakeBroker.published`); the test decides each one's fate:
  :meth:`~FakeChannel.confirm`, :meth:`~FakeChannel.nack_publish`,
  :meth:`~FakeChannel.return_publish`, or :meth:`~FakeChannel.close_by_broker`.

Everything the endpoint does to these objects goes through the interfaces of
:mod:`funcx_endpoint.amqp.interfaces`, which the real client provides too.
Protocol errors RabbitMQ would punish (acknowledging a tag twice or one never
delivered, using a closed channel) are also collected in
:attr:`FakeBroker.violations`, for tests to assert there are none.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from txamqp.client import ChannelClosed, Closed
from txamqp.message import Message
from zope.interface import implementer

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.channel import ChannelHandlers, Delivery, Returned
from funcx_endpoint.amqp.codec import encode_properties
from funcx_endpoint.amqp.connection import AMQPURL, AMQPError
from funcx_endpoint.amqp.interfaces import IAMQPChannel, IAMQPClient, IAMQPConnectionService
from funcx_endpoint.amqp.spec import load_spec
from funcx_endpoint.lifecycle import cancel_call
from funcx_endpoint.observer import OneShotObserver, fire_all

__all__ = [
    "FakeAMQPClient",
    "FakeBroker",
    "FakeChannel",
    "FakeConnectionService",
    "Published",
    "QueuedMessage",
]

NO_ROUTE = 312
ACCESS_REFUSED = 403
NOT_FOUND = 404
PRECONDITION_FAILED = 406


def channel_close(code: int, text: str) -> Message:
    """The broker's ``channel.close`` with ``code`` and ``text``, as txAMQP gives it."""
    method = load_spec().classes.byname["channel"].methods.byname["close"]
    return Message(method, [code, text, 0, 0])


@attr.s(auto_attribs=True)
class QueuedMessage:
    """A message in a fake queue."""

    body: bytes
    properties: Dict[str, Any] = attr.Factory(dict)
    redelivered: bool = False


@attr.s(auto_attribs=True, eq=False)
class Published:
    """A message published to the fake broker (and accepted by it)."""

    channel: FakeChannel
    seq: Optional[int]  # its publish sequence number, in confirm mode
    exchange: str
    routing_key: str
    body: bytes
    properties: Dict[str, Any]
    mandatory: bool


class FakeQueue:
    """A queue: its messages, consumers and dead-lettered messages."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: Deque[QueuedMessage] = deque()
        self.consumers: List[Tuple[FakeChannel, str, bool]] = []  # channel, tag, exclusive
        self.dead: List[QueuedMessage] = []  # rejected without requeue


class FakeBroker:
    """Exchanges, queues and connections of a fake RabbitMQ (see the module docstring)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.exchanges: set[str] = set()
        self.queues: Dict[str, FakeQueue] = {}
        #: RabbitMQ's max_message_size; None: no limit
        self.max_message_size: Optional[int] = None
        self.published: List[Published] = []
        self.services: Dict[str, FakeConnectionService] = {}
        self.clients: List[FakeAMQPClient] = []
        self.violations: List[str] = []
        self._refusals: Dict[str, List[Tuple[int, str]]] = {}
        self._held: Dict[str, bool] = {}
        self.held: Dict[str, List[Tuple[FakeChannel, Callable[[], Any], Deferred[Any]]]] = {}
        self._dispatch_call: Any = None

    # -- topology ----------------------------------------------------------------

    def declare_endpoint(self, endpoint_id: str) -> FakeQueue:
        """The exchanges of the service and the task queue of ``endpoint_id``."""
        self.exchanges.update((topology.TASKS_EXCHANGE, topology.RESULTS_EXCHANGE))
        return self.declare_queue(topology.task_queue(endpoint_id))

    def declare_queue(self, name: str) -> FakeQueue:
        if name not in self.queues:
            self.queues[name] = FakeQueue(name)
        return self.queues[name]

    def delete_queue(self, name: str) -> None:
        """Delete a queue (as the service does when an endpoint is deleted):
        its consumers are cancelled by the broker."""
        queue = self.queues.pop(name)
        for channel, tag, _ in list(queue.consumers):
            channel.cancel_by_broker(tag)

    # -- messages -------------------------------------------------------------

    def enqueue(
        self, queue: str, *bodies: bytes, properties: Optional[Dict[str, Any]] = None
    ) -> None:
        """Put messages in ``queue`` (as the service publishes tasks); they are
        delivered at the next reactor turn if a consumer has room."""
        target = self.queues[queue]
        for body in bodies:
            target.messages.append(QueuedMessage(body, dict(properties or {})))
        self._schedule_dispatch()

    def _schedule_dispatch(self) -> None:
        if self._dispatch_call is None:
            self._dispatch_call = self.clock.callLater(0, self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_call = None
        self.dispatch()

    def dispatch(self) -> None:
        """Deliver what can be delivered now (rather than at the next turn)."""
        if self._dispatch_call is not None:
            self._dispatch_call.cancel()
            self._dispatch_call = None
        for queue in list(self.queues.values()):
            while queue.messages:
                ready = [
                    consumer
                    for consumer in queue.consumers
                    if (not consumer[0].closed or consumer[0].half_open) and consumer[0].has_room()
                ]
                if not ready:
                    break
                # Round robin between consumers with room, as RabbitMQ does.
                chosen = ready[0]
                queue.consumers.remove(chosen)
                queue.consumers.append(chosen)
                channel, tag, _ = chosen
                channel.deliver_message(queue.messages.popleft(), tag, queue)

    def _requeue(self, queue_name: str, messages: List[QueuedMessage]) -> None:
        queue = self.queues.get(queue_name)
        if queue is None:
            return
        for message in reversed(messages):
            message.redelivered = True
            queue.messages.appendleft(message)
        self._schedule_dispatch()

    # -- what tests make the broker do ----------------------------------------------

    def refuse(self, request: str, code: int, text: str) -> None:
        """The next ``request`` (e.g. ``"confirm_select"``) on any channel is
        refused: the broker closes that channel with ``code`` and ``text``."""
        self._refusals.setdefault(request, []).append((code, text))

    def hold(self, request: str) -> None:
        """Answer no ``request`` until :meth:`answer_held` (e.g. a
        ``basic_cancel`` whose cancel-ok is slow to come)."""
        self._held[request] = True

    def answer_held(self, request: str) -> None:
        """Answer the held ``request``\\ s (in order), and those that follow."""
        self._held.pop(request, None)
        for channel, effect, d in self.held.pop(request, []):
            if not d.called:  # else it failed when its channel closed
                channel._answer(effect, d)

    def _request(self, channel: FakeChannel, name: str, effect: Callable[[], Any]) -> Deferred[Any]:
        if channel.closed:
            return fail(Closed(channel.reason))
        d: Deferred[Any] = Deferred()
        refusals = self._refusals.get(name)
        if refusals:
            code, text = refusals.pop(0)
            channel._refuse(code, text, d)
        elif self._held.get(name):
            channel._pending.append(d)
            self.held.setdefault(name, []).append((channel, effect, d))
        else:
            channel._answer(effect, d)
        return d

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    def drop_half_open(self) -> None:
        """The broker notices the half-open connections (missed heartbeats)
        and drops them: their consumers go, their deliveries are requeued."""
        for client in self.clients:
            for channel in client.channels.values():
                if channel.half_open:
                    channel.broker_forget()

    # -- connections ------------------------------------------------------------------

    def connection_service(
        self,
        reactor: Any,
        url: AMQPURL,
        prepare: Callable[[Any], Any],
        *,
        name: Optional[str] = None,
        **options: Any,
    ) -> FakeConnectionService:
        """Made like :class:`~funcx_endpoint.amqp.connection.AMQPConnectionService`
        (pass as ``build_transport(connect=broker.connection_service)``)."""
        service = FakeConnectionService(self, reactor, url, prepare, name=name, **options)
        self.services[name or f"connection-{len(self.services) + 1}"] = service
        return service


class _Refused(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@implementer(IAMQPChannel)
class FakeChannel:
    """A channel of a :class:`FakeAMQPClient` (see the module docstring)."""

    def __init__(self, client: FakeAMQPClient, id: int) -> None:
        self.client = client
        self.broker = client.broker
        self.id = id
        self.handlers = ChannelHandlers()
        self.closed = False
        self.reason: Any = None
        self.confirming = False
        self.prefetch = 0
        self._next_seq = 1
        self._closing: Any = None  # a scheduled close by the broker
        self._next_tag = 1
        #: delivery tag -> (queue name, message), delivered and not yet settled
        self.unacked: Dict[int, Tuple[str, QueuedMessage]] = {}
        self.unconfirmed: Dict[int, Published] = {}
        self.consuming: Dict[str, str] = {}  # consumer tag -> queue
        #: what the client sent: ("ack", tag, multiple), ("reject", tag, requeue),
        #: ("nack", tag, multiple, requeue)
        self.settlements: List[Tuple[Any, ...]] = []
        self.requests: List[str] = []
        self._pending: List[Deferred[Any]] = []  # requests not yet answered
        self.half_open = False

    # -- IAMQPChannel: the fast methods ---------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: Any,
        properties: Optional[Dict[str, Any]] = None,
        mandatory: bool = False,
    ) -> None:
        props = dict(properties or {})
        encode_properties(props)  # raises ValueError as the real client does
        data = body if isinstance(body, bytes) else b"".join(bytes(piece) for piece in body)
        if not self._usable("basic.publish"):
            return
        seq = None
        if self.confirming:
            seq = self._next_seq
            self._next_seq += 1
        if self._closing is not None:
            return  # the broker ignores what follows an error on this channel
        if exchange not in self.broker.exchanges:
            self._close_soon(NOT_FOUND, f"NOT_FOUND - no exchange '{exchange}' in vhost '/'")
            return
        limit = self.broker.max_message_size
        if limit is not None and len(data) > limit:
            self._close_soon(
                PRECONDITION_FAILED,
                f"PRECONDITION_FAILED - message size {len(data)} is larger than configured "
                f"max size {limit}",
            )
            return
        message = Published(self, seq, exchange, routing_key, data, props, mandatory)
        self.broker.published.append(message)
        if seq is not None:
            self.unconfirmed[seq] = message

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        if not self._usable("basic.ack"):
            return
        self.settlements.append(("ack", delivery_tag, multiple))
        self._settle("ack", delivery_tag, multiple, None)

    def nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        if not self._usable("basic.nack"):
            return
        self.settlements.append(("nack", delivery_tag, multiple, requeue))
        self._settle("nack", delivery_tag, multiple, requeue)

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        if not self._usable("basic.reject"):
            return
        self.settlements.append(("reject", delivery_tag, requeue))
        self._settle("reject", delivery_tag, False, requeue)

    def _usable(self, what: str) -> bool:
        if self.closed:
            if self.client.transport is not None:
                # RabbitMQ answers a method on a closed channel with a
                # connection error; on a lost connection it goes nowhere.
                self.broker._violation(f"{what} on closed channel {self.id}")
            return False
        return True

    def _settle(self, kind: str, tag: int, multiple: bool, requeue: Optional[bool]) -> None:
        """The broker's side of an ack (``requeue`` None), nack or reject."""
        if self._closing is not None:
            return
        if tag not in self.unacked:
            self.broker._violation(f"{kind} of unknown delivery tag {tag} on channel {self.id}")
            self._close_soon(
                PRECONDITION_FAILED, f"PRECONDITION_FAILED - unknown delivery tag {tag}"
            )
            return
        tags = [t for t in self.unacked if t <= tag] if multiple else [tag]
        back: Dict[str, List[QueuedMessage]] = {}
        for t in sorted(tags):
            queue, message = self.unacked.pop(t)
            if requeue:
                back.setdefault(queue, []).append(message)
            elif requeue is False and queue in self.broker.queues:
                self.broker.queues[queue].dead.append(message)
        for queue, messages in back.items():
            self.broker._requeue(queue, messages)
        self.broker._schedule_dispatch()

    # -- IAMQPChannel: requests -----------------------------------------------------------

    def exchange_declare(self, exchange: str = "", passive: bool = False, **_: Any) -> Any:
        def effect() -> None:
            if exchange not in self.broker.exchanges:
                if passive:
                    raise _Refused(NOT_FOUND, f"NOT_FOUND - no exchange '{exchange}' in vhost '/'")
                self.broker.exchanges.add(exchange)

        return self._request("exchange_declare", effect)

    def queue_declare(self, queue: str = "", passive: bool = False, **_: Any) -> Any:
        def effect() -> None:
            if queue not in self.broker.queues:
                if passive:
                    raise _Refused(NOT_FOUND, f"NOT_FOUND - no queue '{queue}' in vhost '/'")
                self.broker.declare_queue(queue)

        return self._request("queue_declare", effect)

    def basic_qos(self, prefetch_count: int = 0, **_: Any) -> Any:
        def effect() -> None:
            self.prefetch = prefetch_count
            self.broker._schedule_dispatch()

        return self._request("basic_qos", effect)

    def basic_consume(
        self, queue: str = "", consumer_tag: str = "", exclusive: bool = False, **_: Any
    ) -> Any:
        def effect() -> str:
            target = self.broker.queues.get(queue)
            if target is None:
                raise _Refused(NOT_FOUND, f"NOT_FOUND - no queue '{queue}' in vhost '/'")
            if target.consumers and (exclusive or any(e for _, _, e in target.consumers)):
                raise _Refused(
                    ACCESS_REFUSED,
                    f"ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use",
                )
            target.consumers.append((self, consumer_tag, exclusive))
            self.consuming[consumer_tag] = queue
            self.broker._schedule_dispatch()
            return consumer_tag

        return self._request("basic_consume", effect)

    def basic_cancel(self, consumer_tag: str = "", **_: Any) -> Any:
        def effect() -> None:
            self._forget_consumer(consumer_tag)

        return self._request("basic_cancel", effect)

    def confirm_select(self, **_: Any) -> Any:
        def effect() -> None:
            self.confirming = True

        return self._request("confirm_select", effect)

    def _request(self, name: str, effect: Callable[[], Any]) -> Deferred[Any]:
        self.requests.append(name)
        return self.broker._request(self, name, effect)

    def _forget_consumer(self, consumer_tag: str) -> None:
        queue = self.consuming.pop(consumer_tag, None)
        if queue is not None and queue in self.broker.queues:
            target = self.broker.queues[queue]
            target.consumers = [c for c in target.consumers if c[:2] != (self, consumer_tag)]

    # -- the broker's side ------------------------------------------------------------------

    def has_room(self) -> bool:
        return self.prefetch == 0 or len(self.unacked) < self.prefetch

    def deliver_message(self, message: QueuedMessage, consumer_tag: str, queue: FakeQueue) -> int:
        """``basic.deliver`` of ``message`` from ``queue``; its delivery tag."""
        tag = self._next_tag
        self._next_tag += 1
        self.unacked[tag] = (queue.name, message)
        delivery = Delivery(
            consumer_tag,
            tag,
            message.redelivered,
            "",
            queue.name,
            properties=dict(message.properties),
            body=message.body,
        )
        if self.closed:
            return tag  # to a half-open connection: nobody reads it
        consumer = self.handlers.consumers.get(consumer_tag)
        if consumer is None:
            # What the real client does with a delivery nobody listens to.
            self.reject(tag, requeue=True)
        else:
            consumer(delivery)
        return tag

    def confirm(self, seq: Optional[int] = None, multiple: bool = False) -> None:
        """``basic.ack`` of publish ``seq`` (all unconfirmed ones if None)."""
        self._answer_publish(seq, multiple, self.handlers.on_ack)

    def nack_publish(self, seq: Optional[int] = None, multiple: bool = False) -> None:
        """``basic.nack`` of publish ``seq`` (all unconfirmed ones if None)."""
        self._answer_publish(seq, multiple, self.handlers.on_nack)

    def _answer_publish(
        self, seq: Optional[int], multiple: bool, handler: Optional[Callable[[int, bool], None]]
    ) -> None:
        if seq is None:
            if not self.unconfirmed:
                return
            seq, multiple = max(self.unconfirmed), True
        self._confirmed(seq, multiple)
        if handler is not None:
            handler(seq, multiple)

    def return_publish(self, seq: int, code: int = NO_ROUTE, text: str = "NO_ROUTE") -> None:
        """``basic.return`` of mandatory publish ``seq`` (unroutable), then its
        ``basic.ack``, in RabbitMQ's order."""
        message = self.unconfirmed[seq]
        returned = Returned(
            code,
            text,
            message.exchange,
            message.routing_key,
            properties=dict(message.properties),
            body=message.body,
        )
        if self.handlers.on_return is not None:
            self.handlers.on_return(returned)
        self.confirm(seq)

    def _confirmed(self, seq: int, multiple: bool) -> None:
        for s in [s for s in self.unconfirmed if (s <= seq if multiple else s == seq)]:
            del self.unconfirmed[s]

    def cancel_by_broker(self, consumer_tag: str) -> None:
        """``basic.cancel`` from the broker (the queue was deleted)."""
        self._forget_consumer(consumer_tag)
        # What the real client's delegate does.
        self.handlers.consumers.pop(consumer_tag, None)
        if self.handlers.on_cancel is not None:
            self.handlers.on_cancel(consumer_tag)

    def close_by_broker(self, code: int, text: str) -> None:
        """The broker closes the channel (``channel.close``), now."""
        if self.closed:
            return
        reason = channel_close(code, text)
        # As txAMQP does: the channel closes and its pending requests fail,
        # then the owner hears of it.
        self._close(reason)
        self.handlers.notify_closed(reason)

    def _close_soon(self, code: int, text: str) -> None:
        """The broker found an error on the channel: its close arrives next turn."""
        if self._closing is None:
            self._closing = self.broker.clock.callLater(0, self.close_by_broker, code, text)

    def _answer(self, effect: Callable[[], Any], d: Deferred[Any]) -> None:
        if d in self._pending:
            self._pending.remove(d)
        try:
            result = effect()
        except _Refused as refused:
            self._refuse(refused.code, refused.text, d)
        else:
            d.callback(result)

    def _refuse(self, code: int, text: str, d: Deferred[Any]) -> None:
        """The broker answers the request ``d`` by closing the channel (next turn)."""
        self._pending.append(d)
        self._close_soon(code, text)

    def _close(self, reason: Any) -> None:
        """The channel is closed: pending requests fail; the broker forgets
        its consumers and takes its unacknowledged deliveries back (unless
        the broker does not know yet: a half-open connection)."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        cancel_call(self._closing)
        if not self.half_open:
            self.broker_forget()
        pending, self._pending = self._pending, []
        for d in pending:
            if not d.called:
                if isinstance(reason, Message):
                    d.errback(ChannelClosed(reason))
                else:
                    d.errback(Closed(reason))

    def broker_forget(self) -> None:
        """The broker's side of a close: consumers gone, deliveries requeued."""
        self.half_open = False
        for consumer_tag in list(self.consuming):
            self._forget_consumer(consumer_tag)
        back: Dict[str, List[QueuedMessage]] = {}
        for tag in sorted(self.unacked):
            queue, message = self.unacked.pop(tag)
            back.setdefault(queue, []).append(message)
        for queue, messages in back.items():
            self.broker._requeue(queue, messages)


@attr.s(auto_attribs=True, eq=False)
class FakeAMQPTransport:
    """The transport of a :class:`FakeAMQPClient`: closing it loses the
    connection at the next reactor turn."""

    _client: FakeAMQPClient
    _clock: IReactorTime
    disconnecting: bool = attr.ib(default=False, init=False)
    aborted: bool = attr.ib(default=False, init=False)

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._clock.callLater(0, self._client.connection_lost, Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.aborted = True
        if not self.disconnecting:
            self.disconnecting = True
            self._clock.callLater(0, self._client.connection_lost, Failure(ConnectionAborted()))


@implementer(IAMQPClient)
class FakeAMQPClient:
    """A logged-in connection to a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker, clock: IReactorTime) -> None:
        self.broker = broker
        self.clock = clock
        self.transport: Optional[FakeAMQPTransport] = FakeAMQPTransport(self, clock)
        self.channels: Dict[int, FakeChannel] = {}
        self.close_reason: Any = None
        self.flushes = 0
        self._closed: OneShotObserver[Any] = OneShotObserver()
        broker.clients.append(self)

    async def open_channel(self, id: int) -> FakeChannel:
        if self.transport is None:
            raise Closed(self.close_reason)
        existing = self.channels.get(id)
        if existing is not None and not existing.closed:
            self.broker._violation(f"channel.open of open channel {id}")
        channel = self.channels[id] = FakeChannel(self, id)
        return channel

    def flush_now(self) -> None:
        self.flushes += 1

    def when_closed(self) -> Deferred[Any]:
        return self._closed.when_fired()

    def connection_lost(self, reason: Failure, half_open: bool = False) -> None:
        """The connection is gone (what the reactor tells the protocol).

        ``half_open``: the broker does not notice (yet): it keeps the
        channels' consumers and deliveries until :meth:`FakeBroker.drop_half_open`.
        """
        if self.transport is None:
            return
        self.close_reason = reason
        for channel in self.channels.values():
            channel.half_open = half_open
        # As AMQPClient.connectionLost: the owners hear of it first, then the
        # channels close (failing their pending requests).
        for channel in list(self.channels.values()):
            channel.handlers.notify_closed(reason)
        for channel in list(self.channels.values()):
            channel._close(reason)
        self.transport = None
        self._closed.fire(reason.value)


@implementer(IAMQPConnectionService)
@attr.s(auto_attribs=True, eq=False, repr=False)
class FakeConnectionService(Service):
    """Stands in for AMQPConnectionService; connects when the test says so.

    It takes the real one's arguments after ``broker`` (``ca_file`` is not used).
    """

    broker: FakeBroker
    clock: Any = attr.ib(alias="reactor")
    url: AMQPURL
    _prepare: Callable[[Any], Any]
    name: Optional[str] = attr.ib(default=None, kw_only=True)
    _ca_file: Optional[str] = attr.ib(default=None, kw_only=True)
    heartbeat: int = attr.ib(default=30, kw_only=True)
    client: Optional[FakeAMQPClient] = attr.ib(default=None, init=False)
    connections: int = attr.ib(default=0, init=False)
    lost_at: Optional[float] = attr.ib(default=None, init=False)
    fatal_error: Optional[AMQPError] = attr.ib(default=None, init=False)
    #: set-up errors that were not fatal (the real service retries after them)
    setup_errors: List[Exception] = attr.ib(factory=list, init=False)
    _connected_waiters: List[Deferred[Any]] = attr.ib(factory=list, init=False)
    _fatal: OneShotObserver[AMQPError] = attr.ib(factory=OneShotObserver, init=False)

    def state(self) -> str:
        if self.fatal_error is not None:
            return "failed"
        if self.client is not None and self.client.transport is not None:
            return "connected"
        return "connecting" if self.running else "stopped"

    # -- what the test does -------------------------------------------------------------

    def connect(self) -> Deferred[FakeAMQPClient]:
        """Open a new connection and run the owner's set-up on it: fires with
        the client, or fails with the set-up's error (as the real service
        would try again, or give up on a fatal one)."""
        if not self.running or self.fatal_error is not None:
            raise AssertionError(f"{self.name} does not connect now ({self.state()})")
        if self.client is not None:
            raise AssertionError(f"{self.name} is connected already")
        client = FakeAMQPClient(self.broker, self.clock)
        return ensureDeferred(self._setup(client))

    def lose(self, reason: Optional[Exception] = None, half_open: bool = False) -> None:
        """The network drops the connection, now (``half_open``: the broker
        does not notice until :meth:`FakeBroker.drop_half_open`)."""
        client = self.client
        if client is None:
            raise AssertionError(f"{self.name} is not connected")
        reason = reason or ConnectionLost("the network went away")
        client.connection_lost(Failure(reason), half_open=half_open)

    async def _setup(self, client: FakeAMQPClient) -> FakeAMQPClient:
        try:
            await self._prepare(client)
        except Exception as e:
            if isinstance(e, AMQPError) and e.fatal:
                self._fail(e)
            else:
                self.setup_errors.append(e)
            if client.transport is not None:
                client.transport.loseConnection()
            raise
        if client.transport is None:
            raise AMQPError("the connection was lost during set-up")
        self.client = client
        self.connections += 1
        client.when_closed().addCallback(self._lost, client)
        fire_all(self._connected_waiters, client)
        return client

    def _lost(self, reason: Any, client: FakeAMQPClient) -> None:
        if self.client is client:
            self.client = None
        self.lost_at = self.clock.seconds()

    # -- IAMQPConnectionService ---------------------------------------------------------

    def when_connected(self) -> Deferred[Any]:
        if self.client is not None and self.client.transport is not None:
            return succeed(self.client)
        d: Deferred[Any] = Deferred()
        self._connected_waiters.append(d)
        return d

    def when_fatal(self) -> Deferred[AMQPError]:
        return self._fatal.when_fired()

    def _fail(self, error: AMQPError) -> None:
        if self.fatal_error is not None:
            return
        self.fatal_error = error
        self._fatal.fire(error)

    def fail(self, error: AMQPError) -> None:
        self._fail(error)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.loseConnection()

    def stopService(self) -> Deferred[None]:
        """Close the connection; fires once it is closed."""
        super().stopService()
        client = self.client
        if client is None or client.transport is None:
            return succeed(None)
        client.transport.loseConnection()
        return client.when_closed().addCallback(lambda _: None)
