"""What ``funcx-endpoint tasks`` shows: the tasks a live endpoint holds, and the last finished.

:class:`RecentResults` sits in front of the endpoint's result sink and keeps
the last few results that went through it (task id, outcome, when), reading
only their headers.  :class:`TaskListing` answers the control socket's
``tasks`` command from the dispatcher's records (read only) and those.

A task held is ``queued`` (waiting here for a worker) or ``sent`` (at its
manager: running on a worker, or waiting in the manager's prefetch; the
manager does not say which worker took it until the result comes back).
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from zope.interface import implementer

from funcx_endpoint.executor.interface import IResultSink
from funcx_endpoint.wire import PackedResult

__all__ = ["DEFAULT_FINISHED", "MAX_FINISHED", "RecentResults", "TaskListing"]

#: Finished tasks shown by default, and the most kept.
DEFAULT_FINISHED = 20
MAX_FINISHED = 1000
#: Held tasks listed at most (the counts cover all of them).
MAX_HELD_LISTED = 1000


def _outcome(result: PackedResult) -> str:
    """``success``, or the error code of a failed result (its header only is read)."""
    if not result.is_error:
        return "success"
    try:
        details = json.loads(bytes(result.error_details))
    except ValueError:
        return "failed"
    code = details.get("code") if isinstance(details, dict) else None
    return str(code) if code else "failed"


@implementer(IResultSink)
class RecentResults:
    """Passes results on to ``sink``; remembers the last ``keep`` of them."""

    def __init__(
        self,
        sink: IResultSink,
        keep: int = MAX_FINISHED,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sink = sink
        self._wall = wall
        self.finished: Deque[Tuple[str, str, float]] = deque(maxlen=keep)

    def results_ready(self, results: List[PackedResult]) -> None:
        now = self._wall()
        finished = self.finished
        for result in results:
            finished.append((result.task_id, _outcome(result), now))
        self.sink.results_ready(results)


class TaskListing:
    """The ``tasks`` control command: ``dispatcher`` is the interchange's
    :class:`~funcx_endpoint.executor.dispatcher.TaskDispatcher`."""

    def __init__(
        self, dispatcher: Any, recent: RecentResults, wall: Callable[[], float] = time.time
    ) -> None:
        self._dispatcher = dispatcher
        self._recent = recent
        self._wall = wall

    def __call__(self, finished: Optional[int] = None) -> Dict[str, Any]:
        """The tasks held (oldest first) and the last ``finished`` finished ones
        (newest first)."""
        count = DEFAULT_FINISHED if finished is None else finished
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"finished must be a count of tasks, got {finished!r}")
        count = min(count, MAX_FINISHED)
        now = self._wall()
        records = self._dispatcher.held_records()
        records.sort(key=lambda record: record.transitions[0].timestamp)
        held = [self._held(record, now) for record in records[:MAX_HELD_LISTED]]
        recent = list(self._recent.finished)[-count:] if count else []
        return {
            "queued": sum(1 for record in records if record.slot is None),
            "sent": sum(1 for record in records if record.slot is not None),
            "tasks": held,
            "listed": len(held),
            "finished": [
                {"task_id": task_id, "outcome": outcome, "ago": round(now - when, 3)}
                for task_id, outcome, when in reversed(recent)
            ],
        }

    @staticmethod
    def _held(record: Any, now: float) -> Dict[str, Any]:
        slot = record.slot
        manager = None if slot is None else slot.manager
        return {
            "task_id": record.task_id,
            "state": "queued" if slot is None else "sent",
            "age": round(max(0.0, now - record.transitions[0].timestamp / 1e9), 3),
            "container_type": record.container_type,
            "attempts": record.attempts,
            "manager": None if manager is None else manager.manager_id,
            "block": None if manager is None else manager.block_id,
            "host": None if manager is None else manager.hostname,
            "worker": None,  # not known before the result (see the module's docstring)
        }
