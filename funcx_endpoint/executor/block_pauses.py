"""Blocks whose managers get no new task for a moment.

:class:`BlockPauses` is the task dispatcher's record of them:

* one of the block's managers was lost a moment ago (not after
  a silence).  A cancelled job's managers go one after the other, and a
  retry given to one about to go would lose a second attempt to the same
  end; so the block's other managers get no new task for ``holdoff``
  seconds.

The dispatcher is told through ``on_pause(block_id)`` when a block's
managers must leave its routing index and ``on_resume(block_ids)`` when a
holdoff has ended.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Set

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["BlockPauses"]


class BlockPauses:
    """The blocks held off (see the module's docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        holdoff: float,
        on_pause: Callable[[str], None],
        on_resume: Callable[[Set[str]], None],
    ) -> None:
        self.clock = clock
        self.holdoff = holdoff
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._held: Dict[str, float] = {}  # block id: no new tasks until then
        self._call: Optional[IDelayedCall] = None

    def paused(self, block_id: str) -> bool:
        """Whether the managers of ``block_id`` get no new task now."""
        return block_id in self._held

    def hold(self, block_id: str) -> None:
        """No new task for the managers of ``block_id`` for ``holdoff`` seconds."""
        if self.holdoff <= 0:
            return
        self._held[block_id] = self.clock.seconds() + self.holdoff
        self._on_pause(block_id)
        if self._call is None or not self._call.active():
            self._call = self.clock.callLater(self.holdoff, self._holdoff_ended)

    def stop(self) -> None:
        """Cancel the holdoff timer (the dispatcher is stopping)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _holdoff_ended(self) -> None:
        self._call = None
        now = self.clock.seconds()
        ended = {b for b, until in self._held.items() if until <= now + 1e-9}
        for block_id in ended:
            del self._held[block_id]
        if self._held:
            wait = max(0.0, min(self._held.values()) - now)
            self._call = self.clock.callLater(wait, self._holdoff_ended)
        self._on_resume(ended)
