"""The endpoint's AMQP transport against a real RabbitMQ node (with TLS)."""

from __future__ import annotations

import os
import uuid
from typing import Any, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.endpoint.service import StartupError
from funcx_endpoint.endpoint.transport import Transport
from funcx_endpoint.executor.interface import EchoInterchange
from funcx_endpoint.protocol import Task, pack_function, pack_payload
from funcx_endpoint.testing.broker import ServiceSide
from funcx_endpoint.testing.rabbitmq import shared_node_async


def noop() -> None:
    return None


NOOP_BUFFER = pack_function(noop) + pack_payload((), {})


def make_tasks(n: int) -> List[Task]:
    return [Task(str(uuid.uuid4()), NOOP_BUFFER) for _ in range(n)]


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` in the reactor until true; TimeoutError after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise TimeoutError(f"condition not met within {timeout:g} s")
        await sleep(interval)


class TransportTestCase(TestCase):
    """A service side and an endpoint transport on the shared node."""

    timeout = 180

    async def set_up(self) -> None:
        self.node = await shared_node_async(reactor)
        self.service = ServiceSide(reactor, self.node.amqps_url, self.node.ca_cert_path)
        await self.service.start()
        self.addCleanup(lambda: ensureDeferred(self.service.stop()))
        self.endpoint_id = str(uuid.uuid4())
        await self.service.add_endpoint(self.endpoint_id)
        self.spool_dir = os.path.abspath(self.mktemp())

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self.set_up())

    def make_transport(
        self, url: Optional[str] = None, ca_file: Optional[str] = "default", **kwargs: Any
    ) -> Transport:
        interchange = EchoInterchange(reactor)
        self.fatal: List[Any] = []
        transport = Transport(
            reactor,
            lambda: self.service.broker_info(self.endpoint_id, url),
            interchange,
            ResultSpool(self.spool_dir, deferToThread),
            ca_file=self.node.ca_cert_path if ca_file == "default" else ca_file,
            heartbeat=10,
            on_fatal=lambda message, code: self.fatal.append((message, code)),
            **kwargs,
        )
        return transport

    async def start_transport(self, transport: Transport) -> None:
        transport.startService()
        self.addCleanup(self.stop_transport, transport)
        await transport.when_ready()

    def stop_transport(self, transport: Transport) -> Deferred[None]:
        if transport.running:
            return transport.stopService()
        return Deferred.fromCoroutine(_none())


async def _none() -> None:
    return None


class StreamTests(TransportTestCase):
    async def _stream(self) -> None:
        transport = self.make_transport()
        await self.start_transport(transport)
        tasks = make_tasks(2000)
        ids = [t.task_id for t in tasks]
        await self.service.publish_tasks(self.endpoint_id, tasks)
        await self.service.when(lambda: self.service.answered(ids), 60)
        counts = self.service.counts(ids)
        self.assertEqual(counts["lost"], 0)
        self.assertEqual(counts["duplicated"], 0)
        # Every task was acknowledged: nothing is left unacked for the endpoint.
        await wait_until(lambda: transport._acks.unacked == 0)
        self.assertEqual(len(transport.tracker), 0)
        self.assertEqual(transport.counts["results_confirmed"], 2000)
        # Acks went in batches: fewer ack frames than tasks.
        self.assertLess(transport._acks.ack_frames, 2000)

    def test_stream(self) -> Deferred[None]:
        return ensureDeferred(self._stream())

    async def _wrong_password(self) -> None:
        url = self.node.amqps_url.replace(f":{self.node.admin_password}@", ":wrong@")
        transport = self.make_transport(url=url)
        transport.startService()
        self.addCleanup(self.stop_transport, transport)
        with self.assertRaises(StartupError) as cm:
            await transport.when_ready()
        self.assertIn("refused the login", cm.exception.message)
        self.assertNotIn("wrong", cm.exception.message)  # no password in messages
        self.assertEqual(cm.exception.exit_code, 77)

    def test_wrong_password(self) -> Deferred[None]:
        return ensureDeferred(self._wrong_password())
