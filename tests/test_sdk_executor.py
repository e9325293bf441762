"""Tests for funcx_endpoint.sdk.executor: FuncXExecutor against the service's real API.

The executor's own threads talk HTTP to the service's API (in this process,
funcx_endpoint.testing.inprocess), which the test reactor serves; tests wait
for futures in the reactor's thread pool.
"""

from __future__ import annotations

import io
import threading
import uuid
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Iterable, List, Optional

import globus_sdk
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from funcx_endpoint.sdk import executor as executor_module
from funcx_endpoint.sdk.client import FuncXClient
from funcx_endpoint.sdk.errors import (
    FuncxAPIError,
    ServiceUnreachable,
    TaskExecutionFailed,
    TaskRefused,
)
from funcx_endpoint.sdk.executor import FuncXExecutor
from funcx_endpoint.testing.inprocess import InProcessService
from funcx_endpoint.wire import SerializationError
from tests.test_sdk_client import FakeServiceTestCase, fast_retries, set_env


def double(x):
    return 2 * x


def triple(x):
    return 3 * x


def boom(n):
    raise ValueError(f"bad {n}")


def wait_all(futures: Iterable[Future[Any]], timeout: float = 30) -> List[Any]:
    """Results or exceptions of ``futures`` (blocking; run it in a thread)."""
    outcomes: List[Any] = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=timeout))
        except CancelledError as error:
            outcomes.append(error)
        except Exception as error:
            outcomes.append(error)
    return outcomes


class ExecutorTestCase(FakeServiceTestCase):
    endpoint_id: str

    def serve_inline(self, **kwargs: Any) -> InProcessService:
        """A service whose endpoints run each task as soon as it is published."""
        fake = self.serve(run_tasks=True, **kwargs)
        self.endpoint_id = fake.add_endpoint()
        return fake

    def executor(self, client: Optional[FuncXClient] = None, **kwargs: Any) -> FuncXExecutor:
        kwargs.setdefault("poll_interval", 0.02)
        executor = FuncXExecutor(self.endpoint_id, client or self.make_client(), **kwargs)
        self.addCleanup(lambda: deferToThread(executor.shutdown, wait=True))
        return executor

    async def outcomes(self, futures: Iterable[Future[Any]]) -> List[Any]:
        return await deferToThread(wait_all, list(futures))

    async def until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        """Wait (on the reactor, where the service's state lives) until ``predicate()``."""
        deadline = reactor.seconds() + timeout
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail("condition not reached in time")
            await deferLater(reactor, 0.01)

    def polls(self) -> int:
        return len(self.fake.requests_to("POST", "/v2/batch_status"))


class ResultTests(ExecutorTestCase):
    async def test_results(self) -> None:
        """Futures get the deserialized results, in submission order."""
        self.serve_inline()
        executor = self.executor()
        futures = [executor.submit(double, i) for i in range(10)]
        self.assertEqual(await self.outcomes(futures), [2 * i for i in range(10)])
        [request] = self.fake.requests_to("POST", "/v2/submit")[:1]
        self.assertEqual(request.body["task_group_id"], executor.task_group_id)
        self.assertIs(request.body["create_websocket_queue"], False)

    async def test_remote_failure(self) -> None:
        """A task that raised gives TaskExecutionFailed with the remote traceback."""
        self.serve_inline()
        executor = self.executor()
        [error, ok] = await self.outcomes([executor.submit(boom, 3), executor.submit(double, 4)])
        self.assertIsInstance(error, TaskExecutionFailed)
        self.assertEqual(error.error_code, "RemoteExecutionError")
        self.assertIn("ValueError: bad 3", str(error))
        self.assertEqual(ok, 8)

    async def test_pending_until_done(self) -> None:
        """A future stays pending while the task is, and resolves when it ends."""
        fake = self.serve()
        self.endpoint_id = fake.add_endpoint()
        executor = self.executor()
        future = executor.submit(double, 5)
        await self.until(lambda: len(fake.tasks) == 1 and self.polls() > 2)
        self.assertFalse(future.done())
        [task_id] = fake.tasks
        fake.set_status(task_id, "running")
        fake.set_result(task_id, "five")
        self.assertEqual(await self.outcomes([future]), ["five"])

    async def test_many_tasks_few_requests(self) -> None:
        """Hundreds of tasks go out in batches and are polled many at a time;
        the function is registered once."""
        self.serve_inline()
        executor = self.executor(batch_size=128, poll_interval=0.05)
        futures = [executor.submit(double, i) for i in range(600)]
        self.assertEqual(await self.outcomes(futures), [2 * i for i in range(600)])
        submits = self.fake.requests_to("POST", "/v2/submit")
        self.assertTrue(all(len(r.body["tasks"]) <= 128 for r in submits))
        self.assertGreaterEqual(len(submits), 5)
        self.assertLess(len(submits), 60)
        polls = self.fake.requests_to("POST", "/v2/batch_status")
        self.assertLess(len(polls), 60)
        self.assertGreater(max(len(r.body["task_ids"]) for r in polls), 1)
        self.assertEqual(len(self.fake.requests_to("POST", "/v2/functions")), 1)

    async def test_poll_chunks(self) -> None:
        """Polls ask at most 1000 ids per request."""
        fake = self.serve()
        self.endpoint_id = fake.add_endpoint()
        executor = self.executor(batch_size=500, poll_interval=0.05)
        futures = [executor.submit(double, i) for i in range(2300)]
        await self.until(lambda: len(fake.tasks) == 2300)
        for task_id in list(fake.tasks):
            fake.run_task(task_id)
        self.assertEqual(await self.outcomes(futures), [2 * i for i in range(2300)])
        sizes = [len(r.body["task_ids"]) for r in fake.requests_to("POST", "/v2/batch_status")]
        self.assertLessEqual(max(sizes), 1000)
        self.assertIn(1000, sizes)

    async def test_functions_registered_once_each(self) -> None:
        """Each function object is registered once; bound methods count as one."""
        self.serve_inline()
        executor = self.executor()
        futures = [executor.submit(fn, 1) for fn in (double, triple, double, triple)]
        self.assertEqual(await self.outcomes(futures), [2, 3, 2, 3])
        self.assertEqual(len(self.fake.requests_to("POST", "/v2/functions")), 2)

    async def test_map(self) -> None:
        """Executor.map works on top of submit."""
        self.serve_inline()
        executor = self.executor()
        self.assertEqual(
            await deferToThread(lambda: list(executor.map(double, range(5), timeout=30))),
            [0, 2, 4, 6, 8],
        )


class SubmissionFailureTests(ExecutorTestCase):
    async def test_refused_task(self) -> None:
        """A task the service refuses fails its future with the reason."""
        self.serve_inline()
        unknown = str(uuid.uuid4())  # an endpoint the service never knew
        self.endpoint_id = unknown
        executor = self.executor()
        [error] = await self.outcomes([executor.submit(double, 2)])
        self.assertIsInstance(error, TaskRefused)
        self.assertEqual(error.http_status, 404)
        self.assertIn(unknown, error.reason)

    async def test_unserializable_argument(self) -> None:
        """An argument that cannot be serialized fails only its own future."""
        self.serve_inline()
        executor = self.executor()
        futures = [
            executor.submit(double, 1),
            executor.submit(double, (x for x in range(3))),
            executor.submit(double, 3),
        ]
        [one, error, three] = await self.outcomes(futures)
        self.assertEqual((one, three), (2, 6))
        self.assertIsInstance(error, SerializationError)

    async def test_service_error_on_submit(self) -> None:
        """A 500 from /submit fails the batch's futures with the service's error."""
        fake = self.serve_inline()
        fake.fail_next("POST", "/v2/submit", 500)
        executor = self.executor()
        [error] = await self.outcomes([executor.submit(double, 1)])
        self.assertIsInstance(error, FuncxAPIError)
        self.assertEqual(error.http_status, 500)
        self.assertEqual(len(fake.requests_to("POST", "/v2/submit")), 1)
        self.assertEqual(await self.outcomes([executor.submit(double, 2)]), [4])

    async def test_service_unreachable(self) -> None:
        """With the service gone, futures fail after the retries, clearly."""
        self.serve_inline()
        client = self.make_client(retries=1)
        await self.served.stop()
        executor = self.executor(client)
        [error] = await self.outcomes([executor.submit(double, 1)])
        self.assertIsInstance(error, ServiceUnreachable)
        self.assertIn(self.served.service_address, str(error))
        self.assertIsInstance(error.__cause__, globus_sdk.NetworkError)

    async def test_polls_failing(self) -> None:
        """Polls that keep failing end in ServiceUnreachable, not a hang."""
        fake = self.serve()
        self.endpoint_id = fake.add_endpoint()
        fake.fail_next("POST", "/v2/batch_status", 500, times=1000)
        client = self.make_client(retries=0)
        executor = self.executor(client, max_poll_failures=3)
        [error] = await self.outcomes([executor.submit(double, 1)])
        self.assertIsInstance(error, ServiceUnreachable)
        self.assertIsNotNone(error.task_id)
        self.assertIn("3 status polls", str(error))
        self.assertEqual(len(fake.requests_to("POST", "/v2/batch_status")), 3)

    async def test_poll_refused(self) -> None:
        """A poll the service refuses (403) fails the futures at once."""
        fake = self.serve()
        self.endpoint_id = fake.add_endpoint()
        fake.fail_next("POST", "/v2/batch_status", 403, times=1000)
        executor = self.executor()
        [error] = await self.outcomes([executor.submit(double, 1)])
        self.assertIsInstance(error, FuncxAPIError)
        self.assertEqual(error.http_status, 403)
        self.assertEqual(len(fake.requests_to("POST", "/v2/batch_status")), 1)

    async def test_one_transient_poll_failure(self) -> None:
        """One failed poll is tried again; the futures still resolve."""
        fake = self.serve_inline()
        fake.fail_next("POST", "/v2/batch_status", 500, times=1)
        client = self.make_client(retries=0)
        executor = self.executor(client, max_poll_failures=2)
        self.assertEqual(await self.outcomes([executor.submit(double, 1)]), [2])


class _BlockingClient(FuncXClient):
    """Registration waits for ``release``, so tests can queue tasks behind it."""

    release: threading.Event
    entered: threading.Event

    def register_function(self, *args: Any, **kwargs: Any) -> str:
        self.entered.set()
        self.release.wait(30)
        return super().register_function(*args, **kwargs)


class ShutdownTests(ExecutorTestCase):
    def blocking_client(self) -> _BlockingClient:
        client = _BlockingClient(
            self.served.service_address,
            authorizer=globus_sdk.AccessTokenAuthorizer(self.fake.issue_token()),
            **fast_retries(),
        )
        client.release = threading.Event()
        client.entered = threading.Event()
        self.addCleanup(client.release.set)
        self.addCleanup(client.close)
        return client

    async def test_context_manager(self) -> None:
        """Leaving the with block waits for every future."""
        self.serve_inline()
        client = self.make_client()

        def run() -> List[Future[Any]]:
            with FuncXExecutor(self.endpoint_id, client, poll_interval=0.02) as executor:
                return [executor.submit(double, i) for i in range(20)]

        futures = await deferToThread(run)
        self.assertTrue(all(f.done() for f in futures))
        self.assertEqual([f.result() for f in futures], [2 * i for i in range(20)])

    async def test_submit_after_shutdown(self) -> None:
        """submit after shutdown raises RuntimeError; shutdown is idempotent."""
        self.serve_inline()
        executor = self.executor()
        await deferToThread(executor.shutdown)
        self.assertRaises(RuntimeError, executor.submit, double, 1)
        await deferToThread(executor.shutdown)

    async def test_shutdown_waits(self) -> None:
        """shutdown(wait=True) returns only once submitted tasks are resolved."""
        fake = self.serve()
        self.endpoint_id = fake.add_endpoint()
        executor = self.executor()
        future = executor.submit(double, 2)
        await self.until(lambda: len(fake.tasks) == 1)
        shutdown = deferToThread(executor.shutdown, wait=True)
        polls = self.polls()
        await self.until(lambda: self.polls() > polls + 2)
        self.assertFalse(shutdown.called)
        fake.run_task(next(iter(fake.tasks)))
        await shutdown
        self.assertEqual(future.result(), 4)

    async def test_cancel_futures(self) -> None:
        """shutdown(cancel_futures=True) cancels what was not sent yet."""
        fake = self.serve_inline()
        client = self.blocking_client()
        executor = self.executor(client)
        first = executor.submit(double, 1)
        await deferToThread(client.entered.wait, 30)
        queued = [executor.submit(double, i) for i in range(2, 5)]
        executor.shutdown(wait=False, cancel_futures=True)
        self.assertTrue(all(f.cancelled() for f in queued))
        client.release.set()
        self.assertEqual(await self.outcomes([first]), [2])
        self.assertEqual(len(fake.tasks), 1)

    async def test_user_cancel_before_sending(self) -> None:
        """A future cancelled while queued is not submitted."""
        fake = self.serve_inline()
        client = self.blocking_client()
        executor = self.executor(client)
        first = executor.submit(double, 1)
        await deferToThread(client.entered.wait, 30)
        second = executor.submit(double, 2)
        self.assertTrue(second.cancel())
        client.release.set()
        self.assertEqual(await self.outcomes([first]), [2])
        await deferToThread(executor.shutdown)
        self.assertEqual(len(fake.tasks), 1)

    async def test_owned_client(self) -> None:
        """Without a client the executor makes one from the environment."""
        self.serve_inline()
        client_id, secret = self.fake.add_client("owner")
        self.endpoint_id = self.fake.add_endpoint(owner="owner")
        set_env(
            self,
            FUNCX_SERVICE_ADDRESS=self.served.service_address,
            FUNCX_SDK_CLIENT_ID=client_id,
            FUNCX_SDK_CLIENT_SECRET=secret,
            GLOBUS_SDK_SERVICE_URL_AUTH=self.served.auth_url,
        )

        def run() -> List[Any]:
            with FuncXExecutor(self.endpoint_id, poll_interval=0.02) as executor:
                return [f.result(timeout=30) for f in [executor.submit(double, 21)]]

        self.assertEqual(await deferToThread(run), [42])


class ProgressTests(ExecutorTestCase):
    async def run_with_progress(self) -> str:
        self.serve_inline()
        stream = io.StringIO()
        executor = self.executor(show_progress=True, progress_stream=stream)
        futures = [executor.submit(double, i) for i in range(7)]
        await self.outcomes(futures)
        await deferToThread(executor.shutdown)
        return stream.getvalue()

    async def test_plain_progress(self) -> None:
        """Without tqdm one line shows done/submitted."""
        self.patch(executor_module, "_tqdm", None)
        output = await self.run_with_progress()
        self.assertTrue(output.endswith("funcX tasks: 7/7 done\n"), output)
        self.assertNotIn("\n", output[:-1])

    async def test_tqdm_progress(self) -> None:
        """With tqdm a bar shows done/submitted."""
        if executor_module._tqdm is None:
            self.skipTest("tqdm is not installed")
        output = await self.run_with_progress()
        self.assertIn("7/7", output)
        self.assertIn("funcX tasks", output)

    async def test_no_progress_by_default(self) -> None:
        """show_progress is off by default: nothing is written."""
        self.serve_inline()
        stream = io.StringIO()
        executor = self.executor(progress_stream=stream)
        await self.outcomes([executor.submit(double, 1)])
        await deferToThread(executor.shutdown)
        self.assertEqual(stream.getvalue(), "")
