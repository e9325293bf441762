"""lifecycle.PeriodicService: calls on the clock while running, a failure ends them;
lifecycle.cancel_call."""

from __future__ import annotations

from typing import List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.lifecycle import PeriodicService, cancel_call


class Counting(PeriodicService):
    stopped_message = "The counting check stopped"

    def __init__(self, clock: Clock, interval: float, fail_at: int = 0) -> None:
        self._clock = clock
        self.interval = interval
        self.fail_at = fail_at
        self.calls: List[float] = []

    def check(self) -> None:
        self.calls.append(self._clock.seconds())
        if len(self.calls) == self.fail_at:
            raise RuntimeError("check failed")


class PeriodicServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def test_calls_every_interval_from_one_interval_after_start(self) -> None:
        service = Counting(self.clock, 2.0)
        service.startService()
        self.assertEqual(service.calls, [])
        self.clock.advance(2.0)
        self.clock.advance(2.0)
        self.assertEqual(service.calls, [2.0, 4.0])
        service.stopService()
        self.clock.advance(10.0)
        self.assertEqual(service.calls, [2.0, 4.0])

    def test_failure_is_logged_once_and_ends_the_calls(self) -> None:
        service = Counting(self.clock, 1.0, fail_at=2)
        service.startService()
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        [failure] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(failure.value), "check failed")
        self.clock.advance(5.0)
        self.assertEqual(service.calls, [1.0, 2.0])
        service.stopService()  # after the loop ended on its own: nothing to stop


class CancelCallTests(SynchronousTestCase):
    def test_cancels_a_pending_call_and_passes_over_the_rest(self) -> None:
        clock = Clock()
        called: List[str] = []
        pending = clock.callLater(1.0, called.append, "pending")
        done = clock.callLater(0.5, called.append, "done")
        clock.advance(0.5)
        cancel_call(pending)
        cancel_call(done)  # already called: not active, nothing to do
        cancel_call(pending)  # already cancelled
        cancel_call(None)
        clock.advance(5.0)
        self.assertEqual(called, ["done"])
        self.assertEqual(clock.getDelayedCalls(), [])
