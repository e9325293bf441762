"""Per-user quotas and retention of finished tasks.

Through the real API in this process on a Clock
(:class:`~funcx_endpoint.testing.inprocess.InProcessService`, SQLite), and the
storage functions on SQLite and on a real PostgreSQL server.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.webservice import storage, tasks
from funcx_endpoint.webservice.quotas import Quotas, user_usage
from funcx_endpoint.webservice.records import IncomingResult, NewTask
from funcx_endpoint.webservice.retention import (
    delete_finished_task,
    mark_fetched,
    purge_tasks,
)
from funcx_endpoint.wire import pack_buffers, pack_function, pack_payload
from tests.support import function_row
from tests.test_webservice_clock import ClockedServiceTestCase

DAY = 24 * 3600.0


def add(a, b=1):
    return a + b


CODE = pack_function(add)
PAYLOAD = pack_payload((1,), {"b": 2})


class APITestCase(ClockedServiceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.addCleanup(self.clock.advance, 0)  # reports sent are stored first
        self.token = self.service.issue_token()

    def call(self, method: str, path: str, body: Any = None) -> Tuple[int, Any, Any]:
        kwargs: Dict[str, Any] = {"headers": {"Authorization": f"Bearer {self.token}"}}
        if body is not None:
            kwargs["json"] = body
        d = self.http.request(method, "https://funcx.example" + path, **kwargs)
        self.http.flush()
        response = self.successResultOf(d)
        return (
            response.code,
            self.successResultOf(self.http.json_content(response)),
            response.headers,
        )

    def function(self, code: str = CODE) -> Tuple[int, Any]:
        status, answer, _ = self.call(
            "POST", "/v2/functions", {"function_name": "add", "function_code": code}
        )
        return status, answer

    def submit(self, function_id: str, endpoint_id: str, n: int, payload: str = PAYLOAD) -> Any:
        return self.call("POST", "/v2/submit", {"tasks": [[function_id, endpoint_id, payload]] * n})


class QuotaTests(APITestCase):
    options = {"quotas": Quotas(functions=3, stored_bytes=20_000, endpoints=2, tasks_in_flight=5)}

    def test_functions(self) -> None:
        for _ in range(3):
            self.assertEqual(self.function()[0], 200)
        status, answer = self.function()
        self.assertEqual((status, answer["code"]), (429, "FUNCTION_QUOTA"))
        self.assertEqual((answer["quota"], answer["usage"]), (3, 3))
        self.assertIn("the quota is 3", answer["message"])
        self.assertEqual(len(self.service.functions), 3)
        # Another user has a quota of its own.
        self.token = self.service.issue_token("bob")
        self.assertEqual(self.function()[0], 200)

    def test_stored_bytes_of_functions(self) -> None:
        big = pack_buffers(["01\n" + "A" * 15_000])
        self.assertEqual(self.function(big)[0], 200)
        status, answer = self.function(big)
        self.assertEqual((status, answer["code"]), (413, "STORAGE_QUOTA"))
        self.assertIn("over the quota of 20000 bytes", answer["message"])
        self.assertEqual(len(self.service.functions), 1)

    def test_endpoints(self) -> None:
        first = self.service.add_endpoint()
        self.service.add_endpoint()
        status, answer, _ = self.call(
            "POST",
            "/v2/endpoints",
            {"endpoint_name": "x", "endpoint_uuid": str(uuid.uuid4()), "metadata": {}},
        )
        self.assertEqual((status, answer["code"]), (429, "ENDPOINT_QUOTA"))
        self.assertIn("delete endpoints no longer used", answer["message"])
        # Registering one it has again is no new endpoint.
        self.service.add_endpoint(first)
        # A deleted one makes room.
        status, _, _ = self.call("DELETE", f"/v2/endpoints/{first}")
        self.assertEqual(status, 200)
        self.service.add_endpoint()

    def test_tasks_in_flight(self) -> None:
        endpoint_id = self.service.add_endpoint()
        function_id = self.function()[1]["function_uuid"]
        status, answer, _ = self.submit(function_id, endpoint_id, 4)
        self.assertEqual(status, 200, answer)
        status, answer, headers = self.submit(function_id, endpoint_id, 2)
        self.assertEqual((status, answer["code"]), (429, "TASK_QUOTA"))
        self.assertEqual(headers.getRawHeaders("retry-after"), ["10"])
        self.assertIn("nothing was submitted", answer["message"])
        self.assertEqual(len(self.service.tasks), 4)
        # A finished task makes room.
        task_id = next(iter(self.service.tasks))
        self.service.run_task(task_id)
        self.clock.advance(0)
        self.assertEqual(self.service.tasks[task_id].status, "success")
        status, answer, _ = self.submit(function_id, endpoint_id, 2)
        self.assertEqual(status, 200, answer)
        self.assertEqual(len(self.service.tasks), 6)

    def test_payload_bytes(self) -> None:
        endpoint_id = self.service.add_endpoint()
        function_id = self.function()[1]["function_uuid"]
        payload = pack_payload(("x" * 12_000,), {})
        self.assertEqual(self.submit(function_id, endpoint_id, 1, payload)[0], 200)
        status, answer, _ = self.submit(function_id, endpoint_id, 1, payload)
        self.assertEqual((status, answer["code"]), (413, "STORAGE_QUOTA"))
        self.assertEqual(len(self.service.tasks), 1)


class RetentionTests(APITestCase):
    options = {"task_retention": 7 * DAY, "fetched_result_retention": 3600.0}

    def finished_task(self) -> str:
        endpoint_id = self.service.add_endpoint()
        function_id = self.function()[1]["function_uuid"]
        task_id = str(self.submit(function_id, endpoint_id, 1)[1]["results"][0]["task_uuid"])
        self.service.run_task(task_id)
        self.clock.advance(0)
        return task_id

    def test_finished_tasks_expire(self) -> None:
        task_id = self.finished_task()
        self.clock.advance(7 * DAY - 120)
        self.assertIn(task_id, self.service.tasks)
        self.clock.advance(180)
        self.assertNotIn(task_id, self.service.tasks)
        self.token = self.service.issue_token()
        status, answer, _ = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertEqual((status, answer["code"]), (404, "TASK_NOT_FOUND"))
        assert self.service.retention is not None
        self.assertEqual(self.service.retention.purged, 1)

    def test_unfinished_tasks_stay(self) -> None:
        endpoint_id = self.service.add_endpoint()
        function_id = self.function()[1]["function_uuid"]
        self.submit(function_id, endpoint_id, 1)
        self.clock.advance(30 * DAY)
        self.assertEqual(len(self.service.tasks), 1)

    def test_fetched_results_expire_sooner(self) -> None:
        task_id = self.finished_task()
        status, answer, _ = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertEqual((status, answer["status"]), (200, "success"))
        self.clock.advance(1800)
        # Fetched again within the hour: still there.
        status, answer, _ = self.call("POST", "/v2/batch_status", {"task_ids": [task_id]})
        self.assertIn(task_id, answer["results"])
        self.clock.advance(1860)
        self.assertNotIn(task_id, self.service.tasks)

    def test_batch_status_counts_as_fetch(self) -> None:
        task_id = self.finished_task()
        self.call("POST", "/v2/batch_status", {"task_ids": [task_id]})
        self.clock.advance(3700)
        self.assertNotIn(task_id, self.service.tasks)

    def test_delete_a_finished_task(self) -> None:
        task_id = self.finished_task()
        status, answer, _ = self.call("DELETE", f"/v2/tasks/{task_id}")
        self.assertEqual((status, answer), (200, {"task_id": task_id, "deleted": True}))
        self.assertNotIn(task_id, self.service.tasks)
        status, answer, _ = self.call("DELETE", f"/v2/tasks/{task_id}")
        self.assertEqual((status, answer["code"]), (404, "TASK_NOT_FOUND"))

    def test_delete_refusals(self) -> None:
        endpoint_id = self.service.add_endpoint()
        function_id = self.function()[1]["function_uuid"]
        task_id = self.submit(function_id, endpoint_id, 1)[1]["results"][0]["task_uuid"]
        status, answer, _ = self.call("DELETE", f"/v2/tasks/{task_id}")
        self.assertEqual((status, answer["code"]), (409, "TASK_NOT_FINISHED"))
        self.service.run_task(task_id)
        self.clock.advance(0)
        self.token = self.service.issue_token("mallory")
        status, answer, _ = self.call("DELETE", f"/v2/tasks/{task_id}")
        self.assertEqual((status, answer["code"]), (404, "TASK_NOT_FOUND"))
        self.assertIn(task_id, self.service.tasks)


# ---------------------------------------------------------------------------
# the storage functions on both databases


class StorageCases:
    make_url: Callable[[], str]

    def setUp(self) -> None:
        self.url = self.make_url()
        self.connection, self.call = storage.open_sync(self.url)
        self.addCleanup(self.connection.close)  # type: ignore[attr-defined]

    def task(self, owner: str, function_id: str, payload: str = "p" * 10) -> str:
        task_id = str(uuid.uuid4())
        self.call(tasks.insert_tasks)(
            [NewTask(task_id, owner, function_id, "e1", "g", payload, None, 100.0)]
        )
        return task_id

    def finish(self, task_id: str, now: Optional[float]) -> None:
        self.call(tasks.store_results)(
            [IncomingResult(task_id, "e1", "00\nresult", None, None, "1.0")], now
        )

    def function(self, owner: str, code: str = CODE) -> str:
        function_id = str(uuid.uuid4())
        self.call(tasks.insert_function)(function_row(function_id, owner, code=code))
        return function_id

    def test_usage(self) -> None:
        assertEqual = self.assertEqual  # type: ignore[attr-defined]
        f = self.function("alice", "x" * 100)
        self.function("alice", "é" * 10)  # 20 bytes in UTF-8
        self.function("bob")
        done = self.task("alice", f, "y" * 1000)
        self.task("alice", f, "z" * 7)
        self.finish(done, 5.0)
        usage = self.call(user_usage)("alice")
        assertEqual(
            (usage.functions, usage.function_bytes, usage.tasks_in_flight, usage.task_bytes),
            (2, 120, 1, 7),
        )
        assertEqual(usage.stored_bytes, 127)
        assertEqual(self.call(user_usage)("nobody").stored_bytes, 0)

    def test_purge(self) -> None:
        assertEqual = self.assertEqual  # type: ignore[attr-defined]
        f = self.function("alice")
        old, recent, fetched, running = (self.task("alice", f) for _ in range(4))
        self.finish(old, 100.0)
        self.finish(recent, 900.0)
        self.finish(fetched, 900.0)
        # Only finished tasks get a fetch time; the running one is not marked.
        assertEqual(self.call(mark_fetched)([fetched, running], 950.0), 1)
        assertEqual(self.call(mark_fetched)([fetched], 960.0), 0)  # the first fetch counts
        # finished before 500, or fetched before 955: old and fetched.
        assertEqual(self.call(purge_tasks)(500.0, 955.0, 10), 2)
        left = self.call(tasks.get_tasks)([old, recent, fetched, running], "alice")
        assertEqual(sorted(left), sorted([recent, running]))
        # In batches.
        more = [self.task("alice", f) for _ in range(5)]
        for t in more:
            self.finish(t, 100.0)
        assertEqual(self.call(purge_tasks)(500.0, 0.0, 3), 3)
        assertEqual(self.call(purge_tasks)(500.0, 0.0, 3), 2)

    def test_pending_copy_is_kept(self) -> None:
        f = self.function("alice")
        task_id = str(uuid.uuid4())
        self.call(tasks.insert_tasks)([NewTask(task_id, "alice", f, "e1", "g", "p", "q", 1.0)])
        self.finish(task_id, 1.0)
        self.assertEqual(self.call(purge_tasks)(500.0, 0.0, 10), 0)  # type: ignore[attr-defined]
        self.call(tasks.mark_copied)([task_id])
        self.assertEqual(self.call(purge_tasks)(500.0, 0.0, 10), 1)  # type: ignore[attr-defined]

    def test_delete_finished_task(self) -> None:
        assertEqual = self.assertEqual  # type: ignore[attr-defined]
        f = self.function("alice")
        done, running = self.task("alice", f), self.task("alice", f)
        self.finish(done, 1.0)
        assertEqual(self.call(delete_finished_task)(done, "bob"), None)
        assertEqual(self.call(delete_finished_task)(running, "alice"), False)
        assertEqual(self.call(delete_finished_task)(done, "alice"), True)
        assertEqual(self.call(delete_finished_task)(done, "alice"), None)


class SQLiteQuotaStorageTests(StorageCases, SynchronousTestCase):
    def make_url(self) -> str:
        import os

        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return f"sqlite://{path}/db.sqlite3"


class PostgresQuotaStorageTests(StorageCases, SynchronousTestCase):
    def make_url(self) -> str:
        from funcx_endpoint.testing.postgres import PostgresNotInstalled, shared_postgres

        try:
            return shared_postgres().create_database()
        except PostgresNotInstalled as e:
            raise SkipTest(str(e)) from None
