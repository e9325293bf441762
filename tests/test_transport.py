"""The endpoint's AMQP transport against a real RabbitMQ node (with TLS)."""

from __future__ import annotations

import os
import uuid
from typing import Any, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.endpoint.service import StartupError
from funcx_endpoint.endpoint.transport import Transport, build_transport
from funcx_endpoint.testing.broker import ServiceSide
from funcx_endpoint.testing.interchanges import EchoInterchange, HoldingInterchange
from funcx_endpoint.testing.rabbitmq import shared_node_async
from funcx_endpoint.wire import Result, Task, pack, pack_function, pack_payload, serialize


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

    def holding_transport(self, **kwargs: Any) -> Any:
        """A transport whose interchange holds tasks until the test answers them."""
        return self.make_transport(interchange=HoldingInterchange, with_interchange=True, **kwargs)

    async def limit_message_size(self, size: int) -> None:
        """Make the broker refuse messages over ``size`` bytes for this test."""

        def set_limit(limit: int) -> Deferred[Any]:
            return self.node.rabbitmqctl_async(
                reactor, "eval", f"application:set_env(rabbit, max_message_size, {limit})."
            )

        await set_limit(size)
        self.addCleanup(set_limit, 134217728)  # RabbitMQ's default

    def make_transport(
        self,
        url: Optional[str] = None,
        ca_file: Optional[str] = "default",
        interchange: Any = None,
        with_interchange: bool = False,
        **kwargs: Any,
    ) -> Any:
        """A transport feeding an echo interchange (or ``interchange(result_sink)``)."""
        self.fatal: List[Any] = []
        transport, made = build_transport(
            reactor,
            lambda: self.service.broker_info(self.endpoint_id, url),
            ResultSpool(self.spool_dir, deferToThread),
            interchange or (lambda results: EchoInterchange(reactor, results)),
            ca_file=self.node.ca_cert_path if ca_file == "default" else ca_file,
            heartbeat=10,
            on_fatal=lambda message, code: self.fatal.append((message, code)),
            **kwargs,
        )
        return (transport, made) if with_interchange else transport

    async def start_transport(self, transport: Transport) -> None:
        transport.startService()
        self.addCleanup(self.stop_transport, transport)
        await transport.when_ready()

    def stop_transport(self, transport: Transport) -> Deferred[None]:
        if transport.running:
            return transport.stopService()
        return Deferred.fromCoroutine(_none())

    async def task_queue_counts(self) -> Tuple[int, int]:
        """(ready, unacknowledged) messages in the endpoint's task queue."""
        out = await self.node.rabbitmqctl_async(
            reactor,
            "list_queues",
            "--quiet",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        )
        for line in out.splitlines():
            name, ready, unacked = line.split("\t")
            if name == f"{self.endpoint_id}.tasks":
                return int(ready), int(unacked)
        raise AssertionError(f"no task queue for {self.endpoint_id} in {out!r}")

    def spool_results(self, results: List[Result]) -> None:
        """Put results in the spool, as an earlier run that was killed left them."""
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        for result in results:
            with open(os.path.join(self.spool_dir, result.task_id), "wb") as f:
                f.write(pack(result))


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
        await wait_until(lambda: transport.ledger.unacked == 0)
        self.assertEqual(len(transport.ledger), 0)
        self.assertEqual(transport.counts["results_confirmed"], 2000)
        # Acks went in batches: fewer ack frames than tasks.
        self.assertLess(transport.ledger.acks.ack_frames, 2000)

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


class TLSTests(TransportTestCase):
    async def _unknown_ca(self) -> None:
        from funcx_endpoint import tls

        other_ca = os.path.abspath(self.mktemp())
        with open(other_ca, "wb") as f:
            f.write(tls.make_ca("Some other CA").cert_pem)
        transport = self.make_transport(ca_file=other_ca)
        transport.startService()
        self.addCleanup(self.stop_transport, transport)
        with self.assertRaises(StartupError) as cm:
            await transport.when_ready()
        self.assertIn("TLS verification of the broker", cm.exception.message)
        self.assertIn("amqp_ca_file", cm.exception.message)

    def test_unknown_ca(self) -> Deferred[None]:
        return ensureDeferred(self._unknown_ca())

    async def _wrong_host_name(self) -> None:
        # A TLS server whose certificate names another host, signed by a CA we trust.
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.ssl import PrivateCertificate

        from funcx_endpoint import tls

        ca = tls.make_ca("Test CA")
        cert, key = tls.make_server_cert(ca, hostnames=["other.example"], ips=[])
        ca_file = os.path.abspath(self.mktemp())
        with open(ca_file, "wb") as f:
            f.write(ca.cert_pem)

        server = PrivateCertificate.loadPEM(cert + key)
        port = reactor.listenSSL(
            0, Factory.forProtocol(Protocol), server.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        url = f"amqps://u:p@localhost:{port.getHost().port}/%2F"
        transport = self.make_transport(url=url, ca_file=ca_file)
        transport.startService()
        self.addCleanup(self.stop_transport, transport)
        with self.assertRaises(StartupError) as cm:
            await transport.when_ready()
        self.assertIn("TLS verification of the broker at localhost", cm.exception.message)

    def test_wrong_host_name(self) -> Deferred[None]:
        return ensureDeferred(self._wrong_host_name())


class DeliveryTests(TransportTestCase):
    """The delivery promise on the shared node."""

    async def _second_instance(self) -> None:
        first = self.make_transport()
        await self.start_transport(first)
        second = self.make_transport()
        second.startService()
        self.addCleanup(self.stop_transport, second)
        with self.assertRaises(StartupError) as cm:
            await second.when_ready()
        self.assertIn("already consumed by another endpoint instance", cm.exception.message)
        self.assertEqual(cm.exception.exit_code, 69)
        # The first one still works.
        tasks = make_tasks(10)
        await self.service.publish_tasks(self.endpoint_id, tasks)
        await self.service.when(lambda: self.service.answered([t.task_id for t in tasks]), 30)

    def test_second_instance_refused(self) -> Deferred[None]:
        return ensureDeferred(self._second_instance())

    async def _missing_queue(self) -> None:
        self.endpoint_id = str(uuid.uuid4())  # never declared
        transport = self.make_transport()
        transport.startService()
        self.addCleanup(self.stop_transport, transport)
        with self.assertRaises(StartupError) as cm:
            await transport.when_ready()
        self.assertIn(f"queue '{self.endpoint_id}.tasks'", cm.exception.message)

    def test_missing_queue_is_fatal(self) -> Deferred[None]:
        return ensureDeferred(self._missing_queue())

    async def _poison(self) -> None:
        import json

        transport = self.make_transport()
        await self.start_transport(transport)
        good = make_tasks(20)
        bad_with_id = str(uuid.uuid4())
        bad_buffer_id = str(uuid.uuid4())
        bodies = [
            b"\x02" + b'{"message_type":"task","data":{}}',  # bad version byte
            b"\x01{not json",  # bad JSON
            b"\x01" + json.dumps({"message_type": "nope", "data": {}}).encode(),
            b"\x01"
            + json.dumps({"message_type": "task", "data": {"task_id": bad_with_id}}).encode(),
            b"\x01"
            + json.dumps(
                {"message_type": "task", "data": {"task_id": bad_buffer_id, "task_buffer": 7}}
            ).encode(),
            b"",
        ]
        from funcx_endpoint.wire import pack

        mixed = []
        for i, task in enumerate(good):
            mixed.append(pack(task))
            if i < len(bodies):
                mixed.append(bodies[i])
        await self.service.publish_raw(self.endpoint_id, mixed)
        ids = [t.task_id for t in good] + [bad_with_id, bad_buffer_id]
        await self.service.when(lambda: self.service.answered(ids), 30)
        for task in good:
            [result] = self.service.results[task.task_id]
            self.assertFalse(result.is_error)
        for task_id in (bad_with_id, bad_buffer_id):
            [result] = self.service.results[task_id]
            self.assertTrue(result.is_error)
            self.assertEqual(result.error_details.code, "MalformedTask")
            self.assertIn("malformed task message", result.error_details.user_message)
        self.assertEqual(transport.counts["malformed"], 6)
        # Nothing is left in the queue or unacknowledged: the unreadable ones
        # were rejected without requeue, the others answered.
        await wait_until(lambda: transport.ledger.unacked == 0)
        self.assertEqual(len(transport.ledger), 0)
        self.flushLoggedErrors()

    def test_poison_messages(self) -> Deferred[None]:
        return ensureDeferred(self._poison())

    async def _clean_stop_releases(self) -> None:
        transport, interchange = self.holding_transport()
        await self.start_transport(transport)
        tasks = make_tasks(30)
        await self.service.publish_tasks(self.endpoint_id, tasks)
        await wait_until(lambda: len(interchange.held) == 30)
        started = [t.task_id for t in tasks[:5]]
        interchange.start_tasks(started)
        # The running ones finish while the endpoint drains.
        reactor.callLater(0.5, interchange.answer, started)
        await transport.drain(grace=10)
        await transport.stopService()
        self.assertTrue(self.service.answered(started))
        self.assertFalse(any(t.task_id in self.service.results for t in tasks[5:]))
        # The 25 released tasks go to the next instance, which answers them.
        successor = self.make_transport()
        await self.start_transport(successor)
        rest = [t.task_id for t in tasks[5:]]
        await self.service.when(lambda: self.service.answered(rest), 30)
        counts = self.service.counts([t.task_id for t in tasks])
        self.assertEqual((counts["lost"], counts["duplicated"]), (0, 0))

    def test_clean_stop_releases_unstarted_tasks(self) -> Deferred[None]:
        return ensureDeferred(self._clean_stop_releases())

    async def _delivered_while_draining(self) -> None:
        """Tasks that still arrive while the endpoint drains (the consumer
        cancel failed) are neither run nor lost: the next instance gets them."""
        transport, interchange = self.holding_transport()
        await self.start_transport(transport)
        [running] = make_tasks(1)
        await self.service.publish_tasks(self.endpoint_id, [running])
        await wait_until(lambda: len(interchange.held) == 1)
        interchange.start_tasks([running.task_id])

        async def cancel_fails() -> None:
            raise RuntimeError("the broker did not answer basic.cancel")

        transport.intake.consumer.cancel = cancel_fails
        drained = ensureDeferred(transport.drain(grace=10))
        late = make_tasks(3)
        await self.service.publish_tasks(self.endpoint_id, late)
        await wait_until(lambda: transport.counts["tasks_held_while_draining"] == 3)
        self.assertEqual(len(interchange.held), 1)  # the late ones were not submitted
        interchange.answer([running.task_id])
        await drained
        await transport.stopService()
        successor = self.make_transport()
        await self.start_transport(successor)
        ids = [running.task_id] + [t.task_id for t in late]
        await self.service.when(lambda: self.service.answered(ids), 30)
        counts = self.service.counts(ids)
        self.assertEqual((counts["lost"], counts["duplicated"]), (0, 0))

    def test_tasks_delivered_while_draining_go_to_the_next_instance(self) -> Deferred[None]:
        return ensureDeferred(self._delivered_while_draining())

    async def _redelivered_not_rerun(self) -> None:
        transport, interchange = self.holding_transport()
        await self.start_transport(transport)
        tasks = make_tasks(50)
        await self.service.publish_tasks(self.endpoint_id, tasks)
        await wait_until(lambda: len(interchange.held) == 50)
        generation = transport.ledger.generation
        # The broker drops every connection: the held tasks are delivered again.
        await self.node.close_all_connections_async(reactor)
        await wait_until(lambda: transport.ledger.generation > generation, 30)
        try:
            await wait_until(lambda: transport.counts["tasks_redelivered_running"] >= 50, 30)
        except TimeoutError:
            queues = await self.node.rabbitmqctl_async(
                reactor, "list_queues", "name", "messages_ready", "messages_unacknowledged"
            )
            self.fail(f"not redelivered: {transport.counts} {queues}")

        self.assertEqual(set(interchange.submissions.values()), {1})
        interchange.answer()
        ids = [t.task_id for t in tasks]
        try:
            await self.service.when(lambda: self.service.answered(ids), 30)
        except TimeoutError:
            self.fail(
                f"not answered: held={len(interchange.held)} "
                f"{transport.counts} {transport.status_fields()} "
                f"{self.service.counts(ids)} service conn {self.service.conn.state()}"
            )

        await wait_until(lambda: transport.ledger.unacked == 0)
        counts = self.service.counts(ids)
        self.assertEqual((counts["lost"], counts["duplicated"]), (0, 0))
        self.assertEqual(set(interchange.submissions.values()), {1})

    def test_redelivered_task_not_run_twice(self) -> Deferred[None]:
        return ensureDeferred(self._redelivered_not_rerun())

    async def _spool_write_fails(self) -> None:
        """A result that can be neither published nor spooled gives its task
        back to the broker after ``release_delay`` (not when the channel
        dies), which delivers it again."""
        transport, interchange = self.holding_transport()
        transport.ledger.release_delay = 0.2
        await self.start_transport(transport)

        [task] = make_tasks(1)
        await self.service.publish_tasks(self.endpoint_id, [task])
        await wait_until(lambda: len(interchange.held) == 1)
        publisher, transport.publisher.publisher = (
            transport.publisher.publisher,
            None,
        )  # results down
        spool_dir, transport.publisher.spool.directory = (
            transport.publisher.spool.directory,
            "/proc/no/such/dir",
        )
        interchange.answer([task.task_id], data="lost")
        await wait_until(lambda: interchange.submissions[task.task_id] == 2)
        # An OSError of the spool is one error line (test_transport_units), no traceback.
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertIn(task.task_id, transport.ledger)
        transport.publisher.publisher, transport.publisher.spool.directory = publisher, spool_dir
        interchange.answer([task.task_id], data="second run")
        await self.service.when(lambda: self.service.answered([task.task_id]), 10)
        [result] = self.service.results[task.task_id]
        self.assertEqual(result.data, serialize("second run"))
        await wait_until(lambda: transport.ledger.unacked == 0)
        self.assertEqual(await self.task_queue_counts(), (0, 0))

    def test_failed_spool_write_releases_task(self) -> Deferred[None]:
        return ensureDeferred(self._spool_write_fails())

    async def _duplicate_on_one_channel(self) -> None:
        """A task delivered twice on one channel: both deliveries are acked,
        and later acks still go in batches."""
        transport, interchange = self.holding_transport()
        await self.start_transport(transport)
        [task] = make_tasks(1)
        await self.service.publish_tasks(self.endpoint_id, [task, task])
        await wait_until(lambda: transport.counts["tasks_redelivered_running"] == 1)
        await wait_until(lambda: len(interchange.held) == 1)
        interchange.answer()
        await self.service.when(lambda: self.service.answered([task.task_id]), 10)
        await wait_until(lambda: transport.ledger.unacked == 0)
        more = make_tasks(20)
        await self.service.publish_tasks(self.endpoint_id, more)
        await wait_until(lambda: len(interchange.held) == 20)
        frames = transport.ledger.acks.ack_frames
        interchange.answer()
        await self.service.when(lambda: self.service.answered([t.task_id for t in more]), 10)
        await wait_until(lambda: transport.ledger.unacked == 0)
        self.assertLessEqual(transport.ledger.acks.ack_frames - frames, 2)
        self.assertEqual(await self.task_queue_counts(), (0, 0))
        self.assertEqual(interchange.submissions[task.task_id], 1)

    def test_duplicate_on_one_channel_acked(self) -> Deferred[None]:
        return ensureDeferred(self._duplicate_on_one_channel())

    async def _malformed_again_after_done(self) -> None:
        """A malformed task delivered again after its error result was sent is acked."""
        import json

        transport = self.make_transport()
        await self.start_transport(transport)
        task_id = str(uuid.uuid4())
        body = b"\x01" + json.dumps({"message_type": "task", "data": {"task_id": task_id}}).encode()
        await self.service.publish_raw(self.endpoint_id, [body])
        await self.service.when(lambda: self.service.answered([task_id]), 10)
        await wait_until(lambda: transport.ledger.unacked == 0)
        await self.service.publish_raw(self.endpoint_id, [body])
        await wait_until(lambda: transport.counts["tasks_redelivered_done"] == 1)
        await wait_until(lambda: transport.ledger.unacked == 0)
        self.assertEqual(await self.task_queue_counts(), (0, 0))
        self.assertEqual(len(self.service.results[task_id]), 1)
        self.flushLoggedErrors()

    def test_malformed_redelivered_after_done_acked(self) -> Deferred[None]:
        return ensureDeferred(self._malformed_again_after_done())

    async def _spooled_not_rerun(self) -> None:
        """After a crash, a task whose result is in the spool is not run again:
        its delivery is acked and the spooled result sent."""
        transport, interchange = self.holding_transport()
        [done, fresh] = make_tasks(2)
        self.spool_results([Result(done.task_id, serialize("from the spool"))])
        await self.service.publish_tasks(self.endpoint_id, [done, fresh])
        await self.start_transport(transport)
        await wait_until(lambda: fresh.task_id in interchange.held)
        await self.service.when(lambda: self.service.answered([done.task_id]), 10)
        self.assertEqual(self.service.results[done.task_id][0].data, serialize("from the spool"))
        self.assertNotIn(done.task_id, interchange.submissions)
        self.assertEqual(transport.counts["tasks_redelivered_done"], 1)
        await wait_until(lambda: os.listdir(self.spool_dir) == [])
        await wait_until(lambda: transport.ledger.unacked == 1)  # the fresh one
        interchange.answer()
        await self.service.when(lambda: self.service.answered([fresh.task_id]), 10)
        await wait_until(lambda: transport.ledger.unacked == 0)

    def test_spooled_result_task_not_rerun(self) -> Deferred[None]:
        return ensureDeferred(self._spooled_not_rerun())

    async def _resend_in_windows(self) -> None:
        """A large spool is sent a window at a time, all of it."""
        results = [Result(str(uuid.uuid4()), serialize(i)) for i in range(100)]
        self.spool_results(results)
        transport = self.make_transport()
        publishing = transport.publisher
        publishing.resend_window = 16
        most = [0]
        window = publishing._resend_window

        def recording_window() -> None:
            window()
            most[0] = max(most[0], len(publishing._resending))

        publishing._resend_window = recording_window  # type: ignore[method-assign]
        await self.start_transport(transport)
        ids = [r.task_id for r in results]
        await self.service.when(lambda: self.service.answered(ids), 30)
        await wait_until(lambda: os.listdir(self.spool_dir) == [])
        self.assertEqual(most[0], 16)
        self.assertEqual(publishing.spooled, 0)

    def test_spool_resent_in_windows(self) -> Deferred[None]:
        return ensureDeferred(self._resend_in_windows())

    async def _unreadable_spool(self) -> None:
        """A spool that cannot be read is fatal: the promise cannot be kept."""
        with open(self.spool_dir, "w") as f:
            f.write("a file where the spool directory should be")
        transport = self.make_transport()
        transport.startService()
        self.addCleanup(self.stop_transport, transport)
        with self.assertRaises(StartupError) as cm:
            await transport.when_ready()
        self.assertIn(f"cannot read the result spool {self.spool_dir}", cm.exception.message)
        self.assertEqual(cm.exception.exit_code, 69)

    def test_unreadable_spool_is_fatal(self) -> Deferred[None]:
        return ensureDeferred(self._unreadable_spool())

    async def _silent_server(self) -> None:
        """A peer that accepts TCP and says nothing: the set-up times out and is
        retried, instead of "connecting" forever."""
        from functools import partial

        from twisted.internet.protocol import Factory, Protocol

        from funcx_endpoint.amqp.connection import AMQPConnectionService

        accepted: List[Protocol] = []
        closed: List[Protocol] = []

        class Silent(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

            def connectionLost(self, reason: Any) -> None:
                closed.append(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"amqp://u:p@127.0.0.1:{port.getHost().port}/%2F"
        transport = self.make_transport(
            url=url, ca_file=None, connect=partial(AMQPConnectionService, setup_timeout=0.5)
        )
        transport.startService()
        self.addCleanup(self.stop_transport, transport)
        ready = transport.when_ready()
        # Two connections (tasks, results), each timed out and tried again.
        await wait_until(lambda: len(accepted) >= 4, 15)
        await wait_until(lambda: all(p in closed for p in accepted[:2]), 5)
        self.assertFalse(ready.called)
        self.assertEqual(self.fatal, [])
        self.assertEqual(transport.tasks_conn.state(), "connecting")
        await transport.stopService()
        for p in accepted:
            if p not in closed:
                p.transport.loseConnection()

    def test_setup_times_out_and_retries(self) -> Deferred[None]:
        return ensureDeferred(self._silent_server())

    async def _own_stale_consumer(self) -> None:
        """After a reconnect, the queue still held by this endpoint's own
        half-open old connection is not mistaken for another instance."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Factory, Protocol

        from funcx_endpoint.amqp.connection import AMQPURL

        target = AMQPURL.parse(self.node.amqps_url)

        class Up(Protocol):
            def __init__(self, down: Protocol) -> None:
                self.down = down

            def dataReceived(self, data: bytes) -> None:
                if self.down.connected:
                    self.down.transport.write(data)

        class Down(Protocol):
            """A relay that keeps the broker side open when the endpoint's side
            goes: a half-open connection, as the broker sees it."""

            def connectionMade(self) -> None:
                self.transport.pauseProducing()
                d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", target.port), Up(self))
                d.addCallback(self.up_connected)

            def up_connected(self, up: Up) -> None:
                self.up = up
                relays.append(up)
                self.transport.resumeProducing()

            def dataReceived(self, data: bytes) -> None:
                self.up.transport.write(data)

            def connectionLost(self, reason: Any) -> None:
                pass

        relays: List[Up] = []
        port = reactor.listenTCP(0, Factory.forProtocol(Down), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def close_relays() -> None:
            for up in relays:
                up.transport.loseConnection()

        self.addCleanup(close_relays)
        url = self.node.amqps_url.replace(f":{target.port}/", f":{port.getHost().port}/")
        transport = self.make_transport(url=url)
        transport.heartbeat = 3
        await self.start_transport(transport)
        transport.tasks_conn.client.transport.abortConnection()
        await wait_until(lambda: transport.tasks_conn.connections >= 2, 30)
        self.assertEqual(self.fatal, [])
        # The refusal happened and was retried, not fatal.
        self.assertGreaterEqual(transport.counts["stale_consumer_retries"], 1)

        tasks = make_tasks(5)
        await self.service.publish_tasks(self.endpoint_id, tasks)
        await self.service.when(lambda: self.service.answered([t.task_id for t in tasks]), 10)

    def test_own_stale_consumer_not_fatal(self) -> Deferred[None]:
        return ensureDeferred(self._own_stale_consumer())

    async def _status_reports(self) -> None:
        from funcx_endpoint.endpoint.status import StatusReporter

        transport = self.make_transport()
        await self.start_transport(transport)
        reporter = StatusReporter(
            reactor,
            lambda: self.endpoint_id,
            transport.intake.interchange,
            transport.publish_status,
            period=0.2,
            extra=transport.status_fields,
        )
        reporter.startService()
        await self.service.when(lambda: len(self.service.reports) >= 3, 10)
        await reporter.stopService()
        await self.service.when(lambda: any(r.is_final for r in self.service.reports), 10)
        first = self.service.reports[0]
        self.assertEqual(first.endpoint_id, self.endpoint_id)
        self.assertEqual(first.global_state["heartbeat_period"], 0.2)
        self.assertIn("tasks_in_flight", first.global_state)
        self.assertEqual(self.service.reports[-1].global_state["heartbeat_period"], 0)

    def test_status_reports(self) -> Deferred[None]:
        return ensureDeferred(self._status_reports())


class FaultTests(TransportTestCase):
    """Faults of the broker and the endpoint, on a node of their own.

    Each counts submitted, answered, lost and duplicated task ids at the
    service side; lost must be 0.  The service deduplicates results by task
    id, so what a client sees has no duplicates; the raw count of results
    received more than once is reported in the assertion messages.
    """

    # Started on first use; the rabbitmq module stops every node a process
    # started when the process exits.
    fault_node: Any = None

    async def set_up(self) -> None:
        if FaultTests.fault_node is None:
            from funcx_endpoint.testing.rabbitmq import RabbitMQNode

            node = RabbitMQNode()
            await node.start_async(reactor)
            FaultTests.fault_node = node
        self.node = FaultTests.fault_node
        if not self.node.running:
            await self.node.start_async(reactor)

        self.service = ServiceSide(reactor, self.node.amqps_url, self.node.ca_cert_path)
        await self.service.start()
        self.addCleanup(lambda: ensureDeferred(self.service.stop()))
        self.endpoint_id = str(uuid.uuid4())
        await self.service.add_endpoint(self.endpoint_id)
        self.spool_dir = os.path.abspath(self.mktemp())

    def assert_none_lost(self, ids: List[str], expect_success: bool = True) -> None:
        """lost = 0, and a client (behind the service's dedupe) sees exactly one
        successful result per task; raw redeliveries are reported, not hidden."""
        counts = self.service.counts(ids)
        self.assertEqual(counts["lost"], 0, counts)
        self.assertEqual(counts["answered"], len(ids), counts)
        # What a client sees: the service keeps the first result of each task.
        seen = {task_id: self.service.results[task_id][0] for task_id in ids}
        duplicates_seen = len(ids) - len(seen)
        self.assertEqual(duplicates_seen, 0)
        if expect_success:
            failed = [t for t, r in seen.items() if r.is_error]
            self.assertEqual(failed, [], f"{len(failed)} tasks failed; counts {counts}")

        # Every copy of a result agrees with the first: a task that ran twice
        # gave the same answer, so the dedupe hides nothing.
        for task_id in ids:
            datas = {r.data for r in self.service.results[task_id]}
            self.assertEqual(len(datas), 1, task_id)

    async def _broker_restart(self) -> None:
        transport = self.make_transport()
        await self.start_transport(transport)
        tasks = make_tasks(5000)
        ids = [t.task_id for t in tasks]
        publishing = ensureDeferred(self.service.publish_tasks(self.endpoint_id, tasks))
        await wait_until(lambda: len(self.service.results) >= 1000, 60)
        await self.node.restart_async(reactor, graceful=True)
        await publishing
        await self.service.when(lambda: self.service.answered(ids), 120)
        self.assert_none_lost(ids)
        await wait_until(lambda: len(transport.ledger) == 0, 30)
        self.assertGreaterEqual(transport.tasks_conn.connections, 2)

    def test_broker_restart_mid_stream(self) -> Deferred[None]:
        return ensureDeferred(self._broker_restart())

    async def _connections_closed(self) -> None:
        transport = self.make_transport()
        await self.start_transport(transport)
        tasks = make_tasks(3000)
        ids = [t.task_id for t in tasks]
        publishing = ensureDeferred(self.service.publish_tasks(self.endpoint_id, tasks))
        await wait_until(lambda: len(self.service.results) >= 500, 60)
        await self.node.close_all_connections_async(reactor, "rabbitmqctl close_connection test")
        await publishing
        await self.service.when(lambda: self.service.answered(ids), 120)
        self.assert_none_lost(ids)
        await wait_until(lambda: transport.tasks_conn.connections >= 2, 30)
        await wait_until(lambda: transport.results_conn.connections >= 2, 30)

    def test_connections_closed_by_broker(self) -> Deferred[None]:
        return ensureDeferred(self._connections_closed())

    def registration_file(self) -> str:
        import json

        from funcx_endpoint.amqp import topology
        from funcx_endpoint.testing.broker import _unredacted

        url = _unredacted(self.service.url)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            json.dump(
                {
                    "endpoint_id": self.endpoint_id,
                    **topology.registration_queue_info(self.endpoint_id, url, url),
                },
                f,
            )
        return path

    async def spawn_endpoint(self, registration: str, delay: float = 0.0) -> Any:
        import subprocess
        import sys

        from tests.support import child_env

        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "funcx_endpoint.testing.echo_endpoint",
                registration,
                self.spool_dir,
                self.node.ca_cert_path,
                str(delay),
            ],
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.addCleanup(proc.stdout.close)
        line = await deferToThread(proc.stdout.readline)
        self.assertEqual(line.strip(), b"ready")
        return proc

    async def _kill_9(self) -> None:
        import signal

        registration = self.registration_file()
        proc = await self.spawn_endpoint(registration)
        tasks = make_tasks(4000)
        ids = [t.task_id for t in tasks]
        publishing = ensureDeferred(self.service.publish_tasks(self.endpoint_id, tasks))
        await wait_until(lambda: len(self.service.results) >= 800, 60)
        proc.send_signal(signal.SIGKILL)
        await deferToThread(proc.wait)
        answered_at_kill = len(self.service.results)
        self.assertLess(answered_at_kill, 4000)
        await publishing
        await self.spawn_endpoint(registration)
        await self.service.when(lambda: self.service.answered(ids), 120)
        self.assert_none_lost(ids)

    def test_kill_9_endpoint_mid_stream(self) -> Deferred[None]:
        return ensureDeferred(self._kill_9())

    async def _spool_after_crash(self) -> None:
        import signal

        registration = self.registration_file()
        # Tasks take 3 s: the broker goes away while they run, so their results
        # cannot be published and are spooled; then the endpoint is killed.
        proc = await self.spawn_endpoint(registration, delay=3.0)
        tasks = make_tasks(300)
        ids = [t.task_id for t in tasks]
        await self.service.publish_tasks(self.endpoint_id, tasks)
        queue = f"{self.endpoint_id}.tasks"

        async def unacked() -> int:
            out = await self.node.rabbitmqctl_async(
                reactor,
                "list_queues",
                "--quiet",
                "--no-table-headers",
                "name",
                "messages_unacknowledged",
            )
            for line in out.splitlines():
                name, _, count = line.partition("\t")
                if name == queue:
                    return int(count)
            return 0

        while await unacked() < 300:
            await sleep(0.1)
        await self.node.stop_async(reactor, graceful=False)
        spool = self.spool_dir
        await wait_until(lambda: os.path.isdir(spool) and len(os.listdir(spool)) == 300, 30)
        spooled = len(os.listdir(spool))
        proc.send_signal(signal.SIGKILL)
        await deferToThread(proc.wait)
        await self.node.start_async(reactor)
        await self.service.conn.when_connected()
        await self.spawn_endpoint(registration)
        await self.service.when(lambda: self.service.answered(ids), 120)
        self.assert_none_lost(ids)
        # The spooled results were sent and removed.
        await wait_until(lambda: len(os.listdir(spool)) == 0, 30)
        self.assertEqual(spooled, 300)

    def test_spooled_results_sent_after_crash(self) -> Deferred[None]:
        return ensureDeferred(self._spool_after_crash())

    async def _too_large(self) -> None:
        await self.limit_message_size(1048576)
        transport, interchange = self.holding_transport()
        await self.start_transport(transport)
        tasks = make_tasks(6)
        ids = [t.task_id for t in tasks]
        await self.service.publish_tasks(self.endpoint_id, tasks)
        await wait_until(lambda: len(interchange.held) == 6)
        interchange.answer(ids[:2], data="small")
        interchange.answer(ids[2:3], raw_data="x" * 2_000_000)
        interchange.answer(ids[3:], data="small too")
        await self.service.when(lambda: self.service.answered(ids), 60)
        self.assert_none_lost(ids, expect_success=False)  # one is MaxResultSizeExceeded
        [big] = self.service.results[ids[2]]
        self.assertTrue(big.is_error)
        self.assertEqual(big.error_details.code, "MaxResultSizeExceeded")
        self.assertIn(
            "larger than the broker's limit of 1048576 bytes", big.error_details.user_message
        )
        for task_id in ids[:2] + ids[3:]:
            self.assertFalse(self.service.results[task_id][-1].is_error)
        await wait_until(lambda: len(transport.ledger) == 0, 30)
        # The limit is remembered: a later result over it (smaller than the
        # first) is replaced before it is sent, costing no channel.
        connections = transport.results_conn.connections
        more = make_tasks(2)
        more_ids = [t.task_id for t in more]
        await self.service.publish_tasks(self.endpoint_id, more)
        await wait_until(lambda: len(interchange.held) == 2)
        interchange.answer(more_ids[:1], raw_data="y" * 1_500_000)
        interchange.answer(more_ids[1:], data="fine")
        await self.service.when(lambda: self.service.answered(more_ids), 30)
        [second] = self.service.results[more_ids[0]]
        self.assertEqual(second.error_details.code, "MaxResultSizeExceeded")
        self.assertFalse(self.service.results[more_ids[1]][-1].is_error)
        self.assertEqual(transport.results_conn.connections, connections)

    def test_result_larger_than_broker_allows(self) -> Deferred[None]:

        return ensureDeferred(self._too_large())

    async def _too_large_spooled(self) -> None:
        """A spooled result larger than the broker allows is replaced by an
        error when it is sent again; it does not block the other results."""
        await self.limit_message_size(1048576)
        transport, interchange = self.holding_transport()
        await self.start_transport(transport)
        tasks = make_tasks(4)
        ids = [t.task_id for t in tasks]
        await self.service.publish_tasks(self.endpoint_id, tasks)
        await wait_until(lambda: len(interchange.held) == 4)
        publisher, transport.publisher.publisher = (
            transport.publisher.publisher,
            None,
        )  # results down
        interchange.answer(ids[:1], raw_data="x" * 2_000_000)
        interchange.answer(ids[1:2], data="small")
        await wait_until(lambda: transport.counts["results_spooled"] == 2)
        transport.publisher.publisher = publisher
        transport.publisher._resend_spooled()
        await sleep(0.5)
        interchange.answer(ids[2:], data="later")
        await self.service.when(lambda: self.service.answered(ids), 30)
        self.assert_none_lost(ids, expect_success=False)
        [big] = self.service.results[ids[0]]
        self.assertEqual(big.error_details.code, "MaxResultSizeExceeded")
        self.assertIn(
            "larger than the broker's limit of 1048576 bytes", big.error_details.user_message
        )
        for task_id in ids[1:]:
            self.assertFalse(self.service.results[task_id][-1].is_error)
        await wait_until(lambda: os.listdir(self.spool_dir) == [], 10)
        await wait_until(lambda: len(transport.ledger) == 0, 10)
        # One reconnect for the channel the broker closed, not a loop of them.
        self.assertLessEqual(transport.results_conn.connections, 3)

    def test_spooled_result_larger_than_broker_allows(self) -> Deferred[None]:
        return ensureDeferred(self._too_large_spooled())


class PolicyTests(TransportTestCase):
    async def _allowed(self) -> None:
        allowed = str(uuid.uuid4())
        other = str(uuid.uuid4())
        transport, interchange = self.holding_transport(allowed_functions=[allowed])
        await self.start_transport(transport)

        good = Task(str(uuid.uuid4()), NOOP_BUFFER, function_id=allowed)
        bad = Task(str(uuid.uuid4()), NOOP_BUFFER, function_id=other)
        anonymous = Task(str(uuid.uuid4()), NOOP_BUFFER)
        await self.service.publish_tasks(self.endpoint_id, [good, bad, anonymous])
        ids = [bad.task_id, anonymous.task_id]
        await self.service.when(lambda: self.service.answered(ids), 30)
        for task_id in ids:
            [result] = self.service.results[task_id]
            self.assertEqual(result.error_details.code, "FunctionNotAllowed")
        self.assertIn(other, self.service.results[bad.task_id][0].error_details.user_message)
        # Only the allowed one reached the interchange (and waits there).
        await wait_until(lambda: good.task_id in interchange.held)
        self.assertEqual(set(interchange.submissions), {good.task_id})

    def test_allowed_functions(self) -> Deferred[None]:
        return ensureDeferred(self._allowed())
