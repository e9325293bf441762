"""Interchanges for tests of the endpoint's transport (no processes).

:class:`HoldingInterchange` keeps every task it is given until the test
says what to answer, so tests can stop, kill or disconnect things while
tasks are "running", count how often each task was submitted, and send
results of any size.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

from twisted.application.service import Service
from zope.interface import implementer

from funcx_endpoint.executor.interface import IInterchange, ResultsCallback
from funcx_endpoint.protocol import Result, Task, TaskTransition, serialize


@implementer(IInterchange)
class HoldingInterchange(Service):
    """Holds tasks until :meth:`answer` is called; counts submissions.

    Tasks count as "started" once :meth:`start_tasks` marks them so; only
    unstarted ones are withdrawn on a clean stop.
    """

    name = "interchange"

    def __init__(self, on_results: Optional[ResultsCallback] = None) -> None:
        self.on_results: ResultsCallback = on_results or (lambda results: None)
        self.held: Dict[str, Task] = {}
        self.started: set = set()
        self.submissions: Counter = Counter()
        self.accepting = True

    def submit(self, tasks: Sequence[Task]) -> None:
        if not self.accepting:
            raise RuntimeError("not accepting tasks")
        for task in tasks:
            self.submissions[task.task_id] += 1
            self.held[task.task_id] = task

    def start_tasks(self, task_ids: Optional[Sequence[str]] = None) -> None:
        self.started.update(task_ids if task_ids is not None else list(self.held))

    def answer(
        self,
        task_ids: Optional[Sequence[str]] = None,
        data: Any = None,
        raw_data: Optional[str] = None,
    ) -> List[str]:
        """Answer held tasks (all by default) with ``data`` serialized."""
        ids = list(task_ids) if task_ids is not None else list(self.held)
        payload = raw_data if raw_data is not None else serialize(data)
        results = []
        for task_id in ids:
            if self.held.pop(task_id, None) is not None:
                self.started.discard(task_id)
                results.append(Result(task_id, payload))
        if results:
            self.on_results(results)
        return [r.task_id for r in results]

    def cancel(self, task_id: str) -> bool:
        return False

    def withdraw_unstarted(self) -> List[str]:
        self.accepting = False
        withdrawn = [t for t in self.held if t not in self.started]
        for task_id in withdrawn:
            del self.held[task_id]
        return withdrawn

    def status(self) -> Dict[str, Any]:
        return {
            "managers": 0,
            "total_workers": 0,
            "idle_workers": 0,
            "pending_tasks": len(self.held) - len(self.started),
            "outstanding_tasks": {"RAW": len(self.held)},
        }

    def pop_transitions(self) -> Dict[str, List[TaskTransition]]:
        return {}
