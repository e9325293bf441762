"""Which tasks are in flight, and which deliveries may be acknowledged.

Delivery tags belong to one channel: after a reconnect the broker delivers
unacknowledged tasks again, with new tags, on the new channel.  The tracker
remembers, per task, every delivery not yet settled (channel generation and
tag), so

* a task delivered again while its first run is alive is not run twice: the
  new delivery joins the old one, and all of them are acknowledged when the
  result is safe (a delivery left unacknowledged on a live channel would hold
  a prefetch slot, and every multiple ack behind it, forever);
* a task delivered again after its result was made safe (the ack was lost
  with the old channel, or the result is in the spool of an earlier run) is
  acknowledged at once, without running it again.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Dict, Iterable, List, Tuple

DeliveryRef = Tuple[int, int]  # (channel generation, delivery tag)


class Decision(enum.Enum):
    RUN = "run"
    ALREADY_RUNNING = "already-running"
    ALREADY_DONE = "already-done"


class TaskTracker:
    """Tasks in flight (delivered, result not yet safe) and recently finished."""

    def __init__(self, remember_done: int = 100_000) -> None:
        self._in_flight: Dict[str, List[DeliveryRef]] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_done
        self.redelivered_while_running = 0
        self.redelivered_after_done = 0

    def __len__(self) -> int:
        return len(self._in_flight)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._in_flight

    def delivered(self, task_id: str, ref: DeliveryRef) -> Decision:
        """Record a delivery of ``task_id`` and say what to do with it.

        ``ALREADY_DONE`` deliveries are not recorded: the caller acknowledges
        them at once.
        """
        refs = self._in_flight.get(task_id)
        if refs is not None:
            refs.append(ref)
            self.redelivered_while_running += 1
            return Decision.ALREADY_RUNNING
        if task_id in self._done:
            self.redelivered_after_done += 1
            return Decision.ALREADY_DONE
        self._in_flight[task_id] = [ref]
        return Decision.RUN

    def finished(self, task_id: str) -> List[DeliveryRef]:
        """The task's result is safe: every delivery of it to acknowledge."""
        refs = self._in_flight.pop(task_id, None)
        if refs is None:
            return []
        self._remember_done(task_id)
        return refs

    def mark_done(self, task_ids: Iterable[str]) -> None:
        """Results of these tasks are safe already (e.g. found in the spool):
        deliveries of them are acknowledged without running them."""
        for task_id in task_ids:
            if task_id not in self._in_flight:
                self._remember_done(task_id)

    def _remember_done(self, task_id: str) -> None:
        done = self._done
        done[task_id] = None
        done.move_to_end(task_id)
        if len(done) > self._remember:
            done.popitem(last=False)

    def withdraw(self, task_ids: Iterable[str]) -> List[DeliveryRef]:
        """Forget tasks released without a result; all their deliveries."""
        refs: List[DeliveryRef] = []
        for task_id in task_ids:
            refs += self._in_flight.pop(task_id, ())
        return refs

    def in_flight(self) -> List[str]:
        return list(self._in_flight)
