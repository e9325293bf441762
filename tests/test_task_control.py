"""Real-time task states, cancel and remote stop, part by part (fakes and a Clock).

The end-to-end tests with real processes are in ``test_task_control_e2e``.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from funcx_endpoint.endpoint.states import TaskStatePublisher
from funcx_endpoint.executor.dispatcher import TaskDispatcher
from funcx_endpoint.executor.interface import ITaskStateListener
from funcx_endpoint.executor.routing import LeastLoadedRouting
from funcx_endpoint.sdk.errors import TaskCancelled, TaskExecutionFailed
from funcx_endpoint.sdk.tasks import task_record
from funcx_endpoint.testing.interchanges import CollectingSink
from funcx_endpoint.wire import (
    ENDPOINT_COMMANDS,
    MESSAGE_BATCHES,
    TASK_STATES,
    EndpointCommand,
    MessageError,
    Result,
    Task,
    TaskStatesMessage,
    TaskTransition,
    pack,
    pack_payload,
    unpack,
)
from funcx_endpoint.wire.amp import StartTimes
from tests.test_transport_units import TASK_QUEUE, TransportTestCase, broker_info
from tests.test_webservice_clock import ClockedServiceTestCase, add

EID = str(uuid.uuid4())


def new_id() -> str:
    return str(uuid.uuid4())


class WireTests(SynchronousTestCase):
    def test_round_trips(self) -> None:
        task_id = new_id()
        command = EndpointCommand.cancel([task_id], "why", 12.5)
        self.assertEqual(unpack(pack(command)), command)
        stop = EndpointCommand.stop()
        self.assertEqual(unpack(pack(stop)), stop)
        states = TaskStatesMessage(EID, {task_id: [TaskTransition(5, "running", "manager")]})
        self.assertEqual(unpack(pack(states)), states)

    def test_bad_commands(self) -> None:
        for data in (
            {"command": "explode"},
            {"command": "cancel", "task_ids": "not-a-list"},
            {"command": "cancel", "task_ids": ["not-a-uuid"]},
            {"command": "stop", "issued_at": "yesterday"},
        ):
            body = pack(EndpointCommand.stop()).replace(
                b'{"command":"stop","task_ids":[],"reason":null,"issued_at":null}',
                __import__("json").dumps(data).encode(),
            )
            with self.assertRaises(MessageError):
                unpack(body)

    def test_start_times_argument(self) -> None:
        argument = StartTimes()
        pairs = [(new_id(), 1), (new_id(), 2**62)]
        self.assertEqual(argument.from_bytes(argument.to_bytes(pairs)), pairs)


class _Info:
    def __init__(self, features: Tuple[str, ...]) -> None:
        self.endpoint_id = EID
        self.features = frozenset(features)


class StartReportsFailureTests(SynchronousTestCase):
    def test_a_send_that_fails_is_one_warning(self) -> None:
        from twisted.logger import globalLogPublisher

        from funcx_endpoint.manager.started import StartReports

        class Broken:
            def sendBox(self, box: Any) -> None:
                raise ConnectionError("the interchange went away")

        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        reports = StartReports(clock, lambda: Broken(), delay=0.02)
        reports.started(new_id(), 1)
        clock.advance(0.02)

        def warnings() -> List[Dict[str, Any]]:
            return [e for e in events if "Could not report" in e.get("log_format", "")]

        [warning] = warnings()
        self.assertEqual(warning["n"], 1)
        self.assertEqual(clock.getDelayedCalls(), [])
        # Nothing is kept for another try: the result carries the state.
        clock.advance(1)
        self.assertEqual(len(warnings()), 1)


class StatePublisherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: List[TaskStatesMessage] = []
        self.info: Any = _Info((TASK_STATES,))
        self.states = TaskStatePublisher(self.clock, lambda: self.info, self.publish, 0.25)
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))
        self.addCleanup(self.states.stop)

    def publish(self, message: Any) -> Deferred[None]:
        self.sent.append(message)
        return succeed(None)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ITaskStateListener, self.states))

    def test_states_that_last_the_interval_are_sent(self) -> None:
        # interval 0.25: a state is sent once it has lasted 0.25 s (looked at
        # when the oldest pending state settles).
        a, b, c, d = new_id(), new_id(), new_id(), new_id()
        self.states.transition(a, TaskTransition(1, "waiting-for-nodes", "interchange"))
        self.states.transition(b, TaskTransition(3, "waiting-for-launch", "interchange"))
        self.states.transition(c, TaskTransition(4, "running", "manager"))
        self.states.finished([c])  # its result carries its states
        self.clock.advance(0.125)
        # a moves on: its waiting state lasted 0.125 s, it is not sent.
        self.states.transition(a, TaskTransition(2, "running", "manager"))
        self.states.transition(d, TaskTransition(5, "waiting-for-nodes", "interchange"))
        self.clock.advance(0.125)
        [message] = self.sent
        self.assertEqual(message.endpoint_id, EID)
        self.assertEqual(
            {k: [t.state.value for t in v] for k, v in message.task_statuses.items()},
            {b: ["waiting-for-launch"]},
        )
        self.states.finished([d])  # ended before its state settled: never sent
        self.clock.advance(0.125)
        self.assertEqual(len(self.sent), 2)
        self.assertEqual(
            {k: [t.state.value for t in v] for k, v in self.sent[1].task_statuses.items()},
            {a: ["running"]},
        )
        self.clock.advance(10)
        self.assertEqual(len(self.sent), 2)  # nothing new, nothing sent

    def test_a_publish_that_fails_is_counted_and_nothing_is_kept(self) -> None:
        from twisted.internet.defer import fail

        failures = [ConnectionError("the results connection closed")]
        self.states = TaskStatePublisher(
            self.clock, lambda: self.info, lambda message: fail(failures.pop()), 0.25
        )
        self.states.transition(new_id(), TaskTransition(1, "running", "manager"))
        self.clock.advance(0.25)
        self.assertEqual((self.states.sent, self.states.failed), (0, 1))
        self.assertEqual(failures, [])  # tried once; the result carries the state
        self.clock.advance(10)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_at_most_max_tasks_per_message(self) -> None:
        self.states.max_tasks = 2
        ids = [new_id() for _ in range(3)]
        for task_id in ids:
            self.states.transition(task_id, TaskTransition(1, "running", "manager"))
        self.clock.advance(0.25)
        self.assertEqual([list(m.task_statuses) for m in self.sent], [ids[:2]])
        # The rest, already settled, goes a quarter interval later.
        self.clock.advance(0.0625)
        self.assertEqual([list(m.task_statuses) for m in self.sent], [ids[:2], ids[2:]])

    def test_a_stream_of_short_tasks_sends_nothing(self) -> None:
        for _ in range(100):
            task_id = new_id()
            self.states.transition(task_id, TaskTransition(1, "waiting-for-launch", "interchange"))
            self.clock.advance(0.01)
            self.states.transition(task_id, TaskTransition(2, "running", "manager"))
            self.clock.advance(0.01)
            self.states.finished([task_id])
        self.clock.advance(1)
        self.assertEqual(self.sent, [])

    def test_nothing_without_the_feature(self) -> None:
        self.info = _Info((MESSAGE_BATCHES,))
        self.states.transition(new_id(), TaskTransition(1, "running", "manager"))
        self.clock.advance(1)
        self.assertEqual(self.sent, [])

    def test_dispatcher_tells_running_and_finished(self) -> None:
        sink = CollectingSink()
        dispatcher = TaskDispatcher(self.clock, sink, LeastLoadedRouting())
        heard: List[Tuple[str, str]] = []
        finished: List[str] = []

        class Listener:
            def transition(self, task_id: str, transition: TaskTransition) -> None:
                heard.append((task_id, transition.state.value))

            def finished(self, task_ids: List[str]) -> None:
                finished.extend(task_ids)

        dispatcher.state_listener = Listener()
        task = Task(new_id(), "buffer")
        dispatcher.submit([task])
        self.assertEqual(heard, [(task.task_id, "waiting-for-nodes")])
        # Not held by any manager: a start report for it is ignored.
        dispatcher.tasks_started(object(), [(task.task_id, 7)])
        self.assertEqual(len(heard), 1)
        self.assertTrue(dispatcher.cancel(task.task_id))
        self.clock.advance(0)
        self.assertEqual(finished, [task.task_id])


class IntakeCommandTests(TransportTestCase):
    """Commands on the task queue, as the service sends them."""

    def setUp(self) -> None:
        super().setUp()
        self.stops: List[str] = []
        self.start()
        self.transport.intake.on_stop = self.stops.append

    def command(self, command: EndpointCommand) -> None:
        self.publish_raw(pack(command))

    def cancelled(self) -> Dict[str, str]:
        return {
            task_id: results[0].error_details.user_message  # type: ignore[union-attr]
            for task_id, results in self.results().items()
            if results[0].error_details is not None
            and results[0].error_details.code == "TaskCancelled"
        }

    def test_cancel_before_the_task_arrives(self) -> None:
        task = Task(new_id(), "buffer")
        self.command(EndpointCommand.cancel([task.task_id]))
        self.assertEqual(self.queued(), [])  # the command is acknowledged
        self.publish_tasks([task])
        self.assertNotIn(task.task_id, self.interchange.held)
        self.assertIn("before it reached the endpoint", self.cancelled()[task.task_id])
        self.confirm_all()
        self.assertEqual(self.queued(), [])

    def test_cancel_in_the_same_turn(self) -> None:
        task = Task(new_id(), "buffer")
        self.broker.enqueue(TASK_QUEUE, pack(task), pack(EndpointCommand.cancel([task.task_id])))
        self.settle()
        self.assertNotIn(task.task_id, self.interchange.held)
        self.assertIn(task.task_id, self.cancelled())

    def test_cancel_held_by_the_interchange(self) -> None:
        asked: List[str] = []
        self.interchange.cancel = lambda task_id: asked.append(task_id) or True  # type: ignore
        task = Task(new_id(), "buffer")
        self.publish_tasks([task])
        self.command(EndpointCommand.cancel([task.task_id]))
        self.assertEqual(asked, [task.task_id])
        self.assertEqual(self.transport.intake.counts["tasks_cancelled"], 1)

    def test_cancel_after_the_result_is_a_no_op(self) -> None:
        task = Task(new_id(), "buffer")
        self.publish_tasks([task])
        self.interchange.answer([task.task_id], data=1)
        self.command(EndpointCommand.cancel([task.task_id]))
        self.assertEqual(self.cancelled(), {})

    def test_stop(self) -> None:
        self.command(EndpointCommand.stop("go home", issued_at=None))
        self.assertEqual(self.stops, ["go home (remote stop)"])

    def test_stop_issued_before_registration_is_ignored(self) -> None:
        self.transport.intake.info = broker_info_at(100.0)
        self.command(EndpointCommand.stop("old", issued_at=99.0))
        self.assertEqual(self.stops, [])
        self.command(EndpointCommand.stop("new", issued_at=101.0))
        self.assertEqual(self.stops, ["new (remote stop)"])


def broker_info_at(registered_at: float) -> Any:
    import attr

    return attr.evolve(broker_info(), registered_at=registered_at)


class ServiceTests(ClockedServiceTestCase):
    """The service's side: cancel API, commands, states, the lock."""

    def call(self, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        return self.request(method, path, token=self.service.issue_token(), json=body)

    def done(self, d: Deferred[Any]) -> Any:
        self.clock.advance(0)
        return self.successResultOf(d)

    def endpoint(self, *features: str) -> str:
        endpoint_id = self.service.add_endpoint(wire_features=list(features))
        self.clock.advance(0)
        return endpoint_id

    def submit(self, endpoint_id: str, count: int = 1) -> List[str]:
        from funcx_endpoint.wire import pack_function

        code, answer = self.call(
            "POST",
            "/v2/functions",
            {"function_name": "add", "function_code": pack_function(add), "entry_point": "add"},
        )
        self.assertEqual(code, 200, answer)
        function_id = answer["function_uuid"]
        tasks = [[function_id, endpoint_id, pack_payload((1,), {})] for _ in range(count)]
        code, answer = self.call("POST", "/v2/submit", {"tasks": tasks})
        self.assertEqual(code, 200, answer)
        self.clock.advance(0)
        return [r["task_uuid"] for r in answer["results"]]

    def test_registration_agrees_to_the_features(self) -> None:
        code, answer = self.call(
            "POST",
            "/v2/endpoints",
            {
                "endpoint_name": "e",
                "metadata": {"wire_features": [TASK_STATES, "future-thing", ENDPOINT_COMMANDS]},
            },
        )
        self.assertEqual(code, 200, answer)
        self.assertEqual(answer["wire_features"], [TASK_STATES, ENDPOINT_COMMANDS])
        self.assertIsInstance(answer["registered_at"], float)

    def test_cancel_a_pending_task(self) -> None:
        endpoint_id = self.endpoint(ENDPOINT_COMMANDS)
        [task_id] = self.submit(endpoint_id)
        code, answer = self.call("POST", f"/v2/tasks/{task_id}/cancel", {})
        self.assertEqual(code, 200, answer)
        self.assertEqual(answer, {"task_id": task_id, "cancelled": True, "status": "failed"})
        code, task = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertEqual(task["status"], "failed")
        self.assertEqual(task["error_details"]["code"], "TaskCancelled")
        record = task_record(task_id, task)
        self.assertEqual(record["status"], "cancelled")
        self.assertIsInstance(record["exception"], TaskCancelled)
        self.assertIsInstance(record["exception"], TaskExecutionFailed)
        [(to, command)] = self.service.commands
        self.assertEqual(
            (to, command.command, command.task_ids), (endpoint_id, "cancel", [task_id])
        )
        # The endpoint's result comes later: a duplicate, ignored.
        self.done(self.service.set_result(task_id, 3))
        code, task = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertEqual(task["error_details"]["code"], "TaskCancelled")
        # Cancelling again changes nothing.
        code, answer = self.call("POST", "/v2/batch_cancel", {"task_ids": [task_id]})
        self.assertEqual(answer["results"][task_id]["cancelled"], False)
        self.assertEqual(len(self.service.commands), 1)

    def test_result_first_wins(self) -> None:
        endpoint_id = self.endpoint(ENDPOINT_COMMANDS)
        [task_id] = self.submit(endpoint_id)
        self.done(self.service.set_result(task_id, 3))
        code, answer = self.call("POST", f"/v2/tasks/{task_id}/cancel", {})
        self.assertEqual(answer, {"task_id": task_id, "cancelled": False, "status": "success"})
        code, task = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertEqual(task["status"], "success")
        self.assertEqual(self.service.commands, [])

    def test_funcx_1_endpoint_gets_no_command(self) -> None:
        endpoint_id = self.endpoint()
        ids = self.submit(endpoint_id, 2)
        code, answer = self.call("POST", "/v2/batch_cancel", {"task_ids": ids})
        self.assertEqual(
            {t: r["cancelled"] for t, r in answer["results"].items()}, {t: True for t in ids}
        )
        self.assertEqual(self.service.commands, [])
        code, answer = self.call("POST", f"/v2/endpoints/{endpoint_id}/lock", {})
        self.assertEqual(answer, {"endpoint_id": endpoint_id, "locked": True})
        self.assertEqual(self.service.commands, [])

    def test_someone_elses_task_is_not_found(self) -> None:
        endpoint_id = self.endpoint()
        [task_id] = self.submit(endpoint_id)
        code, answer = self.request(
            "POST",
            f"/v2/tasks/{task_id}/cancel",
            token=self.service.issue_token("mallory"),
            json={},
        )
        self.assertEqual((code, answer["code"]), (404, "TASK_NOT_FOUND"))
        code, answer = self.call("POST", "/v2/batch_cancel", {"task_ids": "x"})
        self.assertEqual(code, 400)

    def register(self, endpoint_id: str, **metadata: Any) -> Tuple[int, Any]:
        return self.call(
            "POST",
            "/v2/endpoints",
            {"endpoint_name": "e", "endpoint_uuid": endpoint_id, "metadata": metadata},
        )

    def test_lock_kept_until_the_owner_starts_it(self) -> None:
        """Restarts that are no one's decision stay refused and keep the lock; the
        owner's start is refused once more and clears it."""
        endpoint_id = self.endpoint(ENDPOINT_COMMANDS)
        self.call("POST", f"/v2/endpoints/{endpoint_id}/lock", {})
        for _ in range(3):
            code, answer = self.register(endpoint_id, wire_features=[ENDPOINT_COMMANDS])
            self.assertEqual((code, answer["code"]), (423, "ENDPOINT_LOCKED"))
            self.assertIn("until its owner starts it", answer["message"])
        owner = {"wire_features": [ENDPOINT_COMMANDS], "clear_lock": True}
        code, answer = self.register(endpoint_id, **owner)
        self.assertEqual((code, answer["code"]), (423, "ENDPOINT_LOCKED"))
        self.assertIn("the lock is cleared", answer["message"])
        code, answer = self.register(endpoint_id, wire_features=[ENDPOINT_COMMANDS])
        self.assertEqual(code, 200, answer)
        code, answer = self.call("GET", f"/v2/endpoints/{endpoint_id}")
        self.assertNotIn("clear_lock", answer.get("metadata", {}))

    def test_lock_sends_stop(self) -> None:
        endpoint_id = self.endpoint(ENDPOINT_COMMANDS)
        code, answer = self.call("POST", f"/v2/endpoints/{endpoint_id}/lock", {})
        self.assertEqual(answer, {"endpoint_id": endpoint_id, "locked": True, "stop_sent": True})
        [(to, command)] = self.service.commands
        self.assertEqual((to, command.command), (endpoint_id, "stop"))
        self.assertEqual(command.issued_at, self.clock.seconds())

    def test_task_states_move_the_status_without_a_report(self) -> None:
        endpoint_id = self.endpoint(TASK_STATES)
        [task_id] = self.submit(endpoint_id)
        code, before = self.call("GET", f"/v2/endpoints/{endpoint_id}/status")
        message = TaskStatesMessage(
            endpoint_id, {task_id: [TaskTransition(1, "running", "manager")]}
        )
        self.done(self.service.send(endpoint_id, message))
        code, task = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertEqual(task["status"], "running")
        code, after = self.call("GET", f"/v2/endpoints/{endpoint_id}/status")
        self.assertEqual(after["logs"], before["logs"])  # not a status report
        # Another endpoint's states are dropped.
        other = self.endpoint(TASK_STATES)
        [second] = self.submit(endpoint_id)
        forged = TaskStatesMessage(endpoint_id, {second: [TaskTransition(1, "running", "manager")]})
        self.done(self.service.send(other, forged))
        code, task = self.call("GET", f"/v2/tasks/{second}")
        self.assertEqual(task["status"], "waiting-for-ep")

    def test_result_of_a_cancelled_task(self) -> None:
        # A Result message is what a cancelled task's endpoint sends: TaskCancelled.
        endpoint_id = self.endpoint(ENDPOINT_COMMANDS)
        [task_id] = self.submit(endpoint_id)
        self.done(
            self.service.send(endpoint_id, Result.failure(task_id, "TaskCancelled", "cancelled"))
        )
        code, task = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertEqual(task_record(task_id, task)["status"], "cancelled")

    def test_sdk_record_says_attempts(self) -> None:
        from funcx_endpoint.wire import ActorName, TaskState, serialize

        endpoint_id = self.endpoint()
        [task_id] = self.submit(endpoint_id)
        code, task = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertNotIn("attempts", task_record(task_id, task))  # not known while pending
        # Sent to a manager, lost with it, sent to another: two attempts.
        launch = TaskTransition(1, TaskState.WAITING_FOR_LAUNCH, ActorName.INTERCHANGE)
        self.done(
            self.service.send(endpoint_id, Result.success(task_id, serialize(2), [launch, launch]))
        )
        code, task = self.call("GET", f"/v2/tasks/{task_id}")
        record = task_record(task_id, task)
        self.assertEqual((record["result"], record["attempts"]), (2, 2))
        # A funcX service says nothing of attempts: nothing is made up.
        del task["attempts"]
        self.assertNotIn("attempts", task_record(task_id, task))


class StartReportsTests(SynchronousTestCase):
    """The manager tells the interchange of the tasks still running a moment after
    they started, in one box."""

    def test_one_box_per_delay(self) -> None:
        from funcx_endpoint.manager.started import StartReports
        from funcx_endpoint.wire.amp import TasksStarted, read_unanswered

        clock = Clock()
        boxes: List[Any] = []

        class Connection:
            def sendBox(self, box: Any) -> None:
                boxes.append(box)

        connection: Any = Connection()
        reports = StartReports(clock, lambda: connection, delay=0.02)
        a, b, c = new_id(), new_id(), new_id()
        reports.started(a, 1)
        reports.started(b, 2)
        reports.started(c, 3)
        clock.advance(0.01)
        self.assertEqual(boxes, [])
        # c's result came back: its result carries its running transition.
        reports.finished(c)
        clock.advance(0.01)
        [box] = boxes
        self.assertEqual(read_unanswered(TasksStarted, box, connection), [(a, 1), (b, 2)])
        # Only finished tasks: nothing to send.
        reports.started(c, 4)
        reports.finished(c)
        clock.advance(0.02)
        self.assertEqual(len(boxes), 1)
        # Not connected: dropped (the status report and the result carry the states).
        connection = None
        reports.started(a, 3)
        clock.advance(0.02)
        self.assertEqual(len(boxes), 1)
        reports.started(b, 4)
        reports.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
