"""Header lines in front of a task buffer: ``PREFIX{json}\\n``, added by the
endpoint for the worker (the resource specification, the submitter's runtime)
and read there; routers in between pass them on unread."""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional, Tuple

__all__ = ["add_header", "split_header"]


def add_header(prefix: str, task_buffer: str, fields: Mapping[str, Any]) -> str:
    """``task_buffer`` with the header line ``prefix`` that carries ``fields`` in front."""
    text = json.dumps(dict(fields), separators=(",", ":"), sort_keys=True)
    return f"{prefix}{text}\n{task_buffer}"


def split_header(
    prefix: str, task_buffer: str, what: str, error: Callable[[str], ValueError]
) -> Tuple[Optional[Any], str]:
    """``(value, buffer)``: the JSON value of the header line ``prefix`` (None if
    there is none) and the task buffer without it.  A header without an end or
    not JSON raises ``error(message)``; ``what`` names the header in it."""
    if not task_buffer.startswith(prefix):
        return None, task_buffer
    end = task_buffer.find("\n")
    if end < 0:
        raise error(f"the {what} header of the task buffer has no end")
    try:
        value = json.loads(task_buffer[len(prefix) : end])
    except ValueError as exc:
        raise error(f"unreadable {what} header: {exc}") from None
    return value, task_buffer[end + 1 :]
