"""The partitionable TCP proxy of the chaos suite, on fake endpoints and transports."""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from funcx_endpoint.testing.proxy import BLACKHOLE, RESET, PartitionableProxy

ADDRESS = IPv4Address("TCP", "127.0.0.1", 5671)


class _Port:
    def __init__(self) -> None:
        self.stopped = False

    def getHost(self) -> IPv4Address:
        return ADDRESS

    def stopListening(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


@implementer(IStreamServerEndpoint)
class FakeServerEndpoint:
    def __init__(self) -> None:
        self.factory: Any = None
        self.port = _Port()

    def listen(self, factory: Any) -> Deferred[Any]:
        self.factory = factory
        return succeed(self.port)

    def accept(self) -> Any:
        """A new client connection: the proxy's protocol for it, connected."""
        protocol = self.factory.buildProtocol(ADDRESS)
        protocol.makeConnection(StringTransport())
        return protocol


@implementer(IStreamClientEndpoint)
class FakeClientEndpoint:
    def __init__(self) -> None:
        self.attempts: List[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((factory, d))
        return d

    def succeed(self, index: int = -1) -> Any:
        factory, d = self.attempts[index]
        protocol = factory.buildProtocol(ADDRESS)
        protocol.makeConnection(StringTransport())
        d.callback(protocol)
        return protocol


def _lost(protocol: Any) -> None:
    """What a real transport does after abort or close: connectionLost."""
    protocol.connectionLost(Failure(ConnectionRefusedError()))


class ProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.listen = FakeServerEndpoint()
        self.upstream = FakeClientEndpoint()
        self.proxy = PartitionableProxy(self.listen, self.upstream)
        self.proxy.startService()

    def connected(self) -> tuple[Any, Any]:
        down = self.listen.accept()
        up = self.upstream.succeed()
        return down, up

    def test_fakes_provide_the_interfaces(self) -> None:
        self.assertTrue(verifyObject(IStreamServerEndpoint, self.listen))
        self.assertTrue(verifyObject(IStreamClientEndpoint, self.upstream))

    def test_when_listening(self) -> None:
        self.assertIs(self.successResultOf(self.proxy.when_listening()), self.listen.port)

    def test_forwards_both_ways_and_buffers_until_upstream_connects(self) -> None:
        down = self.listen.accept()
        down.dataReceived(b"early ")
        up = self.upstream.succeed()
        down.dataReceived(b"late")
        self.assertEqual(up.transport.value(), b"early late")
        up.dataReceived(b"answer")
        self.assertEqual(down.transport.value(), b"answer")
        # Each side pauses the other when it cannot keep up.
        self.assertIs(up.transport.producer, down.transport)
        self.assertIs(down.transport.producer, up.transport)
        self.assertEqual(self.proxy.forwarded, len(b"late") + len(b"answer"))

    def test_blackhole_drops_bytes_and_keeps_connections_open(self) -> None:
        down, up = self.connected()
        self.proxy.partition(BLACKHOLE)
        down.dataReceived(b"lost")
        up.dataReceived(b"lost too")
        self.assertEqual(up.transport.value(), b"")
        self.assertEqual(down.transport.value(), b"")
        self.assertFalse(down.transport.disconnecting)
        self.assertFalse(up.transport.disconnecting)
        self.assertEqual(self.proxy.dropped, len(b"lost") + len(b"lost too"))

    def test_blackhole_accepts_new_connections_without_reaching_upstream(self) -> None:
        self.proxy.partition()
        attempts = len(self.upstream.attempts)
        down = self.listen.accept()
        down.dataReceived(b"hello")
        self.assertEqual(len(self.upstream.attempts), attempts)
        self.assertFalse(down.transport.disconnecting)

    def test_heal_aborts_blackholed_connections_and_lets_new_ones_through(self) -> None:
        down, up = self.connected()
        self.proxy.partition(BLACKHOLE)
        self.proxy.heal()
        self.assertTrue(down.transport.disconnecting)
        self.assertTrue(up.transport.disconnecting)
        _lost(down)
        self.assertEqual(self.proxy.connections, [])
        fresh, fresh_up = self.connected()
        fresh.dataReceived(b"again")
        self.assertEqual(fresh_up.transport.value(), b"again")

    def test_upstream_arriving_after_a_blackhole_is_dropped(self) -> None:
        down = self.listen.accept()
        self.proxy.partition(BLACKHOLE)
        up = self.upstream.succeed()
        self.assertTrue(up.transport.disconnecting)
        self.assertIsNone(down.upstream)

    def test_reset_aborts_connections_and_new_ones(self) -> None:
        down, up = self.connected()
        self.proxy.partition(RESET)
        self.assertTrue(down.transport.disconnecting)
        self.assertTrue(up.transport.disconnecting)
        attempts = len(self.upstream.attempts)
        late = self.listen.accept()
        self.assertTrue(late.transport.disconnecting)
        self.assertEqual(len(self.upstream.attempts), attempts)
        self.proxy.heal()
        fresh, fresh_up = self.connected()
        fresh.dataReceived(b"ok")
        self.assertEqual(fresh_up.transport.value(), b"ok")

    def test_unknown_mode(self) -> None:
        self.assertRaises(ValueError, self.proxy.partition, "sideways")

    def test_upstream_refused_aborts_the_client(self) -> None:
        down = self.listen.accept()
        _, d = self.upstream.attempts[-1]
        d.errback(Failure(ConnectionRefusedError()))
        self.assertTrue(down.transport.disconnecting)

    def test_upstream_closing_closes_the_client(self) -> None:
        down, up = self.connected()
        _lost(up)
        self.assertTrue(down.transport.disconnecting)

    def test_client_closing_closes_upstream(self) -> None:
        down, up = self.connected()
        _lost(down)
        self.assertTrue(up.transport.disconnecting)
        self.assertEqual(self.proxy.connections, [])

    def test_stop_aborts_connections_and_stops_listening(self) -> None:
        down, up = self.connected()
        result: Optional[Deferred[None]] = self.proxy.stopService()
        assert result is not None
        self.successResultOf(result)
        self.assertTrue(self.listen.port.stopped)
        self.assertTrue(down.transport.disconnecting)
        self.assertTrue(up.transport.disconnecting)
