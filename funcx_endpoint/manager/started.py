"""Task starts, told to the interchange once per reactor turn (real-time ``running``)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from funcx_endpoint.wire.amp import TasksStarted, send_unanswered

__all__ = ["StartReports"]


class StartReports:
    """Gathers ``(task id, ns)`` as workers take tasks; at the end of the reactor
    turn sends them in one ``TasksStarted`` over ``connection()`` (if connected)."""

    log = Logger()

    def __init__(self, clock: Any, connection: Callable[[], Any]) -> None:
        self._clock = clock
        self._connection = connection
        self._started: List[Tuple[str, int]] = []
        self._call: Optional[IDelayedCall] = None

    def started(self, task_id: str, started_ns: int) -> None:
        """A worker took ``task_id`` at ``started_ns``."""
        self._started.append((task_id, started_ns))
        if self._call is None:
            self._call = self._clock.callLater(0, self.send)

    def send(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        started, self._started = self._started, []
        connection = self._connection()
        if started and connection is not None:
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
        self._started = []
