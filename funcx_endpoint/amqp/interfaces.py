"""What the endpoint uses of an AMQP channel, client and connection service.

The task intake, the result publisher and their helpers
(:class:`~funcx_endpoint.amqp.consumer.ExclusiveConsumer`,
:class:`~funcx_endpoint.amqp.consumer.AckBatcher`,
:class:`~funcx_endpoint.amqp.publisher.ConfirmingPublisher`) depend on these
interfaces only.  The real things are
:class:`~funcx_endpoint.amqp.channel.FastChannel`,
:class:`~funcx_endpoint.amqp.client.AMQPClient` and
:class:`~funcx_endpoint.amqp.connection.AMQPConnectionService`; the fakes in
:mod:`funcx_endpoint.testing.amqp` provide the same interfaces, and both are
checked with ``verifyObject``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Optional

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = ["IAMQPChannel", "IAMQPClient", "IAMQPConnectionService"]


class IAMQPChannel(Interface):
    """One AMQP channel: fast synchronous methods and handlers for the hot
    path, Deferred-returning synchronous AMQP requests for the rest.

    A request the broker refuses closes the channel: its Deferred fails with
    txAMQP's ``Closed`` (holding the broker's ``channel.close``, read with
    :func:`~funcx_endpoint.amqp.connection.close_reason`) and
    ``handlers.on_close`` is called.  Requests take keyword arguments.
    """

    id = Attribute("int: the channel number")
    closed = Attribute("bool: the channel is gone (closed by either side, or its connection)")
    handlers = Attribute(
        "ChannelHandlers: the consumers by consumer tag, and the callbacks for "
        "confirms (on_ack, on_nack), returns, a consumer cancelled by the broker "
        "and the channel's close; all called synchronously"
    )

    def publish(
        exchange: str,
        routing_key: str,
        body: Any,
        properties: Optional[Any] = None,
        mandatory: bool = False,
    ) -> None:
        """``basic.publish`` of ``body`` (bytes, or pieces); raises ValueError
        for properties that cannot be encoded (then nothing is sent)."""

    def ack(delivery_tag: int, multiple: bool = False) -> None:
        """``basic.ack`` of a delivery (``multiple``: all up to this tag)."""

    def nack(delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        """``basic.nack`` of deliveries."""

    def reject(delivery_tag: int, requeue: bool) -> None:
        """``basic.reject`` of one delivery."""

    def exchange_declare(exchange: str = "", passive: bool = False) -> Deferred[Any]:
        """``exchange.declare`` (the endpoint declares passively: "does it exist")."""

    def queue_declare(queue: str = "", passive: bool = False) -> Deferred[Any]:
        """``queue.declare`` (passive: "does it exist")."""

    def basic_qos(prefetch_count: int = 0) -> Deferred[Any]:
        """``basic.qos``: at most ``prefetch_count`` unacknowledged deliveries."""

    def basic_consume(queue: str = "", consumer_tag: str = "", exclusive: bool = False) -> Any:
        """``basic.consume``; deliveries go to ``handlers.consumers[consumer_tag]``."""

    def basic_cancel(consumer_tag: str = "") -> Deferred[Any]:
        """``basic.cancel``: no more deliveries to that consumer once it is answered."""

    def confirm_select() -> Deferred[Any]:
        """``confirm.select``: the broker confirms each publish (``handlers.on_ack``)."""


class IAMQPClient(Interface):
    """One logged-in AMQP connection, as its owner's set-up function gets it."""

    transport = Attribute(
        "ITransport or None: the connection's transport (None once lost); the owner "
        "may loseConnection() it to have the connection service reconnect"
    )

    def open_channel(id: int) -> Awaitable[IAMQPChannel]:
        """Open channel ``id`` with the broker."""

    def flush_now() -> None:
        """Write what is buffered without waiting for the reactor turn to end."""

    def when_closed() -> Deferred[Any]:
        """Fires (with the reason) when the connection is lost."""


class IAMQPConnectionService(IService):
    """Keeps one AMQP connection up and lets its owner set it up.

    Made by ``connect(reactor, url, prepare, *, ca_file, heartbeat, name)``;
    ``prepare(client)`` (an :class:`IAMQPClient`) runs after each login.
    """

    client = Attribute("IAMQPClient or None: the current prepared connection")
    connections = Attribute("int: connections prepared so far")
    lost_at = Attribute("float or None: when the last prepared connection was lost")
    fatal_error = Attribute("AMQPError or None: the error retrying could not cure")

    def state() -> str:
        """``connected``, ``connecting``, ``failed`` or ``stopped``."""

    def when_connected() -> Deferred[Any]:
        """The next (or current) prepared connection."""

    def when_fatal() -> Deferred[Any]:
        """Fires with the fatal error (an AMQPError), if one ever happens."""

    def fail(error: Any) -> None:
        """Report a fatal error found after set-up; the connection is closed."""
