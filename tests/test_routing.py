"""The interchange's parts alone: the routing policy and its index of managers with
room, the manager lifecycle, the interfaces."""

from __future__ import annotations

import heapq
import random
import uuid
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from funcx_endpoint.endpoint.publishing import ResultPublisher
from funcx_endpoint.endpoint.service import EndpointService
from funcx_endpoint.endpoint.status import StatusReporter
from funcx_endpoint.endpoint.transport import Transport
from funcx_endpoint.executor.dispatcher import TaskDispatcher
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.executor.interface import (
    IInterchange,
    ILoadSource,
    IManagerEvents,
    IManagerLoad,
    IResultSink,
    IRoutingPolicy,
    IWarmManagerLoad,
)
from funcx_endpoint.executor.registry import Manager, ManagerRegistry
from funcx_endpoint.executor.routing import RAW, LeastLoadedRouting, ManagerHeap, RandomSet
from funcx_endpoint.executor.soft_routing import RandomRouting, WarmFirstRouting
from funcx_endpoint.executor.strategy import ScalingService
from funcx_endpoint.lifecycle import IDrainingPart, IReadyPart, IStatusPart
from funcx_endpoint.testing.interchanges import CollectingSink, EchoInterchange, HoldingInterchange
from funcx_endpoint.wire import Container, Task
from funcx_endpoint.wire.info import local_versions


@implementer(IManagerLoad)
class Load:
    """A manager as a routing policy sees it."""

    def __init__(
        self, sequence: int, workers: int, held: int = 0, prefetch: int = 0, kind: str = RAW
    ) -> None:
        self.sequence = sequence
        self.worker_count = workers
        self.capacity = workers + prefetch * workers
        self.held = held
        self.container_type = kind

    def __repr__(self) -> str:
        return f"Load({self.sequence})"


def by_sequence(pairs: List[Tuple[Any, int]]) -> List[Tuple[int, int]]:
    return sorted((manager.sequence, count) for manager, count in pairs)


_indexed: weakref.WeakKeyDictionary[Any, List[Any]] = weakref.WeakKeyDictionary()


def assign(
    policy: LeastLoadedRouting, container_type: str, count: int, managers: Sequence[Any]
) -> List[Tuple[Any, int]]:
    """A decision over exactly ``managers`` as they are now: the policy's index
    (which it keeps between calls) is set to them first."""
    for manager in _indexed.pop(policy, []):
        policy.remove(manager)
    for manager in managers:
        policy.update(manager)
    _indexed[policy] = list(managers)
    return policy.assign(container_type, count)


class LeastLoadedRoutingTests(SynchronousTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRoutingPolicy, LeastLoadedRouting()))
        self.assertTrue(verifyObject(IManagerLoad, Load(1, 2)))

    def test_task_types(self) -> None:
        container = Container(uuid.uuid4(), "c")
        plain, named, contained = (
            Task(uuid.uuid4(), "b"),
            Task(uuid.uuid4(), "b", container_id=uuid.uuid4()),
            Task(uuid.uuid4(), "b", container=container),
        )
        raw = LeastLoadedRouting(containers=False)
        self.assertEqual({raw.task_type(t) for t in (plain, named, contained)}, {RAW})
        typed = LeastLoadedRouting(containers=True)
        self.assertEqual(typed.task_type(plain), RAW)
        self.assertEqual(typed.task_type(named), named.container_id)
        self.assertEqual(typed.task_type(contained), container.container_id)

    def test_least_loaded_first_ties_to_the_first_registered(self) -> None:
        policy = LeastLoadedRouting()
        managers = [Load(1, 2, held=2, prefetch=2), Load(2, 2, prefetch=2), Load(3, 4, prefetch=2)]
        # Loads per worker: 1.0, 0, 0.  Six tasks: to 2 and 3 until they match 1's load.
        self.assertEqual(by_sequence(assign(policy, RAW, 6, managers)), [(2, 2), (3, 4)])
        self.assertEqual(by_sequence(assign(policy, RAW, 1, managers)), [(2, 1)])

    def test_never_more_than_room(self) -> None:
        policy = LeastLoadedRouting()
        managers = [Load(1, 1, held=1, prefetch=1), Load(2, 1)]
        self.assertEqual(by_sequence(assign(policy, RAW, 10, managers)), [(1, 1), (2, 1)])
        [(only, count)] = assign(policy, RAW, 10, [Load(5, 2, held=1, prefetch=1)])
        self.assertEqual((only.sequence, count), (5, 3))

    def test_only_managers_of_the_type(self) -> None:
        policy = LeastLoadedRouting(containers=True)
        managers = [Load(1, 2, kind="docker-a"), Load(2, 2, kind=RAW)]
        self.assertEqual(by_sequence(assign(policy, "docker-a", 5, managers)), [(1, 2)])
        self.assertEqual(assign(policy, "docker-b", 5, managers), [])
        self.assertEqual(assign(policy, RAW, 0, managers), [])


def reference_assign(
    container_type: str, count: int, managers: Sequence[Load]
) -> List[Tuple[Load, int]]:
    """The policy without its index: a heap over every candidate, built for each
    call (the behaviour the index must keep).  A manager with idle workers takes
    up to half its workers' worth a pick; one whose workers are all busy takes a
    chunk of one task per worker (as its room allows)."""
    candidates = [m for m in managers if m.container_type == container_type and m.held < m.capacity]
    heap = [(m.held / max(m.worker_count, 1), m.sequence, m.held, m) for m in candidates]
    heapq.heapify(heap)
    given: Dict[int, int] = {}
    while count and heap:
        _, sequence, held, manager = heap[0]
        if held < manager.worker_count:
            step = min(count, manager.worker_count - held, (manager.worker_count + 1) // 2)
        else:
            step = max(1, min(count, manager.worker_count, manager.capacity - held))
        given[sequence] = given.get(sequence, 0) + step
        count -= step
        held += step
        if held >= manager.capacity:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (held / max(manager.worker_count, 1), sequence, held, manager))
    by_sequence = {m.sequence: m for m in candidates}
    return [(by_sequence[sequence], n) for sequence, n in given.items()]


class ManagerHeapTests(SynchronousTestCase):
    def test_empty(self) -> None:
        heap = ManagerHeap()
        self.assertIsNone(heap.peek())
        self.assertEqual(len(heap), 0)
        heap.discard("nobody")  # no error
        self.assertIsNone(heap.key("nobody"))

    def test_smallest_load_then_sequence(self) -> None:
        heap = ManagerHeap()
        heap.set("b", 0.5, 2)
        heap.set("a", 0.5, 1)
        heap.set("c", 0.25, 3)
        self.assertEqual(heap.peek(), (0.25, 3, "c"))
        heap.discard("c")
        self.assertEqual(heap.peek(), (0.5, 1, "a"))
        self.assertEqual(len(heap), 2)
        self.assertIn("b", heap)
        self.assertNotIn("c", heap)

    def test_key_changes(self) -> None:
        heap = ManagerHeap()
        heap.set("a", 0.0, 1)
        heap.set("b", 0.1, 2)
        heap.set("a", 0.2, 1)  # a's old entry is stale now
        self.assertEqual(heap.peek(), (0.1, 2, "b"))
        self.assertEqual(heap.key("a"), (0.2, 1))
        heap.set("b", 0.3, 2)
        self.assertEqual(heap.peek(), (0.2, 1, "a"))
        heap.set("a", 0.0, 1)  # back to a key it had: still one item
        self.assertEqual(heap.peek(), (0.0, 1, "a"))
        heap.discard("a")
        self.assertEqual(heap.peek(), (0.3, 2, "b"))
        heap.discard("b")
        self.assertIsNone(heap.peek())

    def test_stale_entries_do_not_pile_up(self) -> None:
        heap = ManagerHeap()
        for item in range(10):
            heap.set(item, 0.0, item)
        for round_ in range(1, 1000):
            heap.set(round_ % 10, float(round_), round_ % 10)
        self.assertEqual(len(heap), 10)
        self.assertLessEqual(len(heap._heap), 2 * 10 + 32)
        smallest = min(((heap.key(i), i) for i in range(10)), key=lambda pair: pair[0])
        self.assertEqual(heap.peek(), (*smallest[0], smallest[1]))

    def test_random_operations_against_a_model(self) -> None:
        rng = random.Random(9)
        heap = ManagerHeap()
        model: Dict[int, Tuple[float, int]] = {}
        for _ in range(20_000):
            item = rng.randrange(200)
            if rng.random() < 0.2:
                heap.discard(item)
                model.pop(item, None)
            else:
                load = rng.randrange(10) / 4
                heap.set(item, load, item)
                model[item] = (load, item)
            top = heap.peek()
            if not model:
                self.assertIsNone(top)
                continue
            best = min(model.items(), key=lambda pair: pair[1])
            self.assertEqual(top, (*best[1], best[0]))
            self.assertEqual(len(heap), len(model))


class LeastLoadedIndexTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.policy = LeastLoadedRouting()

    def test_nobody(self) -> None:
        self.assertEqual(self.policy.assign(RAW, 5), [])
        self.policy.update(Load(1, 4))
        self.assertEqual(self.policy.assign(RAW, 0), [])
        self.assertEqual(self.policy.assign("other", 5), [])

    def test_least_loaded_one_at_a_time(self) -> None:
        a, b = Load(1, 4), Load(2, 4, held=2)
        for manager in (a, b):
            self.policy.update(manager)
        # a: 0 -> 2, then ties go to the older: a, b, a.
        self.assertEqual(self.policy.assign(RAW, 5), [(a, 4), (b, 1)])

    def test_load_is_per_worker(self) -> None:
        big, small = Load(1, 8), Load(2, 1)
        for manager in (big, small):
            self.policy.update(manager)
        self.assertEqual(self.policy.assign(RAW, 9), [(big, 8), (small, 1)])

    def test_room_and_counting_what_was_handed_over(self) -> None:
        a = Load(1, 2, prefetch=1)  # capacity 4
        self.policy.update(a)
        self.assertEqual(self.policy.assign(RAW, 3), [(a, 3)])
        a.held = 3  # the dispatcher sent them
        self.assertEqual(self.policy.assign(RAW, 3), [(a, 1)])
        a.held = 4
        self.policy.update(a)  # full: no longer a candidate
        self.assertEqual(self.policy.assign(RAW, 3), [])
        a.held = 1  # results came back
        self.policy.update(a)
        self.assertEqual(self.policy.assign(RAW, 10), [(a, 3)])

    def test_full_on_arrival_and_removed(self) -> None:
        full = Load(1, 1, held=1)
        other = Load(2, 1)
        self.policy.update(full)
        self.policy.update(other)
        self.policy.remove(other)
        self.assertEqual(self.policy.assign(RAW, 1), [])
        self.policy.remove(other)  # again: nothing happens
        self.policy.remove(Load(3, 1, kind="never seen"))

    def test_container_types_apart(self) -> None:
        raw, typed = Load(1, 4), Load(2, 4, kind="c1")
        self.policy.update(raw)
        self.policy.update(typed)
        self.assertEqual(self.policy.assign("c1", 2), [(typed, 2)])
        self.assertEqual(self.policy.assign(RAW, 1), [(raw, 1)])

    def test_idle_managers_take_half_their_workers_a_pick(self) -> None:
        # A few tasks over many idle managers: several to a manager (one message
        # carries them), not one each to as many managers as there are tasks.
        a, b, c = Load(1, 8), Load(2, 8), Load(3, 8)
        for manager in (a, b, c):
            self.policy.update(manager)
        self.assertEqual(self.policy.assign(RAW, 6), [(a, 4), (b, 2)])
        a.held, b.held = 4, 2
        for manager in (a, b):
            self.policy.update(manager)
        # c (idle) first, then b (2 of 8), then a and b tie at half: a, older.
        self.assertEqual(self.policy.assign(RAW, 12), [(c, 4), (b, 4), (a, 4)])
        # One worker, or two: one task a pick, as before.
        single, pair = Load(4, 1), Load(5, 2)
        policy = LeastLoadedRouting()
        policy.update(single)
        policy.update(pair)
        self.assertEqual(policy.assign(RAW, 2), [(single, 1), (pair, 1)])

    def test_busy_managers_take_chunks(self) -> None:
        # Idle workers first, half a manager's workers a pick; once every worker of a manager
        # is busy, its prefetch fills a chunk of one task per worker at a time.
        a, b = Load(1, 4, prefetch=2), Load(2, 4, prefetch=2)  # capacity 12 each
        self.policy.update(a)
        self.policy.update(b)
        self.assertEqual(self.policy.assign(RAW, 8), [(a, 4), (b, 4)])
        a.held = b.held = 4
        self.policy.update(a)
        self.policy.update(b)
        # Both busy: a chunk of 4 to a, then 4 to b, then a again (room 4 left).
        self.assertEqual(self.policy.assign(RAW, 10), [(a, 6), (b, 4)])
        a.held, b.held = 10, 8
        self.policy.update(a)
        self.policy.update(b)
        # Room decides the last chunks: b takes 4 (full), a its last 2.
        self.assertEqual(self.policy.assign(RAW, 10), [(b, 4), (a, 2)])

    def test_same_decisions_as_a_fresh_heap(self) -> None:
        """Random loads, arrivals, departures and results: the index decides as the
        policy did when it built a heap over every manager on each call."""
        rng = random.Random(4)
        policy = LeastLoadedRouting()
        managers: List[Load] = []
        next_sequence = 1
        for _ in range(2_000):
            action = rng.random()
            if action < 0.1 or not managers:
                manager = Load(
                    next_sequence,
                    rng.choice([1, 2, 8]),
                    prefetch=rng.choice([0, 1, 2]),
                    kind=rng.choice([RAW, RAW, "c1"]),
                )
                next_sequence += 1
                managers.append(manager)
                policy.update(manager)
            elif action < 0.15:
                manager = managers.pop(rng.randrange(len(managers)))
                policy.remove(manager)
            elif action < 0.6:
                manager = rng.choice(managers)
                manager.held = rng.randint(0, manager.held)
                policy.update(manager)
            else:
                container_type = rng.choice([RAW, "c1"])
                count = rng.randint(1, 30)
                expected = reference_assign(container_type, count, managers)
                self.assertEqual(policy.assign(container_type, count), expected)
                for manager, given in expected:
                    manager.held += given
                    policy.update(manager)


class FakeConnection:
    """What a Manager sends on its connection (none of it answered)."""

    peer = "10.0.0.9:5000"

    def __init__(self) -> None:
        self.sent: List[str] = []
        self.dropped = False

    def callRemote(self, command: Any, **arguments: Any) -> Any:
        self.sent.append(command.__name__)
        from twisted.internet.defer import succeed

        return succeed({})

    def sendBox(self, box: Any) -> None:
        self.sent.append(box[b"_command"].decode())

    def drop(self) -> None:
        self.dropped = True


@implementer(IManagerEvents)
class Events:
    """Records what the registry tells the dispatcher."""

    def __init__(self) -> None:
        self.calls: List[Tuple[Any, ...]] = []
        self.holding = 0

    def manager_joined(self, manager: Any) -> None:
        self.calls.append(("joined", manager.manager_id))

    def manager_closed(self, manager: Any) -> None:
        self.calls.append(("closed", manager.manager_id))

    def manager_left(self, manager: Any, why: str, on_purpose: bool) -> None:
        self.calls.append(("left", manager.manager_id, why, on_purpose))

    def results_received(self, manager: Any, results: List[bytes]) -> None:
        self.calls.append(("results", manager.manager_id, len(results)))

    def held_by(self, manager: Any) -> int:
        return self.holding

    def warm_containers(self, manager: Any, warm: Dict[str, int], cold_starts: int) -> None:
        self.calls.append(("warm", manager.manager_id, warm, cold_starts))

    def tasks_started(self, manager: Any, started: List[Tuple[str, int]]) -> None:
        self.calls.append(("started", manager.manager_id, started))


class ManagerLifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = Events()
        self.registry = ManagerRegistry(
            self.clock, self.events, secret="s", versions=local_versions(), answer={}
        )
        self.connection = FakeConnection()
        details = dict(
            manager_id="m1",
            block_id="b",
            hostname="node",
            pid=7,
            worker_count=2,
            prefetch_capacity=1,
            worker_type="no_container",
            container_type=RAW,
            **local_versions(),
        )
        self.manager = Manager(self.registry, self.connection, details, 0.0, 1, False)  # type: ignore[arg-type]
        self.registry.managers["m1"] = self.manager

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IManagerEvents, self.events))
        dispatcher = TaskDispatcher(Clock(), CollectingSink(), LeastLoadedRouting())
        self.assertTrue(verifyObject(IManagerEvents, dispatcher))

    def test_retired_then_gone_costs_no_attempt(self) -> None:
        self.manager.retire("scaling in")
        self.manager.retire("again")  # once is enough
        self.assertEqual(self.connection.sent, ["Shutdown"])
        self.manager.gone("its connection closed", on_purpose=False)
        self.assertEqual(
            self.events.calls,
            [("closed", "m1"), ("left", "m1", "its connection closed", True)],
        )
        self.assertEqual(self.registry.managers, {})

    def test_quit_reason_explains_the_loss(self) -> None:
        self.manager.quit_announced("workers cannot start")
        self.manager.retire("scaling in")  # quitting already: nothing more
        self.manager.gone("its connection closed", on_purpose=False)
        self.assertEqual(
            self.events.calls,
            [("closed", "m1"), ("left", "m1", "it quit: workers cannot start", False)],
        )
        self.assertEqual(self.connection.sent, [])

    def test_lost_once(self) -> None:
        self.manager.lost("it sent nothing for 99 s")
        self.manager.gone("its connection closed", on_purpose=False)
        self.manager.quit_announced("late")
        self.assertEqual(self.events.calls, [("left", "m1", "it sent nothing for 99 s", False)])
        self.assertTrue(self.connection.dropped)

    def test_late_retirement_told_after_the_answer(self) -> None:
        self.manager.retire("block retired", tell_now=False)
        self.assertEqual(self.connection.sent, [])
        self.clock.advance(0)
        self.assertEqual(self.connection.sent, ["Shutdown"])


class InterfaceTests(SynchronousTestCase):
    """Parts and their fakes provide the interfaces the others hold them by."""

    def test_interchange_and_fakes(self) -> None:
        self.assertTrue(verifyClass(IInterchange, Interchange))
        self.assertTrue(verifyClass(ILoadSource, Interchange))
        self.assertTrue(verifyClass(IStatusPart, Interchange))
        sink = CollectingSink()
        self.assertTrue(verifyObject(IResultSink, sink))
        self.assertTrue(verifyObject(IInterchange, EchoInterchange(Clock(), sink)))
        self.assertTrue(verifyObject(IInterchange, HoldingInterchange(sink)))

    def test_daemon_parts(self) -> None:
        self.assertTrue(verifyClass(IResultSink, ResultPublisher))
        for interface in (IReadyPart, IDrainingPart, IStatusPart):
            self.assertTrue(verifyClass(interface, Transport))
        self.assertTrue(verifyClass(IStatusPart, ScalingService))
        self.assertTrue(verifyClass(IStatusPart, StatusReporter))
        self.assertFalse(IDrainingPart.implementedBy(EndpointService))


@implementer(IWarmManagerLoad)
class WarmLoad:
    """A manager as soft routing sees it: its warm workers and tasks by type.

    ``reads`` counts how often a policy looked at it (its ``held``).
    """

    def __init__(
        self,
        sequence: int,
        workers: int,
        prefetch: int = 0,
        warm: Optional[Dict[str, int]] = None,
        held_of_type: Optional[Dict[str, int]] = None,
    ) -> None:
        self.sequence = sequence
        self.worker_count = workers
        self.capacity = workers + prefetch * workers
        self.warm = dict(warm or {})
        self.held_of_type = dict(held_of_type or {})
        self.container_type = RAW
        self.reads = 0

    @property
    def held(self) -> int:
        self.reads += 1
        return sum(self.held_of_type.values())

    def take(self, container_type: str, count: int) -> None:
        """What the dispatcher does with tasks routed here."""
        self.held_of_type[container_type] = self.held_of_type.get(container_type, 0) + count

    def __repr__(self) -> str:
        return f"WarmLoad({self.sequence})"


def routed(triples: List[Tuple[str, Any, int]]) -> Dict[Tuple[str, int], int]:
    """``{(type, manager sequence): count}``."""
    found: Dict[Tuple[str, int], int] = {}
    for container_type, manager, count in triples:
        key = (container_type, manager.sequence)
        found[key] = found.get(key, 0) + count
    return found


class FakeManager:
    """What the dispatcher needs of a registered manager."""

    _count = 0

    def __init__(self, container_type: str, workers: int = 2, prefetch: int = 0) -> None:
        FakeManager._count += 1
        self.sequence = FakeManager._count
        self.manager_id = f"m{self.sequence}"
        self.hostname = "localhost"
        self.container_type = container_type
        self.worker_count = workers
        self.capacity = workers + prefetch * workers
        self.block_id = "0"
        self.silent = False
        self.sent: List[Tuple[str, bytes]] = []

    def describe(self) -> str:
        return f"manager {self.manager_id}"

    def send_tasks(self, batch: List[Tuple[str, bytes]], containers: Any = None) -> None:
        self.sent.extend(batch)

    def cancel_task(self, task_id: str) -> None:
        pass


class WarmFirstRoutingTests(SynchronousTestCase):
    """Soft routing on fakes: warm workers first, then idle workers at random,
    the cold routing interval against starvation."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.policy = WarmFirstRouting(self.clock, cold_routing_interval=10.0, rng=random.Random(3))

    def add(self, *managers: WarmLoad) -> None:
        for manager in managers:
            self.policy.update(manager)

    def route(self, queued: Dict[str, int]) -> List[Tuple[str, Any, int]]:
        triples = self.policy.route(queued)
        for container_type, manager, count in triples:
            manager.take(container_type, count)
            self.policy.update(manager)
        return triples

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IRoutingPolicy, self.policy))
        self.assertTrue(verifyObject(IRoutingPolicy, RandomRouting()))
        self.assertTrue(verifyObject(IWarmManagerLoad, WarmLoad(1, 2)))
        dispatcher = TaskDispatcher(Clock(), CollectingSink(), self.policy)
        dispatcher.manager_joined(FakeManager(RAW))
        [slot] = dispatcher._slots.values()
        self.assertTrue(verifyObject(IWarmManagerLoad, slot))

    def test_task_types_are_containers(self) -> None:
        container = Container(uuid.uuid4(), "image")
        self.assertEqual(self.policy.task_type(Task(uuid.uuid4(), "b")), RAW)
        task = Task(uuid.uuid4(), "b", container=container)
        self.assertEqual(self.policy.task_type(task), container.container_id)
        self.assertIsNone(self.policy.why_unservable(container.container_id, container))

    def test_warm_workers_first(self) -> None:
        a = WarmLoad(1, 2, warm={"t1": 2})
        b = WarmLoad(2, 2, warm={"t2": 2})
        c = WarmLoad(3, 2)
        self.add(a, b, c)
        self.assertEqual(routed(self.route({"t1": 2, "t2": 2})), {("t1", 1): 2, ("t2", 2): 2})

    def test_warm_pass_before_any_cold_start(self) -> None:
        # t1 comes first but has no warm worker: it must not take b's idle
        # worker, which t2 (warm there) wants.
        a = WarmLoad(1, 1, warm={"t2": 1})
        b = WarmLoad(2, 1, warm={"t2": 1})
        self.add(a, b)
        self.assertEqual(routed(self.route({"t1": 1, "t2": 2})), {("t2", 1): 1, ("t2", 2): 1})

    def test_warm_room_is_per_warm_worker(self) -> None:
        # One warm t1 worker, prefetch 1: two t1 tasks for it; cold, only as
        # many more as the manager has idle workers (4 - 2), not its prefetch.
        a = WarmLoad(1, 4, prefetch=1, warm={"t1": 1})
        self.add(a)
        self.assertEqual(routed(self.route({"t1": 10})), {("t1", 1): 4})
        b = WarmLoad(2, 3)
        self.add(b)
        self.assertEqual(routed(self.route({"t1": 10})), {("t1", 2): 3})

    def test_least_loaded_warm_manager_first(self) -> None:
        a = WarmLoad(1, 4, prefetch=1, warm={"t1": 2}, held_of_type={"t1": 2})
        b = WarmLoad(2, 4, prefetch=1, warm={"t1": 2})
        self.add(a, b)
        self.assertEqual(routed(self.route({"t1": 2})), {("t1", 2): 2})

    def test_cold_only_to_idle_workers_until_the_interval(self) -> None:
        busy = WarmLoad(1, 2, prefetch=4, warm={"t2": 2}, held_of_type={"t2": 2})
        self.add(busy)
        self.assertEqual(self.route({"t1": 3}), [])
        self.clock.advance(9)
        self.assertEqual(self.route({"t1": 3}), [])
        self.clock.advance(1)
        self.assertEqual(routed(self.route({"t1": 3})), {("t1", 1): 3})

    def test_waiting_restarts_when_a_queue_empties(self) -> None:
        busy = WarmLoad(1, 2, prefetch=4, warm={"t2": 2}, held_of_type={"t2": 2})
        self.add(busy)
        self.assertEqual(self.route({"t1": 3}), [])
        self.clock.advance(9)
        self.assertEqual(self.route({"t3": 1}), [])  # t1's tasks were cancelled
        self.clock.advance(5)
        self.assertEqual(self.route({"t1": 1}), [])  # waiting since now, not 14 s ago
        self.clock.advance(10)
        self.assertEqual(routed(self.route({"t1": 1})), {("t1", 1): 1})

    def test_cold_routing_interval_zero(self) -> None:
        policy = WarmFirstRouting(self.clock, cold_routing_interval=0.0)
        busy = WarmLoad(1, 2, prefetch=4, warm={"t2": 2}, held_of_type={"t2": 2})
        policy.update(busy)
        self.assertEqual(routed(policy.route({"t1": 3})), {("t1", 1): 3})

    def test_cold_split_in_proportion_to_tasks_left(self) -> None:
        managers = [WarmLoad(i, 2) for i in range(100)]
        self.add(*managers)
        found: Dict[str, int] = {}
        for container_type, _, count in self.route({"big": 900, "small": 100}):
            found[container_type] = found.get(container_type, 0) + count
        self.assertEqual(sum(found.values()), 200)  # every idle worker, none more
        self.assertGreater(found["big"], 3 * found["small"])
        self.assertGreater(found["small"], 0)
        for manager in managers:
            self.assertEqual(manager.held, 2)

    def test_never_more_than_room(self) -> None:
        managers = [WarmLoad(i, 3, prefetch=1, warm={"t": i % 3}) for i in range(10)]
        self.add(*managers)
        self.clock.advance(100)
        for _ in range(5):
            self.route({"t": 1000, "u": 50})
            self.clock.advance(20)
        for manager in managers:
            self.assertLessEqual(manager.held, manager.capacity)

    def test_removed_managers_get_nothing(self) -> None:
        a = WarmLoad(1, 2, warm={"t1": 2})
        self.add(a)
        self.policy.remove(a)
        self.assertEqual(self.policy.route({"t1": 5, "t2": 5}), [])

    def test_warm_change_moves_a_manager_between_types(self) -> None:
        a = WarmLoad(1, 1, prefetch=3, warm={"t1": 1}, held_of_type={"t1": 1})
        self.add(a)
        a.warm = {"t2": 1}
        self.policy.update(a)
        self.assertEqual(routed(self.route({"t1": 1, "t2": 1})), {("t2", 1): 1})

    def test_cost_does_not_grow_with_managers(self) -> None:
        """Routing a task of a warm type looks at the same few managers with 10
        or 10,000 managers connected."""
        reads = []
        for count in (10, 10_000):
            policy = WarmFirstRouting(self.clock, rng=random.Random(1))
            managers = [WarmLoad(i, 4, prefetch=1, warm={"other": 4}) for i in range(count)]
            warm = WarmLoad(count, 4, prefetch=1, warm={"t": 4})
            for manager in [*managers, warm]:
                manager.held_of_type = {"other": 4} if manager is not warm else {}
                policy.update(manager)
                manager.reads = 0
            self.assertEqual(routed(policy.route({"t": 3})), {("t", count): 3})
            reads.append(sum(m.reads for m in [*managers, warm]))
        self.assertEqual(reads[0], reads[1])


class RandomRoutingTests(SynchronousTestCase):
    def test_random_with_room(self) -> None:
        policy = RandomRouting(rng=random.Random(5))
        managers = [WarmLoad(i, 2, prefetch=1) for i in range(4)]
        for manager in managers:
            policy.update(manager)
        triples = policy.route({"a": 10, "b": 10})
        self.assertEqual(sum(n for _, _, n in triples), 16)  # every slot, 4 x (2 + 2)
        self.assertEqual({m.sequence for _, m, _ in triples}, {0, 1, 2, 3})
        fresh = RandomRouting(rng=random.Random(5))
        for manager in managers:
            fresh.update(manager)
        fresh.remove(managers[0])
        pairs = fresh.assign("a", 100)
        self.assertEqual(sum(n for _, n in pairs), 12)
        self.assertNotIn(managers[0], [m for m, _ in pairs])


class RandomSetTests(SynchronousTestCase):
    def test_against_a_set(self) -> None:
        rng = random.Random(9)
        items = RandomSet()
        model: set = set()
        for _ in range(2000):
            value = rng.randrange(50)
            if rng.random() < 0.5:
                items.add(value)
                model.add(value)
            else:
                items.discard(value)
                model.discard(value)
            self.assertEqual(len(items), len(model))
            if model:
                self.assertIn(items.choice(rng), model)
        self.assertEqual({v for v in range(50) if v in items}, model)
