"""Routing by container type: the dispatcher with WarmContainers, the choice of
policy from the config, blocks per type (hard routing), and an interchange
with simulated container managers over real TLS connections (three types,
several managers)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import uuid
from typing import Any, Dict, List, Tuple

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from funcx_endpoint.config.model import HighThroughputExecutor
from funcx_endpoint.executor.blocks import BlockScaler
from funcx_endpoint.executor.dispatcher import TaskDispatcher
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.executor.interface import ITypedLoadSource
from funcx_endpoint.executor.providers import JobState, ProviderAdapter
from funcx_endpoint.executor.routing import RAW, LeastLoadedRouting
from funcx_endpoint.executor.routing_mode import routing_for, scheduler_mode
from funcx_endpoint.executor.soft_routing import WarmFirstRouting
from funcx_endpoint.executor.strategy import Decision, ScalingService, SimpleStrategy
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.testing.warm_managers import (
    SimulatedContainerManager,
    SlotSettings,
    connect_managers,
)
from funcx_endpoint.wire import Container, ErrorCode, PackedResult, Task, serialize
from tests.test_blocks import FakeLoadSource, FakeProvider
from tests.test_routing import FakeManager

TYPES = [str(uuid.UUID(int=i + 1)) for i in range(3)]


def task_of(container_type: str) -> Task:
    if container_type == RAW:
        return Task(uuid.uuid4(), "buffer")
    return Task(uuid.uuid4(), "buffer", container=Container(container_type, "image"))


def answer(task_id: str) -> bytes:
    return PackedResult.success(task_id, serialize(None)).encode()


def containers_executor(mode: str = "hard", **changes: Any) -> HighThroughputExecutor:
    executor = HighThroughputExecutor()
    # config.py takes only no_container until the container modes land (the
    # engines' branch); the routing reads the field as it will be.
    executor.worker_mode = "docker"
    executor.scheduler_mode = mode
    for name, value in changes.items():
        setattr(executor, name, value)
    return executor


class DispatcherWarmTests(SynchronousTestCase):
    """The dispatcher keeps warm workers, cold starts and tasks by type."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = CollectingSink()
        self.dispatcher = TaskDispatcher(
            self.clock, self.sink, WarmFirstRouting(self.clock, rng=random.Random(1))
        )

    def flush(self) -> None:
        for _ in range(5):
            self.clock.advance(0.01)

    def test_warm_manager_gets_the_tasks_of_its_type(self) -> None:
        cold, warm = FakeManager(RAW, workers=2), FakeManager(RAW, workers=2)
        for manager in (cold, warm):
            self.dispatcher.manager_joined(manager)
        self.dispatcher.warm_containers(warm, {TYPES[0]: 2}, 2)
        cold_busy = [task_of(TYPES[1]) for _ in range(2)]
        self.dispatcher.submit(cold_busy)
        self.flush()
        tasks = [task_of(TYPES[0]) for _ in range(2)]
        self.dispatcher.submit(tasks)
        self.flush()
        self.assertEqual([t for t, _ in warm.sent][-2:], [t.task_id for t in tasks])
        slot = self.dispatcher._slots[warm]
        self.assertEqual(slot.held_of_type.get(TYPES[0]), 2)
        # Tasks held count under their own type, not the manager's (RAW).
        self.assertEqual(self.dispatcher.load_totals()[2], {RAW: 0, TYPES[0]: 2, TYPES[1]: 2})
        self.dispatcher.results_received(warm, [answer(tasks[0].task_id)])
        self.assertEqual(slot.held_of_type.get(TYPES[0]), 1)
        self.dispatcher.manager_left(warm, "gone", on_purpose=False)
        self.assertEqual(self.dispatcher.load_totals()[2], {RAW: 0, TYPES[1]: 2})
        self.flush()

    def test_cold_start_totals_outlive_managers(self) -> None:
        a, b = FakeManager(RAW), FakeManager(RAW)
        self.dispatcher.manager_joined(a)
        self.dispatcher.manager_joined(b)
        self.dispatcher.warm_containers(a, {TYPES[0]: 1, TYPES[1]: 1}, 3)
        self.dispatcher.warm_containers(a, {TYPES[0]: 2}, 5)
        self.dispatcher.warm_containers(b, {TYPES[0]: 1}, 1)
        self.assertEqual(self.dispatcher.warm_totals(), ({TYPES[0]: 3}, 6))
        self.assertEqual(self.dispatcher.cold_starts_of(a), 5)
        self.dispatcher.manager_left(a, "gone", on_purpose=False)
        self.assertEqual(self.dispatcher.warm_totals(), ({TYPES[0]: 1}, 6))
        self.assertEqual(self.dispatcher.cold_starts_of(a), 0)
        self.flush()

    def test_unservable_type_fails_at_once(self) -> None:
        dispatcher = TaskDispatcher(
            self.clock,
            self.sink,
            LeastLoadedRouting(containers=True, unservable=lambda t: f"nobody runs {t}"),
        )
        typed, raw = task_of(TYPES[0]), task_of(RAW)
        dispatcher.submit([typed, raw])
        self.flush()
        [result] = self.sink.results
        self.assertEqual(result.task_id, typed.task_id)
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.CONTAINER_ERROR)
        self.assertIn(f"nobody runs {TYPES[0]}", result.data)
        self.assertEqual(dispatcher.queued(), {RAW: 1})


class ChoiceOfPolicyTests(SynchronousTestCase):
    """The routing policy and manager command a config asks for."""

    def test_no_containers(self) -> None:
        executor = HighThroughputExecutor(scheduler_mode="soft")
        self.assertEqual(scheduler_mode(executor), "raw")
        policy = routing_for(executor, Clock())
        self.assertIsInstance(policy, LeastLoadedRouting)
        self.assertEqual(policy.task_type(task_of(TYPES[0])), RAW)

    def test_endpoint_wide_image_is_raw(self) -> None:
        executor = containers_executor("soft")
        executor.container_uri = "docker.io/python:3.11"  # type: ignore[attr-defined]
        self.assertEqual(scheduler_mode(executor), "raw")

    def test_soft(self) -> None:
        policy = routing_for(containers_executor("soft", cold_routing_interval=2.5), Clock())
        self.assertIsInstance(policy, WarmFirstRouting)
        assert isinstance(policy, WarmFirstRouting)
        self.assertEqual(policy.cold_routing_interval, 2.5)

    def test_hard(self) -> None:
        policy = routing_for(containers_executor("hard"), Clock())
        self.assertIsInstance(policy, LeastLoadedRouting)
        self.assertEqual(policy.task_type(task_of(TYPES[0])), TYPES[0])
        self.assertIsNone(policy.why_unservable(TYPES[0], None))

    def test_hard_on_kubernetes_cannot_start_managers_per_type(self) -> None:
        class KubernetesProvider:
            image = "python:3.11"

        executor = containers_executor("hard")
        executor.provider = KubernetesProvider()
        policy = routing_for(executor, Clock())
        why = policy.why_unservable(TYPES[0], None)
        assert why is not None
        self.assertIn("one image (python:3.11)", why)
        self.assertIn(TYPES[0], why)

    def test_manager_command(self) -> None:
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work)
        hard = Interchange(Clock(), work, containers_executor("hard"), CollectingSink())
        self.assertEqual(hard.manager_command("0")[-2:], ["--container-type", "{container_type}"])
        soft = Interchange(Clock(), work, containers_executor("soft"), CollectingSink())
        self.assertNotIn("--container-type", soft.manager_command("0"))
        raw = Interchange(Clock(), work, HighThroughputExecutor(), CollectingSink())
        self.assertNotIn("--container-type", raw.manager_command("0"))

    def test_config_notices(self) -> None:
        raw = HighThroughputExecutor(scheduler_mode="soft", cold_routing_interval=1.0)
        self.assertEqual(
            {n.setting for n in raw.notices()},
            {
                "HighThroughputExecutor.scheduler_mode",
                "HighThroughputExecutor.cold_routing_interval",
            },
        )
        hard = HighThroughputExecutor(cold_routing_interval=1.0)
        hard.worker_mode = "docker"
        [notice] = hard.notices()
        self.assertIn("only soft routing", notice.text())
        soft = HighThroughputExecutor(scheduler_mode="soft", cold_routing_interval=1.0)
        soft.worker_mode = "docker"
        self.assertEqual(soft.notices(), [])

    def test_soft_refused_on_kubernetes(self) -> None:
        from funcx_endpoint.config.fields import ConfigError

        class KubernetesProvider:
            pass

        executor = containers_executor("soft")
        executor.provider = KubernetesProvider()
        with self.assertRaises(ConfigError) as caught:
            executor.validate()
        self.assertIn("not supported with Kubernetes", str(caught.exception))
        executor.scheduler_mode = "hard"
        executor.validate()

    def test_scheduler_mode_values(self) -> None:
        from funcx_endpoint.config.fields import ConfigError

        with self.assertRaises((ConfigError, ValueError, TypeError)):
            HighThroughputExecutor(scheduler_mode="warm")


@implementer(ITypedLoadSource)
class TypedLoadSource(FakeLoadSource):
    """Outstanding tasks by container type, as the test sets them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_type: Dict[str, int] = {}

    def outstanding_tasks(self) -> int:
        return sum(self.by_type.values())

    def outstanding_by_type(self) -> Dict[str, int]:
        return dict(self.by_type)


TEMPLATE = "funcx-manager --block-id {block_id} --container-type '{container_type}'"


class BlocksPerTypeTests(SynchronousTestCase):
    """Hard routing: each type's blocks for its own tasks."""

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(ITypedLoadSource, TypedLoadSource()))
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work)
        interchange = Interchange(Clock(), work, containers_executor(), CollectingSink())
        self.assertTrue(verifyObject(ITypedLoadSource, interchange))

    def build(self, **provider_args: Any) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(**provider_args)
        self.load = TypedLoadSource()
        self.scaler = BlockScaler(
            ProviderAdapter(self.provider, self.clock), self.load, self.clock, TEMPLATE
        )
        self.strategy = SimpleStrategy(
            self.scaler,
            self.load,
            self.clock,
            interval=5.0,
            max_idletime=60.0,
            workers_per_node=4,
            per_type=True,
        )
        self.service = ScalingService(self.scaler, self.strategy)
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.service.running:
            self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def tick(self) -> Decision:
        decision = self.strategy.decide_per_type()
        self.successResultOf(self.strategy.tick())
        return decision

    def types(self) -> Dict[str, int]:
        found: Dict[str, int] = {}
        for block in self.scaler.active_blocks():
            found[block.container_type] = found.get(block.container_type, 0) + 1
        return found

    def test_blocks_for_each_type(self) -> None:
        self.build(max_blocks=10)
        self.load.by_type = {TYPES[0]: 9, TYPES[1]: 1}
        decision = self.tick()
        self.assertEqual(dict(decision.scale_out_types), {TYPES[0]: 3, TYPES[1]: 1})
        self.assertEqual(self.types(), {TYPES[0]: 3, TYPES[1]: 1})
        commands = [command for command, _, _ in self.provider.submitted]
        self.assertIn(f"--container-type '{TYPES[1]}'", " ".join(commands))
        self.assertEqual(self.tick().scale_out_types, ())
        self.assertIn("active_by_container_type", self.scaler.status_fields()["blocks"])

    def test_types_without_a_block_first(self) -> None:
        self.build(max_blocks=2)
        self.load.by_type = {TYPES[0]: 100, TYPES[1]: 1, TYPES[2]: 1}
        decision = self.tick()
        # Two blocks: one for each of two types, not both for the busiest.
        self.assertEqual(len(decision.scale_out_types), 2)
        self.assertEqual({n for _, n in decision.scale_out_types}, {1})

    def test_starved_type_takes_the_place_of_an_idle_block(self) -> None:
        self.build(max_blocks=1)
        self.load.by_type = {TYPES[0]: 1}
        self.tick()
        self.assertEqual(self.types(), {TYPES[0]: 1})
        [block] = self.scaler.active_blocks()
        self.provider.set_all(JobState.RUNNING)
        self.load.connect(block.block_id, idle_since=self.clock.seconds())
        self.load.by_type = {TYPES[1]: 5}
        decision = self.tick()
        self.assertEqual(decision.scale_in, (block.block_id,))
        self.assertIn(TYPES[1], decision.reason)
        self.load.disconnect_block(block.block_id)
        self.assertEqual(dict(self.tick().scale_out_types), {TYPES[1]: 1})

    def test_busy_blocks_are_not_taken(self) -> None:
        self.build(max_blocks=1)
        self.load.by_type = {TYPES[0]: 1}
        self.tick()
        [block] = self.scaler.active_blocks()
        self.load.connect(block.block_id, idle_since=None, active_tasks=1)
        self.load.by_type = {TYPES[0]: 1, TYPES[1]: 5}
        self.assertEqual(self.tick(), Decision(reason="steady"))


class SimulatedManagersTests(TestCase):
    """A real interchange (TLS, AMP) and simulated container managers: three
    container types, several managers."""

    timeout = 60

    def setUp(self) -> None:
        self.work = tempfile.mkdtemp(prefix="routing-")
        self.addCleanup(shutil.rmtree, self.work, True)

    async def run_tasks(
        self,
        executor: HighThroughputExecutor,
        settings: List[SlotSettings],
        tasks: List[Task],
    ) -> Tuple[Interchange, List[SimulatedContainerManager], List[Any]]:
        done: Deferred[None] = Deferred()
        results: List[Any] = []

        def collected(batch: List[Any]) -> None:
            results.extend(batch)
            if len(results) >= len(tasks) and not done.called:
                done.callback(None)

        sink = CollectingSink(on_batch=collected)
        interchange = Interchange(global_reactor, os.path.join(self.work, "ix"), executor, sink)
        interchange.startService()
        self.addCleanup(interchange.stopService)
        managers: List[SimulatedContainerManager] = []
        for index, one in enumerate(settings):
            managers += await connect_managers(
                global_reactor, interchange.info_file, 1, one, block_id=f"b{index}"
            )
        await interchange.when_managers(len(settings))
        interchange.submit(tasks)
        await done
        return interchange, managers, sink.results

    async def test_soft_routing(self) -> None:
        rng = random.Random(4)
        tasks = [task_of(rng.choice(TYPES)) for _ in range(120)]
        settings = [SlotSettings(worker_count=2, cold_start=0.05, task_seconds=0.002)] * 4
        interchange, managers, results = await self.run_tasks(
            containers_executor("soft", cold_routing_interval=0.5), settings, tasks
        )
        self.assertEqual(len(results), 120)
        self.assertFalse([r for r in results if r.is_error])
        cold_starts = sum(m.cold_starts for m in managers)
        self.assertGreaterEqual(cold_starts, 3)  # every type at least once
        # Warm workers are reused: far fewer cold starts than tasks.
        self.assertLess(cold_starts, 40)
        routing = interchange.status_fields()["routing"]
        self.assertEqual(routing["scheduler_mode"], "soft")
        self.assertEqual(routing["cold_starts"], cold_starts)
        self.assertEqual(sum(routing["cold_starts_by_manager"].values()), cold_starts, routing)
        self.assertEqual(routing["warm_workers"], self.warm_of(managers))

    def warm_of(self, managers: List[SimulatedContainerManager]) -> Dict[str, int]:
        found: Dict[str, int] = {}
        for manager in managers:
            for container_type, count in manager.warm().items():
                found[container_type] = found.get(container_type, 0) + count
        return found

    async def test_hard_routing(self) -> None:
        rng = random.Random(5)
        tasks = [task_of(rng.choice(TYPES)) for _ in range(90)]
        settings = [
            SlotSettings(worker_count=2, cold_start=0.01, task_seconds=0.001, container_type=t)
            for t in TYPES + TYPES[:1]
        ]
        interchange, managers, results = await self.run_tasks(
            containers_executor("hard"), settings, tasks
        )
        self.assertEqual(len(results), 90)
        self.assertFalse([r for r in results if r.is_error])
        for manager in managers:
            self.assertEqual(manager.wrong_type, [])
            self.assertEqual(set(manager.tasks_by_type), {manager.settings.container_type})
        expected: Dict[str, int] = {}
        for task in tasks:
            assert task.container is not None
            of_type = task.container.container_id
            expected[of_type] = expected.get(of_type, 0) + 1
        ran: Dict[str, int] = {}
        for manager in managers:
            for container_type, count in manager.tasks_by_type.items():
                ran[container_type] = ran.get(container_type, 0) + count
        self.assertEqual(ran, expected)
        self.assertEqual(interchange.status_fields()["routing"]["scheduler_mode"], "hard")
