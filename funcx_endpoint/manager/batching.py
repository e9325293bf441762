"""When a manager sends the results it holds: its batching rule.

Results go at once when the workers are about to wait for tasks (fewer
tasks queued than workers: the next tasks come only once the interchange has
these results).  Otherwise they wait, to go together: until ``batch_interval``
after the previous batch, and, while the queue beyond one task per worker
lasts longer at the measured completion rate, until half that time has
passed, at most :data:`MAX_HOLD` batch intervals after the previous batch.

Under a stream of short tasks the queue is deep (the interchange keeps it
filled to the prefetch), so results then go every few milliseconds in
batches of dozens rather than every millisecond by a handful: fewer messages
for the manager and the interchange to make and read.  A result waits no
longer than its queue would keep the workers busy anyway, and never when
the manager is idle.
"""

from __future__ import annotations

from funcx_endpoint.wire.amp import RateMeter

__all__ = ["MAX_HOLD", "ResultBatching"]

#: How many batch intervals results may wait, at most, after the previous batch.
MAX_HOLD = 8


class ResultBatching:
    """The manager's result batches: when the next one goes."""

    def __init__(self) -> None:
        #: Results per second, as the workers finish tasks.
        self.completions = RateMeter()
        #: When the previous batch went (-1: none yet).
        self.last_batch = -1.0

    def result_ready(self, now: float, queued: int, worker_count: int, interval: float) -> float:
        """A result arrived at ``now`` (it counts for the rate): seconds until
        the results held go."""
        self.completions.add(1, now)
        if queued < worker_count:
            return 0.0
        hold = interval
        rate = self.completions.rate
        if rate > 0.0:
            lasts = (queued - worker_count) / rate
            hold = max(interval, min(lasts / 2, MAX_HOLD * interval))
        return max(self.last_batch + hold - now, 0.0)
