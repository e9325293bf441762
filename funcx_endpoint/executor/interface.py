"""The boundary between the endpoint's AMQP side and where tasks run.

The AMQP consumer hands each task to an :class:`IInterchange`; the
interchange gives every task it accepted exactly one :class:`Result` back,
through the ``on_results`` callback it was built with (results come in
batches).  The real interchange (``executor/interchange.py``) dispatches to
managers and workers; :class:`EchoInterchange` answers at once, for tests and
for the AMQP pipe benchmark.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import attr
from twisted.application.service import IService, Service
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

from funcx_endpoint.protocol import Result, Task, TaskTransition, serialize

ResultsCallback = Callable[[List[Result]], None]


class IInterchange(IService):
    """Runs tasks and reports their results."""

    on_results = Attribute("Callable[[List[Result]], None]: where results go, in batches.")

    def submit(tasks: Sequence[Task]) -> None:
        """Accept tasks to run.  Each gets exactly one result via ``on_results``
        unless it is withdrawn by :meth:`withdraw_unstarted`."""

    def cancel(task_id: str) -> bool:
        """Cancel a task; its result (TaskCancelled) still comes through
        ``on_results``.  False if the task is unknown or already done."""

    def withdraw_unstarted() -> List[str]:
        """Stop accepting tasks; remove those not yet handed to a worker and
        return their ids (they get no result: the endpoint releases them to
        the broker).  Used on a clean stop."""

    def status() -> Dict[str, Any]:
        """Counts for status reports: ``managers``, ``total_workers``,
        ``idle_workers``, ``pending_tasks``, ``outstanding_tasks``."""

    def pop_transitions() -> Dict[str, List[TaskTransition]]:
        """Task state transitions recorded since the last call, by task id."""


@implementer(IInterchange)
class EchoInterchange(Service):
    """Answers every task at once with a fixed successful result.

    Results are batched per reactor turn, as a real interchange batches them.
    """

    name = "interchange"

    def __init__(
        self,
        clock: IReactorTime,
        on_results: Optional[ResultsCallback] = None,
        result_data: Optional[str] = None,
        delay: float = 0.0,
    ) -> None:
        """``delay``: seconds before answering (a stand-in for running time)."""
        self._clock = clock
        self._delay = delay
        self.on_results: ResultsCallback = on_results or (lambda results: None)
        self._data = result_data if result_data is not None else serialize(None)
        self._ready: List[Result] = []
        self._scheduled = False
        self.accepting = True
        self.submitted = 0

    def submit(self, tasks: Sequence[Task]) -> None:
        if not self.accepting:
            raise RuntimeError("the interchange is stopping and takes no more tasks")
        data = self._data
        self.submitted += len(tasks)
        if self._delay:
            batch = [Result(task.task_id, data) for task in tasks]
            self._clock.callLater(self._delay, lambda: self.on_results(batch))
            return
        self._ready.extend(Result(task.task_id, data) for task in tasks)

        if not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        ready, self._ready = self._ready, []
        if ready:
            self.on_results(ready)

    def cancel(self, task_id: str) -> bool:
        return False

    def withdraw_unstarted(self) -> List[str]:
        self.accepting = False
        return []

    def status(self) -> Dict[str, Any]:
        return {
            "managers": 0,
            "total_workers": 0,
            "idle_workers": 0,
            "pending_tasks": len(self._ready),
            "outstanding_tasks": {"RAW": len(self._ready)},
        }

    def pop_transitions(self) -> Dict[str, List[TaskTransition]]:
        return {}


@attr.s(auto_attribs=True, frozen=True)
class ManagerInfo:
    """What the interchange knows of one connected manager (for scaling and status)."""

    manager_id: str
    block_id: str
    hostname: str
    worker_count: int
    idle_workers: int
    active_tasks: int  # tasks sent to it and not answered yet
    registered_at: float  # clock time
    idle_since: Optional[float]  # clock time it last became idle; None while busy
    tasks_completed: int = 0  # results it has sent back


class ILoadSource(Interface):
    """The load numbers a scaling strategy reads (the interchange provides them)."""

    def outstanding_tasks() -> int:
        """Tasks accepted and not yet answered: queued here plus in flight at managers."""

    def managers() -> List[ManagerInfo]:
        """The managers connected now."""

    def retire_block(block_id: str, reason: str, only_idle: bool) -> bool:
        """The endpoint is about to end block ``block_id``: give its managers no
        more tasks and tell them to shut down; a manager of it that registers
        later is retired at once.  Tasks lost with a retired manager are
        queued again without counting an attempt.

        With ``only_idle``, nothing is done and False returned if a manager of
        the block holds a task (it may have been given one since the caller
        looked).  True otherwise.
        """
