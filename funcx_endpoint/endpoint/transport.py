"""The endpoint's AMQP side: tasks in, results out, nothing lost.

:class:`Transport` keeps two connections (the registration answer gives a
URL for the task queue and one for results, possibly with different
credentials), each through an :class:`AMQPConnectionService` that
reconnects with backoff.  On the task side an exclusive consumer feeds the
interchange; on the result side a confirming publisher sends results and
status reports.  The delivery promise (DESIGN.md) is kept here:

* a task is acknowledged only after its result is confirmed by the broker or
  fsynced to the spool (``unacked_results/``), in batches;
* a result the broker did not confirm (nack, return, lost connection) is
  spooled and sent again after reconnecting and after a restart;
* a task delivered again while it runs is not run twice;
* on a clean stop, tasks not yet started are released to the broker.

A result larger than the broker accepts is replaced by a
``MaxResultSizeExceeded`` error for its task, whether it was being published
fresh or sent again from the spool: one oversized result must not make the
broker close the results channel over and over.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint.amqp.client import AMQPClient, Delivery, encode_properties
from funcx_endpoint.amqp.connection import AMQPURL, AMQPConnectionService, AMQPError, close_reason
from funcx_endpoint.amqp.consumer import AckBatcher, ExclusiveConsumer, QueueHeldElsewhere
from funcx_endpoint.amqp.publisher import ConfirmingPublisher, PublishFailed
from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.endpoint.service import StartupError
from funcx_endpoint.endpoint.tasks import Decision, DeliveryRef, TaskTracker
from funcx_endpoint.executor.interface import IInterchange
from funcx_endpoint.lifecycle import EX_NOPERM, EX_UNAVAILABLE
from funcx_endpoint.protocol import (
    EPStatusReport,
    ErrorCode,
    MessageError,
    Result,
    Task,
    pack,
    unpack,
)


@attr.s(auto_attribs=True, frozen=True)
class QueueInfo:
    """One side of the registration answer (PROTOCOL.md section 3)."""

    url: AMQPURL
    exchange: str
    queue: str
    routing_key: str = ""
    mandatory: bool = True
    properties: Dict[str, Any] = attr.Factory(dict)


@attr.s(auto_attribs=True, frozen=True)
class BrokerInfo:
    """Where the endpoint takes tasks from and sends results to."""

    endpoint_id: str
    tasks: QueueInfo
    results: QueueInfo

    @classmethod
    def from_registration(cls, answer: Dict[str, Any]) -> BrokerInfo:
        """Read a registration answer; ValueError says what is missing or wrong."""
        try:
            endpoint_id = str(answer["endpoint_id"])
            tasks = answer["task_queue_info"]
            results = answer["result_queue_info"]
            publish = results.get("queue_publish_kwargs") or {}
            return cls(
                endpoint_id=endpoint_id,
                tasks=QueueInfo(
                    url=AMQPURL.parse(tasks["connection_url"]),
                    exchange=str(tasks["exchange"]),
                    queue=str(tasks["queue"]),
                ),
                results=QueueInfo(
                    url=AMQPURL.parse(results["connection_url"]),
                    exchange=str(publish.get("exchange", results["exchange"])),
                    queue=str(results["queue"]),
                    routing_key=str(publish.get("routing_key", f"{endpoint_id}.results")),
                    mandatory=bool(publish.get("mandatory", True)),
                    properties=_checked_properties(publish.get("properties")),
                ),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"the registration answer lacks broker details ({e!r})") from None


def _checked_properties(given: Any) -> Dict[str, Any]:
    """The results' publish properties of a registration answer, checked now
    (a bad one would otherwise fail every publish later)."""
    properties = dict(given or {"delivery_mode": 2})
    try:
        encode_properties(_amqp_properties(properties))
    except (ValueError, TypeError, struct.error, OverflowError) as e:
        raise ValueError(f"the registration answer has bad publish properties: {e}") from None
    return properties


def _amqp_properties(properties: Dict[str, Any]) -> Dict[str, Any]:
    """pika-style property names (delivery_mode) as AMQP names (delivery-mode)."""
    return {name.replace("_", "-"): value for name, value in properties.items()}


class Transport(Service):
    """Task consumer and result publisher over two reconnecting connections."""

    log = Logger()
    name = "amqp"
    #: spooled results sent again per window; the next window goes once
    #: these are confirmed (or refused), so a large spool is not sent in one turn
    resend_window = 256
    #: after a reconnect, how many heartbeat intervals an exclusive-consumer
    #: refusal is retried (the holder may be this endpoint's own previous,
    #: half-open connection, which the broker drops after missed heartbeats)
    stale_consumer_heartbeats = 3

    def __init__(
        self,
        reactor: Any,
        broker_info: Callable[[], BrokerInfo],
        interchange: IInterchange,
        spool: ResultSpool,
        *,
        prefetch: int = 512,
        heartbeat: int = 30,
        ca_file: Optional[str] = None,
        allowed_functions: Optional[Sequence[str]] = None,
        on_fatal: Optional[Callable[[str, int], None]] = None,
        resend_interval: float = 30.0,
        connect: Optional[Callable[..., AMQPConnectionService]] = None,
    ) -> None:
        self._reactor = reactor
        self._broker_info = broker_info
        self.info: Optional[BrokerInfo] = None
        self.interchange = interchange
        interchange.on_results = self._on_results
        self.spool = spool
        self.prefetch = prefetch
        self.heartbeat = heartbeat
        self.ca_file = ca_file
        self.allowed = set(allowed_functions) if allowed_functions is not None else None
        self._on_fatal = on_fatal
        self._resend_interval = resend_interval
        self._connect = connect or AMQPConnectionService
        self.tracker = TaskTracker()
        self.tasks_conn: Optional[AMQPConnectionService] = None
        self.results_conn: Optional[AMQPConnectionService] = None
        self._generation = 0
        self._consumer: Optional[ExclusiveConsumer] = None
        self._acks: Optional[AckBatcher] = None
        self._publisher: Optional[ConfirmingPublisher] = None
        self._to_submit: List[Task] = []
        self._submit_scheduled = False
        self._spool_batch: List[Tuple[str, bytes]] = []
        self._spool_scheduled = False
        self._spooled: Dict[str, bytes] = {}  # task id -> packed result, not yet confirmed
        self._resending: Set[str] = set()
        self._resend_queue: Deque[str] = deque()
        self._spool_loaded = False
        self._spool_error: Optional[AMQPError] = None
        self._spool_waiters: List[Deferred[None]] = []
        self._resend_call: Any = None
        self._delayed_releases: List[Any] = []  # DelayedCalls of _release_later
        # The broker's message size limit, once it refused a message for it:
        # a bigger result is replaced before it is sent (each refusal costs
        # the results channel).
        self._broker_limit: Optional[int] = None
        self._publishing = 0  # results published, not yet confirmed or spooled
        self._idle_waiters: List[Deferred[None]] = []
        self._draining = False
        self.fatal_error: Optional[AMQPError] = None
        self.counts = {
            "tasks_received": 0,
            "tasks_redelivered_running": 0,
            "tasks_redelivered_done": 0,
            "malformed": 0,
            "results_confirmed": 0,
            "results_spooled": 0,
            "stale_consumer_retries": 0,
            "tasks_held_while_draining": 0,
        }

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        info = self.info = self._broker_info()
        self.spool.load().addCallbacks(self._loaded_spool, self._spool_load_failed)
        self.tasks_conn = self._connect(
            self._reactor,
            info.tasks.url,
            self._prepare_tasks,
            ca_file=self.ca_file,
            heartbeat=self.heartbeat,
            name="tasks",
        )
        self.results_conn = self._connect(
            self._reactor,
            info.results.url,
            self._prepare_results,
            ca_file=self.ca_file,
            heartbeat=self.heartbeat,
            name="results",
        )
        for conn in (self.results_conn, self.tasks_conn):
            conn.when_fatal().addCallback(self._fatal)
            conn.startService()
        from twisted.internet.task import LoopingCall

        self._resend_call = LoopingCall(self._resend_spooled)
        self._resend_call.clock = self._reactor
        self._resend_call.start(self._resend_interval, now=False)

    def when_ready(self) -> Deferred[None]:
        """Fires when both connections are set up; fails on a fatal error."""
        assert self.tasks_conn is not None and self.results_conn is not None
        ready: Deferred[None] = Deferred()

        def connected(_: Any) -> None:
            if not ready.called:
                ready.callback(None)

        def fatal(error: AMQPError) -> None:
            if not ready.called:
                ready.errback(StartupError(error.message, self._exit_code(error)))

        gatherResults(
            [self.results_conn.when_connected(), self.tasks_conn.when_connected()],
            consumeErrors=True,
        ).addCallbacks(connected, lambda f: None)
        for conn in (self.results_conn, self.tasks_conn):
            conn.when_fatal().addCallback(fatal)
        return ready

    def ready_info(self) -> Dict[str, Any]:
        return {"endpoint_id": self.info.endpoint_id} if self.info else {}

    @staticmethod
    def _exit_code(error: AMQPError) -> int:
        if error.code == 403 and "login" in error.message:
            return EX_NOPERM
        return EX_UNAVAILABLE

    def _fatal(self, error: AMQPError) -> None:
        if self.fatal_error is not None:
            return
        self.fatal_error = error
        if self.running and self._on_fatal is not None:
            self._on_fatal(error.message, self._exit_code(error))

    async def drain(self, grace: float) -> None:
        """Stop taking tasks, release those not started, let running ones finish.

        Waits up to ``grace`` seconds for running tasks to end and for their
        results to be confirmed or spooled.
        """
        self._draining = True
        if self._consumer is not None:
            try:
                await self._consumer.cancel()
            except Exception as e:
                self.log.info("Cancelling the consumer failed: {error}", error=e)
        withdrawn = self.interchange.withdraw_unstarted()
        self._to_submit, queued = [], self._to_submit
        withdrawn += [task.task_id for task in queued]
        released = self._release(self.tracker.withdraw(withdrawn))
        if withdrawn:
            self.log.info("Released {n} tasks not yet started back to the broker", n=released)
        if len(self.tracker) or self._publishing:
            self.log.info(
                "Waiting up to {grace:g} s for {n} running tasks", grace=grace, n=len(self.tracker)
            )
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)

            def give_up() -> None:
                if not idle.called:
                    idle.callback(None)

            timeout = self._reactor.callLater(grace, give_up)
            await idle
            if timeout.active():
                timeout.cancel()
        if self._acks is not None:
            self._acks.flush()
        client = self.tasks_conn.client if self.tasks_conn else None
        if client is not None:
            client.flush_now()

    def _release(self, refs: Iterable[DeliveryRef]) -> int:
        """Give deliveries of the current channel back to the broker (requeue).

        Deliveries of an earlier channel went back when it closed.
        """
        acks = self._acks
        if acks is None or acks.channel.closed:
            return 0
        released = 0
        for generation, tag in refs:
            if generation == self._generation:
                acks.channel.reject(tag, requeue=True)
                acks.settled(tag)
                released += 1
        return released

    #: Seconds before tasks whose results could be neither confirmed nor
    #: spooled go back to the broker (to be delivered and run again).
    release_delay = 5.0

    def _release_later(self, refs: List[DeliveryRef]) -> None:
        def release() -> None:
            self._delayed_releases.remove(call)
            released = self._release(refs)
            self.log.warn(
                "Gave {n} tasks whose results could not be spooled back to the broker",
                n=released,
            )

        call = self._reactor.callLater(self.release_delay, release)
        self._delayed_releases.append(call)

    def _check_idle(self) -> None:

        if self._idle_waiters and not len(self.tracker) and not self._publishing:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._resend_call is not None and self._resend_call.running:
            self._resend_call.stop()
        for call in self._delayed_releases:
            if call.active():
                call.cancel()  # the deliveries go back when the channel closes
        self._delayed_releases = []
        stops = []
        for conn in (self.tasks_conn, self.results_conn):
            if conn is not None and conn.running:
                client = conn.client
                if client is not None:
                    client.flush_now()
                stops.append(conn.stopService())
        return gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    # -- connection set-up ------------------------------------------------

    async def _prepare_tasks(self, client: AMQPClient) -> None:
        assert self.info is not None
        channel = await client.open_channel(1)
        self._generation += 1
        generation = self._generation
        acks = AckBatcher(channel, self._reactor)
        channel.handlers.on_close = lambda reason: self._channel_lost(client, "tasks", reason)
        channel.handlers.on_cancel = self._consumer_cancelled
        consumer = ExclusiveConsumer(
            channel,
            self.info.tasks.queue,
            lambda delivery: self._on_delivery(delivery, generation, acks),
            self.prefetch,
            consumer_tag=f"endpoint-{self.info.endpoint_id}",
        )
        self._acks = acks
        self._consumer = consumer
        # Results spooled by an earlier run mark their tasks done before any
        # delivery is looked at, so those tasks are acknowledged, not run again.
        await self._when_spool_loaded()
        try:
            await consumer.start(self.info.tasks.exchange)
        except QueueHeldElsewhere as e:
            raise self._maybe_stale_consumer(e) from None
        if self._draining:
            await consumer.cancel()

    def _maybe_stale_consumer(self, error: QueueHeldElsewhere) -> AMQPError:
        """The error to raise for a refused exclusive consumer.

        On the first connection the holder is another instance: fatal.  Soon
        after a lost connection it may be this endpoint's own old connection,
        half-open and not yet dropped by the broker (which does so after
        missed heartbeats): retry, often, for a few heartbeat intervals.
        """
        conn = self.tasks_conn
        window = self.stale_consumer_heartbeats * self.heartbeat
        if (
            conn is None
            or not conn.connections
            or conn.lost_at is None
            or self._reactor.seconds() - conn.lost_at >= window
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

    def _when_spool_loaded(self) -> Deferred[None]:
        """Fires once the spool of an earlier run is read; fails if it cannot be."""
        if self._spool_error is not None:
            return fail(self._spool_error)
        if self._spool_loaded:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._spool_waiters.append(d)
        return d

    async def _prepare_results(self, client: AMQPClient) -> None:
        assert self.info is not None
        channel = await client.open_channel(1)
        publisher = ConfirmingPublisher(
            channel, on_closed=lambda reason: self._channel_lost(client, "results", reason)
        )
        await publisher.start()
        try:
            await channel.exchange_declare(exchange=self.info.results.exchange, passive=True)
        except Exception as e:
            raise AMQPError(
                f"the broker has no exchange {self.info.results.exchange!r}: {e}",
                404,
                fatal=True,
            ) from None
        self._publisher = publisher
        await self._when_spool_loaded()
        self._resend_spooled(restart=True)

    def _channel_lost(self, client: AMQPClient, side: str, reason: Any) -> None:
        """A channel closed by the broker while its connection lives: reconnect.

        (A broker closes a channel for an error on it, e.g. a message over its
        size limit; the connection's reconnect sets everything up again.)
        """
        if client.transport is not None and not client.transport.disconnecting:
            code, text = close_reason(reason)
            self.log.warn(
                "The broker closed the {side} channel ({text}); reconnecting", side=side, text=text
            )
            client.transport.loseConnection()

    def _consumer_cancelled(self, tag: str) -> None:
        if self.tasks_conn is not None and self.info is not None:
            self.tasks_conn.fail(
                AMQPError(
                    f"the broker cancelled the consumer of {self.info.tasks.queue!r} (was the "
                    f"endpoint's queue deleted by the service?); register the endpoint again",
                    fatal=True,
                )
            )

    # -- tasks in ---------------------------------------------------------

    def _on_delivery(self, delivery: Delivery, generation: int, acks: AckBatcher) -> None:
        acks.delivered(delivery.delivery_tag)
        if self._draining:
            # Arrived after the consumer was cancelled (the cancel failed, or a
            # reconnection consumed again): not run, not acknowledged; the
            # broker delivers it again once this channel closes at the stop.
            # (Rejecting it now would only bring it straight back.)
            self.counts["tasks_held_while_draining"] += 1
            return
        try:
            message = unpack(delivery.body)
        except MessageError as e:
            self.counts["malformed"] += 1
            if e.task_id is None:
                self.log.error(
                    "Rejected a malformed message with no readable task id (delivery "
                    "{tag}): {error}",
                    tag=delivery.delivery_tag,
                    error=e,
                )
                acks.channel.reject(delivery.delivery_tag, requeue=False)
                acks.settled(delivery.delivery_tag)
                return
            self.log.warn("Malformed task {task_id}: {error}", task_id=e.task_id, error=e)
            decision = self.tracker.delivered(e.task_id, (generation, delivery.delivery_tag))
            if decision is Decision.ALREADY_DONE:
                # Its error result is safe already (the first ack was lost).
                self.counts["tasks_redelivered_done"] += 1
                acks.done(delivery.delivery_tag)
            elif decision is Decision.RUN:
                self._on_results(
                    [
                        Result.failure(
                            e.task_id, ErrorCode.MALFORMED_TASK, f"malformed task message: {e}"
                        )
                    ]
                )
            return
        if not isinstance(message, Task):
            self.log.error(
                "Rejected a {kind} message on the task queue", kind=type(message).__name__
            )
            acks.channel.reject(delivery.delivery_tag, requeue=False)
            acks.settled(delivery.delivery_tag)
            return
        self.counts["tasks_received"] += 1
        decision = self.tracker.delivered(message.task_id, (generation, delivery.delivery_tag))
        if decision is Decision.ALREADY_DONE:
            self.counts["tasks_redelivered_done"] += 1
            acks.done(delivery.delivery_tag)
            return
        if decision is Decision.ALREADY_RUNNING:
            self.counts["tasks_redelivered_running"] += 1
            return
        if self.allowed is not None and message.function_id not in self.allowed:
            why = (
                f"function {message.function_id} is not in this endpoint's allowed_functions"
                if message.function_id
                else "the task names no function id, and this endpoint only runs the "
                "functions in its allowed_functions"
            )
            self._on_results([Result.failure(message.task_id, ErrorCode.FUNCTION_NOT_ALLOWED, why)])
            return
        self._to_submit.append(message)
        if not self._submit_scheduled:
            self._submit_scheduled = True
            self._reactor.callLater(0, self._submit)

    def _submit(self) -> None:
        self._submit_scheduled = False
        tasks, self._to_submit = self._to_submit, []
        if tasks:
            self.interchange.submit(tasks)

    # -- results out ------------------------------------------------------

    def _on_results(self, results: List[Result]) -> None:
        assert self.info is not None
        info = self.info.results
        properties = _amqp_properties(info.properties)
        publisher = self._publisher
        limit = self._broker_limit
        for result in results:
            body = pack(result)
            if limit is not None and len(body) > limit:
                result = self._too_large(result, len(body), limit)
                body = pack(result)
            self._publishing += 1
            if publisher is None or publisher.closed:
                self._spool(result.task_id, body)
                continue
            props = dict(properties, **{"message-id": result.task_id})
            d = publisher.publish(info.exchange, info.routing_key, body, props, info.mandatory)
            d.addCallbacks(
                self._confirmed,
                self._not_confirmed,
                callbackArgs=(result.task_id,),
                errbackArgs=(result, body),
            )

    def _confirmed(self, _: None, task_id: str) -> None:
        self.counts["results_confirmed"] += 1
        self._publishing -= 1
        self._finished(task_id)

    def _too_large(self, result: Result, size: int, limit: int) -> Result:
        """The error result that replaces ``result``, too large for the broker."""
        self.log.error(
            "The result of task {task_id} ({size} bytes) is larger than the broker "
            "accepts ({limit}); sending an error instead",
            task_id=result.task_id,
            size=size,
            limit=limit,
        )
        return Result.failure(
            result.task_id,
            ErrorCode.MAX_RESULT_SIZE_EXCEEDED,
            f"the result ({size} bytes) is larger than the broker's limit of "
            f"{limit} bytes; return less data, or raise the broker's max_message_size",
            task_statuses=result.task_statuses,
        )

    def _not_confirmed(self, failure: Failure, result: Result, body: bytes) -> None:
        error = failure.value
        if isinstance(error, PublishFailed) and error.too_large is not None:
            self._broker_limit = error.too_large
            self._publishing -= 1
            self._on_results([self._too_large(result, len(body), error.too_large)])
            return
        self.log.info(
            "Result of task {task_id} not confirmed ({error}); spooling it",
            task_id=result.task_id,
            error=failure.getErrorMessage(),
        )
        self._spool(result.task_id, body)

    def _spool(self, task_id: str, body: bytes) -> None:
        self._spooled[task_id] = body
        self._spool_batch.append((task_id, body))
        if not self._spool_scheduled:
            self._spool_scheduled = True
            self._reactor.callLater(0, self._write_spool)

    def _write_spool(self) -> None:
        self._spool_scheduled = False
        batch, self._spool_batch = self._spool_batch, []
        if not batch:
            return

        def written(_: Any) -> None:
            self.counts["results_spooled"] += len(batch)
            for task_id, _body in batch:
                self._publishing -= 1
                self._finished(task_id)

        def failed(failure: Failure) -> None:
            # The results are neither confirmed nor durable: give their tasks
            # back to the broker, which delivers them again (to run again).
            # Deliveries of a closed channel went back with it.
            self.log.failure("Could not write results to the spool", failure)
            task_ids = [task_id for task_id, _body in batch]
            for task_id in task_ids:
                self._publishing -= 1
                self._spooled.pop(task_id, None)
            # Not at once: while the spool stays unwritable and the results
            # side down, an immediate requeue would run them again in a loop.
            self._release_later(self.tracker.withdraw(task_ids))
            self._check_idle()

        self.spool.write(batch).addCallbacks(written, failed)

    def _finished(self, task_id: str) -> None:
        acks = self._acks
        for generation, tag in self.tracker.finished(task_id):
            if generation == self._generation and acks is not None:
                acks.done(tag)
            # else: that channel is gone; the broker will deliver the task
            # again and it will be acknowledged as already done.
        self._check_idle()

    def _loaded_spool(self, found: Dict[str, bytes]) -> None:
        if found:
            self.log.info("{n} results from an earlier run are in the spool", n=len(found))
        for task_id, body in found.items():
            self._spooled.setdefault(task_id, body)
        self.tracker.mark_done(found)
        self._spool_loaded = True
        waiters, self._spool_waiters = self._spool_waiters, []
        for d in waiters:
            d.callback(None)

    def _spool_load_failed(self, failure: Failure) -> None:
        # Without the spool the delivery promise cannot be kept: both
        # connections' set-ups fail with this, fatally.
        self._spool_error = AMQPError(
            f"cannot read the result spool {self.spool.directory}: {failure.getErrorMessage()}",
            fatal=True,
        )
        waiters, self._spool_waiters = self._spool_waiters, []
        for d in waiters:
            d.errback(self._spool_error)

    def _resend_spooled(self, restart: bool = False) -> None:
        """Send spooled results again, ``resend_window`` at a time.

        Starts a pass over the spool unless one is under way (``restart``: a
        new channel, start over); the next window goes when the results of
        the last one are all settled.
        """
        if restart or not self._resend_queue:
            self._resend_queue = deque(t for t in self._spooled if t not in self._resending)
            if self._resend_queue:
                self.log.info("Sending {n} spooled results", n=len(self._resend_queue))
        self._resend_window()

    def _resend_window(self) -> None:
        publisher = self._publisher
        if publisher is None or publisher.closed or self.info is None:
            return
        info = self.info.results
        properties = _amqp_properties(info.properties)
        queue = self._resend_queue
        room = self.resend_window - len(self._resending)
        while room > 0 and queue:
            task_id = queue.popleft()
            body = self._spooled.get(task_id)
            if body is None or task_id in self._resending:
                continue
            room -= 1
            if self._broker_limit is not None and len(body) > self._broker_limit:
                self._replace_too_large(task_id, body, self._broker_limit)
                continue
            self._resending.add(task_id)
            props = dict(properties, **{"message-id": task_id})
            d = publisher.publish(info.exchange, info.routing_key, body, props, info.mandatory)
            d.addCallbacks(
                self._spooled_sent,
                self._spooled_not_sent,
                callbackArgs=(task_id,),
                errbackArgs=(task_id,),
            )

    def _spooled_sent(self, _: None, task_id: str) -> None:
        self._resending.discard(task_id)
        if self._spooled.pop(task_id, None) is not None:
            self.spool.remove([task_id])
        if not self._resending:
            self._resend_window()

    def _spooled_not_sent(self, failure: Failure, task_id: str) -> None:
        self._resending.discard(task_id)
        error = failure.value
        body = self._spooled.get(task_id)
        if isinstance(error, PublishFailed) and error.too_large is not None and body is not None:
            self._broker_limit = error.too_large
            self._replace_too_large(task_id, body, error.too_large)

        else:
            self.log.info(
                "Spooled result of task {task_id} not confirmed yet: {error}",
                task_id=task_id,
                error=failure.getErrorMessage(),
            )
        if not self._resending:
            self._resend_window()

    def _replace_too_large(self, task_id: str, body: bytes, limit: int) -> None:
        """Replace a spooled result the broker refuses as too large by an error.

        The task was acknowledged when its result was spooled, so the
        replacement is spooled too (over the old file) before it is sent.
        """
        try:
            message = unpack(body)
        except MessageError:
            message = None
        result = message if isinstance(message, Result) else Result(task_id, "")
        replacement = pack(self._too_large(result, len(body), limit))
        self._spooled[task_id] = replacement
        self._resending.add(task_id)  # not sent (nor removed) while being written

        def written(_: Any) -> None:
            self._resending.discard(task_id)
            self._resend_spooled(restart=True)

        def failed(failure: Failure) -> None:
            # The error result is sent from memory anyway; if the endpoint
            # stops first, the big result on disk is replaced again next run.
            self._resending.discard(task_id)
            self.log.failure(
                "Could not write the error result of task {task_id} to the spool",
                failure,
                task_id=task_id,
            )
            self._resend_spooled(restart=True)

        self.spool.write([(task_id, replacement)], replacing=True).addCallbacks(written, failed)

    def publish_status(self, report: EPStatusReport) -> Deferred[None]:
        """Send a status report to the service (confirmed, not spooled)."""
        publisher = self._publisher
        if publisher is None or publisher.closed or self.info is None:
            return fail(PublishFailed("not connected to the broker"))
        info = self.info.results
        return publisher.publish(
            info.exchange,
            info.routing_key,
            pack(report),
            _amqp_properties(info.properties),
            info.mandatory,
        )

    # -- status -----------------------------------------------------------

    def status_fields(self) -> Dict[str, Any]:
        return {
            "broker_tasks_connection": self.tasks_conn.state() if self.tasks_conn else "stopped",
            "broker_results_connection": (
                self.results_conn.state() if self.results_conn else "stopped"
            ),
            "tasks_in_flight": len(self.tracker),
            "results_unconfirmed": self._publisher.in_flight if self._publisher else 0,
            "results_spooled": len(self._spooled),
        }
