"""The endpoint daemon's service tree and its lifecycle.

:class:`EndpointService` is a ``MultiService`` whose children are the parts of
the daemon, in the order they start::

    control       local control socket (status)
    registration  registers with the web service, learns the broker URLs
    interchange   dispatches tasks to managers, collects results
    providers     starts and scales blocks of managers
    amqp          task consumer and result publisher (AMQPS)
    status        periodic status reports to the service

(the order ``tap.build_endpoint`` adds them in: the interchange must listen
before managers start, and both before tasks arrive).  Unlike a plain
``MultiService`` it starts them one after another, waiting for each to be
ready (a child may offer ``when_ready()``).  To stop, it first lets parts that
hold work drain (``drain(grace)``: the transport stops taking tasks, releases
those not started and waits for running ones), then stops the parts in
reverse order, waiting for each to finish (processes included).  When all are ready

it tells whoever started it (a :class:`~funcx_endpoint.lifecycle.StartupReporter`);
when one fails to start, it reports the failure with an exit code and stops
the reactor.

"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

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
    Phase,
    StartupError,
    StartupReporter,
    exit_status,
)

# Re-exported for the endpoint's parts and tests.
__all__ = ["EndpointService", "Phase", "StartupError", "StartupReporter", "exit_status"]


class EndpointService(MultiService):
    """The daemon: its parts started in order and stopped in reverse."""

    log = Logger()

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

    def startService(self) -> None:
        Service.startService(self)  # not MultiService's: we start children ourselves
        self.phase = Phase.STARTING
        self.started_at = time.time()
        session = os.getsid(0)
        self.endpoint_dir.write_daemon_info(
            os.getpid(), session if session != self._session_at_build else None
        )
        self._startup = Deferred.fromCoroutine(self._start_parts())
        self._startup.addErrback(self._startup_failed)

    async def _start_parts(self) -> None:
        for part in list(self):
            if not self.running:
                return
            self.log.debug("Starting {part}", part=part.name)
            self._started.append(part)
            await maybeDeferred(part.startService)
            when_ready = getattr(part, "when_ready", None)
            if when_ready is not None:
                await when_ready()
        self.phase = Phase.RUNNING
        info = self.ready_info()
        self.log.info(
            "Endpoint {name} is ready (pid {pid})", name=self.endpoint_dir.name, pid=os.getpid()
        )
        self._reporter.ready(**info)

    def ready_info(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {"pid": os.getpid(), "name": self.endpoint_dir.name}
        for part in self:
            extra = getattr(part, "ready_info", None)
            if extra is not None:
                info.update(extra())
        return info

    def _startup_failed(self, failure: Failure) -> None:
        self.phase = Phase.FAILED
        if failure.check(CancelledError) and not self.running:
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
        self.fail(message, code)

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

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.phase = Phase.STOPPING
        return Deferred.fromCoroutine(self._stop_parts())

    async def _stop_parts(self) -> None:
        if self._startup is not None and not self._startup.called:
            self._startup.cancel()
        # First let parts that hold work finish it (stop taking tasks, release
        # those not started, wait for running ones), then stop in reverse.
        for part in list(self._started):
            drain = getattr(part, "drain", None)
            if drain is not None and part.running:
                try:
                    await drain(self.drain_grace)
                except Exception:
                    self.log.failure("Error while draining {part}", part=part.name)
        while self._started:
            part = self._started.pop()
            if not part.running:
                continue
            self.log.debug("Stopping {part}", part=part.name)
            try:
                await maybeDeferred(part.stopService)
            except Exception:
                self.log.failure("Error while stopping {part}", part=part.name)
        self.phase = Phase.STOPPED
        self.endpoint_dir.remove_daemon_info()
        self.log.info("Endpoint {name} stopped", name=self.endpoint_dir.name)

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
            fields = getattr(part, "status_fields", None)
            if fields is not None and part.running:
                result.update(await maybeDeferred(fields))
        return result
