"""A task's attempts (how many times its endpoint sent it to a manager): counted from
the transitions its result carries, as the service's ingest hands them to storage."""

from __future__ import annotations

import uuid
from typing import Any, List

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.webservice.ingest import ResultIngest, count_attempts
from funcx_endpoint.webservice.records import IncomingResult, StoredOutcome
from funcx_endpoint.wire import (
    ActorName,
    Result,
    ResultBatchMessage,
    TaskState,
    TaskTransition,
    pack,
)


def _t(state: TaskState, actor: ActorName = ActorName.INTERCHANGE, at: int = 1) -> TaskTransition:
    return TaskTransition(at, state, actor)


NODES = _t(TaskState.WAITING_FOR_NODES)
LAUNCH = _t(TaskState.WAITING_FOR_LAUNCH)
RUNNING = _t(TaskState.RUNNING, ActorName.MANAGER)
START = _t(TaskState.EXECUTION_START, ActorName.WORKER)
END = _t(TaskState.EXECUTION_END, ActorName.WORKER)


class CountAttemptsTests(SynchronousTestCase):
    def test_no_transitions_is_unknown(self) -> None:
        self.assertIsNone(count_attempts(None))
        self.assertIsNone(count_attempts([]))

    def test_one_send(self) -> None:
        self.assertEqual(count_attempts([NODES, LAUNCH, RUNNING, START, END]), 1)

    def test_retried_after_a_lost_manager(self) -> None:
        # Queued again (waiting-for-nodes) and sent to a second manager.
        transitions = [NODES, LAUNCH, RUNNING, NODES, LAUNCH, RUNNING, START, END]
        self.assertEqual(count_attempts(transitions), 2)
        self.assertEqual(count_attempts([LAUNCH] * 3), 3)

    def test_ran_without_the_interchange_saying_so(self) -> None:
        # An endpoint whose result carries only the worker's transitions (funcX 1.0's
        # status reports took the interchange's): it ran, so once at least.
        self.assertEqual(count_attempts([START, END]), 1)
        self.assertEqual(count_attempts([RUNNING]), 1)

    def test_answered_without_sending(self) -> None:
        # Refused by the interchange (no manager can run its container).
        self.assertEqual(count_attempts([NODES]), 0)


class _Channel:
    closed = False

    def ack(self, tag: int, multiple: bool = False) -> None:
        pass


class _Sender:
    def send_copies(self, copies: Any) -> None:
        pass


class _Storage:
    def __init__(self) -> None:
        self.results: List[IncomingResult] = []

    def store_results(self, results: Any, now: Any = None) -> Any:
        self.results.extend(results)
        return succeed([StoredOutcome(r.task_id, "stored") for r in results])

    def record_reports(self, reports: Any, size: int) -> Any:
        return succeed(0)


class IngestAttemptsTests(SynchronousTestCase):
    def test_results_and_batches_carry_attempts(self) -> None:
        clock = Clock()
        storage = _Storage()
        ingest = ResultIngest(clock, storage, _Sender())  # type: ignore[arg-type]
        endpoint_id = str(uuid.uuid4())
        ids = [str(uuid.uuid4()) for _ in range(4)]
        bodies = [
            pack(Result.success(ids[0], "00\na", [NODES, LAUNCH, START, END])),
            pack(Result.success(ids[1], "00\nb")),
            pack(
                ResultBatchMessage(
                    [
                        Result.failure(
                            ids[2], "RemoteExecutionError", "boom", None, [LAUNCH, LAUNCH]
                        ),
                        Result.success(ids[3], "00\nd", [START]),
                    ]
                )
            ),
        ]
        for tag, body in enumerate(bodies, 1):
            delivery = Delivery("c", tag, False, "results", f"{endpoint_id}.results")
            delivery.body = body
            ingest.on_delivery(delivery, _Channel())  # type: ignore[arg-type]
        clock.advance(0)
        self.assertEqual(
            [(r.task_id, r.attempts) for r in storage.results],
            [(ids[0], 1), (ids[1], None), (ids[2], 2), (ids[3], 1)],
        )
