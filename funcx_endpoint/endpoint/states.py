"""Task states to the service as they happen (``task_states`` messages).

:class:`TaskStatePublisher` is the interchange dispatcher's
:class:`~funcx_endpoint.executor.interface.ITaskStateListener`.  It keeps the
latest transition of each task in flight (``waiting-for-nodes``,
``waiting-for-launch``, ``running``) and sends a state once the task has
been in it for ``interval`` seconds: when the oldest state waiting settles
(at most four times an interval), the settled states go in one
:class:`~funcx_endpoint.wire.TaskStatesMessage` on the results connection
(confirmed, never spooled).  A state reaches the service ``interval`` to 1.25
``interval`` after it began.  A state that ends sooner is
not sent (the next one, or the result, which carries every transition, says
more); a task whose result went out is forgotten.  So a stream of short
tasks costs no message at all, however deep the queue, and a long task, or
one that waits long, is seen waiting and then running.

It sends only if the service agreed to
:data:`~funcx_endpoint.wire.TASK_STATES` at registration; a message the
broker does not confirm is dropped (the next status report carries the
transitions too).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from funcx_endpoint.endpoint.broker_info import BrokerInfo
from funcx_endpoint.executor.interface import ITaskStateListener
from funcx_endpoint.lifecycle import cancel_call
from funcx_endpoint.wire import TASK_STATES, Message, TaskStatesMessage, TaskTransition

__all__ = ["TaskStatePublisher"]


@implementer(ITaskStateListener)
@attr.s(auto_attribs=True, eq=False)
class TaskStatePublisher:
    """Gathers task transitions; sends those that lasted ``interval`` seconds of ``clock``.

    ``broker_info()`` says (once registered) the endpoint's id and whether the
    service takes task states; ``publish(message)`` sends a message.
    """

    log = Logger()
    #: tasks per message at most (the rest go in the next one)
    max_tasks = 10_000

    _clock: Any
    _broker_info: Callable[[], Optional[BrokerInfo]]
    _publish: Callable[[Message], Deferred[None]]
    interval: float = 0.5
    #: task id -> (latest transition, when noted); oldest first, as a state
    #: noted again moves to the end
    _latest: Dict[str, Tuple[TaskTransition, float]] = attr.ib(factory=dict, init=False)
    _call: Optional[IDelayedCall] = attr.ib(default=None, init=False)
    _enabled: Optional[bool] = attr.ib(default=None, init=False)  # None: not known yet
    #: Messages sent, and sends that failed.
    sent: int = attr.ib(default=0, init=False)
    failed: int = attr.ib(default=0, init=False)

    def _on(self) -> bool:
        enabled = self._enabled
        if enabled is None:
            info = self._broker_info()
            if info is None:
                return False
            enabled = self._enabled = TASK_STATES in info.features
            if not enabled:
                self.log.info(
                    "The service does not take real-time task states: they go with the "
                    "status reports only"
                )
        return enabled

    def transition(self, task_id: str, transition: TaskTransition) -> None:
        if not self._on():
            return
        latest = self._latest
        latest.pop(task_id, None)
        latest[task_id] = (transition, self._clock.seconds())
        if self._call is None:
            self._call = self._clock.callLater(self.interval, self.flush)

    def finished(self, task_ids: List[str]) -> None:
        latest = self._latest
        if latest:
            for task_id in task_ids:
                latest.pop(task_id, None)

    def flush(self) -> None:
        """Send the states that lasted ``interval`` so far; look again later if
        others are pending."""
        cancel_call(self._call)
        self._call = None
        latest = self._latest
        if not latest:
            return
        info = self._broker_info()
        if info is None:
            return
        now = self._clock.seconds()
        settled = now - self.interval
        batch: Dict[str, List[TaskTransition]] = {}
        for task_id, (transition, noted) in latest.items():
            if noted > settled or len(batch) >= self.max_tasks:
                break
            batch[task_id] = [transition]
        for task_id in batch:
            del latest[task_id]
        if latest:
            # When the oldest state left settles; not more often than four
            # times an interval (the oldest may keep finishing first).
            _, oldest = next(iter(latest.values()))
            wait = max(oldest + self.interval - now, self.interval / 4)
            self._call = self._clock.callLater(wait, self.flush)
        if batch:
            message = TaskStatesMessage(info.endpoint_id, batch)
            self._publish(message).addCallbacks(self._sent, self._failed)

    def _sent(self, _: Any) -> None:
        self.sent += 1

    def _failed(self, failure: Failure) -> None:
        self.failed += 1
        self.log.debug("Task states not delivered: {error}", error=failure.getErrorMessage())

    def stop(self) -> None:
        """Drop what is pending (a last status report follows) and the timer."""
        cancel_call(self._call)
        self._call = None
        self._latest.clear()
