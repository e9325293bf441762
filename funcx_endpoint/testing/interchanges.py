"""Interchanges for tests of the endpoint's transport (no processes).

Both provide :class:`~funcx_endpoint.executor.interface.IInterchange` and
give their results to the
:class:`~funcx_endpoint.executor.interface.IResultSink` they are built with,
like the real interchange:

* :class:`EchoInterchange` answers every task at once with a fixed result
  (tests, the AMQP pipe benchmark, the echo endpoint);
* :class:`HoldingInterchange` keeps every task it is given until the test
  says what to answer, so tests can stop, kill or disconnect things while
  tasks are "running", count how often each task was submitted, and send
  results of any size.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

import attr
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from funcx_endpoint.batching import TurnBatch
from funcx_endpoint.executor.interface import IInterchange, IResultSink
from funcx_endpoint.wire import PackedResult, Result, Task, TaskTransition, serialize

__all__ = ["CollectingSink", "EchoInterchange", "HoldingInterchange"]


def _with_default_result(data: Optional[str]) -> str:
    """The result data given, or a serialized None."""
    return data if data is not None else serialize(None)


@implementer(IInterchange)
@attr.s(auto_attribs=True, eq=False, repr=False)
class EchoInterchange(Service):
    """Answers every task at once with a fixed successful result.

    Results are batched per reactor turn, as a real interchange batches them;
    ``delay``: seconds before answering (a stand-in for running time).
    """

    name = "interchange"

    _clock: IReactorTime
    result_sink: IResultSink
    _data: str = attr.ib(default=None, converter=_with_default_result, alias="result_data")
    _delay: float = 0.0
    _ready: TurnBatch[PackedResult] = attr.ib(init=False)
    accepting: bool = attr.ib(default=True, init=False)
    submitted: int = attr.ib(default=0, init=False)

    @_ready.default
    def _results_each_turn(self) -> TurnBatch[PackedResult]:
        return TurnBatch(self._clock, lambda ready: self.result_sink.results_ready(ready))

    def submit(self, tasks: Sequence[Task]) -> None:
        if not self.accepting:
            raise RuntimeError("the interchange is stopping and takes no more tasks")
        data = self._data
        self.submitted += len(tasks)
        batch = [PackedResult.success(task.task_id, data) for task in tasks]
        if self._delay:
            self._clock.callLater(self._delay, self.result_sink.results_ready, batch)
            return
        self._ready.extend(batch)

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


@implementer(IInterchange)
class HoldingInterchange(Service):
    """Holds tasks until :meth:`answer` is called; counts submissions.

    Tasks count as "started" once :meth:`start_tasks` marks them so; only
    unstarted ones are withdrawn on a clean stop.
    """

    name = "interchange"

    def __init__(self, result_sink: IResultSink) -> None:
        self.result_sink = result_sink
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
                results.append(PackedResult.success(task_id, payload))
        if results:
            self.result_sink.results_ready(results)
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


@implementer(IResultSink)
class CollectingSink:
    """A result sink that keeps what it is given, for tests.

    ``on_batch`` (optional) is called with each batch of
    :class:`~funcx_endpoint.wire.Result`\\ s, decoded.
    """

    def __init__(self, on_batch: Optional[Any] = None) -> None:
        self.packed: List[PackedResult] = []
        self.batch_sizes: List[int] = []
        self._on_batch = on_batch

    def results_ready(self, results: List[PackedResult]) -> None:
        self.packed.extend(results)
        self.batch_sizes.append(len(results))
        if self._on_batch is not None:
            self._on_batch([result.to_result() for result in results])

    @property
    def results(self) -> List[Result]:
        """Every result so far, decoded."""
        return [result.to_result() for result in self.packed]
