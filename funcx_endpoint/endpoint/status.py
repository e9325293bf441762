"""Status reports to the service: at start, every heartbeat period, and a final one.

A report (PROTOCOL.md section 4, ``ep_status_report``) carries the counts
the daemon knows (managers, workers, pending and outstanding tasks, plus the
transport's) and the task state transitions recorded since the last report.
The last report, sent on a clean stop, says ``heartbeat_period: 0`` so the
service shows the endpoint offline at once.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from funcx_endpoint.executor.interface import IInterchange
from funcx_endpoint.lifecycle import IStatusPart, start_loop, stop_loop
from funcx_endpoint.wire import EPStatusReport, TaskTransition

Publish = Callable[[EPStatusReport], Deferred]


@attr.s(auto_attribs=True, eq=False, repr=False)
@implementer(IStatusPart)
class StatusReporter(Service):
    """Sends an :class:`EPStatusReport` every ``period`` seconds of ``clock``, and a
    final one on stop (given ``final_timeout`` seconds).

    ``endpoint_id()`` names the endpoint, ``interchange`` gives the counts and
    the task transitions, ``extra()`` more counts; ``publish(report)`` sends it.
    """

    log = Logger()
    name = "status"

    _clock: Any
    _endpoint_id: Callable[[], str]
    _interchange: IInterchange
    _publish: Publish
    period: float
    _extra: Optional[Callable[[], Dict[str, Any]]] = None
    _final_timeout: float = 5.0
    _loop: Optional[LoopingCall] = attr.ib(default=None, init=False)
    sent: int = attr.ib(default=0, init=False)
    failed: int = attr.ib(default=0, init=False)

    def global_state(self) -> Dict[str, Any]:
        state = dict(self._interchange.status())
        if self._extra is not None:
            state.update(self._extra())
        state["heartbeat_period"] = self.period
        return state

    def _report(self, final: bool = False) -> EPStatusReport:
        transitions: Dict[str, List[TaskTransition]] = self._interchange.pop_transitions()
        if final:
            state = {
                "heartbeat_period": 0,
                **{k: v for k, v in self.global_state().items() if k != "heartbeat_period"},
            }
        else:
            state = self.global_state()
        return EPStatusReport(self._endpoint_id(), state, transitions)

    def send(self, final: bool = False) -> Deferred[None]:
        """Send one report; failures are logged, not raised."""
        report = self._report(final)
        d = self._publish(report)

        def sent(_: Any) -> None:
            self.sent += 1

        def failed(failure: Failure) -> None:
            self.failed += 1
            self.log.info("Status report not delivered: {error}", error=failure.getErrorMessage())

        return d.addCallbacks(sent, failed)

    def startService(self) -> None:
        super().startService()
        self._loop = start_loop(self.send, self._clock, self.period, now=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stop_loop(self._loop)
        d = self.send(final=True)
        # Don't let a broker that is away hold the stop up.
        timer = self._clock.callLater(self._final_timeout, d.cancel)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()

        d.addBoth(done)
        d.addErrback(lambda f: None)
        return d

    def status_fields(self) -> Dict[str, Any]:
        return {"status_reports_sent": self.sent}
