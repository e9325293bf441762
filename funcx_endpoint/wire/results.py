"""A result on its way back: a small header the routers read, a payload they never decode.

A worker turns its task's outcome into a :class:`PackedResult`; the manager
forwards it untouched; the interchange reads the task id and adds its own
state transitions; the endpoint's transport writes the funcX 1.0 ``result``
message (PROTOCOL.md section 4) from it by joining pieces.  The payload, the
result's ``data`` (up to the result size limit, 10 MiB by default), is
decoded by nobody between the worker and the web service.

Each field is already the JSON text it becomes in the message, so writing the
message is a concatenation, and the bytes are exactly those
:func:`~funcx_endpoint.wire.messages.pack` writes for the same result:

``task_id``
    the task's id (a canonical UUID string);
``data``
    the JSON string literal of the result's ``data``, quotes included (ASCII);
``error_details``
    ``null``, or the JSON object ``{"code": ..., "user_message": ...}``;
``task_statuses``
    ``null``, or the JSON array of the task's transitions;
``details``
    ``null``, or the JSON object of the worker's environment (written in the
    message only when not ``null``; see :mod:`funcx_endpoint.wire.runtime`).

On the pipes and over AMP a packed result is one byte string in the list
framing (:mod:`funcx_endpoint.wire.framing`): task id, error details,
statuses, data, and the details when there are some.
:meth:`PackedResult.decode` returns the data as a memoryview of what was
received, so a large payload is not copied on the way.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from funcx_endpoint.wire.errors import MessageError
from funcx_endpoint.wire.fields import _CANONICAL_UUID, _encode_json
from funcx_endpoint.wire.framing import (
    FramingError,
    Pieces,
    decode_list,
    decode_list_pieces,
    encode_list,
    join_pieces,
)
from funcx_endpoint.wire.messages import PROTOCOL_VERSION, Result, ResultErrorDetails, unpack
from funcx_endpoint.wire.states import TaskTransition

__all__ = ["PackedResult", "batch_message_pieces", "read_result", "transitions_json"]

Buffer = Union[bytes, bytearray, memoryview]

_NULL = b"null"
_MESSAGE_HEAD = bytes([PROTOCOL_VERSION]) + b'{"message_type":"result","data":'
_MESSAGE_TAIL = b"}"
_TRANSITION = '{"timestamp":%d,"state":"%s","actor":"%s"}'
_OBJECT_PIECES = (b'{"task_id":"', b'","data":', b',"error_details":', b',"task_statuses":', b"}")
_DETAILS_PIECE = b',"details":'
# The object's fixed pieces and a task id (a canonical UUID: 36 characters).
_FIXED_OBJECT_LENGTH = sum(map(len, _OBJECT_PIECES)) + 36


def _views(raw: Buffer) -> List[Any]:
    return list(decode_list(raw, views=True))


def _data_length(data: Union[Buffer, Pieces]) -> int:
    return sum(len(piece) for piece in data) if isinstance(data, list) else len(data)


def transitions_json(transitions: Sequence[TaskTransition]) -> bytes:
    """The JSON array of ``transitions``, as a message writes it."""
    return (
        "["
        + ",".join(_TRANSITION % (t.timestamp, t.state.value, t.actor.value) for t in transitions)
        + "]"
    ).encode("ascii")


class PackedResult:
    """One task's result as the processes between the worker and the broker carry it."""

    __slots__ = ("task_id", "data", "error_details", "task_statuses", "details")

    def __init__(
        self,
        task_id: str,
        data: Union[Buffer, Pieces],
        error_details: bytes = _NULL,
        task_statuses: bytes = _NULL,
        details: bytes = _NULL,
    ) -> None:
        self.task_id = task_id
        self.data = data
        self.error_details = error_details
        self.task_statuses = task_statuses
        self.details = details

    # -- making one ---------------------------------------------------------

    @classmethod
    def success(
        cls, task_id: str, serialized: str, transitions: Sequence[TaskTransition] = ()
    ) -> PackedResult:
        """The result of a task that returned ``serialized`` (already serialized)."""
        return cls(
            task_id,
            _encode_json(serialized).encode("ascii"),
            _NULL,
            transitions_json(transitions) if transitions else _NULL,
        )

    @classmethod
    def failure(
        cls,
        task_id: str,
        code: str,
        user_message: str,
        data: Optional[str] = None,
        transitions: Sequence[TaskTransition] = (),
    ) -> PackedResult:
        """The result of a failed task; ``data`` (text for a person) defaults to
        ``user_message``, as :meth:`Result.failure`."""
        details = ResultErrorDetails(code, user_message).to_wire()
        return cls(
            task_id,
            _encode_json(user_message if data is None else data).encode("ascii"),
            _encode_json(details).encode("ascii"),
            transitions_json(transitions) if transitions else _NULL,
        )

    @classmethod
    def from_result(cls, result: Result) -> PackedResult:
        """``result``, packed."""
        details = result.error_details
        statuses = result.task_statuses
        return cls(
            result.task_id,
            _encode_json(result.data).encode("ascii"),
            _NULL if details is None else _encode_json(details.to_wire()).encode("ascii"),
            _NULL if statuses is None else transitions_json(statuses),
            _NULL if result.details is None else _encode_json(result.details).encode("ascii"),
        )

    # -- on the links ---------------------------------------------------------

    def encode(self) -> bytes:
        """The bytes that carry it over a pipe or AMP."""
        data = self.data
        items = [
            self.task_id.encode("ascii"),
            self.error_details,
            self.task_statuses,
            data if not isinstance(data, list) else b"".join(data),
        ]
        if self.details != _NULL:
            items.append(self.details)
        return encode_list(items)

    @classmethod
    def decode(cls, raw: Union[Buffer, Pieces]) -> PackedResult:
        """What :meth:`encode` wrote; the data stays a view of ``raw`` (no copy).

        ``raw`` may be one buffer or pieces of one (as
        :class:`~funcx_endpoint.wire.amp.ChunkedList` receives a large item);
        the data then stays in pieces.  Checks the shape only (a task id, each
        field the right kind of JSON value at its ends), not the payload.
        Raises :class:`~funcx_endpoint.wire.errors.MessageError`, with the
        task id when it could be read.

        A whole ``result`` message (what managers of earlier versions send:
        its first byte is the protocol version, never a packed result's) is
        read and packed.
        """
        if isinstance(raw, list):
            if len(raw) != 1:
                return cls._decode_items(raw[0][:1], raw, decode_list_pieces)
            raw = raw[0]
        return cls._decode_items(raw[:1], raw, _views)

    @classmethod
    def _decode_items(cls, first: Buffer, raw: Any, split: Any) -> PackedResult:
        if first == _MESSAGE_HEAD[:1]:
            message = unpack(join_pieces(raw))
            if type(message) is not Result:
                raise MessageError(f"a {type(message).__name__} message is not a result")
            return cls.from_result(message)
        try:
            items = split(raw)
        except FramingError as exc:
            raise MessageError(f"unreadable result: {exc}", message_type="result") from None
        if len(items) not in (4, 5):
            raise MessageError(
                f"a packed result has 4 or 5 parts, this one {len(items)}", message_type="result"
            )
        raw_id, details, statuses, data = items[:4]
        environment = join_pieces(items[4]) if len(items) == 5 else _NULL
        task_id = join_pieces(raw_id).decode("ascii", "replace")
        if not _CANONICAL_UUID.match(task_id):
            raise MessageError(f"a packed result's task id is not a UUID: {task_id[:60]!r}")
        details_bytes = join_pieces(details)
        statuses_bytes = join_pieces(statuses)
        first_data, last_data = (data[0], data[-1]) if isinstance(data, list) else (data, data)
        if not (
            (details_bytes == _NULL or details_bytes[:1] == b"{")
            and (statuses_bytes == _NULL or statuses_bytes[:1] == b"[")
            and _data_length(data) >= 2
            and first_data[:1] == b'"'
            and last_data[-1:] == b'"'
            and (environment == _NULL or environment[:1] == b"{")
        ):
            raise MessageError(
                f"the packed result of task {task_id} is malformed",
                message_type="result",
                task_id=task_id,
            )
        return cls(task_id, data, details_bytes, statuses_bytes, bytes(environment))

    # -- what routers do -------------------------------------------------------

    @property
    def is_error(self) -> bool:
        """Whether the task failed."""
        return self.error_details != _NULL

    def add_transitions(self, transitions: Sequence[TaskTransition]) -> None:
        """Put ``transitions`` before those the result carries (order is free)."""
        if not transitions:
            return
        mine = transitions_json(transitions)
        theirs = self.task_statuses
        if theirs == _NULL or theirs == b"[]":
            self.task_statuses = mine
        else:
            self.task_statuses = mine[:-1] + b"," + theirs[1:]

    def message_pieces(self) -> List[Buffer]:
        """The funcX 1.0 ``result`` message, in pieces to be joined or written in turn."""
        return [_MESSAGE_HEAD, *self.object_pieces(), _MESSAGE_TAIL]

    def object_pieces(self) -> List[Buffer]:
        """The message's ``data`` object, in pieces."""
        head, after_id, after_data, after_details, tail = _OBJECT_PIECES
        data = self.data
        return [
            head,
            self.task_id.encode("ascii"),
            after_id,
            *(data if isinstance(data, list) else (data,)),
            after_data,
            self.error_details,
            after_details,
            self.task_statuses,
            *(() if self.details == _NULL else (_DETAILS_PIECE, self.details)),
            tail,
        ]

    def message(self) -> bytes:
        """The funcX 1.0 ``result`` message (a copy of the payload; see :meth:`message_pieces`)."""
        return b"".join(self.message_pieces())

    def message_size(self) -> int:
        """The length of :meth:`message`, without making it."""
        return (
            len(_MESSAGE_HEAD)
            + len(_MESSAGE_TAIL)
            + _FIXED_OBJECT_LENGTH
            + _data_length(self.data)
            + len(self.error_details)
            + len(self.task_statuses)
            + (0 if self.details == _NULL else len(_DETAILS_PIECE) + len(self.details))
        )

    def to_result(self) -> Result:
        """The :class:`Result` it holds (decodes everything: for tests and rare paths)."""
        message = unpack(self.message())
        assert isinstance(message, Result)
        return message

    def __repr__(self) -> str:
        return (
            f"PackedResult({self.task_id!r}, {_data_length(self.data)} bytes of data, "
            f"error={bytes(self.error_details)[:80]!r})"
        )


_BATCH_HEAD = bytes([PROTOCOL_VERSION]) + b'{"message_type":"result_batch","data":{"results":['
_BATCH_TAIL = b"]}}"


def batch_message_pieces(results: Sequence[PackedResult]) -> List[Buffer]:
    """The ``result_batch`` message holding ``results``, in pieces (see
    :data:`~funcx_endpoint.wire.messages.MESSAGE_BATCHES`); payloads not decoded."""
    pieces: List[Buffer] = [_BATCH_HEAD]
    for index, result in enumerate(results):
        if index:
            pieces.append(b",")
        pieces.extend(result.object_pieces())
    pieces.append(_BATCH_TAIL)
    return pieces


def read_result(raw: Buffer) -> Result:
    """The :class:`Result` an encoded packed result holds (decodes it all; for
    tests and tools, not for routers)."""
    return PackedResult.decode(raw).to_result()
