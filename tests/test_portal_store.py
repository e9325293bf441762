"""The portal's queries (:mod:`funcx_endpoint.portal.store`) on SQLite and on a real
PostgreSQL server (the shared one, a database of its own; skipped without it)."""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.portal import store
from funcx_endpoint.webservice import accounts, endpoints, tasks
from funcx_endpoint.webservice.records import IncomingResult, NewTask, Report
from funcx_endpoint.webservice.storage import open_sync
from tests.support import function_row

NOW = 1_000_000.0


class StoreTestsMixin:
    database_url: Any

    def setUp(self) -> None:
        self.connection, self.call = open_sync(self.database_url())
        self.addCleanup(self.connection.close)  # type: ignore[attr-defined]
        self.alice = self.call(accounts.create_client)(str(uuid.uuid4()), "alice", "!", NOW)
        self.bob = self.call(accounts.create_client)(str(uuid.uuid4()), "bob", "!", NOW)
        self.endpoint = str(uuid.uuid4())
        self.call(endpoints.save_registration)(
            self.endpoint, self.alice.identity_id, "ep", {}, None, 30.0, None, "u", "p", None, NOW
        )

    def test_sessions_and_links(self) -> None:
        call = self.call
        call(store.insert_session)(
            "h", self.alice.identity_id, self.alice.client_id, "c", NOW, NOW + 10
        )
        found = call(store.find_session)("h", NOW + 1)
        self.assertEqual((found.csrf, found.username), ("c", "alice@funcx-service"))  # type: ignore[attr-defined]
        self.assertIsNone(call(store.find_session)("h", NOW + 10))
        self.assertEqual(call(store.revoke_sessions)(self.alice.identity_id), 1)
        self.assertIsNone(call(store.find_session)("h", NOW + 1))
        call(store.insert_link)("l", self.alice.identity_id, self.alice.client_id, NOW, NOW + 60)
        self.assertEqual(
            call(store.use_link)("l", NOW + 1), (self.alice.identity_id, self.alice.client_id)
        )
        self.assertIsNone(call(store.use_link)("l", NOW + 2))
        self.assertEqual(call(store.active_client_named)("bob").client_id, self.bob.client_id)
        self.assertEqual(call(store.purge)(NOW + 3600 * 2), 2)

    def test_tasks_functions_history(self) -> None:
        call = self.call
        owner = self.alice.identity_id
        function_id = str(uuid.uuid4())
        call(tasks.insert_function)(function_row(function_id, owner, name="<f>", created=NOW))
        ids = [str(uuid.uuid4()) for _ in range(130)]
        group = str(uuid.uuid4())
        call(tasks.insert_tasks)(
            [
                NewTask(t, owner, function_id, self.endpoint, group, "p", None, NOW + i)
                for i, t in enumerate(ids)
            ]
        )
        results = [IncomingResult(t, self.endpoint, "00\nx", None, None, "1") for t in ids[:70]]
        call(tasks.store_results)(results[:40], NOW + 100)
        call(tasks.store_results)(results[40:], NOW + 190)
        page, total = call(store.list_tasks)(owner, 50, 100, None, None)
        self.assertEqual(total, 130)
        self.assertEqual([t.task_id for t in page], list(reversed(ids[:30])))
        self.assertEqual(page[0].function_name, "<f>")
        self.assertEqual(call(store.list_tasks)(self.bob.identity_id, 50, 0, None, None), ([], 0))
        grouped, _ = call(store.list_tasks)(owner, 5, 0, self.endpoint, group)
        self.assertEqual([t.task_id for t in grouped], ids[:5])
        self.assertIsNone(call(store.task_row)(ids[0], self.bob.identity_id))
        self.assertEqual(call(store.task_row)(ids[0], owner).result, "00\nx")
        self.assertEqual(set(call(store.tasks_by_id)(ids[:3], owner)), set(ids[:3]))
        self.assertEqual(
            call(store.finished_per_bin)(self.endpoint, NOW + 60, 60.0), {0: 40, 2: 30}
        )
        self.assertEqual([f.name for f in call(store.list_functions)(owner)], ["<f>"])
        call(endpoints.record_reports)(
            [
                Report(
                    self.endpoint,
                    {"managers": 1, "total_workers": 4.0, "idle_workers": "x"},
                    {},
                    False,
                    NOW,
                )
            ],
            20,
        )
        self.assertEqual(call(store.status_history)(self.endpoint, 0.0), [(NOW, 1, 4, 0, 0)])

    def _function(self, owner: str) -> str:
        function_id = str(uuid.uuid4())
        self.call(tasks.insert_function)(function_row(function_id, owner, created=NOW))
        return function_id

    def test_attempts(self) -> None:
        call = self.call
        owner = self.alice.identity_id
        function_id = self._function(owner)
        ids = [str(uuid.uuid4()) for _ in range(3)]
        call(tasks.insert_tasks)(
            [NewTask(t, owner, function_id, self.endpoint, "g", "p", None, NOW) for t in ids]
        )
        # Unknown until a result says.
        self.assertIsNone(call(store.task_row)(ids[0], owner).attempts)
        call(tasks.store_results)(
            [
                IncomingResult(ids[0], self.endpoint, "00\nx", None, None, "1", attempts=2),
                IncomingResult(ids[1], self.endpoint, "00\nx", None, None, "1"),
                IncomingResult(ids[2], self.endpoint, "E", "Boom", "b", "1", None, 1),
            ],
            NOW + 1,
        )
        # A later result of a finished task changes nothing.
        call(tasks.store_results)(
            [IncomingResult(ids[0], self.endpoint, "00\ny", None, None, "2", attempts=5)]
        )
        self.assertEqual(call(store.task_row)(ids[0], owner).attempts, 2)
        page, _ = call(store.list_tasks)(owner, 50, 0, None, None)
        self.assertEqual({t.task_id: t.attempts for t in page}, dict(zip(ids, [2, None, 1])))
        found = call(store.tasks_by_id)(ids, owner)
        self.assertEqual([found[t].attempts for t in ids], [2, None, 1])
        views = call(tasks.get_tasks)(ids, owner)
        self.assertEqual(views[ids[0]]["attempts"], 2)
        self.assertNotIn("attempts", views[ids[1]])
        self.assertEqual(views[ids[2]]["attempts"], 1)

    def test_attempts_column_added_to_existing_tasks(self) -> None:
        from funcx_endpoint.webservice import db

        url = self.database_url()
        config = db.DatabaseConfig.from_url(url)
        saved = db.MIGRATIONS, db.SCHEMA_VERSION
        db.MIGRATIONS, db.SCHEMA_VERSION = db.MIGRATIONS[:7], 7
        try:
            self.assertEqual(db.migrate(config), (0, 7))
        finally:
            db.MIGRATIONS, db.SCHEMA_VERSION = saved
        connection = db.connect(config)
        self.addCleanup(connection.close)  # type: ignore[attr-defined]
        cursor = connection.cursor()
        cursor.execute(
            "INSERT INTO tasks (task_id, owner, function_id, endpoint_id, task_group_id, "
            "status, created) VALUES ('t', 'o', 'f', 'e', 'g', 'success', 1.0)"
        )
        connection.commit()
        self.assertEqual(db.migrate(config), (7, db.SCHEMA_VERSION))
        cursor.execute("SELECT attempts FROM tasks WHERE task_id = 't'")
        self.assertEqual(cursor.fetchone()[0], None)
        connection.commit()


class SQLiteStoreTests(StoreTestsMixin, SynchronousTestCase):
    def database_url(self) -> str:
        return "sqlite:///" + os.path.abspath(self.mktemp()) + "/db.sqlite3"


class PostgreSQLStoreTests(StoreTestsMixin, SynchronousTestCase):
    def database_url(self) -> str:
        from funcx_endpoint.testing.postgres import PostgresNotInstalled, shared_postgres

        try:
            return str(shared_postgres().create_database())
        except PostgresNotInstalled as e:
            raise SkipTest(str(e)) from None
