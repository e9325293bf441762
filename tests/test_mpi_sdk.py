"""ShellFunction and MPIFunction from the SDK; the resource specification's way
through the service: ``POST /submit``, the stored task, the task message.

The SDK side runs against the service's real API in this process (tasks run
inline by the worker's TaskRunner, as :mod:`tests.test_sdk_executor` does);
storage is checked on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.sdk import MPIFunction, ShellFunction, ShellResult
from funcx_endpoint.webservice import tasks
from funcx_endpoint.webservice.records import NewTask
from funcx_endpoint.wire import Task, pack, pack_payload
from funcx_endpoint.wire.resources import ResourceSpecificationError
from tests.test_sdk_executor import ExecutorTestCase
from tests.test_webservice_storage import StorageCases

SPEC = {"num_nodes": 2, "ranks_per_node": 2}


class SDKTests(ExecutorTestCase):
    async def test_shell_function(self) -> None:
        self.serve_inline()
        executor = self.executor()
        future = executor.submit(ShellFunction("echo {word}; exit 2"), word="hi")
        [shell] = await self.outcomes([future])
        self.assertIsInstance(shell, ShellResult)
        self.assertEqual((shell.returncode, shell.stdout), (2, "hi\n"))
        [request] = self.fake.requests_to("POST", "/v2/submit")
        self.assertNotIn("resource_specification", request.body)

    async def test_resource_specification_travels_with_the_tasks(self) -> None:
        self.serve_inline()
        executor = self.executor()
        plain = executor.submit(ShellFunction("true"))
        await self.outcomes([plain])
        executor.resource_specification = SPEC
        mpi = executor.submit(MPIFunction("hostname"))
        [error] = await self.outcomes([mpi])
        # Run inline by the service's stand-in endpoint, which sets no MPI prefix:
        self.assertIn("MPIFunction needs a resource specification", str(error))
        first, second = self.fake.requests_to("POST", "/v2/submit")
        self.assertNotIn("resource_specification", first.body)
        self.assertEqual(second.body["resource_specification"], SPEC)
        published = {
            task_id: task.resource_specification
            for task_id, (_, task) in self.fake.published_tasks.items()
        }
        self.assertEqual(sorted(published.values(), key=str), [None, SPEC])

    async def test_bad_specification_refused_before_sending(self) -> None:
        self.serve_inline()
        executor = self.executor()
        executor.resource_specification = {"nodes": 2}
        self.assertRaises(ResourceSpecificationError, executor.submit, MPIFunction("true"))
        self.assertEqual(self.fake.requests_to("POST", "/v2/submit"), [])

    async def test_service_refuses_a_bad_specification(self) -> None:
        fake = self.serve_inline()
        status, answer = fake.call(
            "POST",
            "/v2/submit",
            {
                "resource_specification": {"num_nodes": 0},
                "tasks": [[str(uuid.uuid4()), self.endpoint_id, pack_payload((), {})]],
            },
        )
        self.assertEqual(status, 400)
        self.assertIn("INVALID_RESOURCE_SPECIFICATION", json.dumps(answer))
        self.assertIn("positive integer", json.dumps(answer))


class Funcx10EndpointTests(SynchronousTestCase):
    def test_funcx_common_ignores_the_field(self) -> None:
        """funcX 1.0.13's own reader (funcx_common, in the funcx venv) reads a task
        message with a resource_specification: the field is ignored."""
        from tests.test_real_funcx_sdk import _funcx_python

        python = _funcx_python()
        task = Task(str(uuid.uuid4()), "1\nx", resource_specification=SPEC)
        script = (
            "import base64, sys\n"
            "from funcx_common.messagepack import unpack\n"
            "task = unpack(base64.b64decode(sys.argv[1]))\n"
            "print(type(task).__name__, task.task_id, task.task_buffer == '1\\nx')\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        done = subprocess.run(
            [python, "-c", script, base64.b64encode(pack(task)).decode("ascii")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split(), ["Task", task.task_id, "True"])


class _StoredSpecification:
    """Stored with the task and read back when it is sent (again); the storage
    tests' helpers, without running their tests again."""

    make_url: Any
    client = StorageCases.client
    register = StorageCases.register
    function = StorageCases.function

    def setUp(self) -> None:
        StorageCases.setUp(self)  # type: ignore[arg-type]

    def test_stored_and_sent_again(self) -> None:
        alice = self.client()
        endpoint = self.register(alice.identity_id)
        function_id = self.function(alice.identity_id)
        with_spec, without = str(uuid.uuid4()), str(uuid.uuid4())
        new = [
            NewTask(
                task_id,
                alice.identity_id,
                function_id,
                endpoint.endpoint_id,
                str(uuid.uuid4()),
                pack_payload((1,), {}),
                None,
                time.time() - 10,
                spec,
            )
            for task_id, spec in ((with_spec, json.dumps(SPEC)), (without, None))
        ]
        self.call(tasks.insert_tasks)(new)
        unsent = {t.task_id: t for t in self.call(tasks.unsent_tasks)(10, time.time())}
        self.assertEqual(unsent[with_spec].resource_specification, SPEC)
        self.assertIsNone(unsent[without].resource_specification)


class SQLiteSpecificationTests(_StoredSpecification, SynchronousTestCase):
    def make_url(self) -> str:
        return "sqlite://" + os.path.abspath(self.mktemp()) + ".sqlite3"


class PostgresSpecificationTests(_StoredSpecification, SynchronousTestCase):
    def make_url(self) -> str:
        from tests.test_webservice_storage import _pg_url

        return _pg_url()
