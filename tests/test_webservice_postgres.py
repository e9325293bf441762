"""A ``funcx-service`` process on PostgreSQL (Debian's, started by this test run).

The storage layer runs all its cases on PostgreSQL in
``test_webservice_storage``; here a real service process uses a PostgreSQL
database for a subset of the API: login, functions, endpoints, a batch of
tasks run by a played endpoint, batch status, deduplication, isolation
between users, and a restart that keeps everything.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from funcx_endpoint.testing.service import (
    APIClient,
    EndpointPlayer,
    ServiceProcess,
    ServiceStartError,
)
from funcx_endpoint.wire import Result, deserialize, pack_payload, serialize
from tests.test_webservice_api import FUNCTION_CODE, sleep, wait_until


def _postgres_url() -> str:
    from funcx_endpoint.testing.postgres import PostgresNotInstalled, shared_postgres

    try:
        return shared_postgres().create_database()
    except PostgresNotInstalled as e:
        raise SkipTest(str(e)) from None


class PostgresServiceTests(TestCase):
    timeout = 180

    def test_api_on_postgresql(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.api_on_postgresql())

    async def api_on_postgresql(self) -> None:
        url = await deferToThread(_postgres_url)
        service = ServiceProcess(database_url=url)
        await service.start_async(reactor)
        self.addCleanup(lambda: deferToThread(service.destroy))
        self.assertIn("PostgreSQL", service.info["database"])
        self.assertNotIn(url.split("@")[0].split(":")[-1], service.info["database"])  # no password

        alice = APIClient(reactor, service)
        await alice.login(*(await service.create_client_async(reactor, "alice")))
        bob = APIClient(reactor, service)
        await bob.login(*(await service.create_client_async(reactor, "bob")))
        status, answer = await alice.post(
            "/v2/functions", {"function_name": "add", "function_code": FUNCTION_CODE}
        )
        self.assertEqual(status, 200, answer)
        function_id = answer["function_uuid"]
        status, registration = await alice.post(
            "/v2/endpoints", {"endpoint_name": "pg", "endpoint_uuid": str(uuid.uuid4())}
        )
        self.assertEqual(status, 200, registration)
        endpoint_id = registration["endpoint_id"]
        status, answer = await bob.post(
            "/v2/endpoints", {"endpoint_name": "x", "endpoint_uuid": endpoint_id}
        )
        self.assertEqual(status, 403)

        tasks = [[function_id, endpoint_id, pack_payload((i,), {"b": 1000})] for i in range(200)]
        tasks.append([function_id, endpoint_id, "broken"])
        status, submitted = await alice.post("/v2/submit", {"tasks": tasks})
        self.assertEqual(status, 200, submitted)
        codes = [r["http_status_code"] for r in submitted["results"]]
        self.assertEqual(codes, [200] * 200 + [400])
        task_ids = [r["task_uuid"] for r in submitted["results"][:200]]

        player = EndpointPlayer(reactor, registration, service.broker_ca_file)
        await player.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(player.stop()))

        async def all_done() -> Any:
            status, answer = await alice.post("/v2/batch_status", {"task_ids": task_ids})
            results = answer["results"]
            return results if all(r["status"] == "success" for r in results.values()) else None

        results = await wait_until(all_done, timeout=60)
        self.assertEqual(len(results), 200)
        self.assertEqual(
            sorted(deserialize(r["result"]) for r in results.values()), list(range(1000, 1200))
        )
        status, answer = await bob.post("/v2/batch_status", {"task_ids": task_ids})
        self.assertEqual(answer["results"], {})

        # A result published again (with other data) changes nothing.
        first = results[task_ids[0]]
        await player.publish(Result.success(task_ids[0], serialize("again")))
        await sleep(0.5)
        status, view = await alice.get(f"/v2/tasks/{task_ids[0]}")
        self.assertEqual(view, first)
        self.assertEqual(len(player.tasks), 200)

        # NUL characters, which PostgreSQL text cannot hold: refused in requests,
        # escaped in results (and the next results still flow).
        status, answer = await alice.post(
            "/v2/functions", {"function_name": "a\x00b", "function_code": FUNCTION_CODE}
        )
        self.assertEqual(status, 400, answer)
        status, submitted = await alice.post(
            "/v2/submit",
            {
                "tasks": [
                    [function_id, endpoint_id, "1\n\x00"],
                    [function_id, endpoint_id, tasks[0][2]],
                ]
            },
        )
        self.assertEqual([r["http_status_code"] for r in submitted["results"]], [400, 200])
        fresh = submitted["results"][1]["task_uuid"]
        await wait_until(lambda: len(player.tasks) == 201)
        status, view = await alice.get(f"/v2/tasks/{fresh}")
        self.assertEqual(view["status"], "success")
        player.run_tasks = False
        status, submitted = await alice.post("/v2/submit", {"tasks": [tasks[0], tasks[1]]})
        nul_task, after = [r["task_uuid"] for r in submitted["results"]]
        await wait_until(lambda: len(player.tasks) == 203)
        await player.publish(Result.failure(nul_task, "RemoteExecutionError", "x\x00y", "tb\x00"))
        await player.publish(Result.success(after, serialize(7)))

        async def after_done() -> Any:
            status, view = await alice.get(f"/v2/tasks/{after}")
            return view if view["status"] == "success" else None

        await wait_until(after_done)
        status, view = await alice.get(f"/v2/tasks/{nul_task}")
        self.assertEqual((view["status"], view["exception"]), ("failed", "tb\\x00"))

        # Everything survives a restart.
        await player.stop()
        await service.restart_async(reactor)
        alice = APIClient(reactor, service, alice.token)
        status, view = await alice.get(f"/v2/tasks/{task_ids[-1]}")
        self.assertEqual((status, deserialize(view["result"])), (200, 1199))
        status, listed = await alice.get("/v2/endpoints")
        self.assertEqual([e["endpoint_id"] for e in listed], [endpoint_id])


class BrokerRefusalTests(TestCase):
    timeout = 120

    def test_wrong_broker_password_fails_the_start(self) -> Deferred[None]:
        async def go() -> None:
            from funcx_endpoint.testing.rabbitmq import shared_node

            node = await deferToThread(shared_node)
            url = node.amqps_url.replace(node.admin_password, "wrong-password")
            service = ServiceProcess(
                args=[
                    "--port",
                    "0",
                    "--amqp-url",
                    url,
                    "--broker-ca-file",
                    node.ca_cert_path,
                    "--management-url",
                    node.management_url,
                ]
            )
            self.addCleanup(lambda: deferToThread(service.destroy))
            with self.assertRaises(ServiceStartError) as caught:
                await deferToThread(service.start, 60)
            self.assertIn("refused", str(caught.exception))
            self.assertNotIn("wrong-password", str(caught.exception))
            self.assertFalse(service.running)

        return Deferred.fromCoroutine(go())


class PostgresHarnessTests(TestCase):
    """The harness's watchdog: a test run killed with SIGKILL leaves no server."""

    timeout = 120

    def test_owner_killed_leaves_no_server(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.owner_killed())

    async def owner_killed(self) -> None:
        import json
        import os
        import signal
        import subprocess
        import sys

        import psutil

        from funcx_endpoint.testing.postgres import PostgresNotInstalled, PostgresServer

        try:
            PostgresServer._run_as()
        except PostgresNotInstalled as e:
            raise SkipTest(str(e)) from None
        owner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import json, time\n"
                "from funcx_endpoint.testing.postgres import PostgresServer\n"
                "server = PostgresServer()\n"
                "server.start()\n"
                "print(json.dumps({'pid': server._process.pid, 'base': server.base_dir}),"
                " flush=True)\n"
                "time.sleep(600)\n",
            ],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
        self.addCleanup(owner.wait)
        self.addCleanup(lambda: owner.poll() is None and owner.kill())
        assert owner.stdout is not None
        line = await deferToThread(owner.stdout.readline)
        if not line:
            raise SkipTest("the PostgreSQL harness could not start a server here")
        info = json.loads(line)
        server = psutil.Process(info["pid"])
        self.assertTrue(os.path.isdir(info["base"]))
        os.kill(owner.pid, signal.SIGKILL)
        for _ in range(300):
            gone = not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
            if gone and not os.path.exists(info["base"]):
                break
            await sleep(0.1)
        self.assertFalse(server.is_running() and server.status() != psutil.STATUS_ZOMBIE)
        self.assertFalse(os.path.exists(info["base"]))


class PostgresQuotaRetentionTests(TestCase):
    """Quotas and the deletion of finished tasks, by a service on PostgreSQL."""

    timeout = 180

    def test_quotas_and_delete(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.quotas_and_delete())

    async def quotas_and_delete(self) -> None:
        url = await deferToThread(_postgres_url)
        service = ServiceProcess(
            database_url=url, args=["--max-functions", "2", "--max-tasks-in-flight", "3"]
        )
        await service.start_async(reactor)
        self.addCleanup(lambda: deferToThread(service.destroy))
        alice = APIClient(reactor, service)
        await alice.login(*(await service.create_client_async(reactor, "alice")))
        body = {"function_name": "add", "function_code": FUNCTION_CODE}
        answers = [await alice.post("/v2/functions", body) for _ in range(3)]
        self.assertEqual([status for status, _ in answers], [200, 200, 429], answers)
        self.assertEqual(answers[2][1]["code"], "FUNCTION_QUOTA")
        function_id = answers[0][1]["function_uuid"]
        status, registration = await alice.post(
            "/v2/endpoints", {"endpoint_name": "pg", "endpoint_uuid": str(uuid.uuid4())}
        )
        self.assertEqual(status, 200, registration)
        endpoint_id = registration["endpoint_id"]
        task = [function_id, endpoint_id, pack_payload((1,), {"b": 2})]
        status, submitted = await alice.post("/v2/submit", {"tasks": [task] * 3})
        self.assertEqual(status, 200, submitted)
        task_ids = [r["task_uuid"] for r in submitted["results"]]
        status, answer = await alice.post("/v2/submit", {"tasks": [task]})
        self.assertEqual((status, answer["code"]), (429, "TASK_QUOTA"))

        status, answer = await alice.delete(f"/v2/tasks/{task_ids[0]}")
        self.assertEqual((status, answer["code"]), (409, "TASK_NOT_FINISHED"))
        player = EndpointPlayer(reactor, registration, service.broker_ca_file)
        await player.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(player.stop()))

        async def done() -> Any:
            status, view = await alice.get(f"/v2/tasks/{task_ids[0]}")
            return view if view["status"] == "success" else None

        await wait_until(done, timeout=60)
        status, answer = await alice.delete(f"/v2/tasks/{task_ids[0]}")
        self.assertEqual((status, answer), (200, {"task_id": task_ids[0], "deleted": True}))
        status, answer = await alice.get(f"/v2/tasks/{task_ids[0]}")
        self.assertEqual((status, answer["code"]), (404, "TASK_NOT_FOUND"))

        # Finished tasks made room.
        async def all_done() -> Any:
            status, answer = await alice.post("/v2/batch_status", {"task_ids": task_ids[1:]})
            return all(r["status"] == "success" for r in answer["results"].values())

        await wait_until(all_done, timeout=60)
        status, answer = await alice.post("/v2/submit", {"tasks": [task] * 3})
        self.assertEqual(status, 200, answer)
