"""What the dispatcher tells others about its tasks.

:class:`TaskOutbox` takes each task transition (told at once to a state
listener, if any, and recorded for the next status report, at most
``max_recorded_tasks`` tasks' worth) and each result, handed to the
:class:`~funcx_endpoint.executor.interface.IResultSink` in batches, one call
per reactor turn.  A result carries its task's transitions itself: once it
is delivered, status reports no longer record that task.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from funcx_endpoint.executor.interface import IResultSink
from funcx_endpoint.lifecycle import cancel_call
from funcx_endpoint.wire import PackedResult, TaskTransition

__all__ = ["TaskOutbox"]


class TaskOutbox:
    """Task transitions and results on their way out of the dispatcher."""

    log = Logger()

    def __init__(self, clock: IReactorTime, result_sink: IResultSink, max_recorded: int) -> None:
        self.clock = clock
        self.result_sink = result_sink
        #: an ITaskStateListener told of each transition as it happens, if any
        self.state_listener: Any = None
        self._ready: List[PackedResult] = []
        self._deliver_call: Optional[IDelayedCall] = None
        self._transitions: Dict[str, List[TaskTransition]] = {}
        self._max_recorded = max_recorded
        self._dropped_transitions = 0

    def note(self, task_id: str, transition: TaskTransition) -> None:
        """Tell the listener of ``transition`` and record it for the next report."""
        if self.state_listener is not None:
            self.state_listener.transition(task_id, transition)
        recorded = self._transitions.get(task_id)
        if recorded is not None:
            recorded.append(transition)
        elif len(self._transitions) < self._max_recorded:
            self._transitions[task_id] = [transition]
        else:
            self._dropped_transitions += 1

    def pop_transitions(self) -> Dict[str, List[TaskTransition]]:
        """Transitions recorded since the last call."""
        transitions, self._transitions = self._transitions, {}
        if self._dropped_transitions:
            self.log.warn(
                "Dropped transitions of {count} tasks: more than {limit} tasks between two "
                "status reports",
                count=self._dropped_transitions,
                limit=self._max_recorded,
            )
            self._dropped_transitions = 0
        return transitions

    def answer(self, result: PackedResult) -> None:
        """Deliver ``result`` at the end of this reactor turn."""
        self._ready.append(result)
        if self._deliver_call is None:
            self._deliver_call = self.clock.callLater(0, self.deliver)

    def fail(
        self, task_id: str, code: str, message: str, transitions: Sequence[TaskTransition]
    ) -> None:
        """Answer task ``task_id`` with a failure (``code``, ``message``) this turn."""
        self.answer(PackedResult.failure(task_id, code, message, None, transitions))

    def answer_all(self, results: List[PackedResult]) -> None:
        """Deliver ``results`` (if any) at the end of this reactor turn."""
        self._ready.extend(results)
        if self._ready and self._deliver_call is None:
            self._deliver_call = self.clock.callLater(0, self.deliver)

    def deliver(self) -> None:
        """Hand the results ready so far to the result sink, in one batch."""
        cancel_call(self._deliver_call)
        self._deliver_call = None
        ready, self._ready = self._ready, []
        if not ready:
            return
        # A result carries its task's transitions itself: status reports need
        # only those of tasks still in flight (and stay small).
        transitions = self._transitions
        for result in ready:
            transitions.pop(result.task_id, None)
        if self.state_listener is not None:
            self.state_listener.finished([result.task_id for result in ready])
        try:
            self.result_sink.results_ready(ready)
        except Exception:
            self.log.failure("The result sink failed for {count} results", count=len(ready))
