"""Watching the pipe from the process that started the service (``--stop-on-eof-fd``)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["watch_eof"]


def watch_eof(reactor: Any, fd: int, on_eof: Any) -> None:
    """Call ``on_eof()`` when ``fd`` (a pipe from the starter) reaches end-of-file."""
    from twisted.internet.interfaces import IReadDescriptor
    from zope.interface import implementer

    @implementer(IReadDescriptor)
    class Watcher:
        def fileno(self) -> int:
            return fd

        def doRead(self) -> Any:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            if not data:
                reactor.removeReader(self)
                on_eof()
            return None

        def connectionLost(self, reason: Any) -> None:
            pass

        def logPrefix(self) -> str:
            return "eof-watch"

    os.set_blocking(fd, False)
    reactor.addReader(Watcher())
