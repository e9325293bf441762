"""The interfaces that join the endpoint's parts, and what crosses them.

Tasks go one way and results the other::

    task intake ──IInterchange.submit──► interchange ──IResultSink.results_ready──► result sink
                                              │ ▲
                          IRoutingPolicy.assign │ │ IManagerEvents (registry → dispatcher)
                                              ▼ │
                                           managers

* The endpoint's task intake hands tasks to an :class:`IInterchange`, which
  gives every task it accepted exactly one result to the :class:`IResultSink`
  it was built with (in batches, as
  :class:`~funcx_endpoint.wire.results.PackedResult`\\ s).
* Inside the interchange, the manager registry tells the task dispatcher
  about managers coming and going (:class:`IManagerEvents`), and the
  dispatcher asks an :class:`IRoutingPolicy` where queued tasks go.
* The scaling strategy reads the load through :class:`ILoadSource`.

Fakes that provide these interfaces, for tests, are in
:mod:`funcx_endpoint.testing.interchanges`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.application.service import IService
from zope.interface import Attribute, Interface

from funcx_endpoint.wire import PackedResult, Task, TaskTransition


class IResultSink(Interface):
    """Where the results of tasks go (the endpoint's result publisher)."""

    def results_ready(results: List[PackedResult]) -> None:
        """Take these results (each for a task handed to the interchange).

        Must not raise for anything a result holds; the caller has forgotten
        the tasks.
        """


class IInterchange(IService):
    """Runs tasks and gives each its result."""

    def submit(tasks: Sequence[Task]) -> None:
        """Accept tasks to run.  Each gets exactly one result through the
        result sink unless it is withdrawn by :meth:`withdraw_unstarted`.
        Raises RuntimeError once the interchange no longer accepts tasks."""

    def cancel(task_id: str) -> bool:
        """Cancel a task; its result (TaskCancelled) still goes to the sink.
        False if the task is unknown or already done."""

    def withdraw_unstarted() -> List[str]:
        """Stop accepting tasks; remove those not yet handed to a worker and
        return their ids (they get no result: the endpoint releases them to
        the broker).  Used on a clean stop."""

    def status() -> Dict[str, Any]:
        """Counts for status reports: ``managers``, ``total_workers``,
        ``idle_workers``, ``pending_tasks``, ``outstanding_tasks``."""

    def pop_transitions() -> Dict[str, List[TaskTransition]]:
        """Task state transitions recorded since the last call, by task id."""


class IManagerLoad(Interface):
    """What a routing policy may read of one manager that can take tasks now."""

    container_type = Attribute("str: the container type its workers run")
    worker_count = Attribute("int: its workers")
    capacity = Attribute("int: tasks it may hold (workers plus prefetch)")
    held = Attribute("int: tasks it holds now")
    sequence = Attribute("int: its registration order (earlier is smaller)")


class IWarmManagerLoad(IManagerLoad):
    """What soft routing also reads of a manager: its warm workers per type."""

    warm = Attribute(
        "Dict[str, int]: its workers running each container type now, busy or idle "
        "(as its last WarmContainers said; empty before it said anything)"
    )
    held_of_type = Attribute("Dict[str, int]: the tasks it holds, by container type")


class IRoutingPolicy(Interface):
    """Decides which manager gets which queued task.

    The policy keeps its own index of the managers that accept tasks (so a
    decision need not look at every manager): the dispatcher calls
    :meth:`update` when a manager starts accepting tasks and whenever its
    held count changes, and :meth:`remove` when it stops accepting them.
    """

    def task_type(task: Task) -> str:
        """The queue (container type) ``task`` waits in."""

    def update(manager: Any) -> None:
        """``manager`` (an :class:`IManagerLoad` provider) accepts tasks; its
        held count may have changed."""

    def remove(manager: Any) -> None:
        """``manager`` takes no more tasks (it is retiring, quitting or gone)."""

    def route(queued: Dict[str, int]) -> List[Tuple[str, Any, int]]:
        """Split the queued tasks (``{container type: how many}``, each more than
        0) among the managers with room: ``(container type, manager, how many)``
        triples, in the order the tasks should go; what :meth:`assign` does for
        each type, except that a policy may look at every type before it decides
        (soft routing gives warm workers their tasks before any cold start)."""

    def why_unservable(container_type: str, container: Any) -> Optional[str]:
        """Why no manager can ever run tasks of ``container_type`` (``container``:
        the :class:`~funcx_endpoint.wire.Container` a task names, or None), or
        None if one may.  Such tasks fail at once instead of waiting forever."""

    def assign(container_type: str, count: int) -> List[Tuple[Any, int]]:
        """Split up to ``count`` queued tasks of ``container_type`` among the
        managers that accept tasks and have room: ``(manager, how many)``
        pairs, in the order the tasks should go.  Never more than a
        manager's room.  The tasks are handed over at once: the policy counts
        them as held by their managers from now on."""


class IManagerEvents(Interface):
    """What the manager registry tells the task dispatcher."""

    def manager_joined(manager: Any) -> None:
        """A manager registered and may be given tasks."""

    def manager_closed(manager: Any) -> None:
        """A manager takes no more tasks (retiring, quitting); it may still answer."""

    def manager_left(manager: Any, why: str, on_purpose: bool) -> None:
        """A manager is gone: its unanswered tasks are queued again or fail.

        ``manager.block_id`` is its block; ``manager.silent`` is true if it was
        declared lost after ``heartbeat_threshold`` of silence (rather than
        its connection closing).

        ``on_purpose``: the endpoint ended it (scaling in), so its tasks lose
        no attempt.
        """

    def results_received(manager: Any, results: List[bytes]) -> None:
        """A batch of encoded results from a registered manager."""

    def held_by(manager: Any) -> int:
        """How many tasks ``manager`` holds (for the registry's messages)."""

    def warm_containers(manager: Any, warm: Dict[str, int], cold_starts: int) -> None:
        """``manager`` said which container types it has warm workers of, and how
        many cold starts it has made since it started (``WarmContainers``)."""

    def tasks_started(manager: Any, started: List[Tuple[str, int]]) -> None:
        """``manager`` gave these tasks to workers (``(task id, ns since the epoch)``)."""


class ITaskStateListener(Interface):
    """Hears of task transitions as they happen (real-time task states)."""

    def transition(task_id: str, transition: Any) -> None:
        """``task_id`` made ``transition`` (a TaskTransition)."""

    def finished(task_ids: List[str]) -> None:
        """These tasks' results are on their way (carrying their transitions)."""


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
    container_type: str = "RAW"  # the type it serves (hard routing)


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

    def drain_block(block_id: str, why: str) -> bool:
        """Block ``block_id``'s walltime ends soon: its managers (and those of
        it that register later) get no new task, and tasks lost with them
        are queued again without counting an attempt.  False if it was
        draining already."""

    def departures() -> Dict[str, int]:
        """How many registered managers of each block have gone so far (for
        whatever reason), by block id, for the most recent blocks: a manager
        that came and went between two looks at :meth:`managers` shows here."""

    def fail_waiting(code: str, message: str) -> int:
        """Answer every task still waiting for a manager (none of those a
        manager holds) with a failure of this error code and message; return
        how many.  For when no manager can come to take them."""


class ITypedLoadSource(ILoadSource):
    """The load by container type, for scaling blocks per type (hard routing)."""

    def outstanding_by_type() -> Dict[str, int]:
        """Tasks accepted and not yet answered, by container type (types with
        none may be absent)."""
