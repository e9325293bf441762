"""One test server per process: made and started on first use, stopped at exit.

The shared PostgreSQL server (:mod:`~funcx_endpoint.testing.postgres`), RabbitMQ
node (:mod:`~funcx_endpoint.testing.rabbitmq`) and web service
(:mod:`~funcx_endpoint.testing.service`) are each a :class:`SharedInstance`.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any, Callable, Generic, Optional, TypeVar

import attr
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

__all__ = ["SharedInstance"]

T = TypeVar("T")


@attr.s(auto_attribs=True, eq=False)
class SharedInstance(Generic[T]):
    """A process-wide ``make()``, started by ``start(instance)`` at every use.

    ``start`` must return at once when the instance runs already.
    ``stop(instance)`` stops it when :meth:`stop` is called (the next use
    makes a new one) and, with ``stop_at_exit``, when the process exits: the
    ``atexit`` hook is registered once the first start returned or failed, so
    that it runs before the hooks that start registered (those of a server
    this one uses).  ``prepare()``, if given, runs at every use first, in the
    caller's thread (where signal handlers can be installed).
    """

    _make: Callable[[], T]
    _start: Callable[[T], None]
    _stop: Callable[[T], None]
    _prepare: Optional[Callable[[], None]] = attr.ib(default=None, kw_only=True)
    _hook_wanted: bool = attr.ib(default=True, kw_only=True, alias="stop_at_exit")
    _lock: threading.Lock = attr.ib(factory=threading.Lock, init=False)
    _instance: Optional[T] = attr.ib(default=None, init=False)

    @property
    def current(self) -> Optional[T]:
        """The instance if one was made (started or not), else None."""
        return self._instance

    def get(self) -> T:
        """The instance, made and started if needed (blocking)."""
        if self._prepare is not None:
            self._prepare()
        with self._lock:
            if self._instance is None:
                self._instance = self._make()
            instance = self._instance
            try:
                self._start(instance)
            finally:
                if self._hook_wanted:
                    self._hook_wanted = False
                    atexit.register(self.stop)
            return instance

    def get_async(self, reactor: Any) -> Deferred[T]:
        """:meth:`get` from a running reactor: made and started in a thread."""
        if self._prepare is not None:
            self._prepare()
        return deferToThreadPool(reactor, reactor.getThreadPool(), self.get)

    def stop(self) -> None:
        """Stop the instance now, if there is one."""
        with self._lock:
            instance, self._instance = self._instance, None
        if instance is not None:
            self._stop(instance)
