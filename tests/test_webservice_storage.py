"""The service's storage layer, on SQLite and on a real PostgreSQL server.

The same cases run against both databases (``StorageCases``): schema
migration, clients and tokens, endpoints, tasks, result deduplication,
status reports.  PostgreSQL is Debian's, started by this test run
(:mod:`funcx_endpoint.testing.postgres`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from typing import Any, Callable

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from funcx_endpoint.webservice import (
    accounts,
    containers,
    db,
    endpoints,
    records,
    storage,
    tasks,
)
from funcx_endpoint.webservice.auth import hash_secret, token_hash, verify_secret
from funcx_endpoint.webservice.records import (
    ContainerInfo,
    Endpoint,
    ImageInfo,
    IncomingResult,
    NewTask,
    Report,
    TokenInfo,
)
from funcx_endpoint.wire import pack_function, pack_payload


def add(a, b=1):
    return a + b


CODE = pack_function(add)


def _pg_url() -> str:
    from funcx_endpoint.testing.postgres import PostgresNotInstalled, shared_postgres

    try:
        return shared_postgres().create_database()
    except PostgresNotInstalled as e:
        raise SkipTest(str(e)) from None


class StorageCases:
    """Storage operations; subclasses say which database (``make_url``)."""

    make_url: Callable[[Any], str]

    def setUp(self) -> None:
        self.url = self.make_url()
        self.connection, self.call = storage.open_sync(self.url)
        self.addCleanup(self.connection.close)

    def client(self, name: str = "alice") -> records.Client:
        return self.call(accounts.create_client)(str(uuid.uuid4()), name, "scrypt$x", time.time())

    def register(self, owner: str, endpoint_id: str = "", **kwargs: Any) -> Endpoint:
        endpoint_id = endpoint_id or str(uuid.uuid4())
        values = dict(
            name="ep",
            metadata={"hostname": "h"},
            allowed=None,
            period=None,
            threshold=None,
            user=f"u-{endpoint_id}",
            password="pw",
            ip="127.0.0.1",
            now=time.time(),
        )
        values.update(kwargs)
        saved = self.call(endpoints.save_registration)(
            endpoint_id,
            owner,
            values["name"],
            values["metadata"],
            values["allowed"],
            values["period"],
            values["threshold"],
            values["user"],
            values["password"],
            values["ip"],
            values["now"],
        )
        assert saved is not None
        return saved

    def function(self, owner: str, public: bool = False, container_uuid: Any = None) -> str:
        function_id = str(uuid.uuid4())
        self.call(tasks.insert_function)(
            {
                "function_id": function_id,
                "owner": owner,
                "name": "add",
                "entry_point": "add",
                "description": None,
                "container_uuid": container_uuid,
                "public": public,
                "group_id": None,
                "function_code": CODE,
                "created": time.time(),
            }
        )
        return function_id

    def tasks(self, owner: str, function_id: str, endpoint_id: str, n: int, **kw: Any) -> list:
        group = kw.get("group") or str(uuid.uuid4())
        new = [
            NewTask(
                str(uuid.uuid4()),
                owner,
                function_id,
                endpoint_id,
                group,
                pack_payload((i,), {}),
                kw.get("ws"),
                time.time() - 10,
            )
            for i in range(n)
        ]
        self.call(tasks.insert_tasks)(new)
        return [t.task_id for t in new]

    # -- schema ---------------------------------------------------------------------

    def test_migrate_is_idempotent(self) -> None:
        config = db.DatabaseConfig.from_url(self.url)
        self.assertEqual(db.migrate(config), (db.SCHEMA_VERSION, db.SCHEMA_VERSION))

    def test_newer_schema_is_refused(self) -> None:
        self.call(
            lambda tx: tx.execute(
                "INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
                (db.SCHEMA_VERSION + 1, "from the future", time.time()),
            )
        )()
        error = self.assertRaises(
            db.DatabaseError, db.migrate, db.DatabaseConfig.from_url(self.url)
        )
        self.assertIn("newer", str(error))

    def test_migration_from_version_1(self) -> None:
        """A database made before containers gets them; its functions and tasks stay,
        and a function's container_uuid that names nothing stored is read as no container."""
        config = db.DatabaseConfig.from_url(self.make_url())
        saved = db.MIGRATIONS, db.SCHEMA_VERSION
        db.MIGRATIONS, db.SCHEMA_VERSION = db.MIGRATIONS[:1], 1
        try:
            self.assertEqual(db.migrate(config), (0, 1))
            connection = db.connect(config)
            try:
                cursor = connection.cursor()
                tx = db.Tx(cursor, db.Dialect(config.kind))
                dangling = str(uuid.uuid4())
                row = {
                    "function_id": str(uuid.uuid4()),
                    "owner": "o",
                    "name": "add",
                    "entry_point": "add",
                    "description": None,
                    "container_uuid": dangling,
                    "public": False,
                    "group_id": None,
                    "function_code": CODE,
                    "created": 1.0,
                }
                # Rows as a version-1 service wrote them (today's insert functions
                # write columns added later).
                tx.execute(
                    "INSERT INTO functions (function_id, owner, name, entry_point, description, "
                    "container_uuid, public, group_id, function_code, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [int(v) if isinstance(v, bool) else v for v in row.values()],
                )
                task = NewTask(str(uuid.uuid4()), "o", row["function_id"], "e", "g", "", None, 1.0)
                tx.execute(
                    "INSERT INTO tasks (task_id, owner, function_id, endpoint_id, task_group_id, "
                    "payload, status, created, ws_queue) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'waiting-for-ep', ?, ?)",
                    (
                        task.task_id,
                        task.owner,
                        task.function_id,
                        task.endpoint_id,
                        task.task_group_id,
                        task.payload,
                        task.created,
                        task.ws_queue,
                    ),
                )
                connection.commit()
            finally:
                connection.close()
        finally:
            db.MIGRATIONS, db.SCHEMA_VERSION = saved
        self.assertEqual(db.migrate(config), (1, db.SCHEMA_VERSION))
        connection, call = storage.open_sync(config.dsn or "sqlite://" + str(config.path))
        self.addCleanup(connection.close)
        [unsent] = call(tasks.unsent_tasks)(10, time.time())
        self.assertEqual((unsent.container_uuid, unsent.container), (dangling, None))
        self.assertEqual(call(storage.counts)()["containers"], 0)

    # -- containers ---------------------------------------------------------------------

    def test_containers_and_their_images(self) -> None:
        alice = self.client()
        container_id = str(uuid.uuid4())
        container = ContainerInfo(
            container_id,
            alice.identity_id,
            "py",
            "d",
            False,
            1.0,
            1.0,
            (ImageInfo("docker", "python:3.11", 1.0, 1.0),),
        )
        self.call(containers.insert_container)(container)
        self.assertEqual(self.call(containers.get_container)(container_id), container)
        self.assertIsNone(self.call(containers.get_container)(str(uuid.uuid4())))
        # A new type, then the docker image moved: one image per type.
        self.call(containers.put_image)(container_id, ImageInfo("apptainer", "/a.sif", 2.0, 2.0))
        self.call(containers.put_image)(container_id, ImageInfo("docker", "python:3.12", 3.0, 3.0))
        found = self.call(containers.get_container)(container_id)
        self.assertEqual(found.modified, 3.0)
        self.assertEqual(
            [(i.image_type, i.location, i.created, i.modified) for i in found.images],
            [("docker", "python:3.12", 1.0, 3.0), ("apptainer", "/a.sif", 2.0, 2.0)],
        )
        self.assertEqual(found.image("apptainer").build_status, "provided")
        other = ContainerInfo(
            str(uuid.uuid4()),
            "bob",
            "",
            None,
            True,
            4.0,
            4.0,
            (ImageInfo("podman", "x", 4.0, 4.0),),
        )
        self.call(containers.insert_container)(other)
        many = self.call(containers.get_containers)([container_id, other.container_id, "nope"])
        self.assertEqual(set(many), {container_id, other.container_id})
        self.assertTrue(many[other.container_id].public)
        self.assertEqual(self.call(storage.counts)()["containers"], 2)

        # Tasks read back for sending carry their function's container.
        endpoint = self.register(alice.identity_id)
        in_container = self.function(alice.identity_id, container_uuid=container_id)
        plain = self.function(alice.identity_id)
        self.tasks(alice.identity_id, in_container, endpoint.endpoint_id, 2)
        self.tasks(alice.identity_id, plain, endpoint.endpoint_id, 1)
        unsent = self.call(tasks.unsent_tasks)(10, time.time())
        self.assertEqual(
            sorted((t.container_uuid or "", t.container == found) for t in unsent),
            [("", False), (container_id, True), (container_id, True)],
        )

    # -- clients and tokens ------------------------------------------------------------

    def test_clients(self) -> None:
        alice = self.client("alice")
        self.assertRaises(accounts.NameTaken, self.client, "alice")
        self.assertEqual(self.call(accounts.get_client)(alice.client_id).name, "alice")
        self.assertEqual([c.name for c in self.call(accounts.list_clients)()], ["alice"])
        info = TokenInfo(
            alice.identity_id, alice.client_id, "funcx_service", "s", 1.0, time.time() + 60
        )
        self.call(accounts.insert_token)("h1", info)
        self.assertFalse(self.call(accounts.find_token)("h1").revoked)
        revoked = self.call(accounts.revoke_client)("alice", time.time())
        self.assertEqual(revoked.client_id, alice.client_id)
        self.assertTrue(self.call(accounts.find_token)("h1").revoked)
        self.assertIsNone(self.call(accounts.revoke_client)("alice", time.time()))
        # The name is free again once revoked.
        self.assertNotEqual(self.client("alice").client_id, alice.client_id)

    def test_token_revoke_and_purge(self) -> None:
        alice = self.client()
        old = TokenInfo(alice.identity_id, alice.client_id, "funcx_service", "s", 1.0, 2.0)
        self.call(accounts.insert_token)("old", old)
        new = TokenInfo(
            alice.identity_id, alice.client_id, "funcx_service", "s", 1.0, time.time() + 99
        )
        self.call(accounts.insert_token)("new", new)
        self.assertTrue(self.call(accounts.revoke_token)("new"))
        self.assertFalse(self.call(accounts.revoke_token)("new"))
        self.assertEqual(self.call(accounts.purge_tokens)(time.time()), 1)
        self.assertIsNone(self.call(accounts.find_token)("old"))

    # -- endpoints -----------------------------------------------------------------------

    def test_registration_keeps_broker_credentials_and_owner(self) -> None:
        alice, bob = self.client("alice"), self.client("bob")
        first = self.register(alice.identity_id, password="first")
        again = self.register(alice.identity_id, first.endpoint_id, password="second", name="x")
        self.assertEqual(again.broker_password, "first")
        self.assertEqual(again.name, "x")
        self.assertEqual(again.registrations, 2)
        self.assertIsNone(
            self.call(endpoints.save_registration)(
                first.endpoint_id,
                bob.identity_id,
                "steal",
                {},
                None,
                None,
                None,
                "u",
                "p",
                None,
                time.time(),
            )
        )
        self.assertEqual(
            self.call(endpoints.get_endpoint)(first.endpoint_id).owner, alice.identity_id
        )

    def test_lock_is_consumed_once(self) -> None:
        alice = self.client()
        endpoint = self.register(alice.identity_id)
        self.assertFalse(self.call(endpoints.consume_lock)(endpoint.endpoint_id))
        self.call(endpoints.lock_endpoint)(endpoint.endpoint_id)
        self.assertTrue(self.call(endpoints.consume_lock)(endpoint.endpoint_id))
        self.assertFalse(self.call(endpoints.consume_lock)(endpoint.endpoint_id))

    def test_delete_fails_unfinished_tasks(self) -> None:
        alice = self.client()
        endpoint = self.register(alice.identity_id)
        function_id = self.function(alice.identity_id)
        ids = self.tasks(alice.identity_id, function_id, endpoint.endpoint_id, 3)
        self.call(tasks.store_results)(
            [IncomingResult(ids[0], endpoint.endpoint_id, "00\nx\n", None, None, "1.0")]
        )
        failed = self.call(endpoints.delete_endpoint)(endpoint.endpoint_id, time.time(), "gone")
        self.assertEqual(failed, 2)
        views = self.call(tasks.get_tasks)(ids, alice.identity_id)
        self.assertEqual(views[ids[0]]["status"], "success")
        self.assertEqual(views[ids[1]]["status"], "failed")
        self.assertEqual(views[ids[1]]["error_details"]["code"], "EndpointDeleted")
        self.assertEqual(self.call(endpoints.list_endpoints)(alice.identity_id), [])
        self.assertEqual(self.call(tasks.unsent_tasks)(10, time.time()), [])

    def test_whitelist(self) -> None:
        alice = self.client()
        endpoint = self.register(alice.identity_id)
        f1, f2 = self.function(alice.identity_id), self.function(alice.identity_id)
        self.call(endpoints.add_to_whitelist)(endpoint.endpoint_id, [f1, f2])
        self.call(endpoints.add_to_whitelist)(endpoint.endpoint_id, [f1])
        self.assertEqual(self.call(endpoints.get_whitelist)(endpoint.endpoint_id), sorted([f1, f2]))
        self.assertTrue(self.call(endpoints.remove_from_whitelist)(endpoint.endpoint_id, f1))
        self.assertFalse(self.call(endpoints.remove_from_whitelist)(endpoint.endpoint_id, f1))
        self.assertEqual(
            self.call(endpoints.whitelists)([endpoint.endpoint_id]), {endpoint.endpoint_id: [f2]}
        )

    def test_visible_functions(self) -> None:
        alice, bob = self.client("alice"), self.client("bob")
        mine = self.function(alice.identity_id)
        theirs = self.function(bob.identity_id)
        public = self.function(bob.identity_id, public=True)
        visible = self.call(tasks.visible_functions)([mine, theirs, public], alice.identity_id)
        self.assertEqual(sorted(visible), sorted([mine, public]))

    def test_reports_and_transitions(self) -> None:
        alice = self.client()
        endpoint = self.register(alice.identity_id)
        function_id = self.function(alice.identity_id)
        t1, t2 = self.tasks(alice.identity_id, function_id, endpoint.endpoint_id, 2)
        now = time.time()
        report = Report(
            endpoint.endpoint_id,
            {"managers": 1},
            {t1: [(1, "waiting-for-nodes"), (3, "running")], t2: [(5, "waiting-for-launch")]},
            False,
            now,
        )
        self.assertEqual(self.call(endpoints.record_reports)([report], 2), 2)
        views = self.call(tasks.get_tasks)([t1, t2], alice.identity_id)
        self.assertEqual(views[t1]["status"], "running")
        self.assertEqual(views[t2]["status"], "waiting-for-launch")
        # A stale transition never moves a task back.
        back = Report(endpoint.endpoint_id, {}, {t1: [(9, "waiting-for-nodes")]}, False, now + 1)
        final = Report(endpoint.endpoint_id, {"heartbeat_period": 0}, {}, True, now + 2)
        self.call(endpoints.record_reports)([back, final], 2)
        self.assertEqual(
            self.call(tasks.get_tasks)([t1], alice.identity_id)[t1]["status"], "running"
        )
        saved = self.call(endpoints.get_endpoint)(endpoint.endpoint_id)
        self.assertEqual([r["final"] for r in saved.recent_reports], [True, False])
        self.assertEqual(saved.last_report_at, now + 1)
        self.assertEqual(saved.final_report_at, now + 2)

    # -- tasks and results ----------------------------------------------------------------

    def test_results_first_wins(self) -> None:
        alice = self.client()
        endpoint = self.register(alice.identity_id)
        other = self.register(alice.identity_id)
        function_id = self.function(alice.identity_id)
        (task_id,) = self.tasks(alice.identity_id, function_id, endpoint.endpoint_id, 1, ws="q1")
        unknown = str(uuid.uuid4())
        outcomes = self.call(tasks.store_results)(
            [
                IncomingResult(task_id, other.endpoint_id, "00\nforged\n", None, None, "1.0"),
                IncomingResult(task_id, endpoint.endpoint_id, "00\nfirst\n", None, None, "2.0"),
                IncomingResult(task_id, endpoint.endpoint_id, "00\nsecond\n", None, None, "3.0"),
                IncomingResult(unknown, endpoint.endpoint_id, "x", None, None, "3.0"),
            ]
        )
        self.assertEqual(
            [(o.outcome, o.ws_queue) for o in outcomes],
            [("wrong_endpoint", None), ("stored", "q1"), ("duplicate", None), ("unknown", None)],
        )
        again = self.call(tasks.store_results)(
            [IncomingResult(task_id, endpoint.endpoint_id, "Traceback", "Boom", "b", "4.0")]
        )
        self.assertEqual(again[0].outcome, "duplicate")
        view = self.call(tasks.get_tasks)([task_id], alice.identity_id)[task_id]
        self.assertEqual(
            view,
            {
                "task_id": task_id,
                "status": "success",
                "completion_t": "2.0",
                "result": "00\nfirst\n",
            },
        )
        copies = self.call(tasks.pending_copies)(10)
        self.assertEqual(
            [(c.task_id, c.ws_queue, c.data) for c in copies], [(task_id, "q1", "00\nfirst\n")]
        )
        self.call(tasks.mark_copied)([task_id])
        self.assertEqual(self.call(tasks.pending_copies)(10), [])

    def test_failed_result_view(self) -> None:
        alice = self.client()
        endpoint = self.register(alice.identity_id)
        function_id = self.function(alice.identity_id)
        (task_id,) = self.tasks(alice.identity_id, function_id, endpoint.endpoint_id, 1)
        self.call(tasks.store_results)(
            [
                IncomingResult(
                    task_id,
                    endpoint.endpoint_id,
                    "Traceback...",
                    "RemoteExecutionError",
                    "An error occurred",
                    "5.5",
                )
            ]
        )
        view = self.call(tasks.get_tasks)([task_id], alice.identity_id)[task_id]
        self.assertEqual(view["status"], "failed")
        self.assertEqual(view["exception"], "Traceback...")
        self.assertEqual(view["completion_t"], "5.5")
        self.assertEqual(
            view["error_details"],
            {"code": "RemoteExecutionError", "user_message": "An error occurred"},
        )
        self.assertNotIn("result", view)

    def test_unsent_and_batch_status_in_chunks(self) -> None:
        alice, bob = self.client("alice"), self.client("bob")
        endpoint = self.register(alice.identity_id)
        function_id = self.function(alice.identity_id)
        ids = self.tasks(alice.identity_id, function_id, endpoint.endpoint_id, 1200, group="g")
        unsent = self.call(tasks.unsent_tasks)(2000, time.time())
        self.assertEqual(len(unsent), 1200)
        self.assertEqual(unsent[0].task_buffer, CODE + pack_payload((0,), {}))
        self.call(tasks.mark_sent)(ids[:1100])
        self.assertEqual(len(self.call(tasks.unsent_tasks)(2000, time.time())), 100)
        views = self.call(tasks.get_tasks)(ids + [str(uuid.uuid4())], alice.identity_id)
        self.assertEqual(len(views), 1200)
        self.assertEqual({v["status"] for v in views.values()}, {"waiting-for-ep"})
        self.assertEqual(self.call(tasks.get_tasks)(ids, bob.identity_id), {})
        self.assertEqual(self.call(tasks.task_group)("g", alice.identity_id), ids)
        self.assertEqual(self.call(tasks.task_group)("g", bob.identity_id), [])

    def test_user_broker_is_stable(self) -> None:
        alice = self.client()
        first = self.call(accounts.save_user_broker)(alice.identity_id, "u1", "p1")
        second = self.call(accounts.save_user_broker)(alice.identity_id, "u2", "p2")
        self.assertEqual(first, ("u1", "p1"))
        self.assertEqual(second, ("u1", "p1"))


class SQLiteStorageTests(StorageCases, SynchronousTestCase):
    def make_url(self) -> str:
        return "sqlite://" + os.path.abspath(self.mktemp()) + ".sqlite3"

    def test_wal_and_private_file(self) -> None:
        path = self.url[len("sqlite://") :]
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")


class PostgresStorageTests(StorageCases, SynchronousTestCase):
    def make_url(self) -> str:
        return _pg_url()


class AsyncStorageTests(TestCase):
    """The Deferred-returning face runs the same operations in database threads."""

    async def check(self, url: str) -> None:
        store = storage.Storage(db.DatabaseConfig.from_url(url), reactor)
        self.assertEqual((await store.open())[1], db.SCHEMA_VERSION)
        self.addCleanup(store.close)
        client = await store.run(accounts.create_client, str(uuid.uuid4()), "x", "h", time.time())
        self.assertEqual((await store.get_client(client.client_id)).name, "x")
        self.assertEqual(await store.list_endpoints(client.identity_id), [])

    def test_sqlite(self):
        return self.check("sqlite://" + os.path.abspath(self.mktemp()))

    def test_postgresql(self):
        async def go() -> None:
            from funcx_endpoint.testing.postgres import shared_postgres_async

            server = await shared_postgres_async(reactor)
            from twisted.internet.threads import deferToThread

            await self.check(await deferToThread(server.create_database))

        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(go())


class SecretsTests(SynchronousTestCase):
    def test_hash_and_verify(self) -> None:
        hashed = hash_secret("s3cret")
        self.assertTrue(hashed.startswith("scrypt$"))
        self.assertNotIn("s3cret", hashed)
        self.assertTrue(verify_secret("s3cret", hashed))
        self.assertFalse(verify_secret("s3cret!", hashed))
        self.assertNotEqual(hash_secret("s3cret"), hashed)  # salted
        self.assertFalse(verify_secret("x", "garbage"))
        self.assertFalse(verify_secret("x", "md5$1$2$3$4$5"))

    def test_token_hash(self) -> None:
        self.assertEqual(len(token_hash("abc")), 64)
        self.assertEqual(token_hash("abc"), token_hash("abc"))


class LivenessTests(SynchronousTestCase):
    def endpoint(self, last: Any, final: Any, **kw: Any) -> Endpoint:
        row = [
            str(uuid.uuid4()),
            "o",
            "n",
            json.dumps({}),
            None,
            kw.get("period"),
            kw.get("threshold"),
            "u",
            "p",
            0,
            None,
            0.0,
            0.0,
            1,
            None,
            last,
            final,
            "[]",
        ]
        return Endpoint.from_row(row)

    def test_rules(self) -> None:
        now = 1000.0
        self.assertEqual(self.endpoint(None, None).liveness(now, 120), ("offline", False))
        self.assertEqual(self.endpoint(990, None).liveness(now, 120), ("online", False))
        self.assertEqual(self.endpoint(800, None).liveness(now, 120), ("offline", False))
        # A final report newer than the last periodic one: offline, unless the
        # task queue still has a consumer (the caller checks that).
        self.assertEqual(self.endpoint(990, 995).liveness(now, 120), ("offline", True))
        self.assertEqual(self.endpoint(990, 980).liveness(now, 120), ("online", False))
        self.assertEqual(self.endpoint(700, 995).liveness(now, 120), ("offline", False))

    def test_thresholds(self) -> None:
        self.assertEqual(self.endpoint(None, None, threshold=7).threshold(120), 7)
        self.assertEqual(self.endpoint(None, None, period=30).threshold(120), 120)
        self.assertEqual(self.endpoint(None, None, period=5).threshold(120), 20)
        self.assertEqual(self.endpoint(None, None).threshold(120), 120)
        self.assertEqual(self.endpoint(996, None, threshold=3).liveness(1000, 120)[0], "offline")
