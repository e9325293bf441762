"""The delivery ledger: which deliveries of tasks may be acknowledged, and when.

The task intake records every delivery it takes from the broker here; the
result sink says when a task's result is safe (confirmed by the broker or in
the spool).  :class:`DeliveryLedger` turns that into acknowledgements on the
task channel (through its :class:`~funcx_endpoint.amqp.consumer.AckBatcher`,
which also owns rejecting and releasing), and remembers finished tasks so a
task delivered again after its result was made safe is acknowledged without
running again (see :class:`~funcx_endpoint.endpoint.tasks.TaskTracker`).

Delivery tags belong to one channel: each new task channel starts a new
*generation*; acknowledgements for deliveries of an earlier channel are not
sent (that channel is gone; the broker delivers those tasks again).
"""

from __future__ import annotations

from typing import Iterable, List, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from funcx_endpoint.amqp.consumer import AckBatcher
from funcx_endpoint.endpoint.tasks import Decision, DeliveryRef, TaskTracker

__all__ = ["Decision", "DeliveryLedger"]


class DeliveryLedger:
    """Deliveries of the task channel, and the acknowledgements they are owed."""

    log = Logger()
    #: Seconds before tasks whose results could be neither confirmed nor
    #: spooled go back to the broker (to be delivered and run again).
    release_delay = 5.0

    def __init__(self, clock: IReactorTime, tracker: Optional[TaskTracker] = None) -> None:
        self.clock = clock
        self.tracker = tracker or TaskTracker()
        self.generation = 0
        self.acks: Optional[AckBatcher] = None
        self._delayed_releases: List[IDelayedCall] = []

    def new_channel(self, acks: AckBatcher) -> int:
        """A new task channel: its deliveries are of a new generation (returned)."""
        self.generation += 1
        self.acks = acks
        return self.generation

    def __len__(self) -> int:
        """Tasks in flight (delivered, result not yet safe)."""
        return len(self.tracker)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.tracker

    def delivered(self, task_id: str, ref: DeliveryRef) -> Decision:
        """Record a delivery of ``task_id``; what to do with it (see TaskTracker)."""
        return self.tracker.delivered(task_id, ref)

    def finished(self, task_id: str) -> None:
        """``task_id``'s result is safe: acknowledge every delivery of it."""
        acks = self.acks
        generation = self.generation
        for ref_generation, tag in self.tracker.finished(task_id):
            if ref_generation == generation and acks is not None:
                acks.done(tag)
            # else: that channel is gone; the broker will deliver the task
            # again and it will be acknowledged as already done.

    def mark_done(self, task_ids: Iterable[str]) -> None:
        """Results of these tasks are safe already (found in the spool)."""
        self.tracker.mark_done(task_ids)

    def release(self, task_ids: Iterable[str]) -> int:
        """Give these tasks' deliveries of the current channel back to the broker
        (requeued); how many.  Deliveries of an earlier channel went back when it
        closed."""
        return self._release(self.tracker.withdraw(task_ids))

    def release_later(self, task_ids: Iterable[str]) -> None:
        """Release these tasks after :attr:`release_delay` (their results could
        be neither confirmed nor spooled; at once would risk a tight loop)."""
        refs = self.tracker.withdraw(task_ids)

        def release() -> None:
            self._delayed_releases.remove(call)
            released = self._release(refs)
            self.log.warn(
                "Gave {n} tasks whose results could not be spooled back to the broker",
                n=released,
            )

        call = self.clock.callLater(self.release_delay, release)
        self._delayed_releases.append(call)

    def _release(self, refs: Iterable[DeliveryRef]) -> int:
        acks = self.acks
        if acks is None or acks.channel.closed:
            return 0
        released = 0
        for generation, tag in refs:
            if generation == self.generation:
                acks.release(tag)
                released += 1
        return released

    def flush(self) -> None:
        """Send the acknowledgements due now."""
        if self.acks is not None:
            self.acks.flush()

    def cancel_delayed(self) -> None:
        """Forget delayed releases (the channel closes: its deliveries go back anyway)."""
        for call in self._delayed_releases:
            if call.active():
                call.cancel()
        self._delayed_releases = []

    @property
    def unacked(self) -> int:
        """Deliveries of the current channel not yet acknowledged or settled."""
        return self.acks.unacked if self.acks is not None else 0
