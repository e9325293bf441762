"""Blocks that lost some of their managers are drained and replaced.

A block runs ``nodes_per_block * tasks_per_node`` managers.  When one of them
dies (killed, its node lost) and the others stay, the scheduler still counts
the job as running and the strategy still counts its slots, so the block
would work at a fraction of its size until its walltime (issue 12: 4 of 8
workers for minutes under load).  :class:`DegradedBlocks` notices such a
block and replaces it, in the same way as a block whose walltime ends (see
:mod:`~funcx_endpoint.executor.walltime`):

* A block is *short* while it has fewer managers connected than expected,
  but at least one (a block with none is left to the provider's polls and
  the idle rules).  It is *degraded* once it has been short for
  ``grace`` seconds after one of its managers left, or for ``start_grace``
  seconds without one leaving (a node whose manager never came).
* A degraded block is drained, only while tasks wait (more tasks outstanding
  than the connected workers hold): its managers get no new task, and it
  counts neither for the slots nor against ``max_blocks`` (``draining``), so
  the strategy requests a replacement at its next tick.  Without waiting
  tasks a short block is left alone: it serves what there is, and the idle
  rules scale it in.
* Once none of its managers holds a task, it is cancelled (its remaining
  managers and their nodes are released).

Decision: the replacement starts at once, alongside the draining block
(briefly ``max_blocks + 1`` jobs, as for walltimes), rather than after the
degraded block has finished its tasks: the work then never waits on half a
block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

import attr
from twisted.internet.interfaces import IReactorTime

from funcx_endpoint.executor.interface import ILoadSource
from funcx_endpoint.lifecycle import PeriodicService

if TYPE_CHECKING:
    from funcx_endpoint.executor.blocks import BlockScaler

__all__ = ["DEFAULT_GRACE", "DEFAULT_START_GRACE", "DegradedBlocks"]

#: Seconds a block may stay short after one of its managers left.
DEFAULT_GRACE = 30.0
#: Seconds a block may stay short with no manager gone (a node whose manager
#: starts late, or never).
DEFAULT_START_GRACE = 300.0


@attr.s(auto_attribs=True, eq=False)
class DegradedBlocks(PeriodicService):
    """Drains and replaces blocks short of managers (see the module's docstring).

    ``scaler`` owns the blocks; ``load`` is the interchange; ``clock`` runs a
    check every ``interval`` seconds.
    """

    stopped_message = "The degraded-block watch stopped"
    name = "degraded-blocks"

    scaler: BlockScaler
    load: ILoadSource
    _clock: IReactorTime
    grace: float = attr.ib(default=DEFAULT_GRACE, kw_only=True)
    start_grace: float = attr.ib(default=DEFAULT_START_GRACE, kw_only=True)
    interval: float = attr.ib(default=1.0, kw_only=True)
    #: Block id: when first seen short; block id: when drained for being short.
    short_since: Dict[str, float] = attr.ib(factory=dict, init=False)
    drained: Dict[str, float] = attr.ib(factory=dict, init=False)
    replaced: int = attr.ib(default=0, init=False)  # degraded blocks drained

    def expected_managers(self) -> int:
        """Managers a block runs: ``nodes_per_block * tasks_per_node``."""
        return max(1, self.scaler.provider.nodes_per_block) * max(1, self.scaler.tasks_per_node)

    def check(self) -> None:
        """Note the short blocks; drain the degraded ones while tasks wait;
        cancel drained blocks whose managers hold no task."""
        now = self._clock.seconds()
        expected = self.expected_managers()
        by_block = self.scaler.managers_by_block()
        departures = self.load.departures()
        managers = [m for ms in by_block.values() for m in ms]
        waiting = self.load.outstanding_tasks() > sum(m.worker_count for m in managers)
        idle: List[str] = []
        short = set()
        for block in self.scaler.active_blocks():
            block_id = block.block_id
            mine = by_block.get(block_id, [])
            if block_id in self.drained:
                if all(m.active_tasks == 0 for m in mine):
                    idle.append(block_id)
                continue
            if block.draining or not (0 < len(mine) < expected):
                continue
            short.add(block_id)
            since = self.short_since.setdefault(block_id, now)
            left = departures.get(block_id, 0) > 0
            if now - since < (self.grace if left else self.start_grace) or not waiting:
                continue
            block.draining = True
            self.drained[block_id] = now
            self.replaced += 1
            why = (
                f"{len(mine)} of its {expected} managers connected for {now - since:.0f}s "
                f"while tasks wait"
            )
            self.log.warn(
                "Block {block_id} is short of managers ({why}): draining it; a new block "
                "replaces it",
                block_id=block_id,
                why=why,
            )
            self.load.drain_block(block_id, f"it lost managers: {why}")
            if all(m.active_tasks == 0 for m in mine):
                idle.append(block_id)
        for block_id in [b for b in self.short_since if b not in short]:
            del self.short_since[block_id]
        known = {b.block_id for b in self.scaler.blocks()}
        for block_id in [b for b in self.drained if b not in known]:
            del self.drained[block_id]
        if idle:
            self.scaler.scale_in(
                block_ids=idle,
                only_idle=True,
                reason="it lost managers and its remaining managers are idle",
            )
