"""The interchange's parts alone: the routing policy, the manager lifecycle, the interfaces."""

from __future__ import annotations

import uuid
from typing import Any, List, Tuple

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
)
from funcx_endpoint.executor.registry import Manager, ManagerRegistry
from funcx_endpoint.executor.routing import RAW, LeastLoadedRouting
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
        self.assertEqual(by_sequence(policy.assign(RAW, 6, managers)), [(2, 2), (3, 4)])
        self.assertEqual(by_sequence(policy.assign(RAW, 1, managers)), [(2, 1)])

    def test_never_more_than_room(self) -> None:
        policy = LeastLoadedRouting()
        managers = [Load(1, 1, held=1, prefetch=1), Load(2, 1)]
        self.assertEqual(by_sequence(policy.assign(RAW, 10, managers)), [(1, 1), (2, 1)])
        [(only, count)] = policy.assign(RAW, 10, [Load(5, 2, held=1, prefetch=1)])
        self.assertEqual((only.sequence, count), (5, 3))

    def test_only_managers_of_the_type(self) -> None:
        policy = LeastLoadedRouting(containers=True)
        managers = [Load(1, 2, kind="docker-a"), Load(2, 2, kind=RAW)]
        self.assertEqual(by_sequence(policy.assign("docker-a", 5, managers)), [(1, 2)])
        self.assertEqual(policy.assign("docker-b", 5, managers), [])
        self.assertEqual(policy.assign(RAW, 0, managers), [])


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
