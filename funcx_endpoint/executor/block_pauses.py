"""Blocks whose managers get no new task: held off a moment, or draining.

:class:`BlockPauses` is the task dispatcher's record of them:

* *Held off*: one of the block's managers was lost a moment ago (not after
  a silence).  A cancelled job's managers go one after the other, and a
  retry given to one about to go would lose a second attempt to the same
  end; so the block's other managers get no new task for ``holdoff``
  seconds.
* *Draining*: the block's walltime ends soon (the block scaler says so,
  ``walltime_drain_margin`` before it ends).  Its managers get no new task
  for good; those that register later neither.  A task lost with one of
  them, or whose worker one of them says died (``WorkerLost``: the
  scheduler kills every process of the job at its walltime, and a worker
  may go before its manager), is queued again without counting an attempt.

The dispatcher is told through ``on_pause(block_id)`` when a block's
managers must leave its routing index and ``on_resume(block_ids)`` when a
holdoff has ended.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Optional, Set

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from funcx_endpoint.lifecycle import cancel_call

__all__ = ["DRAINED_BLOCKS_KEPT", "BlockPauses"]

#: Draining blocks remembered (the most recent ones): a block long ended is forgotten.
DRAINED_BLOCKS_KEPT = 1000


class BlockPauses:
    """The blocks held off or draining (see the module's docstring)."""

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
        self._draining: OrderedDict[str, str] = OrderedDict()  # block id: why
        self._call: Optional[IDelayedCall] = None

    def paused(self, block_id: str) -> bool:
        """Whether the managers of ``block_id`` get no new task now."""
        return block_id in self._held or block_id in self._draining

    def draining(self, block_id: str) -> bool:
        """Whether ``block_id`` is draining (its walltime ends soon)."""
        return block_id in self._draining

    def hold(self, block_id: str) -> None:
        """No new task for the managers of ``block_id`` for ``holdoff`` seconds."""
        if self.holdoff <= 0 or block_id in self._draining:
            return
        self._held[block_id] = self.clock.seconds() + self.holdoff
        self._on_pause(block_id)
        if self._call is None or not self._call.active():
            self._call = self.clock.callLater(self.holdoff, self._holdoff_ended)

    def drain(self, block_id: str, why: str) -> bool:
        """No new task for the managers of ``block_id`` from now on; False if
        it was draining already."""
        if block_id in self._draining:
            return False
        self._draining[block_id] = why
        while len(self._draining) > DRAINED_BLOCKS_KEPT:
            self._draining.popitem(last=False)
        self._held.pop(block_id, None)
        self._on_pause(block_id)
        return True

    def draining_blocks(self) -> Dict[str, str]:
        """The draining blocks remembered, with why they drain."""
        return dict(self._draining)

    def stop(self) -> None:
        """Cancel the holdoff timer (the dispatcher is stopping)."""
        cancel_call(self._call)
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
