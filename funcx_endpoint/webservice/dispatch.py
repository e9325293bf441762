"""Tasks out to the broker, with publisher confirms; nothing lost if it is down.

:class:`TaskSender` publishes tasks (and copies of results for FuncXExecutor's
per-task-group queues) with publisher confirms.  The database is the record:
a task is stored before it is published and marked ``sent`` once the broker
confirms it; a copy is due while ``ws_pending`` is set.  A loop sends again
whatever is stored but not confirmed (the broker was down, a publish was
refused, the service restarted), so a broker outage delays tasks and never
loses them.  A task may thus reach its endpoint twice; the endpoint's
at-least-once promise already allows that and results are deduplicated.

Tasks for an endpoint that agreed to
:data:`~funcx_endpoint.wire.MESSAGE_BATCHES` at registration go several to a
message; stored tasks sent again go one per message, which every endpoint
reads.  A task of a function registered with a container carries
``container_id`` and the ``container`` with all its images, as funcX 1.0's
service sent them; the endpoint picks the image of its own container type.
Results come in through :mod:`funcx_endpoint.webservice.ingest`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.publisher import PublishFailed
from funcx_endpoint.lifecycle import cancel_call, stop_loop
from funcx_endpoint.webservice.broker import IServiceBroker
from funcx_endpoint.webservice.management import BrokerUnavailable
from funcx_endpoint.webservice.storage import (
    ContainerInfo,
    ResultCopy,
    Storage,
    UnsentTask,
)
from funcx_endpoint.wire import (
    Container,
    ContainerImage,
    MessageError,
    Result,
    ResultErrorDetails,
    Task,
    TaskBatchMessage,
    pack,
)

__all__ = ["TASK_BATCH_BYTES", "TASK_BATCH_MAX", "TaskSender"]

_TASK_PROPERTIES = {"delivery-mode": 2}
_BATCH = 1000
#: Tasks in one message at most, for endpoints that take batches, and bytes.
TASK_BATCH_MAX = 64
TASK_BATCH_BYTES = 256 * 1024


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _wire_container(
    container: Optional[ContainerInfo], made: Dict[str, Container]
) -> Optional[Container]:
    """The task message's ``container``: the stored one with its images (one object
    per container in ``made``, shared by the tasks that run in it)."""
    if container is None:
        return None
    found = made.get(container.container_id)
    if found is None:
        found = made[container.container_id] = Container(
            container.container_id,
            container.name,
            [
                # funcx_common wants whole seconds; funcX 1.0.13 endpoints drop a task without.
                ContainerImage(
                    image.image_type,
                    image.location,
                    int(image.created),
                    int(image.modified),
                    image.build_status,
                    image.build_stderr,
                )
                for image in container.images
            ],
        )
    return found


def _container_size(container: Optional[Container]) -> int:
    """About how many bytes ``container`` adds to a task in a message."""
    if container is None:
        return 0
    return len(container.name) + sum(
        200 + len(image.location) + len(image.build_stderr or "") for image in container.images
    )


@attr.s(auto_attribs=True, eq=False, repr=False)
class TaskSender(Service):
    """Publishes tasks and result copies; re-sends what the broker did not confirm.

    Stored tasks are sent again once they are a second old by ``clock`` (the
    reactor by default), which must be the clock their ``created`` times come from.
    """

    log = Logger()
    name = "sender"

    _reactor: Any
    _storage: Storage
    _broker: IServiceBroker
    resend_interval: float = attr.ib(default=2.0, kw_only=True)
    result_queue_ttl: int = attr.ib(default=7 * 24 * 3600, kw_only=True)
    _given_clock: Optional[IReactorTime] = attr.ib(default=None, kw_only=True, alias="clock")
    _clock: IReactorTime = attr.ib(init=False)
    #: Task ids published and not yet recorded as sent (or failed).
    in_flight: Set[str] = attr.ib(factory=set, init=False)
    _copies_in_flight: Set[str] = attr.ib(factory=set, init=False)
    _confirmed: List[str] = attr.ib(factory=list, init=False)
    _copied: List[str] = attr.ib(factory=list, init=False)
    _flush_call: Any = attr.ib(default=None, init=False)
    _kick_call: Any = attr.ib(default=None, init=False)
    _loop: LoopingCall = attr.ib(init=False)
    _resending: bool = attr.ib(default=False, init=False)
    published: int = attr.ib(default=0, init=False)
    resent: int = attr.ib(default=0, init=False)

    @_clock.default
    def _given_or_the_reactor(self) -> IReactorTime:
        return self._reactor if self._given_clock is None else self._given_clock

    @_loop.default
    def _resend_loop(self) -> LoopingCall:
        loop = LoopingCall(self._resend)
        loop.clock = self._reactor
        return loop

    def __attrs_post_init__(self) -> None:
        self._broker.on_connect(self.kick)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.resend_interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stop_loop(self._loop)
        cancel_call(self._flush_call)
        cancel_call(self._kick_call)
        self._flush_call = self._kick_call = None
        # Record what was confirmed; anything else is sent again at the next start.
        return Deferred.fromCoroutine(self._flush_marks())

    def kick(self) -> None:
        """Send pending work soon (after a reconnection)."""
        if self.running and (self._kick_call is None or not self._kick_call.active()):
            self._kick_call = self._reactor.callLater(0.05, self._resend)

    # -- tasks ----------------------------------------------------------------

    def reserve(self, task_ids: Sequence[str]) -> None:
        """Mark tasks as being published, before they are stored (so the resend
        loop does not pick them up between their commit and their publish)."""
        self.in_flight.update(task_ids)

    def release(self, task_ids: Sequence[str]) -> None:
        """Tasks reserved but not stored after all."""
        self.in_flight.difference_update(task_ids)

    def send(self, tasks: Sequence[UnsentTask]) -> None:
        """Publish stored tasks now (reserved already or not); never raises.

        Tasks of an endpoint that takes batches go several to a message
        (``task_batch``, at most :data:`TASK_BATCH_MAX` tasks and
        :data:`TASK_BATCH_BYTES`); the others one per message.
        """
        batches: Dict[str, List[Tuple[UnsentTask, Task]]] = {}
        containers: Dict[str, Container] = {}
        for task in tasks:
            self.in_flight.add(task.task_id)
            try:
                message = Task(
                    task.task_id,
                    task.task_buffer,
                    container_id=task.container_uuid,
                    container=_wire_container(task.container, containers),
                    function_id=task.function_id,
                    resource_specification=task.resource_specification,
                    user_runtime=task.user_runtime,
                )
                if not task.batchable:
                    self._publish(task.endpoint_id, [task], pack(message))
                    continue
            except (MessageError, ValueError) as e:
                self.log.error("Cannot pack task {task}: {error}", task=task.task_id, error=e)
                self.in_flight.discard(task.task_id)
                continue
            batches.setdefault(task.endpoint_id, []).append((task, message))
        for endpoint_id, pairs in batches.items():
            group: List[Tuple[UnsentTask, Task]] = []
            size = 0
            for pair in pairs:
                length = len(pair[1].task_buffer) + _container_size(pair[1].container)
                if group and (len(group) >= TASK_BATCH_MAX or size + length > TASK_BATCH_BYTES):
                    self._publish_batch(endpoint_id, group)
                    group, size = [], 0
                group.append(pair)
                size += length
            if group:
                self._publish_batch(endpoint_id, group)
        self.published += len(tasks)

    def _publish_batch(self, endpoint_id: str, group: List[Tuple[UnsentTask, Task]]) -> None:
        if len(group) == 1:
            self._publish(endpoint_id, [group[0][0]], pack(group[0][1]))
            return
        body = pack(TaskBatchMessage([message for _, message in group]))
        self._publish(endpoint_id, [task for task, _ in group], body)

    def _publish(self, endpoint_id: str, tasks: List[UnsentTask], body: bytes) -> None:
        d = self._broker.publish(
            topology.TASKS_EXCHANGE, topology.task_queue(endpoint_id), body, _TASK_PROPERTIES
        )
        d.addCallbacks(
            self._task_confirmed,
            self._task_not_confirmed,
            callbackArgs=([t.task_id for t in tasks],),
            errbackArgs=(tasks,),
        )

    def _task_confirmed(self, _: None, task_ids: List[str]) -> None:
        self._confirmed.extend(task_ids)
        self._schedule_flush()

    def _task_not_confirmed(self, failure: Failure, tasks: List[UnsentTask]) -> None:
        self.in_flight.difference_update(task.task_id for task in tasks)
        error = failure.value
        endpoint_id = tasks[0].endpoint_id
        if isinstance(error, PublishFailed) and error.returned:
            # The endpoint's queue is gone (a broker reset?): declare it again.
            self.log.warn(
                "{n} task(s) could not be routed to {queue}; declaring the queue again",
                n=len(tasks),
                queue=topology.task_queue(endpoint_id),
            )
            Deferred.fromCoroutine(self._redeclare(endpoint_id)).addErrback(
                lambda f: self.log.warn("Declaring a task queue failed: {e}", e=f.value)
            )
        elif not failure.check(PublishFailed):
            self.log.failure(
                "Publishing {n} task(s) failed (first {task})",
                failure,
                n=len(tasks),
                task=tasks[0].task_id,
            )

    async def _redeclare(self, endpoint_id: str) -> None:
        endpoint = await self._storage.get_endpoint(endpoint_id)
        if endpoint is not None and endpoint.deleted_at is None:
            await self._broker.declare_task_queue(endpoint_id)

    # -- result copies ------------------------------------------------------------

    def send_copies(self, copies: Sequence[ResultCopy]) -> None:
        """Put copies of finished tasks' results in their task groups' queues."""
        if copies:
            Deferred.fromCoroutine(self._send_copies(copies)).addErrback(
                lambda f: self.log.failure("Sending result copies failed", f)
            )

    async def _send_copies(self, copies: Sequence[ResultCopy]) -> None:
        todo = [c for c in copies if c.task_id not in self._copies_in_flight]
        self._copies_in_flight.update(c.task_id for c in todo)
        try:
            for queue in {c.ws_queue for c in todo}:
                await self._broker.ensure_result_queue(queue, self.result_queue_ttl)
        except Exception as e:
            self._copies_in_flight.difference_update(c.task_id for c in todo)
            if not isinstance(e, BrokerUnavailable):
                self.log.warn("Could not declare result queues: {error}", error=e)
            return
        for copy in todo:
            details = (
                None
                if copy.status == "success"
                else ResultErrorDetails(
                    copy.error_code or "RemoteExecutionError", copy.error_message or ""
                )
            )
            body = pack(Result(copy.task_id, copy.data or "", details, None))
            try:
                stamp = int(float(copy.completion_t))
            except (TypeError, ValueError):
                stamp = int(self._clock.seconds())
            d = self._broker.publish(
                "", copy.ws_queue, body, {"delivery-mode": 2, "timestamp": stamp}
            )
            d.addCallbacks(
                self._copy_confirmed,
                self._copy_not_confirmed,
                callbackArgs=(copy.task_id,),
                errbackArgs=(copy,),
            )

    def _copy_confirmed(self, _: None, task_id: str) -> None:
        self._copied.append(task_id)
        self._schedule_flush()

    def _copy_not_confirmed(self, failure: Failure, copy: ResultCopy) -> None:
        self._copies_in_flight.discard(copy.task_id)
        if isinstance(failure.value, PublishFailed) and failure.value.returned:
            self._broker.forget_queue(copy.ws_queue)

    # -- recording confirms, and the resend loop -------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0.1, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        Deferred.fromCoroutine(self._flush_marks()).addErrback(
            lambda f: self.log.failure("Recording confirmed publishes failed", f)
        )

    async def _flush_marks(self) -> None:
        confirmed, self._confirmed = self._confirmed, []
        copied, self._copied = self._copied, []
        try:
            if confirmed:
                await self._storage.mark_sent(confirmed)
            if copied:
                await self._storage.mark_copied(copied)
        except Exception:
            # Not recorded: these are sent again later, which is harmless.
            self.log.failure("Could not record {n} confirmed publishes", n=len(confirmed))
        finally:
            self.in_flight.difference_update(confirmed)
            self._copies_in_flight.difference_update(copied)

    def _resend(self) -> Optional[Deferred[None]]:
        if self._resending or not self.running or not self._broker.connected:
            return None
        self._resending = True
        d = Deferred.fromCoroutine(self._resend_pending())
        d.addErrback(lambda f: self.log.failure("Re-sending pending tasks failed", f))
        d.addBoth(lambda _: setattr(self, "_resending", False))
        return None

    async def _resend_pending(self) -> None:
        # Only tasks older than a moment: newer ones are being published by their submit.
        before = self._clock.seconds() - 1.0
        while self._broker.connected:
            skip = min(len(self.in_flight), 5 * _BATCH)
            unsent = await self._storage.unsent_tasks(_BATCH + skip, before)
            todo = [t for t in unsent if t.task_id not in self.in_flight][:_BATCH]
            if todo:
                self.log.info("Sending {n} stored task(s) again", n=len(todo))
                self.resent += len(todo)
                self.send(todo)
                self._broker.flush()
            if len(unsent) < _BATCH:
                break
            await _sleep(self._reactor, 0.2)
        copies = await self._storage.pending_copies(_BATCH)
        todo_copies = [c for c in copies if c.task_id not in self._copies_in_flight]
        if todo_copies:
            await self._send_copies(todo_copies)
