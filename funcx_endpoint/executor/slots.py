"""What the task dispatcher keeps of each task and of each manager.

:class:`TaskRecord`: one task accepted and not answered yet.
:class:`ManagerSlot`: the dispatcher's side of one manager (what a routing
policy reads of it: :class:`~funcx_endpoint.executor.interface.IManagerLoad`
and :class:`~funcx_endpoint.executor.interface.IWarmManagerLoad`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall
from zope.interface import implementer

from funcx_endpoint.executor.interface import IManagerLoad, IWarmManagerLoad
from funcx_endpoint.wire import Container, Task, TaskTransition
from funcx_endpoint.wire.amp import RateMeter

__all__ = ["ManagerSlot", "TaskRecord"]


class TaskRecord:
    """One task the interchange accepted and has not answered yet."""

    __slots__ = (
        "task_id",
        "buffer",
        "container",
        "container_type",
        "transitions",
        "attempts",
        "slot",
    )

    def __init__(self, task: Task, container_type: str, transition: TaskTransition) -> None:
        self.task_id = task.task_id
        # As the manager receives it; made once, however often it is sent.
        self.buffer = task.task_buffer.encode("utf-8")
        # The container the manager runs it in (a task naming a container by id
        # only gets one of that id without images: the manager says why it
        # cannot run it, in a container mode).
        self.container: Optional[Container] = task.container
        if self.container is None and task.container_id is not None:
            self.container = Container(task.container_id, "")
        self.container_type = container_type
        self.transitions: List[TaskTransition] = [transition]
        self.attempts = 0  # times sent to a manager
        self.slot: Optional[ManagerSlot] = None


@implementer(IManagerLoad, IWarmManagerLoad)
class ManagerSlot:
    """The dispatcher's side of one manager: the tasks it holds, what is
    still to be sent to it, and how fast it answers."""

    __slots__ = (
        "manager",
        "container_type",
        "worker_count",
        "capacity",
        "sequence",
        "outstanding",
        "unsent",
        "unsent_containers",
        "push_call",
        "last_push",
        "completions",
        "tasks_completed",
        "idle_since",
        "accepting",
        "warm",
        "held_of_type",
        "cold_starts",
        "_totals",
    )

    def __init__(
        self, manager: Any, now: float, held_totals: Optional[Dict[str, int]] = None
    ) -> None:
        self.manager = manager
        self.container_type: str = manager.container_type
        self.worker_count: int = manager.worker_count
        self.capacity: int = manager.capacity
        self.sequence: int = manager.sequence
        self.outstanding: Dict[str, TaskRecord] = {}
        self.unsent: List[Tuple[str, bytes]] = []
        self.unsent_containers: Dict[str, Container] = {}
        self.push_call: Optional[IDelayedCall] = None
        self.last_push = -1.0
        self.completions = RateMeter()
        self.tasks_completed = 0
        self.idle_since: Optional[float] = now
        self.accepting = True
        self.warm: Dict[str, int] = {}  # its last WarmContainers
        self.held_of_type: Dict[str, int] = {}
        # The dispatcher's tasks held by type, at every manager: kept with ours.
        self._totals: Dict[str, int] = {} if held_totals is None else held_totals
        self.cold_starts = 0

    def hold(self, record: TaskRecord) -> None:
        """Hold ``record`` (sent, or about to be)."""
        self.outstanding[record.task_id] = record
        kind = record.container_type
        mine, totals = self.held_of_type, self._totals
        mine[kind] = mine.get(kind, 0) + 1
        totals[kind] = totals.get(kind, 0) + 1

    def release(self, record: TaskRecord) -> None:
        """Forget ``record`` (it must be held here)."""
        del self.outstanding[record.task_id]
        kind = record.container_type
        mine, totals = self.held_of_type, self._totals
        count = mine[kind] - 1
        if count:
            mine[kind] = count
        else:
            del mine[kind]
        count = totals[kind] - 1
        if count:
            totals[kind] = count
        else:
            del totals[kind]

    def release_all(self) -> None:
        """Forget every task held here."""
        for kind, count in self.held_of_type.items():
            left = self._totals[kind] - count
            if left:
                self._totals[kind] = left
            else:
                del self._totals[kind]
        self.outstanding.clear()
        self.held_of_type.clear()

    @property
    def held(self) -> int:
        return len(self.outstanding)
