"""Back-off for failed logins (:mod:`funcx_endpoint.webservice.ratelimit`), on a Clock."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.testing.inprocess import FUNCX_SCOPE, InProcessService
from funcx_endpoint.webservice.http import APIError
from funcx_endpoint.webservice.ratelimit import LoginGuard, LoginLimits


class Checks:
    """Secret checks a test answers: each call is recorded and waits for the test."""

    def __init__(self) -> None:
        self.pending: List[Deferred[bool]] = []
        self.calls = 0

    def __call__(self) -> Deferred[bool]:
        self.calls += 1
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        return d


class LoginGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        # Refusals at once (the delay is tested on its own).
        self.guard = LoginGuard(self.clock, LoginLimits(refusal_delay=0, suspect_interval=0))

    def attempt(self, ok: bool, client: str = "c", address: str = "10.0.0.1") -> Any:
        """``True``/``False``: the check ran and said so; an APIError: refused before it."""
        d = Deferred.fromCoroutine(self.guard.check(client, address, lambda: succeed(ok)))
        result: List[Any] = []
        d.addCallbacks(result.append, lambda f: result.append(f.trap(APIError) and f.value))
        self.assertEqual(len(result), 1)
        return result[0]

    def assert_refused(self, outcome: Any, retry_after: int) -> None:
        self.assertIsInstance(outcome, APIError)
        self.assertEqual(outcome.status, 429)
        self.assertEqual(outcome.headers["Retry-After"], str(retry_after))
        self.assertEqual(outcome.extra["error"], "slow_down")

    def test_backoff_doubles_after_free_failures(self) -> None:
        for _ in range(5):
            self.assertIs(self.attempt(False), False)
        self.assert_refused(self.attempt(False), 1)
        self.clock.advance(1.0)
        self.assertIs(self.attempt(False), False)
        self.assert_refused(self.attempt(True), 2)
        self.clock.advance(2.0)
        self.assertIs(self.attempt(False), False)
        self.assert_refused(self.attempt(True), 4)
        self.assertEqual(self.guard.refused["blocked"], 3)

    def test_delay_is_capped(self) -> None:
        """The delay doubles up to max_delay (with decay, a steady attacker settles at
        about one attempt per decay period: tested with a slow decay here)."""
        self.guard = LoginGuard(
            self.clock, LoginLimits(decay=1e9, refusal_delay=0, suspect_interval=0)
        )
        waits = []
        for _ in range(40):
            outcome = self.attempt(False)
            if isinstance(outcome, APIError):
                waits.append(int(outcome.headers["Retry-After"]))
                self.clock.advance(waits[-1])
        self.assertEqual(waits[:5], [1, 2, 4, 8, 16])
        self.assertEqual(max(waits), 300)

    def test_failures_decay(self) -> None:
        for _ in range(5):
            self.attempt(False)
        self.clock.advance(60.0)  # one failure forgiven: one free attempt again
        self.assertIs(self.attempt(False), False)
        self.assertIsInstance(self.attempt(False), APIError)

    def test_success_clears_the_pair(self) -> None:
        for _ in range(4):
            self.attempt(False)
        self.assertIs(self.attempt(True), True)
        for _ in range(5):
            self.assertIs(self.attempt(False), False)

    def test_brute_force_on_a_client_spares_its_trusted_owner(self) -> None:
        """Failures for a client id from many addresses block new addresses, not
        the address it logged in from before."""
        self.assertIs(self.attempt(True, "victim", "10.0.0.1"), True)
        for n in range(10):
            self.assertIs(self.attempt(False, "victim", f"10.9.0.{n}"), False)
        self.assert_refused(self.attempt(False, "victim", "10.9.1.1"), 1)
        self.assert_refused(self.attempt(True, "victim", "10.0.0.2"), 1)
        self.assertIs(self.attempt(True, "victim", "10.0.0.1"), True)
        self.assertTrue(self.guard.trusted("victim", "10.0.0.1"))
        self.clock.advance(LoginLimits().trusted_for + 1)
        self.assertFalse(self.guard.trusted("victim", "10.0.0.1"))

    def test_one_address_guessing_many_clients(self) -> None:
        for n in range(20):
            self.assertIs(self.attempt(False, f"client-{n}", "10.6.6.6"), False)
        self.assert_refused(self.attempt(False, "client-x", "10.6.6.6"), 1)
        self.assertIs(self.attempt(True, "client-x", "10.0.0.7"), True)

    def suspects(self, count: int, prefix: str = "10.1.0.") -> list[str]:
        """Addresses with one failure each (their checks go through the queue)."""
        addresses = [f"{prefix}{n}" for n in range(count)]
        for address in addresses:
            self.assertIs(self.attempt(False, "someone", address), False)
        return addresses

    def test_suspect_checks_one_at_a_time_others_not_held(self) -> None:
        self.assertIs(self.attempt(True, "owner", "10.0.0.1"), True)
        checks = Checks()
        waiting = [
            Deferred.fromCoroutine(self.guard.check(f"x{n}", address, checks))
            for n, address in enumerate(self.suspects(3))
        ]
        self.assertEqual(checks.calls, 1)
        # A trusted pair, and a new client at a clean address: not queued behind them.
        trusted_check, clean_check = Checks(), Checks()
        owner = Deferred.fromCoroutine(self.guard.check("owner", "10.0.0.1", trusted_check))
        new = Deferred.fromCoroutine(self.guard.check("new", "10.7.0.1", clean_check))
        self.assertEqual((trusted_check.calls, clean_check.calls), (1, 1))
        # ... but a second check from that clean address at the same time is.
        second = Checks()
        Deferred.fromCoroutine(self.guard.check("new2", "10.7.0.1", second))
        self.assertEqual(second.calls, 0)
        trusted_check.pending[0].callback(True)
        clean_check.pending[0].callback(True)
        self.assertEqual([self.successResultOf(d) for d in (owner, new)], [True, True])
        checks.pending[0].callback(False)
        self.assertEqual(checks.calls, 2)
        checks.pending[1].callback(False)
        checks.pending[2].callback(False)
        self.assertEqual([self.successResultOf(d) for d in waiting], [False] * 3)
        self.assertEqual(second.calls, 1)
        second.pending[0].callback(False)
        self.assertEqual(self.guard._running, 0)

    def test_failures_of_an_address_decay_to_clean(self) -> None:
        [address] = self.suspects(1)
        checks = Checks()
        Deferred.fromCoroutine(self.guard.check("a", "10.9.9.9", checks))  # holds the queue
        d = Deferred.fromCoroutine(self.guard.check("b", address, Checks()))
        self.assertNoResult(d)  # queued
        self.clock.advance(60.0)
        c = Checks()
        Deferred.fromCoroutine(self.guard.check("b", address, c))
        self.assertEqual(c.calls, 1)  # clean again: at once
        c.pending[0].callback(True)
        checks.pending[0].callback(True)

    def test_suspect_checks_are_paced(self) -> None:
        """Suspect checks start suspect_interval (0.2 s) apart: at most 5 scrypts a
        second for all of an attack."""
        self.guard = LoginGuard(self.clock, LoginLimits(refusal_delay=0))
        addresses = self.suspects(3)  # the first of these ran as clean ones
        checks = Checks()
        for n, address in enumerate(addresses):
            Deferred.fromCoroutine(self.guard.check(f"x{n}", address, checks))
        self.assertEqual(checks.calls, 1)
        checks.pending[0].callback(False)  # done at once: the next waits its turn
        self.assertEqual(checks.calls, 1)
        self.clock.advance(0.2)
        self.assertEqual(checks.calls, 2)
        self.clock.advance(1.0)
        checks.pending[1].callback(False)
        self.assertEqual(checks.calls, 3)  # long since the last start: at once
        checks.pending[2].callback(False)

    def test_queue_of_suspect_checks_is_bounded(self) -> None:
        guard = self.guard = LoginGuard(
            self.clock, LoginLimits(untrusted_queue=2, refusal_delay=0, suspect_interval=0)
        )
        addresses = self.suspects(4, "10.2.0.")
        checks = Checks()
        for n, address in enumerate(addresses[:3]):
            Deferred.fromCoroutine(guard.check(f"x{n}", address, checks))
        self.assertEqual(checks.calls, 1)  # one running, two waiting
        self.assert_refused(self.attempt(False, "y", addresses[3]), 1)
        self.assertEqual(guard.refused["busy"], 1)
        while len(checks.pending) < 3 or not checks.pending[-1].called:
            checks.pending[-1].callback(False)
        self.assertEqual(guard._running, 0)

    def test_refusals_are_held_back(self) -> None:
        """A refusal comes after refusal_delay (1 s), never later than the wait it
        announces; the Retry-After it then gives is what is left of the wait."""
        self.guard = LoginGuard(self.clock, LoginLimits(suspect_interval=0))
        for _ in range(5):
            self.assertIs(self.attempt(False), False)
        for _ in range(2):
            self.clock.advance(8)  # past the 1 s, then the 2 s block
            self.assertIs(self.attempt(False), False)
        # Blocked for 4 s now (decayed a little): refused 1 s later, with 3 s left.
        d = Deferred.fromCoroutine(self.guard.check("c", "10.0.0.1", lambda: succeed(True)))
        self.assertNoResult(d)
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        error = self.failureResultOf(d, APIError).value
        self.assertEqual((error.status, error.headers["Retry-After"]), (429, "3"))
        # Less than the delay left: the refusal comes when the block ends.
        self.clock.advance(2.5)
        d = Deferred.fromCoroutine(self.guard.check("c", "10.0.0.1", lambda: succeed(True)))
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertEqual(self.failureResultOf(d, APIError).value.headers["Retry-After"], "1")
        self.assertIs(self.attempt(True), True)

    def test_memory_is_bounded(self) -> None:
        guard = self.guard = LoginGuard(
            self.clock, LoginLimits(max_keys=50, refusal_delay=0, suspect_interval=0)
        )
        for n in range(500):
            self.attempt(False, f"c{n}", f"10.3.{n // 250}.{n % 250}")
            self.attempt(True, f"c{n}", f"10.3.{n // 250}.{n % 250}")
        self.assertLessEqual(len(guard._counts._counts), 50)
        self.assertLessEqual(len(guard._trusted), 50)


class TokenCallTests(SynchronousTestCase):
    """The token call through the real API: 429 with Retry-After, and no secret check."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.service = InProcessService(self.mktemp(), self.clock)
        self.service.startService()
        self.addCleanup(lambda: self.successResultOf(self.service.stopService()))
        self.http: Any = StubTreq(self.service.resource())

    def token(self, client_id: str, secret: str) -> Tuple[int, Dict[str, Any], Any]:
        d = self.http.post(
            "https://funcx.example/v2/oauth2/token",
            auth=(client_id, secret),
            data={"grant_type": "client_credentials", "scope": FUNCX_SCOPE},
        )
        self.http.flush()
        self.clock.advance(0.2)  # checks after a failure are paced
        self.http.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.http.json_content(response))
        return response.code, body, response.headers

    def test_wrong_secrets_back_off(self) -> None:
        client_id, secret = self.service.add_client()
        for _ in range(5):
            code, body, _ = self.token(client_id, "wrong")
            self.assertEqual((code, body["error"]), (401, "invalid_client"))
        d = self.http.post(
            "https://funcx.example/v2/oauth2/token",
            auth=(client_id, secret),
            data={"grant_type": "client_credentials", "scope": FUNCX_SCOPE},
        )
        self.http.flush()
        self.assertNoResult(d)  # held back for a second
        self.clock.advance(1.0)
        self.http.flush()
        response = self.successResultOf(d)
        code, headers = response.code, response.headers
        body = self.successResultOf(self.http.json_content(response))
        self.assertEqual(
            (code, body["code"], body["error"]), (429, "TOO_MANY_REQUESTS", "slow_down")
        )
        self.assertEqual(headers.getRawHeaders("retry-after"), ["1"])
        self.assertIn("try again in 1 s", body["message"])
        code, body, _ = self.token(client_id, secret)
        self.assertEqual(code, 200, body)
