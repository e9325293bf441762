"""Micro-benchmark of the wire formats (funcx_endpoint.wire).

Each figure is the best of several timed rounds, in operations per second
and microseconds per operation, for one Python process on one core.
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
import uuid
from typing import Callable, Dict, List, Tuple

import dill

from funcx_endpoint.wire import (
    ActorName,
    Result,
    Task,
    TaskState,
    TaskTransition,
    deserialize,
    pack,
    pack_function,
    pack_payload,
    serialize,
    split_task_buffer,
    unpack,
    unpack_task_buffer,
)


def add(a, b=1):
    return a + b


def _task_buffer_of_length(length: int) -> str:
    """A valid task buffer (``add`` and a string argument) of ``length`` characters."""
    for pad in range(length):
        buffer = pack_function(add) + pack_payload(("x" * pad,), {})
        if len(buffer) >= length:
            return buffer
    raise ValueError(f"no task buffer of {length} characters")


def _serialized_of_length(length: int) -> str:
    """A serialized string result of about ``length`` characters (at least)."""
    pad = max(0, length * 3 // 4 - 64)  # base64 makes 4 characters of 3 bytes
    while True:
        data = serialize("r" * pad)
        if len(data) >= length:
            return data
        pad += max(1, (length - len(data)) * 3 // 4)


def measure(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call of ``fn``: the best of 5 rounds of about ``seconds``/5."""
    timer = timeit.Timer(fn)
    number, elapsed = timer.autorange()
    per_round = max(1, int(number * (seconds / 5) / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=5, number=per_round)) / per_round


def daemon_rows() -> List[Tuple[str, Callable[[], object]]]:
    """A result crossing the daemon, from the manager's AMP box to the AMQP frames.

    ``ours``: the list framing of ``SendResults`` read (the AMP value's chunks
    joined, as AMP's argument does), the packed result's header read, the
    interchange's two transitions added, and the ``result`` message cut into
    AMQP body frames from views of the payload, as the publisher writes it.
    ``re-parsed``: what the daemon did before (decode the whole message, add
    the transitions, encode it again), for comparison.  Socket and TLS work,
    the same either way, is not included.
    """
    from funcx_endpoint.amqp.codec import split_frames
    from funcx_endpoint.wire import PackedResult
    from funcx_endpoint.wire.amp import ChunkedViews

    mine = [
        TaskTransition(
            1_795_226_228_073_938_204, TaskState.WAITING_FOR_NODES, ActorName.INTERCHANGE
        ),
        TaskTransition(
            1_795_226_228_074_938_204, TaskState.WAITING_FOR_LAUNCH, ActorName.INTERCHANGE
        ),
    ]
    worker_statuses = [
        TaskTransition(1_795_226_228_083_938_204, TaskState.EXECUTION_START, ActorName.WORKER),
        TaskTransition(1_795_226_228_093_938_204, TaskState.EXECUTION_END, ActorName.WORKER),
    ]
    rows: List[Tuple[str, Callable[[], object]]] = []
    for label, length in (("100 B", 100), ("137 KB", 137_000), ("6.8 MB", 6_800_000)):
        result = Result.success(str(uuid.uuid4()), _serialized_of_length(length), worker_statuses)
        strings: Dict[bytes, bytes] = {}
        ChunkedViews().toBox(
            b"results", strings, {"results": [PackedResult.from_result(result).encode()]}, None
        )
        message = pack(result)

        def ours(strings: Dict[bytes, bytes] = strings) -> object:
            objects: Dict[str, object] = {}
            ChunkedViews().fromBox(b"results", dict(strings), objects, None)
            frames = 0
            for raw in objects["results"]:  # type: ignore[attr-defined]
                packed = PackedResult.decode(raw)
                packed.add_transitions(mine)
                for _frame in split_frames(packed.message_pieces(), 131_072 - 8):
                    frames += 1
            return frames

        def reparsed(message: bytes = message) -> object:
            old = unpack(message)
            assert isinstance(old, Result) and old.task_statuses is not None
            old.task_statuses = mine + old.task_statuses
            return pack(old)

        rows.append((f"daemon, one {label} result: ours (header only)", ours))
        rows.append((f"daemon, one {label} result: re-parsed (before)", reparsed))
    return rows


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per figure (default 1)")
    options = parser.parse_args(argv)

    task_id = str(uuid.uuid4())
    task = Task(task_id, _task_buffer_of_length(200))
    task_bytes = pack(task)
    statuses = [
        TaskTransition(1_795_226_228_083_938_204, TaskState.EXECUTION_START, ActorName.WORKER),
        TaskTransition(1_795_226_228_093_938_204, TaskState.EXECUTION_END, ActorName.WORKER),
    ]
    data = _serialized_of_length(100)
    result = Result.success(task_id, data, statuses)
    result_plain = Result.success(task_id, data)
    result_plain_bytes = pack(result_plain)
    args_payload = serialize((3, 4.5, "hello"))
    function_cache: Dict[str, Callable[..., object]] = {}
    small_task = pack_function(add) + pack_payload((3,), {"b": 4})

    rows: List[Tuple[str, Callable[[], object]]] = [
        (f"pack Task ({len(task.task_buffer)}-char task buffer)", lambda: pack(task)),
        (f"unpack Task ({len(task_bytes)} bytes)", lambda: unpack(task_bytes)),
        ("pack+unpack Task", lambda: unpack(pack(task))),
        (f"pack Result ({len(data)}-char data, no statuses)", lambda: pack(result_plain)),
        (f"unpack Result ({len(data)}-char data, no statuses)", lambda: unpack(result_plain_bytes)),
        (
            f"pack+unpack Result ({len(data)}-char data, no statuses)",
            lambda: unpack(pack(result_plain)),
        ),
        (f"pack+unpack Result ({len(data)}-char data, 2 statuses)", lambda: unpack(pack(result))),
        ("serialize (3, 4.5, 'hello')", lambda: serialize((3, 4.5, "hello"))),
        ("deserialize (3, 4.5, 'hello')", lambda: deserialize(args_payload)),
        (
            "serialize+deserialize (3, 4.5, 'hello')",
            lambda: deserialize(serialize((3, 4.5, "hello"))),
        ),
        ("serialize+deserialize 42 (a result)", lambda: deserialize(serialize(42))),
        ("pack_payload((3,), {'b': 4})", lambda: pack_payload((3,), {"b": 4})),
        ("split_task_buffer (small task)", lambda: split_task_buffer(small_task)),
        (
            "unpack_task_buffer (small task, '04' source exec'd)",
            lambda: unpack_task_buffer(small_task),
        ),
        (
            "unpack_task_buffer (small task, function cached)",
            lambda: unpack_task_buffer(small_task, function_cache),
        ),
        ("serialize function add ('04')", lambda: serialize(add)),
    ]

    rows += daemon_rows()

    print(
        f"funcx_endpoint.wire micro-benchmark: Python {platform.python_version()} "
        f"({platform.python_implementation()}), dill {dill.__version__}, {platform.machine()}"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'operation':<{width}}  {'ops/s':>12}  {'us/op':>8}")
    for name, fn in rows:
        seconds = measure(fn, options.seconds)
        print(f"{name:<{width}}  {1 / seconds:>12,.0f}  {seconds * 1e6:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
