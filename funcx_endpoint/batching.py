"""Work gathered over one reactor turn, handled together at its end."""

from __future__ import annotations

from typing import Callable, Generic, Iterable, List, TypeVar

from twisted.internet.interfaces import IReactorTime

__all__ = ["TurnBatch"]

T = TypeVar("T")


class TurnBatch(Generic[T]):
    """Items added during a reactor turn, handed together to ``handle`` once
    the turn is over (a ``callLater(0)`` on ``clock``).

    ``handle`` is not called with an empty list: items taken back with
    :meth:`take` are not handled.
    """

    def __init__(self, clock: IReactorTime, handle: Callable[[List[T]], object]) -> None:
        self._clock = clock
        self._handle = handle
        self._items: List[T] = []
        self._scheduled = False

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        """Handle ``item`` with the others of this turn."""
        self._items.append(item)
        self._schedule()

    def extend(self, items: Iterable[T]) -> None:
        """Handle ``items`` with the others of this turn."""
        self._items.extend(items)
        self._schedule()

    def take(self) -> List[T]:
        """The items not handled yet, taken back: they will not be handled."""
        items, self._items = self._items, []
        return items

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._scheduled = False
        items = self.take()
        if items:
            self._handle(items)
