"""Unit tests of workers in containers: the engines' command lines, the task
queues per image, failing images' backoff, the placement of images on worker
slots, and the pool running containers on a fake process reactor.

Nothing here runs a container engine (tests/test_engines.py does); time is a Clock.
"""

from __future__ import annotations

import os
import signal
import stat
import uuid
from typing import Any, Dict, List, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from funcx_endpoint.manager.containers import (
    ENGINES,
    RAW,
    ImageUnavailable,
    WorkerImage,
    describe_container_exit,
    find_engine,
    forwarded_names,
    image_for_task,
    missing_engine_message,
)
from funcx_endpoint.manager.images import (
    BACKOFF_MAX,
    BUSY,
    EMPTY,
    IDLE,
    STARTING,
    IImagePool,
    ImageHealth,
    IWorkerPlacement,
    OneImagePlacement,
    SlotState,
    TaskQueues,
)
from funcx_endpoint.manager.launcher import WorkerLauncher
from funcx_endpoint.manager.pool import WorkerPool
from funcx_endpoint.manager.warm import WarmPlacement, WarmReport
from funcx_endpoint.testing.procreactor import FakeProcess, MemoryProcessReactor
from funcx_endpoint.wire import Container, ContainerImage, ErrorCode, Result, frames
from funcx_endpoint.wire.info import ManagerSettings
from funcx_endpoint.wire.results import read_result
from tests.test_manager import BUFFER, answer, hello, sent_tasks

PYTHON_IMAGE = WorkerImage("podman", "localhost/python:3.11")
OTHER_IMAGE = WorkerImage("podman", "localhost/other:1")
WORKER = ["--worker-id", "2", "--result-size-limit", "100"]


def launch_of(mode: str, options: str = "", env: Optional[Dict[str, str]] = None) -> Any:
    env = env if env is not None else {"FUNCX_WORKER_ID": "2", "PYTHONUNBUFFERED": "1"}
    return ENGINES[mode].launch(
        f"/usr/bin/{mode}", "img:1", WORKER, env, ["FUNCX_WORKER_ID", "PYTHONUNBUFFERED"], options
    )


class CommandLineTests(SynchronousTestCase):
    """Each engine's command line (Singularity, Apptainer and Shifter are only
    checked here: they cannot run on this machine)."""

    def test_podman(self) -> None:
        launch = launch_of("podman", "--memory 1g --cpus=2")
        argv = launch.argv
        self.assertEqual(argv[:3], ["/usr/bin/podman", "run", "--rm"])
        self.assertIn("--preserve-fds=2", argv)
        self.assertIn("--pull=never", argv)
        self.assertIn("--network=none", argv)
        self.assertIn("--env=FUNCX_WORKER_ID", argv)
        self.assertIn("--env=PYTHONUNBUFFERED", argv)
        name = launch.name
        self.assertTrue(name.startswith("funcx-worker-"))
        self.assertIn(f"--name={name}", argv)
        at = argv.index("img:1")
        self.assertEqual(argv[at - 3 : at], ["--memory", "1g", "--cpus=2"])
        self.assertEqual(argv[at + 1 :], ["python3", "-m", "funcx_endpoint.worker", *WORKER])
        self.assertEqual((launch.pipes, launch.task_fd, launch.result_fd), ("fds", 3, 4))
        self.assertEqual(launch.kill, ["/usr/bin/podman", "kill", name])
        # Values stay off the command line: only names.
        self.assertFalse([a for a in argv if a.startswith("--env=") and "=" in a[6:]])

    def test_docker(self) -> None:
        launch = launch_of("docker")
        argv = launch.argv
        self.assertEqual(argv[:4], ["/usr/bin/docker", "run", "--rm", "-i"])
        self.assertNotIn("--preserve-fds=2", argv)
        at = argv.index("img:1")
        self.assertEqual(
            argv[at + 1 :],
            ["python3", "-m", "funcx_endpoint.worker", "--task-fd", "0", "--result-fd", "1"]
            + WORKER,
        )
        self.assertEqual((launch.pipes, launch.task_fd, launch.result_fd), ("stdio", 0, 1))
        self.assertEqual(launch.kill, ["/usr/bin/docker", "kill", launch.name])

    def test_options_choose_pull_and_network(self) -> None:
        argv = launch_of("podman", "--pull=missing --net host").argv
        self.assertNotIn("--pull=never", argv)
        self.assertNotIn("--network=none", argv)
        self.assertIn("--pull=missing", argv)
        argv = launch_of("docker", "--network=bridge").argv
        self.assertIn("--pull=never", argv)
        self.assertNotIn("--network=none", argv)

    def test_singularity_and_apptainer(self) -> None:
        for mode, prefix in (("singularity", "SINGULARITYENV_"), ("apptainer", "APPTAINERENV_")):
            launch = launch_of(mode, "--cleanenv --bind /data")
            self.assertEqual(
                launch.argv,
                [f"/usr/bin/{mode}", "exec", "--cleanenv", "--bind", "/data", "img:1"]
                + ["python3", "-m", "funcx_endpoint.worker", *WORKER],
            )
            self.assertEqual(launch.env[prefix + "FUNCX_WORKER_ID"], "2")
            self.assertEqual(launch.env["FUNCX_WORKER_ID"], "2")
            self.assertEqual(launch.pipes, "fds")
            self.assertIsNone(launch.kill)

    def test_shifter(self) -> None:
        launch = launch_of("shifter", "--volume=/global:/data")
        self.assertEqual(
            launch.argv,
            ["/usr/bin/shifter", "--image=docker:img:1", "--volume=/global:/data", "--"]
            + ["python3", "-m", "funcx_endpoint.worker", *WORKER],
        )
        typed = ENGINES["shifter"].launch("/s", "custom:abc", [], {}, [], "")
        self.assertEqual(typed.argv[1], "--image=custom:abc")

    def test_forwarded_names(self) -> None:
        env = {"FUNCX_WORKER_ID": "1", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0", "X": "y"}
        self.assertEqual(
            forwarded_names(env, {"X": "y"}),
            ["FUNCX_WORKER_ID", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES", "X"],
        )

    def test_exit_statuses(self) -> None:
        self.assertIn("SIGKILL", describe_container_exit(137))
        self.assertIn("out-of-memory", describe_container_exit(137))
        self.assertEqual(describe_container_exit(3), "its container exited with status 3")
        self.assertIn(
            "could not run the container (exit status 125)", ENGINES["podman"].start_failure(125)
        )
        self.assertIn("python3", ENGINES["docker"].start_failure(127))
        self.assertIn("status 1 before it was ready", ENGINES["podman"].start_failure(1))
        self.assertIn("(exit status 255)", ENGINES["apptainer"].start_failure(255))

    def test_the_config_knows_the_same_engines(self) -> None:
        from funcx_endpoint.config.containers import CONTAINER_ENGINES, WORKER_MODES

        self.assertEqual(set(CONTAINER_ENGINES), set(ENGINES))
        self.assertEqual(set(WORKER_MODES), {"no_container", *ENGINES})

    def test_missing_engine(self) -> None:
        empty = self.mktemp()
        os.makedirs(empty)
        self.assertIsNone(find_engine("podman", empty))
        message = missing_engine_message("docker", "node7")
        for expected in ("worker_mode='docker'", "docker command", "node7", "install docker"):
            self.assertIn(expected, message)


def container(*images: tuple) -> Container:
    return Container(
        str(uuid.uuid4()), "sci", [ContainerImage(kind, location) for kind, location in images]
    )


class ImageForTaskTests(SynchronousTestCase):
    def test_modes(self) -> None:
        both = container(("singularity", "/img.sif"), ("docker", "python:3.11"))
        raw = ManagerSettings()
        self.assertEqual(image_for_task(raw, both), RAW)
        podman = ManagerSettings(worker_mode="podman")
        self.assertEqual(image_for_task(podman, None), RAW)
        self.assertEqual(image_for_task(podman, both), WorkerImage("podman", "python:3.11"))
        apptainer = ManagerSettings(worker_mode="apptainer")
        self.assertEqual(image_for_task(apptainer, both), WorkerImage("apptainer", "/img.sif"))
        wide = ManagerSettings(worker_mode="docker", container_uri="mine:1")
        self.assertEqual(image_for_task(wide, both), WorkerImage("docker", "mine:1"))
        self.assertEqual(image_for_task(wide, None), WorkerImage("docker", "mine:1"))
        chosen = ManagerSettings(worker_mode="podman", container_image_types=("singularity",))
        self.assertEqual(image_for_task(chosen, both), WorkerImage("podman", "/img.sif"))

    def test_unavailable(self) -> None:
        shifter_only = container(("shifter", "x"))
        with self.assertRaises(ImageUnavailable) as caught:
            image_for_task(ManagerSettings(worker_mode="podman"), shifter_only)
        self.assertIn("has no image of type 'docker' or 'podman'", str(caught.exception))
        self.assertIn("shifter", str(caught.exception))
        with self.assertRaises(ImageUnavailable) as caught:
            image_for_task(ManagerSettings(worker_mode="docker"), container())
        self.assertIn("without its images", str(caught.exception))


class TaskQueuesTests(SynchronousTestCase):
    def test_per_image_and_oldest(self) -> None:
        queues = TaskQueues()
        self.assertIsNone(queues.oldest())
        queues.add(PYTHON_IMAGE, [("a", b"1"), ("b", b"2")])
        queues.add(OTHER_IMAGE, [("c", b"3")])
        queues.add(PYTHON_IMAGE, [("d", b"4")])
        self.assertEqual(len(queues), 4)
        self.assertEqual(queues.waiting(), {PYTHON_IMAGE: 3, OTHER_IMAGE: 1})
        self.assertEqual(queues.oldest(), PYTHON_IMAGE)
        self.assertEqual(queues.pop(PYTHON_IMAGE), ("a", b"1"))
        self.assertEqual(queues.pop(PYTHON_IMAGE), ("b", b"2"))
        self.assertEqual(queues.oldest(), OTHER_IMAGE)
        self.assertTrue(queues.remove("c"))
        self.assertFalse(queues.remove("c"))
        self.assertEqual(queues.oldest(), PYTHON_IMAGE)
        self.assertEqual(queues.take_all(PYTHON_IMAGE), [("d", b"4")])
        self.assertEqual((len(queues), queues.count(PYTHON_IMAGE)), (0, 0))
        self.assertRaises(IndexError, queues.pop, OTHER_IMAGE)


class ImageHealthTests(SynchronousTestCase):
    def test_backoff_doubles_up_to_the_most(self) -> None:
        clock = Clock()
        retried: List[WorkerImage] = []
        health = ImageHealth(clock, retried.append, first=1.0, most=8.0)
        self.assertIsNone(health.failing(PYTHON_IMAGE))
        self.assertEqual(health.failed(PYTHON_IMAGE, "gone"), 1.0)
        clock.advance(0.5)
        self.assertEqual(health.failing(PYTHON_IMAGE), "gone")
        # Workers of the same attempt failing together count once.
        clock.advance(0.1)
        self.assertIsNone(health.failed(PYTHON_IMAGE, "gone again"))
        self.assertEqual(health.failing(PYTHON_IMAGE), "gone again")
        self.assertEqual(retried, [])
        clock.advance(0.4)
        self.assertEqual(retried, [PYTHON_IMAGE])  # its retry time came
        self.assertIsNone(health.failing(PYTHON_IMAGE))
        delays = []
        for _ in range(5):
            delays.append(health.failed(PYTHON_IMAGE, "x"))
            clock.advance(delays[-1])
        self.assertEqual(delays, [2.0, 4.0, 8.0, 8.0, 8.0])
        self.assertEqual(len(retried), 6)
        self.assertIsNone(health.failing(OTHER_IMAGE))
        health.failed(PYTHON_IMAGE, "x")
        health.succeeded(PYTHON_IMAGE)  # cleared, its call cancelled
        self.assertIsNone(health.failing(PYTHON_IMAGE))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(health.failed(PYTHON_IMAGE, "x"), 1.0)
        health.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(BACKOFF_MAX, 60.0)


@implementer(IImagePool)
class FakeImagePool:
    """Slots and waiting tasks set by the test; run_worker recorded."""

    def __init__(self, slots: List[SlotState], waiting: Optional[Dict[Any, int]] = None) -> None:
        self._slots = slots
        self._waiting = dict(waiting or {})
        self.failing_images: set = set()
        self.runs: List[tuple] = []
        self.oldest: Optional[WorkerImage] = next(iter(self._waiting), None)

    @property
    def worker_count(self) -> int:
        return len(self._slots)

    def slots(self) -> List[SlotState]:
        return list(self._slots)

    def images(self) -> Dict[WorkerImage, int]:
        found: Dict[WorkerImage, int] = {}
        for slot in self._slots:
            if slot.image is not None:
                found[slot.image] = found.get(slot.image, 0) + 1
        return found

    def waiting(self) -> Dict[WorkerImage, int]:
        return dict(self._waiting)

    def oldest_waiting(self) -> Optional[WorkerImage]:
        return self.oldest

    def failing(self, image: WorkerImage) -> bool:
        return image in self.failing_images

    def run_worker(self, index: int, image: WorkerImage) -> None:
        self.runs.append((index, image))


class OneImagePlacementTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        verifyObject(IWorkerPlacement, OneImagePlacement(RAW))
        verifyObject(IImagePool, FakeImagePool([]))

    def test_default_fills_empty_slots(self) -> None:
        pool = FakeImagePool([SlotState(0, None, EMPTY), SlotState(1, RAW, IDLE)])
        OneImagePlacement(RAW).rebalance(pool)
        self.assertEqual(pool.runs, [(0, RAW)])

    def test_no_default_waits_for_a_task(self) -> None:
        pool = FakeImagePool([SlotState(0, None, EMPTY)])
        OneImagePlacement(None).rebalance(pool)
        self.assertEqual(pool.runs, [])
        pool = FakeImagePool([SlotState(0, None, EMPTY)], {PYTHON_IMAGE: 1})
        OneImagePlacement(None).rebalance(pool)
        self.assertEqual(pool.runs, [(0, PYTHON_IMAGE)])

    def test_failing_default_is_not_started(self) -> None:
        pool = FakeImagePool([SlotState(0, None, EMPTY)])
        pool.failing_images.add(PYTHON_IMAGE)
        OneImagePlacement(PYTHON_IMAGE).rebalance(pool)
        self.assertEqual(pool.runs, [])

    def test_switches_all_slots_once_the_other_image_is_idle(self) -> None:
        slots = [SlotState(0, PYTHON_IMAGE, BUSY), SlotState(1, PYTHON_IMAGE, IDLE)]
        pool = FakeImagePool(slots, {OTHER_IMAGE: 2})
        placement = OneImagePlacement(PYTHON_IMAGE)
        placement.rebalance(pool)
        self.assertEqual(pool.runs, [])  # one image at a time: the busy one finishes first
        pool._slots = [SlotState(0, PYTHON_IMAGE, IDLE), SlotState(1, PYTHON_IMAGE, STARTING)]
        placement.rebalance(pool)
        self.assertEqual(pool.runs, [])
        pool._slots = [SlotState(0, PYTHON_IMAGE, IDLE), SlotState(1, PYTHON_IMAGE, IDLE)]
        placement.rebalance(pool)
        self.assertEqual(pool.runs, [(0, OTHER_IMAGE), (1, OTHER_IMAGE)])


# ---------------------------------------------------------------------------
# The pool with containers, on a fake process reactor


def fake_engines(testcase: SynchronousTestCase) -> str:
    """A directory with (empty) executables named as the engines, for PATH."""
    directory = testcase.mktemp()
    os.makedirs(directory)
    for name in ("podman", "docker"):
        path = os.path.join(directory, name)
        with open(path, "w") as handle:
            handle.write("#!/bin/sh\nexit 1\n")
        os.chmod(path, stat.S_IRWXU)
    return directory


class ContainerPool:
    """A WorkerPool of podman (or docker) workers on a MemoryProcessReactor."""

    def __init__(
        self,
        testcase: SynchronousTestCase,
        count: int = 1,
        default: Optional[WorkerImage] = None,
        mode: str = "podman",
        placement: Any = None,
        **settings: Any,
    ) -> None:
        self.reactor = MemoryProcessReactor()
        self.results: List[Result] = []
        self.log_dir = testcase.mktemp()
        self.bin = fake_engines(testcase)
        settings.setdefault("stop_grace_period", 4.0)
        self.settings = ManagerSettings(worker_mode=mode, **settings)
        launcher = WorkerLauncher(
            self.reactor,
            self.settings,
            ["/opt/python", "-m", "funcx_endpoint.worker"],
            {"PATH": self.bin},
        )
        self.pool = WorkerPool(
            self.reactor,
            count,
            self.settings,
            self.log_dir,
            on_result=lambda packed: self.results.append(read_result(packed)),
            hostname="node1",
            launcher=launcher,
            placement=placement or OneImagePlacement(default),
        )
        self.pool.start()
        testcase.addCleanup(self.cleanup, testcase)

    def workers(self) -> List[FakeProcess]:
        return [p for p in self.reactor.processes if p.args[1] == "run"]

    def kills(self) -> List[FakeProcess]:
        return [p for p in self.reactor.processes if p.args[1] == "kill"]

    def submit(self, image: WorkerImage, count: int = 1) -> List[str]:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        self.pool.submit([(task_id, BUFFER.encode()) for task_id in ids], image)
        return ids

    def stderr(self, index: int, text: str) -> None:
        with open(os.path.join(self.log_dir, f"worker-{index}.err"), "a") as handle:
            handle.write(text)

    def cleanup(self, testcase: SynchronousTestCase) -> None:
        stopped = self.pool.stop()
        for child in self.reactor.running_processes():
            child.simulate_killed(signal.SIGTERM)
        testcase.successResultOf(stopped)
        testcase.assertEqual(self.reactor.getDelayedCalls(), [])


class ContainerPoolTests(SynchronousTestCase):
    def test_task_runs_in_its_image(self) -> None:
        harness = ContainerPool(self, count=2)
        self.assertEqual(harness.reactor.processes, [])  # no image until a task says one
        [task_id] = harness.submit(PYTHON_IMAGE)
        workers = harness.workers()
        self.assertEqual(len(workers), 2)
        child = workers[0]
        self.assertEqual(child.args[0], os.path.join(harness.bin, "podman"))
        self.assertIn("localhost/python:3.11", child.args)
        self.assertEqual(child.child_fds[frames.RESULT_FD], "r")
        self.assertEqual(child.env["FUNCX_WORKER_ID"], "0")  # type: ignore[index]
        hello(child)
        self.assertEqual([t[0] for t in sent_tasks(child)], [task_id])
        answer(child, task_id, 5)
        self.assertEqual([r.task_id for r in harness.results], [task_id])
        self.assertEqual(harness.pool.images(), {PYTHON_IMAGE: 2})

    def test_missing_image_fails_its_tasks_with_the_engines_message(self) -> None:
        harness = ContainerPool(self, count=1)
        ids = harness.submit(PYTHON_IMAGE, 2)
        [child] = harness.workers()
        harness.stderr(
            0,
            "Error: localhost/python:3.11: image not known\n",
        )
        child.simulate_exit(125)
        self.assertEqual(sorted(r.task_id for r in harness.results), sorted(ids))
        for result in harness.results:
            assert result.error_details is not None
            self.assertEqual(result.error_details.code, ErrorCode.CONTAINER_ERROR)
            message = result.error_details.user_message
            for expected in (
                "image 'localhost/python:3.11' (podman)",
                "node1",
                "could not run the container (exit status 125)",
                "image not known",
            ):
                self.assertIn(expected, message)
        # Until the retry time, tasks of that image fail at once, no container started.
        [later] = harness.submit(PYTHON_IMAGE)
        self.assertEqual(harness.results[-1].task_id, later)
        self.assertIn("image not known", harness.results[-1].error_details.user_message)  # type: ignore[union-attr]
        self.assertEqual(len(harness.workers()), 1)
        # Another image runs meanwhile.
        [other] = harness.submit(OTHER_IMAGE)
        self.assertIn("localhost/other:1", harness.workers()[-1].args)
        hello(harness.workers()[-1])
        answer(harness.workers()[-1], other)
        self.assertEqual(harness.results[-1].task_id, other)
        # After the backoff the image is tried again for a new task.
        harness.reactor.advance(1.0)
        harness.submit(PYTHON_IMAGE)
        switching = harness.workers()[-1]
        self.assertIn(frames.TASK_FD, switching.closed_by_parent)  # its idle worker ends
        switching.simulate_exit(0)
        self.assertIn("localhost/python:3.11", harness.workers()[-1].args)

    def test_killed_mid_task_is_worker_lost_with_the_exit_status(self) -> None:
        harness = ContainerPool(self, count=1)
        first, second = harness.submit(PYTHON_IMAGE, 2)
        [child] = harness.workers()
        hello(child)
        child.simulate_exit(137)
        [lost] = harness.results
        assert lost.error_details is not None
        self.assertEqual(lost.task_id, first)
        self.assertEqual(lost.error_details.code, ErrorCode.WORKER_LOST)
        message = lost.error_details.user_message
        for expected in ("status 137", "SIGKILL", "image 'localhost/python:3.11' (podman)"):
            self.assertIn(expected, message)
        replacement = harness.workers()[-1]
        self.assertIsNot(replacement, child)
        hello(replacement)
        self.assertEqual([t[0] for t in sent_tasks(replacement)], [second])

    def test_timeout_kills_the_container_by_name(self) -> None:
        harness = ContainerPool(self, count=1, task_timeout=5)
        [task_id] = harness.submit(PYTHON_IMAGE)
        [child] = harness.workers()
        hello(child)
        harness.reactor.advance(5)
        self.assertEqual(harness.results[0].error_details.code, ErrorCode.TASK_TIMEOUT)  # type: ignore[union-attr]
        self.assertIn("KILL", child.signals)
        [kill] = harness.kills()
        self.assertEqual(kill.args[2], child.args[child.args.index("run") + 3][len("--name=") :])
        kill.simulate_exit(0)
        child.simulate_killed(signal.SIGKILL)

    def test_docker_pipes_are_stdio(self) -> None:
        harness = ContainerPool(self, count=1, mode="docker")
        [task_id] = harness.submit(WorkerImage("docker", "img:1"))
        [child] = harness.workers()
        self.assertEqual(child.child_fds[1], "r")
        self.assertIsInstance(child.child_fds[0], int)
        self.assertNotIn(frames.TASK_FD, child.child_fds)
        child.simulate_output(1, frames.encode_hello({"pid": 1, "python": "3.11"}))
        self.assertEqual(harness.pool.counts()["running"], 1)

    def test_default_image_starts_at_once(self) -> None:
        harness = ContainerPool(self, count=2, default=PYTHON_IMAGE)
        self.assertEqual(len(harness.workers()), 2)


class WarmPlacementTests(SynchronousTestCase):
    A = WorkerImage("podman", "a")
    B = WorkerImage("podman", "b")
    C = WorkerImage("podman", "c")
    D = WorkerImage("podman", "d")

    def test_interface(self) -> None:
        verifyObject(IWorkerPlacement, WarmPlacement())

    def test_empty_slots_start_what_waits_within_the_limits(self) -> None:
        slots = [SlotState(i, None, EMPTY) for i in range(4)]
        pool = FakeImagePool(slots, {self.A: 5, self.B: 1})
        WarmPlacement(per_type=2).rebalance(pool)
        self.assertEqual(pool.runs, [(0, self.A), (1, self.A), (2, self.B)])
        pool = FakeImagePool(slots, {self.A: 5, self.B: 1})
        WarmPlacement(total=2).rebalance(pool)
        self.assertEqual(pool.runs, [(0, self.A), (1, self.A)])
        pool = FakeImagePool(slots, {})
        WarmPlacement().rebalance(pool)
        self.assertEqual(pool.runs, [])  # nothing waits: nothing starts

    def test_least_recently_used_idle_worker_is_retired(self) -> None:
        slots = [
            SlotState(0, self.A, IDLE, since=5.0),
            SlotState(1, self.B, IDLE, since=1.0),
            SlotState(2, self.C, BUSY),
            SlotState(3, self.A, IDLE, since=3.0),
        ]
        pool = FakeImagePool(slots, {self.D: 1})
        WarmPlacement().rebalance(pool)
        self.assertEqual(pool.runs, [(1, self.D)])
        pool = FakeImagePool(slots, {self.D: 3})
        WarmPlacement().rebalance(pool)
        self.assertEqual(pool.runs, [(1, self.D)])  # only for a type with no worker

    def test_no_retirement_for_a_type_that_has_workers(self) -> None:
        slots = [SlotState(0, self.A, BUSY), SlotState(1, self.B, IDLE, since=0.0)]
        pool = FakeImagePool(slots, {self.A: 3})
        WarmPlacement().rebalance(pool)
        self.assertEqual(pool.runs, [])

    def test_idle_workers_wanted_and_failing_images_stay(self) -> None:
        slots = [SlotState(0, self.A, IDLE), SlotState(1, self.B, IDLE, since=9.0)]
        pool = FakeImagePool(slots, {self.A: 1, self.C: 1})
        pool.oldest = self.C
        WarmPlacement().rebalance(pool)
        self.assertEqual(pool.runs, [(1, self.C)])  # A's idle worker is wanted
        pool = FakeImagePool(slots, {self.C: 1})
        pool.failing_images.add(self.C)
        WarmPlacement().rebalance(pool)
        self.assertEqual(pool.runs, [])


class WarmReportTests(SynchronousTestCase):
    def test_types_per_image_and_changes(self) -> None:
        report = WarmReport()
        image = WorkerImage("docker", "sci")
        report.served(image, "c1")
        report.served(image, "c2")
        report.served(RAW, None)
        self.assertEqual(report.warm({image: 2, RAW: 1}), {"c1": 2, "c2": 2, "RAW": 1})
        self.assertEqual(report.update({}, 0), ({}, 0))
        self.assertIsNone(report.update({}, 0))
        self.assertEqual(report.update({image: 1}, 1), ({"c1": 1, "c2": 1}, 1))
        self.assertIsNone(report.update({image: 1}, 1))
        self.assertEqual(report.update({image: 1}, 2), ({"c1": 1, "c2": 1}, 2))


class SoftPoolTests(SynchronousTestCase):
    A = WorkerImage("podman", "a")
    B = WorkerImage("podman", "b")
    C = WorkerImage("podman", "c")

    def test_warm_workers_of_several_images_and_cold_starts(self) -> None:
        harness = ContainerPool(self, count=2, placement=WarmPlacement(per_type=1))
        pool = harness.pool
        self.assertEqual(harness.workers(), [])
        first, second = harness.submit(self.A, 2)
        [a] = harness.workers()  # one per type
        [b_task] = harness.submit(self.B)
        [_, b] = harness.workers()
        self.assertIn("b", b.args)
        self.assertEqual(pool.cold_starts, 2)
        self.assertEqual(pool.images(), {self.A: 1, self.B: 1})
        hello(a)
        hello(b)
        self.assertEqual([t[0] for t in sent_tasks(a)], [first])
        answer(a, first)
        self.assertEqual([t[0] for t in sent_tasks(a)], [first, second])  # warm: no start
        answer(a, second)
        self.assertEqual(pool.cold_starts, 2)
        # C waits; B is busy, A idle: A's worker (least recently used idle) makes room.
        harness.reactor.advance(1)
        [c_task] = harness.submit(self.C)
        self.assertIn(frames.TASK_FD, a.closed_by_parent)
        a.simulate_exit(0)
        c = harness.workers()[-1]
        self.assertIn("c", c.args)
        self.assertEqual(pool.cold_starts, 3)
        self.assertEqual(pool.images(), {self.B: 1, self.C: 1})
        hello(c)
        self.assertEqual([t[0] for t in sent_tasks(c)], [c_task])
        answer(b, b_task)
        answer(c, c_task)
        self.assertEqual(len(harness.results), 4)
        self.assertTrue(all(r.error_details is None for r in harness.results))

    def test_restarted_worker_of_a_warm_image_is_not_cold(self) -> None:
        harness = ContainerPool(self, count=2, placement=WarmPlacement())
        harness.submit(self.A, 2)
        first, second = harness.workers()
        self.assertEqual(harness.pool.cold_starts, 1)  # the second started beside the first
        hello(first)
        hello(second)
        first.simulate_killed(signal.SIGKILL)
        self.assertEqual(harness.pool.cold_starts, 1)


# ---------------------------------------------------------------------------
# The manager service with containers


class ContainerServiceTests(SynchronousTestCase):
    def executor(self, **options: Any) -> Any:
        from funcx_endpoint.config.model import HighThroughputExecutor

        return HighThroughputExecutor(**options)

    def test_missing_engine_quits_with_ex_config(self) -> None:
        from funcx_endpoint.manager.service import EXIT_CONFIG
        from tests.test_manager import Link

        empty = self.mktemp()
        os.makedirs(empty)
        link = Link(
            self,
            worker_count=1,
            executor=self.executor(worker_mode="podman"),
            service_options={"environment": {"PATH": empty}},
        )
        self.assertEqual(link.codes, [EXIT_CONFIG])
        self.assertEqual(link.reactor.processes, [])
        self.assertEqual(link.interchange.managers(), [])
        link.finish()

    def test_task_of_a_container_runs_in_its_image(self) -> None:
        from funcx_endpoint.manager.service import ManagerIdentity
        from funcx_endpoint.wire import Task
        from tests.test_manager import Link

        box = container(("docker", "localhost/sci:1"))
        link = Link(
            self,
            worker_count=1,
            executor=self.executor(worker_mode="podman", container_cmd_options="--cpus 1"),
            service_options={"environment": {"PATH": fake_engines(self)}},
            identity=ManagerIdentity(
                manager_id="m1", hostname="node1", container_type=box.container_id
            ),
        )
        self.assertEqual(link.reactor.processes, [])  # hard routing: no image yet
        task = Task(uuid.uuid4(), BUFFER, container_id=box.container_id, container=box)
        link.interchange.submit([task])
        link.flush()
        [child] = link.reactor.processes
        self.assertIn("localhost/sci:1", child.args)
        self.assertIn("--cpus", child.args)
        hello(child)
        link.flush()
        [(task_id, _, _)] = sent_tasks(child)
        answer(child, task_id, 7)
        link.flush()
        self.assertEqual([r.task_id for r in link.results], [task.task_id])
        # WarmContainers: nothing warm after registration, then its type warm, 1 cold start.
        self.assertEqual(self.warm_sent, [({}, 0), ({box.container_id: 1}, 1)])
        link.finish()

    def setUp(self) -> None:
        from funcx_endpoint.manager.service import ManagerService

        self.warm_sent: List[tuple] = []
        original = ManagerService._report_warm

        def recording(service: Any) -> None:
            before = service.warm_report._sent
            original(service)
            if service.warm_report._sent is not before:
                self.warm_sent.append(service.warm_report._sent)

        self.patch(ManagerService, "_report_warm", recording)

    def test_container_without_an_image_of_the_engine(self) -> None:
        from funcx_endpoint.manager.service import ManagerIdentity
        from funcx_endpoint.wire import Task
        from tests.test_manager import Link

        box = container(("singularity", "/x.sif"))
        link = Link(
            self,
            worker_count=1,
            executor=self.executor(worker_mode="docker"),
            service_options={"environment": {"PATH": fake_engines(self)}},
            identity=ManagerIdentity(manager_id="m1", container_type=box.container_id),
        )
        task = Task(uuid.uuid4(), BUFFER, container_id=box.container_id, container=box)
        link.interchange.submit([task])
        link.flush()
        link.advance(1)
        [result] = link.results
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.CONTAINER_ERROR)
        self.assertIn("no image of type 'docker'", result.error_details.user_message)
        self.assertEqual(link.reactor.processes, [])
        link.finish()

    def test_endpoint_wide_image(self) -> None:
        from funcx_endpoint.wire import Task
        from tests.test_manager import Link

        link = Link(
            self,
            worker_count=2,
            executor=self.executor(container_type="docker", container_uri="mine:2"),
            service_options={"environment": {"PATH": fake_engines(self)}},
        )
        workers = link.reactor.processes
        self.assertEqual(len(workers), 2)  # started at once, in the one image
        self.assertTrue(all("mine:2" in w.args and w.args[1] == "run" for w in workers))
        for worker in workers:  # docker: the result pipe is the CLI's stdout
            worker.simulate_output(1, frames.encode_hello({"pid": 1, "python": "3.11"}))
        link.flush()
        link.interchange.submit([Task(uuid.uuid4(), BUFFER)])  # no container: the same image
        link.flush()
        assert link.service.pool is not None
        self.assertEqual(link.service.pool.counts()["running"], 1)
        self.assertEqual(link.service.pool.images(), {WorkerImage("docker", "mine:2"): 2})
        link.finish()


class ManagerCommandTests(SynchronousTestCase):
    def test_soft_routing_without_a_container_type(self) -> None:
        from funcx_endpoint.manager.main import parse_args, placement_for

        base = ["--info-file", "x", "--block-id", "1"]
        podman = ManagerSettings(worker_mode="podman")
        placement = placement_for(podman, parse_args(base + ["--warm-per-type", "2"]))
        self.assertEqual(placement, WarmPlacement(per_type=2, total=None))
        hard = parse_args(base + ["--container-type", str(uuid.uuid4())])
        self.assertIsNone(placement_for(podman, hard))
        self.assertIsNone(placement_for(ManagerSettings(), parse_args(base)))
        wide = ManagerSettings(worker_mode="docker", container_uri="img")
        self.assertIsNone(placement_for(wide, parse_args(base)))
