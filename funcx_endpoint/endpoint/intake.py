"""The task intake: tasks from the broker to the interchange, each run once.

:class:`TaskIntake` consumes the endpoint's task queue exclusively (its
connection set-up is :meth:`TaskIntake.prepare`) and, for each delivery:

* records it in the :class:`~funcx_endpoint.endpoint.deliveries.DeliveryLedger`,
  which says whether the task is new, already running (a redelivery after a
  reconnection: it is not run twice) or already done (its result is safe:
  acknowledged at once);
* reads the message; a malformed one with a readable task id is answered
  with ``MalformedTask``, one without is rejected (not requeued);
* checks ``allowed_functions`` (``FunctionNotAllowed``, without
  deserializing anything);
* checks a task's ``resource_specification`` (``InvalidResourceSpecification``)
  and puts it in front of the task buffer for the worker
  (:mod:`funcx_endpoint.wire.resources`), and the submitter's Python and dill
  versions (``user_runtime``, :mod:`funcx_endpoint.wire.runtime`) likewise;
* hands the tasks received in one reactor turn to the interchange together.

Commands from the service (``endpoint_command``, negotiated with
:data:`~funcx_endpoint.wire.ENDPOINT_COMMANDS`) arrive on the same queue and
are acknowledged at once: ``cancel`` drops a task received but not handed
over, or has the interchange cancel it (dropped from its queue, or its worker
killed); a cancel that arrives before its task is remembered, and the task
is answered ``TaskCancelled`` when it comes.  ``stop`` calls ``on_stop``
unless it was issued before this endpoint registered.

Error results it makes go to the same result sink as the interchange's.
Once :meth:`stop_taking` is called (the endpoint drains), deliveries that
still arrive are neither run nor acknowledged: they go back to the broker
with the channel.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.connection import AMQPError
from funcx_endpoint.amqp.consumer import AckBatcher, ExclusiveConsumer, QueueHeldElsewhere
from funcx_endpoint.amqp.interfaces import IAMQPClient, IAMQPConnectionService
from funcx_endpoint.batching import TurnBatch
from funcx_endpoint.endpoint.broker_info import BrokerInfo
from funcx_endpoint.endpoint.deliveries import Decision, DeliveryLedger
from funcx_endpoint.executor.interface import IInterchange, IResultSink
from funcx_endpoint.wire import (
    EndpointCommand,
    ErrorCode,
    MessageError,
    PackedResult,
    Task,
    TaskBatchMessage,
    unpack,
)
from funcx_endpoint.wire.headers import add_header
from funcx_endpoint.wire.resources import (
    RESOURCES_HEADER,
    ResourceSpecificationError,
    check_resource_specification,
)
from funcx_endpoint.wire.runtime import RUNTIME_HEADER, UserRuntimeError, check_user_runtime

__all__ = ["TaskIntake"]

_COUNTS = (
    "tasks_received",
    "tasks_redelivered_running",
    "tasks_redelivered_done",
    "malformed",
    "stale_consumer_retries",
    "tasks_held_while_draining",
    "tasks_cancelled",
)


def _set_or_none(function_ids: Optional[Sequence[str]]) -> Optional[Set[str]]:
    return set(function_ids) if function_ids is not None else None


@attr.s(auto_attribs=True, eq=False, repr=False)
class TaskIntake:
    """Consumes the task queue and feeds the interchange."""

    log = Logger()
    #: after a reconnect, how many heartbeat intervals an exclusive-consumer
    #: refusal is retried (the holder may be this endpoint's own previous,
    #: half-open connection, which the broker drops after missed heartbeats)
    stale_consumer_heartbeats = 3

    clock: Any
    ledger: DeliveryLedger
    interchange: IInterchange
    result_sink: IResultSink
    prefetch: int = attr.ib(default=512, kw_only=True)
    heartbeat: int = attr.ib(default=30, kw_only=True)
    #: the function ids it runs (None: all)
    allowed: Optional[Set[str]] = attr.ib(
        default=None, kw_only=True, converter=_set_or_none, alias="allowed_functions"
    )
    #: called with the reason when the service says ``stop``
    on_stop: Optional[Callable[[str], None]] = attr.ib(default=None, kw_only=True)
    #: cancels that came before their task (task id -> None), oldest first
    _cancelled_early: OrderedDict[str, None] = attr.ib(factory=OrderedDict, init=False)
    remember_cancels = 10_000
    info: Optional[BrokerInfo] = attr.ib(default=None, init=False)
    consumer: Optional[ExclusiveConsumer] = attr.ib(default=None, init=False)
    taking: bool = attr.ib(default=True, init=False)
    _to_submit: TurnBatch[Task] = attr.ib(init=False)
    counts: Dict[str, int] = attr.ib(init=False, factory=lambda: dict.fromkeys(_COUNTS, 0))

    @_to_submit.default
    def _submitted_each_turn(self) -> TurnBatch[Task]:
        return TurnBatch(self.clock, self._submit)

    async def prepare(
        self,
        client: IAMQPClient,
        connection: IAMQPConnectionService,
        when_spool_loaded: Callable[[], Deferred[None]],
        on_channel_closed: Callable[[Any], None],
        on_consumer_cancelled: Callable[[str], None],
    ) -> None:
        """Set up a new task connection: channel, passive declares, consume.

        Nothing is consumed before the spool of an earlier run is read: its
        tasks count as done, so their redeliveries are acknowledged, not run.
        """
        assert self.info is not None
        channel = await client.open_channel(1)
        acks = AckBatcher(channel, self.clock)
        generation = self.ledger.new_channel(acks)
        channel.handlers.on_close = on_channel_closed
        channel.handlers.on_cancel = on_consumer_cancelled
        consumer = ExclusiveConsumer(
            channel,
            self.info.tasks.queue,
            lambda delivery: self._on_delivery(delivery, generation, acks),
            self.prefetch,
            consumer_tag=f"endpoint-{self.info.endpoint_id}",
        )
        self.consumer = consumer
        await when_spool_loaded()
        try:
            await consumer.start(self.info.tasks.exchange)
        except QueueHeldElsewhere as e:
            raise self._maybe_stale_consumer(e, connection) from None
        if not self.taking:
            await consumer.cancel()

    def _maybe_stale_consumer(
        self, error: QueueHeldElsewhere, connection: IAMQPConnectionService
    ) -> AMQPError:
        """The error to raise for a refused exclusive consumer.

        On the first connection the holder is another instance: fatal.  Soon
        after a lost connection it may be this endpoint's own old connection,
        half-open and not yet dropped by the broker (which does so after
        missed heartbeats): retry, often, for a few heartbeat intervals.
        """
        window = self.stale_consumer_heartbeats * self.heartbeat
        if (
            not connection.connections
            or connection.lost_at is None
            or self.clock.seconds() - connection.lost_at >= window
        ):
            return error
        self.counts["stale_consumer_retries"] += 1
        return AMQPError(
            f"the task queue is still consumed by another connection, probably this "
            f"endpoint's previous one that the broker has not dropped yet; retrying for up "
            f"to {window:g} s after the connection was lost ({error.message})",
            error.code,
            retry_after=max(1.0, self.heartbeat / 2.0),
        )

    # -- deliveries ---------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery, generation: int, acks: AckBatcher) -> None:
        tag = delivery.delivery_tag
        if not self.taking:
            # Arrived after the consumer was cancelled (the cancel failed, or a
            # reconnection consumed again): not run, not acknowledged; the
            # broker delivers it again once this channel closes at the stop.
            # (Rejecting it now would only bring it straight back.)
            acks.delivered(tag)
            self.counts["tasks_held_while_draining"] += 1
            return
        try:
            message = unpack(delivery.body)
        except MessageError as e:
            acks.delivered(tag)
            self._malformed(e, tag, generation, acks)
            return
        if isinstance(message, Task):
            acks.delivered(tag)
            self._take(message, generation, tag, acks)
        elif isinstance(message, EndpointCommand):
            acks.delivered(tag)
            acks.done(tag)
            self._command(message)
        elif isinstance(message, TaskBatchMessage):
            # Acknowledged once every part (each task, each unreadable item) is done.
            tasks, errors = message.tasks, message.errors
            parts = len(tasks) + len(errors)
            if not parts:
                acks.delivered(tag)
                acks.reject(tag)
                return
            acks.delivered(tag, parts)
            for error in errors:
                self._malformed(error, tag, generation, acks, in_batch=True)
            for task in tasks:
                self._take(task, generation, tag, acks)
        else:
            acks.delivered(tag)
            self.log.error(
                "Rejected a {kind} message on the task queue", kind=type(message).__name__
            )
            acks.reject(tag)

    def _take(self, task: Task, generation: int, tag: int, acks: AckBatcher) -> None:
        """One task of a delivery: run it, unless it runs or ran already, or is not allowed."""
        self.counts["tasks_received"] += 1
        decision = self.ledger.delivered(task.task_id, (generation, tag))
        if decision is not Decision.RUN:
            self._redelivered(decision, tag, acks)
            return
        if self._cancelled_early and task.task_id in self._cancelled_early:
            del self._cancelled_early[task.task_id]
            self._cancelled(task.task_id, "before it reached the endpoint")
            return
        if self.allowed is not None and task.function_id not in self.allowed:
            why = (
                f"function {task.function_id} is not in this endpoint's allowed_functions"
                if task.function_id
                else "the task names no function id, and this endpoint only runs the "
                "functions in its allowed_functions"
            )
            self._answer(task.task_id, ErrorCode.FUNCTION_NOT_ALLOWED, why)
            return
        # Headers for the worker: the resource specification (MPI tasks) and the
        # submitter's versions (compared with its own); routers pass them on unread.
        table: Any = (
            (
                task.resource_specification,
                check_resource_specification,
                ResourceSpecificationError,
                RESOURCES_HEADER,
                ErrorCode.RESOURCE_SPECIFICATION_ERROR,
            ),
            (
                task.user_runtime,
                check_user_runtime,
                UserRuntimeError,
                RUNTIME_HEADER,
                ErrorCode.MALFORMED_TASK,
            ),
        )
        for value, check, error, prefix, code in table:
            if value is None:
                continue
            try:
                fields = check(value)
            except error as e:
                self._answer(task.task_id, code, str(e))
                return
            if fields:
                task.task_buffer = add_header(prefix, task.task_buffer, fields)
        self._to_submit.add(task)

    def _malformed(
        self,
        error: MessageError,
        tag: int,
        generation: int,
        acks: AckBatcher,
        in_batch: bool = False,
    ) -> None:
        self.counts["malformed"] += 1
        if error.task_id is None:
            if in_batch:
                # Nothing to answer; the rest of the batch still counts.
                self.log.error(
                    "Dropped a malformed task with no readable task id from a batch "
                    "(delivery {tag}): {error}",
                    tag=tag,
                    error=error,
                )
                acks.done(tag)
                return
            self.log.error(
                "Rejected a malformed message with no readable task id (delivery {tag}): {error}",
                tag=tag,
                error=error,
            )
            acks.reject(tag)
            return
        self.log.warn("Malformed task {task_id}: {error}", task_id=error.task_id, error=error)
        decision = self.ledger.delivered(error.task_id, (generation, tag))
        if decision is Decision.RUN:
            self._answer(
                error.task_id, ErrorCode.MALFORMED_TASK, f"malformed task message: {error}"
            )
        else:
            self._redelivered(decision, tag, acks)

    def _redelivered(self, decision: Decision, tag: int, acks: AckBatcher) -> None:
        if decision is Decision.ALREADY_DONE:
            # Its result is safe already (the first ack was lost).
            self.counts["tasks_redelivered_done"] += 1
            acks.done(tag)
        else:
            self.counts["tasks_redelivered_running"] += 1

    def _answer(self, task_id: str, code: str, message: str) -> None:
        self.result_sink.results_ready([PackedResult.failure(task_id, code, message)])

    def _submit(self, tasks: List[Task]) -> None:
        self.interchange.submit(tasks)

    # -- commands from the service ---------------------------------------------------

    def _command(self, command: EndpointCommand) -> None:
        if command.command == EndpointCommand.CANCEL:
            for task_id in command.task_ids:
                self.cancel(task_id)
            return
        registered_at = self.info.registered_at if self.info is not None else None
        if (
            command.issued_at is not None
            and registered_at is not None
            and command.issued_at < registered_at
        ):
            self.log.info(
                "Ignored a stop command issued before this endpoint registered ({reason})",
                reason=command.reason,
            )
            return
        reason = command.reason or "stopped by the service"
        self.log.info("The service asks this endpoint to stop: {reason}", reason=reason)
        if self.on_stop is not None:
            self.on_stop(f"{reason} (remote stop)")

    def cancel(self, task_id: str) -> str:
        """Cancel a task: drop it, kill its run, or remember it for when it comes;
        what happened (``dropped``, ``cancelled``, ``finished``, ``early``)."""
        waiting = self._to_submit.take()
        kept = [task for task in waiting if task.task_id != task_id]
        if kept:
            self._to_submit.extend(kept)
        if len(kept) < len(waiting):
            self._cancelled(task_id, "before it was handed to the interchange")
            return "dropped"
        if task_id in self.ledger:
            if self.interchange.cancel(task_id):
                self.counts["tasks_cancelled"] += 1
                return "cancelled"
            return "finished"  # its result is on its way: the first to arrive wins
        early = self._cancelled_early
        early[task_id] = None
        while len(early) > self.remember_cancels:
            early.popitem(last=False)
        return "early"

    def _cancelled(self, task_id: str, when: str) -> None:
        self.counts["tasks_cancelled"] += 1
        self.log.info("Task {task_id} cancelled {when}", task_id=task_id, when=when)
        self._answer(task_id, ErrorCode.TASK_CANCELLED, f"Task {task_id} was cancelled {when}")

    # -- draining -----------------------------------------------------------------------

    def stop_taking(self) -> List[str]:
        """Take no more tasks; the ids of those received but not yet handed over."""
        self.taking = False
        return [task.task_id for task in self._to_submit.take()]

    async def cancel_consumer(self) -> None:
        """Ask the broker to stop delivering (errors are logged, not raised)."""
        if self.consumer is not None:
            try:
                await self.consumer.cancel()
            except Exception as e:
                self.log.info("Cancelling the consumer failed: {error}", error=e)
