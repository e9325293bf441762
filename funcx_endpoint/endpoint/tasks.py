"""Which tasks are in flight, and which deliveries may be acknowledged.

Delivery tags belong to one channel: after a reconnect the broker delivers
unacknowledged tasks again, with new tags, on the new channel.  The tracker
remembers, per task, the latest delivery (channel generation and tag), so

* a task delivered again while its first run is alive is not run twice: the
  new delivery replaces the old one and is acknowledged when the result is
  safe;
* a task delivered again after its result was made safe (the ack was lost
  with the old channel) is acknowledged at once, without running it again.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

DeliveryRef = Tuple[int, int]  # (channel generation, delivery tag)


class Decision(enum.Enum):
    RUN = "run"
    ALREADY_RUNNING = "already-running"
    ALREADY_DONE = "already-done"


class TaskTracker:
    """Tasks in flight (delivered, result not yet safe) and recently finished."""

    def __init__(self, remember_done: int = 100_000) -> None:
        self._in_flight: Dict[str, DeliveryRef] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_done
        self.redelivered_while_running = 0
        self.redelivered_after_done = 0

    def __len__(self) -> int:
        return len(self._in_flight)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._in_flight

    def delivered(self, task_id: str, ref: DeliveryRef) -> Decision:
        """Record a delivery of ``task_id`` and say what to do with it."""
        if task_id in self._in_flight:
            self._in_flight[task_id] = ref
            self.redelivered_while_running += 1
            return Decision.ALREADY_RUNNING
        if task_id in self._done:
            self.redelivered_after_done += 1
            return Decision.ALREADY_DONE
        self._in_flight[task_id] = ref
        return Decision.RUN

    def finished(self, task_id: str) -> Optional[DeliveryRef]:
        """The task's result is safe: the delivery to acknowledge, if it is tracked."""
        ref = self._in_flight.pop(task_id, None)
        if ref is not None:
            done = self._done
            done[task_id] = None
            if len(done) > self._remember:
                done.popitem(last=False)
        return ref

    def withdraw(self, task_ids: Iterable[str]) -> List[DeliveryRef]:
        """Forget tasks released without a result; their deliveries."""
        refs = []
        for task_id in task_ids:
            ref = self._in_flight.pop(task_id, None)
            if ref is not None:
                refs.append(ref)
        return refs

    def in_flight(self) -> List[str]:
        return list(self._in_flight)
