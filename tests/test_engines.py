"""Workers in real containers: the test run's own Podman and Docker
(:mod:`funcx_endpoint.testing.engines`), the worker image built here from this
machine's Python, a manager's worker pool on the real reactor.

Each engine runs functions (one cold start, then warm tasks; a function that
prints), and the failure cases: an image that is not there (ContainerError with
the image and the engine's own message) and a container killed mid-task
(WorkerLost with its exit status).  Skipped, with the reason, without root or
the engines' packages.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from funcx_endpoint.manager.containers import WorkerImage
from funcx_endpoint.manager.images import OneImagePlacement
from funcx_endpoint.manager.launcher import WorkerLauncher
from funcx_endpoint.manager.pool import WorkerPool
from funcx_endpoint.manager.warm import WarmPlacement
from funcx_endpoint.testing.engines import WORKER_IMAGE, shared_docker, shared_podman
from funcx_endpoint.wire import ErrorCode, Result, deserialize, pack_function, pack_payload
from funcx_endpoint.wire.info import ManagerSettings
from funcx_endpoint.wire.results import read_result


def double(value: int) -> Dict[str, Any]:
    import os
    import sys

    print("printed by the user's function")
    return {"value": value * 2, "pid": os.getpid(), "python": sys.version.split()[0]}


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def buffer_of(function: Any, *args: Any) -> bytes:
    return (pack_function(function) + pack_payload(args)).encode()


class _EngineTests:
    """The same tests for each engine (mixed into a TestCase per engine)."""

    shared: Any
    engine: Any
    timeout = 120

    def setUp(self) -> None:
        self.engine = self.shared.get()
        self.engine.import_worker_image()
        self.results: Dict[str, Result] = {}
        self.waiting: Dict[str, Deferred[Result]] = {}

    def pool(self, count: int = 1, placement: Any = None, **settings: Any) -> WorkerPool:
        settings.setdefault("stop_grace_period", 10.0)
        manager_settings = ManagerSettings(worker_mode=self.engine.name, **settings)
        launcher = WorkerLauncher(reactor, manager_settings, None, self.engine.env())
        pool = WorkerPool(
            reactor,
            count,
            manager_settings,
            self.mktemp(),  # type: ignore[attr-defined]
            on_result=self._result,
            hostname="testhost",
            launcher=launcher,
            placement=placement or OneImagePlacement(None),
        )
        pool.start()
        self.addCleanup(pool.stop)  # type: ignore[attr-defined]
        return pool

    def _result(self, packed: bytes) -> None:
        result = read_result(packed)
        self.results[result.task_id] = result
        waiter = self.waiting.pop(result.task_id, None)
        if waiter is not None:
            waiter.callback(result)

    def submit(self, pool: WorkerPool, image: WorkerImage, buffer: bytes) -> Deferred[Result]:
        task_id = str(uuid.uuid4())
        waiter: Deferred[Result] = Deferred()
        self.waiting[task_id] = waiter
        pool.submit([(task_id, buffer)], image)  # an answer at once fires the waiter now
        return waiter

    @inlineCallbacks
    def test_functions_run_in_the_container(self) -> Any:
        pool = self.pool(count=1)
        image = WorkerImage(self.engine.name, WORKER_IMAGE)
        started = time.monotonic()
        first = yield self.submit(pool, image, buffer_of(double, 21))
        cold = time.monotonic() - started
        self.assertIsNone(first.error_details, first.data)
        answer = deserialize(first.data)
        self.assertEqual(answer["value"], 42)
        self.assertEqual(answer["pid"], 1)  # the first process of its own container
        warm: List[float] = []
        for value in range(5):
            started = time.monotonic()
            result = yield self.submit(pool, image, buffer_of(double, value))
            warm.append(time.monotonic() - started)
            self.assertEqual(deserialize(result.data)["value"], value * 2)
        print(
            f"\n{self.engine.name}: cold start + first task {cold:.2f} s; warm tasks "
            f"{min(warm) * 1000:.1f}-{max(warm) * 1000:.1f} ms"
        )
        self.assertEqual(pool.images(), {image: 1})

    @inlineCallbacks
    def test_missing_image_is_a_container_error(self) -> Any:
        pool = self.pool(count=1)
        image = WorkerImage(self.engine.name, "localhost/not-here:1")
        result = yield self.submit(pool, image, buffer_of(double, 1))
        details = result.error_details
        self.assertIsNotNone(details)
        self.assertEqual(details.code, ErrorCode.CONTAINER_ERROR)
        message = details.user_message
        self.assertIn(f"image 'localhost/not-here:1' ({self.engine.name})", message)
        self.assertIn("exit status 125", message)
        self.assertIn(self.missing_image_says, message)
        # Failing fast meanwhile, without another container.
        again = yield self.submit(pool, image, buffer_of(double, 1))
        self.assertEqual(again.error_details.code, ErrorCode.CONTAINER_ERROR)

    @inlineCallbacks
    def test_image_without_python_is_a_container_error(self) -> Any:
        """An image that cannot start a worker (no python3 in it): ContainerError with
        the engine's exit status (127) and message."""
        import io
        import os
        import tarfile

        path = os.path.abspath(self.mktemp()) + ".tar"  # type: ignore[attr-defined]
        with tarfile.open(path, "w") as tar:
            data = b"root:x:0:0:root:/:/nothing\n"
            info = tarfile.TarInfo("etc/passwd")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        name = "localhost/funcx-no-python:1"
        self.engine.command("import", path, name)
        pool = self.pool(count=1)
        result = yield self.submit(pool, WorkerImage(self.engine.name, name), buffer_of(nap, 0))
        details = result.error_details
        self.assertEqual(details.code, ErrorCode.CONTAINER_ERROR)
        self.assertIn(f"image '{name}' ({self.engine.name})", details.user_message)
        self.assertIn("needs python3", details.user_message)
        self.assertIn("exit status 127", details.user_message)
        self.assertIn("python3", details.user_message.split("said:")[-1])

    @inlineCallbacks
    def test_container_killed_mid_task_is_worker_lost(self) -> Any:
        pool = self.pool(count=1)
        image = WorkerImage(self.engine.name, WORKER_IMAGE)
        yield self.submit(pool, image, buffer_of(nap, 0))  # warm
        running = self.submit(pool, image, buffer_of(nap, 60))
        yield deferLater(reactor, 0.5, lambda: None)
        [slot] = pool._workers
        assert slot.launch is not None and slot.launch.name is not None
        yield deferLater(reactor, 0, self.engine.kill_container, slot.launch.name)
        result = yield running
        details = result.error_details
        self.assertEqual(details.code, ErrorCode.WORKER_LOST)
        self.assertIn("status 137", details.user_message)
        self.assertIn("SIGKILL", details.user_message)
        self.assertIn(WORKER_IMAGE, details.user_message)
        # The slot gets a new container, which runs the next task.
        result = yield self.submit(pool, image, buffer_of(nap, 0))
        self.assertIsNone(result.error_details)

    @inlineCallbacks
    def test_warm_workers_of_three_images_in_two_slots(self) -> Any:
        """Soft routing's manager: three images (tags of the worker image) in two
        slots; each image's first task is a cold start, the least recently used idle
        container makes room for the third, a warm one takes its next task."""
        names = [f"localhost/funcx-type-{kind}:1" for kind in "abc"]
        self.engine.import_worker_image(names)
        pool = self.pool(count=2, placement=WarmPlacement())
        a, b, c = (WorkerImage(self.engine.name, name) for name in names)
        results = yield gatherResults(
            [self.submit(pool, a, buffer_of(double, 1)), self.submit(pool, b, buffer_of(double, 2))]
        )
        self.assertEqual([deserialize(r.data)["value"] for r in results], [2, 4])
        self.assertEqual(pool.cold_starts, 2)
        yield self.submit(pool, b, buffer_of(double, 3))  # b is now the most recently used
        result = yield self.submit(pool, c, buffer_of(double, 5))  # a's container retired
        self.assertEqual(deserialize(result.data)["value"], 10)
        self.assertEqual(pool.cold_starts, 3)
        self.assertEqual(pool.images(), {b: 1, c: 1})
        yield self.submit(pool, b, buffer_of(double, 3))
        self.assertEqual(pool.cold_starts, 3)  # warm

    async def test_manager_process_of_one_container_type(self) -> None:
        """A real interchange and ``funcx-manager`` process (hard routing: it serves one
        container's tasks): the task carries its container; the manager runs it in
        the container's image with this engine, and stops its containers at the end."""
        from funcx_endpoint.config.model import HighThroughputExecutor
        from funcx_endpoint.wire import Container, ContainerImage, Task
        from tests.test_execution_integration import Cluster

        cluster = Cluster(self, HighThroughputExecutor(worker_mode=self.engine.name))
        box = Container(uuid.uuid4(), "sci", [ContainerImage("docker", WORKER_IMAGE)])
        cluster.start_manager(
            workers=1,
            extra_args=["--container-type", box.container_id],
            env=self.engine.environment(),
        )
        await cluster.ready()
        task = Task(uuid.uuid4(), buffer_of(double, 4).decode(), box.container_id, box)
        cluster.interchange.submit([task])
        result = await cluster.result(task.task_id, timeout=90)
        self.assertIsNone(result.error_details, result.data)
        self.assertEqual(deserialize(result.data)["value"], 8)
        self.assertEqual(deserialize(result.data)["pid"], 1)
        missing = Container(uuid.uuid4(), "gone", [ContainerImage("docker", "localhost/gone:1")])
        cluster.start_manager(
            workers=1,
            extra_args=["--container-type", missing.container_id],
            env=self.engine.environment(),
        )
        await cluster.ready(2)
        task = Task(uuid.uuid4(), buffer_of(double, 4).decode(), missing.container_id, missing)
        cluster.interchange.submit([task])
        failed = await cluster.result(task.task_id, timeout=90)
        self.assertEqual(failed.error_details.code, ErrorCode.CONTAINER_ERROR)
        self.assertIn("localhost/gone:1", failed.error_details.user_message)
        await cluster.close()
        self.assertEqual(self.engine.containers(), [])

    async def test_soft_routing_managers_of_three_types(self) -> None:
        """A real interchange with soft routing and two real soft managers (no
        --container-type) of two slots: tasks of three container types all run in
        their images; the managers' WarmContainers reach the interchange (warm
        workers per type, cold starts)."""
        from funcx_endpoint.config.model import HighThroughputExecutor
        from funcx_endpoint.wire import Container, ContainerImage, Task
        from tests.test_execution_integration import Cluster

        names = [f"localhost/funcx-soft-{kind}:1" for kind in "abc"]
        self.engine.import_worker_image(names)
        boxes = [
            Container(uuid.uuid4(), f"t{i}", [ContainerImage("docker", name)])
            for i, name in enumerate(names)
        ]
        executor = HighThroughputExecutor(worker_mode=self.engine.name, scheduler_mode="soft")
        cluster = Cluster(self, executor)
        for _ in range(2):
            cluster.start_manager(workers=2, env=self.engine.environment())
        await cluster.ready(2)
        tasks = [
            Task(uuid.uuid4(), buffer_of(double, i).decode(), box.container_id, box)
            for i in range(3)
            for box in boxes
        ]
        cluster.interchange.submit(tasks)
        for i, task in enumerate(tasks):
            result = await cluster.result(task.task_id, timeout=120)
            self.assertIsNone(result.error_details, result.data)
            self.assertEqual(deserialize(result.data)["value"], 2 * (i // 3))
        warm, cold_starts = cluster.interchange.dispatcher.warm_totals()
        self.assertGreaterEqual(cold_starts, 3)  # each type started at least once
        self.assertTrue(set(warm) <= {box.container_id for box in boxes}, warm)
        self.assertGreaterEqual(sum(warm.values()), 1)
        await cluster.close()
        self.assertEqual(self.engine.containers(), [])


class PodmanTests(_EngineTests, TestCase):
    shared = shared_podman
    missing_image_says = "image not known"


class DockerTests(_EngineTests, TestCase):
    shared = shared_docker
    missing_image_says = "No such image: localhost/not-here:1"


class HarnessTests(SynchronousTestCase):
    def test_skipped_with_the_reason(self) -> None:
        from unittest import SkipTest

        from funcx_endpoint.testing.engines import _skip_unless_usable

        with self.assertRaises(SkipTest) as caught:
            _skip_unless_usable("podman", ["funcx-no-such-engine"])
        reason = str(caught.exception)
        self.assertTrue("funcx-no-such-engine" in reason or "root" in reason, reason)
        if "root" not in reason:
            self.assertIn("apt-get install podman runc", reason)

    def test_worker_rootfs(self) -> None:
        import os
        import sys
        import tarfile

        from funcx_endpoint.testing.rootfs import write_worker_rootfs

        path = os.path.join(self.mktemp() + ".tar")
        counts = write_worker_rootfs(path)
        self.assertGreater(counts["files"], 100)
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
        prefix = sys.base_prefix.lstrip("/")
        self.assertTrue(members["usr/local/bin/python3"].issym())
        self.assertEqual(members["tmp"].mode, 0o1777)
        site = [n for n in members if n.endswith("funcx_endpoint/worker/main.py")]
        self.assertEqual(len(site), 1)
        self.assertTrue(site[0].startswith(prefix))
        self.assertTrue(any(n.endswith("/dill/__init__.py") for n in members))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        stdlib_tests = [n for n in members if f"/lib/{version}/test/" in n]
        self.assertEqual(stdlib_tests, [])
        self.assertTrue(any(n.startswith(("lib/", "usr/lib/")) and "libc.so" in n for n in members))


class _EndToEndTests:
    """SDK -> private service -> broker -> endpoint daemon -> manager -> a worker in a
    container, with this engine: the endpoint-wide container (Globus Compute's
    form: ``container_type`` and ``container_uri`` in config.py), and a function
    registered with a container (hard routing: a block of managers for its type)."""

    shared: Any
    timeout = 300

    def start_endpoint(self, options: str) -> Any:
        """A running endpoint whose executor has ``options`` (config.py source) and
        the engine's environment; its id, SDK client and engine."""
        import os

        from funcx_endpoint.endpoint.layout import EndpointDir
        from funcx_endpoint.testing.service import shared_service
        from tests.support import configure_endpoint, run_cli, sdk_client, wait_for

        engine = self.shared.get()
        engine.import_worker_image()
        service = shared_service()
        env = service.client_env(service.create_client())
        config_dir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        configured = configure_endpoint(config_dir, "boxed", service, env)
        self.assertEqual(configured.returncode, 0, configured.stderr)  # type: ignore[attr-defined]
        ep = EndpointDir(config_dir, "boxed")
        with open(ep.config_file) as f:
            text = f.read()
        text = text.replace(
            'max_workers_per_node=float("inf"),',
            f"max_workers_per_node=1, {options}, worker_environment={engine.environment()!r},",
        )
        with open(ep.config_file, "w") as f:
            f.write(text)
        started = run_cli(config_dir, "start", "boxed", env=env)
        self.addCleanup(run_cli, config_dir, "stop", "boxed", env=env)  # type: ignore[attr-defined]
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)  # type: ignore[attr-defined]
        client = sdk_client(env)
        self.addCleanup(client.close)  # type: ignore[attr-defined]

        def stop() -> None:
            stopped = run_cli(config_dir, "stop", "boxed", env=env)
            self.assertEqual(stopped.returncode, 0, stopped.stderr)  # type: ignore[attr-defined]
            assert wait_for(lambda: engine.containers() == [], 30), engine.containers()

        return ep.endpoint_id(), client, engine, stop

    def test_function_runs_in_the_endpoint_wide_container(self) -> None:
        from tests.test_end_to_end import wait_result

        engine = self.shared.get()
        endpoint_id, client, engine, stop = self.start_endpoint(
            f"container_type={engine.name!r}, container_uri={WORKER_IMAGE!r}"
        )
        function_id = client.register_function(double)
        task = client.run(21, endpoint_id=endpoint_id, function_id=function_id)
        answer = wait_result(client, task, timeout=120)
        self.assertEqual(answer["value"], 42)  # type: ignore[attr-defined]
        self.assertEqual(answer["pid"], 1)  # type: ignore[attr-defined]
        self.assertEqual(len(engine.containers()), 1)  # type: ignore[attr-defined]
        stop()

    def test_function_of_a_registered_container(self) -> None:
        """register_container + register_function(container_uuid=...): the endpoint
        (hard routing) starts a manager for the container's type, whose worker runs
        in its image; a plain function still runs on a raw worker."""
        from tests.test_end_to_end import add, wait_result

        engine = self.shared.get()
        endpoint_id, client, engine, stop = self.start_endpoint(f"worker_mode={engine.name!r}")
        container_id = client.register_container(WORKER_IMAGE, "docker", name="worker")
        function_id = client.register_function(double, container_uuid=container_id)
        task = client.run(5, endpoint_id=endpoint_id, function_id=function_id)
        answer = wait_result(client, task, timeout=180)
        self.assertEqual(answer["value"], 10)  # type: ignore[attr-defined]
        self.assertEqual(answer["pid"], 1)  # type: ignore[attr-defined]
        plain = client.register_function(add)
        task = client.run(1, endpoint_id=endpoint_id, function_id=plain)
        self.assertEqual(wait_result(client, task, timeout=120), 11)  # type: ignore[attr-defined]
        stop()


class PodmanEndToEndTests(_EndToEndTests, SynchronousTestCase):
    shared = shared_podman


class DockerEndToEndTests(_EndToEndTests, SynchronousTestCase):
    shared = shared_docker
