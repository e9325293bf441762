"""The endpoint's AMQP side: two reconnecting connections, one promise.

:class:`Transport` is the daemon's ``amqp`` service.  It keeps two
connections (the registration answer gives a URL for the task queue and one
for results, possibly with different credentials), each an
:class:`~funcx_endpoint.amqp.connection.AMQPConnectionService` that
reconnects with backoff, and lends them to the two objects that do the work:

* the :class:`~funcx_endpoint.endpoint.intake.TaskIntake` (tasks in, to the
  interchange), and
* the :class:`~funcx_endpoint.endpoint.publishing.ResultPublisher` (results
  out, the interchange's result sink),

joined by a :class:`~funcx_endpoint.endpoint.deliveries.DeliveryLedger`, so
that a task is acknowledged only once its result is confirmed or spooled
(DESIGN.md, the delivery promise).

Its drain (a clean stop) is a state machine::

    open ──drain──► draining ──running tasks done, or grace over──► drained

Draining stops taking tasks, cancels the consumer, takes back from the
interchange every task not yet sent to a manager and releases those to the
broker, then waits up to the grace period for running tasks' results to be
safe, and sends the acknowledgements due.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from automat import MethodicalMachine
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from funcx_endpoint.amqp.connection import (
    AMQPConnectionService,
    AMQPError,
    close_reason,
    connected_or_refused,
)
from funcx_endpoint.amqp.interfaces import IAMQPClient, IAMQPConnectionService
from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.endpoint.broker_info import BrokerInfo, QueueInfo
from funcx_endpoint.endpoint.deliveries import DeliveryLedger
from funcx_endpoint.endpoint.idle import Activity
from funcx_endpoint.endpoint.intake import TaskIntake
from funcx_endpoint.endpoint.publishing import ResultPublisher
from funcx_endpoint.endpoint.service import StartupError
from funcx_endpoint.endpoint.states import TaskStatePublisher
from funcx_endpoint.executor.interface import IInterchange, IResultSink
from funcx_endpoint.lifecycle import (
    EX_NOPERM,
    EX_UNAVAILABLE,
    IDrainingPart,
    IReadyPart,
    IStatusPart,
)
from funcx_endpoint.observer import fire_all

__all__ = ["BrokerInfo", "QueueInfo", "Transport", "build_transport"]

InterchangeT = TypeVar("InterchangeT", bound=IInterchange)


@implementer(IReadyPart, IDrainingPart, IStatusPart)
class Transport(Service):
    """Task intake and result publisher over two reconnecting connections."""

    log = Logger()
    name = "amqp"
    _machine = MethodicalMachine()

    def __init__(
        self,
        reactor: Any,
        broker_info: Callable[[], BrokerInfo],
        intake: TaskIntake,
        publisher: ResultPublisher,
        *,
        heartbeat: int = 30,
        ca_file: Optional[str] = None,
        on_fatal: Optional[Callable[[str, int], None]] = None,
        connect: Optional[Callable[..., IAMQPConnectionService]] = None,
    ) -> None:
        self._reactor = reactor
        self._broker_info = broker_info
        self.intake = intake
        self.publisher = publisher
        self.ledger = intake.ledger
        self.heartbeat = heartbeat
        self.ca_file = ca_file
        self._on_fatal = on_fatal
        self._connect: Callable[..., IAMQPConnectionService] = connect or AMQPConnectionService
        self.info: Optional[BrokerInfo] = None
        self.tasks_conn: Optional[IAMQPConnectionService] = None
        self.results_conn: Optional[IAMQPConnectionService] = None
        self.fatal_error: Optional[AMQPError] = None
        self._drain_waiters: List[Deferred[None]] = []
        #: real-time task states, sent on the results connection (if on)
        self.task_states: Optional[TaskStatePublisher] = None

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        info = self.info = self._broker_info()
        self.intake.info = info
        self.publisher.start(info)
        self.tasks_conn, self.results_conn = (
            self._connect(
                self._reactor,
                url,
                prepare,
                ca_file=self.ca_file,
                heartbeat=self.heartbeat,
                name=name,
            )
            for url, prepare, name in (
                (info.tasks.url, self._prepare_tasks, "tasks"),
                (info.results.url, self._prepare_results, "results"),
            )
        )
        for conn in (self.results_conn, self.tasks_conn):
            conn.when_fatal().addCallback(self._fatal)
            conn.startService()

    def when_ready(self) -> Deferred[None]:
        """Fires when both connections are set up; fails on a fatal error."""
        assert self.tasks_conn is not None and self.results_conn is not None
        conns = (self.results_conn, self.tasks_conn)
        return connected_or_refused(
            gatherResults([conn.when_connected() for conn in conns], consumeErrors=True),
            [conn.when_fatal() for conn in conns],
            lambda error: StartupError(error.message, self._exit_code(error)),
        )

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

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.task_states is not None:
            self.task_states.stop()
        self.publisher.stop()
        # Delayed releases are dropped: the deliveries go back when the channel closes.
        self.ledger.cancel_delayed()
        stops = []
        for conn in (self.tasks_conn, self.results_conn):
            if conn is not None and conn.running:
                client = conn.client
                if client is not None:
                    client.flush_now()
                stops.append(conn.stopService())
        return gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    # -- draining ----------------------------------------------------------

    @_machine.state(initial=True)
    def _open(self) -> None:
        """Taking tasks."""

    @_machine.state()
    def _draining(self) -> None:
        """No new tasks; waiting for running ones (up to the grace period)."""

    @_machine.state()
    def _drained(self) -> None:
        """Done: what could finish has, and its acknowledgements are sent."""

    @_machine.input()
    def _drain(self, grace: float, waiter: Deferred[None]) -> None:
        """Asked to drain."""

    @_machine.input()
    def _finished_draining(self) -> None:
        """The drain is over."""

    @_machine.output()
    def _begin(self, grace: float, waiter: Deferred[None]) -> None:
        self._drain_waiters.append(waiter)
        d = Deferred.fromCoroutine(self._run_drain(grace))
        d.addErrback(lambda failure: self.log.failure("Draining failed", failure))
        d.addBoth(lambda _: self._finished_draining())

    @_machine.output()
    def _join(self, grace: float, waiter: Deferred[None]) -> None:
        self._drain_waiters.append(waiter)

    @_machine.output()
    def _done_already(self, grace: float, waiter: Deferred[None]) -> None:
        waiter.callback(None)

    @_machine.output()
    def _notify_drained(self) -> None:
        fire_all(self._drain_waiters, None)

    _open.upon(_drain, enter=_draining, outputs=[_begin])
    _draining.upon(_drain, enter=_draining, outputs=[_join])
    _draining.upon(_finished_draining, enter=_drained, outputs=[_notify_drained])
    _drained.upon(_drain, enter=_drained, outputs=[_done_already])

    def drain(self, grace: float) -> Deferred[None]:
        """Stop taking tasks, release those not started, let running ones finish.

        Waits up to ``grace`` seconds for running tasks to end and for their
        results to be confirmed or spooled.  Each call returns a new
        Deferred, fired once the drain is over.
        """
        waiter: Deferred[None] = Deferred()
        self._drain(grace, waiter)
        return waiter

    async def _run_drain(self, grace: float) -> None:
        intake = self.intake
        queued = intake.stop_taking()
        await intake.cancel_consumer()
        withdrawn = intake.interchange.withdraw_unstarted() + queued
        released = self.ledger.release(withdrawn)
        if withdrawn:
            self.log.info("Released {n} tasks not yet started back to the broker", n=released)
        if len(self.ledger) or self.publisher.publishing:
            self.log.info(
                "Waiting up to {grace:g} s for {n} running tasks", grace=grace, n=len(self.ledger)
            )
            idle = self.publisher.when_idle()
            idle.addTimeout(grace, self._reactor, onTimeoutCancel=lambda *_: None)
            await idle
        self.ledger.flush()
        client = self.tasks_conn.client if self.tasks_conn else None
        if client is not None:
            client.flush_now()

    # -- connection set-up ------------------------------------------------

    async def _prepare_tasks(self, client: IAMQPClient) -> None:
        assert self.tasks_conn is not None
        await self.intake.prepare(
            client,
            self.tasks_conn,
            self.publisher.when_spool_loaded,
            lambda reason: self._channel_lost(client, "tasks", reason),
            self._consumer_cancelled,
        )

    async def _prepare_results(self, client: IAMQPClient) -> None:
        await self.publisher.prepare(
            client, lambda reason: self._channel_lost(client, "results", reason)
        )

    def _channel_lost(self, client: IAMQPClient, side: str, reason: Any) -> None:
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

    # -- status -----------------------------------------------------------

    def publish_status(self, report: Any) -> Deferred[None]:
        """Send a status report to the service (see ResultPublisher.publish_status)."""
        return self.publisher.publish_status(report)

    @property
    def counts(self) -> Dict[str, int]:
        """What the intake and the publisher counted."""
        return {**self.intake.counts, **self.publisher.counts}

    def activity(self) -> Activity:
        """Tasks taken plus results confirmed so far, and the work outstanding (tasks
        in flight, results being published or spooled): for the idle shutdown."""
        counts = self.counts
        return Activity(
            moved=counts["tasks_received"] + counts["results_confirmed"],
            outstanding=len(self.ledger) + self.publisher.publishing + self.publisher.spooled,
        )

    def status_fields(self) -> Dict[str, Any]:
        publisher = self.publisher.publisher
        return {
            "broker_tasks_connection": self.tasks_conn.state() if self.tasks_conn else "stopped",
            "broker_results_connection": (
                self.results_conn.state() if self.results_conn else "stopped"
            ),
            "tasks_in_flight": len(self.ledger),
            "results_unconfirmed": publisher.in_flight if publisher else 0,
            "results_spooled": self.publisher.spooled,
        }


def build_transport(
    reactor: Any,
    broker_info: Callable[[], BrokerInfo],
    spool: ResultSpool,
    make_interchange: Callable[[IResultSink], InterchangeT],
    *,
    prefetch: int = 512,
    heartbeat: int = 30,
    ca_file: Optional[str] = None,
    allowed_functions: Optional[Sequence[str]] = None,
    on_fatal: Optional[Callable[[str, int], None]] = None,
    resend_interval: float = 30.0,
    message_batches: bool = True,
    connect: Optional[Callable[..., IAMQPConnectionService]] = None,
) -> Tuple[Transport, InterchangeT]:
    """A transport and the interchange it feeds, joined.

    Results flow back against the order of construction: the result
    publisher first (the interchange's sink, built by ``make_interchange``),
    then the interchange, then the task intake that feeds it; a delivery
    ledger joins intake and publisher.
    """
    ledger = DeliveryLedger(reactor)
    publisher = ResultPublisher(
        reactor, ledger, spool, resend_interval=resend_interval, message_batches=message_batches
    )
    interchange = make_interchange(publisher)
    intake = TaskIntake(
        reactor,
        ledger,
        interchange,
        publisher,
        prefetch=prefetch,
        heartbeat=heartbeat,
        allowed_functions=allowed_functions,
    )
    transport = Transport(
        reactor,
        broker_info,
        intake,
        publisher,
        heartbeat=heartbeat,
        ca_file=ca_file,
        on_fatal=on_fatal,
        connect=connect,
    )
    return transport, interchange
