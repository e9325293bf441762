"""funcx_endpoint.wire.messages: the queue messages (messagepack v1)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.wire import (
    PROTOCOL_VERSION,
    ActorName,
    Container,
    ContainerImage,
    EPStatusReport,
    ErrorCode,
    MessageError,
    Result,
    ResultErrorDetails,
    Task,
    TaskState,
    TaskTransition,
    deserialize,
    pack,
    unpack,
)

TASK_ID = "10a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e"
CONTAINER_ID = "20a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e"
ENDPOINT_ID = "0c1d2e3f-0000-4000-8000-000000000001"

# Written by funcx_common 0.0.25 (the real packer) for the same messages.
REAL_TASK = (
    b'\x01{"message_type":"task","data":{"task_id":"10a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e",'
    b'"container_id":null,"container":null,"task_buffer":"xxxxx"}}'
)
REAL_TASK_WITH_CONTAINER = (
    b'\x01{"message_type":"task","data":{"task_id":"10a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e",'
    b'"container_id":"20a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e",'
    b'"container":{"container_id":"20a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e","name":"c",'
    b'"images":[{"image_type":"docker","location":"py:3","created_at":1,"modified_at":2,'
    b'"build_status":null,"build_stderr":null}]},"task_buffer":"\\u00e9\\n"}}'
)
REAL_RESULT = (
    b'\x01{"message_type":"result","data":{"task_id":"10a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e",'
    b'"data":"00\\ngARLKi4=\\n","error_details":{"code":"X","user_message":"m"},'
    b'"task_statuses":[{"timestamp":5,"state":"running","actor":"manager"}]}}'
)
REAL_STATUS_REPORT = (
    b'\x01{"message_type":"ep_status_report","data":{'
    b'"endpoint_id":"10a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e","global_state":{"a":1},'
    b'"task_statuses":{"10a3753d-51b3-4a6c-9a8c-2f3a2b1c0d4e":'
    b'[{"timestamp":5,"state":"running","actor":"manager"}]}}}'
)

# Captured from a real funcx-endpoint 1.0.13 on RabbitMQ (ids and timestamps filled in).
CAPTURED_REPORT = (
    b'\x01{"message_type":"ep_status_report","data":{"endpoint_id":'
    b'"0c1d2e3f-0000-4000-8000-000000000001","global_state":{"managers":1,"total_workers":2,'
    b'"idle_workers":2,"pending_tasks":0,"outstanding_tasks":{"RAW":0}},"task_statuses":{}}}'
)
CAPTURED_REPORT_PENDING = (
    b'\x01{"message_type":"ep_status_report","data":{"endpoint_id":'
    b'"0c1d2e3f-0000-4000-8000-000000000001","global_state":{"managers":0,"total_workers":0,'
    b'"idle_workers":0,"pending_tasks":3,"outstanding_tasks":{"RAW":3}},"task_statuses":'
    b'{"8caab4e6-8c9e-4f5e-b0a6-6c8f2f1e3d21":[{"timestamp":1795226228083938204,'
    b'"state":"waiting-for-nodes","actor":"interchange"}]}}}'
)
CAPTURED_REPORT_FINAL = (
    b'\x01{"message_type":"ep_status_report","data":{"endpoint_id":'
    b'"0c1d2e3f-0000-4000-8000-000000000001","global_state":{"heartbeat_period":0},'
    b'"task_statuses":{}}}'
)
CAPTURED_RESULT = (
    b'\x01{"message_type":"result","data":{"task_id":"10a3753d-9c1f-4d6e-8b7a-3f2e1d0c9b8a",'
    b'"data":"00\\ngARLKi4=\\n","error_details":null,"task_statuses":['
    b'{"timestamp":1795226228093938204,"state":"execution-start","actor":"worker"},'
    b'{"timestamp":1795226228094938204,"state":"execution-end","actor":"worker"},'
    b'{"timestamp":1795226228083938204,"state":"waiting-for-nodes","actor":"interchange"},'
    b'{"timestamp":1795226228085938204,"state":"waiting-for-launch","actor":"interchange"}]}}'
)
CAPTURED_FAILURE = (
    b'\x01{"message_type":"result","data":{"task_id":"0500f4f1-2b3c-4d5e-8f70-819203a4b5c6",'
    b'"data":"Traceback (most recent call last):\\n  File \\"<string>\\", line 2, in boom\\n'
    b'ValueError: bad 7\\n","error_details":{"code":"RemoteExecutionError","user_message":'
    b'"An error occurred during the execution of this task"},"task_statuses":['
    b'{"timestamp":1795226228093938204,"state":"execution-start","actor":"worker"}]}}'
)
CAPTURED_TOO_BIG = (
    b'\x01{"message_type":"result","data":{"task_id":"a866d474-1111-4222-8333-944455556666",'
    b'"data":"MaxResultSizeExceeded(15581488, 10485760)","error_details":{"code":'
    b'"MaxResultSizeExceeded","user_message":"remote error: Task result of 15581488B exceeded '
    b'current limit of 10485760B"},"task_statuses":[]}}'
)


def _message(message_type: str, data: Any) -> bytes:
    return b"\x01" + json.dumps({"message_type": message_type, "data": data}).encode()


class WireBytesTests(SynchronousTestCase):
    """pack writes exactly what funcx_common writes."""

    def test_task(self) -> None:
        self.assertEqual(pack(Task(TASK_ID, "xxxxx")), REAL_TASK)

    def test_task_with_container(self) -> None:
        container = Container(
            CONTAINER_ID, "c", [ContainerImage("docker", "py:3", created_at=1, modified_at=2)]
        )
        task = Task(TASK_ID, "é\n", CONTAINER_ID, container)
        self.assertEqual(pack(task), REAL_TASK_WITH_CONTAINER)

    def test_result(self) -> None:
        result = Result(
            TASK_ID,
            "00\ngARLKi4=\n",
            ResultErrorDetails("X", "m"),
            [TaskTransition(5, TaskState.RUNNING, ActorName.MANAGER)],
        )
        self.assertEqual(pack(result), REAL_RESULT)

    def test_status_report(self) -> None:
        report = EPStatusReport(
            TASK_ID, {"a": 1}, {TASK_ID: [TaskTransition(5, "running", "manager")]}
        )
        self.assertEqual(pack(report), REAL_STATUS_REPORT)

    def test_success_result_literal(self) -> None:
        self.assertEqual(
            pack(Result.success(TASK_ID, "00\ngARLKi4=\n")),
            b'\x01{"message_type":"result","data":{"task_id":"' + TASK_ID.encode() + b'",'
            b'"data":"00\\ngARLKi4=\\n","error_details":null,"task_statuses":null}}',
        )

    def test_no_raw_newlines_and_ascii(self) -> None:
        data = pack(Result.failure(TASK_ID, ErrorCode.REMOTE_EXECUTION_ERROR, "é\n", "a\nb\u2603"))
        self.assertNotIn(b"\n", data)
        data[1:].decode("ascii")
        self.assertEqual(data[:1], bytes([PROTOCOL_VERSION]))


class CapturedMessageTests(SynchronousTestCase):
    """Messages as the real funcx-endpoint 1.0.13 sends them."""

    def test_status_report(self) -> None:
        report = unpack(CAPTURED_REPORT)
        assert isinstance(report, EPStatusReport)
        self.assertEqual(report.endpoint_id, ENDPOINT_ID)
        self.assertEqual(report.global_state["total_workers"], 2)
        self.assertEqual(report.global_state["outstanding_tasks"], {"RAW": 0})
        self.assertEqual(report.task_statuses, {})
        self.assertFalse(report.is_final)
        self.assertEqual(pack(report), CAPTURED_REPORT)

    def test_status_report_with_transitions(self) -> None:
        report = unpack(CAPTURED_REPORT_PENDING)
        assert isinstance(report, EPStatusReport)
        [(task_id, [transition])] = report.task_statuses.items()
        self.assertEqual(task_id, "8caab4e6-8c9e-4f5e-b0a6-6c8f2f1e3d21")
        self.assertEqual(transition.timestamp, 1795226228083938204)
        self.assertIs(transition.state, TaskState.WAITING_FOR_NODES)
        self.assertIs(transition.actor, ActorName.INTERCHANGE)
        self.assertEqual(pack(report), CAPTURED_REPORT_PENDING)

    def test_final_report(self) -> None:
        report = unpack(CAPTURED_REPORT_FINAL)
        assert isinstance(report, EPStatusReport)
        self.assertTrue(report.is_final)
        self.assertEqual(report, EPStatusReport.final(ENDPOINT_ID))
        self.assertEqual(pack(EPStatusReport.final(ENDPOINT_ID)), CAPTURED_REPORT_FINAL)

    def test_success(self) -> None:
        result = unpack(CAPTURED_RESULT)
        assert isinstance(result, Result)
        self.assertFalse(result.is_error)
        self.assertIsNone(result.error_details)
        self.assertEqual(deserialize(result.data), 42)
        assert result.task_statuses is not None
        self.assertEqual(
            [(t.state, t.actor) for t in result.task_statuses],
            [
                (TaskState.EXECUTION_START, ActorName.WORKER),
                (TaskState.EXECUTION_END, ActorName.WORKER),
                (TaskState.WAITING_FOR_NODES, ActorName.INTERCHANGE),
                (TaskState.WAITING_FOR_LAUNCH, ActorName.INTERCHANGE),
            ],
        )
        self.assertEqual(pack(result), CAPTURED_RESULT)

    def test_remote_execution_error(self) -> None:
        result = unpack(CAPTURED_FAILURE)
        assert isinstance(result, Result)
        self.assertTrue(result.is_error)
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.REMOTE_EXECUTION_ERROR)
        self.assertTrue(result.data.startswith("Traceback (most recent call last):\n"))
        self.assertTrue(result.data.endswith("ValueError: bad 7\n"))
        self.assertEqual(pack(result), CAPTURED_FAILURE)

    def test_max_result_size(self) -> None:
        result = unpack(CAPTURED_TOO_BIG)
        assert isinstance(result, Result)
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.MAX_RESULT_SIZE_EXCEEDED)
        self.assertEqual(result.task_statuses, [])
        self.assertEqual(pack(result), CAPTURED_TOO_BIG)

    def test_real_packer_bytes_read_back(self) -> None:
        for data in [REAL_TASK, REAL_TASK_WITH_CONTAINER, REAL_RESULT, REAL_STATUS_REPORT]:
            self.assertEqual(pack(unpack(data)), data)


class RoundTripTests(SynchronousTestCase):
    def assertRoundTrip(self, message: Any) -> Any:
        for form in (bytes, bytearray, memoryview):
            again = unpack(form(pack(message)))
            self.assertEqual(again, message)
            self.assertIs(type(again), type(message))
        self.assertEqual(unpack(pack(message).decode("ascii")), message)
        return again

    def test_task(self) -> None:
        self.assertRoundTrip(Task(TASK_ID, "80\n04\n..."))
        image = ContainerImage("singularity", "/img.sif", 10, 20, "ready", "warn\u2603")
        task = Task(
            uuid.UUID(TASK_ID),
            "buf",
            uuid.UUID(CONTAINER_ID),
            Container(CONTAINER_ID, "n", [image]),
        )
        again = self.assertRoundTrip(task)
        assert again.container is not None
        self.assertEqual(again.container.image_for("singularity"), image)
        self.assertIsNone(again.container.image_for("docker"))

    def test_result(self) -> None:
        transitions = [
            TaskTransition.now(TaskState.EXECUTION_START, ActorName.WORKER),
            TaskTransition(1, TaskState.RESULT_ENQUEUED, ActorName.RESULT_PROCESSOR),
        ]
        self.assertRoundTrip(Result.success(TASK_ID, "00\ngARLKi4=\n", transitions))
        self.assertRoundTrip(Result.success(TASK_ID, "lone \ud800 surrogate and \x00"))
        self.assertRoundTrip(
            Result.failure(TASK_ID, ErrorCode.WORKER_LOST, "worker died", None, [])
        )
        self.assertRoundTrip(Result.failure(TASK_ID, "SomeFutureCode", "m", "tb"))

    def test_status_report(self) -> None:
        report = EPStatusReport(
            ENDPOINT_ID,
            {"managers": 2, "outstanding_tasks": {"RAW": 1}, "nested": [1.5, None, "x"]},
            {
                TASK_ID: [TaskTransition(1, "waiting-for-nodes", "interchange")],
                "not-a-uuid": [],
            },
        )
        self.assertRoundTrip(report)

    def test_every_state_and_actor(self) -> None:
        transitions = [TaskTransition(i, state, "endpoint") for i, state in enumerate(TaskState)]
        transitions += [TaskTransition(0, "received", actor) for actor in ActorName]
        again = self.assertRoundTrip(Result.success(TASK_ID, "d", transitions))
        self.assertEqual([t.state for t in again.task_statuses[: len(TaskState)]], list(TaskState))


class ValueTests(SynchronousTestCase):
    def test_enum_values(self) -> None:
        self.assertEqual(
            [state.value for state in TaskState],
            [
                "received",
                "waiting-for-ep",
                "waiting-for-nodes",
                "waiting-for-launch",
                "execution-start",
                "execution-end",
                "running",
                "success",
                "failed",
                "result-received",
                "result-enqueued",
                "action-provider-received",
                "action-provider-task-submitted",
                "action-provider-task-group-in-progress",
                "action-provider-task-group-completed",
                "action-provider-task-group-error",
            ],
        )
        self.assertEqual(
            [actor.value for actor in ActorName],
            [
                "worker",
                "manager",
                "interchange",
                "endpoint",
                "result-processor",
                "web-service",
                "action-provider",
            ],
        )
        self.assertEqual(str(TaskState.WAITING_FOR_EP), "waiting-for-ep")
        self.assertEqual(f"{ActorName.WEB_SERVICE}", "web-service")
        self.assertEqual(TaskState.RUNNING, "running")

    def test_uuid_normalized(self) -> None:
        for form in [
            TASK_ID.upper(),
            TASK_ID.replace("-", ""),
            "{" + TASK_ID + "}",
            "urn:uuid:" + TASK_ID,
            uuid.UUID(TASK_ID),
        ]:
            self.assertEqual(Task(form, "b").task_id, TASK_ID)
        message = _message("task", {"task_id": TASK_ID.upper(), "task_buffer": "b"})
        self.assertEqual(unpack(message), Task(TASK_ID, "b"))

    def test_result_helpers(self) -> None:
        ok = Result.success(TASK_ID, "00\ngARLKi4=\n")
        self.assertFalse(ok.is_error)
        self.assertIsNone(ok.task_statuses)
        failed = Result.failure(TASK_ID, ErrorCode.TASK_TIMEOUT, "took longer than 10 s")
        self.assertTrue(failed.is_error)
        self.assertEqual(failed.data, "took longer than 10 s")
        self.assertEqual(
            failed.error_details, ResultErrorDetails("TaskTimeout", "took longer than 10 s")
        )
        remote = Result.failure(
            TASK_ID, ErrorCode.REMOTE_EXECUTION_ERROR, "An error occurred", "Traceback..."
        )
        self.assertEqual(remote.data, "Traceback...")

    def test_error_codes(self) -> None:
        self.assertEqual(
            {
                ErrorCode.REMOTE_EXECUTION_ERROR,
                ErrorCode.WORKER_LOST,
                ErrorCode.MANAGER_LOST,
                ErrorCode.TASK_TIMEOUT,
                ErrorCode.MAX_RESULT_SIZE_EXCEEDED,
                ErrorCode.FUNCTION_NOT_ALLOWED,
                ErrorCode.DESERIALIZATION_ERROR,
                ErrorCode.TASK_CANCELLED,
                ErrorCode.VERSION_MISMATCH,
                ErrorCode.MALFORMED_TASK,
                ErrorCode.CONTAINER_ERROR,
            },
            {
                "RemoteExecutionError",
                "WorkerLost",
                "ManagerLost",
                "TaskTimeout",
                "MaxResultSizeExceeded",
                "FunctionNotAllowed",
                "DeserializationError",
                "TaskCancelled",
                "VersionMismatch",
                "MalformedTask",
                "ContainerError",
            },
        )
        self.assertIn("CouldNotExecuteUserTaskError", ErrorCode.ALL)
        self.assertEqual(len(ErrorCode.ALL), 12)

    def test_repr_and_equality(self) -> None:
        task = Task(TASK_ID, "b")
        self.assertEqual(
            repr(task),
            f"Task(task_id='{TASK_ID}', task_buffer='b', container_id=None, container=None, "
            "function_id=None)",
        )
        self.assertNotEqual(task, Task(TASK_ID, "c"))
        self.assertNotEqual(task, "not a task")
        self.assertFalse(hasattr(task, "__dict__"))

    def test_constructors_validate(self) -> None:
        bad: list[tuple[Any, str]] = [
            (lambda: Task("nope", "b"), "task_id must be a UUID, got 'nope'"),
            (lambda: Task(TASK_ID, b"b"), "task_buffer must be a string"),
            (lambda: Task(TASK_ID, "b", container={"name": "x"}), "container must be a Container"),
            (lambda: Result(TASK_ID, None), "data must be a string"),
            (lambda: Result(TASK_ID, "d", {"code": "x"}), "error_details must be"),
            (lambda: Result(TASK_ID, "d", None, [{"state": "x"}]), "must hold TaskTransitions"),
            (lambda: Result(TASK_ID, "d", None, "running"), "must be a list"),
            (lambda: TaskTransition(1, "sleeping", "worker"), "unknown task state 'sleeping'"),
            (lambda: TaskTransition(1, "running", "robot"), "unknown actor 'robot'"),
            (lambda: TaskTransition(True, "running", "worker"), "timestamp must be an integer"),
            (lambda: TaskTransition(1.5, "running", "worker"), "timestamp must be an integer"),
            (lambda: ContainerImage("docker", "loc", created_at="yesterday"), "created_at"),
            (lambda: Container(CONTAINER_ID, "n", [{"image_type": "x"}]), "ContainerImages"),
            (lambda: EPStatusReport("x", {}), "endpoint_id must be a UUID"),
            (lambda: EPStatusReport(ENDPOINT_ID, [1]), "global_state must be a mapping"),
            (lambda: EPStatusReport(ENDPOINT_ID, {}, {1: []}), "keys must be task id strings"),
            (lambda: ResultErrorDetails(0, "m"), "error_details.code must be a string"),
        ]
        for build, fragment in bad:
            with self.assertRaises(MessageError) as cm:
                build()
            self.assertIn(fragment, str(cm.exception))
        self.assertEqual(TaskTransition(2.0, "running", "worker").timestamp, 2)

    def test_pack_errors(self) -> None:
        with self.assertRaises(MessageError) as cm:
            pack("not a message")  # type: ignore[arg-type]
        self.assertIn("cannot pack a str", str(cm.exception))
        with self.assertRaises(MessageError) as cm:
            pack(EPStatusReport(ENDPOINT_ID, {"bad": object()}))
        self.assertIn("cannot pack EPStatusReport", str(cm.exception))
        self.assertEqual(cm.exception.message_type, "ep_status_report")


class LenientReadTests(SynchronousTestCase):
    def test_unknown_fields_ignored(self) -> None:
        message = (
            b"\x01"
            + json.dumps(
                {
                    "message_type": "result",
                    "extra": 1,
                    "data": {
                        "task_id": TASK_ID,
                        "data": "d",
                        "error_details": {"code": "c", "user_message": "m", "more": True},
                        "task_statuses": [
                            {"timestamp": 1, "state": "running", "actor": "manager", "x": 0}
                        ],
                        "future_field": {"a": 1},
                    },
                }
            ).encode()
        )
        self.assertEqual(
            unpack(message),
            Result(
                TASK_ID,
                "d",
                ResultErrorDetails("c", "m"),
                [TaskTransition(1, TaskState.RUNNING, ActorName.MANAGER)],
            ),
        )

    def test_optional_fields_may_be_missing(self) -> None:
        self.assertEqual(
            unpack(_message("task", {"task_id": TASK_ID, "task_buffer": "b"})), Task(TASK_ID, "b")
        )
        self.assertEqual(
            unpack(_message("result", {"task_id": TASK_ID, "data": "d"})), Result(TASK_ID, "d")
        )

    def test_image_timestamps_optional(self) -> None:
        """funcx_common drops such a task; we read it, and write the stamps as 0."""
        container = {
            "container_id": CONTAINER_ID,
            "name": "n",
            "images": [{"image_type": "docker", "location": "x"}],
        }
        task = unpack(
            _message("task", {"task_id": TASK_ID, "task_buffer": "b", "container": container})
        )
        assert isinstance(task, Task) and task.container is not None
        image = task.container.images[0]
        self.assertIsNone(image.created_at)
        self.assertIsNone(image.build_status)
        self.assertIn(
            b'"created_at":0,"modified_at":0,"build_status":null,"build_stderr":null', pack(task)
        )

    def test_global_state_alias(self) -> None:
        message = _message(
            "ep_status_report",
            {"endpoint_id": ENDPOINT_ID, "ep_status_report": {"managers": 1}, "task_statuses": {}},
        )
        report = unpack(message)
        assert isinstance(report, EPStatusReport)
        self.assertEqual(report.global_state, {"managers": 1})
        self.assertIn(b'"global_state":{"managers":1}', pack(report))

    def test_status_keys_normalized(self) -> None:
        message = _message(
            "ep_status_report",
            {
                "endpoint_id": ENDPOINT_ID,
                "global_state": {},
                "task_statuses": {TASK_ID.upper(): []},
            },
        )
        report = unpack(message)
        assert isinstance(report, EPStatusReport)
        self.assertEqual(list(report.task_statuses), [TASK_ID])


class UnpackErrorTests(SynchronousTestCase):
    def assertBad(
        self,
        data: Any,
        fragment: str,
        task_id: Optional[str] = None,
        message_type: Optional[str] = None,
    ) -> MessageError:
        with self.assertRaises(MessageError) as cm:
            unpack(data)
        error = cm.exception
        self.assertIsInstance(error, ValueError)
        self.assertIn(fragment, str(error))
        self.assertEqual(error.task_id, task_id)
        self.assertEqual(error.message_type, message_type)
        self.assertEqual(error.error_code, ErrorCode.MALFORMED_TASK)
        return error

    def test_empty(self) -> None:
        self.assertBad(b"", "empty message")
        self.assertBad("", "empty message")

    def test_bad_version_byte(self) -> None:
        self.assertBad(b'\x02{"message_type":"task"}', "unsupported message protocol version 2")
        self.assertBad(b'{"message_type":"task"}', "unsupported message protocol version 123")
        self.assertBad(memoryview(b"\x00{}"), "version 0")
        self.assertBad('{"x": 1}', "unsupported message protocol version 123")

    def test_not_bytes(self) -> None:
        self.assertBad(12, "must be bytes or str, got int")

    def test_not_utf8(self) -> None:
        self.assertBad(b"\x01\xff\xfe", "not valid UTF-8")
        self.assertBad(bytearray(b"\x01\xff"), "not valid UTF-8")

    def test_not_json(self) -> None:
        self.assertBad(b"\x01{not json", "not valid JSON")
        self.assertBad(b"\x01", "not valid JSON")
        self.assertBad(b"\x01" + b"[" * 100_000 + b"]" * 100_000, "not valid JSON")

    def test_not_an_object(self) -> None:
        self.assertBad(b"\x01[1, 2]", "must be a JSON object with message_type and data, got list")
        self.assertBad(b'\x01"task"', "got str")

    def test_unknown_type(self) -> None:
        self.assertBad(
            _message("task_cancel", {"task_id": TASK_ID}),
            "unknown message_type 'task_cancel' (known: task, result, ep_status_report, "
            "task_batch, result_batch)",
            task_id=TASK_ID,
            message_type="task_cancel",
        )
        self.assertBad(b'\x01{"data":{}}', "message has no message_type")
        self.assertBad(b'\x01{"message_type":7,"data":{}}', "unknown message_type 7")

    def test_data_not_an_object(self) -> None:
        self.assertBad(
            b'\x01{"message_type":"task"}',
            "must have an object as data, got NoneType",
            message_type="task",
        )
        self.assertBad(_message("result", [TASK_ID]), "got list", message_type="result")

    def test_missing_task_id(self) -> None:
        self.assertBad(
            _message("task", {"task_buffer": "b"}),
            "invalid task message: data has no 'task_id' field",
            message_type="task",
        )

    def test_bad_uuid(self) -> None:
        self.assertBad(
            _message("task", {"task_id": "10a3753d-nope", "task_buffer": "b"}),
            "task_id must be a UUID, got '10a3753d-nope'",
            message_type="task",
        )
        self.assertBad(
            _message("task", {"task_id": 12, "task_buffer": "b"}),
            "task_id must be a UUID, got 12",
            message_type="task",
        )
        self.assertBad(
            _message("task", {"task_id": TASK_ID, "task_buffer": "b", "container_id": "x"}),
            "container_id must be a UUID",
            task_id=TASK_ID,
            message_type="task",
        )
        self.assertBad(
            _message(
                "ep_status_report", {"endpoint_id": "x", "global_state": {}, "task_statuses": {}}
            ),
            "endpoint_id must be a UUID",
            message_type="ep_status_report",
        )

    def test_missing_task_buffer(self) -> None:
        self.assertBad(
            _message("task", {"task_id": TASK_ID.upper()}),
            "data has no 'task_buffer' field",
            task_id=TASK_ID,
            message_type="task",
        )

    def test_task_buffer_not_a_string(self) -> None:
        self.assertBad(
            _message("task", {"task_id": TASK_ID, "task_buffer": ["80", "04"]}),
            "task_buffer must be a string, got list",
            task_id=TASK_ID,
            message_type="task",
        )

    def test_bad_container(self) -> None:
        container = {
            "container_id": CONTAINER_ID,
            "name": "n",
            "images": [{"image_type": "docker"}],
        }
        self.assertBad(
            _message("task", {"task_id": TASK_ID, "task_buffer": "b", "container": container}),
            "container.images[0] has no 'location' field",
            task_id=TASK_ID,
            message_type="task",
        )
        container = {"container_id": "x", "name": "n", "images": []}
        self.assertBad(
            _message("task", {"task_id": TASK_ID, "task_buffer": "b", "container": container}),
            "container: container_id must be a UUID",
            task_id=TASK_ID,
            message_type="task",
        )
        self.assertBad(
            _message("task", {"task_id": TASK_ID, "task_buffer": "b", "container": "docker"}),
            "container must be an object",
            task_id=TASK_ID,
            message_type="task",
        )

    def test_unknown_state(self) -> None:
        statuses = [
            {"timestamp": 1, "state": "running", "actor": "worker"},
            {"timestamp": 2, "state": "sleeping", "actor": "worker"},
        ]
        self.assertBad(
            _message("result", {"task_id": TASK_ID, "data": "d", "task_statuses": statuses}),
            "invalid result message: task_statuses[1]: unknown task state 'sleeping'",
            task_id=TASK_ID,
            message_type="result",
        )

    def test_bad_transitions(self) -> None:
        cases = [
            ({"timestamp": 1, "state": "running", "actor": "robot"}, "unknown actor 'robot'"),
            (
                {"timestamp": "1", "state": "running", "actor": "worker"},
                "timestamp must be an integer",
            ),
            ({"state": "running", "actor": "worker"}, "task_statuses[0] has no 'timestamp' field"),
            ("running", "task_statuses[0] must be an object"),
        ]
        for transition, fragment in cases:
            self.assertBad(
                _message(
                    "result", {"task_id": TASK_ID, "data": "d", "task_statuses": [transition]}
                ),
                fragment,
                task_id=TASK_ID,
                message_type="result",
            )
        self.assertBad(
            _message("result", {"task_id": TASK_ID, "data": "d", "task_statuses": {}}),
            "task_statuses must be a list",
            task_id=TASK_ID,
            message_type="result",
        )

    def test_bad_result_fields(self) -> None:
        self.assertBad(
            _message("result", {"task_id": TASK_ID}),
            "data has no 'data' field",
            task_id=TASK_ID,
            message_type="result",
        )
        self.assertBad(
            _message("result", {"task_id": TASK_ID, "data": 42}),
            "data must be a string, got int",
            task_id=TASK_ID,
            message_type="result",
        )
        self.assertBad(
            _message("result", {"task_id": TASK_ID, "data": "d", "error_details": {"code": "c"}}),
            "error_details has no 'user_message' field",
            task_id=TASK_ID,
            message_type="result",
        )

    def test_bad_status_report(self) -> None:
        self.assertBad(
            _message("ep_status_report", {"endpoint_id": ENDPOINT_ID, "task_statuses": {}}),
            "data has no 'global_state' field",
            message_type="ep_status_report",
        )
        self.assertBad(
            _message("ep_status_report", {"endpoint_id": ENDPOINT_ID, "global_state": {}}),
            "data has no 'task_statuses' field",
            message_type="ep_status_report",
        )
        self.assertBad(
            _message(
                "ep_status_report",
                {"endpoint_id": ENDPOINT_ID, "global_state": 3, "task_statuses": {}},
            ),
            "global_state must be an object",
            message_type="ep_status_report",
        )
        self.assertBad(
            _message(
                "ep_status_report",
                {
                    "endpoint_id": ENDPOINT_ID,
                    "global_state": {},
                    "task_statuses": {TASK_ID: [{"timestamp": 1, "state": "x", "actor": "worker"}]},
                },
            ),
            f"task_statuses['{TASK_ID}'][0]: unknown task state 'x'",
            message_type="ep_status_report",
        )


class FunctionIdTests(SynchronousTestCase):
    """``function_id``: our addition to task messages, written only when known."""

    def test_round_trip_with_function_id(self) -> None:
        from funcx_endpoint.wire import Task, pack, unpack

        task = Task(
            "0b7e2b9a-57a6-4d4a-9bb8-9d32c3b09a51",
            "buf",
            function_id="11111111-2222-4333-8444-555555555555",
        )
        wire = pack(task)
        self.assertIn(b'"function_id":"11111111-2222-4333-8444-555555555555"', wire)
        self.assertEqual(unpack(wire), task)

    def test_absent_when_unknown(self) -> None:
        from funcx_endpoint.wire import Task, pack, unpack

        task = Task("0b7e2b9a-57a6-4d4a-9bb8-9d32c3b09a51", "buf")
        wire = pack(task)
        self.assertNotIn(b"function_id", wire)
        self.assertIsNone(unpack(wire).function_id)


class WarmContainersTests(SynchronousTestCase):
    """The soft-routing report of a manager's warm container types."""

    def test_round_trip(self) -> None:
        from twisted.protocols import amp as _amp

        from funcx_endpoint.wire.amp import WarmContainers

        protocol = _amp.AMP()
        box = _amp.AmpBox()
        for name, argument in WarmContainers.arguments:
            argument.toBox(name, box, {"warm": {"RAW": 2, "c-1": 1}, "cold_starts": 3}, protocol)
        objects: dict = {}
        for name, argument in WarmContainers.arguments:
            argument.fromBox(name, box, objects, protocol)
        self.assertEqual(objects, {"warm": {"RAW": 2, "c-1": 1}, "cold_starts": 3})

    def test_bad_counts_refused(self) -> None:
        from funcx_endpoint.wire.amp import WarmCounts

        for bad in (b"[1]", b'{"a": -1}', b'{"a": 1.5}', b'{"a": true}'):
            self.assertRaises(ValueError, WarmCounts().fromString, bad)
