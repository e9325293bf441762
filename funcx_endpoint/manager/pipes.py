"""A worker's task pipe, written at once: no reactor round trip per task.

Twisted's process transport buffers every write and waits for the reactor to
report the pipe writable, registering and unregistering it with epoll each
time: three system calls and a trip through the reactor for each task.  A
worker's task pipe almost always has room (one task, or a few, at a time),
so :class:`TaskPipe` writes at once and only falls back to the reactor for
what does not fit.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

from twisted.internet.interfaces import IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["TaskPipe"]


@implementer(IWriteDescriptor)
class TaskPipe:
    """The writing end of a pipe to a child, non-blocking.

    ``reactor`` provides ``addWriter``/``removeWriter``.  Once the child has
    closed its end, writes are dropped (the child is gone; its process
    protocol hears of it).
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        os.set_blocking(fd, False)
        self._reactor = reactor
        self._fd: Optional[int] = fd
        self._pending = b""
        self._writing = False

    @classmethod
    def open(cls, reactor: Any) -> Tuple[TaskPipe, int]:
        """``(TaskPipe, child_end)``: a new pipe; give ``child_end`` to the child
        (``childFDs``) and close it here once the child is started."""
        child_end, ours = os.pipe2(os.O_CLOEXEC)
        return cls(reactor, ours), child_end

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def pending(self) -> int:
        """Bytes waiting for room in the pipe."""
        return len(self._pending)

    def write(self, data: bytes) -> None:
        """Write ``data`` now, or as soon as the pipe has room (order is kept)."""
        if self._fd is None:
            return
        if self._pending:
            self._pending += data
            return
        self._pending = data
        self.doWrite()

    def doWrite(self) -> Optional[Failure]:
        fd = self._fd
        while self._pending and fd is not None:
            try:
                written = os.write(fd, self._pending)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:  # EPIPE: the child closed its end
                self.close()
                return None
            self._pending = self._pending[written:]
        if self._pending and fd is not None:
            if not self._writing:
                self._writing = True
                self._reactor.addWriter(self)
        elif self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        return None

    def close(self) -> None:
        """Close our end (the child reads end-of-file); pending bytes are dropped."""
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        self._pending = b""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def fileno(self) -> int:
        return -1 if self._fd is None else self._fd

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "TaskPipe"
