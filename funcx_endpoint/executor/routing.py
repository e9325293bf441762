"""Routing policies: which manager gets which queued task.

The task dispatcher keeps one queue per container type and, for each queue
with tasks, asks its policy how to split them among the managers that have
room (:class:`~funcx_endpoint.executor.interface.IRoutingPolicy`).  The
policy keeps its own index of those managers, which the dispatcher updates
as their loads change, so that routing a task costs the same with 10 or
10,000 managers.

:class:`LeastLoadedRouting` is the policy of raw workers and of hard
routing: a task goes only to managers of its own container type, to the least
loaded (tasks held per worker), ties to the manager that registered first:
while that manager has idle workers, up to half its workers' worth of tasks at
a time (a turn's tasks still spread over managers, two picks fill a manager
that was idle, and one message carries several tasks), then, once all its
workers are busy, a chunk of one task per worker for its prefetch.  Spreading
tasks one at a time would start them no sooner but send one message per
task: with thousands of managers and tasks arriving a few thousand at a time,
the interchange spent its time on messages (at 8,192 managers and 4,096 tasks
a turn, ``benchmarks/interchange_scale --submit-chunk 4096``: 1.1 tasks a
message and 9,100 tasks/s; 4 a message and 19,900 tasks/s now).  With
``worker_mode="no_container"`` every task is of type ``RAW`` whatever container
it names (funcX: "hard and soft routing are the same: any free worker").  With
the endpoint-wide form of containers
(``container_uri``: every worker runs one image) every task is of that one type.

Soft routing (``scheduler_mode="soft"``) is :class:`~funcx_endpoint.executor.
soft_routing.WarmFirstRouting`, in its own module.

:class:`ManagerHeap` is its index: the managers with room of one container
type, the least loaded on top.
"""

from __future__ import annotations

import heapq
import random
from typing import Any, Callable, Dict, List, Optional, Tuple

from zope.interface import implementer

from funcx_endpoint.executor.interface import IRoutingPolicy
from funcx_endpoint.wire import Task

__all__ = ["RAW", "LeastLoadedRouting", "ManagerHeap", "RandomSet", "container_type_of"]

#: The container type of tasks that run directly on workers.
RAW = "RAW"


class ManagerHeap:
    """Items, each with a ``(load, sequence)`` key; :meth:`peek` gives the smallest.

    Setting or dropping an item's key costs O(log n) amortized: a changed
    key is pushed anew and the old entry, now stale, is skipped when it
    reaches the top (or dropped when stale entries outnumber live ones).
    ``sequence`` must be unique to an item: ties of load go to the smaller
    sequence, and items themselves are never compared.
    """

    __slots__ = ("_heap", "_keys")

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Any]] = []
        self._keys: Dict[Any, Tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, item: Any) -> bool:
        return item in self._keys

    def key(self, item: Any) -> Optional[Tuple[float, int]]:
        """The key of ``item``, or None if it is not here."""
        return self._keys.get(item)

    def set(self, item: Any, load: float, sequence: int) -> None:
        """Add ``item`` with this key, or change its key."""
        key = (load, sequence)
        keys = self._keys
        if keys.get(item) == key:
            return
        keys[item] = key
        heapq.heappush(self._heap, (load, sequence, item))
        if len(self._heap) > 2 * len(keys) + 32:
            self._compact()

    def discard(self, item: Any) -> None:
        """Remove ``item`` if it is here."""
        if self._keys.pop(item, None) is not None and len(self._heap) > 2 * len(self._keys) + 32:
            self._compact()

    def peek(self) -> Optional[Tuple[float, int, Any]]:
        """``(load, sequence, item)`` of the item with the smallest key, or None."""
        heap, keys = self._heap, self._keys
        while heap:
            load, sequence, item = top = heap[0]
            if keys.get(item) == (load, sequence):
                return top
            heapq.heappop(heap)
        return None

    def _compact(self) -> None:
        self._heap = [(load, sequence, item) for item, (load, sequence) in self._keys.items()]
        heapq.heapify(self._heap)


class RandomSet:
    """A set whose :meth:`choice` is uniform and O(1), as are add and discard."""

    __slots__ = ("_items", "_where")

    def __init__(self) -> None:
        self._items: List[Any] = []
        self._where: Dict[Any, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: Any) -> bool:
        return item in self._where

    def add(self, item: Any) -> None:
        if item not in self._where:
            self._where[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: Any) -> None:
        index = self._where.pop(item, None)
        if index is None:
            return
        last = self._items.pop()
        if index < len(self._items):
            self._items[index] = last
            self._where[last] = index

    def choice(self, rng: random.Random) -> Any:
        """A uniformly random item (the set must not be empty)."""
        return self._items[int(rng.random() * len(self._items))]


def container_type_of(task: Task) -> str:
    """The container type a task names: its container's id, else ``RAW``."""
    if task.container is not None:
        return task.container.container_id
    return task.container_id or RAW


def _load(held: int, worker_count: int) -> float:
    return held / max(worker_count, 1)


@implementer(IRoutingPolicy)
class LeastLoadedRouting:
    """Tasks of a type go to managers of that type, the least loaded first.

    ``containers``: whether tasks are typed by the container they name
    (False for ``worker_mode="no_container"``: every task is ``RAW``);
    ``single_type``: the one type of every task (the endpoint-wide form of
    containers, where every worker runs ``container_uri``); ``unservable``:
    says why no manager of a type can ever be started (None: one can), e.g.
    when the provider cannot start managers per type.
    """

    def __init__(
        self,
        containers: bool = False,
        single_type: Optional[str] = None,
        unservable: Optional[Callable[[str], Optional[str]]] = None,
    ) -> None:
        self.containers = containers
        self.single_type = single_type
        self.unservable = unservable
        self._open: Dict[str, ManagerHeap] = {}  # managers with room, by container type

    def task_type(self, task: Task) -> str:
        if self.single_type is not None:
            return self.single_type
        if not self.containers:
            return RAW
        return container_type_of(task)

    def why_unservable(self, container_type: str, container: Any) -> Optional[str]:
        if self.unservable is None or not self.containers or self.single_type is not None:
            return None
        return self.unservable(container_type)

    def route(self, queued: Dict[str, int]) -> List[Tuple[str, Any, int]]:
        return [
            (container_type, manager, n)
            for container_type, count in queued.items()
            for manager, n in self.assign(container_type, count)
        ]

    def update(self, manager: Any) -> None:
        heap = self._open.get(manager.container_type)
        if heap is None:
            heap = self._open[manager.container_type] = ManagerHeap()
        held = manager.held
        if held < manager.capacity:
            heap.set(manager, _load(held, manager.worker_count), manager.sequence)
        else:
            heap.discard(manager)

    def remove(self, manager: Any) -> None:
        heap = self._open.get(manager.container_type)
        if heap is not None:
            heap.discard(manager)

    def assign(self, container_type: str, count: int) -> List[Tuple[Any, int]]:
        heap = self._open.get(container_type)
        if not heap or count <= 0:
            return []
        # The least loaded takes up to half its workers' worth while it has
        # idle workers (several tasks a message, still spread); a manager
        # whose workers are all busy takes its prefetch in chunks of one task
        # per worker (fewer, bigger batches); the keys follow.
        given: Dict[Any, int] = {}
        while count:
            top = heap.peek()
            if top is None:
                break
            _, sequence, manager = top
            before = given.get(manager, 0)
            held = manager.held + before
            idle = manager.worker_count - held
            if idle > 0:
                step = min(count, idle, (manager.worker_count + 1) // 2)
            else:
                step = max(1, min(count, manager.worker_count, manager.capacity - held))
            n = before + step
            given[manager] = n
            count -= step
            held += step
            if held >= manager.capacity:
                heap.discard(manager)
            else:
                heap.set(manager, _load(held, manager.worker_count), sequence)
        return list(given.items())
