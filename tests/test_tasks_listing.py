"""``funcx-endpoint tasks`` on fakes: the listing from the dispatcher's records,
the last finished results, the control socket's arguments, the table.

The command against a real daemon is in :mod:`tests.test_user_e2e`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from funcx_endpoint.cli.tasks import format_tasks
from funcx_endpoint.endpoint.control import ControlProtocol
from funcx_endpoint.executor.dispatcher import TaskDispatcher
from funcx_endpoint.executor.interface import IResultSink
from funcx_endpoint.executor.listing import RecentResults, TaskListing
from funcx_endpoint.executor.routing import RAW, LeastLoadedRouting
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.wire import ErrorCode, PackedResult, Task, serialize
from tests.test_routing import FakeManager


def task() -> Task:
    return Task(str(uuid.uuid4()), "buffer")


class Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TaskListingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = CollectingSink()
        self.wall = Wall(0.0)
        self.recent = RecentResults(self.sink, keep=3, wall=self.wall)
        self.dispatcher = TaskDispatcher(self.clock, self.recent, LeastLoadedRouting())
        self.listing = TaskListing(self.dispatcher, self.recent, wall=self.wall)

    def flush(self) -> None:
        for _ in range(3):
            self.clock.advance(0.01)

    def test_sink(self) -> None:
        self.assertTrue(verifyObject(IResultSink, self.recent))

    def test_queued_and_sent(self) -> None:
        tasks = [task() for _ in range(3)]
        self.dispatcher.submit(tasks)
        self.flush()
        self.wall.now = tasks_time(self.dispatcher, tasks[0]) + 5.0
        listed = self.listing()
        self.assertEqual((listed["queued"], listed["sent"]), (3, 0))
        self.assertEqual([t["task_id"] for t in listed["tasks"]], [t.task_id for t in tasks])
        first = listed["tasks"][0]
        self.assertEqual(
            {k: first[k] for k in ("state", "attempts", "manager", "container_type")},
            {"state": "queued", "attempts": 0, "manager": None, "container_type": RAW},
        )
        self.assertAlmostEqual(first["age"], 5.0, places=2)

        manager = FakeManager(RAW, workers=2)
        self.dispatcher.manager_joined(manager)
        self.flush()
        listed = self.listing()
        self.assertEqual((listed["queued"], listed["sent"]), (1, 2))
        sent = [t for t in listed["tasks"] if t["state"] == "sent"]
        self.assertEqual({t["manager"] for t in sent}, {manager.manager_id})
        self.assertEqual({t["attempts"] for t in sent}, {1})
        self.assertEqual({t["block"] for t in sent}, {"0"})
        json.dumps(listed)  # what the control socket sends

    def test_finished_newest_first(self) -> None:
        manager = FakeManager(RAW, workers=4)
        self.dispatcher.manager_joined(manager)
        tasks = [task() for _ in range(4)]
        self.dispatcher.submit(tasks)
        self.flush()
        for index, one in enumerate(tasks):
            self.wall.now = 100.0 + index
            result = (
                PackedResult.success(one.task_id, serialize(index))
                if index != 2
                else PackedResult.failure(one.task_id, ErrorCode.WORKER_LOST, "gone")
            )
            self.dispatcher.results_received(manager, [result.encode()])
            self.flush()
        self.wall.now = 110.0
        listed = self.listing(finished=2)
        self.assertEqual(listed["tasks"], [])
        self.assertEqual(
            listed["finished"],
            [
                {"task_id": tasks[3].task_id, "outcome": "success", "ago": 7.0},
                {"task_id": tasks[2].task_id, "outcome": "WorkerLost", "ago": 8.0},
            ],
        )
        # Only the last 3 are kept; the results went on to the sink.
        self.assertEqual(len(self.listing(finished=10)["finished"]), 3)
        self.assertEqual(len(self.sink.packed), 4)
        self.assertEqual(self.listing(finished=0)["finished"], [])

    def test_bad_count(self) -> None:
        for bad in (-1, "3", True):
            with self.assertRaises(ValueError):
                self.listing(finished=bad)


def tasks_time(dispatcher: TaskDispatcher, one: Task) -> float:
    record = dispatcher.record(one.task_id)
    assert record is not None
    return record.transitions[0].timestamp / 1e9


class ControlArgumentsTests(SynchronousTestCase):
    def ask(self, request: Dict[str, Any]) -> Dict[str, Any]:
        seen: List[Dict[str, Any]] = []

        def tasks(**kwargs: Any) -> Dict[str, Any]:
            seen.append(kwargs)
            return {"got": kwargs}

        protocol = ControlProtocol({"tasks": tasks})
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.lineReceived(json.dumps(request).encode())
        answer: Dict[str, Any] = json.loads(transport.value())
        return answer

    def test_args_are_keyword_arguments(self) -> None:
        self.assertEqual(
            self.ask({"command": "tasks", "args": {"finished": 3}}),
            {"ok": True, "tasks": {"got": {"finished": 3}}},
        )
        self.assertEqual(self.ask({"command": "tasks"}), {"ok": True, "tasks": {"got": {}}})

    def test_bad_args(self) -> None:
        answer = self.ask({"command": "tasks", "args": [1]})
        self.assertFalse(answer["ok"])
        self.assertIn("args", answer["error"])


class FormatTests(SynchronousTestCase):
    def test_table(self) -> None:
        text = format_tasks(
            {
                "queued": 1,
                "sent": 1,
                "tasks": [
                    {"task_id": "a", "state": "queued", "age": 1.25, "attempts": 0},
                    {
                        "task_id": "b",
                        "state": "sent",
                        "age": 125,
                        "attempts": 2,
                        "manager": "m1",
                        "block": "0",
                    },
                ],
                "finished": [{"task_id": "c", "outcome": "success", "ago": 3}],
            }
        )
        lines = text.splitlines()
        self.assertEqual(lines[0], "Tasks held: 1 queued, 1 sent to managers")
        self.assertEqual(
            lines[1].split(),
            ["TASK", "ID", "STATE", "AGE", "ATTEMPTS", "MANAGER", "BLOCK", "WORKER"],
        )
        self.assertEqual(lines[2].split(), ["a", "queued", "1.2s", "0", "-", "-", "-"])
        self.assertEqual(lines[3].split(), ["b", "sent", "2m05s", "2", "m1", "0", "-"])
        self.assertEqual(lines[4], "Last finished: 1")
        self.assertEqual(lines[6].split(), ["c", "success", "3.0s"])
