"""Walltimes: blocks drain before their scheduler ends them, and are replaced.

A batch scheduler kills a job when its walltime is over, tasks and all.
:class:`WalltimeWatch` keeps that from costing tasks:

* A block's walltime is counted from when it started: the first time the
  provider said it was running or one of its managers registered, whichever
  came first (a manager registers a moment after its job starts, so the
  drain margin must cover that moment too).
* ``margin`` seconds before the walltime ends, the block *drains*
  (:meth:`ILoadSource.drain_block`): its managers get no new task.  Once
  none of them holds a task, the block is cancelled: its nodes go back to
  the scheduler, for its replacement among others (unless one of its
  managers has gone meanwhile: the scheduler is ending it already).
* A task that a draining block's manager still holds when the scheduler
  kills the job (a task longer than the margin) is queued again without
  counting an attempt: it fails with ``ManagerLost`` only for other causes.
* The strategy counts a block as going away from its *replacement time*:
  its drain time less the time it took to start (from submission to
  running), so that a replacement is requested early enough to be running
  when the block drains (:meth:`ending`).  A block going away counts
  neither for the slots nor against ``max_blocks``.

The default margin is 10% of the walltime, at most 60 seconds
(:func:`drain_margin`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import attr
from twisted.internet.interfaces import IReactorTime

from funcx_endpoint.executor.block_state import Block
from funcx_endpoint.executor.interface import ILoadSource, ManagerInfo
from funcx_endpoint.lifecycle import PeriodicService

if TYPE_CHECKING:
    from funcx_endpoint.executor.blocks import BlockScaler

__all__ = ["DEFAULT_MARGIN_CAP", "DEFAULT_MARGIN_FRACTION", "WalltimeWatch", "drain_margin"]

#: The default drain margin: this fraction of the walltime ...
DEFAULT_MARGIN_FRACTION = 0.1
#: ... but at most this many seconds.
DEFAULT_MARGIN_CAP = 60.0


def drain_margin(walltime: float, configured: Optional[float] = None) -> float:
    """Seconds before the end of ``walltime`` that a block drains:
    ``configured`` if given, else 10% of the walltime, at most 60 s; never
    more than the walltime."""
    if configured is None:
        configured = min(DEFAULT_MARGIN_CAP, DEFAULT_MARGIN_FRACTION * walltime)
    return max(0.0, min(float(configured), walltime))


@attr.s(auto_attribs=True, eq=False)
class WalltimeWatch(PeriodicService):
    """Drains blocks ``margin`` seconds before their ``walltime`` (seconds)
    ends and cancels them once idle (see the module's docstring).

    ``scaler`` (a :class:`~funcx_endpoint.executor.blocks.BlockScaler`) owns
    the blocks; ``load`` is the interchange; ``clock`` runs a check every
    ``interval`` seconds.
    """

    stopped_message = "The walltime watch stopped"
    name = "walltimes"

    scaler: BlockScaler
    load: ILoadSource
    _clock: IReactorTime
    walltime: float
    margin: float
    interval: float = attr.ib(default=1.0, kw_only=True)
    #: Block id: when it began draining; block id: its managers gone by then.
    drained: Dict[str, float] = attr.ib(factory=dict, init=False)
    _gone_at_drain: Dict[str, int] = attr.ib(factory=dict, init=False)
    cancelled: int = attr.ib(default=0, init=False)  # drained blocks cancelled once idle

    # -- times ------------------------------------------------------------------------

    @staticmethod
    def started(block: Block, managers: Sequence[ManagerInfo]) -> Optional[float]:
        """When ``block`` started, as far as is known (None: not yet)."""
        times = [m.registered_at for m in managers]
        if block.started_at is not None:
            times.append(block.started_at)
        return min(times) if times else None

    def drain_at(self, block: Block, managers: Sequence[ManagerInfo]) -> Optional[float]:
        """When ``block`` drains (None: not started yet)."""
        start = self.started(block, managers)
        return None if start is None else start + self.walltime - self.margin

    def ending(self, block: Block, managers: Sequence[ManagerInfo], now: float) -> bool:
        """Whether ``block`` counts as going away now: it drains, or will
        before a replacement submitted now could start."""
        if block.block_id in self.drained:
            return True
        start = self.started(block, managers)
        if start is None:
            return False
        lead = min(max(0.0, start - block.submitted_at), self.walltime / 2)
        return now >= start + self.walltime - self.margin - lead

    # -- the check -------------------------------------------------------------------

    def check(self) -> None:
        """Drain the blocks whose drain time has come; cancel drained blocks
        whose managers hold no task."""
        now = self._clock.seconds()
        by_block = self.scaler.managers_by_block()
        departures = self.load.departures()
        idle: List[str] = []
        for block in self.scaler.active_blocks():
            managers = by_block.get(block.block_id, [])
            if block.block_id not in self.drained:
                at = self.drain_at(block, managers)
                if at is None or now < at:
                    continue
                left = at + self.margin - now
                self.drained[block.block_id] = now
                self._gone_at_drain[block.block_id] = departures.get(block.block_id, 0)
                block.draining = True
                self.load.drain_block(
                    block.block_id,
                    f"its walltime ({self.walltime:g}s) ends in {max(0.0, left):.0f}s",
                )
            if departures.get(block.block_id, 0) > self._gone_at_drain[block.block_id]:
                continue  # its job is ending: the scheduler's walltime, say
            if all(m.active_tasks == 0 for m in managers):
                idle.append(block.block_id)
        known = {b.block_id for b in self.scaler.blocks()}
        for block_id in [b for b in self.drained if b not in known]:
            del self.drained[block_id]
            del self._gone_at_drain[block_id]
        if idle:
            self.cancelled += len(idle)
            self.scaler.scale_in(
                block_ids=idle,
                only_idle=True,
                reason="its walltime ends soon and its managers are idle",
            )
