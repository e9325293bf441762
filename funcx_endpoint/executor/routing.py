"""Routing policies: which manager gets which queued task.

The task dispatcher keeps one queue per container type and, for each queue
with tasks, asks its policy how to split them among the managers that have
room (:class:`~funcx_endpoint.executor.interface.IRoutingPolicy`).

:class:`LeastLoadedRouting` is the policy of raw workers and of hard
routing: a task goes only to managers of its own container type, one task at
a time to the least loaded (tasks held per worker), ties to the manager that
registered first.  With ``worker_mode="no_container"`` every task is of type
``RAW`` whatever container it names (funcX: "hard and soft routing are the
same: any free worker").
"""

from __future__ import annotations

import heapq
from typing import Any, List, Sequence, Tuple

from zope.interface import implementer

from funcx_endpoint.executor.interface import IRoutingPolicy
from funcx_endpoint.wire import Task

__all__ = ["RAW", "LeastLoadedRouting"]

#: The container type of tasks that run directly on workers.
RAW = "RAW"


@implementer(IRoutingPolicy)
class LeastLoadedRouting:
    """Tasks of a type go to managers of that type, the least loaded first.

    ``containers``: whether tasks are typed by the container they name
    (False for ``worker_mode="no_container"``: every task is ``RAW``).
    """

    def __init__(self, containers: bool = False) -> None:
        self.containers = containers

    def task_type(self, task: Task) -> str:
        if not self.containers:
            return RAW
        if task.container is not None:
            return task.container.container_id
        return task.container_id or RAW

    def assign(
        self, container_type: str, count: int, managers: Sequence[Any]
    ) -> List[Tuple[Any, int]]:
        candidates = [m for m in managers if m.container_type == container_type]
        if not candidates or count <= 0:
            return []
        if len(candidates) == 1:
            only = candidates[0]
            return [(only, min(count, only.capacity - only.held))]
        # One task at a time to the least loaded: a heap keyed by load.
        heap = []
        for manager in candidates:
            held = manager.held
            heap.append((held / max(manager.worker_count, 1), manager.sequence, held, manager))
        heapq.heapify(heap)
        given: dict = {}
        while count and heap:
            _, sequence, held, manager = heap[0]
            given[sequence] = given.get(sequence, 0) + 1
            count -= 1
            held += 1
            if held >= manager.capacity:
                heapq.heappop(heap)
            else:
                load = held / max(manager.worker_count, 1)
                heapq.heapreplace(heap, (load, sequence, held, manager))
        by_sequence = {manager.sequence: manager for manager in candidates}
        return [(by_sequence[sequence], n) for sequence, n in given.items()]
