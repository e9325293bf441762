"""The endpoint daemon's service tree and its lifecycle.

:class:`EndpointService` is a ``MultiService`` whose children are the parts of
the daemon, in the order they start::

    hooks         endpoint_setup (and, stopping last, endpoint_teardown), if given
    config        warnings about funcX 1.0 settings without effect here
    control       local control socket (status)
    registration  registers with the web service, learns the broker URLs
    interchange   dispatches tasks to managers, collects results
    providers     starts and scales blocks of managers
    amqp          task consumer and result publisher (AMQPS)
    idle          shuts the daemon down when idle (funcX 1.0's idle_heartbeats_*)
    status        periodic status reports to the service

(the order ``tap.build_endpoint`` adds them in: the interchange must listen
before managers start, and both before tasks arrive).  Unlike a plain
``MultiService`` it starts them one after another, waiting for each to be
ready (a part providing :class:`IReadyPart`).  To stop, it first lets parts
that hold work drain (:class:`IDrainingPart`: the transport stops taking
tasks, releases those not started and waits for running ones), then stops
the parts in reverse order, waiting for each to finish (processes included).
When all are ready it tells whoever started it (a
:class:`~funcx_endpoint.lifecycle.StartupReporter`); when one fails to start,
it reports the failure with an exit code and stops the reactor.

Its lifecycle is a state machine::

    idle ──start──► starting ──parts ready──► running
                       │ └──a part failed──► failed          │
                       └────────────stop─────────┴──────┬────┘
                                                        ▼
                             stopped ◄──parts stopped── stopping ◄──drained── draining
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

from automat import MethodicalMachine
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.lifecycle import (
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    IDrainingPart,
    IReadyPart,
    IStatusPart,
    Phase,
    StartupError,
    StartupReporter,
    exit_status,
)
from funcx_endpoint.observer import fire_all

# Re-exported for the endpoint's parts and tests.
__all__ = [
    "EndpointService",
    "IDrainingPart",
    "IReadyPart",
    "IStatusPart",
    "Phase",
    "StartupError",
    "StartupReporter",
    "exit_status",
]


class EndpointService(MultiService):
    """The daemon: its parts started in order and stopped in reverse."""

    log = Logger()
    _machine = MethodicalMachine()

    def __init__(
        self,
        endpoint_dir: EndpointDir,
        reactor: IReactorCore,
        reporter: StartupReporter,
        drain_grace: float = 10.0,
    ) -> None:
        super().__init__()
        self.setName("endpoint")
        self.endpoint_dir = endpoint_dir
        self._reactor = reactor
        self._reporter = reporter
        self.phase = Phase.STOPPED
        self.started_at: Optional[float] = None
        self._startup: Optional[Deferred[None]] = None
        self._started: List[IService] = []
        self._stop_waiters: List[Deferred[None]] = []
        # twistd builds the service before it daemonizes; a different session
        # at start means the daemon owns a new session (see daemon.json).
        self._session_at_build = os.getsid(0)
        self.drain_grace = drain_grace

    def add(self, service: IService) -> IService:
        """Add a named part; parts start in the order they are added."""
        if not service.name:
            raise ValueError(f"{service!r} needs a name")
        service.setServiceParent(self)
        return service

    # -- the lifecycle ---------------------------------------------------------------

    @_machine.state(initial=True)
    def _idle(self) -> None:
        """Built, not started."""

    @_machine.state()
    def _starting(self) -> None:
        """Starting the parts one after another."""

    @_machine.state()
    def _running(self) -> None:
        """Every part ready."""

    @_machine.state()
    def _failed(self) -> None:
        """A part could not start; the reactor is being stopped."""

    @_machine.state()
    def _draining(self) -> None:
        """Parts that hold work are finishing it."""

    @_machine.state()
    def _stopping(self) -> None:
        """Parts stopping, in reverse order."""

    @_machine.state()
    def _stopped(self) -> None:
        """Everything stopped."""

    @_machine.input()
    def _start(self) -> None:
        """startService."""

    @_machine.input()
    def _parts_ready(self) -> None:
        """Every part started and is ready."""

    @_machine.input()
    def _start_failed(self, failure: Failure) -> None:
        """A part failed to start."""

    @_machine.input()
    def _stop(self, waiter: Deferred[None]) -> None:
        """stopService (``waiter`` fires once stopped)."""

    @_machine.input()
    def _drained(self) -> None:
        """Parts holding work finished it (or the grace passed)."""

    @_machine.input()
    def _parts_stopped(self) -> None:
        """Every started part stopped."""

    @_machine.output()
    def _start_parts(self) -> None:
        self.phase = Phase.STARTING
        self.started_at = time.time()
        session = os.getsid(0)
        self.endpoint_dir.write_daemon_info(
            os.getpid(), session if session != self._session_at_build else None
        )
        self._startup = Deferred.fromCoroutine(self._start_one_by_one())
        self._startup.addCallbacks(lambda _: self._parts_ready(), self._start_failed)

    @_machine.output()
    def _report_ready(self) -> None:
        self.phase = Phase.RUNNING
        self.log.info(
            "Endpoint {name} is ready (pid {pid})", name=self.endpoint_dir.name, pid=os.getpid()
        )
        self._reporter.ready(**self.ready_info())

    @_machine.output()
    def _report_failure(self, failure: Failure) -> None:
        self.phase = Phase.FAILED
        self.fail(*self._explain(failure))

    @_machine.output()
    def _report_unfinished_start(self, failure: Failure) -> None:
        # Stopped (or failed) while starting: whoever started it hears why;
        # the reactor is stopping already.
        message, code = self._explain(failure)
        if exit_status.code == EX_OK:
            exit_status.code = code
        self._reporter.failed(message, code)

    def _explain(self, failure: Failure) -> Tuple[str, int]:
        """The message and exit code of a failed start, logged."""
        if failure.check(CancelledError):
            message, code = "stopped before it was ready", EX_TEMPFAIL
            self.log.info(
                "Endpoint {name} stopped before it was ready", name=self.endpoint_dir.name
            )
        elif failure.check(StartupError):
            error = failure.value
            assert isinstance(error, StartupError)
            message, code = error.message, error.exit_code
            self.log.error(
                "Endpoint {name} failed to start: {message}",
                name=self.endpoint_dir.name,
                message=message,
            )
        else:
            message, code = f"internal error: {failure.getErrorMessage()}", EX_SOFTWARE
            self.log.failure(
                "Endpoint {name} failed to start", failure, name=self.endpoint_dir.name
            )
        return message, code

    @_machine.output()
    def _wait(self, waiter: Deferred[None]) -> None:
        self._stop_waiters.append(waiter)

    @_machine.output()
    def _cancel_startup(self, waiter: Deferred[None]) -> None:
        startup = self._startup
        if startup is not None and not startup.called:
            startup.cancel()

    @_machine.output()
    def _drain_parts(self, waiter: Deferred[None]) -> None:
        self.phase = Phase.STOPPING
        draining = Deferred.fromCoroutine(self._drain_all())
        draining.addBoth(lambda _: self._drained())

    @_machine.output()
    def _stop_parts(self) -> None:
        stopping = Deferred.fromCoroutine(self._stop_in_reverse())
        stopping.addBoth(lambda _: self._parts_stopped())

    @_machine.output()
    def _notify_stopped(self) -> None:
        self.phase = Phase.STOPPED
        self.endpoint_dir.remove_daemon_info()
        self.log.info("Endpoint {name} stopped", name=self.endpoint_dir.name)
        fire_all(self._stop_waiters, None)

    @_machine.output()
    def _already_stopped(self, waiter: Deferred[None]) -> None:
        waiter.callback(None)

    _idle.upon(_start, enter=_starting, outputs=[_start_parts])
    _idle.upon(_stop, enter=_stopped, outputs=[_already_stopped])
    _starting.upon(_parts_ready, enter=_running, outputs=[_report_ready])
    _starting.upon(_start_failed, enter=_failed, outputs=[_report_failure])
    _starting.upon(_stop, enter=_draining, outputs=[_wait, _cancel_startup, _drain_parts])
    _running.upon(_stop, enter=_draining, outputs=[_wait, _drain_parts])
    _failed.upon(_stop, enter=_draining, outputs=[_wait, _drain_parts])
    _draining.upon(_stop, enter=_draining, outputs=[_wait])
    # A cancelled start-up ends once the stop has begun.
    _draining.upon(_start_failed, enter=_draining, outputs=[_report_unfinished_start])
    _draining.upon(_parts_ready, enter=_draining, outputs=[])
    _draining.upon(_drained, enter=_stopping, outputs=[_stop_parts])
    _stopping.upon(_stop, enter=_stopping, outputs=[_wait])
    _stopping.upon(_parts_stopped, enter=_stopped, outputs=[_notify_stopped])
    _stopped.upon(_stop, enter=_stopped, outputs=[_already_stopped])

    def startService(self) -> None:
        Service.startService(self)  # not MultiService's: we start children ourselves
        self._start()

    def stopService(self) -> Deferred[None]:
        """Drain, then stop every part in reverse order; a new Deferred each call."""
        Service.stopService(self)
        waiter: Deferred[None] = Deferred()
        self._stop(waiter)
        return waiter

    async def _start_one_by_one(self) -> None:
        for part in list(self):
            self.log.debug("Starting {part}", part=part.name)
            self._started.append(part)
            await maybeDeferred(part.startService)
            if IReadyPart.providedBy(part):
                await part.when_ready()

    def ready_info(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {"pid": os.getpid(), "name": self.endpoint_dir.name}
        for part in self:
            if IReadyPart.providedBy(part):
                info.update(part.ready_info())
        return info

    def fail(self, message: str, exit_code: int) -> None:
        """Stop the whole daemon because of an unrecoverable error."""
        if exit_status.code == EX_OK:
            exit_status.code = exit_code
        self._reporter.failed(message, exit_code)
        if self._reactor.running:
            self._reactor.stop()
        else:
            # twistd starts services before the reactor runs: stop it as soon
            # as it does, so a daemon that failed never lingers.
            self._reactor.callWhenRunning(self._reactor.stop)

    def shut_down(self, reason: str) -> None:
        """Stop the daemon cleanly, as ``funcx-endpoint stop`` does (drain, then
        stop the parts), because of ``reason``; it exits with code 0."""
        self.log.info(
            "Endpoint {name} is shutting down: {reason}", name=self.endpoint_dir.name, reason=reason
        )
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    async def _drain_all(self) -> None:
        """Let parts that hold work finish it (stop taking tasks, release those
        not started, wait for running ones)."""
        for part in list(self._started):
            if IDrainingPart.providedBy(part) and part.running:
                try:
                    await part.drain(self.drain_grace)
                except Exception:
                    self.log.failure("Error while draining {part}", part=part.name)

    async def _stop_in_reverse(self) -> None:
        while self._started:
            part = self._started.pop()
            if not part.running:
                continue
            self.log.debug("Stopping {part}", part=part.name)
            try:
                await maybeDeferred(part.stopService)
            except Exception:
                self.log.failure("Error while stopping {part}", part=part.name)

    async def status(self) -> Dict[str, Any]:
        """Live details for ``funcx-endpoint status``."""
        now = time.time()
        result: Dict[str, Any] = {
            "name": self.endpoint_dir.name,
            "pid": os.getpid(),
            "phase": self.phase.value,
            "uptime": round(now - self.started_at, 3) if self.started_at else 0.0,
        }
        for part in self:
            if IStatusPart.providedBy(part) and part.running:
                result.update(await maybeDeferred(part.status_fields))
        return result
