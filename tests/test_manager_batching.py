"""The manager's result batching rule (funcx_endpoint.manager.batching), by numbers."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.manager.batching import MAX_HOLD, ResultBatching


class ResultBatchingTests(SynchronousTestCase):
    def stream(self, batching: ResultBatching, rate: float, seconds: float) -> float:
        """Results arriving at ``rate`` per second for ``seconds`` (the meter learns it)."""
        now = 0.0
        while now < seconds:
            batching.result_ready(now, 0, 2, 0.001)
            now += 1 / rate
        return now

    def test_at_once_when_the_workers_will_wait(self) -> None:
        batching = ResultBatching()
        batching.last_batch = 10.0
        self.assertEqual(batching.result_ready(10.0005, 1, 2, 0.001), 0.0)

    def test_interval_before_the_rate_is_known(self) -> None:
        batching = ResultBatching()
        batching.last_batch = 10.0
        self.assertAlmostEqual(batching.result_ready(10.0002, 50, 2, 0.001), 0.0008)

    def test_deep_queue_of_short_tasks_waits_longer(self) -> None:
        batching = ResultBatching()
        now = self.stream(batching, 5000.0, 0.5)  # 5,000 results/s
        batching.last_batch = now
        # 48 queued beyond the workers last 9.6 ms: half of it, 4.8 ms.
        self.assertAlmostEqual(batching.result_ready(now, 50, 2, 0.001), 0.0048, places=4)
        # A deeper queue: at most MAX_HOLD intervals.
        self.assertAlmostEqual(
            batching.result_ready(now, 500, 2, 0.001), MAX_HOLD * 0.001, places=6
        )
        # A shallow one: never less than the interval.
        self.assertAlmostEqual(batching.result_ready(now, 3, 2, 0.001), 0.001, places=6)

    def test_long_tasks_wait_the_interval_only_after_a_quiet_period(self) -> None:
        batching = ResultBatching()
        now = self.stream(batching, 2.0, 5.0)  # 2 results/s: queues last long
        batching.last_batch = now - 1.0  # the previous batch went a second ago
        self.assertEqual(batching.result_ready(now, 10, 2, 0.001), 0.0)
