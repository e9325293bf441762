"""Several tasks, or results, to a broker message: negotiated, and nothing lost.

The endpoint side runs on the fake broker and a Clock (as tests/test_transport_units.py);
the service side is the service's real API, storage and dispatch in this process
(as tests/test_webservice_clock.py).  End to end with real processes and a real
broker, batches are on by default: tests/test_end_to_end.py runs through them.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Dict, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.consumer import AckBatcher
from funcx_endpoint.endpoint.broker_info import BrokerInfo
from funcx_endpoint.testing.inprocess import InProcessService
from funcx_endpoint.webservice.dispatch import TASK_BATCH_MAX
from funcx_endpoint.wire import (
    MESSAGE_BATCHES,
    Result,
    ResultBatchMessage,
    Task,
    TaskBatchMessage,
    pack,
    pack_function,
    pack_payload,
    serialize,
    unpack,
)
from tests.test_transport_units import (
    ENDPOINT_ID,
    URL,
    TransportTestCase,
    error_code,
    ids,
    make_tasks,
)


def batch_info() -> BrokerInfo:
    return BrokerInfo.from_registration(
        {
            "endpoint_id": ENDPOINT_ID,
            **topology.registration_queue_info(ENDPOINT_ID, URL, URL),
            "wire_features": [MESSAGE_BATCHES],
        }
    )


class RecordingChannel:
    """What an ack batcher sends on a channel."""

    closed = False

    def __init__(self) -> None:
        self.settlements: List[Any] = []

    def ack(self, tag: int, multiple: bool = False) -> None:
        self.settlements.append(("ack", tag, multiple))

    def reject(self, tag: int, requeue: bool) -> None:
        self.settlements.append(("reject", tag, requeue))


class AckBatcherPartsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.channel = RecordingChannel()
        self.acks = AckBatcher(self.channel, self.clock)  # type: ignore[arg-type]

    def test_acked_once_every_part_is_done(self) -> None:
        self.acks.delivered(1, parts=3)
        self.acks.done(1)
        self.acks.done(1)
        self.clock.advance(0)
        self.assertEqual(self.channel.settlements, [])
        self.assertEqual(self.acks.unacked, 1)
        self.acks.done(1)
        self.clock.advance(0)
        self.assertEqual(self.channel.settlements, [("ack", 1, True)])
        self.assertEqual(self.acks.unacked, 0)

    def test_given_back_once_and_later_parts_ignored(self) -> None:
        self.acks.delivered(1, parts=2)
        self.acks.release(1)
        self.acks.release(1)  # a second reject of a tag would close the channel
        self.acks.reject(1)
        self.acks.done(1)
        self.acks.done(1)
        self.clock.advance(0)
        self.assertEqual(self.channel.settlements, [("reject", 1, True)])
        self.assertEqual(self.acks.unacked, 0)


class EndpointBatchTests(TransportTestCase):
    """The endpoint's side: a task batch is one delivery, acknowledged when all is safe."""

    def build(self, **kwargs: Any) -> Any:
        transport = super().build(**kwargs)
        transport._broker_info = batch_info
        return transport

    def publish_batch(self, tasks: List[Any]) -> None:
        self.publish_raw(pack(TaskBatchMessage(tasks)))

    def result_messages(self) -> List[Any]:
        return [unpack(m.body) for m in self.broker.published]

    def test_batch_acknowledged_once_every_task_is_safe(self) -> None:
        self.start()
        tasks = make_tasks(3)
        self.publish_batch(tasks)
        self.assertEqual(sorted(self.interchange.held), sorted(ids(tasks)))
        channel = self.tasks_channel
        self.interchange.answer(ids(tasks[:2]))
        self.confirm_all()
        self.assertEqual(channel.settlements, [])
        self.interchange.answer(ids(tasks[2:]))
        self.confirm_all()
        self.assertEqual(channel.settlements, [("ack", 1, True)])
        self.assertEqual((len(self.ledger), self.ledger.unacked), (0, 0))

    def test_results_of_one_turn_go_in_one_message(self) -> None:
        self.start()
        tasks = make_tasks(5)
        self.publish_batch(tasks)
        self.interchange.answer(data="five")
        self.settle()
        [message] = self.result_messages()
        self.assertIsInstance(message, ResultBatchMessage)
        self.assertEqual(sorted(r.task_id for r in message.results), sorted(ids(tasks)))
        self.assertEqual({r.data for r in message.results}, {serialize("five")})
        self.confirm_all()
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])
        self.assertEqual(self.transport.counts["results_confirmed"], 5)

    def test_batches_respect_count_and_size(self) -> None:
        self.build()
        self.publisher.batch_max = 2
        self.start()
        tasks = make_tasks(5)
        self.publish_batch(tasks)
        self.interchange.answer()
        self.settle()
        sizes = [
            len(m.results) if isinstance(m, ResultBatchMessage) else 1
            for m in self.result_messages()
        ]
        self.assertEqual(sizes, [2, 2, 1])
        self.confirm_all()
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])

    def test_without_agreement_results_go_one_per_message(self) -> None:
        self.build(message_batches=False)
        self.start()
        tasks = make_tasks(3)
        self.publish_batch(tasks)  # read anyway
        self.interchange.answer()
        self.settle()
        self.assertEqual([type(m) for m in self.result_messages()], [Result] * 3)

    def test_nacked_batch_spooled_result_by_result(self) -> None:
        self.start()
        tasks = make_tasks(3)
        self.publish_batch(tasks)
        self.interchange.answer()
        self.settle()
        self.results_channel.nack_publish()
        self.settle()
        self.assertEqual(self.spooled_files(), sorted(ids(tasks)))
        for task_id in ids(tasks):
            with open(os.path.join(self.spool_dir, task_id), "rb") as f:
                self.assertEqual(unpack(f.read()).task_id, task_id)  # single messages
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])

    def test_batch_over_the_broker_limit_split(self) -> None:
        """A batch refused as too large: the limit is learned, the results go
        again within it; one result over it alone becomes an error."""
        self.start()
        tasks = make_tasks(3)
        self.publish_batch(tasks)
        self.interchange.answer(ids(tasks[:2]), raw_data="x" * 3000)
        self.interchange.answer(ids(tasks[2:]), raw_data="y" * 9000)
        self.settle()
        self.results_channel.close_by_broker(
            406, "PRECONDITION_FAILED - message size 12900 is larger than configured max size 8000"
        )
        self.settle()
        self.connect_results()
        self.confirm_all()
        found: Dict[str, Result] = {}
        for message in self.result_messages():
            for result in getattr(message, "results", [message]):
                found[result.task_id] = result
        self.assertEqual(sorted(found), sorted(ids(tasks)))
        self.assertEqual(error_code(found[tasks[2].task_id]), "MaxResultSizeExceeded")
        self.assertEqual(found[tasks[0].task_id].data, "x" * 3000)
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])

    def test_unreadable_items_spoil_nothing_else(self) -> None:
        self.start()
        good = make_tasks(2)
        bad_id = str(uuid.uuid4())
        body = pack(TaskBatchMessage(good))
        body = body.replace(
            b'"tasks":[', b'"tasks":[{"task_id":"%s"},{"no":"id"},' % bad_id.encode()
        )
        self.publish_raw(body)
        self.assertEqual(sorted(self.interchange.held), sorted(ids(good)))
        self.settle()
        [malformed] = [m for m in self.result_messages() if isinstance(m, Result)]
        self.assertEqual((malformed.task_id, error_code(malformed)), (bad_id, "MalformedTask"))
        self.confirm_all()
        self.assertEqual(self.tasks_channel.settlements, [])  # two tasks still run
        self.interchange.answer()
        self.confirm_all()
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])
        self.assertEqual(self.transport.counts["malformed"], 2)
        self.flushLoggedErrors()

    def test_batch_redelivered_after_reconnect_runs_nothing_twice(self) -> None:
        self.start()
        tasks = make_tasks(3)
        self.publish_batch(tasks)
        self.interchange.answer(ids(tasks[:1]))
        self.confirm_all()
        self.tasks_conn.lose()
        self.settle()
        self.connect_tasks()  # the broker delivers the batch again
        self.assertEqual(set(self.interchange.submissions.values()), {1})
        self.interchange.answer()
        self.confirm_all()
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.transport.counts["tasks_redelivered_done"], 1)
        self.assertEqual(self.transport.counts["tasks_redelivered_running"], 2)

    def test_drain_gives_a_batch_back_once(self) -> None:
        """Draining withdraws the batch's unstarted tasks: the delivery goes back
        to the broker (once), and the started one's result still counts."""
        self.start()
        tasks = make_tasks(3)
        self.publish_batch(tasks)
        self.interchange.start_tasks(ids(tasks[:1]))
        drained = self.transport.drain(10)
        self.settle()
        self.assertEqual(self.tasks_channel.settlements, [("reject", 1, True)])
        self.interchange.answer(ids(tasks[:1]))
        self.confirm_all()
        self.successResultOf(drained)
        self.assertEqual(self.tasks_channel.settlements, [("reject", 1, True)])
        self.assertEqual(len(self.queued()), 1)  # the whole batch, for the next instance
        self.assertEqual(self.ledger.unacked, 0)


def add(a, b=1):
    return a + b


class ServiceBatchTests(SynchronousTestCase):
    """The service's side: it agrees when asked, batches tasks, reads result batches."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.service = InProcessService(self.mktemp(), self.clock)
        self.service.startService()
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))
        self.addCleanup(lambda: self.successResultOf(self.service.stopService()))
        code, answer = self.service.call(
            "POST", "/v2/functions", {"function_name": "add", "function_code": pack_function(add)}
        )
        self.assertEqual(code, 200, answer)
        self.function_id = answer["function_uuid"]

    def register(self, endpoint_id: str, offer: bool) -> Dict[str, Any]:
        code, answer = self.service.call(
            "POST",
            "/v2/endpoints",
            {
                "endpoint_name": "batches",
                "endpoint_uuid": endpoint_id,
                "metadata": {"wire_features": [MESSAGE_BATCHES] if offer else []},
            },
        )
        self.assertEqual(code, 200, answer)
        return answer

    def submit(self, endpoint_id: str, count: int) -> List[str]:
        payload = pack_payload((1,), {"b": 2})
        code, answer = self.service.call(
            "POST",
            "/v2/submit",
            {"tasks": [[self.function_id, endpoint_id, payload]] * count},
        )
        self.assertEqual(code, 200, answer)
        self.clock.advance(1)
        return [r["task_uuid"] for r in answer["results"]]

    def messages(self, endpoint_id: str) -> List[Any]:
        queue = self.service.broker.queues.get(topology.task_queue(endpoint_id), [])
        return [unpack(m.body) for m in queue]

    def test_agreement(self) -> None:
        offered = str(uuid.uuid4())
        self.assertEqual(self.register(offered, True)["wire_features"], [MESSAGE_BATCHES])
        self.assertNotIn("wire_features", self.register(str(uuid.uuid4()), False))

    def test_tasks_batched_for_an_endpoint_that_asked(self) -> None:
        endpoint = str(uuid.uuid4())
        self.register(endpoint, True)
        task_ids = self.submit(endpoint, TASK_BATCH_MAX + 6)
        messages = self.messages(endpoint)
        self.assertEqual([type(m) for m in messages], [TaskBatchMessage, TaskBatchMessage])
        self.assertEqual([len(m.tasks) for m in messages], [TASK_BATCH_MAX, 6])
        self.assertEqual([t.task_id for m in messages for t in m.tasks], task_ids)
        self.assertTrue(all(self.service.tasks[t].sent for t in task_ids))

    def test_one_per_message_otherwise(self) -> None:
        endpoint = str(uuid.uuid4())
        self.register(endpoint, False)
        task_ids = self.submit(endpoint, 5)
        self.assertEqual([m.task_id for m in self.messages(endpoint)], task_ids)

    def test_result_batch_stored(self) -> None:
        endpoint = str(uuid.uuid4())
        self.register(endpoint, True)
        task_ids = self.submit(endpoint, 3)
        results = [Result.success(t, serialize(i)) for i, t in enumerate(task_ids)]
        stored = self.service.broker.deliver(
            f"{endpoint}.results", pack(ResultBatchMessage(results))
        )
        self.clock.advance(0)
        self.successResultOf(stored)
        for i, task_id in enumerate(task_ids):
            code, answer = self.service.call("GET", f"/v2/tasks/{task_id}")
            self.assertEqual(
                (code, answer["status"], answer["result"]), (200, "success", serialize(i))
            )

    def test_an_older_start_gets_its_unfinished_tasks_one_per_message(self) -> None:
        """Re-registered without batches (an older version): what was sent in
        batches and is not finished is sent again, one task per message."""
        endpoint = str(uuid.uuid4())
        self.register(endpoint, True)
        task_ids = self.submit(endpoint, 4)
        done = Result.success(task_ids[0], serialize(3))
        stored = self.service.broker.deliver(f"{endpoint}.results", pack(done))
        self.clock.advance(0)
        self.successResultOf(stored)
        self.register(endpoint, False)
        self.clock.advance(3)  # the resend loop
        singles = [m for m in self.messages(endpoint) if isinstance(m, Task)]
        self.assertEqual(sorted(m.task_id for m in singles), sorted(task_ids[1:]))
