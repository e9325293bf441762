"""Packed buffers: strings packed as ``<length in characters>\\n<string>`` each.

A function's code is one packed part; a task payload two (args, kwargs); a
task buffer three (function, args, kwargs) (PROTOCOL.md section 1).
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

from funcx_endpoint.wire.errors import DeserializationError, SerializationError

__all__ = ["pack_buffers", "pack_task_buffer", "split_task_buffer", "unpack_buffers"]

# The longest length line unpack_buffers accepts (a 1 PB part has 16 digits).
_MAX_LENGTH_DIGITS = 20


def pack_buffers(parts: Iterable[str]) -> str:
    """Pack strings as ``<length in characters>\\n<string>`` each, concatenated."""
    pieces: List[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise SerializationError(f"only strings can be packed, got {type(part).__name__}")
        pieces.append(f"{len(part)}\n")
        pieces.append(part)
    return "".join(pieces)


def unpack_buffers(packed: str) -> List[str]:
    """The strings :func:`pack_buffers` packed into ``packed``, in order.

    Runs in time linear in ``len(packed)``.  Raises DeserializationError for
    anything that is not a whole number of well-formed parts.
    """
    if not isinstance(packed, str):
        raise DeserializationError(f"a packed buffer must be a str, got {type(packed).__name__}")
    parts: List[str] = []
    position = 0
    end_of_input = len(packed)
    find = packed.find
    while position < end_of_input:
        newline = find("\n", position, position + _MAX_LENGTH_DIGITS + 1)
        if newline < 0:
            raise DeserializationError(
                f"packed buffer part {len(parts) + 1} at offset {position}: expected a "
                f"length line, found {packed[position : position + 20]!r}"
            )
        length_text = packed[position:newline]
        if not (length_text.isascii() and length_text.isdigit()):
            raise DeserializationError(
                f"packed buffer part {len(parts) + 1} at offset {position}: the length "
                f"line {length_text!r} is not a decimal number"
            )
        start = newline + 1
        position = start + int(length_text)
        if position > end_of_input:
            raise DeserializationError(
                f"packed buffer is truncated: part {len(parts) + 1} should have "
                f"{length_text} characters, only {end_of_input - start} are left"
            )
        parts.append(packed[start:position])
    return parts


_PART_NAMES = ("function", "args", "kwargs")


def pack_task_buffer(function_code: str, payload: str) -> str:
    """The task buffer the service sends: ``function_code`` followed by ``payload``.

    ``function_code`` must be one packed part (as :func:`pack_function` makes)
    and ``payload`` two (as :func:`pack_payload` makes); nothing is unpickled.
    Raises DeserializationError, naming the culprit, otherwise.
    """
    function_parts = len(unpack_buffers(function_code))
    if function_parts != 1:
        raise DeserializationError(
            f"function_code must be 1 packed part (the serialized function), "
            f"it holds {function_parts}",
            part="function",
        )
    payload_parts = len(unpack_buffers(payload))
    if payload_parts != 2:
        raise DeserializationError(
            f"a task payload must be 2 packed parts (args, kwargs), it holds {payload_parts}",
            part="args",
        )
    return function_code + payload


def split_task_buffer(task_buffer: str) -> Tuple[str, str, str]:
    """The serialized function, args and kwargs of a task buffer, not loaded.

    Cheap (no unpickling), so that a worker can key a cache of loaded
    functions by the function part.
    """
    parts = unpack_buffers(task_buffer)
    if len(parts) != 3:
        raise DeserializationError(
            f"a task buffer must hold 3 packed parts (function, args, kwargs), "
            f"this one holds {len(parts)}"
        )
    return parts[0], parts[1], parts[2]
