"""``FUNCX_TASK_ID`` while a task runs, without a ``setenv`` per task.

glibc's ``setenv`` (which ``os.environ[name] = value`` calls) keeps every
value it was ever given, so that pointers handed out by ``getenv`` stay
valid: a worker that set a new task id per task grew by about 100 bytes per
task, forever (28 MB after 300,000 tasks).  ``putenv`` is different: the
environment points at the caller's own string.  So :class:`TaskVariable` owns
one buffer, ``NAME=value``, rewrites it in place for each task and hands it
to ``putenv``; the task's Python code sees the value in ``os.environ`` and
the processes it starts inherit it, and no memory is kept per task.  Between
tasks it is gone from ``os.environ`` and empty in the C environment.  Where
that cannot be done (no C library found, a value too long for the buffer)
it falls back to ``os.environ``.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Optional

__all__ = ["TaskVariable"]

#: Room for the value in the buffer (a task id is a 36-character UUID).
VALUE_ROOM = 256


class TaskVariable:
    """One environment variable set and removed per task, at no memory cost."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._name = name.encode("ascii")
        environ: Any = os.environ
        self._key = environ.encodekey(name)  # os.environ's own mapping, as bytes
        self._libc: Optional[Any] = None
        self._buffer = ctypes.create_string_buffer(len(self._name) + 1 + VALUE_ROOM + 1)
        try:
            libc = ctypes.CDLL(None)
            libc.putenv.argtypes = [ctypes.c_char_p]
            self._libc = libc
        except (OSError, AttributeError):
            self._libc = None
        self._fallback = False
        self._prefix = self._name + b"="
        self._pointer = ctypes.cast(self._buffer, ctypes.c_char_p)
        self._data = environ._data
        self._encode = environ.encodevalue

    def set(self, value: str) -> None:
        """Set the variable to ``value`` (for this process and its children)."""
        encoded = self._encode(value)  # as os.environ encodes values
        if self._libc is None or len(encoded) > VALUE_ROOM or b"\0" in encoded:
            self._fallback = True
            os.environ[self.name] = value
            return
        self._fallback = False
        entry = self._prefix + encoded + b"\0"
        ctypes.memmove(self._buffer, entry, len(entry))
        # Again each time: the task's code may have removed it meanwhile.
        self._libc.putenv(self._pointer)
        self._data[self._key] = encoded

    def clear(self) -> None:
        """Remove the variable (from ``os.environ``; in the C environment it is
        left empty, which costs no call)."""
        if self._fallback or self._libc is None:
            os.environ.pop(self.name, None)
            return
        self._buffer[len(self._prefix)] = b"\0"
        self._data.pop(self._key, None)
