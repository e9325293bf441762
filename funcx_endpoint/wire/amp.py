"""The AMP protocol between the interchange and its managers.

Managers connect to the interchange over TCP with TLS (the interchange's
certificate is signed by a CA made for the endpoint; managers verify it) and
the first command on a connection must be :class:`Register`, carrying the
endpoint's secret.  After that:

==================  =====================  ==========================================
command             direction              what
==================  =====================  ==========================================
``Register``        manager → interchange  who the manager is; answered with settings
``SubmitTasks``     interchange → manager  a batch of ``(task_id, task_buffer)``, and
                                           the containers of those that name one
``SendResults``     manager → interchange  a batch of packed results
``Heartbeat``       both ways              "still here" every ``heartbeat_period``
``CancelTask``      interchange → manager  drop or kill one task; answered ``found``
``Shutdown``        interchange → manager  stop workers, disconnect, exit
``Quitting``        manager → interchange  why it is about to exit (e.g. workers
                                           cannot start), sent before it disconnects
``WarmContainers``  manager → interchange  its warm workers per container type and
                                           its cold starts so far (soft routing),
                                           sent when they change
==================  =====================  ==========================================

Only ``Register`` and ``CancelTask`` are answered: the others flow one way,
and TCP keeps them in order; if the connection breaks, the interchange
treats every task at that manager as lost.

Batches: each side sends ``SubmitTasks`` / ``SendResults`` on a link at most
once per ``batch_interval`` (1 ms by default), unless the other side would
run out of work meanwhile.  A task or result that comes after a quiet
period leaves at once; under load, what arrives within the interval travels
together, so the cost of a message (a TLS record, a wake-up of the peer,
AMP parsing, all far more than the work of a no-op task) is shared by many
tasks.  The interchange holds tasks back only while the manager's queued
tasks outlast the wait at its measured completion rate (:class:`RateMeter`);
the manager holds results back only while it has at least one queued task
per worker.  So batching never leaves a worker idle.

AMP values are limited to 65,535 bytes; :class:`ChunkedBytes` and
:class:`ChunkedList` spread larger values over several keys (``name``,
``name.1``, ``name.2``...), so task buffers and results of any size travel in
one command.

Every value that holds several items uses the list framing of
:mod:`funcx_endpoint.wire.framing`.  The manager learns where to connect from
the info file (:mod:`funcx_endpoint.wire.info`).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type

from twisted.protocols import amp

from funcx_endpoint.wire.containers import Container
from funcx_endpoint.wire.errors import MessageError
from funcx_endpoint.wire.framing import decode_list, decode_list_pieces, encode_list

__all__ = [
    "CancelTask",
    "ChunkedBytes",
    "ChunkedList",
    "ChunkedViews",
    "Heartbeat",
    "NotRegistered",
    "Quitting",
    "RateMeter",
    "Register",
    "RegistrationRefused",
    "SendResults",
    "Shutdown",
    "SubmitTasks",
    "TaskBatch",
    "TaskContainers",
    "TasksStarted",
    "WarmContainers",
    "WarmCounts",
    "read_unanswered",
    "read_unanswered_arguments",
    "send_unanswered",
    "set_no_delay",
]

#: The largest value AMP carries under one key.
MAX_CHUNK = amp.MAX_VALUE_LENGTH


def _python_name(name: bytes) -> str:
    """The keyword a command's responder receives for argument ``name``."""
    return name.decode("ascii").replace("-", "_")


def _chunk_key(name: bytes, index: int) -> bytes:
    return b"%s.%d" % (name, index)


class ChunkedBytes(amp.Argument):
    """A byte string of any length, split over as many AMP keys as it needs.

    The first 65,535 bytes go under the argument's own name and the rest
    under ``name.1``, ``name.2``... in order; a value that fits takes one key
    exactly like ``amp.String``.
    """

    def toBox(
        self, name: bytes, strings: Dict[bytes, bytes], objects: Dict[str, Any], proto: Any
    ) -> None:
        value = self.retrieve(objects, _python_name(name), proto)
        if self.optional and value is None:
            return
        self._put(name, strings, self.to_bytes(value))

    def fromBox(
        self, name: bytes, strings: Dict[bytes, bytes], objects: Dict[str, Any], proto: Any
    ) -> None:
        first = self.retrieve(strings, name, proto)
        key = _python_name(name)
        if first is None:
            objects[key] = None
            return
        parts = [first]
        index = 1
        while True:
            part = strings.pop(_chunk_key(name, index), None)
            if part is None:
                break
            parts.append(part)
            index += 1
        objects[key] = self.from_chunks(parts)

    @staticmethod
    def _put(name: bytes, strings: Dict[bytes, bytes], data: bytes) -> None:
        if len(data) <= MAX_CHUNK:
            strings[name] = data
            return
        view = memoryview(data)
        strings[name] = bytes(view[:MAX_CHUNK])
        index = 1
        for start in range(MAX_CHUNK, len(data), MAX_CHUNK):
            strings[_chunk_key(name, index)] = bytes(view[start : start + MAX_CHUNK])
            index += 1

    def to_bytes(self, value: Any) -> bytes:
        """The bytes that represent ``value`` (here: ``value`` itself)."""
        if not isinstance(value, bytes):
            raise TypeError(f"ChunkedBytes takes bytes, got {type(value).__name__}")
        return value

    def from_bytes(self, data: bytes) -> Any:
        """The value ``data`` represents (here: ``data`` itself)."""
        return data

    def from_chunks(self, chunks: List[bytes]) -> Any:
        """The value the received ``chunks`` represent (joined, by default)."""
        return self.from_bytes(chunks[0] if len(chunks) == 1 else b"".join(chunks))


class ChunkedList(ChunkedBytes):
    """A list of byte strings of any lengths, as one :class:`ChunkedBytes`."""

    def to_bytes(self, value: Any) -> bytes:
        return encode_list(value)

    def from_bytes(self, data: bytes) -> Any:
        return decode_list(data)


class ChunkedViews(ChunkedList):
    """A :class:`ChunkedList` whose received items are views, not copies.

    Each item is a memoryview of what arrived, or, for an item spread over
    several AMP keys, a list of them
    (:func:`~funcx_endpoint.wire.framing.decode_list_pieces`): the chunks are
    never joined, so a large result crosses the interchange uncopied.
    """

    def from_bytes(self, data: bytes) -> Any:
        return decode_list_pieces([data])

    def from_chunks(self, chunks: List[bytes]) -> Any:
        return decode_list_pieces(chunks)


class TaskBatch(ChunkedBytes):
    """A list of ``(task_id, task_buffer)`` pairs: str ids, bytes buffers (UTF-8)."""

    def to_bytes(self, value: Any) -> bytes:
        items: List[bytes] = []
        for task_id, task_buffer in value:
            items.append(task_id.encode("ascii"))
            items.append(task_buffer)
        return encode_list(items)

    def from_bytes(self, data: bytes) -> Any:
        items = decode_list(data)
        if len(items) % 2:
            raise ValueError("a task batch must hold (task id, buffer) pairs")
        return [(items[i].decode("ascii"), items[i + 1]) for i in range(0, len(items), 2)]


class TaskContainers(ChunkedBytes):
    """The containers of the tasks of a batch that name one: task id → :class:`Container`.

    Optional and absent when no task of the batch names a container, so that a
    batch of plain tasks costs nothing more.  A task that names a container by
    id only (``container_id`` without ``container``) travels as a container of
    that id with no name and no images.  Each container is its JSON (as in a
    task message), after its task id, in the list framing.
    """

    def __init__(self) -> None:
        super().__init__(optional=True)

    def toBox(
        self, name: bytes, strings: Dict[bytes, bytes], objects: Dict[str, Any], proto: Any
    ) -> None:
        value = objects.get(_python_name(name))
        if value:
            self._put(name, strings, self.to_bytes(value))

    def fromBox(
        self, name: bytes, strings: Dict[bytes, bytes], objects: Dict[str, Any], proto: Any
    ) -> None:
        # Absent: no keyword at all, so responders written before this
        # argument existed keep working.
        if name in strings:
            super().fromBox(name, strings, objects, proto)

    def to_bytes(self, value: Mapping[str, Container]) -> bytes:
        items: List[bytes] = []
        for task_id, container in value.items():
            items.append(task_id.encode("ascii"))
            items.append(json.dumps(container.to_wire(), separators=(",", ":")).encode("utf-8"))
        return encode_list(items)

    def from_bytes(self, data: bytes) -> Dict[str, Container]:
        items = decode_list(data)
        if len(items) % 2:
            raise ValueError("task containers must be (task id, container) pairs")
        found: Dict[str, Container] = {}
        for i in range(0, len(items), 2):
            try:
                container = Container.from_wire(json.loads(items[i + 1].decode("utf-8")))
            except (MessageError, ValueError) as exc:
                raise ValueError(f"unreadable task container: {exc}") from None
            found[items[i].decode("ascii")] = container
        return found


class RegistrationRefused(Exception):
    """The interchange refused a manager (wrong secret, bad details)."""


class NotRegistered(Exception):
    """A command other than Register came on a connection that has not registered."""


class Register(amp.Command):
    """Manager → interchange, first on every connection: who I am.

    Answered with the settings the manager must apply, and the interchange's
    versions; a wrong secret is refused and the connection closed.
    """

    arguments = [
        (b"secret", amp.Unicode()),
        (b"manager_id", amp.Unicode()),
        (b"block_id", amp.Unicode()),
        (b"hostname", amp.Unicode()),
        (b"pid", amp.Integer()),
        (b"worker_count", amp.Integer()),
        (b"prefetch_capacity", amp.Integer()),
        (b"worker_type", amp.Unicode()),
        (b"container_type", amp.Unicode()),
        (b"python_version", amp.Unicode()),
        (b"dill_version", amp.Unicode()),
        (b"funcx_version", amp.Unicode()),
    ]
    response = [
        (b"task_timeout", amp.Float()),  # 0: no limit
        (b"result_size_limit", amp.Integer()),
        (b"heartbeat_period", amp.Float()),
        (b"heartbeat_threshold", amp.Float()),
        (b"stop_grace_period", amp.Float()),
        (b"worker_debug", amp.Boolean()),
        (b"batch_interval", amp.Float()),
        (b"python_version", amp.Unicode()),
        (b"dill_version", amp.Unicode()),
        (b"funcx_version", amp.Unicode()),
    ]
    fatalErrors = {RegistrationRefused: b"REGISTRATION_REFUSED"}


class SubmitTasks(amp.Command):
    """Interchange → manager: run these tasks (``(task_id, task_buffer)`` pairs);
    ``containers`` (optional) gives the container of each task that names one."""

    arguments = [(b"tasks", TaskBatch()), (b"containers", TaskContainers())]
    requiresAnswer = False


class SendResults(amp.Command):
    """Manager → interchange: encoded packed results (received as views)."""

    arguments = [(b"results", ChunkedViews())]
    requiresAnswer = False


class Heartbeat(amp.Command):
    """Either way: the sender is alive (any command counts as much)."""

    arguments: ClassVar[List[Tuple[bytes, amp.Argument]]] = []
    requiresAnswer = False


class CancelTask(amp.Command):
    """Interchange → manager: forget a queued task or kill the worker running it.

    ``found`` says whether the manager still had the task.  The manager sends
    no result for it: the interchange has answered it already.
    """

    arguments = [(b"task_id", amp.Unicode())]
    response = [(b"found", amp.Boolean())]


class Shutdown(amp.Command):
    """Interchange → manager: stop the workers, disconnect and exit."""

    arguments = [(b"reason", amp.Unicode())]
    requiresAnswer = False


class Quitting(amp.Command):
    """Manager → interchange: I am about to exit, and why (at most
    :data:`MAX_QUIT_REASON` bytes); no more tasks for me.  The reason
    goes into the ``ManagerLost`` errors of the tasks lost with it."""

    arguments = [(b"reason", amp.Unicode())]
    requiresAnswer = False


class StartTimes(ChunkedList):
    """``(task id, ns since the epoch)`` pairs, as ``b"<task id> <ns>"`` items."""

    def to_bytes(self, value: Any) -> bytes:
        return encode_list([f"{task_id} {ns}".encode("ascii") for task_id, ns in value])

    def from_bytes(self, data: bytes) -> Any:
        pairs = []
        for item in decode_list(data):
            task_id, _, ns = bytes(item).decode("ascii").partition(" ")
            pairs.append((task_id, int(ns)))
        return pairs


class TasksStarted(amp.Command):
    """Manager → interchange: workers started these tasks (for real-time
    ``running`` states): those still running 20 ms after they started, in one
    box (see :mod:`funcx_endpoint.manager.started`)."""

    arguments = [(b"started", StartTimes())]
    requiresAnswer = False


class WarmCounts(amp.Argument):
    """A ``{container type: count}`` dict of non-negative integers, as JSON."""

    def toString(self, inObject: Any) -> bytes:
        return json.dumps(dict(inObject), separators=(",", ":"), sort_keys=True).encode()

    def fromString(self, inString: bytes) -> Any:
        counts = json.loads(inString)
        if not isinstance(counts, dict) or not all(
            isinstance(key, str) and type(value) is int and value >= 0
            for key, value in counts.items()
        ):
            raise ValueError("warm counts must map container types to counts")
        return counts


class WarmContainers(amp.Command):
    """Manager → interchange: which container types it has warm workers of.

    ``warm`` maps each container type (the dispatcher's queue key: a
    container id, or ``RAW``) to the manager's workers running that type now,
    busy or idle; ``cold_starts`` counts the workers it has started for a
    type that was not warm, since it started.  Sent (unanswered) after
    registration by managers that run containers, and again whenever either
    changes; soft routing prefers managers with a warm worker of a task's
    type.
    """

    arguments = [(b"warm", WarmCounts()), (b"cold_starts", amp.Integer())]
    requiresAnswer = False


#: The longest reason a Quitting command carries, in UTF-8 bytes (AMP values
#: are limited to 65,535 bytes).
MAX_QUIT_REASON = 16_000


# ---------------------------------------------------------------------------
# The hot path: unanswered batch commands without AMP's Deferred machinery


def send_unanswered(protocol: amp.AMP, command: Type[amp.Command], **arguments: Any) -> None:
    """Send ``command`` (``requiresAnswer = False``) like ``callRemote``, faster.

    ``callRemote`` builds a Command and a Deferred for every call, which the
    two batch commands never need.  Raises like ``callRemote`` when the
    connection is gone.
    """
    box = amp.AmpBox()
    box[b"_command"] = command.commandName
    for name, argument in command.arguments:
        argument.toBox(name, box, arguments, protocol)
    protocol.sendBox(box)


def read_unanswered_arguments(
    command: Type[amp.Command], box: amp.AmpBox, protocol: amp.AMP
) -> Optional[Dict[str, Any]]:
    """The arguments of ``command`` (by keyword) from a received ``box``, or None if
    the box is not an unanswered ``command``: the receiving side of
    :func:`send_unanswered`.  An optional argument that is absent may be missing.

    Raises ValueError (or KeyError) for a malformed box.
    """
    if box.get(b"_command") != command.commandName or b"_ask" in box:
        return None
    objects: Dict[str, Any] = {}
    for name, argument in command.arguments:
        argument.fromBox(name, box, objects, protocol)
    return objects


def read_unanswered(command: Type[amp.Command], box: amp.AmpBox, protocol: amp.AMP) -> Any:
    """The first argument of ``command`` from a received ``box``, or None if the box
    is not an unanswered ``command`` (see :func:`read_unanswered_arguments`)."""
    objects = read_unanswered_arguments(command, box, protocol)
    if objects is None:
        return None
    return objects[_python_name(command.arguments[0][0])]


class RateMeter:
    """Events per second, measured over windows of about ``window`` seconds, smoothed.

    The batching rule uses it: a batch may wait for the interval only if the
    receiver holds enough work to last that long at the measured rate.
    """

    def __init__(self, window: float = 0.1) -> None:
        self.rate = 0.0
        self._window = window
        self._count = 0
        self._since: Optional[float] = None

    def add(self, count: int, now: float) -> None:
        """Record ``count`` events at time ``now``."""
        if self._since is None:
            self._since = now
            return
        self._count += count
        elapsed = now - self._since
        if elapsed >= self._window:
            current = self._count / elapsed
            self.rate = current if self.rate == 0.0 else (self.rate + current) / 2
            self._count = 0
            self._since = now


def set_no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off: batches and their answers must not wait 40 ms."""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not TCP (tests)
