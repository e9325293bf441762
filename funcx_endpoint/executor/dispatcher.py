"""The task dispatcher: queues, batches to managers, results back, retries.

:class:`TaskDispatcher` holds every task the interchange accepted until it
has its result:

* Tasks wait in a queue per container type (the routing policy's
  :meth:`~funcx_endpoint.executor.interface.IRoutingPolicy.task_type`).
  Once per reactor turn the queues are split among the managers that accept
  tasks and have room (``capacity = workers + prefetch_capacity * workers``),
  as the routing policy says; the policy's index of those managers is kept
  up to date as their loads change, and so are the totals :meth:`load_totals`
  reports, so that nothing done per turn or per status report looks at every
  manager.
* Tasks given to a manager go in batches (``SubmitTasks``), at once after a
  quiet period, else at most one batch per ``batch_interval`` as long as the
  manager's queued tasks outlast the wait at its measured completion rate.
* Results come back in batches; each result's header is read (its task id)
  and the interchange's own transitions (``waiting-for-nodes``,
  ``waiting-for-launch``) are added to it, without decoding its payload.
  Results go to the :class:`~funcx_endpoint.executor.interface.IResultSink`
  in batches, one call per reactor turn.
* When a manager is lost its tasks are queued again, up to
  ``max_retries`` times each, then fail with ``ManagerLost``.  Its block's
  other managers get no new task for ``block_holdoff`` seconds, unless it
  went silent (:mod:`~funcx_endpoint.executor.block_pauses` says why).
  A block whose walltime ends soon *drains*: its managers get no new task,
  and tasks lost with them (their manager gone, or ``WorkerLost``) are
  queued again without counting an attempt.

The dispatcher knows managers only through the registry's events
(:class:`~funcx_endpoint.executor.interface.IManagerEvents`) and talks to
them through :class:`~funcx_endpoint.executor.registry.Manager`'s methods.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from funcx_endpoint.executor.block_pauses import BlockPauses
from funcx_endpoint.executor.interface import (
    IManagerEvents,
    IResultSink,
    IRoutingPolicy,
)
from funcx_endpoint.executor.routing import RAW
from funcx_endpoint.executor.slots import ManagerSlot, TaskRecord
from funcx_endpoint.wire import (
    ActorName,
    ErrorCode,
    MessageError,
    PackedResult,
    Task,
    TaskState,
    TaskTransition,
)

__all__ = ["ManagerSlot", "TaskDispatcher", "TaskRecord"]


@implementer(IManagerEvents)
class TaskDispatcher:
    """Queues tasks, sends them to managers in batches, returns their results."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        result_sink: IResultSink,
        routing: IRoutingPolicy,
        *,
        max_retries: int = 0,
        batch_interval: float = 0.001,
        max_recorded_tasks: int = 10_000,
        block_holdoff: float = 2.0,
    ) -> None:
        self.clock = clock
        self.result_sink = result_sink
        self.routing = routing
        self.max_retries = max_retries
        self.batch_interval = batch_interval
        self.block_holdoff = block_holdoff
        self.pauses = BlockPauses(clock, block_holdoff, self._pause_block, self._resume_blocks)
        self.accepting = True
        self._dispatching = True
        self._tasks: Dict[str, TaskRecord] = {}
        self._queues: Dict[str, Deque[TaskRecord]] = {}
        self._slots: Dict[Any, ManagerSlot] = {}  # by manager
        self._workers = 0  # of all managers here
        self._idle_workers = 0  # sum of max(0, workers - held)
        self._managers_of_type: Dict[str, int] = {}  # manager's container type: managers
        self._held_of_type: Dict[str, int] = {}  # task's container type: tasks held
        self._warm: Dict[str, int] = {}  # container type: warm workers at all managers
        self._cold_starts = 0  # reported by managers, those gone included
        self._ready: List[PackedResult] = []
        self._deliver_call: Optional[IDelayedCall] = None
        self._dispatch_call: Optional[IDelayedCall] = None
        self._transitions: Dict[str, List[TaskTransition]] = {}
        self._max_recorded = max_recorded_tasks
        self._dropped_transitions = 0

    # -- tasks in -------------------------------------------------------------

    def submit(self, tasks: Sequence[Task]) -> None:
        """Queue ``tasks``; they go to managers at the end of this reactor turn.

        A task whose id is already here is ignored (its first copy will be
        answered).
        """
        if not self.accepting:
            raise RuntimeError("the interchange is stopping and takes no more tasks")
        transition = TaskTransition.now(TaskState.WAITING_FOR_NODES, ActorName.INTERCHANGE)
        known = self._tasks
        task_type = self.routing.task_type
        unservable = self.routing.why_unservable
        for task in tasks:
            task_id = task.task_id
            if task_id in known:
                self.log.warn(
                    "Task {task_id} is already here; ignoring a second copy", task_id=task_id
                )
                continue
            container_type = task_type(task)
            if container_type != RAW:
                why = unservable(container_type, task.container)
                if why is not None:
                    self._refuse(task_id, why, transition)
                    continue
            record = TaskRecord(task, container_type, transition)
            known[task_id] = record
            self._queue(container_type).append(record)
            self._note(task_id, transition)
        self._schedule_dispatch()

    def _refuse(self, task_id: str, why: str, transition: TaskTransition) -> None:
        """Answer a task no manager can ever run (``ContainerError``) at once."""
        self.log.warn("Task {task_id} cannot run here: {why}", task_id=task_id, why=why)
        self._answer(
            PackedResult.failure(
                task_id, ErrorCode.CONTAINER_ERROR, f"Task {task_id}: {why}", None, [transition]
            )
        )

    def cancel(self, task_id: str) -> bool:
        """Cancel a task queued here or at a manager; it is answered ``TaskCancelled``."""
        record = self._tasks.pop(task_id, None)
        if record is None:
            return False
        slot = record.slot
        if slot is None:
            self._queues[record.container_type].remove(record)
            where = "while it waited for a worker"
        else:
            slot.release(record)
            self._held_changed(slot, len(slot.outstanding) + 1)
            if not slot.outstanding:
                slot.idle_since = self.clock.seconds()
            where = f"at {slot.manager.describe()}"
            unsent = [pair for pair in slot.unsent if pair[0] != task_id]
            if len(unsent) < len(slot.unsent):
                slot.unsent = unsent  # it never left: nothing to tell the manager
                slot.unsent_containers.pop(task_id, None)
            else:
                slot.manager.cancel_task(task_id)
            self._schedule_dispatch()
        self.log.info("Task {task_id} cancelled {where}", task_id=task_id, where=where)
        self._answer(
            PackedResult.failure(
                task_id,
                ErrorCode.TASK_CANCELLED,
                f"Task {task_id} was cancelled {where}",
                None,
                record.transitions,
            )
        )
        return True

    def withdraw_unstarted(self) -> List[str]:
        """Stop accepting; remove the tasks not sent to a manager and return their ids.

        Tasks assigned to a manager but still waiting for the next batch to it
        are withdrawn too.
        """
        self.accepting = False
        withdrawn = []
        for queue in self._queues.values():
            for record in queue:
                del self._tasks[record.task_id]
                withdrawn.append(record.task_id)
            queue.clear()
        for slot in self._slots.values():
            if not slot.unsent:
                continue
            before = len(slot.outstanding)
            for task_id, _ in slot.unsent:
                slot.release(slot.outstanding[task_id])
                del self._tasks[task_id]
                withdrawn.append(task_id)
            slot.unsent = []
            slot.unsent_containers = {}
            self._held_changed(slot, before)
        return withdrawn

    def fail_waiting(self, code: str, message: str) -> int:
        """Fail the tasks waiting for a manager with ``code`` and ``message``;
        return how many (see :meth:`ILoadSource.fail_waiting`)."""
        failed = 0
        for queue in self._queues.values():
            while queue:
                record = queue.popleft()
                del self._tasks[record.task_id]
                failed += 1
                self._answer(
                    PackedResult.failure(
                        record.task_id,
                        code,
                        f"Task {record.task_id} was not run: {message}",
                        None,
                        record.transitions,
                    )
                )
        return failed

    def drain_block(self, block_id: str, why: str) -> bool:
        """The managers of ``block_id`` get no new task from now on, and tasks
        lost with them are retried without counting an attempt (see
        :class:`~funcx_endpoint.executor.block_pauses.BlockPauses`); False if
        it was draining already."""
        return self.pauses.drain(block_id, why)

    def stop(self) -> None:
        """Send no more tasks (the interchange is stopping) and deliver what is ready."""
        self.accepting = False
        self._dispatching = False
        if self._dispatch_call is not None:
            self._dispatch_call.cancel()
            self._dispatch_call = None
        self.pauses.stop()
        self.deliver()

    # -- managers (IManagerEvents) -------------------------------------------

    def manager_joined(self, manager: Any) -> None:
        slot = self._slots[manager] = ManagerSlot(manager, self.clock.seconds(), self._held_of_type)
        self._workers += slot.worker_count
        self._idle_workers += max(0, slot.worker_count)
        of_type = self._managers_of_type
        of_type[slot.container_type] = of_type.get(slot.container_type, 0) + 1
        if self.pauses.paused(str(manager.block_id)):
            slot.paused = True
        else:
            self.routing.update(slot)
        self._schedule_dispatch()

    def manager_closed(self, manager: Any) -> None:
        slot = self._slots.get(manager)
        if slot is not None:
            slot.accepting = False
            self.routing.remove(slot)

    def manager_left(self, manager: Any, why: str, on_purpose: bool) -> None:
        slot = self._slots.pop(manager, None)
        if slot is None:
            return
        slot.accepting = False
        self.routing.remove(slot)
        if slot.push_call is not None:
            slot.push_call.cancel()
            slot.push_call = None
        records = list(slot.outstanding.values())
        slot.release_all()
        self._warm_changed(slot, {})
        self._held_changed(slot, len(records))
        self._workers -= slot.worker_count
        self._idle_workers -= max(0, slot.worker_count)
        left = self._managers_of_type[slot.container_type] - 1
        if left:
            self._managers_of_type[slot.container_type] = left
        else:
            del self._managers_of_type[slot.container_type]
        slot.unsent = []
        slot.unsent_containers = {}
        for record in records:
            record.slot = None
        block_id = str(manager.block_id)
        at_walltime = not on_purpose and self.pauses.draining(block_id)
        if not on_purpose and self.accepting and not manager.silent:
            self.pauses.hold(block_id)
        if not records or not self.accepting:
            # Stopping (tasks were withdrawn): the broker delivers these tasks
            # again; failing them now would be wrong.
            return
        if on_purpose or at_walltime:
            # Ended by the endpoint, or by the scheduler at its block's walltime.
            for record in records:
                record.attempts -= 1
            if at_walltime:
                why = f"{why} (its block's walltime ended: tasks retried, no attempt counted)"
        retry = [r for r in records if r.attempts <= self.max_retries]
        failed = [r for r in records if r.attempts > self.max_retries]
        self._requeue(retry)
        description = manager.describe()
        for record in failed:
            task_id = record.task_id
            del self._tasks[task_id]
            self._answer(
                PackedResult.failure(
                    task_id,
                    ErrorCode.MANAGER_LOST,
                    f"Task {task_id} was lost with {description}: {why}. It was "
                    f"tried {record.attempts} time(s) (max_retries_on_system_failure is "
                    f"{self.max_retries}).",
                    None,
                    record.transitions,
                )
            )
        self.log.warn(
            "Lost {manager}: {why}; {retried} tasks queued again, {failed} failed",
            manager=description,
            why=why,
            retried=len(retry),
            failed=len(failed),
        )

    def results_received(self, manager: Any, results: List[bytes]) -> None:
        slot = self._slots.get(manager)
        if slot is None:
            return
        outstanding = slot.outstanding
        held_before = len(outstanding)
        tasks = self._tasks
        answer = self._ready.append
        decode = PackedResult.decode
        draining = self.pauses.draining(str(manager.block_id))
        killed: List[TaskRecord] = []
        for raw in results:
            try:
                result = decode(raw)
            except MessageError as exc:
                unreadable = self._unreadable_result(manager, exc)
                if unreadable is None:
                    continue
                result = unreadable
            task_id = result.task_id
            record = outstanding.get(task_id)
            if record is None:
                # Cancelled meanwhile, or never sent there.
                self.log.debug(
                    "Ignored a result for task {task_id}, which {manager} does not hold",
                    task_id=task_id,
                    manager=manager.describe(),
                )
                continue
            slot.release(record)
            if draining and result.is_error and _worker_lost(result):
                killed.append(record)  # by the scheduler at its block's walltime
                continue
            del tasks[task_id]
            result.add_transitions(record.transitions)
            answer(result)
        if killed:
            for record in killed:
                record.slot = None
                record.attempts -= 1
            self.log.info(
                "{count} task(s) lost their worker on {manager}, whose block's walltime "
                "ends: queued again, no attempt counted",
                count=len(killed),
                manager=manager.describe(),
            )
            self._requeue(killed)
        now = self.clock.seconds()
        slot.completions.add(len(results), now)
        slot.tasks_completed += len(results)
        if len(outstanding) != held_before:
            self._held_changed(slot, held_before)
        if not outstanding:
            slot.idle_since = now
        if self._ready and self._deliver_call is None:
            self._deliver_call = self.clock.callLater(0, self.deliver)
        self._schedule_dispatch()

    def warm_containers(self, manager: Any, warm: Dict[str, int], cold_starts: int) -> None:
        slot = self._slots.get(manager)
        if slot is None:
            return
        self._cold_starts += max(0, cold_starts - slot.cold_starts)
        slot.cold_starts = cold_starts
        self._warm_changed(slot, dict(warm))
        if slot.accepting:
            self.routing.update(slot)
            self._schedule_dispatch()

    def _warm_changed(self, slot: ManagerSlot, warm: Dict[str, int]) -> None:
        totals = self._warm
        for container_type, count in slot.warm.items():
            left = totals.get(container_type, 0) - count
            if left > 0:
                totals[container_type] = left
            else:
                totals.pop(container_type, None)
        for container_type, count in warm.items():
            if count > 0:
                totals[container_type] = totals.get(container_type, 0) + count
        slot.warm = warm

    def _unreadable_result(self, manager: Any, error: MessageError) -> Optional[PackedResult]:
        """The failure that answers a result this endpoint cannot read, if it
        names a task (else None: nothing to answer, it is only logged).

        A manager of another version may send what this one does not accept;
        its task must still end, not wait at the manager forever.
        """
        self.log.warn(
            "Unreadable result from {manager}: {error}", manager=manager.describe(), error=error
        )
        if error.task_id is None:
            return None
        return PackedResult.failure(
            error.task_id,
            ErrorCode.VERSION_MISMATCH,
            f"the manager on {manager.hostname} sent a result this endpoint cannot read "
            f"(are the endpoint and the manager the same version?): {error}",
        )

    # -- what the facade reads --------------------------------------------------

    def held_by(self, manager: Any) -> int:
        """Tasks ``manager`` holds (sent or about to be)."""
        slot = self._slots.get(manager)
        return 0 if slot is None else len(slot.outstanding)

    def load_of(self, manager: Any) -> Tuple[int, Optional[float], int]:
        """``(tasks held, idle since, tasks completed)`` of ``manager``."""
        slot = self._slots.get(manager)
        if slot is None:
            return 0, None, 0
        return len(slot.outstanding), slot.idle_since, slot.tasks_completed

    def load_totals(self) -> Tuple[int, int, Dict[str, int]]:
        """``(workers, idle workers, tasks held by their container type)`` of the
        managers here (a type appears while a manager of it is here)."""
        return (
            self._workers,
            self._idle_workers,
            self._held_by_type(),
        )

    def warm_totals(self) -> Tuple[Dict[str, int], int]:
        """``(warm workers by container type, cold starts)``: the warm workers of
        the managers here; the cold starts of every manager since the start."""
        return dict(self._warm), self._cold_starts

    def cold_starts_of(self, manager: Any) -> int:
        """The cold starts ``manager`` reported."""
        slot = self._slots.get(manager)
        return 0 if slot is None else slot.cold_starts

    def _held_by_type(self) -> Dict[str, int]:
        # The types of the managers here (0 if they hold none), and of the
        # tasks held (a task's own type: soft routing's managers serve any).
        held = dict.fromkeys(self._managers_of_type, 0)
        held.update(self._held_of_type)
        return held

    def record(self, task_id: str) -> Optional[TaskRecord]:
        """The record of a task held here, if any."""
        return self._tasks.get(task_id)

    def held_records(self) -> List[TaskRecord]:
        """The records of every task held here, in a new list (for listings: read only)."""
        return list(self._tasks.values())

    def outstanding_tasks(self) -> int:
        """Tasks accepted and not answered yet: queued here plus at managers."""
        return len(self._tasks)

    def queued(self) -> Dict[str, int]:
        """Tasks waiting for a manager, by container type."""
        return {container_type: len(queue) for container_type, queue in self._queues.items()}

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

    # -- dispatching --------------------------------------------------------------

    def _queue(self, container_type: str) -> Deque[TaskRecord]:
        queue = self._queues.get(container_type)
        if queue is None:
            queue = self._queues[container_type] = deque()
        return queue

    def _note(self, task_id: str, transition: TaskTransition) -> None:
        recorded = self._transitions.get(task_id)
        if recorded is not None:
            recorded.append(transition)
        elif len(self._transitions) < self._max_recorded:
            self._transitions[task_id] = [transition]
        else:
            self._dropped_transitions += 1

    def _pause_block(self, block_id: str) -> None:
        """The managers of ``block_id`` leave the routing policy's index (see
        :class:`~funcx_endpoint.executor.block_pauses.BlockPauses`)."""
        for slot in self._slots.values():
            if str(slot.manager.block_id) == block_id and not slot.paused:
                slot.paused = True
                self.routing.remove(slot)

    def _resume_blocks(self, block_ids: Set[str]) -> None:
        for slot in self._slots.values():
            if slot.paused and str(slot.manager.block_id) in block_ids:
                slot.paused = False
                if slot.accepting:
                    self.routing.update(slot)
        self._schedule_dispatch()

    def _schedule_dispatch(self) -> None:
        if self._dispatch_call is None and self._dispatching:
            self._dispatch_call = self.clock.callLater(0, self._dispatch)

    def _dispatch(self) -> None:
        """Send queued tasks to managers with room, as the routing policy says."""
        self._dispatch_call = None
        queues = self._queues
        queued = {container_type: len(queue) for container_type, queue in queues.items() if queue}
        if not queued:
            return
        for container_type, slot, count in self.routing.route(queued):
            queue = queues[container_type]
            popleft = queue.popleft
            self._send_tasks(slot, [popleft() for _ in range(min(count, len(queue)))])

    def _requeue(self, records: List[TaskRecord]) -> None:
        """Queue ``records`` again, first in their queues (they waited longest)."""
        if not records:
            return
        transition = TaskTransition.now(TaskState.WAITING_FOR_NODES, ActorName.INTERCHANGE)
        for record in reversed(records):
            record.transitions.append(transition)
            self._note(record.task_id, transition)
            self._queue(record.container_type).appendleft(record)
        self._schedule_dispatch()

    def _held_changed(self, slot: ManagerSlot, before: int) -> None:
        """Keep the totals and the routing policy's index up to date."""
        held = len(slot.outstanding)
        workers = slot.worker_count
        self._idle_workers += max(0, workers - held) - max(0, workers - before)
        if slot.accepting and not slot.paused:
            self.routing.update(slot)

    def _send_tasks(self, slot: ManagerSlot, batch: List[TaskRecord]) -> None:
        transition = TaskTransition.now(TaskState.WAITING_FOR_LAUNCH, ActorName.INTERCHANGE)
        outstanding = slot.outstanding
        before = len(outstanding)
        note = self._note
        unsent = slot.unsent
        for record in batch:
            task_id = record.task_id
            record.slot = slot
            record.attempts += 1
            record.transitions.append(transition)
            slot.hold(record)
            note(task_id, transition)
            unsent.append((task_id, record.buffer))
            if record.container is not None:
                slot.unsent_containers[task_id] = record.container
        self._held_changed(slot, before)
        slot.idle_since = None
        self._push(slot)

    def _push(self, slot: ManagerSlot) -> None:
        """Send the manager its unsent tasks now, or when ``batch_interval`` allows.

        They go at once after a quiet period, or when the manager holds no more
        tasks than it has workers (they would wait for these).
        """
        if slot.push_call is not None or not slot.unsent:
            return
        wait = slot.last_push + self.batch_interval - self.clock.seconds()
        # Tasks the manager has beyond one per worker: while they last longer
        # than the wait, its workers do not wait for this batch, which may
        # grow meanwhile.
        spare = len(slot.outstanding) - len(slot.unsent) - slot.worker_count
        if wait > 0 and spare > slot.completions.rate * wait:
            slot.push_call = self.clock.callLater(wait, self._push_now, slot)
        else:
            self._push_now(slot)

    def _push_now(self, slot: ManagerSlot) -> None:
        slot.push_call = None
        if not slot.unsent or self._slots.get(slot.manager) is not slot:
            return
        slot.last_push = self.clock.seconds()
        batch, slot.unsent = slot.unsent, []
        containers, slot.unsent_containers = slot.unsent_containers, {}
        slot.manager.send_tasks(batch, containers)

    # -- results out ----------------------------------------------------------------

    def _answer(self, result: PackedResult) -> None:
        self._ready.append(result)
        if self._deliver_call is None:
            self._deliver_call = self.clock.callLater(0, self.deliver)

    def deliver(self) -> None:
        """Hand the results ready so far to the result sink, in one batch."""
        if self._deliver_call is not None and self._deliver_call.active():
            self._deliver_call.cancel()
        self._deliver_call = None
        ready, self._ready = self._ready, []
        if not ready:
            return
        # A result carries its task's transitions itself: status reports need
        # only those of tasks still in flight (and stay small).
        transitions = self._transitions
        for result in ready:
            transitions.pop(result.task_id, None)
        try:
            self.result_sink.results_ready(ready)
        except Exception:
            self.log.failure("The result sink failed for {count} results", count=len(ready))


def _worker_lost(result: PackedResult) -> bool:
    """Whether a failure is ``WorkerLost`` (its error details only are read)."""
    try:
        details = json.loads(bytes(result.error_details))
    except ValueError:
        return False
    return isinstance(details, dict) and details.get("code") == ErrorCode.WORKER_LOST
