"""Tasks out to the broker, results and status reports in.

:class:`TaskSender` publishes tasks (and copies of results for FuncXExecutor's
per-task-group queues) with publisher confirms.  The database is the record:
a task is stored before it is published and marked ``sent`` once the broker
confirms it; a copy is due while ``ws_pending`` is set.  A loop sends again
whatever is stored but not confirmed (the broker was down, a publish was
refused, the service restarted), so a broker outage delays tasks and never
loses them.  A task may thus reach its endpoint twice; the endpoint's
at-least-once promise already allows that and results are deduplicated.

:class:`ResultIngest` takes deliveries from the ``results`` queue in
batches: it stores results (the first result of a task wins; later ones are
acknowledged and ignored), records status reports, and acknowledges the
deliveries only after the database committed them.  A result is accepted
only from the endpoint its task was sent to (the routing key names the
endpoint, and the broker lets each endpoint publish only with its own).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.client import Delivery, FastChannel
from funcx_endpoint.amqp.publisher import PublishFailed
from funcx_endpoint.webservice.broker import IServiceBroker
from funcx_endpoint.webservice.management import BrokerUnavailable
from funcx_endpoint.webservice.storage import (
    IncomingResult,
    Report,
    ResultCopy,
    Storage,
    StoredOutcome,
    UnsentTask,
)
from funcx_endpoint.wire import (
    EPStatusReport,
    MessageError,
    Result,
    ResultErrorDetails,
    Task,
    pack,
    unpack,
)

__all__ = ["ResultIngest", "TaskSender"]

_TASK_PROPERTIES = {"delivery-mode": 2}
_BATCH = 1000


def _no_nul(text: str) -> str:
    """``text`` without NUL characters, which PostgreSQL text cannot hold (one such
    result would otherwise fail its whole batch, again and again)."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _encodable(*texts: Optional[str]) -> bool:
    """Whether all ``texts`` can be stored (as UTF-8: no lone surrogates)."""
    try:
        for text in texts:
            if text is not None:
                text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finite(value: Any) -> Any:
    """``value`` (JSON data) with NaN and infinities replaced by None: not JSON, not answerable."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


#: Storage errors that will happen again however often the same data is stored (bad
#: data, not a database or connection problem).  Anything else is retried.
_PERMANENT_ERRORS = (UnicodeError, ValueError, TypeError, OverflowError)
_PERMANENT_DB_ERRORS = ("DataError", "IntegrityError")


def _permanent(error: BaseException) -> bool:
    # Drivers raise subclasses (psycopg2's UniqueViolation is an IntegrityError):
    # match the DB-API class names anywhere in the class chain.
    return isinstance(error, _PERMANENT_ERRORS) or any(
        cls.__name__ in _PERMANENT_DB_ERRORS for cls in type(error).__mro__
    )


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class TaskSender(Service):
    """Publishes tasks and result copies; re-sends what the broker did not confirm.

    Stored tasks are sent again once they are a second old by ``clock`` (the
    reactor by default), which must be the clock their ``created`` times come from.
    """

    log = Logger()
    name = "sender"

    def __init__(
        self,
        reactor: Any,
        storage: Storage,
        broker: IServiceBroker,
        *,
        resend_interval: float = 2.0,
        result_queue_ttl: int = 7 * 24 * 3600,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor if clock is None else clock
        self._storage = storage
        self._broker = broker
        self.resend_interval = resend_interval
        self.result_queue_ttl = result_queue_ttl
        #: Task ids published and not yet recorded as sent (or failed).
        self.in_flight: Set[str] = set()
        self._copies_in_flight: Set[str] = set()
        self._confirmed: List[str] = []
        self._copied: List[str] = []
        self._flush_call: Any = None
        self._kick_call: Any = None
        self._loop = LoopingCall(self._resend)
        self._loop.clock = reactor
        self._resending = False
        self.published = 0
        self.resent = 0
        broker.on_connect(self.kick)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.resend_interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for call in (self._flush_call, self._kick_call):
            if call is not None and call.active():
                call.cancel()
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
        """Publish stored tasks now (reserved already or not); never raises."""
        for task in tasks:
            self.in_flight.add(task.task_id)
            try:
                body = pack(
                    Task(
                        task.task_id,
                        task.task_buffer,
                        container_id=task.container_uuid,
                        function_id=task.function_id,
                    )
                )
            except (MessageError, ValueError) as e:
                self.log.error("Cannot pack task {task}: {error}", task=task.task_id, error=e)
                self.in_flight.discard(task.task_id)
                continue
            d = self._broker.publish(
                topology.TASKS_EXCHANGE,
                topology.task_queue(task.endpoint_id),
                body,
                _TASK_PROPERTIES,
            )
            d.addCallbacks(
                self._task_confirmed,
                self._task_not_confirmed,
                callbackArgs=(task.task_id,),
                errbackArgs=(task,),
            )
        self.published += len(tasks)

    def _task_confirmed(self, _: None, task_id: str) -> None:
        self._confirmed.append(task_id)
        self._schedule_flush()

    def _task_not_confirmed(self, failure: Failure, task: UnsentTask) -> None:
        self.in_flight.discard(task.task_id)
        error = failure.value
        if isinstance(error, PublishFailed) and error.returned:
            # The endpoint's queue is gone (a broker reset?): declare it again.
            self.log.warn(
                "Task {task} could not be routed to {queue}; declaring the queue again",
                task=task.task_id,
                queue=topology.task_queue(task.endpoint_id),
            )
            Deferred.fromCoroutine(self._redeclare(task.endpoint_id)).addErrback(
                lambda f: self.log.warn("Declaring a task queue failed: {e}", e=f.value)
            )
        elif not failure.check(PublishFailed):
            self.log.failure("Publishing task {task} failed", failure, task=task.task_id)

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


class ResultIngest:
    """Stores what arrives on the ``results`` queue; acks only what is stored.

    ``clock`` (the reactor by default) stamps results (``completion_t``) and
    status reports (when each endpoint was last heard from).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        storage: Storage,
        sender: TaskSender,
        *,
        status_log_size: int = 20,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor if clock is None else clock
        self._storage = storage
        self._sender = sender
        self._status_log_size = status_log_size
        self._pending: List[Tuple[Delivery, FastChannel]] = []
        self._scheduled: Any = None
        self._busy = False
        self.stored = 0
        self.duplicates = 0
        self.dropped = 0
        self.reports = 0

    def on_delivery(self, delivery: Delivery, channel: FastChannel) -> None:
        self._pending.append((delivery, channel))
        if not self._busy and self._scheduled is None:
            self._scheduled = self._reactor.callLater(0, self._start)

    def _start(self) -> None:
        self._scheduled = None
        if self._busy:
            return
        self._busy = True
        d = Deferred.fromCoroutine(self._drain())
        d.addErrback(lambda f: self.log.failure("Processing results failed", f))
        d.addBoth(lambda _: setattr(self, "_busy", False))

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[:_BATCH]
            del self._pending[:_BATCH]
            batch = [(d, ch) for d, ch in batch if not ch.closed]
            if not batch:
                continue
            try:
                await self._process(batch)
            except Exception as e:
                if _permanent(e):
                    # Some message in the batch holds data the database refuses: store
                    # them one by one, so that only the bad ones are dropped.
                    self.log.warn(
                        "Storing {n} results and reports failed ({error}); storing them one "
                        "at a time",
                        n=len(batch),
                        error=repr(e),
                    )
                    await self._one_by_one(batch)
                    continue
                self.log.failure("Storing {n} results and reports failed; retrying", n=len(batch))
                self._pending[:0] = batch
                await _sleep(self._reactor, 1.0)

    async def _one_by_one(self, batch: List[Tuple[Delivery, FastChannel]]) -> None:
        """Store each message alone; ack and drop those the database refuses."""
        for index, (delivery, channel) in enumerate(batch):
            if channel.closed:
                continue
            try:
                await self._process([(delivery, channel)])
            except Exception as e:
                if not _permanent(e):
                    self.log.failure(
                        "Storing results and reports failed; retrying {n}", n=len(batch) - index
                    )
                    self._pending[:0] = batch[index:]
                    await _sleep(self._reactor, 1.0)
                    return
                self.dropped += 1
                self.log.failure(
                    "Dropped a message from {key} (delivery {tag}): it cannot be stored",
                    key=delivery.routing_key,
                    tag=delivery.delivery_tag,
                )
                if not channel.closed:
                    channel.ack(delivery.delivery_tag)

    async def _process(self, batch: List[Tuple[Delivery, FastChannel]]) -> None:
        results: List[IncomingResult] = []
        reports: List[Report] = []
        now = self._clock.seconds()
        completion_t = f"{now:.3f}"
        for delivery, _ in batch:
            parsed = self._parse(delivery, now, completion_t)
            if isinstance(parsed, IncomingResult):
                results.append(parsed)
            elif isinstance(parsed, Report):
                reports.append(parsed)
        outcomes: List[StoredOutcome] = []
        if results:
            outcomes = await self._storage.store_results(results)
        if reports:
            await self._storage.record_reports(reports, self._status_log_size)
            self.reports += len(reports)
        # Everything in the batch is settled now: ack per channel, highest tag.
        highest: Dict[int, Tuple[FastChannel, int]] = {}
        for delivery, channel in batch:
            seen = highest.get(id(channel))
            if seen is None or delivery.delivery_tag > seen[1]:
                highest[id(channel)] = (channel, delivery.delivery_tag)
        for channel, tag in highest.values():
            if not channel.closed:
                channel.ack(tag, multiple=True)
        # Acknowledged: from here on nothing may raise (the batch would be stored and
        # acknowledged again, and a second ack of a tag closes the channel).
        try:
            self._stored(results, outcomes)
        except Exception:
            self.log.failure("Handling {n} stored results failed", n=len(results))

    def _stored(self, results: List[IncomingResult], outcomes: List[StoredOutcome]) -> None:
        by_id = {r.task_id: r for r in results}
        copies = []
        for outcome in outcomes:
            if outcome.outcome == "stored":
                self.stored += 1
                if outcome.ws_queue:
                    incoming = by_id[outcome.task_id]
                    copies.append(
                        ResultCopy(
                            incoming.task_id,
                            outcome.ws_queue,
                            "failed" if incoming.error_code is not None else "success",
                            incoming.data,
                            incoming.error_code,
                            incoming.error_message,
                            incoming.completion_t,
                        )
                    )
            elif outcome.outcome == "duplicate":
                self.duplicates += 1
                self.log.debug("Duplicate result for task {task} ignored", task=outcome.task_id)
            else:
                self.dropped += 1
                self.log.warn(
                    "Result for task {task} dropped: {why}",
                    task=outcome.task_id,
                    why="no such task"
                    if outcome.outcome == "unknown"
                    else "it came from an endpoint the task was not sent to",
                )
        self._sender.send_copies(copies)

    def _parse(self, delivery: Delivery, now: float, completion_t: str) -> Any:
        routing_key = delivery.routing_key
        sender = routing_key[: -len(".results")] if routing_key.endswith(".results") else None
        try:
            message = unpack(delivery.body)
        except MessageError as e:
            self.dropped += 1
            self.log.warn(
                "Dropped a malformed message from {key}: {error}", key=routing_key, error=e
            )
            return None
        if isinstance(message, Result):
            if sender is None:
                self.dropped += 1
                self.log.warn(
                    "Dropped result {task}: routing key {key} names no endpoint",
                    task=message.task_id,
                    key=routing_key,
                )
                return None
            details = message.error_details
            data = _no_nul(message.data)
            code = None if details is None else _no_nul(str(details.code))
            user_message = None if details is None else _no_nul(details.user_message)
            if not _encodable(data, code, user_message):
                # Not storable as it is; the task fails with a reason rather than never
                # finishing (store_results still checks that it is the sender's task).
                self.log.warn(
                    "Result for task {task} from {key} holds text that is not valid Unicode "
                    "(a lone surrogate); the task is stored as failed",
                    task=message.task_id,
                    key=routing_key,
                )
                reason = (
                    f"MalformedResult: the endpoint sent a result for task {message.task_id} "
                    f"that is not valid Unicode text (it holds a lone surrogate), so the "
                    f"service could not keep it"
                )
                return IncomingResult(
                    message.task_id, sender, reason, "MalformedResult", reason, completion_t
                )
            return IncomingResult(message.task_id, sender, data, code, user_message, completion_t)
        if isinstance(message, EPStatusReport):
            if sender != message.endpoint_id:
                self.dropped += 1
                self.log.warn(
                    "Dropped a status report of {endpoint} sent with routing key {key}",
                    endpoint=message.endpoint_id,
                    key=routing_key,
                )
                return None
            return Report(
                message.endpoint_id,
                _finite(message.global_state),
                {
                    task_id: [(t.timestamp, str(t.state)) for t in transitions]
                    for task_id, transitions in message.task_statuses.items()
                    # Keys that are not task ids match no task; unstorable ones are dropped.
                    if _encodable(task_id)
                },
                message.is_final,
                now,
            )
        self.dropped += 1
        self.log.warn(
            "Dropped a {kind} message from {key}: only results and status reports belong here",
            kind=type(message).__name__,
            key=routing_key,
        )
        return None
