"""The chaos suite's schedule, stream and accounting, on a fake SDK client."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any, Dict, List, Sequence

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.sdk.errors import TaskExecutionFailed
from funcx_endpoint.testing.chaos import (
    FAULTS,
    ChaosResult,
    FaultReport,
    _account,
    _Stream,
    format_report,
    record_run,
    schedule,
)


class ScheduleTests(SynchronousTestCase):
    def test_every_fault_once_per_round_in_a_seeded_order(self) -> None:
        plan = schedule(7, 10_000, rounds=2)
        names = [name for _, _, name in plan]
        self.assertEqual(sorted(names), sorted(list(FAULTS) * 2))
        self.assertEqual(plan, schedule(7, 10_000, rounds=2))
        self.assertNotEqual(names, [name for _, _, name in schedule(8, 10_000, rounds=2)])

    def test_strikes_before_its_gate_and_after_the_gate_before(self) -> None:
        plan = schedule(3, 4000)
        previous_gate = 0
        for strike, gate, _ in plan:
            self.assertLessEqual(strike, gate)
            self.assertGreaterEqual(strike, previous_gate)
            previous_gate = gate
        self.assertLess(previous_gate, 4000)
        # A quiet first slot.
        self.assertGreaterEqual(plan[0][0], 4000 // (len(FAULTS) + 1))


class FakeBatch:
    def __init__(self) -> None:
        self.items: List[tuple] = []

    def add(self, *args: Any, endpoint_id: str, function_id: str) -> None:
        self.items.append(args)


class FakeClient:
    """Runs record_run at submit time; answers what ``answers`` says."""

    def __init__(self, world: World) -> None:
        self.world = world

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    def batch_run(self, batch: FakeBatch) -> List[str]:
        world = self.world
        if world.fail_submits:
            world.fail_submits -= 1
            raise ConnectionError("service down")
        ids = []
        for log_dir, n in batch.items:
            task_id = f"task-{len(world.tasks)}"
            world.tasks[task_id] = n
            record_run(log_dir, n)
            ids.append(task_id)
        return ids

    def fetch_task_records(self, ids: Sequence[str]) -> Dict[str, Any]:
        world = self.world
        world.fetches += 1
        found = {}
        for task_id in ids:
            if task_id in world.unknown:
                continue
            n = world.tasks[task_id]
            if task_id in world.pending:
                found[task_id] = {"task_id": task_id, "status": "running", "pending": True}
            elif task_id in world.errors:
                found[task_id] = {
                    "task_id": task_id,
                    "status": "failed",
                    "pending": False,
                    "exception": TaskExecutionFailed("x", error_code=world.errors[task_id]),
                }
            else:
                result = world.results.get(task_id, 2 * n + 1)
                found[task_id] = {
                    "task_id": task_id,
                    "status": "success",
                    "pending": False,
                    "result": result,
                }
        return found

    def close(self) -> None:
        pass


class World:
    def __init__(self) -> None:
        self.tasks: Dict[str, int] = {}
        self.pending: set[str] = set()
        self.unknown: set[str] = set()
        self.errors: Dict[str, str] = {}
        self.results: Dict[str, int] = {}
        self.fail_submits = 0
        self.fetches = 0


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log_dir = tempfile.mkdtemp(prefix="chaos-units-")
        self.world = World()

    def stream(self, tasks: int, gates: Sequence[int] = (), window: int = 10) -> _Stream:
        stream = _Stream(
            lambda: FakeClient(self.world),
            "endpoint",
            self.log_dir,
            tasks=tasks,
            window=window,
            batch=4,
            gates=gates,
            progress=lambda message: None,
        )
        stream.function_id = "function"
        return stream

    def run_stream(self, stream: _Stream) -> None:
        stream.submit_loop()
        stream.poll_loop(interval=0)

    def collect(self, stream: _Stream) -> None:
        """One round of polling: the answers there are now."""
        records = FakeClient(self.world).fetch_task_records(list(stream.pending))
        for task_id, record in records.items():
            if not record.get("pending"):
                task = stream.pending.pop(task_id)
                task.record = record
                task.answered = time.monotonic()

    def account(self, stream: _Stream) -> ChaosResult:
        return _account(stream, lambda: FakeClient(self.world), self.log_dir, 1, 7, 1.0, "tmpfs")

    def test_record_run_notes_each_run(self) -> None:
        self.assertEqual(record_run(self.log_dir, 5), 11)
        record_run(self.log_dir, 5)
        with open(os.path.join(self.log_dir, f"runs-{os.getpid()}")) as f:
            self.assertEqual(f.read(), "5\n5\n")

    def test_clean_stream(self) -> None:
        stream = self.stream(7)
        self.run_stream(stream)
        result = self.account(stream)
        (none,) = result.faults
        self.assertEqual((none.submitted, none.answered), (7, 7))
        self.assertEqual(result.total("lost") + result.total("duplicates"), 0)
        self.assertEqual(result.total("hung") + result.total("run_twice"), 0)

    def test_a_failed_submit_is_counted_and_made_again(self) -> None:
        self.world.fail_submits = 1
        stream = self.stream(3)
        # Without sleeping half a second: the retry's pause is not what is tested.
        import funcx_endpoint.testing.chaos as chaos

        self.patch(chaos.time, "sleep", lambda seconds: None)
        self.run_stream(stream)
        self.assertEqual(stream.client_errors, {"submit: ConnectionError": 1})
        # Under the fault of the moment too (none yet).
        self.assertEqual(stream.reports[0].errors, {"client submit: ConnectionError": 1})
        self.assertEqual(stream.submitted, 3)

    def test_the_submitter_waits_at_a_gate_until_the_fault_strikes(self) -> None:
        stream = self.stream(8, gates=[4])
        submitter = threading.Thread(target=stream.submit_loop, daemon=True)
        submitter.start()
        self.addCleanup(stream.stop.set)
        deadline = time.monotonic() + 10
        while stream.submitted < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        submitter.join(0.3)
        self.assertTrue(submitter.is_alive())
        self.assertEqual(stream.submitted, 4)
        stream.strike("worker-kill", lambda: "done")
        submitter.join(10)
        self.assertFalse(submitter.is_alive())
        self.assertEqual(stream.submitted, 8)

    def test_tasks_in_flight_are_counted_under_the_first_fault_that_meets_them(self) -> None:
        stream = self.stream(6)
        stream.submit_loop()
        # Tasks 2..5 answered; 0 and 1 still in flight when two faults strike.
        self.world.pending = {"task-0", "task-1"}
        self.collect(stream)
        first = stream.strike("worker-kill", lambda: "done")
        second = stream.strike("manager-kill", lambda: "done")
        self.assertEqual(first.in_flight_at_fault, 2)
        self.assertEqual(second.in_flight_at_fault, 2)
        self.world.pending = set()
        stream.poll_loop(interval=0)
        stream.wait_recovered(first, timeout=1)
        self.assertIsNotNone(first.recovery_seconds)
        for task in stream.tasks.values():
            if task.n in (0, 1):
                self.assertEqual(stream.reports[task.fault].name, "worker-kill")

    def test_after_the_last_fault_the_rest_of_the_stream_is_sent(self) -> None:
        # The last batch is held back until the last fault is over (its
        # canaries), and then everything goes.
        stream = self.stream(20, gates=[4], window=100)
        submitter = threading.Thread(target=stream.submit_loop, daemon=True)
        submitter.start()
        self.addCleanup(stream.stop.set)
        deadline = time.monotonic() + 10
        while stream.submitted < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        submitter.join(0.2)
        self.assertEqual(stream.submitted, 4)
        stream.strike("worker-kill", lambda: "done")
        submitter.join(10)
        self.assertFalse(submitter.is_alive())
        self.assertEqual(stream.submitted, 20)

    def test_recovery_waits_for_a_task_sent_after_the_fault(self) -> None:
        stream = self.stream(8, gates=[4])
        submitter = threading.Thread(target=stream.submit_loop, daemon=True)
        submitter.start()
        self.addCleanup(stream.stop.set)
        deadline = time.monotonic() + 10
        while stream.submitted < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.collect(stream)  # everything sent so far is answered
        report = stream.strike("broker-close-connections", lambda: "done")
        self.assertEqual(report.canary_from, 4)
        submitter.join(10)
        self.assertEqual(stream.submitted, 8)
        stream.wait_recovered(report, timeout=0.1)
        self.assertIsNone(report.recovery_seconds)  # no new task answered yet
        self.collect(stream)
        stream.wait_recovered(report, timeout=1)
        assert report.recovery_seconds is not None
        self.assertGreaterEqual(report.recovery_seconds, 0)

    def test_a_fault_that_raises_is_reported(self) -> None:
        stream = self.stream(1)

        def broken() -> str:
            raise RuntimeError("no manager")

        report = stream.strike("manager-kill", broken)
        self.assertEqual(report.detail, "FAILED: RuntimeError: no manager")

    def test_lost_hung_duplicated_wrong_and_run_twice(self) -> None:
        stream = self.stream(6)
        stream.submit_loop()
        # task-0 will vanish, task-1 stays pending (hung), task-2's answer
        # changes after it was seen, task-3 gets another task's result,
        # task-4 fails with WorkerLost and ran twice.
        self.world.pending = {"task-0", "task-1"}
        self.world.errors = {"task-4": "WorkerLost"}
        self.world.results = {"task-3": 12345}
        self.collect(stream)
        record_run(self.log_dir, 4)
        self.world.pending = {"task-1"}
        self.world.unknown = {"task-0"}
        self.world.results["task-2"] = 6  # the answer of task 2 changed
        result = self.account(stream)
        (none,) = result.faults
        self.assertEqual(none.submitted, 6)
        self.assertEqual(none.answered, 4)
        self.assertEqual(none.lost, 2)  # task-0 vanished, task-3 got a wrong result
        self.assertEqual(none.hung, 1)
        self.assertEqual(none.duplicates, 1)
        self.assertEqual(none.run_twice, 1)
        self.assertEqual(dict(none.errors), {"WorkerLost": 1})

    def test_format_report(self) -> None:
        report = FaultReport("broker-kill", detail="killed", submitted=3, answered=3)
        report.recovery_seconds = 1.5
        report.errors["WorkerLost"] = 1
        text = format_report(
            ChaosResult(1, 3, 2.0, [FaultReport("none"), report], "tmpfs", answered_without_run=0)
        )
        self.assertIn("broker-kill", text)
        self.assertIn("WorkerLost 1", text)
        self.assertIn("1.5", text)
        self.assertIn("spool: tmpfs", text)
