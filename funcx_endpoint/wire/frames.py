"""Frames between a manager and its workers (plain Python, no Twisted).

A manager talks to each worker over two dedicated pipes: the worker reads
frames on :data:`TASK_FD` and writes frames on :data:`RESULT_FD` (its
standard output and error are log files, never the protocol).  A frame is a
4-byte big-endian length, then that many bytes: one kind byte and a body.

Manager to worker:

``T`` task
    ``>BQ`` (task id length, the manager's "running" timestamp in ns), the
    task id (ASCII), then the task buffer (UTF-8).
``Q`` quit
    Finish: the worker exits after the task it is running, if any.

Worker to manager:

``H`` hello
    JSON ``{"pid", "python", "dill", "funcx"}``: the worker is ready.
``P`` phase
    One byte, :data:`PHASE_LOADING` before the worker deserializes a
    function it has not seen yet and :data:`PHASE_RUNNING` once that is
    done, so that a worker that dies while loading a function is reported as
    such (a version mismatch), not as a mysterious death.
``R`` result
    A packed :class:`~funcx_endpoint.wire.Result` message
    (:func:`funcx_endpoint.wire.pack`), complete with its transitions;
    the manager forwards it without parsing it.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, List, Tuple

from funcx_endpoint.wire.framing import LENGTH, MAX_ITEM, FramingError, ListDecoder

TASK_FD = 3
RESULT_FD = 4

KIND_TASK = b"T"
KIND_QUIT = b"Q"
KIND_HELLO = b"H"
KIND_PHASE = b"P"
KIND_RESULT = b"R"

PHASE_LOADING = b"L"
PHASE_RUNNING = b"X"

_TASK_HEADER = struct.Struct(">BQ")
#: The largest frame either side accepts (the length field is 32 bits).
MAX_FRAME = MAX_ITEM

__all__ = [
    "KIND_HELLO",
    "KIND_PHASE",
    "KIND_QUIT",
    "KIND_RESULT",
    "KIND_TASK",
    "LENGTH",
    "MAX_FRAME",
    "PHASE_LOADING",
    "PHASE_RUNNING",
    "RESULT_FD",
    "TASK_FD",
    "FrameDecoder",
    "FrameError",
    "decode_hello",
    "decode_task",
    "encode_frame",
    "encode_hello",
    "encode_task",
]


class FrameError(FramingError):
    """A frame that cannot be read: the peer is not speaking this protocol."""


def encode_frame(kind: bytes, body: bytes = b"") -> bytes:
    """One whole frame: length, kind byte, body."""
    size = len(body) + 1
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes is larger than the limit of {MAX_FRAME}")
    return LENGTH.pack(size) + kind + body


def encode_task(task_id: str, running_ns: int, task_buffer: bytes) -> bytes:
    """The ``T`` frame that gives a worker a task (``task_buffer`` as UTF-8)."""
    raw_id = task_id.encode("ascii")
    body_size = 1 + _TASK_HEADER.size + len(raw_id) + len(task_buffer)
    if body_size > MAX_FRAME:
        raise FrameError(f"a task of {body_size} bytes is larger than the limit of {MAX_FRAME}")
    return b"".join(
        (
            LENGTH.pack(body_size),
            KIND_TASK,
            _TASK_HEADER.pack(len(raw_id), running_ns),
            raw_id,
            task_buffer,
        )
    )


def decode_task(body: bytes) -> Tuple[str, int, bytes]:
    """``(task_id, running_ns, task_buffer)`` of a ``T`` frame body (kind byte excluded)."""
    if len(body) < _TASK_HEADER.size:
        raise FrameError(f"a task frame of {len(body)} bytes is too short")
    id_length, running_ns = _TASK_HEADER.unpack_from(body)
    start = _TASK_HEADER.size
    end = start + id_length
    if len(body) < end:
        raise FrameError("a task frame is shorter than its task id")
    try:
        task_id = body[start:end].decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("a task frame's task id is not ASCII") from None
    return task_id, running_ns, body[end:]


def encode_hello(info: Dict[str, Any]) -> bytes:
    """The ``H`` frame a worker sends when it is ready."""
    return encode_frame(KIND_HELLO, json.dumps(info, separators=(",", ":")).encode("utf-8"))


def decode_hello(body: bytes) -> Dict[str, Any]:
    """The worker's details from a ``H`` frame body; FrameError if unreadable."""
    try:
        info = json.loads(body.decode("utf-8"))
    except ValueError as exc:
        raise FrameError(f"unreadable hello frame: {exc}") from None
    if not isinstance(info, dict):
        raise FrameError("a hello frame must hold a JSON object")
    return info


class FrameDecoder:
    """Splits a worker pipe's byte stream into ``(kind, body)`` frames, incrementally.

    A frame is one item of the list framing (:class:`~funcx_endpoint.wire.framing.ListDecoder`
    does the work): :meth:`feed` returns the frames completed by ``data``.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._items = ListDecoder(max_frame)

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return self._items.pending

    def feed(self, data: bytes) -> List[Tuple[bytes, bytes]]:
        """Add ``data``; return the frames now complete.  FrameError on garbage."""
        try:
            items = self._items.feed(data)
        except FramingError as exc:
            raise FrameError(str(exc)) from None
        return [(item[:1], item[1:]) for item in items]
