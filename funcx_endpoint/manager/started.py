"""Task starts, told to the interchange in batches (real-time ``running``).

A start is worth telling only about a task that is still running a moment
later: the result of a task carries its ``running`` transition anyway.  So
:class:`StartReports` waits ``delay`` seconds after the first start it
gathers, leaves out the tasks whose results came back meanwhile, and sends
the rest in one ``TasksStarted``.  Under a stream of short tasks that is a
few small boxes a second instead of one per reactor turn; a long task is
reported ``running`` at most ``delay`` seconds late.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from funcx_endpoint.wire.amp import TasksStarted, send_unanswered

__all__ = ["START_REPORT_DELAY", "StartReports"]

#: Seconds between a task's start and its report, at most.
START_REPORT_DELAY = 0.02


class StartReports:
    """Gathers ``(task id, ns)`` as workers take tasks and sends those still
    running ``delay`` seconds later in one ``TasksStarted`` over ``connection()``
    (if connected)."""

    log = Logger()

    def __init__(
        self, clock: Any, connection: Callable[[], Any], delay: float = START_REPORT_DELAY
    ) -> None:
        self._clock = clock
        self._connection = connection
        self.delay = delay
        self._started: Dict[str, int] = {}
        self._call: Optional[IDelayedCall] = None

    def started(self, task_id: str, started_ns: int) -> None:
        """A worker took ``task_id`` at ``started_ns``."""
        self._started[task_id] = started_ns
        if self._call is None:
            self._call = self._clock.callLater(self.delay, self.send)

    def finished(self, task_id: str) -> None:
        """``task_id``'s result is back: its start needs no report."""
        self._started.pop(task_id, None)

    def send(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not self._started:
            return
        started, self._started = list(self._started.items()), {}
        connection = self._connection()
        if connection is not None:
            try:
                send_unanswered(connection, TasksStarted, started=started)
            except Exception as exc:
                self.log.warn(
                    "Could not report {n} started tasks: {error}", n=len(started), error=exc
                )

    def stop(self) -> None:
        """Drop what is pending and the timer."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._started = {}
