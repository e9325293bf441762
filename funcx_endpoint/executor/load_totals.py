"""The dispatcher's totals over its managers, kept up to date as loads change.

:class:`LoadTotals` holds what :meth:`TaskDispatcher.load_totals
<funcx_endpoint.executor.dispatcher.TaskDispatcher.load_totals>` and
:meth:`~funcx_endpoint.executor.dispatcher.TaskDispatcher.warm_totals` report:
the workers of the managers here, how many of them are idle, the managers
and the tasks held by container type, the warm workers by container type and
the cold starts.  The dispatcher tells it of each change, so that nothing done
per turn or per status report looks at every manager.
"""

from __future__ import annotations

from typing import Dict

from funcx_endpoint.executor.slots import ManagerSlot

__all__ = ["LoadTotals"]


class LoadTotals:
    """Totals over the managers of one dispatcher (see the module)."""

    def __init__(self) -> None:
        self.workers = 0  # of all managers here
        self.idle_workers = 0  # sum of max(0, workers - held)
        self.managers_of_type: Dict[str, int] = {}  # manager's container type: managers
        #: task's container type: tasks held (the slots keep it, see ManagerSlot)
        self.held_of_type: Dict[str, int] = {}
        self.warm: Dict[str, int] = {}  # container type: warm workers at all managers
        self.cold_starts = 0  # reported by managers, those gone included

    def joined(self, slot: ManagerSlot) -> None:
        """A manager came (it holds no task yet)."""
        self.workers += slot.worker_count
        self.idle_workers += max(0, slot.worker_count)
        of_type = self.managers_of_type
        of_type[slot.container_type] = of_type.get(slot.container_type, 0) + 1

    def left(self, slot: ManagerSlot) -> None:
        """A manager left (its tasks released and its warm workers gone already)."""
        self.workers -= slot.worker_count
        self.idle_workers -= max(0, slot.worker_count)
        left = self.managers_of_type[slot.container_type] - 1
        if left:
            self.managers_of_type[slot.container_type] = left
        else:
            del self.managers_of_type[slot.container_type]

    def held_changed(self, slot: ManagerSlot, before: int) -> None:
        """``slot`` held ``before`` tasks and now holds what it holds."""
        held = len(slot.outstanding)
        workers = slot.worker_count
        self.idle_workers += max(0, workers - held) - max(0, workers - before)

    def cold_starts_reported(self, slot: ManagerSlot, cold_starts: int) -> None:
        """``slot``'s manager reports ``cold_starts`` since it started."""
        self.cold_starts += max(0, cold_starts - slot.cold_starts)
        slot.cold_starts = cold_starts

    def warm_changed(self, slot: ManagerSlot, warm: Dict[str, int]) -> None:
        """``slot``'s manager now has ``warm`` workers by container type."""
        totals = self.warm
        for container_type, count in slot.warm.items():
            left = totals.get(container_type, 0) - count
            if left > 0:
                totals[container_type] = left
            else:
                totals.pop(container_type, None)
        for container_type, count in warm.items():
            if count > 0:
                totals[container_type] = totals.get(container_type, 0) + count
        slot.warm = warm

    def held_by_type(self) -> Dict[str, int]:
        """Tasks held by container type: the types of the managers here (0 if they
        hold none), and of the tasks held (a task's own type: soft routing's
        managers serve any)."""
        held = dict.fromkeys(self.managers_of_type, 0)
        held.update(self.held_of_type)
        return held
