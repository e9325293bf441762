"""Several service instances over one database and a RabbitMQ cluster: the units.

- Claims: a task (and a result copy) stored by one instance is that instance's
  to publish; another instance sharing the database takes it only once the
  claim expired, and two instances reading at once never both get it
  (``FOR UPDATE SKIP LOCKED``, on a real PostgreSQL).
- :class:`~funcx_endpoint.amqp.failover.FailoverEndpoint`: the next address
  when one does not answer.
- :class:`~funcx_endpoint.webservice.cluster.FailoverAdministrator`: the next
  node's management API when one cannot be reached.
- The settings of the cluster mode, and the quorum queue arguments.
- The caller's address behind a trusted load balancer (``X-Forwarded-For``).

The cluster itself (three RabbitMQ nodes, two instances, a node and an
instance killed) is in ``tests/test_service_cluster.py``.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Callable, List

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from funcx_endpoint.amqp.failover import FailoverEndpoint, parse_hosts
from funcx_endpoint.webservice import db, storage, tasks
from funcx_endpoint.webservice.cluster import (
    FailoverAdministrator,
    management_apis,
    queue_arguments,
)
from funcx_endpoint.webservice.http import Call
from funcx_endpoint.webservice.management import (
    BrokerUnavailable,
    IBrokerAdministrator,
    ManagementError,
)
from funcx_endpoint.webservice.records import IncomingResult, NewTask
from funcx_endpoint.webservice.settings import ServiceSettings
from funcx_endpoint.webservice.tasks import Claim
from funcx_endpoint.wire import pack_function, pack_payload
from tests.support import function_row


def add(a: int, b: int = 1) -> int:
    return a + b


A = Claim("instance-a", 15.0)
B = Claim("instance-b", 15.0)


class ClaimCases:
    """Which instance publishes what; subclasses say which database."""

    make_url: Callable[[Any], str]

    def setUp(self) -> None:
        self.url = self.make_url()
        self.connection, self.call = storage.open_sync(self.url)
        self.addCleanup(self.connection.close)  # type: ignore[attr-defined]
        self.function_id = str(uuid.uuid4())
        self.call(tasks.insert_function)(
            function_row(
                self.function_id, "o", name="add", entry_point="add", code=pack_function(add)
            )
        )

    def store(self, claim: Claim, created: float, n: int = 3, ws: Any = None) -> List[str]:
        new = [
            NewTask(
                str(uuid.uuid4()),
                "o",
                self.function_id,
                "ep",
                "g",
                pack_payload((i,), {}),
                ws,
                created,
            )
            for i in range(n)
        ]
        self.call(tasks.insert_tasks)(new, claim)
        return [t.task_id for t in new]

    def unsent(self, claim: Claim, now: float) -> List[str]:
        return [t.task_id for t in self.call(tasks.unsent_tasks)(100, now - 1.0, claim, now)]

    def test_tasks_stay_with_the_instance_that_stored_them(self) -> None:
        ids = self.store(A, created=100.0)
        self.assertEqual(sorted(self.unsent(A, 102.0)), sorted(ids))  # type: ignore[attr-defined]
        self.assertEqual(self.unsent(B, 102.0), [])  # type: ignore[attr-defined]
        # A keeps renewing its claim while it is alive.
        self.assertEqual(self.unsent(B, 114.0), [])  # type: ignore[attr-defined]

    def test_another_instance_takes_them_once_the_claim_expired(self) -> None:
        ids = self.store(A, created=100.0)
        self.assertEqual(sorted(self.unsent(B, 116.0)), sorted(ids))  # type: ignore[attr-defined]
        # Now B's: A (back) leaves them to B until B's claim expires in turn.
        self.assertEqual(self.unsent(A, 117.0), [])  # type: ignore[attr-defined]
        self.assertEqual(len(self.unsent(A, 132.0)), 3)  # type: ignore[attr-defined]

    def test_without_a_claim_every_unsent_task_is_the_readers(self) -> None:
        ids = self.store(A, created=100.0)
        found = [t.task_id for t in self.call(tasks.unsent_tasks)(100, 101.0)]
        self.assertEqual(sorted(found), sorted(ids))  # type: ignore[attr-defined]

    def test_result_copies_are_the_ingesting_instances(self) -> None:
        [task_id] = self.store(A, created=100.0, n=1, ws="q")
        self.call(tasks.mark_sent)([task_id])
        outcomes = self.call(tasks.store_results)(
            [IncomingResult(task_id, "ep", "00\nx", None, None, "200.0")], 200.0, B
        )
        self.assertEqual([o.outcome for o in outcomes], ["stored"])  # type: ignore[attr-defined]
        copies = self.call(tasks.pending_copies)
        self.assertEqual(copies(10, A, 201.0), [])  # type: ignore[attr-defined]
        self.assertEqual([c.task_id for c in copies(10, B, 201.0)], [task_id])  # type: ignore[attr-defined]
        self.assertEqual([c.task_id for c in copies(10, A, 230.0)], [task_id])  # type: ignore[attr-defined]


class SQLiteClaimTests(ClaimCases, SynchronousTestCase):
    def make_url(self) -> str:
        return "sqlite:///" + self.mktemp() + "/db.sqlite3"


def _pg_url() -> str:
    from funcx_endpoint.testing.postgres import PostgresNotInstalled, shared_postgres

    try:
        return shared_postgres().create_database()
    except PostgresNotInstalled as e:
        raise SkipTest(str(e)) from None


class PostgresClaimTests(ClaimCases, SynchronousTestCase):
    def make_url(self) -> str:
        return _pg_url()

    def test_instances_starting_together_migrate_once(self) -> None:
        """Two instances migrating a new database at once: one migrates, the other
        waits for it (an advisory lock) and finds the schema up to date."""
        config = db.DatabaseConfig.from_url(_pg_url())
        results: List[Any] = []

        def migrate() -> None:
            try:
                results.append(db.migrate(config))
            except Exception as e:  # reported by the assertion
                results.append(e)

        threads = [threading.Thread(target=migrate) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(
            sorted(results),
            [(0, db.SCHEMA_VERSION), (db.SCHEMA_VERSION, db.SCHEMA_VERSION)],
        )

    def test_two_instances_reading_at_once_never_get_the_same_task(self) -> None:
        """A's read holds its rows until it commits; B's read meanwhile skips them,
        and after the commit they are A's claim."""
        ids = self.store(A, created=100.0)
        config = db.DatabaseConfig.from_url(self.url)
        first = db.connect(config)
        self.addCleanup(first.close)
        tx = db.Tx(first.cursor(), db.Dialect("postgresql"))
        got_a = [t.task_id for t in tasks.unsent_tasks(tx, 100, 115.0, A, 116.0)]
        self.assertEqual(sorted(got_a), sorted(ids))
        got_b: List[str] = []

        def read_b() -> None:
            got_b.extend(self.unsent(B, 116.0))

        reader = threading.Thread(target=read_b)
        reader.start()
        reader.join(10)
        self.assertFalse(reader.is_alive(), "B's read waited for A's transaction")
        self.assertEqual(got_b, [])
        first.commit()
        self.assertEqual(self.unsent(B, 117.0), [])


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.tried = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.tried += 1
        if self.answer:
            return succeed(factory.buildProtocol(None))
        return fail(ConnectionRefusedError("refused"))


class FailoverEndpointTests(SynchronousTestCase):
    def test_is_an_endpoint(self) -> None:
        verifyObject(IStreamClientEndpoint, FailoverEndpoint([_Endpoint(True)], ["a"]))

    def test_the_next_address_when_one_does_not_answer(self) -> None:
        down, up, spare = _Endpoint(False), _Endpoint(True), _Endpoint(True)
        endpoint = FailoverEndpoint([down, up, spare], ["a", "b", "c"])
        protocol = self.successResultOf(endpoint.connect(Factory.forProtocol(Protocol)))
        self.assertIsInstance(protocol, Protocol)
        self.assertEqual((down.tried, up.tried, spare.tried), (1, 1, 0))
        # The next connection starts with the one that answered.
        self.successResultOf(endpoint.connect(Factory.forProtocol(Protocol)))
        self.assertEqual((down.tried, up.tried, spare.tried), (1, 2, 0))

    def test_fails_when_no_address_answers_and_starts_elsewhere_next_time(self) -> None:
        ends = [_Endpoint(False), _Endpoint(False)]
        endpoint = FailoverEndpoint(ends, ["a:1", "b:2"])
        failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)))
        self.assertIn("a:1: ", str(failure.value))
        self.assertIn("b:2: ", str(failure.value))
        ends[0].answer = True
        self.successResultOf(endpoint.connect(Factory.forProtocol(Protocol)))
        self.assertEqual([e.tried for e in ends], [2, 2])

    def test_parse_hosts(self) -> None:
        self.assertEqual(parse_hosts("a:1, b ,[::1]:3", 5671), [("a", 1), ("b", 5671), ("::1", 3)])
        for bad in ("", "a:0", "a:x", ":5"):
            self.assertRaises(ValueError, parse_hosts, bad, 5671)


class _API:
    def __init__(self, name: str, error: Any = None) -> None:
        self.name = name
        self.error = error
        self.calls: List[str] = []

    def describe(self) -> str:
        return self.name

    async def provision_endpoint(self, user: str, password: str, endpoint_id: str) -> None:
        self.calls.append(user)
        if self.error is not None:
            raise self.error

    async def delete_user(self, name: str) -> bool:
        self.calls.append(name)
        if self.error is not None:
            raise self.error
        return True


class FailoverAdministratorTests(SynchronousTestCase):
    def run_(self, coro: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coro)

    def test_is_an_administrator(self) -> None:
        verifyObject(IBrokerAdministrator, FailoverAdministrator([_API("a")]))  # type: ignore[list-item]

    def test_the_next_node_when_one_cannot_be_reached(self) -> None:
        down, up = _API("a", BrokerUnavailable("down")), _API("b")
        admin = FailoverAdministrator([down, up])  # type: ignore[list-item]
        self.successResultOf(self.run_(admin.provision_endpoint("u", "p", "e")))
        self.assertEqual((down.calls, up.calls), (["u"], ["u"]))
        # It sticks to the one that answered.
        self.assertTrue(self.successResultOf(self.run_(admin.delete_user("v"))))
        self.assertEqual((down.calls, up.calls), (["u"], ["u", "v"]))

    def test_a_refusal_is_final_and_all_down_is_unavailable(self) -> None:
        refusing, other = _API("a", ManagementError(403, "no")), _API("b")
        admin = FailoverAdministrator([refusing, other])  # type: ignore[list-item]
        self.failureResultOf(self.run_(admin.delete_user("u")), ManagementError)
        self.assertEqual(other.calls, [])
        admin = FailoverAdministrator(
            [_API("a", BrokerUnavailable("x")), _API("b", BrokerUnavailable("y"))]  # type: ignore[list-item]
        )
        failure = self.failureResultOf(self.run_(admin.delete_user("u")), BrokerUnavailable)
        self.assertIn("x; y", str(failure.value))

    def test_management_apis_one_per_host_with_the_urls_credentials(self) -> None:
        apis = management_apis(
            None, "http://admin:pw@h0:15672/", "h1:1001,h2:1002", "vh", ca_file=None
        )
        self.assertEqual(
            [(a.base, a.user, a.vhost) for a in apis],
            [("http://h1:1001/api", "admin", "vh"), ("http://h2:1002/api", "admin", "vh")],
        )


class ClusterSettingsTests(SynchronousTestCase):
    def load(self, **overrides: Any) -> ServiceSettings:
        return ServiceSettings.load(self.mktemp(), overrides)

    def test_quorum_queue_arguments(self) -> None:
        self.assertEqual(queue_arguments("classic"), {})
        self.assertEqual(
            queue_arguments("quorum", **{"x-expires": 5}),
            {"x-queue-type": "quorum", "x-expires": 5},
        )

    def test_cluster_settings_need_an_existing_broker(self) -> None:
        for overrides in (
            {"amqp_hosts": "a:1,b:2"},
            {"management_hosts": "a:1"},
            {"queue_type": "quorum"},
            {"instance_id": "web-1"},
        ):
            self.assertRaises(ValueError, self.load, **overrides)
        settings = self.load(
            amqp_url="amqps://u:p@a:1/v", amqp_hosts="a:1,b:2", queue_type="quorum"
        )
        self.assertEqual(settings.queue_type, "quorum")
        self.assertRaises(ValueError, self.load, amqp_url="amqps://u:p@a:1/v", amqp_hosts="a:1,b:x")

    def test_the_instance_id_is_stable(self) -> None:
        settings = self.load(port=4443)
        self.assertTrue(settings.effective_instance_id.endswith(":4443"))
        settings = self.load(instance_id="web-1", amqp_url="amqp://u:p@h/v")
        self.assertEqual(settings.effective_instance_id, "web-1")


class TrustedProxyTests(SynchronousTestCase):
    """Behind a load balancer, the caller's address comes from ``X-Forwarded-For``,
    and only when the balancer is a trusted proxy (else anyone could claim any
    address, and escape the login back-off)."""

    def call(self, peer: str, forwarded: List[bytes], trusted: Any = frozenset()) -> Call:
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", peer, 40000)
        for value in forwarded:
            request.requestHeaders.addRawHeader(b"x-forwarded-for", value)
        return Call(request, {}, frozenset(trusted))  # type: ignore[arg-type]

    def test_direct_callers_are_their_peer_address(self) -> None:
        self.assertEqual(self.call("192.0.2.7", [b"203.0.113.9"]).client_ip(), "192.0.2.7")

    def test_the_last_untrusted_hop_behind_trusted_proxies(self) -> None:
        lb = {"10.0.0.1", "10.0.0.2"}
        call = self.call("10.0.0.1", [b"198.51.100.1, 203.0.113.9", b"10.0.0.2"], lb)
        # The client may have sent a forged first entry; the last one the trusted
        # proxies added is the address that reached them.
        self.assertEqual(call.client_ip(), "203.0.113.9")
        self.assertEqual(self.call("10.0.0.1", [], lb).client_ip(), "10.0.0.1")
