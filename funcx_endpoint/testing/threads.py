"""A stand-in for ``deferToThread`` in unit tests (e.g. the result spool's disk work)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred

__all__ = ["InlineThreads"]


class InlineThreads:
    """Runs each function at once, in the calling thread, and returns a
    Deferred with its result, as ``deferToThread`` would later.

    ``paused``: calls wait until :meth:`run_pending` (to test what happens
    while the disk is slow).  ``failure``: every call fails with it, without
    running (a disk that is full, or gone).
    """

    def __init__(self) -> None:
        self.paused = False
        self.failure: Optional[Exception] = None
        self.pending: List[Tuple[Callable[..., Any], Tuple[Any, ...], Deferred[Any]]] = []
        self.calls: List[str] = []  # names of the functions called, in order

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(f.__name__)
        self.pending.append((f, args, d))
        if not self.paused:
            self.run_pending()
        return d

    def run_pending(self) -> None:
        """Run the calls that wait, in order (also those they lead to)."""
        while self.pending:
            f, args, d = self.pending.pop(0)
            if self.failure is not None:
                d.errback(self.failure)
                continue
            try:
                result = f(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)
