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

import uuid
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Generic,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
    get_args,
)

from funcx_endpoint.wire.containers import Container, ContainerImage
from funcx_endpoint.wire.control import (
    ENDPOINT_COMMANDS,
    TASK_STATES,
    EndpointCommand,
    TaskStatesMessage,
)
from funcx_endpoint.wire.errors import MessageError
from funcx_endpoint.wire.fields import (
    _decode_json,
    _dict,
    _encode_json,
    _list,
    _optional_dict,
    _optional_uuid,
    _Record,
    _required,
    _show,
    _str,
    _uuid,
)
from funcx_endpoint.wire.report import EPStatusReport
from funcx_endpoint.wire.states import (
    ActorName,
    TaskState,
    TaskTransition,
    _check_transitions,
    _transitions_from_wire,
    _transitions_to_wire,
)

__all__ = [
    "ENDPOINT_COMMANDS",
    "MESSAGE_BATCHES",
    "PROTOCOL_VERSION",
    "TASK_STATES",
    "ActorName",
    "Container",
    "ContainerImage",
    "EPStatusReport",
    "EndpointCommand",
    "Message",
    "Result",
    "ResultBatchMessage",
    "ResultErrorDetails",
    "Task",
    "TaskBatchMessage",
    "TaskState",
    "TaskStatesMessage",
    "TaskTransition",
    "pack",
    "unpack",
]

#: The only protocol version funcX 1.0 knows.
PROTOCOL_VERSION = 1
_VERSION_BYTE = bytes([PROTOCOL_VERSION])
_VERSION_CHAR = chr(PROTOCOL_VERSION)


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


# ---------------------------------------------------------------------------
# Messages


class Task(_Record):
    """A task for an endpoint: its id and its task buffer.

    ``task_buffer`` is the packed function, args and kwargs (see
    :mod:`funcx_endpoint.wire.serialize`).  ``container_id`` is ignored by
    funcX 1.0 endpoints; ``container`` says where to run the task, if
    anywhere special.  ``function_id`` is this project's addition (our service
    sends it so an endpoint can enforce ``allowed_functions``); it is written
    only when known, and funcX 1.0 endpoints ignore it.  So is
    ``resource_specification`` (a dict, as Globus Compute's task messages
    carry it: the nodes and MPI ranks the task needs, see
    :mod:`funcx_endpoint.wire.resources`), written only when given, and
    ``user_runtime`` (the submitter's Python and dill versions, see
    :mod:`funcx_endpoint.wire.runtime`).
    """

    __slots__ = (
        "task_id",
        "task_buffer",
        "container_id",
        "container",
        "function_id",
        "resource_specification",
        "user_runtime",
    )
    # The optional fields show in the repr only when there are some (most tasks have none).
    _quiet = ("resource_specification", "user_runtime")
    message_type: ClassVar[str] = "task"

    def __init__(
        self,
        task_id: Union[str, uuid.UUID],
        task_buffer: str,
        container_id: Union[str, uuid.UUID, None] = None,
        container: Optional[Container] = None,
        function_id: Union[str, uuid.UUID, None] = None,
        resource_specification: Optional[Dict[str, Any]] = None,
        user_runtime: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.task_id: str = _uuid(task_id, "task_id")
        self.task_buffer: str = _str(task_buffer, "task_buffer")
        self.function_id: Optional[str] = _optional_uuid(function_id, "function_id")
        self.container_id: Optional[str] = _optional_uuid(container_id, "container_id")
        if container is not None and type(container) is not Container:
            raise MessageError(f"container must be a Container or None, got {_show(container)}")
        self.container: Optional[Container] = container
        self.resource_specification: Optional[Dict[str, Any]] = (
            _optional_dict(resource_specification, "resource_specification") or None
        )
        self.user_runtime: Optional[Dict[str, Any]] = (
            _optional_dict(user_runtime, "user_runtime") or None
        )

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready ``data`` of this message."""
        container = self.container
        data = {
            "task_id": self.task_id,
            "container_id": self.container_id,
            "container": None if container is None else container.to_wire(),
            "task_buffer": self.task_buffer,
        }
        return self._with_set(data, "function_id", "resource_specification", "user_runtime")

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
            data.get("resource_specification"),
            data.get("user_runtime"),
        )


class Result(_Record):
    """The outcome of a task.

    On success ``data`` is the serialized return value and ``error_details``
    is None.  On failure ``error_details`` says why and ``data`` is text for
    a person (for ``RemoteExecutionError``, the traceback of the user's code).
    ``task_statuses`` are transitions seen on the way, in any order.
    ``details`` (optional, as Globus Compute's results carry it: funcX 1.0's
    ``funcx_common`` ignores it) is the environment of the worker that ran
    the task (see :mod:`funcx_endpoint.wire.runtime`), written only when known.
    """

    __slots__ = ("task_id", "data", "error_details", "task_statuses", "details")
    _quiet = ("details",)
    message_type: ClassVar[str] = "result"

    def __init__(
        self,
        task_id: Union[str, uuid.UUID],
        data: str,
        error_details: Optional[ResultErrorDetails] = None,
        task_statuses: Optional[Sequence[TaskTransition]] = None,
        details: Optional[Dict[str, Any]] = None,
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
        self.details: Optional[Dict[str, Any]] = _optional_dict(details, "details")

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
        data = {
            "task_id": self.task_id,
            "data": self.data,
            "error_details": None if details is None else details.to_wire(),
            "task_statuses": None if statuses is None else _transitions_to_wire(statuses),
        }
        return self._with_set(data, "details")

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
            # Unknown shapes of an optional field are ignored, as unknown fields.
            details if isinstance(details := data.get("details"), dict) else None,
        )


# ---------------------------------------------------------------------------
# Batches (negotiated; funcX 1.0 peers never see them)

#: The feature an endpoint and a service agree on at registration to send
#: several tasks, or several results, in one message (``task_batch``,
#: ``result_batch``).  One message per task or result costs the broker more
#: than the task itself; a peer that did not ask for this gets single messages.
MESSAGE_BATCHES = "message-batches-v1"


def _batch_items(
    data: Dict[str, Any], field: str, reader: Callable[[Dict[str, Any]], Any]
) -> Tuple[List[Any], List[MessageError]]:
    """Items of a batch that read, and an error for each that did not (with its
    task id when that could be read): one bad item does not spoil the others."""
    items = _list(_required(data, field, "data"), field)
    good: List[Any] = []
    bad: List[MessageError] = []
    for index, item in enumerate(items):
        try:
            good.append(reader(_dict(item, f"{field}[{index}]")))
        except (ValueError, TypeError) as exc:
            bad.append(MessageError(f"{field}[{index}]: {exc}", task_id=_find_task_id(item)))
    return good, bad


ItemT = TypeVar("ItemT", "Task", "Result")
BatchT = TypeVar("BatchT", bound="_Batch[Any]")


class _Batch(_Record, Generic[ItemT]):
    """Several items of one class in one message.

    A subclass names the class, ``class TaskBatchMessage(_Batch[Task],
    item_class=Task)``: its message type is ``task_batch`` and its items are in
    the field (and attribute) ``tasks``.  ``errors`` holds a
    :class:`MessageError` for each item that is not valid (read, never written).
    """

    __slots__ = ()
    message_type: ClassVar[str]
    _field: ClassVar[str]
    _item_class: ClassVar[Union[Type[Task], Type[Result]]]
    errors: List[MessageError]

    def __init_subclass__(cls, item_class: Union[Type[Task], Type[Result]]) -> None:
        super().__init_subclass__()
        cls._item_class = item_class
        cls._field = item_class.message_type + "s"
        cls.message_type = item_class.message_type + "_batch"

    def __init__(self, items: Sequence[ItemT], errors: Sequence[MessageError] = ()) -> None:
        item_class = self._item_class
        for item in items:
            if type(item) is not item_class:
                kind = self.message_type.replace("_", " ")
                raise MessageError(f"a {kind} holds {item_class.__name__}s, got {_show(item)}")
        setattr(self, self._field, list(items))
        self.errors = list(errors)  # type: ignore[misc]  # a slot of each subclass

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready ``data`` of this message."""
        return {self._field: [item.to_wire() for item in getattr(self, self._field)]}

    @classmethod
    def from_wire(cls: Type[BatchT], data: Dict[str, Any]) -> BatchT:
        """The batch a JSON-decoded ``data`` dict describes (bad items in ``errors``)."""
        return cls(*_batch_items(data, cls._field, cls._item_class.from_wire))


class TaskBatchMessage(_Batch[Task], item_class=Task):
    """Several tasks for one endpoint in one message."""

    __slots__ = ("tasks", "errors")
    tasks: List[Task]


class ResultBatchMessage(_Batch[Result], item_class=Result):
    """Several results of one endpoint in one message."""

    __slots__ = ("results", "errors")
    results: List[Result]


#: Any message that can travel on the queues.
Message = Union[
    Task,
    Result,
    EPStatusReport,
    TaskBatchMessage,
    ResultBatchMessage,
    TaskStatesMessage,
    EndpointCommand,
]

_MESSAGE_CLASSES: Tuple[Type[Any], ...] = get_args(Message)
_READERS: Dict[str, Callable[[Dict[str, Any]], Message]] = {
    cls.message_type: cls.from_wire for cls in _MESSAGE_CLASSES
}
#: Message types only sent to a peer that agreed at registration (wire.control).
_NEGOTIATED = (TaskStatesMessage.message_type, EndpointCommand.message_type)


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
        known = ", ".join(t for t in _READERS if t not in _NEGOTIATED)
        raise MessageError(
            f"{problem} (known: {known}); where negotiated: {', '.join(_NEGOTIATED)}",
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
