"""Tests for funcx_endpoint.sdk.client: FuncXClient against the service's real API.

The service's API runs in the test process (funcx_endpoint.testing.inprocess:
the real resource, storage on SQLite and auth, on a fake broker) and is served
over real sockets on 127.0.0.1 by the test reactor: the SDK blocks (globus-sdk
on requests), so it cannot use treq's in-memory StubTreq.  It runs in the
reactor's thread pool (deferToThread), so every request really goes over HTTP.
The test case keeps its old name, and the service its attribute name ``fake``.
"""

from __future__ import annotations

import os
import ssl
import time
import uuid
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, TypeVar

import globus_sdk
import requests
import urllib3.exceptions
from globus_sdk.transport import RetryCheckResult

try:
    from globus_sdk.transport import RetryConfig
except ImportError:  # globus-sdk 3.x
    RetryConfig = None  # type: ignore[assignment,misc]
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from funcx_endpoint import tls
from funcx_endpoint.sdk.client import FuncXClient
from funcx_endpoint.sdk.errors import (
    BatchSubmissionError,
    FuncxAPIError,
    LoginError,
    MalformedResponse,
    TaskExecutionFailed,
    TaskPending,
    TaskRefused,
    VersionMismatch,
)
from funcx_endpoint.sdk.retries import submit_retry_check, tls_verification_retry_check
from funcx_endpoint.sdk.tasks import Batch
from funcx_endpoint.testing.inprocess import FUNCX_SCOPE, InProcessService, ServedService
from funcx_endpoint.wire import deserialize, unpack_buffers
from funcx_endpoint.wire.runtime import local_runtime

T = TypeVar("T")


def double(x):
    return 2 * x


def add(a, b=1):
    return a + b


def boom(n):
    raise ValueError(f"bad {n}")


def fast_retries(max_retries: int = 2, backoff: float = 0.01) -> Dict[str, Any]:
    """Client arguments for globus-sdk retries with a short fixed back-off.

    globus-sdk 4 takes a RetryConfig; 3.x takes transport_params.
    """
    if RetryConfig is None:
        return {
            "transport_params": {"max_retries": max_retries, "retry_backoff": lambda c: backoff}
        }
    return {"retry_config": RetryConfig(max_retries=max_retries, backoff=lambda c: backoff)}


def set_env(test: SynchronousTestCase, **values: Optional[str]) -> None:
    """Set (or with None, unset) environment variables for one test."""
    for name, value in values.items():
        old = os.environ.get(name)

        def restore(name: str = name, old: Optional[str] = old) -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        test.addCleanup(restore)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


#: Variables that would change how a client finds the service or logs in.
CLEAN_ENV: Dict[str, Optional[str]] = {
    "FUNCX_SERVICE_ADDRESS": None,
    "FUNCX_SERVICE_CA_FILE": None,
    "FUNCX_SDK_ENVIRONMENT": None,
    "FUNCX_SDK_CLIENT_ID": None,
    "FUNCX_SDK_CLIENT_SECRET": None,
    "FUNCX_SCOPE": None,
    "GLOBUS_SDK_SERVICE_URL_AUTH": None,
    "GLOBUS_SDK_VERIFY_SSL": None,
    "GLOBUS_SDK_ENVIRONMENT": None,
}


class FakeServiceTestCase(TestCase):
    """Serves the funcX service's API (in this process) and makes clients for it."""

    timeout = 60

    fake: InProcessService
    served: ServedService

    def setUp(self) -> None:
        set_env(self, **CLEAN_ENV)

    def serve(self, tls_files: Optional[tls.TLSFiles] = None, **kwargs: Any) -> InProcessService:
        self.fake = InProcessService(self.mktemp(), reactor, **kwargs)
        self.fake.startService()
        self.addCleanup(self.fake.stopService)
        self.served = self.fake.listen(tls_files=tls_files)
        self.addCleanup(self.served.stop)
        return self.fake

    def make_client(
        self, token: Optional[str] = None, retries: int = 2, backoff: float = 0.01, **kwargs: Any
    ) -> FuncXClient:
        kwargs.update(fast_retries(retries, backoff))
        if "authorizer" not in kwargs:
            kwargs["authorizer"] = globus_sdk.AccessTokenAuthorizer(
                token or self.fake.issue_token()
            )
        client = FuncXClient(self.served.service_address, **kwargs)
        self.addCleanup(client.close)
        return client

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking SDK call in a thread while the reactor serves the fake."""
        result: T = await deferToThread(fn, *args, **kwargs)
        return result

    async def failure(
        self, error_type: type[BaseException], fn: Callable[..., Any], *args: Any
    ) -> Any:
        """Run ``fn`` in a thread and return the ``error_type`` it must raise."""
        try:
            await deferToThread(fn, *args)
        except error_type as error:
            return error
        self.fail(f"{fn} did not raise {error_type.__name__}")


class ServiceAddressTests(SynchronousTestCase):
    """Where the client finds the service and its CA (no network)."""

    def setUp(self) -> None:
        set_env(self, **CLEAN_ENV)

    def client(self, *args: Any, **kwargs: Any) -> FuncXClient:
        client = FuncXClient(*args, authorizer=globus_sdk.NullAuthorizer(), **kwargs)
        self.addCleanup(client.close)
        return client

    def test_default(self) -> None:
        """Without any setting the public service is used."""
        self.assertEqual(self.client().funcx_service_address, "https://api2.funcx.org/v2")

    def test_argument_wins(self) -> None:
        """The argument beats FUNCX_SERVICE_ADDRESS; a trailing slash is dropped."""
        set_env(self, FUNCX_SERVICE_ADDRESS="https://env.example/v2")
        self.assertEqual(
            self.client("https://arg.example/v2/").funcx_service_address, "https://arg.example/v2"
        )
        self.assertEqual(self.client().funcx_service_address, "https://env.example/v2")

    def test_environment(self) -> None:
        """funcX 1.0 environment names still select their services."""
        self.assertEqual(
            self.client(environment="local").funcx_service_address, "http://localhost:5000/v2"
        )
        set_env(self, FUNCX_SDK_ENVIRONMENT="dev")
        self.assertEqual(self.client().funcx_service_address, "https://api.dev.funcx.org/v2")
        self.assertRaises(ValueError, self.client, environment="nowhere")

    def test_ca_file(self) -> None:
        """ca_file, else FUNCX_SERVICE_CA_FILE, sets what TLS verifies with."""
        ca = self.mktemp()
        with open(ca, "w") as f:
            f.write("not used\n")
        self.assertEqual(self.client(ca_file=ca).transport.verify_ssl, ca)
        set_env(self, FUNCX_SERVICE_CA_FILE=ca)
        self.assertEqual(self.client().transport.verify_ssl, ca)
        self.assertRaises(ValueError, self.client, ca_file=ca + ".missing")

    def test_globus_sdk_verify_setting(self) -> None:
        """Without a CA file globus-sdk's GLOBUS_SDK_VERIFY_SSL applies."""
        set_env(self, GLOBUS_SDK_VERIFY_SSL="false")
        self.assertIs(self.client().transport.verify_ssl, False)

    def test_http_timeout(self) -> None:
        """http_timeout reaches the transport."""
        self.assertEqual(self.client(http_timeout=7).transport.http_timeout, 7)

    def test_user_agent(self) -> None:
        """The User-Agent names the funcX API version spoken (the service parses it)."""
        self.assertIn("funcx-sdk-1.0.13", self.client().transport.user_agent)

    def test_batch_add_forms(self) -> None:
        """Batch.add takes the ids as keywords, or positionally as funcX 1.0.13 did."""
        function_id, endpoint_id = str(uuid.uuid4()), str(uuid.uuid4())
        batch = Batch()
        batch.add(1, 2, endpoint_id=endpoint_id, function_id=function_id, c=3)
        batch.add(function_id, endpoint_id, (1, 2), {"c": 3})
        batch.add(function_id, endpoint_id, kwargs={"c": 3}, args=[1, 2])
        batch.add_task(function_id, endpoint_id, (1, 2), {"c": 3})
        first, *others = batch.tasks
        self.assertEqual(first[:2], [function_id, endpoint_id])
        self.assertEqual([deserialize(p) for p in unpack_buffers(first[2])], [(1, 2), {"c": 3}])
        self.assertEqual(others, [first] * 3)
        self.assertRaises(TypeError, batch.add, 1, endpoint_id=endpoint_id)
        self.assertRaises(TypeError, batch.add, function_id)
        self.assertRaises(TypeError, batch.add, function_id, endpoint_id, (), {}, 5)

    def test_ids_checked(self) -> None:
        """Ids that are not UUIDs are refused before anything is sent."""
        batch = Batch()
        self.assertRaises(
            ValueError,
            lambda: batch.add(1, endpoint_id="../x", function_id=str(uuid.uuid4())),
        )
        self.assertEqual(len(batch), 0)


class VersionAndFunctionTests(FakeServiceTestCase):
    async def test_version_check(self) -> None:
        """GET /version?service=all; the answer is returned."""
        self.serve()
        client = self.make_client()
        data = await self.call(client.version_check)
        self.assertEqual(data["min_sdk_version"], "1.0.0")
        [request] = self.fake.requests_to("GET", "/v2/version")
        self.assertEqual(request.query, {"service": ["all"]})

    async def test_version_mismatch(self) -> None:
        """A service needing a newer SDK raises VersionMismatch (also at construction)."""
        self.serve(min_sdk_version="9.1")
        client = self.make_client()
        error = await self.failure(VersionMismatch, client.version_check)
        self.assertEqual(error.min_version, "9.1")
        await self.failure(VersionMismatch, lambda: self.make_client(do_version_check=True))

    async def test_register_function(self) -> None:
        """POST /functions carries the packed function and the funcX 1.0 fields."""
        self.serve()
        token = self.fake.issue_token()
        client = self.make_client(token)
        function_id = await self.call(
            client.register_function, add, description="adds", public=True
        )
        self.assertIn(function_id, self.fake.functions)
        [request] = self.fake.requests_to("POST", "/v2/functions")
        self.assertEqual(request.headers["authorization"], f"Bearer {token}")
        self.assertTrue(request.headers["content-type"].startswith("application/json"))
        body = request.body
        self.assertEqual(
            {k: v for k, v in body.items() if k != "function_code"},
            {
                "function_name": "add",
                "entry_point": "add",
                "container_uuid": None,
                "description": "adds",
                "public": True,
                "group": None,
            },
        )
        [packed] = unpack_buffers(body["function_code"])
        self.assertEqual(deserialize(packed)(2, b=5), 7)


class SubmitTests(FakeServiceTestCase):
    async def setup_function(self) -> tuple[FuncXClient, str, str]:
        self.serve()
        client = self.make_client()
        endpoint_id = self.fake.add_endpoint()
        function_id = await self.call(client.register_function, add)
        return client, endpoint_id, function_id

    async def test_run_body(self) -> None:
        """run() sends one task: [function_id, endpoint_id, payload of args/kwargs]."""
        client, endpoint_id, function_id = await self.setup_function()
        client.user_runtime = {}  # no versions announced: funcX 1.0's body (next test)
        task_id = await self.call(
            lambda: client.run(3, b=4, endpoint_id=endpoint_id, function_id=function_id)
        )
        [request] = self.fake.requests_to("POST", "/v2/submit")
        [task] = request.body["tasks"]
        self.assertEqual(
            request.body,
            {
                "task_group_id": client.session_task_group_id,
                "create_websocket_queue": False,
                "tasks": [[function_id, endpoint_id, task[2]]],
            },
        )
        args, kwargs = (deserialize(part) for part in unpack_buffers(task[2]))
        self.assertEqual((args, kwargs), ((3,), {"b": 4}))
        self.assertEqual(self.fake.tasks[task_id].payload, task[2])

    async def test_run_body_announces_versions(self) -> None:
        """run() announces the client's Python and dill versions (``user_runtime``)."""
        client, endpoint_id, function_id = await self.setup_function()
        await self.call(lambda: client.run(3, endpoint_id=endpoint_id, function_id=function_id))
        [request] = self.fake.requests_to("POST", "/v2/submit")
        self.assertEqual(request.body["user_runtime"], local_runtime())

    async def test_batch_run_order(self) -> None:
        """batch_run answers one id per task, in the order the tasks were added."""
        client, endpoint_id, function_id = await self.setup_function()
        batch = client.create_batch()
        for i in range(5):
            batch.add(i, endpoint_id=endpoint_id, function_id=function_id)
        task_ids = await self.call(client.batch_run, batch)
        self.assertEqual(len(task_ids), 5)
        for task_id in task_ids:
            self.fake.run_task(task_id)
        results = [await self.call(client.get_result, task_id) for task_id in task_ids]
        self.assertEqual(results, [1, 2, 3, 4, 5])
        [request] = self.fake.requests_to("POST", "/v2/submit")
        self.assertEqual(len(request.body["tasks"]), 5)

    async def test_batch_task_group(self) -> None:
        """A batch's own task group id is sent; get_taskgroup_tasks lists its tasks."""
        client, endpoint_id, function_id = await self.setup_function()
        group = "0b5a31d5-5a1f-4c57-9dfb-8f4b27d44a1e"
        batch = client.create_batch(task_group_id=group)
        batch.add(1, endpoint_id=endpoint_id, function_id=function_id)
        batch.add(2, endpoint_id=endpoint_id, function_id=function_id)
        task_ids = await self.call(client.batch_run, batch)
        tasks = await self.call(client.get_taskgroup_tasks, group)
        self.assertEqual([t["id"] for t in tasks], task_ids)
        [request] = self.fake.requests_to("POST", "/v2/submit")
        self.assertEqual(request.body["task_group_id"], group)

    async def test_refused_task_keeps_created_ids(self) -> None:
        """A per-task 404 raises an error naming the task and reason, with the other ids."""
        client, endpoint_id, function_id = await self.setup_function()
        unknown = "7d1e2c3b-0000-4000-8000-000000000000"
        batch = client.create_batch()
        batch.add(1, endpoint_id=endpoint_id, function_id=function_id)
        batch.add(2, endpoint_id=endpoint_id, function_id=unknown)
        batch.add(3, endpoint_id=endpoint_id, function_id=function_id)
        error = await self.failure(BatchSubmissionError, client.batch_run, batch)
        self.assertEqual(len(error.task_ids), 3)
        self.assertIsNone(error.task_ids[1])
        self.assertEqual(error.created_task_ids, [error.task_ids[0], error.task_ids[2]])
        for task_id in error.created_task_ids:
            self.assertIn(task_id, self.fake.tasks)
        [failure] = error.failures
        self.assertEqual((failure.index, failure.http_status), (1, 404))
        self.assertIn(unknown, failure.reason)
        self.assertIn("task 1", str(error))
        self.assertIn(unknown, str(error))

    async def test_run_refused(self) -> None:
        """run() of a refused task raises TaskRefused with the reason."""
        client, _endpoint_id, function_id = await self.setup_function()
        unknown_endpoint = "7d1e2c3b-0000-4000-8000-000000000001"
        error = await self.failure(
            TaskRefused,
            lambda: client.run(1, endpoint_id=unknown_endpoint, function_id=function_id),
        )
        self.assertEqual(error.http_status, 404)
        self.assertIn(unknown_endpoint, error.reason)

    async def test_whitelist_refusal(self) -> None:
        """A function not on the endpoint's whitelist is refused (403) per task."""
        client, endpoint_id, function_id = await self.setup_function()
        other = await self.call(client.register_function, double)
        await self.call(client.add_to_whitelist, endpoint_id, [other])
        error = await self.failure(
            TaskRefused,
            lambda: client.run(1, endpoint_id=endpoint_id, function_id=function_id),
        )
        self.assertEqual(error.http_status, 403)

    async def test_empty_batch(self) -> None:
        """An empty batch sends nothing."""
        client, _endpoint_id, _function_id = await self.setup_function()
        self.assertEqual(await self.call(client.batch_run, client.create_batch()), [])
        self.assertEqual(self.fake.requests_to("POST", "/v2/submit"), [])


class ResultTests(FakeServiceTestCase):
    async def submit(self, fn: Callable[..., Any], *args: Any) -> tuple[FuncXClient, List[str]]:
        self.serve()
        client = self.make_client()
        endpoint_id = self.fake.add_endpoint()
        function_id = await self.call(client.register_function, fn)
        batch = client.create_batch()
        for arg in args:
            batch.add(arg, endpoint_id=endpoint_id, function_id=function_id)
        return client, await self.call(client.batch_run, batch)

    async def test_pending_then_result(self) -> None:
        """get_result raises TaskPending until the task is done, then the result;
        a finished task is not fetched again."""
        client, [task_id] = await self.submit(double, 21)
        record = await self.call(client.get_task, task_id)
        self.assertEqual(record, {"task_id": task_id, "status": "waiting-for-ep", "pending": True})
        self.fake.set_status(task_id, "running")
        error = await self.failure(TaskPending, client.get_result, task_id)
        self.assertEqual(error.status, "running")
        self.assertIn(task_id, str(error))

        self.fake.set_result(task_id, {"answer": 42})
        self.assertEqual(await self.call(client.get_result, task_id), {"answer": 42})
        record = await self.call(client.get_task, task_id)
        self.assertEqual(record["status"], "success")
        self.assertFalse(record["pending"])
        self.assertIsNotNone(record["completion_t"])
        requests = len(self.fake.requests_to("GET", f"/v2/tasks/{task_id}"))
        self.assertEqual(requests, 3)
        self.assertEqual(await self.call(client.get_result, task_id), {"answer": 42})
        self.assertEqual(len(self.fake.requests_to("GET", f"/v2/tasks/{task_id}")), requests)

    async def test_remote_error(self) -> None:
        """A failed task raises TaskExecutionFailed showing the traceback and code."""
        client, [task_id] = await self.submit(boom, 5)
        self.fake.run_task(task_id)
        error = await self.failure(TaskExecutionFailed, client.get_result, task_id)
        self.assertEqual(error.error_code, "RemoteExecutionError")
        self.assertIn("ValueError: bad 5", error.remote_data)
        self.assertIn("in boom", error.remote_data)
        self.assertIn("ValueError: bad 5", str(error))
        self.assertIn("RemoteExecutionError", str(error))
        self.assertIn(task_id, str(error))
        self.assertIsNotNone(error.completion_t)
        record = await self.call(client.get_task, task_id)
        self.assertIsInstance(record["exception"], TaskExecutionFailed)
        # From the cache, again, without a request.
        await self.failure(TaskExecutionFailed, client.get_result, task_id)
        self.assertEqual(len(self.fake.requests_to("GET", f"/v2/tasks/{task_id}")), 1)

    async def test_system_error_code(self) -> None:
        """System failures carry their own code (WorkerLost, TaskTimeout, ...)."""
        client, [task_id] = await self.submit(double, 1)
        self.fake.set_exception(
            task_id, "the worker running the task died (signal 9)", "WorkerLost", "worker lost"
        )
        error = await self.failure(TaskExecutionFailed, client.get_result, task_id)
        self.assertEqual(error.error_code, "WorkerLost")
        self.assertIn("WorkerLost", str(error))
        self.assertIn("signal 9", str(error))

    async def test_unknown_task(self) -> None:
        """An unknown task id is the service's 404, with its code and message."""
        self.serve()
        client = self.make_client()
        error = await self.failure(
            FuncxAPIError, client.get_task, "7d1e2c3b-0000-4000-8000-00000000abcd"
        )
        self.assertEqual(error.http_status, 404)
        self.assertEqual(error.code, "TASK_NOT_FOUND")
        self.assertIn("not found", error.message)

    async def test_batch_result_chunks(self) -> None:
        """get_batch_result asks at most 1000 ids per request, includes failures,
        and asks only about unfinished tasks the next time."""
        client, task_ids = await self.submit(double, *range(2500))
        for task_id in task_ids[:10]:
            self.fake.run_task(task_id)
        self.fake.set_exception(task_ids[10], "Traceback...\nKeyError: 'x'\n")
        answer = await self.call(client.get_batch_result, task_ids)
        self.assertEqual(list(answer), task_ids)
        self.assertEqual([answer[t]["result"] for t in task_ids[:10]], list(range(0, 20, 2)))
        self.assertIsInstance(answer[task_ids[10]]["exception"], TaskExecutionFailed)
        self.assertIn("KeyError", str(answer[task_ids[10]]["exception"]))
        self.assertTrue(all(answer[t]["pending"] for t in task_ids[11:]))
        sizes = [len(r.body["task_ids"]) for r in self.fake.requests_to("POST", "/v2/batch_status")]
        self.assertEqual(sizes, [1000, 1000, 500])

        answer = await self.call(client.get_batch_result, task_ids)
        self.assertEqual(len(answer), 2500)
        sizes = [len(r.body["task_ids"]) for r in self.fake.requests_to("POST", "/v2/batch_status")]
        self.assertEqual(sizes[3:], [1000, 1000, 489])

    async def test_batch_result_unknown_ids_left_out(self) -> None:
        """Ids the service does not report are left out of the answer."""
        client, [task_id] = await self.submit(double, 1)
        unknown = "7d1e2c3b-0000-4000-8000-00000000abcd"
        answer = await self.call(client.get_batch_result, [task_id, unknown])
        self.assertEqual(list(answer), [task_id])


class EndpointTests(FakeServiceTestCase):
    async def test_endpoint_calls(self) -> None:
        """The endpoint calls reach their paths and return the service's answers."""
        self.serve()
        client = self.make_client()
        endpoint_id = self.fake.add_endpoint(name="laptop")
        self.fake.add_endpoint(owner="someone-else")
        endpoints = await self.call(client.get_endpoints)
        self.assertEqual([e["endpoint_id"] for e in endpoints], [endpoint_id])
        metadata = await self.call(client.get_endpoint_metadata, endpoint_id)
        self.assertEqual(metadata["endpoint_name"], "laptop")
        status = await self.call(client.get_endpoint_status, endpoint_id)
        # The service's whole answer: with the status, the reports it received (one).
        self.assertEqual((status["endpoint_id"], status["status"]), (endpoint_id, "online"))
        self.assertEqual([report["final"] for report in status["logs"]], [False])

        f1 = await self.call(client.register_function, double)
        f2 = await self.call(client.register_function, add)
        f1, f2 = sorted([f1, f2])  # the service lists a whitelist in id order
        await self.call(client.add_to_whitelist, endpoint_id, [f1, f2])
        [request] = self.fake.requests_to("POST", f"/v2/endpoints/{endpoint_id}/whitelist")
        self.assertEqual(request.body, {"func": [f1, f2]})
        whitelist = await self.call(client.get_whitelist, endpoint_id)
        self.assertEqual(whitelist["functions"], [f1, f2])
        answers = await self.call(client.delete_from_whitelist, endpoint_id, [f1])
        self.assertEqual(answers[0]["functions"], [f2])
        self.assertEqual(
            len(self.fake.requests_to("DELETE", f"/v2/endpoints/{endpoint_id}/whitelist/{f1}")),
            1,
        )

        await self.call(client.stop_endpoint, endpoint_id)
        [request] = self.fake.requests_to("POST", f"/v2/endpoints/{endpoint_id}/lock")
        self.assertEqual(request.body, {})
        self.assertTrue(self.fake.endpoints[endpoint_id].locked)

        await self.call(client.delete_endpoint, endpoint_id)
        self.assertNotIn(endpoint_id, self.fake.endpoints)
        error = await self.failure(FuncxAPIError, client.get_endpoint_status, endpoint_id)
        # The service tells a deleted endpoint (410) from one it never knew (404).
        self.assertEqual((error.http_status, error.code), (410, "ENDPOINT_DELETED"))


class ContainerTests(FakeServiceTestCase):
    async def test_register_and_get(self) -> None:
        """funcX 1.0.13's calls: the same request bodies and paths, the same return values."""
        self.serve()
        client = self.make_client()
        container_id = await self.call(
            client.register_container, "python:3.11", "docker", "py", "a description"
        )
        [request] = self.fake.requests_to("POST", "/v2/containers")
        self.assertEqual(
            request.body,
            {
                "name": "py",
                "location": "python:3.11",
                "description": "a description",
                "type": "docker",
            },
        )
        container = await self.call(client.get_container, container_id, "docker")
        self.assertEqual(
            len(self.fake.requests_to("GET", f"/v2/containers/{container_id}/docker")), 1
        )
        self.assertEqual(
            {k: container[k] for k in ("container_uuid", "name", "type", "location")},
            {
                "container_uuid": container_id,
                "name": "py",
                "type": "docker",
                "location": "python:3.11",
            },
        )

        # Defaults as funcX 1.0.13's: name and description "".
        other = await self.call(client.register_container, "/img/x.sif", "singularity")
        request = self.fake.requests_to("POST", "/v2/containers")[-1]
        self.assertEqual((request.body["name"], request.body["description"]), ("", ""))
        self.assertNotIn("public", request.body)
        self.assertEqual((await self.call(client.get_container, other, "singularity"))["name"], "")

    async def test_more_images_and_the_whole_container(self) -> None:
        """This service's additions: add_container_image, get_container without a type."""
        self.serve()
        client = self.make_client()
        container_id = await self.call(client.register_container, "python:3.11", "docker")
        image = await self.call(
            client.add_container_image, container_id, "/img/py.sif", "apptainer"
        )
        self.assertEqual((image["type"], image["location"]), ("apptainer", "/img/py.sif"))
        whole = await self.call(client.get_container, container_id)
        self.assertEqual(
            [(i["type"], i["location"]) for i in whole["images"]],
            [("docker", "python:3.11"), ("apptainer", "/img/py.sif")],
        )

    async def test_public_containers(self) -> None:
        self.serve()
        theirs = self.make_client(self.fake.issue_token("someone-else"))
        shared = await self.call(theirs.register_container, "python:3", "docker", public=True)
        [request] = self.fake.requests_to("POST", "/v2/containers")
        self.assertIs(request.body["public"], True)
        private = await self.call(theirs.register_container, "python:3", "docker")
        mine = self.make_client()
        self.assertEqual((await self.call(mine.get_container, shared, "docker"))["public"], True)
        await self.call(mine.register_function, add, container_uuid=shared)
        error = await self.failure(FuncxAPIError, mine.get_container, private, "docker")
        self.assertEqual((error.http_status, error.code), (404, "CONTAINER_NOT_FOUND"))

    async def test_function_in_a_container(self) -> None:
        """register_function(container_uuid=...) sends it; its tasks carry the container."""
        self.serve()
        client = self.make_client()
        endpoint_id = self.fake.add_endpoint()
        container_id = await self.call(client.register_container, "python:3.11", "podman")
        function_id = await self.call(client.register_function, add, container_uuid=container_id)
        request = self.fake.requests_to("POST", "/v2/functions")[-1]
        self.assertEqual(request.body["container_uuid"], container_id)
        task_id = await self.call(client.run, 1, endpoint_id=endpoint_id, function_id=function_id)
        _, task = self.fake.published_tasks[task_id]
        self.assertEqual(task.container_id, container_id)
        assert task.container is not None
        self.assertEqual(
            [(i.image_type, i.location) for i in task.container.images],
            [("podman", "python:3.11")],
        )

    async def test_errors(self) -> None:
        """The service's refusals are FuncxAPIErrors with its code; ids are checked here."""
        self.serve()
        client = self.make_client()
        error = await self.failure(FuncxAPIError, client.register_container, "python:3", "lxc")
        self.assertEqual((error.http_status, error.code), (400, "INVALID_CONTAINER_TYPE"))
        error = await self.failure(FuncxAPIError, client.get_container, str(uuid.uuid4()), "docker")
        self.assertEqual((error.http_status, error.code), (404, "CONTAINER_NOT_FOUND"))
        error = await self.failure(
            FuncxAPIError, lambda: client.register_function(add, container_uuid=str(uuid.uuid4()))
        )
        self.assertEqual((error.http_status, error.code), (404, "CONTAINER_NOT_FOUND"))
        container_id = await self.call(client.register_container, "python:3", "docker")
        # A type that would change the path is sent quoted, and refused by the service.
        error = await self.failure(FuncxAPIError, client.get_container, container_id, "../x")
        self.assertEqual((error.http_status, error.code), (400, "INVALID_CONTAINER_TYPE"))
        await self.failure(ValueError, client.get_container, "not-a-uuid", "docker")


class ErrorTests(FakeServiceTestCase):
    async def test_unauthorized(self) -> None:
        """A 401 with a JSON body is a FuncxAPIError with its code and message."""
        self.serve()
        client = self.make_client(token="not-a-token")
        error = await self.failure(FuncxAPIError, client.get_endpoints)
        self.assertIsInstance(error, globus_sdk.GlobusAPIError)
        self.assertEqual(error.http_status, 401)
        self.assertEqual(error.code, "UNAUTHORIZED")
        self.assertIn("Bearer", error.message)

    async def test_reason_only_body(self) -> None:
        """funcX's old error body (reason, no message) still gives a message."""
        self.serve()
        client = self.make_client()
        self.fake.fail_next(
            "GET", "/v2/endpoints", 423, {"code": "ENDPOINT_LOCKED", "reason": "it is locked"}
        )
        error = await self.failure(FuncxAPIError, client.get_endpoints)
        self.assertEqual((error.http_status, error.code), (423, "ENDPOINT_LOCKED"))
        self.assertEqual(error.message, "it is locked")
        self.assertEqual(error.reason, "it is locked")

    async def test_network_error(self) -> None:
        """An unreachable service is a globus-sdk NetworkError after the retries."""
        self.serve()
        address = self.served.service_address
        await self.served.stop()
        client = FuncXClient(address, authorizer=globus_sdk.NullAuthorizer(), **fast_retries(1))
        self.addCleanup(client.close)
        await self.failure(globus_sdk.NetworkError, client.get_endpoints)

    async def test_malformed_submit_answer(self) -> None:
        """A submit answer that does not match the tasks is an error, not a guess."""
        self.serve()
        client = self.make_client()
        endpoint_id = self.fake.add_endpoint()
        function_id = await self.call(client.register_function, double)
        self.fake.fail_next("POST", "/v2/submit", 200, {"results": []})
        await self.failure(
            MalformedResponse,
            lambda: client.run(1, endpoint_id=endpoint_id, function_id=function_id),
        )


class RetryTests(FakeServiceTestCase):
    """Which failures are retried: everything but a doubtful submit."""

    async def setup_function(self) -> tuple[FuncXClient, str, str]:
        self.serve()
        client = self.make_client()
        endpoint_id = self.fake.add_endpoint()
        function_id = await self.call(client.register_function, double)
        return client, endpoint_id, function_id

    def run_one(self, client: FuncXClient, endpoint_id: str, function_id: str) -> str:
        return client.run(1, endpoint_id=endpoint_id, function_id=function_id)

    async def test_submit_500_not_retried(self) -> None:
        """A 500 from /submit is raised at once: a retry could duplicate tasks."""
        client, endpoint_id, function_id = await self.setup_function()
        self.fake.fail_next("POST", "/v2/submit", 500)
        error = await self.failure(FuncxAPIError, self.run_one, client, endpoint_id, function_id)
        self.assertEqual(error.http_status, 500)
        self.assertEqual(len(self.fake.requests_to("POST", "/v2/submit")), 1)

    async def test_submit_dropped_not_retried(self) -> None:
        """A submit whose connection dropped after sending is not retried."""
        client, endpoint_id, function_id = await self.setup_function()
        self.fake.fail_next("POST", "/v2/submit", None)
        await self.failure(globus_sdk.NetworkError, self.run_one, client, endpoint_id, function_id)
        self.assertEqual(len(self.fake.requests_to("POST", "/v2/submit")), 1)

    async def test_submit_503_retried(self) -> None:
        """429 and 503 mean nothing was created: the submit is retried."""
        client, endpoint_id, function_id = await self.setup_function()
        self.fake.fail_next("POST", "/v2/submit", 503)
        self.fake.fail_next("POST", "/v2/submit", 429, headers={"Retry-After": "0"})
        task_id = await self.call(self.run_one, client, endpoint_id, function_id)
        self.assertEqual(len(self.fake.requests_to("POST", "/v2/submit")), 3)
        self.assertEqual(list(self.fake.tasks), [task_id])

    async def test_other_calls_retried(self) -> None:
        """Reads are retried on 5xx and on dropped connections."""
        client, endpoint_id, function_id = await self.setup_function()
        task_id = await self.call(self.run_one, client, endpoint_id, function_id)
        self.fake.fail_next("GET", f"/v2/tasks/{task_id}", 500)
        self.fake.fail_next("POST", "/v2/batch_status", None)
        record = await self.call(client.get_task, task_id)
        self.assertTrue(record["pending"])
        self.assertEqual(len(self.fake.requests_to("GET", f"/v2/tasks/{task_id}")), 2)
        answer = await self.call(client.get_batch_result, [task_id])
        self.assertIn(task_id, answer)
        self.assertEqual(len(self.fake.requests_to("POST", "/v2/batch_status")), 2)


class LoginTests(FakeServiceTestCase):
    """Client-credentials login through globus-sdk, against the fake's auth."""

    def login_env(self, client_id: str, secret: str, **more: str) -> None:
        set_env(
            self,
            FUNCX_SDK_CLIENT_ID=client_id,
            FUNCX_SDK_CLIENT_SECRET=secret,
            GLOBUS_SDK_SERVICE_URL_AUTH=self.served.auth_url,
            **more,
        )

    def env_client(self, **kwargs: Any) -> FuncXClient:
        client = FuncXClient(self.served.service_address, **fast_retries(), **kwargs)
        self.addCleanup(client.close)
        return client

    async def test_client_credentials(self) -> None:
        """FUNCX_SDK_CLIENT_ID/SECRET get a funcX token, which the API accepts."""
        self.serve()
        client_id, secret = self.fake.add_client()
        self.login_env(client_id, secret)
        endpoint_id = self.fake.add_endpoint(owner=client_id)
        client = await self.call(self.env_client)
        status = await self.call(client.get_endpoint_status, endpoint_id)
        self.assertEqual(status["status"], "online")
        [token_request] = self.fake.requests_to("POST", "/v2/oauth2/token")
        self.assertEqual(
            token_request.body, {"grant_type": "client_credentials", "scope": FUNCX_SCOPE}
        )
        self.assertTrue(token_request.headers["authorization"].startswith("Basic "))

    async def test_scope_override(self) -> None:
        """FUNCX_SCOPE replaces the funcX scope asked for."""
        scope = "https://auth.example/scopes/private-funcx/all"
        self.serve(funcx_scope=scope)
        client_id, secret = self.fake.add_client()
        self.login_env(client_id, secret, FUNCX_SCOPE=scope)
        client = await self.call(self.env_client)
        await self.call(client.get_endpoints)
        [token_request] = self.fake.requests_to("POST", "/v2/oauth2/token")
        self.assertEqual(token_request.body["scope"], scope)

    async def test_refresh_after_401(self) -> None:
        """A token the service no longer accepts is replaced and the call retried."""
        self.serve()
        client_id, secret = self.fake.add_client()
        self.login_env(client_id, secret)
        client = await self.call(self.env_client)
        await self.call(client.get_endpoints)
        self.fake.revoke_tokens()
        await self.call(client.get_endpoints)
        self.assertEqual(len(self.fake.requests_to("POST", "/v2/oauth2/token")), 2)

    async def test_missing_credentials(self) -> None:
        """Without credentials the error says which variables to set and where from."""
        self.serve()
        set_env(self, FUNCX_SDK_CLIENT_ID="7d1e2c3b-0000-4000-8000-000000000000")
        error = await self.failure(LoginError, self.env_client)
        self.assertIn("FUNCX_SDK_CLIENT_SECRET", str(error))
        self.assertIn("funcx-service create-client", str(error))
        self.assertEqual(self.fake.requests, [])

    async def test_wrong_secret(self) -> None:
        """Wrong credentials are globus-sdk's AuthAPIError, at construction."""
        self.serve()
        client_id, _secret = self.fake.add_client()
        self.login_env(client_id, "wrong")
        error = await self.failure(globus_sdk.AuthAPIError, self.env_client)
        self.assertEqual(error.http_status, 401)


class TLSTests(FakeServiceTestCase):
    """HTTPS to a service whose certificate a private CA signed."""

    def tls_files(self) -> tls.TLSFiles:
        return tls.ensure_ca_and_server_cert(self.mktemp())

    async def test_ca_file(self) -> None:
        """ca_file verifies the service, for the API and the login alike."""
        files = self.tls_files()
        self.serve(tls_files=files)
        self.assertTrue(self.served.root_url.startswith("https://"))
        client_id, secret = self.fake.add_client()
        set_env(
            self,
            FUNCX_SDK_CLIENT_ID=client_id,
            FUNCX_SDK_CLIENT_SECRET=secret,
            GLOBUS_SDK_SERVICE_URL_AUTH=self.served.auth_url,
        )
        client = await self.call(FuncXClient, self.served.service_address, ca_file=files.ca_cert)
        self.addCleanup(client.close)
        self.assertEqual(await self.call(client.get_endpoints), [])

    async def test_ca_file_from_environment(self) -> None:
        """FUNCX_SERVICE_CA_FILE does the same."""
        files = self.tls_files()
        self.serve(tls_files=files)
        set_env(self, FUNCX_SERVICE_CA_FILE=files.ca_cert)
        client = self.make_client()
        self.assertEqual(await self.call(client.get_endpoints), [])

    async def test_unknown_ca_fails_fast(self) -> None:
        """Without the CA the certificate is refused, and not retried."""
        self.serve(tls_files=self.tls_files())
        client = self.make_client(retries=5, backoff=5)
        started = time.monotonic()
        error = await self.failure(globus_sdk.NetworkError, client.get_endpoints)
        self.assertLess(time.monotonic() - started, 4)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", repr(error.underlying_exception))


class RetryPolicyTests(SynchronousTestCase):
    """The retry checks on their own, with the errors requests really raises."""

    def context(
        self,
        method: str = "POST",
        path: str = "/v2/submit",
        status: Optional[int] = None,
        error: Optional[Callable[[requests.PreparedRequest], Exception]] = None,
    ) -> Any:
        request = requests.Request(method, "http://127.0.0.1:9/" + path.lstrip("/")).prepare()
        response = None
        if status is not None:
            response = requests.Response()
            response.status_code = status
            response.request = request
        # The checks only read these two attributes of a RetryContext.
        return SimpleNamespace(
            response=response, exception=error(request) if error is not None else None
        )

    def check(self, ctx: Any) -> RetryCheckResult:
        return submit_retry_check(ctx)

    @staticmethod
    def refused(request: requests.PreparedRequest) -> Exception:
        reason = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
        wrapped = urllib3.exceptions.MaxRetryError(None, request.url, reason)  # type: ignore[arg-type]
        return requests.ConnectionError(wrapped, request=request)

    @staticmethod
    def aborted(request: requests.PreparedRequest) -> Exception:
        reason = urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError())
        return requests.ConnectionError(reason, request=request)

    @staticmethod
    def read_timeout(request: requests.PreparedRequest) -> Exception:
        return requests.ReadTimeout("read timed out", request=request)

    @staticmethod
    def connect_timeout(request: requests.PreparedRequest) -> Exception:
        return requests.ConnectTimeout("connect timed out", request=request)

    def test_submit_not_sent(self) -> None:
        """A submit that never reached the server is left to the default retries."""
        for error in (self.refused, self.connect_timeout):
            self.assertIs(self.check(self.context(error=error)), RetryCheckResult.no_decision)

    def test_submit_maybe_sent(self) -> None:
        """A submit that may have reached the server is not retried."""
        for error in (self.aborted, self.read_timeout):
            self.assertIs(self.check(self.context(error=error)), RetryCheckResult.do_not_retry)

    def test_submit_statuses(self) -> None:
        """401/429/503 go to the default checks; other statuses are final."""
        for status in (401, 429, 503):
            self.assertIs(self.check(self.context(status=status)), RetryCheckResult.no_decision)
        for status in (200, 400, 500, 502, 504):
            self.assertIs(self.check(self.context(status=status)), RetryCheckResult.do_not_retry)

    def test_other_requests(self) -> None:
        """Other requests are not the check's business."""
        for method, path in (("GET", "/v2/tasks/x"), ("POST", "/v2/batch_status")):
            for ctx in (
                self.context(method, path, status=500),
                self.context(method, path, error=self.read_timeout),
            ):
                self.assertIs(self.check(ctx), RetryCheckResult.no_decision)

    def test_certificate_failure(self) -> None:
        """A certificate verification failure is never retried; other TLS trouble may be."""

        def bad_certificate(request: requests.PreparedRequest) -> Exception:
            reason = ssl.SSLCertVerificationError(1, "certificate verify failed")
            wrapped = urllib3.exceptions.MaxRetryError(None, request.url, reason)  # type: ignore[arg-type]
            return requests.exceptions.SSLError(wrapped, request=request)

        ctx = self.context("GET", "/v2/endpoints", error=bad_certificate)
        self.assertIs(tls_verification_retry_check(ctx), RetryCheckResult.do_not_retry)
        ctx = self.context("GET", "/v2/endpoints", error=self.refused)
        self.assertIs(tls_verification_retry_check(ctx), RetryCheckResult.no_decision)
