"""Soft routing: tasks go where a warm container of their type waits.

With ``scheduler_mode="soft"`` a manager starts worker containers of any
type on demand and keeps some warm; it says which (``WarmContainers``: warm
workers per container type).  :class:`WarmFirstRouting` then splits the
queued tasks in two passes, as funcX 1.0's interchange did (its "warm" and
"cold" loops):

1. **Warm**: for every type with queued tasks, the managers with a warm
   worker of that type and room for it: at most ``warm workers of the type *
   (1 + prefetch_capacity)`` tasks of the type held there, the one with the
   fewest such tasks per warm worker first (ties: registered first), one task
   at a time.
2. **Cold**: the tasks left go to managers with an *idle worker* (fewer tasks
   held than workers), chosen at random; each pick gives the manager up to
   its idle workers' worth of tasks of one type, the type drawn in
   proportion to the tasks left of each type.  After the warm pass an idle
   worker is one nobody's queued tasks want warm, so starting a container
   there costs no other type its warm worker.  Tasks are not queued at a
   manager behind busy workers of other types (that would make it switch a
   container that is still wanted).
3. **Cold routing interval** (funcX's ``cold_routing_interval``): a type
   whose tasks have waited that long without any being routed may also go
   to any manager with room (its queue included), chosen at random, so that
   a type with no warm worker is never starved by a steady stream of other
   types.  0 allows it at once.

Every index is per type or per manager and costs O(log n) (heaps) or O(1)
(:class:`~funcx_endpoint.executor.routing.RandomSet`) per change, so routing
a task costs the same with 10 or 10,000 managers; a manager's update costs
O(k log n) for its k warm types.

:class:`RandomRouting` sends every task to a random manager with room,
whatever its type: the baseline soft routing is measured against
(``benchmarks/container_routing``).
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Set, Tuple

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from funcx_endpoint.executor.interface import IRoutingPolicy
from funcx_endpoint.executor.routing import (
    ManagerHeap,
    RandomSet,
    container_type_of,
)
from funcx_endpoint.wire import Task

__all__ = ["RandomRouting", "WarmFirstRouting"]


def _per_worker(manager: Any) -> float:
    """Tasks a manager may hold per worker (1 + prefetch_capacity)."""
    return manager.capacity / max(manager.worker_count, 1)


def _draw(left: Dict[str, int], remaining: int, rng: random.Random) -> str:
    """A type with tasks left, drawn in proportion to the tasks left of each
    (``remaining`` is their sum, more than 0)."""
    pick = rng.random() * remaining
    chosen = ""
    for container_type, count in left.items():
        if count:
            chosen = container_type
            if pick < count:
                break
            pick -= count
    return chosen


class _Pending:
    """Tasks handed out during one :meth:`WarmFirstRouting.route` call, not yet
    counted in the managers' own held counts."""

    __slots__ = ("total", "by_type")

    def __init__(self) -> None:
        self.total: Dict[Any, int] = {}
        self.by_type: Dict[Tuple[Any, str], int] = {}

    def add(self, manager: Any, container_type: str, count: int) -> None:
        self.total[manager] = self.total.get(manager, 0) + count
        key = (manager, container_type)
        self.by_type[key] = self.by_type.get(key, 0) + count

    def routes(self) -> List[Tuple[str, Any, int]]:
        """What was handed out: (container type, manager, count)."""
        return [(t, m, n) for (m, t), n in self.by_type.items()]

    def held(self, manager: Any) -> int:
        return int(manager.held) + self.total.get(manager, 0)

    def held_of(self, manager: Any, container_type: str) -> int:
        return int(manager.held_of_type.get(container_type, 0)) + self.by_type.get(
            (manager, container_type), 0
        )


@implementer(IRoutingPolicy)
class WarmFirstRouting:
    """Soft routing: warm workers first, then idle workers at random (see the module).

    ``clock`` times the cold routing interval; ``rng`` makes the random
    choices (seeded in tests).  Managers are :class:`~funcx_endpoint.executor.
    interface.IWarmManagerLoad` providers; their ``container_type`` is not
    used (a manager serves every type).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        cold_routing_interval: float = 10.0,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.clock = clock
        self.cold_routing_interval = cold_routing_interval
        self.rng = rng or random.Random()
        self._warm: Dict[str, ManagerHeap] = {}  # type: managers with warm room for it
        self._listed: Dict[Any, Set[str]] = {}  # manager: the types it is listed under
        self._idle = RandomSet()  # managers with an idle worker
        self._room = RandomSet()  # managers with room (held < capacity)
        self._unserved_since: Dict[str, float] = {}  # type: since when none was routed

    # -- IRoutingPolicy --------------------------------------------------------

    def task_type(self, task: Task) -> str:
        return container_type_of(task)

    def why_unservable(self, container_type: str, container: Any) -> Optional[str]:
        return None  # a manager starts containers of any type

    def update(self, manager: Any) -> None:
        held = manager.held
        has_room = held < manager.capacity
        listed = self._listed.get(manager)
        now_listed: Set[str] = set()
        if has_room:
            per_worker = _per_worker(manager)
            held_of_type = manager.held_of_type
            for container_type, warm in manager.warm.items():
                if warm <= 0:
                    continue
                of_type = held_of_type.get(container_type, 0)
                if of_type < warm * per_worker:
                    heap = self._warm.get(container_type)
                    if heap is None:
                        heap = self._warm[container_type] = ManagerHeap()
                    heap.set(manager, of_type / warm, manager.sequence)
                    now_listed.add(container_type)
        if listed:
            for container_type in listed - now_listed:
                self._discard_warm(container_type, manager)
        if now_listed:
            self._listed[manager] = now_listed
        else:
            self._listed.pop(manager, None)
        if held < manager.worker_count:
            self._idle.add(manager)
        else:
            self._idle.discard(manager)
        if has_room:
            self._room.add(manager)
        else:
            self._room.discard(manager)

    def remove(self, manager: Any) -> None:
        for container_type in self._listed.pop(manager, ()):
            self._discard_warm(container_type, manager)
        self._idle.discard(manager)
        self._room.discard(manager)

    def assign(self, container_type: str, count: int) -> List[Tuple[Any, int]]:
        return [(m, n) for _, m, n in self.route({container_type: count})]

    def route(self, queued: Dict[str, int]) -> List[Tuple[str, Any, int]]:
        pending = _Pending()
        left = {t: n for t, n in queued.items() if n > 0}
        for container_type in list(left):
            count = left[container_type]
            left[container_type] -= self._route_warm(container_type, count, pending)
        self._route_cold(left, pending)
        now = self.clock.seconds()
        unserved = self._unserved_since
        for container_type in [t for t in unserved if not queued.get(t)]:
            del unserved[container_type]  # its queue emptied (cancelled, withdrawn)
        starving = []
        for container_type, count in queued.items():
            if count <= 0 or left.get(container_type, 0) < count:
                self._unserved_since.pop(container_type, None)
                continue
            since = self._unserved_since.setdefault(container_type, now)
            if now - since >= self.cold_routing_interval:
                starving.append(container_type)
        for container_type in starving:
            if self._route_anywhere(container_type, left[container_type], pending):
                self._unserved_since.pop(container_type, None)
        return pending.routes()

    # -- the passes ----------------------------------------------------------------

    def _route_warm(
        self,
        container_type: str,
        count: int,
        pending: _Pending,
    ) -> int:
        heap = self._warm.get(container_type)
        routed = 0
        while heap and routed < count:
            top = heap.peek()
            if top is None:
                break
            _, sequence, manager = top
            warm = manager.warm.get(container_type, 0)
            of_type = pending.held_of(manager, container_type)
            if (
                warm <= 0
                or of_type + 1 > warm * _per_worker(manager)
                or pending.held(manager) >= manager.capacity
            ):
                self._discard_warm(container_type, manager)
                continue
            pending.add(manager, container_type, 1)
            routed += 1
            heap.set(manager, (of_type + 1) / warm, sequence)
        return routed

    def _route_cold(self, left: Dict[str, int], pending: _Pending) -> None:
        idle = self._idle
        remaining = sum(left.values())
        while remaining and len(idle):
            manager = idle.choice(self.rng)
            free = manager.worker_count - pending.held(manager)
            if free <= 0:
                idle.discard(manager)
                continue
            container_type = _draw(left, remaining, self.rng)
            n = min(free, left[container_type])
            pending.add(manager, container_type, n)
            left[container_type] -= n
            remaining -= n
            if free - n <= 0:
                idle.discard(manager)  # back with its next update

    def _route_anywhere(
        self,
        container_type: str,
        count: int,
        pending: _Pending,
    ) -> int:
        room = self._room
        routed = 0
        while routed < count and len(room):
            manager = room.choice(self.rng)
            free = manager.capacity - pending.held(manager)
            if free <= 0:
                room.discard(manager)
                continue
            n = min(free, count - routed)
            pending.add(manager, container_type, n)
            routed += n
        return routed

    def _discard_warm(self, container_type: str, manager: Any) -> None:
        heap = self._warm.get(container_type)
        if heap is not None:
            heap.discard(manager)
            if not len(heap):
                del self._warm[container_type]
        listed = self._listed.get(manager)
        if listed is not None:
            listed.discard(container_type)


@implementer(IRoutingPolicy)
class RandomRouting:
    """Every task to a random manager with room, whatever its type (a baseline)."""

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self.rng = rng or random.Random()
        self._room = RandomSet()

    def task_type(self, task: Task) -> str:
        return container_type_of(task)

    def why_unservable(self, container_type: str, container: Any) -> Optional[str]:
        return None  # a manager starts containers of any type

    def update(self, manager: Any) -> None:
        if manager.held < manager.capacity:
            self._room.add(manager)
        else:
            self._room.discard(manager)

    def remove(self, manager: Any) -> None:
        self._room.discard(manager)

    def assign(self, container_type: str, count: int) -> List[Tuple[Any, int]]:
        given: Dict[Any, int] = {}
        room = self._room
        while count and len(room):
            manager = room.choice(self.rng)
            n = given.get(manager, 0)
            if manager.held + n >= manager.capacity:
                room.discard(manager)
                continue
            given[manager] = n + 1
            count -= 1
        return list(given.items())

    def route(self, queued: Dict[str, int]) -> List[Tuple[str, Any, int]]:
        # One task at a time, the types interleaved as they were queued at random.
        pending = _Pending()
        left = {t: n for t, n in queued.items() if n > 0}
        room = self._room
        remaining = sum(left.values())
        while remaining and len(room):
            manager = room.choice(self.rng)
            if pending.held(manager) >= manager.capacity:
                room.discard(manager)
                continue
            container_type = _draw(left, remaining, self.rng)
            pending.add(manager, container_type, 1)
            left[container_type] -= 1
            remaining -= 1
        return pending.routes()
