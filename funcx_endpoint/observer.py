"""``when_*()`` helpers: each caller gets its own Deferred for one event."""

from __future__ import annotations

from typing import Any, Generic, List, Optional, TypeVar, Union

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class OneShotObserver(Generic[T]):
    """An event that happens once (with a result or a failure).

    :meth:`when_fired` gives every caller a fresh Deferred, so no caller's
    callbacks can change what another caller sees.
    """

    def __init__(self) -> None:
        self._result: Any = None
        self._fired = False
        self._waiters: List[Deferred[T]] = []

    @property
    def fired(self) -> bool:
        return self._fired

    def when_fired(self) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        if self._fired:
            self._deliver(d)
        else:
            self._waiters.append(d)
        return d

    def _deliver(self, d: Deferred[T]) -> None:
        _fire(d, self._result)

    def fire(self, result: Optional[Any]) -> None:
        """Fire with ``result`` (a Failure fires the waiters' errbacks)."""
        if self._fired:
            return
        self._fired = True
        self._result = result
        fire_all(self._waiters, result)


def _fire(d: Deferred[T], result: Union[T, Failure]) -> None:
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def fire_all(waiters: List[Deferred[T]], result: Union[T, Failure]) -> None:
    """Fire each Deferred in ``waiters`` with ``result`` (a Failure: their errbacks).

    The list is emptied first: a callback may add a waiter for a later event.
    """
    fired = waiters[:]
    waiters.clear()
    for d in fired:
        _fire(d, result)


def fresh_result(d: Deferred[T]) -> Deferred[T]:
    """A new Deferred with ``d``'s result, leaving ``d``'s own chain alone.

    For Deferreds that do not fail (coroutines that catch their errors): a
    failure would reach the new Deferred too, and stay in ``d``'s chain.
    """
    fresh: Deferred[T] = Deferred()

    def fire(result: Any) -> Any:
        _fire(fresh, result)
        return result

    d.addBoth(fire)
    return fresh
