"""The messages on the task and result queues ("messagepack" protocol v1).

A message is one version byte ``0x01`` followed by compact JSON
``{"message_type": T, "data": {...}}`` (PROTOCOL.md section 4).  The bytes
written here are identical to what funcx_common 0.0.25 writes for the same
message: fields in the same order, every field present (``null`` when
empty), non-ASCII escaped.  Unknown fields are ignored when reading.

Every message class validates its fields when built, so a message that
exists can be packed; :func:`unpack` raises :class:`MessageError` for
anything that does not make a valid message, and keeps the task id when it
could read one.  UUIDs are held as lowercase canonical strings.

The classes are plain ``__slots__`` classes: this runs at thousands of
messages per second in one process.
"""

from __future__ import annotations

import enum
import json
import re
import time
import uuid
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from funcx_endpoint.protocol.errors import MessageError

__all__ = [
    "PROTOCOL_VERSION",
    "ActorName",
    "Container",
    "ContainerImage",
    "EPStatusReport",
    "Message",
    "Result",
    "ResultErrorDetails",
    "Task",
    "TaskState",
    "TaskTransition",
    "pack",
    "unpack",
]

#: The only protocol version funcX 1.0 knows.
PROTOCOL_VERSION = 1
_VERSION_BYTE = bytes([PROTOCOL_VERSION])
_VERSION_CHAR = chr(PROTOCOL_VERSION)

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# Like funcx_common (pydantic's .json()): compact, ASCII only.  ASCII output
# also survives lone surrogates, which UTF-8 encoding would refuse.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_decode_json = json.JSONDecoder().decode


class _StrEnum(str, enum.Enum):
    """A str enum whose ``str()`` is its value."""

    def __str__(self) -> str:
        return str(self.value)


class TaskState(_StrEnum):
    """The states of a task, as funcx_common names them."""

    RECEIVED = "received"
    WAITING_FOR_EP = "waiting-for-ep"
    WAITING_FOR_NODES = "waiting-for-nodes"
    WAITING_FOR_LAUNCH = "waiting-for-launch"
    EXECUTION_START = "execution-start"
    EXECUTION_END = "execution-end"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    RESULT_RECEIVED = "result-received"
    RESULT_ENQUEUED = "result-enqueued"
    ACTION_PROVIDER_RECEIVED = "action-provider-received"
    ACTION_PROVIDER_TASK_SUBMITTED = "action-provider-task-submitted"
    ACTION_PROVIDER_TASK_GROUP_IN_PROGRESS = "action-provider-task-group-in-progress"
    ACTION_PROVIDER_TASK_GROUP_COMPLETED = "action-provider-task-group-completed"
    ACTION_PROVIDER_TASK_GROUP_ERROR = "action-provider-task-group-error"


class ActorName(_StrEnum):
    """The parts of the system that record task transitions."""

    WORKER = "worker"
    MANAGER = "manager"
    INTERCHANGE = "interchange"
    ENDPOINT = "endpoint"
    RESULT_PROCESSOR = "result-processor"
    WEB_SERVICE = "web-service"
    ACTION_PROVIDER = "action-provider"


# Value -> member; str-enum members hash like their values, so members work
# as keys too.  Faster than TaskState(value).
_STATES: Dict[str, TaskState] = {member.value: member for member in TaskState}
_ACTORS: Dict[str, ActorName] = {member.value: member for member in ActorName}


# ---------------------------------------------------------------------------
# Field checks (all raise MessageError naming the field)


def _show(value: Any) -> str:
    """``value`` for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _uuid(value: Any, field: str) -> str:
    """``value`` (str or UUID) as a lowercase canonical UUID string."""
    if type(value) is str:
        if _CANONICAL_UUID.match(value):
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    elif isinstance(value, uuid.UUID):
        return str(value)
    raise MessageError(f"{field} must be a UUID, got {_show(value)}")


def _optional_uuid(value: Any, field: str) -> Optional[str]:
    return None if value is None else _uuid(value, field)


def _str(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    raise MessageError(f"{field} must be a string, got {type(value).__name__} {_show(value)}")


def _optional_str(value: Any, field: str) -> Optional[str]:
    return None if value is None else _str(value, field)


def _int(value: Any, field: str) -> int:
    kind = type(value)
    if kind is int:
        return value
    if kind is float and value.is_integer():
        return int(value)
    raise MessageError(f"{field} must be an integer, got {kind.__name__} {_show(value)}")


def _optional_int(value: Any, field: str) -> Optional[int]:
    return None if value is None else _int(value, field)


def _dict(value: Any, field: str) -> Dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise MessageError(f"{field} must be an object, got {type(value).__name__} {_show(value)}")


def _list(value: Any, field: str) -> List[Any]:
    if isinstance(value, list):
        return value
    raise MessageError(f"{field} must be a list, got {type(value).__name__} {_show(value)}")


_MISSING: Any = object()


def _required(data: Mapping[str, Any], field: str, where: str) -> Any:
    value = data.get(field, _MISSING)
    if value is _MISSING:
        raise MessageError(f"{where} has no {field!r} field")
    return value


class _Record:
    """Equality and repr from ``__slots__``."""

    __slots__: ClassVar[Tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


# ---------------------------------------------------------------------------
# Parts of messages


class TaskTransition(_Record):
    """One state change of a task: when (ns since the epoch), to what, by whom."""

    __slots__ = ("timestamp", "state", "actor")

    def __init__(
        self, timestamp: int, state: Union[TaskState, str], actor: Union[ActorName, str]
    ) -> None:
        self.timestamp: int = _int(timestamp, "timestamp")
        found_state = _STATES.get(state) if isinstance(state, str) else None
        if found_state is None:
            raise MessageError(f"unknown task state {_show(state)}")
        found_actor = _ACTORS.get(actor) if isinstance(actor, str) else None
        if found_actor is None:
            raise MessageError(f"unknown actor {_show(actor)}")
        self.state: TaskState = found_state
        self.actor: ActorName = found_actor

    @classmethod
    def now(cls, state: Union[TaskState, str], actor: Union[ActorName, str]) -> TaskTransition:
        """A transition to ``state`` by ``actor`` happening now."""
        return cls(time.time_ns(), state, actor)

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready dict of this transition."""
        return {"timestamp": self.timestamp, "state": self.state.value, "actor": self.actor.value}

    @classmethod
    def from_wire(cls, data: Any, where: str = "task transition") -> TaskTransition:
        """The transition a JSON-decoded dict describes, or MessageError."""
        data = _dict(data, where)
        timestamp = _required(data, "timestamp", where)
        state = _required(data, "state", where)
        actor = _required(data, "actor", where)
        try:
            return cls(timestamp, state, actor)
        except MessageError as exc:
            raise MessageError(f"{where}: {exc}") from None


def _transitions_to_wire(transitions: Sequence[TaskTransition]) -> List[Dict[str, Any]]:
    return [t.to_wire() for t in transitions]


def _transitions_from_wire(value: Any, where: str) -> List[TaskTransition]:
    from_wire = TaskTransition.from_wire
    return [from_wire(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where))]


def _check_transitions(value: Any, field: str) -> List[TaskTransition]:
    if isinstance(value, tuple):
        value = list(value)
    elif not isinstance(value, list):
        raise MessageError(f"{field} must be a list of TaskTransitions, got {_show(value)}")
    for item in value:
        if type(item) is not TaskTransition:
            raise MessageError(f"{field} must hold TaskTransitions, got {_show(item)}")
    return value


class ResultErrorDetails(_Record):
    """Why a task failed: a machine-readable code and a sentence for people."""

    __slots__ = ("code", "user_message")

    def __init__(self, code: str, user_message: str) -> None:
        self.code: str = _str(code, "error_details.code")
        self.user_message: str = _str(user_message, "error_details.user_message")

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready dict of these details."""
        return {"code": self.code, "user_message": self.user_message}

    @classmethod
    def from_wire(cls, data: Any, where: str = "error_details") -> ResultErrorDetails:
        """The details a JSON-decoded dict describes, or MessageError."""
        data = _dict(data, where)
        return cls(_required(data, "code", where), _required(data, "user_message", where))


class ContainerImage(_Record):
    """One image of a container (e.g. a docker or singularity location).

    ``created_at``/``modified_at`` may be None when read (funcx_common requires
    them, this reader does not); they are written as 0 then, since funcX 1.0.13
    endpoints drop a task whose image lacks them.
    """

    __slots__ = (
        "image_type",
        "location",
        "created_at",
        "modified_at",
        "build_status",
        "build_stderr",
    )

    def __init__(
        self,
        image_type: str,
        location: str,
        created_at: Optional[int] = None,
        modified_at: Optional[int] = None,
        build_status: Optional[str] = None,
        build_stderr: Optional[str] = None,
    ) -> None:
        self.image_type: str = _str(image_type, "image_type")
        self.location: str = _str(location, "location")
        self.created_at: Optional[int] = _optional_int(created_at, "created_at")
        self.modified_at: Optional[int] = _optional_int(modified_at, "modified_at")
        self.build_status: Optional[str] = _optional_str(build_status, "build_status")
        self.build_stderr: Optional[str] = _optional_str(build_stderr, "build_stderr")

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready dict of this image."""
        return {
            "image_type": self.image_type,
            "location": self.location,
            "created_at": self.created_at or 0,
            "modified_at": self.modified_at or 0,
            "build_status": self.build_status,
            "build_stderr": self.build_stderr,
        }

    @classmethod
    def from_wire(cls, data: Any, where: str = "image") -> ContainerImage:
        """The image a JSON-decoded dict describes, or MessageError."""
        data = _dict(data, where)
        image_type = _required(data, "image_type", where)
        location = _required(data, "location", where)
        try:
            return cls(
                image_type,
                location,
                data.get("created_at"),
                data.get("modified_at"),
                data.get("build_status"),
                data.get("build_stderr"),
            )
        except MessageError as exc:
            raise MessageError(f"{where}: {exc}") from None


class Container(_Record):
    """A container a task asks to run in: its id, name and images."""

    __slots__ = ("container_id", "name", "images")

    def __init__(
        self,
        container_id: Union[str, uuid.UUID],
        name: str,
        images: Sequence[ContainerImage] = (),
    ) -> None:
        self.container_id: str = _uuid(container_id, "container_id")
        self.name: str = _str(name, "name")
        images = list(images)
        for image in images:
            if type(image) is not ContainerImage:
                raise MessageError(f"images must hold ContainerImages, got {_show(image)}")
        self.images: List[ContainerImage] = images

    def image_for(self, image_type: str) -> Optional[ContainerImage]:
        """The first image of type ``image_type``, if any."""
        for image in self.images:
            if image.image_type == image_type:
                return image
        return None

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready dict of this container."""
        return {
            "container_id": self.container_id,
            "name": self.name,
            "images": [image.to_wire() for image in self.images],
        }

    @classmethod
    def from_wire(cls, data: Any, where: str = "container") -> Container:
        """The container a JSON-decoded dict describes, or MessageError."""
        data = _dict(data, where)
        container_id = _required(data, "container_id", where)
        name = _required(data, "name", where)
        images = [
            ContainerImage.from_wire(item, f"{where}.images[{i}]")
            for i, item in enumerate(_list(_required(data, "images", where), f"{where}.images"))
        ]
        try:
            return cls(container_id, name, images)
        except MessageError as exc:
            raise MessageError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------
# Messages


class Task(_Record):
    """A task for an endpoint: its id and its task buffer.

    ``task_buffer`` is the packed function, args and kwargs (see
    :mod:`funcx_endpoint.protocol.serialize`).  ``container_id`` is ignored by
    funcX 1.0 endpoints; ``container`` says where to run the task, if
    anywhere special.  ``function_id`` is this project's addition (our service
    sends it so an endpoint can enforce ``allowed_functions``); it is written
    only when known, and funcX 1.0 endpoints ignore it.
    """

    __slots__ = ("task_id", "task_buffer", "container_id", "container", "function_id")
    message_type: ClassVar[str] = "task"

    def __init__(
        self,
        task_id: Union[str, uuid.UUID],
        task_buffer: str,
        container_id: Union[str, uuid.UUID, None] = None,
        container: Optional[Container] = None,
        function_id: Union[str, uuid.UUID, None] = None,
    ) -> None:
        self.task_id: str = _uuid(task_id, "task_id")
        self.task_buffer: str = _str(task_buffer, "task_buffer")
        self.function_id: Optional[str] = _optional_uuid(function_id, "function_id")
        self.container_id: Optional[str] = _optional_uuid(container_id, "container_id")
        if container is not None and type(container) is not Container:
            raise MessageError(f"container must be a Container or None, got {_show(container)}")
        self.container: Optional[Container] = container

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready ``data`` of this message."""
        container = self.container
        data = {
            "task_id": self.task_id,
            "container_id": self.container_id,
            "container": None if container is None else container.to_wire(),
            "task_buffer": self.task_buffer,
        }
        if self.function_id is not None:
            data["function_id"] = self.function_id
        return data

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> Task:
        """The task a JSON-decoded ``data`` dict describes, or MessageError."""
        container = data.get("container")
        return cls(
            _required(data, "task_id", "data"),
            _required(data, "task_buffer", "data"),
            data.get("container_id"),
            None if container is None else Container.from_wire(container),
            data.get("function_id"),
        )


class Result(_Record):
    """The outcome of a task.

    On success ``data`` is the serialized return value and ``error_details``
    is None.  On failure ``error_details`` says why and ``data`` is text for
    a person (for ``RemoteExecutionError``, the traceback of the user's code).
    ``task_statuses`` are transitions seen on the way, in any order.
    """

    __slots__ = ("task_id", "data", "error_details", "task_statuses")
    message_type: ClassVar[str] = "result"

    def __init__(
        self,
        task_id: Union[str, uuid.UUID],
        data: str,
        error_details: Optional[ResultErrorDetails] = None,
        task_statuses: Optional[Sequence[TaskTransition]] = None,
    ) -> None:
        self.task_id: str = _uuid(task_id, "task_id")
        self.data: str = _str(data, "data")
        if error_details is not None and type(error_details) is not ResultErrorDetails:
            raise MessageError(
                f"error_details must be ResultErrorDetails or None, got {_show(error_details)}"
            )
        self.error_details: Optional[ResultErrorDetails] = error_details
        self.task_statuses: Optional[List[TaskTransition]] = (
            None if task_statuses is None else _check_transitions(task_statuses, "task_statuses")
        )

    @property
    def is_error(self) -> bool:
        """Whether the task failed (``error_details`` is set)."""
        return self.error_details is not None

    @classmethod
    def success(
        cls,
        task_id: Union[str, uuid.UUID],
        serialized_data: str,
        task_statuses: Optional[Sequence[TaskTransition]] = None,
    ) -> Result:
        """The result of a task that returned ``serialized_data`` (already serialized)."""
        return cls(task_id, serialized_data, None, task_statuses)

    @classmethod
    def failure(
        cls,
        task_id: Union[str, uuid.UUID],
        code: str,
        user_message: str,
        data: Optional[str] = None,
        task_statuses: Optional[Sequence[TaskTransition]] = None,
    ) -> Result:
        """The result of a failed task; ``data`` defaults to ``user_message``.

        For ``RemoteExecutionError`` pass the traceback text as ``data``:
        funcX clients show ``data`` to the user.
        """
        return cls(
            task_id,
            user_message if data is None else data,
            ResultErrorDetails(code, user_message),
            task_statuses,
        )

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready ``data`` of this message."""
        details = self.error_details
        statuses = self.task_statuses
        return {
            "task_id": self.task_id,
            "data": self.data,
            "error_details": None if details is None else details.to_wire(),
            "task_statuses": None if statuses is None else _transitions_to_wire(statuses),
        }

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> Result:
        """The result a JSON-decoded ``data`` dict describes, or MessageError."""
        details = data.get("error_details")
        statuses = data.get("task_statuses")
        return cls(
            _required(data, "task_id", "data"),
            _required(data, "data", "data"),
            None if details is None else ResultErrorDetails.from_wire(details),
            None if statuses is None else _transitions_from_wire(statuses, "task_statuses"),
        )


class EPStatusReport(_Record):
    """An endpoint's periodic status: its state and the task transitions seen.

    ``global_state`` holds ``managers``, ``total_workers``, ``idle_workers``,
    ``pending_tasks``, ``outstanding_tasks`` and so on; a report whose
    ``global_state`` says ``heartbeat_period: 0`` is the last one (the
    endpoint is stopping).  ``task_statuses`` maps task ids to transitions;
    keys that are UUIDs are normalized, others kept as they are.
    """

    __slots__ = ("endpoint_id", "global_state", "task_statuses")
    message_type: ClassVar[str] = "ep_status_report"

    def __init__(
        self,
        endpoint_id: Union[str, uuid.UUID],
        global_state: Mapping[str, Any],
        task_statuses: Optional[Mapping[str, Sequence[TaskTransition]]] = None,
    ) -> None:
        self.endpoint_id: str = _uuid(endpoint_id, "endpoint_id")
        if not isinstance(global_state, Mapping):
            raise MessageError(f"global_state must be a mapping, got {_show(global_state)}")
        self.global_state: Dict[str, Any] = dict(global_state)
        statuses: Dict[str, List[TaskTransition]] = {}
        for key, transitions in (task_statuses or {}).items():
            task_id = _task_status_key(key)
            statuses[task_id] = _check_transitions(transitions, f"task_statuses[{task_id!r}]")
        self.task_statuses = statuses

    @classmethod
    def final(cls, endpoint_id: Union[str, uuid.UUID]) -> EPStatusReport:
        """The report an endpoint sends when it stops: no more reports coming."""
        return cls(endpoint_id, {"heartbeat_period": 0}, {})

    @property
    def is_final(self) -> bool:
        """Whether this report says the endpoint stopped (``heartbeat_period`` 0)."""
        return self.global_state.get("heartbeat_period", None) == 0

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready ``data`` of this message."""
        return {
            "endpoint_id": self.endpoint_id,
            "global_state": self.global_state,
            "task_statuses": {
                task_id: _transitions_to_wire(transitions)
                for task_id, transitions in self.task_statuses.items()
            },
        }

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> EPStatusReport:
        """The report a JSON-decoded ``data`` dict describes, or MessageError."""
        endpoint_id = _required(data, "endpoint_id", "data")
        # funcx_common also reads global_state under the alias ep_status_report.
        global_state = data.get("global_state", data.get("ep_status_report", _MISSING))
        if global_state is _MISSING:
            raise MessageError("data has no 'global_state' field")
        statuses = _dict(_required(data, "task_statuses", "data"), "task_statuses")
        return cls(
            endpoint_id,
            _dict(global_state, "global_state"),
            {
                key: _transitions_from_wire(value, f"task_statuses[{key!r}]")
                for key, value in statuses.items()
            },
        )


def _task_status_key(key: Any) -> str:
    if not isinstance(key, str):
        raise MessageError(f"task_statuses keys must be task id strings, got {_show(key)}")
    try:
        return _uuid(key, "task id")
    except MessageError:
        return key


#: Any message that can travel on the queues.
Message = Union[Task, Result, EPStatusReport]

_MESSAGE_CLASSES = (Task, Result, EPStatusReport)
_READERS: Dict[str, Callable[[Dict[str, Any]], Message]] = {
    Task.message_type: Task.from_wire,
    Result.message_type: Result.from_wire,
    EPStatusReport.message_type: EPStatusReport.from_wire,
}


# ---------------------------------------------------------------------------
# pack / unpack


def pack(message: Message) -> bytes:
    """The wire bytes of ``message``: ``0x01`` and compact JSON."""
    if not isinstance(message, _MESSAGE_CLASSES):
        raise MessageError(f"cannot pack a {type(message).__name__}: not a message")
    try:
        text = _encode_json({"message_type": message.message_type, "data": message.to_wire()})
    except (TypeError, ValueError, RecursionError) as exc:
        # Only global_state can hold arbitrary values.
        raise MessageError(
            f"cannot pack {type(message).__name__}: {exc}",
            message_type=message.message_type,
        ) from exc
    return _VERSION_BYTE + text.encode("ascii")


def unpack(data: Union[bytes, bytearray, memoryview, str]) -> Message:
    """The message ``data`` holds.

    Accepts bytes, bytearray, memoryview or (for convenience) str.  Raises
    MessageError, with ``message_type`` and ``task_id`` set when they could
    be read, if ``data`` is not a valid message.
    """
    if isinstance(data, str):
        if not data.startswith(_VERSION_CHAR):
            raise _bad_version(data[:1].encode("utf-8", "replace"))
        text = data[1:]
    elif type(data) is bytes:
        if data[:1] != _VERSION_BYTE:
            raise _bad_version(data[:1])
        try:
            text = data[1:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError(f"message is not valid UTF-8: {exc}") from None
    else:
        try:
            view = memoryview(data)
        except TypeError:
            raise MessageError(
                f"a message must be bytes or str, got {type(data).__name__}"
            ) from None
        if view[:1] != _VERSION_BYTE:
            raise _bad_version(bytes(view[:1]))
        try:
            text = str(view[1:], "utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError(f"message is not valid UTF-8: {exc}") from None
    try:
        envelope = _decode_json(text)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"message is not valid JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise MessageError(
            f"message must be a JSON object with message_type and data, got "
            f"{type(envelope).__name__}"
        )
    message_type = envelope.get("message_type")
    body = envelope.get("data")
    reader = _READERS.get(message_type) if isinstance(message_type, str) else None
    if reader is None:
        if message_type is None:
            problem = "message has no message_type"
        else:
            problem = f"unknown message_type {_show(message_type)}"
        raise MessageError(
            f"{problem} (known: {', '.join(_READERS)})",
            message_type=message_type if isinstance(message_type, str) else None,
            task_id=_find_task_id(body),
        )
    if not isinstance(body, dict):
        raise MessageError(
            f"{message_type} message must have an object as data, got {type(body).__name__}",
            message_type=message_type,
        )
    try:
        return reader(body)
    except (ValueError, TypeError) as exc:  # MessageError is a ValueError
        raise MessageError(
            f"invalid {message_type} message: {exc}",
            message_type=message_type,
            task_id=_find_task_id(body),
        ) from None


def _find_task_id(body: Any) -> Optional[str]:
    """The valid task id in a message's ``data``, if it has one."""
    if isinstance(body, dict):
        value = body.get("task_id")
        if value is not None:
            try:
                return _uuid(value, "task_id")
            except MessageError:
                return None
    return None


def _bad_version(first: bytes) -> MessageError:
    if not first:
        return MessageError("empty message")
    return MessageError(
        f"unsupported message protocol version {first[0]} (first byte {first!r}); "
        f"this side speaks version {PROTOCOL_VERSION}"
    )
