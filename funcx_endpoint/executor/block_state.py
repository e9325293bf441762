"""The record of one block, and the rules the block scaler follows for it.

:class:`Block` is what :class:`~funcx_endpoint.executor.blocks.BlockScaler`
knows of one block; :class:`PollSchedule` says when the scaler asks the
provider about its blocks; :func:`describe_block` is a block as
``funcx-endpoint status`` lists it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import attr

from funcx_endpoint.executor.interface import ManagerInfo
from funcx_endpoint.executor.providers.base import JobState, JobStatus

__all__ = ["Block", "PollSchedule", "describe_block", "last_lines", "manager_is_idle"]


@attr.s(auto_attribs=True, eq=False)
class Block:
    """One block: a provider job of ``nodes_per_block`` managers."""

    block_id: str
    submitted_at: float
    job_id: Any = None  # None while the submission is in progress
    state: JobState = JobState.PENDING
    status: Optional[JobStatus] = None  # the provider's last word
    cancelled: bool = False  # we asked for its end
    cancel_retry: bool = False  # the provider's cancel failed: try again
    managers_seen: bool = False  # one of its managers has connected
    manager_since: Optional[float] = None  # when its first manager seen registered
    manager_last_seen: Optional[float] = None  # last time one of its managers was connected
    healthy: bool = False  # proved it works (see BlockScaler)
    ended_at: Optional[float] = None
    failed_start: bool = False
    started_at: Optional[float] = None  # first seen running (by the provider or a manager)
    departures: int = 0  # of its managers that have gone, as last seen
    manager_lost_at: Optional[float] = None  # last time one of its managers was seen gone
    error: Optional[str] = None  # why it failed to start
    draining: bool = False  # its walltime ends soon: its managers take no new task
    container_type: str = "RAW"  # the type its managers serve (hard routing)

    @property
    def active(self) -> bool:
        """Counts against the block limits: not ended, not being cancelled."""
        return not self.state.terminal and not self.cancelled


def manager_is_idle(manager: ManagerInfo) -> bool:
    """True if the manager runs nothing and has nothing queued."""
    return manager.idle_since is not None and manager.active_tasks == 0


@attr.s(auto_attribs=True, frozen=True)
class PollSchedule:
    """When the provider is asked about the blocks (see
    :class:`~funcx_endpoint.executor.blocks.BlockScaler`).

    Every ``status_interval`` seconds; every ``prompt_interval`` seconds
    while a block is in question, for at most ``status_interval`` after the
    event that raised the question; never about a block younger than
    ``first_poll_delay`` seconds.
    """

    status_interval: float
    prompt_interval: float
    first_poll_delay: float = 0.0

    def watched(self, block: Block, now: float) -> bool:
        """Whether the provider may be asked about ``block`` now."""
        return (
            block.job_id is not None
            and not block.state.terminal
            and now - block.submitted_at >= self.first_poll_delay
        )

    def in_question(self, block: Block, now: float, managers: Sequence[ManagerInfo]) -> bool:
        """Whether the provider should be asked about ``block`` soon: its
        managers (``managers`` are those connected) have gone, or they are
        there while the provider last said it was pending."""
        if block.cancelled or not self.watched(block, now):
            return False
        if not managers:
            lost = block.manager_lost_at
            return lost is not None and now - lost <= self.status_interval
        if block.state in (JobState.PENDING, JobState.UNKNOWN):
            since = block.manager_since
            return since is not None and now - since <= self.status_interval
        return False

    def due(
        self,
        now: float,
        last_poll: float,
        blocks: Sequence[Block],
        connected: Mapping[str, List[ManagerInfo]],
    ) -> bool:
        """Whether to ask the provider now, its last answer being from ``last_poll``."""
        since = now - last_poll
        if since >= self.status_interval - 1e-6:
            return True
        if since < self.prompt_interval - 1e-6:
            return False
        return any(self.in_question(b, now, connected.get(b.block_id, [])) for b in blocks)


def describe_block(
    block: Block,
    managers: Sequence[ManagerInfo],
    expected_managers: int,
    walltime: Optional[float],
    now: float,
) -> Dict[str, Any]:
    """``block`` for ``funcx-endpoint status`` (see ``BlockScaler.describe_blocks``)."""
    entry: Dict[str, Any] = {
        "block": block.block_id,
        "job_id": "(submitting)" if block.job_id is None else str(block.job_id),
        "state": "CANCELLING" if block.cancelled else block.state.name,
        "nodes": sorted({m.hostname for m in managers}),
        "managers": f"{len(managers)}/{expected_managers}",
    }
    if block.draining:
        entry["draining"] = True
    if walltime:
        used = 0.0 if block.started_at is None else now - block.started_at
        entry["walltime_left"] = round(max(0.0, walltime - used), 1)
    return entry


def last_lines(text: str, count: int = 3, limit: int = 400) -> str:
    """The last ``count`` non-empty lines of ``text``, joined by ``" | "``, at
    most ``limit`` characters (for one-line messages)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " | ".join(lines[-count:])
    return joined if len(joined) <= limit else "..." + joined[-limit:]
