"""The small helpers that several modules share: Deferreds, first connections,
ids asked for in chunks, and the test harness's shared instances."""

from __future__ import annotations

import sqlite3
from typing import Any, List

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.amqp.connection import AMQPError, connected_or_refused
from funcx_endpoint.batching import TurnBatch
from funcx_endpoint.observer import fire_all, fresh_result
from funcx_endpoint.testing.shared import SharedInstance
from funcx_endpoint.webservice.db import CHUNK, Dialect, Tx


class FreshResultTests(SynchronousTestCase):
    def test_result_reaches_both_chains(self) -> None:
        d: Deferred[int] = Deferred()
        fresh = fresh_result(d)
        fresh.addCallback(lambda n: n * 10)  # changes only the fresh chain
        d.callback(4)
        self.assertEqual(self.successResultOf(fresh), 40)
        self.assertEqual(self.successResultOf(d), 4)

    def test_each_call_is_fresh(self) -> None:
        d: Deferred[int] = Deferred()
        first, second = fresh_result(d), fresh_result(d)
        self.assertIsNot(first, second)
        self.assertNoResult(first)
        d.callback(1)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (1, 1))

    def test_failure_reaches_both_chains(self) -> None:
        d: Deferred[int] = Deferred()
        fresh = fresh_result(d)
        d.errback(ValueError("boom"))
        self.failureResultOf(fresh, ValueError)
        self.failureResultOf(d, ValueError)


class FireAllTests(SynchronousTestCase):
    def test_fires_each_and_empties_the_list_first(self) -> None:
        waiters: List[Deferred[int]] = [Deferred(), Deferred()]
        first, second = waiters
        # A callback may wait for the next event: that waiter is not fired now.
        waiter_for_next: Deferred[int] = Deferred()

        def wait_again(n: int) -> int:
            waiters.append(waiter_for_next)
            return n

        first.addCallback(wait_again)
        fire_all(waiters, 3)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (3, 3))
        self.assertEqual(waiters, [waiter_for_next])
        self.assertNoResult(waiter_for_next)

    def test_a_failure_fires_the_errbacks(self) -> None:
        waiters: List[Deferred[None]] = [Deferred(), Deferred()]
        fired = list(waiters)
        fire_all(waiters, Failure(ValueError("boom")))
        for d in fired:
            self.failureResultOf(d, ValueError)
        self.assertEqual(waiters, [])


class TurnBatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.handled: List[List[int]] = []
        self.batch: TurnBatch[int] = TurnBatch(self.clock, self.handled.append)
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def test_one_turn_is_handled_together_at_its_end(self) -> None:
        self.batch.add(1)
        self.batch.extend([2, 3])
        self.assertEqual((self.handled, len(self.batch)), ([], 3))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual((self.handled, len(self.batch)), ([[1, 2, 3]], 0))
        self.batch.add(4)
        self.clock.advance(0)
        self.assertEqual(self.handled, [[1, 2, 3], [4]])

    def test_items_taken_back_are_not_handled(self) -> None:
        self.batch.extend([1, 2])
        self.assertEqual(self.batch.take(), [1, 2])
        self.clock.advance(0)
        self.assertEqual(self.handled, [])


class ConnectedOrRefusedTests(SynchronousTestCase):
    def refused(self, error: AMQPError) -> Exception:
        return RuntimeError(f"refused: {error.message}")

    def test_connected_first(self) -> None:
        connected: Deferred[Any] = Deferred()
        fatal: Deferred[AMQPError] = Deferred()
        ready = connected_or_refused(connected, [fatal], self.refused)
        self.assertNoResult(ready)
        connected.callback("client")
        self.assertIsNone(self.successResultOf(ready))
        fatal.callback(AMQPError("too late"))  # after being up: no effect
        self.assertIsNone(self.successResultOf(ready))

    def test_fatal_first(self) -> None:
        connected: Deferred[Any] = Deferred()
        fatal: List[Deferred[AMQPError]] = [Deferred(), Deferred()]
        ready = connected_or_refused(connected, fatal, self.refused)
        fatal[1].callback(AMQPError("no login", 403, fatal=True))
        failure = self.failureResultOf(ready, RuntimeError)
        self.assertEqual(str(failure.value), "refused: no login")
        connected.callback("client")
        fatal[0].callback(AMQPError("second"))

    def test_failed_connected_is_left_to_fatal(self) -> None:
        connected: Deferred[Any] = Deferred()
        fatal: Deferred[AMQPError] = Deferred()
        ready = connected_or_refused(connected, [fatal], self.refused)
        connected.errback(Failure(RuntimeError("stopped")))
        self.assertNoResult(ready)
        fatal.callback(AMQPError("gone"))
        self.failureResultOf(ready, RuntimeError)


class TxChunkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.connection = sqlite3.connect(":memory:")
        self.addCleanup(self.connection.close)
        self.tx = Tx(self.connection.cursor(), Dialect("sqlite"))
        self.tx.execute("CREATE TABLE t (id TEXT PRIMARY KEY, owner TEXT, n INTEGER)")
        self.ids = [f"id{i}" for i in range(2 * CHUNK + 7)]
        self.tx.executemany(
            "INSERT INTO t (id, owner, n) VALUES (?, ?, 0)",
            [(i, "alice" if k % 2 else "bob") for k, i in enumerate(self.ids)],
        )

    def test_rows_in_asks_in_chunks_with_parameters_after(self) -> None:
        rows = self.tx.rows_in(
            "SELECT id FROM t WHERE id IN ({ids}) AND owner = ?", self.ids, "bob"
        )
        self.assertEqual(sorted(r[0] for r in rows), sorted(self.ids[0::2]))
        self.assertEqual(self.tx.rows_in("SELECT id FROM t WHERE id IN ({ids})", []), [])

    def test_execute_in_counts_changed_rows(self) -> None:
        changed = self.tx.execute_in("UPDATE t SET n = 1 WHERE id IN ({ids})", self.ids[1:])
        self.assertEqual(changed, len(self.ids) - 1)

    def test_changes(self) -> None:
        self.assertTrue(self.tx.changes("UPDATE t SET n = 2 WHERE id = ?", ("id0",)))
        self.assertFalse(self.tx.changes("UPDATE t SET n = 2 WHERE id = ?", ("nope",)))


class SharedInstanceTests(SynchronousTestCase):
    def test_made_once_started_at_every_use_stopped_on_demand(self) -> None:
        events: List[str] = []
        made: List[object] = []

        def make() -> object:
            made.append(object())
            return made[-1]

        shared: SharedInstance[object] = SharedInstance(
            make,
            lambda it: events.append("start"),
            lambda it: events.append("stop"),
            prepare=lambda: events.append("prepare"),
            stop_at_exit=False,
        )
        self.assertIsNone(shared.current)
        first = shared.get()
        self.assertIs(shared.get(), first)
        self.assertIs(shared.current, first)
        self.assertEqual(events, ["prepare", "start", "prepare", "start"])
        shared.stop()
        self.assertIsNone(shared.current)
        self.assertEqual(events[-1], "stop")
        self.assertIsNot(shared.get(), first)
        self.assertEqual(len(made), 2)

    def test_get_async_prepares_in_the_callers_thread(self) -> None:
        prepared: List[str] = []
        test = self

        class Pool:
            """Runs the "thread" call at once, after checking what was prepared."""

            def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any) -> None:
                test.assertEqual(prepared, ["caller"])
                on_result(True, f(*args))

        class Reactor:
            def getThreadPool(self) -> Pool:
                return Pool()

            def callFromThread(self, f: Any, *args: Any) -> None:
                f(*args)

        shared: SharedInstance[int] = SharedInstance(
            lambda: 7,
            lambda it: None,
            lambda it: None,
            prepare=lambda: prepared.append("thread" if prepared else "caller"),
            stop_at_exit=False,
        )
        self.assertEqual(self.successResultOf(shared.get_async(Reactor())), 7)
        self.assertEqual(prepared, ["caller", "thread"])
