"""A TCP proxy that a test can cut: a network partition between two processes.

:class:`PartitionableProxy` listens on one stream endpoint and forwards every
connection it accepts to an upstream endpoint, byte for byte (TLS passes
through untouched).  The chaos suite puts one between the endpoint daemon and
the broker (the service hands the proxy's address to endpoints as the broker's
public URL), so it can cut that link and no other.

Two kinds of cut:

- :meth:`~PartitionableProxy.partition` with ``"blackhole"`` (the default): a
  silent partition, as a dead switch or a dropped route gives.  Connections
  stay open but every byte either way is thrown away; new connections are
  accepted and never reach upstream.  Only timeouts (AMQP heartbeats, publish
  confirms) can tell the peers anything is wrong.
- ``"reset"``: every connection is aborted (RST) at once and new ones are
  aborted as soon as they are accepted, as a firewall rejecting the traffic does.

:meth:`~PartitionableProxy.heal` lets new connections through again.
Connections that lived through a black hole have lost bytes mid-stream (their
TLS records are corrupt), so healing aborts them; their peers reconnect.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["BLACKHOLE", "RESET", "PartitionableProxy"]

BLACKHOLE = "blackhole"
RESET = "reset"


def _abort(transport: Any) -> None:
    """Abort a TCP connection (an ITCPTransport; ``None``: not connected)."""
    if transport is not None:
        transport.abortConnection()


class _Upstream(Protocol):
    """The proxy's connection to upstream, joined to one accepted connection."""

    def __init__(self, pair: _Downstream) -> None:
        self.pair = pair

    def connectionMade(self) -> None:
        self.pair.upstream_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.pair.from_upstream(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.pair.upstream_lost()


class _Downstream(Protocol):
    """An accepted connection; it owns its upstream side."""

    def __init__(self, proxy: PartitionableProxy) -> None:
        self.proxy = proxy
        self.upstream: Optional[_Upstream] = None
        self.pending: List[bytes] = []
        #: Bytes were dropped: the stream is broken for good.
        self.blackholed = False
        self.closed = False

    def connectionMade(self) -> None:
        proxy = self.proxy
        if proxy.mode == RESET:
            self.abort()
            return
        proxy.connections.append(self)
        if proxy.mode == BLACKHOLE:
            self.blackholed = True
            return
        self._connect()

    def _connect(self) -> None:
        d = self.proxy.upstream.connect(Factory.forProtocol(lambda: _Upstream(self)))
        d.addErrback(self._upstream_failed)

    def _upstream_failed(self, failure: Failure) -> None:
        self.proxy.log.info(
            "proxy: upstream refused a connection: {why}", why=failure.getErrorMessage()
        )
        self.abort()

    def upstream_made(self, upstream: _Upstream) -> None:
        if self.closed or self.blackholed:
            _abort(upstream.transport)
            return
        self.upstream = upstream
        # Each side stops reading while the other cannot keep up.
        assert self.transport is not None and upstream.transport is not None
        upstream.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        self.transport.registerProducer(upstream.transport, True)  # type: ignore[attr-defined]
        pending, self.pending = self.pending, []
        for data in pending:
            upstream.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self.blackholed:
            self.proxy.dropped += len(data)
        elif self.upstream is None:
            self.pending.append(data)
        else:
            assert self.upstream.transport is not None
            self.upstream.transport.write(data)
            self.proxy.forwarded += len(data)

    def from_upstream(self, data: bytes) -> None:
        if self.blackholed or self.closed:
            self.proxy.dropped += len(data)
            return
        assert self.transport is not None
        self.transport.write(data)
        self.proxy.forwarded += len(data)

    def blackhole(self) -> None:
        self.blackholed = True
        self.pending = []

    def abort(self) -> None:
        if not self.closed:
            _abort(self.transport)
        if self.upstream is not None:
            _abort(self.upstream.transport)

    def upstream_lost(self) -> None:
        if not self.blackholed and not self.closed and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.closed = True
        if self in self.proxy.connections:
            self.proxy.connections.remove(self)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


class PartitionableProxy(Service):
    """Forwards connections accepted on ``listen`` to ``upstream``; see the module."""

    log = Logger()

    def __init__(self, listen: IStreamServerEndpoint, upstream: IStreamClientEndpoint) -> None:
        self.listen = listen
        self.upstream = upstream
        #: None (passing traffic), :data:`BLACKHOLE` or :data:`RESET`.
        self.mode: Optional[str] = None
        #: The accepted connections still open.
        self.connections: List[_Downstream] = []
        self.forwarded = 0
        self.dropped = 0
        self.port: Optional[IListeningPort] = None
        self._listening: Optional[Deferred[Any]] = None

    def startService(self) -> None:
        super().startService()
        self._listening = self.listen.listen(Factory.forProtocol(lambda: _Downstream(self)))
        self._listening.addCallback(self._listened)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once the proxy accepts connections."""
        assert self._listening is not None, "the proxy was not started"
        d: Deferred[IListeningPort] = Deferred()

        def fire(port: IListeningPort) -> IListeningPort:
            d.callback(port)
            return port

        def failed(failure: Failure) -> Failure:
            d.errback(failure)
            return failure

        self._listening.addCallbacks(fire, failed)
        return d

    def partition(self, mode: str = BLACKHOLE) -> None:
        """Cut the link (see the module for the two modes)."""
        if mode not in (BLACKHOLE, RESET):
            raise ValueError(f"unknown partition mode {mode!r}")
        self.mode = mode
        for connection in list(self.connections):
            if mode == RESET:
                connection.abort()
            else:
                connection.blackhole()

    def heal(self) -> None:
        """Let new connections through; abort those that lost bytes."""
        self.mode = None
        for connection in list(self.connections):
            if connection.blackholed:
                connection.abort()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for connection in list(self.connections):
            connection.abort()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
