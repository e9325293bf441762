"""Results and status reports in from the broker; acknowledged once stored.

:class:`ResultIngest` takes deliveries from the ``results`` queue in
batches: it stores results (the first result of a task wins; later ones are
acknowledged and ignored), records status reports, and acknowledges the
deliveries only after the database committed them.  A result is accepted
only from the endpoint its task was sent to (the routing key names the
endpoint, and the broker lets each endpoint publish only with its own).  A
``result_batch`` message (:data:`~funcx_endpoint.wire.MESSAGE_BATCHES`) is
stored result by result, like as many ``result`` messages; a malformed item
in it is dropped alone.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from funcx_endpoint.amqp.channel import Delivery, FastChannel
from funcx_endpoint.webservice.dispatch import _BATCH, TaskSender, _sleep
from funcx_endpoint.webservice.storage import (
    IncomingResult,
    Report,
    ResultCopy,
    Storage,
    StoredOutcome,
)
from funcx_endpoint.wire import (
    EPStatusReport,
    MessageError,
    Result,
    ResultBatchMessage,
    TaskState,
    TaskStatesMessage,
    TaskTransition,
    unpack,
)

__all__ = ["ResultIngest", "count_attempts"]

#: Transitions that only a task on a manager or worker makes.
_RAN = (TaskState.RUNNING, TaskState.EXECUTION_START, TaskState.EXECUTION_END)


def count_attempts(transitions: Optional[Sequence[TaskTransition]]) -> Optional[int]:
    """How many times the endpoint sent a task to a manager, from the transitions its
    result carries: one ``waiting-for-launch`` per send (the interchange's).

    None if there are no transitions (an endpoint that sends none); at least 1 if the
    task ran (an endpoint whose result carries only the worker's transitions); 0 if
    the endpoint answered it without sending it anywhere (it cannot run there).
    """
    if not transitions:
        return None
    launches = sum(1 for t in transitions if t.state is TaskState.WAITING_FOR_LAUNCH)
    if launches == 0 and any(t.state in _RAN for t in transitions):
        return 1
    return launches


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


#: The largest worker environment (``details``) kept with a result, as JSON.
MAX_DETAILS_BYTES = 4096


def _worker_details(details: Optional[Dict[str, Any]]) -> Optional[str]:
    """A result's ``details`` (the worker's environment) as JSON text to store;
    None if there are none or they are too big or not storable text."""
    if not details:
        return None
    text = json.dumps(details, separators=(",", ":"), sort_keys=True, default=str)
    if len(text) > MAX_DETAILS_BYTES:
        return None
    return text


def _permanent(error: BaseException) -> bool:
    # Drivers raise subclasses (psycopg2's UniqueViolation is an IntegrityError):
    # match the DB-API class names anywhere in the class chain.
    return isinstance(error, _PERMANENT_ERRORS) or any(
        cls.__name__ in _PERMANENT_DB_ERRORS for cls in type(error).__mro__
    )


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
        #: Called (without arguments) after each batch of results and reports is stored:
        #: the portal's live pages read again at once.
        self.observers: List[Callable[[], None]] = []

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
            for parsed in self._parse(delivery, now, completion_t):
                if isinstance(parsed, IncomingResult):
                    results.append(parsed)
                else:
                    reports.append(parsed)
        outcomes: List[StoredOutcome] = []
        if results:
            outcomes = await self._storage.store_results(results, now)
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
        for observer in list(self.observers):
            try:
                observer()
            except Exception:
                self.log.failure("An observer of stored results failed")

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

    def _parse(self, delivery: Delivery, now: float, completion_t: str) -> List[Any]:
        """What a delivery holds: results and status reports (nothing if it is bad)."""
        routing_key = delivery.routing_key
        sender = routing_key[: -len(".results")] if routing_key.endswith(".results") else None
        try:
            message = unpack(delivery.body)
        except MessageError as e:
            self.dropped += 1
            self.log.warn(
                "Dropped a malformed message from {key}: {error}", key=routing_key, error=e
            )
            return []
        if isinstance(message, Result):
            return self._incoming([message], sender, routing_key, completion_t)
        if isinstance(message, ResultBatchMessage):
            for error in message.errors:
                self.dropped += 1
                self.log.warn(
                    "Dropped a malformed result (task {task}) in a batch from {key}: {error}",
                    task=error.task_id,
                    key=routing_key,
                    error=error,
                )
            return self._incoming(message.results, sender, routing_key, completion_t)
        if isinstance(message, (EPStatusReport, TaskStatesMessage)):
            if sender != message.endpoint_id:
                self.dropped += 1
                self.log.warn(
                    "Dropped a status report of {endpoint} sent with routing key {key}",
                    endpoint=message.endpoint_id,
                    key=routing_key,
                )
                return []
            return [
                Report(
                    message.endpoint_id,
                    _finite(getattr(message, "global_state", {})),
                    {
                        task_id: [(t.timestamp, str(t.state)) for t in transitions]
                        for task_id, transitions in message.task_statuses.items()
                        # Keys that are not task ids match no task; unstorable ones are dropped.
                        if _encodable(task_id)
                    },
                    isinstance(message, EPStatusReport) and message.is_final,
                    now,
                    states_only=isinstance(message, TaskStatesMessage),
                )
            ]
        self.dropped += 1
        self.log.warn(
            "Dropped a {kind} message from {key}: only results and status reports belong here",
            kind=type(message).__name__,
            key=routing_key,
        )
        return []

    def _incoming(
        self, results: List[Result], sender: Optional[str], routing_key: str, completion_t: str
    ) -> List[IncomingResult]:
        if sender is None:
            self.dropped += len(results)
            self.log.warn(
                "Dropped {n} result(s) (first {task}): routing key {key} names no endpoint",
                n=len(results),
                task=results[0].task_id if results else None,
                key=routing_key,
            )
            return []
        return [
            self._incoming_one(message, sender, routing_key, completion_t) for message in results
        ]

    def _incoming_one(
        self, message: Result, sender: str, routing_key: str, completion_t: str
    ) -> IncomingResult:
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
                message.task_id,
                sender,
                reason,
                "MalformedResult",
                reason,
                completion_t,
                attempts=count_attempts(message.task_statuses),
            )
        return IncomingResult(
            message.task_id,
            sender,
            data,
            code,
            user_message,
            completion_t,
            _worker_details(message.details),
            count_attempts(message.task_statuses),
        )
