"""The endpoint transport's policies on a fake broker (funcx_endpoint.testing.amqp).

No sockets and no real time: a ``Clock``, a fake broker whose confirms each
test decides, and the result spool in a temporary directory with its disk
work run inline.  tests/test_transport.py makes the same claims against a
real RabbitMQ node.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from typing import Any, Dict, List, Optional

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.connection import AMQPError
from funcx_endpoint.amqp.publisher import PublishFailed
from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.endpoint.broker_info import BrokerInfo
from funcx_endpoint.endpoint.service import StartupError
from funcx_endpoint.endpoint.transport import Transport, build_transport
from funcx_endpoint.testing.amqp import FakeBroker, FakeChannel, FakeConnectionService
from funcx_endpoint.testing.interchanges import HoldingInterchange
from funcx_endpoint.testing.threads import InlineThreads
from funcx_endpoint.wire import EPStatusReport, Result, Task, pack, serialize, unpack

ENDPOINT_ID = str(uuid.uuid4())
TASK_QUEUE = topology.task_queue(ENDPOINT_ID)
URL = "amqp://endpoint:secret@broker.example:5672/%2F"


def broker_info() -> BrokerInfo:
    return BrokerInfo.from_registration(
        {"endpoint_id": ENDPOINT_ID, **topology.registration_queue_info(ENDPOINT_ID, URL, URL)}
    )


def make_tasks(n: int, function_id: Optional[str] = None) -> List[Task]:
    return [Task(str(uuid.uuid4()), "a task buffer", function_id=function_id) for _ in range(n)]


def ids(tasks: List[Task]) -> List[str]:
    return [task.task_id for task in tasks]


def read_result(data: bytes) -> Result:
    result = unpack(data)
    assert isinstance(result, Result), result
    return result


def error_code(result: Result) -> str:
    assert result.error_details is not None, result
    return result.error_details.code


def user_message(result: Result) -> str:
    assert result.error_details is not None, result
    return result.error_details.user_message


class TransportTestCase(SynchronousTestCase):
    """A transport over a fake broker, a holding interchange and an inline spool."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = FakeBroker(self.clock)
        self.broker.declare_endpoint(ENDPOINT_ID)
        self.threads = InlineThreads()
        self.spool_dir = os.path.abspath(self.mktemp())
        self.fatal: List[Any] = []

    def tearDown(self) -> None:
        transport: Optional[Transport] = getattr(self, "transport", None)
        if transport is not None and transport.running:
            stopped = transport.stopService()
            self.clock.advance(0)
            self.successResultOf(stopped)
        self.clock.advance(0)
        # Nothing left running on the clock, nothing done that RabbitMQ punishes.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.broker.violations, [])

    # -- building and connecting ------------------------------------------------------

    def build(self, **kwargs: Any) -> Transport:
        self.spool = ResultSpool(self.spool_dir, self.threads)
        transport, interchange = build_transport(
            self.clock,
            broker_info,
            self.spool,
            HoldingInterchange,
            connect=self.broker.connection_service,
            on_fatal=lambda message, code: self.fatal.append((message, code)),
            **kwargs,
        )
        self.transport = transport
        self.interchange: HoldingInterchange = interchange
        self.publisher = transport.publisher
        self.ledger = transport.ledger
        return transport

    def start(self, connect: bool = True, **kwargs: Any) -> Transport:
        transport = getattr(self, "transport", None) or self.build(**kwargs)
        transport.startService()
        self.tasks_conn: FakeConnectionService = self.broker.services["tasks"]
        self.results_conn: FakeConnectionService = self.broker.services["results"]
        if connect:
            self.connect_results()
            self.connect_tasks()
        return transport

    def connect_tasks(self) -> FakeChannel:
        """Connect the tasks side; its channel."""
        channel = self.successResultOf(self.tasks_conn.connect()).channels[1]
        self.settle()
        return channel

    def connect_results(self) -> FakeChannel:
        """Connect the results side; its channel."""
        channel = self.successResultOf(self.results_conn.connect()).channels[1]
        self.settle()
        return channel

    @property
    def tasks_channel(self) -> FakeChannel:
        assert self.tasks_conn.client is not None
        return self.tasks_conn.client.channels[1]

    @property
    def results_channel(self) -> FakeChannel:
        assert self.results_conn.client is not None
        return self.results_conn.client.channels[1]

    def settle(self) -> None:
        """Run everything due now (what the reactor does in one go)."""
        self.clock.advance(0)

    # -- the service's side -----------------------------------------------------------

    def publish_tasks(self, tasks: List[Task]) -> None:
        self.broker.enqueue(TASK_QUEUE, *[pack(task) for task in tasks])
        self.settle()

    def publish_raw(self, *bodies: bytes) -> None:
        self.broker.enqueue(TASK_QUEUE, *bodies)
        self.settle()

    def results(self) -> Dict[str, List[Result]]:
        """Results published (accepted by the broker, confirmed or not), by task id."""
        found: Dict[str, List[Result]] = {}
        for message in self.broker.published:
            result = unpack(message.body)
            if isinstance(result, Result):
                found.setdefault(result.task_id, []).append(result)
        return found

    def published_ids(self, channel: FakeChannel) -> List[str]:
        return [m.properties["message-id"] for m in self.broker.published if m.channel is channel]

    def confirm_all(self, channel: Optional[FakeChannel] = None) -> None:
        (channel or self.results_channel).confirm()
        self.settle()

    def spooled_files(self) -> List[str]:
        return sorted(os.listdir(self.spool_dir)) if os.path.isdir(self.spool_dir) else []

    def seed_spool(self, results: List[Result]) -> None:
        """Results in the spool, as an earlier run that was killed left them."""
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        for result in results:
            with open(os.path.join(self.spool_dir, result.task_id), "wb") as f:
                f.write(pack(result))

    def queued(self) -> List[Any]:
        return list(self.broker.queues[TASK_QUEUE].messages)


class AcknowledgementTests(TransportTestCase):
    """A task is acknowledged only once its result is confirmed or spooled."""

    def test_ack_only_after_confirm(self) -> None:
        self.start()
        tasks = make_tasks(3)
        self.publish_tasks(tasks)
        self.assertEqual(sorted(self.interchange.held), sorted(ids(tasks)))
        channel = self.tasks_channel
        self.interchange.answer([tasks[0].task_id])
        self.settle()
        self.assertEqual(self.published_ids(self.results_channel), [tasks[0].task_id])
        self.assertEqual(channel.settlements, [])  # published, not yet confirmed
        self.confirm_all()
        self.assertEqual(channel.settlements, [("ack", 1, True)])
        self.interchange.answer([tasks[2].task_id])
        self.confirm_all()
        self.assertEqual(channel.settlements[1:], [("ack", 3, False)])
        self.interchange.answer([tasks[1].task_id])
        self.confirm_all()
        self.assertEqual(channel.settlements[2:], [("ack", 2, True)])
        self.assertEqual((len(self.ledger), self.ledger.unacked, len(channel.unacked)), (0, 0, 0))
        self.assertEqual(self.transport.counts["results_confirmed"], 3)

    def test_multiple_ack_runs_and_singles_behind_a_long_task(self) -> None:
        """Done tags below the oldest running one go in one multiple ack; those
        above it one by one, so the prefetch window never fills with done work."""
        self.start()
        tasks = make_tasks(10)
        self.publish_tasks(tasks)
        channel = self.tasks_channel
        self.interchange.answer(ids(tasks[:4]))
        self.confirm_all()
        self.assertEqual(channel.settlements, [("ack", 4, True)])
        self.interchange.answer(ids(tasks[5:]))  # tasks[4] is the long one
        self.confirm_all()
        self.assertEqual(channel.settlements[1:], [("ack", tag, False) for tag in range(6, 11)])
        self.assertEqual(sorted(channel.unacked), [5])
        self.interchange.answer([tasks[4].task_id])
        self.confirm_all()
        self.assertEqual(channel.settlements[6:], [("ack", 5, True)])
        assert self.ledger.acks is not None
        self.assertEqual(self.ledger.acks.ack_frames, 7)
        self.assertEqual(channel.unacked, {})

    def test_nacked_result_acked_once_spooled(self) -> None:
        self.start()
        [task] = make_tasks(1)
        self.publish_tasks([task])
        channel = self.tasks_channel
        self.threads.paused = True  # the disk is slow
        self.interchange.answer([task.task_id], data="the result")
        self.settle()
        self.results_channel.nack_publish()
        self.settle()
        self.assertEqual(channel.settlements, [])  # not confirmed, not yet on disk
        self.threads.run_pending()
        self.settle()
        self.assertEqual(channel.settlements, [("ack", 1, True)])
        self.assertEqual(self.spooled_files(), [task.task_id])
        with open(os.path.join(self.spool_dir, task.task_id), "rb") as f:
            self.assertEqual(read_result(f.read()).data, serialize("the result"))
        self.assertEqual(self.transport.counts["results_spooled"], 1)
        self.assertEqual(self.transport.status_fields()["results_spooled"], 1)

    def test_returned_result_acked_once_spooled(self) -> None:
        """An unroutable result (basic.return, then its ack) is not safe: spooled."""
        self.start()
        [task] = make_tasks(1)
        self.publish_tasks([task])
        self.interchange.answer([task.task_id])
        self.settle()
        [message] = self.broker.published
        assert message.seq is not None
        self.results_channel.return_publish(message.seq)
        self.settle()
        self.assertEqual(self.spooled_files(), [task.task_id])
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])
        self.assertEqual(self.transport.counts["results_confirmed"], 0)

    def test_results_channel_closed_spooled_acked_and_resent(self) -> None:
        """Results in flight when the broker closes the results channel are
        spooled (their tasks acked), the connection is renewed, and they are
        sent again and removed from the spool once confirmed."""
        self.start()
        tasks = make_tasks(2)
        self.publish_tasks(tasks)
        self.interchange.answer()
        self.settle()
        old = self.results_channel
        old.close_by_broker(406, "PRECONDITION_FAILED - something about this channel")
        self.settle()
        self.assertEqual(self.spooled_files(), sorted(ids(tasks)))
        self.assertEqual(self.tasks_channel.settlements, [("ack", 2, True)])
        # The transport closed the results connection to have it set up again.
        self.assertIsNone(self.results_conn.client)
        new = self.connect_results()
        self.assertEqual(sorted(self.published_ids(new)), sorted(ids(tasks)))
        self.confirm_all()
        self.assertEqual(self.spooled_files(), [])
        self.assertEqual(self.publisher.spooled, 0)
        self.assertEqual(self.tasks_channel.settlements, [("ack", 2, True)])  # once

    def test_results_connection_lost(self) -> None:
        self.start()
        tasks = make_tasks(2)
        self.publish_tasks(tasks)
        self.interchange.answer(ids(tasks[:1]))
        self.settle()
        self.results_conn.lose()
        self.settle()
        # In flight when the connection went, and made while it is down: spooled.
        self.interchange.answer(ids(tasks[1:]))
        self.settle()
        self.assertEqual(self.spooled_files(), sorted(ids(tasks)))
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True), ("ack", 2, True)])
        self.assertEqual(self.transport.status_fields()["broker_results_connection"], "connecting")


class RedeliveryTests(TransportTestCase):
    """Tasks delivered again are run once."""

    def test_redelivered_after_reconnect_not_run_twice(self) -> None:
        self.start()
        tasks = make_tasks(3)
        self.publish_tasks(tasks)
        old = self.tasks_channel
        self.tasks_conn.lose()
        self.settle()
        self.assertEqual([m.redelivered for m in self.queued()], [True] * 3)
        new = self.connect_tasks()
        self.assertEqual(self.transport.counts["tasks_redelivered_running"], 3)
        self.assertEqual(set(self.interchange.submissions.values()), {1})
        self.assertEqual(len(new.unacked), 3)
        self.interchange.answer()
        self.confirm_all()
        # Acked on the channel they came on last; nothing sent on the dead one.
        self.assertEqual(new.settlements, [("ack", 3, True)])
        self.assertEqual(old.settlements, [])
        self.assertEqual(self.queued(), [])
        self.assertEqual(len(self.results()), 3)

    def test_duplicate_on_one_channel_both_acked(self) -> None:
        self.start()
        [task] = make_tasks(1)
        self.publish_tasks([task, task])
        self.assertEqual(self.interchange.submissions[task.task_id], 1)
        self.assertEqual(self.transport.counts["tasks_redelivered_running"], 1)
        self.interchange.answer()
        self.confirm_all()
        self.assertEqual(self.tasks_channel.settlements, [("ack", 2, True)])

    def test_spooled_result_task_acked_at_once_not_rerun(self) -> None:
        """After a crash, a task whose result is in the spool is acknowledged
        when delivered again, without running; the spooled result is sent."""
        done, fresh = make_tasks(2)
        self.seed_spool([Result(done.task_id, serialize("from the spool"))])
        self.broker.enqueue(TASK_QUEUE, pack(done), pack(fresh))
        self.start()
        self.assertEqual(list(self.interchange.submissions), [fresh.task_id])
        self.assertEqual(self.transport.counts["tasks_redelivered_done"], 1)
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])
        self.assertEqual(self.published_ids(self.results_channel), [done.task_id])
        self.confirm_all()
        self.assertEqual(self.spooled_files(), [])
        self.assertEqual(self.results()[done.task_id][0].data, serialize("from the spool"))

    def test_nothing_consumed_before_the_spool_is_read(self) -> None:
        self.threads.paused = True
        self.start(connect=False)
        results = self.results_conn.connect()
        tasks = self.tasks_conn.connect()
        self.assertNoResult(results)
        self.assertNoResult(tasks)
        channel = self.tasks_conn.broker.clients[-1].channels[1]
        self.assertNotIn("basic_consume", channel.requests)
        ready = self.transport.when_ready()
        self.assertNoResult(ready)
        self.threads.run_pending()
        self.successResultOf(results)
        self.successResultOf(tasks)
        self.successResultOf(ready)
        self.assertEqual(channel.requests[-2:], ["basic_qos", "basic_consume"])


class BadMessageTests(TransportTestCase):
    """Messages that are not tasks to run are answered or rejected, never requeued."""

    def test_unreadable_messages_rejected(self) -> None:
        self.start()
        bodies = [b"\x02" + b'{"message_type":"task","data":{}}', b"\x01{not json", b""]
        self.publish_raw(*bodies)
        channel = self.tasks_channel
        self.assertEqual(channel.settlements, [("reject", tag, False) for tag in (1, 2, 3)])
        self.assertEqual([m.body for m in self.broker.queues[TASK_QUEUE].dead], bodies)
        self.assertEqual(self.transport.counts["malformed"], 3)
        self.assertEqual(self.interchange.submissions, {})
        # Rejected deliveries are settled: none is waiting for an ack.
        self.assertEqual(self.ledger.unacked, 0)

    def test_non_task_message_rejected(self) -> None:
        self.start()
        self.publish_raw(pack(Result(str(uuid.uuid4()), serialize(1))))
        self.assertEqual(self.tasks_channel.settlements, [("reject", 1, False)])
        self.assertEqual(self.broker.published, [])

    def test_malformed_task_with_id_answered(self) -> None:
        self.start()
        task_id = str(uuid.uuid4())
        body = json.dumps({"message_type": "task", "data": {"task_id": task_id}}).encode()
        self.publish_raw(b"\x01" + body)
        [result] = self.results()[task_id]
        self.assertEqual(error_code(result), "MalformedTask")
        self.assertIn("malformed task message", user_message(result))
        self.assertEqual(self.tasks_channel.settlements, [])  # not before it is confirmed
        self.confirm_all()
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])
        # Delivered again after its answer was confirmed: acked, not answered again.
        self.publish_raw(b"\x01" + body)
        self.assertEqual(self.tasks_channel.settlements[1:], [("ack", 2, True)])
        self.assertEqual(len(self.results()[task_id]), 1)
        self.assertEqual(self.transport.counts["tasks_redelivered_done"], 1)

    def test_malformed_task_delivered_twice_while_answering(self) -> None:
        self.start()
        task_id = str(uuid.uuid4())
        body = b"\x01" + json.dumps({"message_type": "task", "data": {"task_id": task_id}}).encode()
        self.publish_raw(body, body)
        self.assertEqual(len(self.results()[task_id]), 1)
        self.assertEqual(self.transport.counts["tasks_redelivered_running"], 1)
        self.confirm_all()
        self.assertEqual(self.tasks_channel.settlements, [("ack", 2, True)])

    def test_allowed_functions(self) -> None:
        allowed, other = str(uuid.uuid4()), str(uuid.uuid4())
        self.start(allowed_functions=[allowed])
        [good] = make_tasks(1, function_id=allowed)
        [bad] = make_tasks(1, function_id=other)
        [anonymous] = make_tasks(1)
        self.publish_tasks([good, bad, anonymous])
        self.assertEqual(list(self.interchange.submissions), [good.task_id])
        results = self.results()
        for task in (bad, anonymous):
            [result] = results[task.task_id]
            self.assertEqual(error_code(result), "FunctionNotAllowed")
        self.assertIn(other, user_message(results[bad.task_id][0]))
        self.assertIn("names no function id", results[anonymous.task_id][0].data)
        self.confirm_all()
        # Acked one by one: the allowed task, still running, holds the first tag.
        self.assertEqual(self.tasks_channel.settlements, [("ack", 2, False), ("ack", 3, False)])


class SpoolFailureTests(TransportTestCase):
    """A result neither confirmed nor spooled: its task goes back to the broker."""

    def fail_a_result(self) -> Task:
        self.start()
        [task] = make_tasks(1)
        self.publish_tasks([task])
        self.results_conn.lose()
        self.settle()
        self.threads.failure = OSError(errno.ENOSPC, "No space left on device")
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            self.interchange.answer([task.task_id], data="lost")
            self.settle()
        finally:
            globalLogPublisher.removeObserver(events.append)
        # One line saying what to do, not a traceback.
        self.assertEqual(self.flushLoggedErrors(OSError), [])
        [error] = [e for e in events if e.get("log_level") == LogLevel.error]
        self.assertNotIn("log_failure", error)
        self.assertRegex(
            formatEvent(error),
            r"Could not write results to the spool .*: .*No space left on device; their 1 "
            r"task\(s\) go back to the broker",
        )
        self.assertNotIn(task.task_id, self.ledger)
        return task

    def test_released_after_release_delay(self) -> None:
        task = self.fail_a_result()
        channel = self.tasks_channel
        self.clock.advance(self.ledger.release_delay - 0.1)
        self.assertEqual(channel.settlements, [])
        self.clock.advance(0.1)
        self.assertEqual(channel.settlements, [("reject", 1, True)])
        # Delivered again and run again; this time its result gets through.
        self.assertEqual(self.interchange.submissions[task.task_id], 2)
        self.threads.failure = None
        self.connect_results()
        self.interchange.answer([task.task_id], data="second run")
        self.confirm_all()
        self.assertEqual(channel.settlements[1:], [("ack", 2, True)])
        [result] = self.results()[task.task_id]
        self.assertEqual(result.data, serialize("second run"))
        self.assertEqual(self.spooled_files(), [])

    def test_stop_cancels_the_delayed_release(self) -> None:
        self.fail_a_result()
        channel = self.tasks_channel
        stopped = self.transport.stopService()
        self.settle()
        self.successResultOf(stopped)
        self.assertEqual(channel.settlements, [])
        # The delivery went back to the broker with the channel instead.
        self.assertEqual([m.redelivered for m in self.queued()], [True])

    def test_unreadable_spool_is_fatal(self) -> None:
        self.threads.failure = PermissionError(errno.EACCES, "Permission denied")
        self.start(connect=False)
        ready = self.transport.when_ready()
        self.failureResultOf(self.results_conn.connect(), AMQPError)
        error = self.failureResultOf(ready, StartupError).value
        self.assertIn(f"cannot read the result spool {self.spool_dir}", error.message)
        self.assertEqual(error.exit_code, 69)
        self.assertEqual(len(self.fatal), 1)
        self.failureResultOf(self.tasks_conn.connect(), AMQPError)
        self.assertEqual(len(self.fatal), 1)  # reported once


class ResendTests(TransportTestCase):
    """Spooled results are sent again, a window at a time."""

    def test_resent_in_windows_on_connect(self) -> None:
        results = [Result(str(uuid.uuid4()), serialize(i)) for i in range(40)]
        self.seed_spool(results)
        self.build()
        self.publisher.resend_window = 16
        self.start()
        channel = self.results_channel
        sizes = []
        while channel.unconfirmed:
            sizes.append(len(channel.unconfirmed))
            self.confirm_all()
        self.assertEqual(sizes, [16, 16, 8])
        self.assertEqual(sorted(self.results()), sorted(r.task_id for r in results))
        self.assertEqual(self.spooled_files(), [])
        self.assertEqual(self.publisher.spooled, 0)

    def test_resent_periodically(self) -> None:
        self.start(resend_interval=30.0)
        [task] = make_tasks(1)
        self.publish_tasks([task])
        self.interchange.answer()
        self.settle()
        self.results_channel.nack_publish()
        self.settle()
        self.assertEqual(self.spooled_files(), [task.task_id])
        self.assertEqual(len(self.broker.published), 1)
        self.clock.advance(30)
        self.assertEqual(len(self.broker.published), 2)
        # Refused again: it stays, and goes again at the next interval.
        self.results_channel.nack_publish()
        self.settle()
        self.assertEqual(self.spooled_files(), [task.task_id])
        self.clock.advance(30)
        self.assertEqual(len(self.broker.published), 3)
        self.confirm_all()
        self.assertEqual(self.spooled_files(), [])
        self.assertEqual(self.tasks_channel.settlements, [("ack", 1, True)])  # once

    def test_spool_file_not_removed_is_logged(self) -> None:
        """A confirmed result whose spool file cannot be removed is logged;
        it is only sent again by a later run."""
        self.start()
        [task] = make_tasks(1)
        self.publish_tasks([task])
        self.results_conn.lose()
        self.settle()
        self.interchange.answer()
        self.settle()
        self.connect_results()
        self.threads.failure = PermissionError(errno.EROFS, "Read-only file system")
        self.confirm_all()
        self.assertEqual(len(self.flushLoggedErrors(PermissionError)), 1)
        self.assertEqual(self.spooled_files(), [task.task_id])
        self.assertEqual(self.publisher.spooled, 0)
        self.clock.advance(self.publisher.resend_interval)
        self.assertEqual(len(self.broker.published), 1)

    def test_resent_after_reconnect(self) -> None:
        self.start()
        [task] = make_tasks(1)
        self.publish_tasks([task])
        self.results_conn.lose()
        self.settle()
        self.interchange.answer()
        self.settle()
        self.assertEqual(self.broker.published, [])
        channel = self.connect_results()
        self.assertEqual(self.published_ids(channel), [task.task_id])
        self.confirm_all()
        self.assertEqual(self.spooled_files(), [])


class SizeLimitTests(TransportTestCase):
    """A result larger than the broker accepts becomes MaxResultSizeExceeded."""

    limit = 2000

    def assert_too_large(self, result: Result) -> None:
        self.assertEqual(error_code(result), "MaxResultSizeExceeded")
        self.assertIn(f"larger than the broker's limit of {self.limit} bytes", result.data)

    def test_limit_learned_from_a_channel_close(self) -> None:
        self.broker.max_message_size = self.limit
        self.start()
        big, small, later, fine = make_tasks(4)
        self.publish_tasks([big, small, later, fine])
        self.interchange.answer([big.task_id], raw_data="x" * 5000)
        self.interchange.answer([small.task_id], data="small")
        self.settle()
        # The broker closed the results channel for the big one; both were
        # spooled (the big one as its error), their tasks acknowledged.
        self.assertEqual(self.publisher.broker_limit, self.limit)
        self.assertEqual(self.spooled_files(), sorted([big.task_id, small.task_id]))
        self.assertEqual(self.tasks_channel.settlements, [("ack", 2, True)])
        self.connect_results()
        self.confirm_all()
        results = self.results()
        self.assert_too_large(results[big.task_id][0])
        self.assertEqual(results[small.task_id][0].data, serialize("small"))
        # The limit is remembered: a later big result is replaced before it
        # is sent, costing no channel.
        self.interchange.answer([later.task_id], raw_data="y" * 3000)
        self.interchange.answer([fine.task_id], data="fine")
        self.settle()
        self.assertFalse(self.results_channel.closed)
        self.confirm_all()
        results = self.results()
        self.assert_too_large(results[later.task_id][0])
        self.assertEqual(results[fine.task_id][0].data, serialize("fine"))
        self.assertEqual(self.results_conn.connections, 2)
        self.assertEqual(self.spooled_files(), [])
        self.assertEqual(len(self.ledger), 0)

    def test_spooled_result_too_large_replaced_on_disk(self) -> None:
        self.start()
        big, small = make_tasks(2)
        self.publish_tasks([big, small])
        self.results_conn.lose()
        self.settle()
        self.interchange.answer([big.task_id], raw_data="x" * 5000)
        self.interchange.answer([small.task_id], data="small")
        self.settle()
        self.assertEqual(self.spooled_files(), sorted([big.task_id, small.task_id]))
        self.broker.max_message_size = self.limit
        self.connect_results()
        # Refused: the results channel was closed, and the big result replaced
        # on disk by its error, before it is sent again.
        self.assertEqual(self.publisher.broker_limit, self.limit)
        self.assertIsNone(self.results_conn.client)
        with open(os.path.join(self.spool_dir, big.task_id), "rb") as f:
            self.assert_too_large(read_result(f.read()))
        self.connect_results()
        self.confirm_all()
        results = self.results()
        self.assert_too_large(results[big.task_id][-1])
        self.assertEqual(results[small.task_id][-1].data, serialize("small"))
        self.assertEqual(self.spooled_files(), [])
        self.assertEqual(self.results_conn.connections, 3)

    def test_replacement_not_written_is_still_sent(self) -> None:
        """If the replacement cannot be written to the spool, it is sent from memory."""
        self.start()
        [big] = make_tasks(1)
        self.publish_tasks([big])
        self.results_conn.lose()
        self.settle()
        self.interchange.answer([big.task_id], raw_data="x" * 5000)
        self.settle()
        self.broker.max_message_size = self.limit
        self.threads.failure = OSError(errno.EIO, "I/O error")
        self.connect_results()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        with open(os.path.join(self.spool_dir, big.task_id), "rb") as f:
            self.assertFalse(read_result(f.read()).is_error)  # the old one, still
        self.threads.failure = None
        self.connect_results()
        self.confirm_all()
        self.assert_too_large(self.results()[big.task_id][-1])
        self.assertEqual(self.spooled_files(), [])


class DrainTests(TransportTestCase):
    """A clean stop: no new tasks, unstarted ones released, running ones waited for."""

    def test_drain(self) -> None:
        self.start()
        tasks = make_tasks(5)
        self.publish_tasks(tasks)
        channel = self.tasks_channel
        running = ids(tasks[:2])
        self.interchange.start_tasks(running)
        drained = self.transport.drain(grace=10)
        self.assertIn("basic_cancel", channel.requests)
        self.assertEqual(self.broker.queues[TASK_QUEUE].consumers, [])
        # The three not started went back to the broker, at once.
        self.assertEqual(channel.settlements, [("reject", tag, True) for tag in (3, 4, 5)])
        self.assertEqual(len(self.queued()), 3)
        self.assertNoResult(drained)
        client = self.tasks_conn.client
        assert client is not None
        flushes = client.flushes
        self.interchange.answer(running)
        self.settle()
        self.assertNoResult(drained)  # not before the results are safe
        self.results_channel.confirm()
        # Drained, with the acknowledgements sent (and flushed) already.
        self.successResultOf(drained)
        self.assertEqual(channel.settlements[3:], [("ack", 2, True)])
        self.assertEqual(client.flushes, flushes + 1)
        self.successResultOf(self.transport.drain(grace=10))  # drained already
        # Nothing more is taken.
        self.publish_tasks(make_tasks(1))
        self.assertEqual(len(self.interchange.submissions), 5)

    def test_tasks_received_not_yet_handed_over_are_released(self) -> None:
        self.start()
        tasks = make_tasks(3)
        self.broker.enqueue(TASK_QUEUE, *[pack(task) for task in tasks])
        self.broker.dispatch()  # delivered in this turn: the hand-over is due next turn
        self.successResultOf(self.transport.drain(grace=10))
        self.settle()
        self.assertEqual(self.interchange.submissions, {})
        self.assertEqual(
            self.tasks_channel.settlements, [("reject", tag, True) for tag in (1, 2, 3)]
        )
        self.assertEqual(self.ledger.unacked, 0)

    def test_drain_gives_up_after_grace(self) -> None:
        self.start()
        [task] = make_tasks(1)
        self.publish_tasks([task])
        self.interchange.start_tasks()
        drained = self.transport.drain(grace=10)
        second = self.transport.drain(grace=60)  # joins the drain under way
        self.clock.advance(9.9)
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.successResultOf(drained)
        self.successResultOf(second)
        self.assertIn(task.task_id, self.ledger)
        self.assertEqual(self.tasks_channel.settlements, [])
        self.successResultOf(self.stop())
        # Its delivery goes back with the channel, for the next instance.
        self.assertEqual([m.redelivered for m in self.queued()], [True])

    def test_deliveries_during_drain_held(self) -> None:
        """Tasks delivered while the consumer's cancel is on its way are
        neither run nor acknowledged: they go back with the channel."""
        self.start()
        [running] = make_tasks(1)
        self.publish_tasks([running])
        self.interchange.start_tasks()
        self.broker.hold("basic_cancel")
        drained = self.transport.drain(grace=10)
        late = make_tasks(2)
        self.publish_tasks(late)
        self.assertEqual(self.transport.counts["tasks_held_while_draining"], 2)
        self.assertEqual(list(self.interchange.submissions), [running.task_id])
        self.broker.answer_held("basic_cancel")
        self.interchange.answer()
        self.settle()
        self.results_channel.confirm()
        self.successResultOf(drained)
        channel = self.tasks_channel
        self.assertEqual(channel.settlements, [("ack", 1, True)])
        self.assertEqual(sorted(channel.unacked), [2, 3])
        self.successResultOf(self.stop())
        self.assertEqual([m.body for m in self.queued()], [pack(task) for task in late])

    def test_failed_cancel_does_not_stop_the_drain(self) -> None:
        self.start()
        self.publish_tasks(make_tasks(1))
        channel = self.tasks_channel
        self.broker.refuse("basic_cancel", 406, "PRECONDITION_FAILED - no")
        drained = self.transport.drain(grace=10)
        self.settle()
        # The channel is gone with the refusal, its delivery back in the queue.
        self.successResultOf(drained)
        self.assertTrue(channel.closed)
        self.assertEqual([m.redelivered for m in self.queued()], [True])
        # The connection is set up again (the real service reconnects): its
        # consumer is cancelled at once, and nothing is taken.
        channel = self.connect_tasks()
        self.assertEqual(channel.requests[-2:], ["basic_consume", "basic_cancel"])
        self.assertEqual(len(self.queued()), 1)
        self.assertEqual(len(self.interchange.submissions), 1)

    def test_drain_survives_an_error(self) -> None:
        """An error while draining is logged; the drain still ends."""
        self.start()

        def broken() -> List[str]:
            raise RuntimeError("the interchange is broken")

        self.interchange.withdraw_unstarted = broken  # type: ignore[method-assign]
        self.successResultOf(self.transport.drain(grace=10))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def stop(self) -> Any:
        stopped = self.transport.stopService()
        self.settle()
        return stopped


class StatusReportTests(TransportTestCase):
    def report(self) -> EPStatusReport:
        return EPStatusReport(ENDPOINT_ID, {"heartbeat_period": 30})

    def test_published_confirmed_never_spooled(self) -> None:
        self.start()
        sent = self.transport.publish_status(self.report())
        [message] = self.broker.published
        self.assertEqual(message.routing_key, topology.results_routing_key(ENDPOINT_ID))
        report = unpack(message.body)
        assert isinstance(report, EPStatusReport)
        self.assertEqual(report.global_state, {"heartbeat_period": 30})
        self.assertNoResult(sent)
        self.results_channel.confirm()
        self.successResultOf(sent)
        refused = self.transport.publish_status(self.report())
        self.results_channel.nack_publish()
        self.failureResultOf(refused, PublishFailed)
        self.settle()
        self.assertEqual(self.spooled_files(), [])
        self.assertEqual(self.publisher.spooled, 0)

    def test_not_connected(self) -> None:
        self.start(connect=False)
        self.failureResultOf(self.transport.publish_status(self.report()), PublishFailed)


class ConnectionTests(TransportTestCase):
    """Set-up, fatal errors and the end of the service."""

    def test_ready_once_both_connected(self) -> None:
        self.start(connect=False)
        ready = self.transport.when_ready()
        self.connect_tasks()
        self.assertNoResult(ready)
        self.connect_results()
        self.successResultOf(ready)
        fields = self.transport.status_fields()
        self.assertEqual(fields["broker_tasks_connection"], "connected")
        self.assertEqual(fields["broker_results_connection"], "connected")
        self.assertEqual(self.transport.ready_info(), {"endpoint_id": ENDPOINT_ID})

    def test_missing_queue_is_fatal(self) -> None:
        del self.broker.queues[TASK_QUEUE]
        self.start(connect=False)
        ready = self.transport.when_ready()
        connected = self.tasks_conn.connect()
        self.settle()
        self.failureResultOf(connected, AMQPError)
        error = self.failureResultOf(ready, StartupError).value
        self.assertIn(f"queue '{TASK_QUEUE}'", error.message)
        self.assertEqual(error.exit_code, 69)
        self.assertEqual([code for _, code in self.fatal], [69])

    def test_missing_results_exchange_is_fatal(self) -> None:
        self.broker.exchanges.discard(topology.RESULTS_EXCHANGE)
        self.start(connect=False)
        connected = self.results_conn.connect()
        self.settle()
        error = self.failureResultOf(connected, AMQPError).value
        self.assertTrue(error.fatal)
        self.assertIn("no exchange 'results'", error.message)
        self.assertEqual(len(self.fatal), 1)

    def test_queue_consumed_by_another_instance_is_fatal(self) -> None:
        other = self.broker.connection_service(self.clock, broker_info().tasks.url, self._consume)
        other.startService()
        self.successResultOf(other.connect())
        self.start(connect=False)
        connected = self.tasks_conn.connect()
        self.settle()
        error = self.failureResultOf(connected, AMQPError).value
        self.assertIn("already consumed by another endpoint instance", error.message)
        self.assertEqual(self.tasks_conn.state(), "failed")
        self.assertEqual([code for _, code in self.fatal], [69])
        stopped = other.stopService()
        self.settle()
        self.successResultOf(stopped)

    async def _consume(self, client: Any) -> None:
        channel = await client.open_channel(1)
        await channel.basic_consume(queue=TASK_QUEUE, consumer_tag="other", exclusive=True)

    def test_own_stale_consumer_retried_then_fatal(self) -> None:
        """Soon after a lost connection, the queue held by this endpoint's own
        half-open old connection is retried, not fatal; for a while only."""
        self.start(heartbeat=10)
        self.clock.advance(100)
        self.tasks_conn.lose(half_open=True)
        self.settle()
        self.clock.advance(5)
        attempt = self.tasks_conn.connect()
        self.settle()
        error = self.failureResultOf(attempt, AMQPError).value
        self.assertFalse(error.fatal)
        self.assertEqual(error.retry_after, 5.0)
        self.assertEqual(self.transport.counts["stale_consumer_retries"], 1)
        self.settle()
        # The broker drops the half-open connection: the next attempt works.
        self.broker.drop_half_open()
        self.connect_tasks()
        self.assertEqual(self.fatal, [])
        # Past the window (3 heartbeat intervals), the refusal is fatal.
        self.tasks_conn.lose(half_open=True)
        self.settle()
        self.clock.advance(30)
        attempt = self.tasks_conn.connect()
        self.settle()
        self.assertTrue(self.failureResultOf(attempt, AMQPError).value.fatal)
        self.assertEqual(len(self.fatal), 1)

    def test_consumer_cancelled_by_the_broker_is_fatal(self) -> None:
        self.start()
        self.broker.delete_queue(TASK_QUEUE)
        self.settle()
        [(message, code)] = self.fatal
        self.assertIn("register the endpoint again", message)
        self.assertEqual(self.tasks_conn.state(), "failed")

    def test_login_refused_exit_code(self) -> None:
        self.assertEqual(Transport._exit_code(AMQPError("the broker refused the login", 403)), 77)

    def test_stop_leaves_nothing_running(self) -> None:
        """The periodic resend, delayed releases, the connections: all ended."""
        self.start()
        self.publish_tasks(make_tasks(2))
        stopped = self.transport.stopService()
        self.assertNoResult(stopped)
        self.settle()
        self.successResultOf(stopped)
        self.assertEqual(self.transport.status_fields()["broker_tasks_connection"], "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])
