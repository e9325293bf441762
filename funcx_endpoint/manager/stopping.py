"""Waiting for a worker pool's processes to end once they were told to stop.

:class:`PoolStop` is the end of :meth:`WorkerPool.stop
<funcx_endpoint.manager.pool.WorkerPool.stop>`: the workers got TERM; those
still alive after the grace period get KILL, and each caller waits on its own
Deferred, fired once every worker process has ended.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from funcx_endpoint.manager.slots import WorkerSlot

__all__ = ["PoolStop"]


@attr.s(auto_attribs=True, eq=False)
class PoolStop:
    """Kills the workers ``alive()`` returns after a grace period and tells the
    callers of :meth:`when_stopped` once none is left."""

    log = Logger()

    _reactor: Any
    _alive: Callable[[], List[WorkerSlot]]
    _kill: Callable[[WorkerSlot], None]
    started: bool = attr.ib(default=False, init=False)
    _grace: float = attr.ib(default=0.0, init=False)
    _kill_call: Optional[IDelayedCall] = attr.ib(default=None, init=False)
    _waiters: List[Deferred[None]] = attr.ib(factory=list, init=False)

    def start(self, grace: float) -> None:
        """The workers were told to stop: KILL those left after ``grace`` seconds."""
        self.started = True
        self._grace = grace
        if self._alive():
            self._kill_call = self._reactor.callLater(grace, self._kill_all)

    def when_stopped(self) -> Deferred[None]:
        """A new Deferred that fires once :meth:`start` was called and no worker is alive."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        self.check()
        return waiter

    def _kill_all(self) -> None:
        self._kill_call = None
        for worker in self._alive():
            self.log.warn(
                "Worker {index} (pid {pid}) did not stop within {grace} s; killing it",
                index=worker.index,
                pid=worker.pid,
                grace=self._grace,
            )
            self._kill(worker)

    def check(self) -> None:
        """Fire the waiters if stopping and no worker is alive any more."""
        if not self.started or self._alive():
            return
        if self._kill_call is not None:
            if self._kill_call.active():
                self._kill_call.cancel()
            self._kill_call = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
