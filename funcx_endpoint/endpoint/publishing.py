"""The result sink: results out to the broker, confirmed or spooled, never lost.

:class:`ResultPublisher` is the
:class:`~funcx_endpoint.executor.interface.IResultSink` the interchange is
built with.  It keeps the results connection (an
:class:`~funcx_endpoint.amqp.connection.AMQPConnectionService` that
reconnects with backoff) and a
:class:`~funcx_endpoint.amqp.publisher.ConfirmingPublisher` on it:

* each result is written as the funcX 1.0 ``result`` message by joining the
  pieces of its :class:`~funcx_endpoint.wire.results.PackedResult` (its
  payload is never decoded) and published with a confirm;
* once the broker confirms it, or once it is written (fsync) to the spool
  ``unacked_results/`` because the broker did not, its task's deliveries are
  acknowledged (:meth:`DeliveryLedger.finished`);
* spooled results are sent again after every (re)connection and every
  ``resend_interval``, ``resend_window`` at a time, and removed from the
  spool once confirmed;
* a result larger than the broker accepts is replaced by a
  ``MaxResultSizeExceeded`` error for its task, whether published fresh or
  from the spool: one oversized result must not make the broker close the
  results channel over and over;
* if the spool cannot be written either, the task is released back to the
  broker after :attr:`DeliveryLedger.release_delay`.

Status reports go out the same way (confirmed, never spooled).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from funcx_endpoint.amqp.connection import AMQPError
from funcx_endpoint.amqp.interfaces import IAMQPClient
from funcx_endpoint.amqp.publisher import ConfirmingPublisher, PublishFailed
from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.batching import TurnBatch
from funcx_endpoint.endpoint.broker_info import BrokerInfo, amqp_properties
from funcx_endpoint.endpoint.deliveries import DeliveryLedger
from funcx_endpoint.executor.interface import IResultSink
from funcx_endpoint.lifecycle import start_loop, stop_loop
from funcx_endpoint.observer import fire_all
from funcx_endpoint.wire import (
    MESSAGE_BATCHES,
    EPStatusReport,
    ErrorCode,
    MessageError,
    PackedResult,
    Result,
    pack,
    unpack,
)
from funcx_endpoint.wire.results import batch_message_pieces

__all__ = ["ResultPublisher"]


@implementer(IResultSink)
@attr.s(auto_attribs=True, eq=False, repr=False)
class ResultPublisher:
    """Publishes results with confirms; spools what the broker did not confirm."""

    log = Logger()
    #: spooled results sent again per window; the next window goes once
    #: these are confirmed (or refused), so a large spool is not sent in one turn
    resend_window = 256
    #: with MESSAGE_BATCHES agreed: results per message at most, and bytes
    batch_max = 64
    batch_max_bytes = 512 * 1024

    clock: Any
    ledger: DeliveryLedger
    spool: ResultSpool
    resend_interval: float = attr.ib(default=30.0, kw_only=True)
    #: send several results per message when the service agreed to (at registration)
    message_batches: bool = attr.ib(default=True, kw_only=True)
    batching: bool = attr.ib(default=False, init=False)
    info: Optional[BrokerInfo] = attr.ib(default=None, init=False)
    publisher: Optional[ConfirmingPublisher] = attr.ib(default=None, init=False)
    _properties: Dict[str, Any] = attr.ib(factory=dict, init=False)
    _spool_batch: TurnBatch[Tuple[str, bytes]] = attr.ib(init=False)
    # task id -> message, not yet confirmed
    _spooled: Dict[str, bytes] = attr.ib(factory=dict, init=False)
    _resending: Set[str] = attr.ib(factory=set, init=False)
    _resend_queue: Deque[str] = attr.ib(factory=deque, init=False)
    _spool_loaded: bool = attr.ib(default=False, init=False)
    _spool_error: Optional[AMQPError] = attr.ib(default=None, init=False)
    _spool_waiters: List[Deferred[None]] = attr.ib(factory=list, init=False)
    _resend_call: Optional[LoopingCall] = attr.ib(default=None, init=False)
    # The broker's message size limit, once it refused a message for it:
    # a bigger result is replaced before it is sent (each refusal costs
    # the results channel).
    broker_limit: Optional[int] = attr.ib(default=None, init=False)
    #: results published, not yet confirmed or spooled
    publishing: int = attr.ib(default=0, init=False)
    _idle_waiters: List[Deferred[None]] = attr.ib(factory=list, init=False)
    counts: Dict[str, int] = attr.ib(
        init=False, factory=lambda: {"results_confirmed": 0, "results_spooled": 0}
    )

    @_spool_batch.default
    def _spool_writes_each_turn(self) -> TurnBatch[Tuple[str, bytes]]:
        return TurnBatch(self.clock, self._write_spool)

    # -- lifecycle (driven by the transport) -------------------------------------

    def start(self, info: BrokerInfo) -> None:
        """Read the spool and start the periodic resend."""
        self.info = info
        self.batching = self.message_batches and MESSAGE_BATCHES in info.features
        self._properties = amqp_properties(info.results.properties)
        self.spool.load().addCallbacks(self._loaded_spool, self._spool_load_failed)
        self._resend_call = start_loop(
            self._resend_spooled, self.clock, self.resend_interval, now=False
        )

    def stop(self) -> None:
        stop_loop(self._resend_call)

    async def prepare(self, client: IAMQPClient, on_channel_closed: Callable[[Any], None]) -> None:
        """Set up a new results connection: confirm mode, exchange check, resend."""
        assert self.info is not None
        channel = await client.open_channel(1)
        publisher = ConfirmingPublisher(channel, on_closed=on_channel_closed)
        await publisher.start()
        try:
            await channel.exchange_declare(exchange=self.info.results.exchange, passive=True)
        except Exception as e:
            raise AMQPError(
                f"the broker has no exchange {self.info.results.exchange!r}: {e}",
                404,
                fatal=True,
            ) from None
        self.publisher = publisher
        await self.when_spool_loaded()
        self._resend_spooled(restart=True)

    def when_spool_loaded(self) -> Deferred[None]:
        """Fires once the spool of an earlier run is read; fails if it cannot be."""
        if self._spool_error is not None:
            return fail(self._spool_error)
        if self._spool_loaded:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._spool_waiters.append(d)
        return d

    def when_idle(self) -> Deferred[None]:
        """Fires once no task is in flight and no result is being published."""
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        self._check_idle()
        return waiter

    def _check_idle(self) -> None:
        if self._idle_waiters and not len(self.ledger) and not self.publishing:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)

    # -- IResultSink -----------------------------------------------------------------

    def results_ready(self, results: List[PackedResult]) -> None:
        """Publish the results (several to a message where the service agreed);
        a task is acknowledged once its result is safe."""
        assert self.info is not None
        limit = self.broker_limit
        ready = []
        for result in results:
            if limit is not None and result.message_size() > limit:
                result = self._too_large(result, result.message_size(), limit)
            ready.append(result)
        self.publishing += len(ready)
        publisher = self.publisher
        if publisher is None or publisher.closed:
            for result in ready:
                self._spool(result.task_id, result.message())
            return
        if not self.batching or len(ready) == 1:
            for result in ready:
                self._publish(publisher, [result])
            return
        for group in self._groups(ready):
            self._publish(publisher, group)

    def _groups(self, results: List[PackedResult]) -> List[List[PackedResult]]:
        """``results`` in messages of at most ``batch_max`` results and
        ``batch_max_bytes`` (and the broker's limit); a large result alone."""
        room = self.batch_max_bytes
        if self.broker_limit is not None:
            room = min(room, self.broker_limit - 64)
        groups: List[List[PackedResult]] = []
        group: List[PackedResult] = []
        size = 0
        for result in results:
            length = result.message_size()
            if group and (len(group) >= self.batch_max or size + length > room):
                groups.append(group)
                group, size = [], 0
            group.append(result)
            size += length
        if group:
            groups.append(group)
        return groups

    def _publish(self, publisher: ConfirmingPublisher, group: List[PackedResult]) -> None:
        assert self.info is not None
        info = self.info.results
        props = dict(self._properties)
        if len(group) == 1:
            props["message-id"] = group[0].task_id
            body = group[0].message_pieces()
        else:
            props["message-id"] = f"{group[0].task_id}+{len(group) - 1}"
            body = batch_message_pieces(group)
        d = publisher.publish(info.exchange, info.routing_key, body, props, info.mandatory)
        d.addCallbacks(
            self._confirmed, self._not_confirmed, callbackArgs=(group,), errbackArgs=(group,)
        )

    def _confirmed(self, _: None, group: List[PackedResult]) -> None:
        self.counts["results_confirmed"] += len(group)
        self.publishing -= len(group)
        for result in group:
            self.ledger.finished(result.task_id)
        self._check_idle()

    def _not_confirmed(self, failure: Failure, group: List[PackedResult]) -> None:
        error = failure.value
        if isinstance(error, PublishFailed) and error.too_large is not None:
            # Learnt the broker's limit: publish again within it (a result
            # over it alone is replaced by an error).
            self.broker_limit = error.too_large
            self.publishing -= len(group)
            self.results_ready(group)
            return
        self.log.info(
            "{count} result(s) not confirmed ({error}); spooling them",
            count=len(group),
            error=failure.getErrorMessage(),
        )
        for result in group:
            self._spool(result.task_id, result.message())

    def _too_large(self, result: PackedResult, size: int, limit: int) -> PackedResult:
        """The error result that replaces ``result``, too large for the broker."""
        self.log.error(
            "The result of task {task_id} ({size} bytes) is larger than the broker "
            "accepts ({limit}); sending an error instead",
            task_id=result.task_id,
            size=size,
            limit=limit,
        )
        replacement = PackedResult.failure(
            result.task_id,
            ErrorCode.MAX_RESULT_SIZE_EXCEEDED,
            f"the result ({size} bytes) is larger than the broker's limit of "
            f"{limit} bytes; return less data, or raise the broker's max_message_size",
        )
        replacement.task_statuses = result.task_statuses
        return replacement

    def _finished(self, task_id: str) -> None:
        self.ledger.finished(task_id)
        self._check_idle()

    # -- the spool ---------------------------------------------------------------------

    def _spool(self, task_id: str, body: bytes) -> None:
        self._spooled[task_id] = body
        self._spool_batch.add((task_id, body))

    def _write_spool(self, batch: List[Tuple[str, bytes]]) -> None:
        def written(_: Any) -> None:
            self.counts["results_spooled"] += len(batch)
            for task_id, _body in batch:
                self.publishing -= 1
                self._finished(task_id)

        def failed(failure: Failure) -> None:
            # The results are neither confirmed nor durable: give their tasks
            # back to the broker, which delivers them again (to run again).
            # Not at once: while the spool stays unwritable and the results
            # side down, an immediate requeue would run them again in a loop.
            if failure.check(OSError):
                # A full or read-only disk: what to do, in one line.
                self.log.error(
                    "Could not write results to the spool {directory}: {error}; their "
                    "{n} task(s) go back to the broker to run again (free space there, "
                    "or make it writable)",
                    directory=self.spool.directory,
                    error=failure.getErrorMessage(),
                    n=len(batch),
                )
            else:
                self.log.failure("Could not write results to the spool", failure)
            task_ids = [task_id for task_id, _body in batch]
            for task_id in task_ids:
                self.publishing -= 1
                self._spooled.pop(task_id, None)
            self.ledger.release_later(task_ids)
            self._check_idle()

        self.spool.write(batch).addCallbacks(written, failed)

    def _loaded_spool(self, found: Dict[str, bytes]) -> None:
        if found:
            self.log.info("{n} results from an earlier run are in the spool", n=len(found))
        for task_id, body in found.items():
            self._spooled.setdefault(task_id, body)
        self.ledger.mark_done(found)
        self._spool_loaded = True
        fire_all(self._spool_waiters, None)

    def _spool_load_failed(self, failure: Failure) -> None:
        # Without the spool the delivery promise cannot be kept: both
        # connections' set-ups fail with this, fatally.
        self._spool_error = AMQPError(
            f"cannot read the result spool {self.spool.directory}: {failure.getErrorMessage()}",
            fatal=True,
        )
        fire_all(self._spool_waiters, Failure(self._spool_error))

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
        publisher = self.publisher
        if publisher is None or publisher.closed or self.info is None:
            return
        info = self.info.results
        queue = self._resend_queue
        room = self.resend_window - len(self._resending)
        while room > 0 and queue:
            task_id = queue.popleft()
            body = self._spooled.get(task_id)
            if body is None or task_id in self._resending:
                continue
            room -= 1
            if self.broker_limit is not None and len(body) > self.broker_limit:
                self._replace_too_large(task_id, body, self.broker_limit)
                continue
            self._resending.add(task_id)
            props = dict(self._properties)
            props["message-id"] = task_id
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
            self.broker_limit = error.too_large
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
        (The spooled message is read here for its transitions: a rare path.)
        """
        try:
            message = unpack(body)
        except MessageError:
            message = None
        original = message if isinstance(message, Result) else Result(task_id, "")
        replacement = self._too_large(PackedResult.from_result(original), len(body), limit)
        data = replacement.message()
        self._spooled[task_id] = data
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

        self.spool.write([(task_id, data)], replacing=True).addCallbacks(written, failed)

    # -- status reports ------------------------------------------------------------------

    def publish_status(self, report: EPStatusReport) -> Deferred[None]:
        """Send a status report to the service (confirmed, not spooled)."""
        publisher = self.publisher
        if publisher is None or publisher.closed or self.info is None:
            return fail(PublishFailed("not connected to the broker"))
        info = self.info.results
        return publisher.publish(
            info.exchange, info.routing_key, pack(report), self._properties, info.mandatory
        )

    @property
    def spooled(self) -> int:
        """Results in the spool, not yet confirmed."""
        return len(self._spooled)
