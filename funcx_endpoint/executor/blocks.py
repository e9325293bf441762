"""Blocks of managers: submitted to a provider, watched, cancelled.

A *block* is one provider job running ``nodes_per_block`` managers, one per
node.  :class:`BlockScaler` owns the blocks of one executor: it submits them
(``scale_out``), cancels them (``scale_in``, idle ones first), and follows
their states by polling the provider every ``status_polling_interval``.  It
decides nothing by itself: the strategy (``executor/strategy.py``) says when
to scale.  It remembers the *failed starts* (see :class:`BlockScaler`) so that
the strategy can back off instead of submitting broken blocks in a loop,
and the last failure's message (the scheduler's own words where the
provider gave them) for ``funcx-endpoint status`` and for the tasks that
no block could serve.

Each block gets an id, ``"0"``, ``"1"``..., which replaces ``{block_id}`` in
the manager command template; the managers report it when they register, so
:meth:`ILoadSource.managers` tells which block each manager belongs to.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Collection, Deque, Dict, List, Optional, Sequence

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from funcx_endpoint.executor.block_state import (
    Block,
    PollSchedule,
    describe_block,
    last_lines,
    manager_is_idle,
)
from funcx_endpoint.executor.interface import ILoadSource, ManagerInfo
from funcx_endpoint.executor.providers.base import (
    IAsyncProvider,
    JobState,
    JobStatus,
    SubmitError,
)
from funcx_endpoint.lifecycle import stop_loop
from funcx_endpoint.observer import fresh_result

__all__ = ["BLOCK_ID", "Block", "BlockScaler", "manager_is_idle"]

BLOCK_ID = "{block_id}"
#: Replaced by the block's container type (hard routing: its managers serve that type).
CONTAINER_TYPE = "{container_type}"
#: What a container type may hold to go into a command line (container ids, RAW).
_SAFE_TYPE = re.compile(r"[A-Za-z0-9_.:-]+")


class BlockScaler(Service):
    """Submits, follows and cancels the blocks of one executor.

    ``provider`` is the executor's provider behind its adapter
    (:func:`~funcx_endpoint.executor.providers.local.provider_from_config`);
    the scaler starts and stops it.  ``load`` tells which managers are
    connected (their ``block_id``), ``clock`` times the status polls.
    ``command_template`` is the shell command that starts one manager; every
    ``{block_id}`` in it is replaced by the block's id, nothing else in it is
    interpreted.

    A block is *healthy* once one of its managers has sent a result, or has
    stayed connected for ``min_healthy_lifetime`` seconds (seen at a status
    poll).  A *failed start* is a block that ended without being cancelled
    before it was healthy (before any of its managers connected, or within
    ``min_healthy_lifetime`` seconds of its first manager's registration), or
    whose submission failed.  :attr:`consecutive_failures` counts them since
    the last time a block became healthy: a manager that registers and then
    exits (its workers cannot start, say) does not reset it, so the
    strategy's backoff keeps growing.  :attr:`last_failure_at` is when the
    last failed start was seen.

    :attr:`last_error` is the message of the last failed start: the
    provider's submit error (with the scheduler's message, see
    :class:`~funcx_endpoint.executor.providers.base.SubmitError`), or how the
    block ended and the end of its stderr.

    The provider is asked for the states of the blocks every
    ``status_polling_interval`` (the provider's: 60 s for Parsl's Slurm
    provider), and sooner, every ``prompt_poll_interval`` seconds, while a
    block is in question: its managers have gone (has its job ended?), or
    they connected while the provider last said it was pending (has it
    started?); for at most one ``status_polling_interval`` after that.
    Managers that come and go between two looks are seen through
    :meth:`ILoadSource.departures`.  A
    block younger than ``first_poll_delay`` seconds is not asked about: a
    scheduler's accounting may not know a job yet (Parsl's Slurm provider
    takes a job ``sacct`` does not list for a COMPLETED one).  A block the
    provider says has ended has its managers, if any are still connected,
    retired at the load source.

    ``stopService`` waits for submissions in progress, cancels every block
    and stops the provider (which, for the local one, waits for its processes).
    """

    log = Logger()
    name = "blocks"

    def __init__(
        self,
        provider: IAsyncProvider,
        load: ILoadSource,
        clock: IReactorTime,
        command_template: str,
        *,
        tasks_per_node: int = 1,
        job_name_prefix: str = "funcx",
        min_healthy_lifetime: float = 60.0,
        history: int = 100,
        prompt_poll_interval: float = 5.0,
        first_poll_delay: float = 0.0,
    ) -> None:
        if BLOCK_ID not in command_template:
            raise ValueError(
                f"the manager command template must contain {BLOCK_ID}: {command_template!r}"
            )
        self.provider = provider
        self.load = load
        self._clock = clock
        self.command_template = command_template
        self.tasks_per_node = tasks_per_node
        self.job_name_prefix = job_name_prefix
        self.min_healthy_lifetime = min_healthy_lifetime
        self.prompt_poll_interval = prompt_poll_interval
        self.first_poll_delay = first_poll_delay
        self._blocks: Dict[str, Block] = {}  # not yet ended, in submission order
        self._history: Deque[Block] = collections.deque(maxlen=history)
        self._ended: collections.Counter[str] = collections.Counter()
        self._next_block = 0
        self._submissions: Dict[str, Deferred[bool]] = {}
        self._poller: Optional[LoopingCall] = None
        self._polling: Optional[Deferred[None]] = None
        self._stopping = False
        self._last_poll = 0.0
        self.consecutive_failures = 0
        self.last_failure_at: Optional[float] = None
        self.failed_starts = 0
        self.last_error: Optional[str] = None

    # -- views ------------------------------------------------------------------------

    def blocks(self) -> List[Block]:
        """Blocks not ended yet (including those being cancelled), oldest first."""
        return list(self._blocks.values())

    def active_blocks(self) -> List[Block]:
        """Blocks that count against the limits: submitted, not ended nor cancelled."""
        return [b for b in self._blocks.values() if b.active]

    def ended_blocks(self) -> List[Block]:
        """The most recently ended blocks, oldest first."""
        return list(self._history)

    def block(self, block_id: str) -> Optional[Block]:
        """The block with this id, if it has not ended."""
        return self._blocks.get(block_id)

    def managers_by_block(self) -> Dict[str, List[ManagerInfo]]:
        """The connected managers of each block that has any."""
        result: Dict[str, List[ManagerInfo]] = {}
        for manager in self.load.managers():
            result.setdefault(manager.block_id, []).append(manager)
        return result

    def status_fields(self) -> Dict[str, Any]:
        """Block counts by state for ``funcx-endpoint status``."""
        states: collections.Counter[str] = collections.Counter()
        for block in self._blocks.values():
            states["CANCELLING" if block.cancelled else block.state.name] += 1
        blocks: Dict[str, Any] = {
            "provider": self.provider.label,
            "active": len(self.active_blocks()),
            "states": dict(states),
            "ended": dict(self._ended),
            "failed_starts_in_a_row": self.consecutive_failures,
            **self._by_type(),
        }
        if self.last_error is not None:
            blocks["last_error"] = self.last_error
            if self.last_failure_at is not None:
                blocks["last_error_age"] = round(self._clock.seconds() - self.last_failure_at, 1)
        return {"blocks": blocks}

    def describe_blocks(self) -> List[Dict[str, Any]]:
        """One dict per block not ended: ``block``, ``job_id``, ``state`` (the
        provider's last word; CANCELLING once we asked for its end), ``nodes``
        (host names of its connected managers), ``managers`` (connected, out
        of ``nodes_per_block * tasks_per_node``), and ``walltime_left``
        (seconds, counted from when it was first seen running) where the
        provider has a walltime."""
        now = self._clock.seconds()
        by_block = self.managers_by_block()
        expected = max(1, self.provider.nodes_per_block) * max(1, self.tasks_per_node)
        walltime = getattr(self.provider, "walltime", None)
        return [
            describe_block(block, by_block.get(block.block_id, []), expected, walltime, now)
            for block in self._blocks.values()
        ]

    def _by_type(self) -> Dict[str, Any]:
        types = collections.Counter(b.container_type for b in self.active_blocks())
        if set(types) <= {"RAW"}:
            return {}
        return {"active_by_container_type": dict(types)}

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if IService.providedBy(self.provider) and not self.provider.running:
            self.provider.startService()
        self._last_poll = self._clock.seconds()
        self._poller = LoopingCall(self._check)
        self._poller.clock = self._clock
        interval = min(self.provider.status_polling_interval, self.prompt_poll_interval)
        d = self._poller.start(interval, now=False)
        d.addErrback(lambda f: self.log.failure("Block status polling stopped", f))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        stop_loop(self._poller)
        self._poller = None
        if self._polling is not None:
            await fresh_result(self._polling)
        # A submission that returns now is cancelled at once (see _submit).
        await gatherResults([fresh_result(d) for d in self._submissions.values()])
        left = [b for b in self._blocks.values() if b.job_id is not None and not b.state.terminal]
        if left:
            self.log.info("Cancelling {n} block(s)", n=len(left))
            for block in left:
                block.cancelled = True
            await self._cancel(left)
        if IService.providedBy(self.provider) and self.provider.running:
            await self.provider.stopService()

    # -- scaling ------------------------------------------------------------------------

    def scale_out(self, count: int, container_type: str = "RAW") -> Deferred[List[str]]:
        """Submit ``count`` new blocks; they count as active (PENDING) at once.

        ``container_type`` replaces ``{container_type}`` in the command (the
        one type the blocks' managers serve, with hard routing).  Fires with
        the ids of the blocks submitted successfully.  A failed submission is
        logged and counted as a failed start, not raised.
        """
        if count <= 0:
            return succeed([])
        if not _SAFE_TYPE.fullmatch(container_type):
            self.log.error(
                "Not starting blocks for container type {container_type}: not a container id",
                container_type=container_type,
            )
            return succeed([])
        if not self.running or self._stopping:
            self.log.warn("Not starting {n} block(s): the scaler is not running", n=count)
            return succeed([])
        now = self._clock.seconds()
        new = [
            Block(str(self._next_block + i), now, container_type=container_type)
            for i in range(count)
        ]
        self._next_block += count
        self.log.info(
            "Starting {n} block(s){of_type}: {ids}",
            n=count,
            of_type="" if container_type == "RAW" else f" for container {container_type}",
            ids=", ".join(b.block_id for b in new),
        )
        waits = []
        for block in new:
            self._blocks[block.block_id] = block
            submission = Deferred.fromCoroutine(self._submit(block))
            if not submission.called:
                self._submissions[block.block_id] = submission
                submission.addBoth(self._submitted, block.block_id)
            waits.append(fresh_result(submission))
        return gatherResults(waits).addCallback(
            lambda ok: [b.block_id for b, good in zip(new, ok) if good]
        )

    def _submitted(self, result: object, block_id: str) -> object:
        self._submissions.pop(block_id, None)
        return result

    async def _submit(self, block: Block) -> bool:
        command = self.command_template.replace(BLOCK_ID, block.block_id).replace(
            CONTAINER_TYPE, block.container_type
        )
        job_name = f"{self.job_name_prefix}.block-{block.block_id}"
        try:
            job_id = await self.provider.submit(command, self.tasks_per_node, job_name)
        except Exception as e:
            error = str(e) if isinstance(e, SubmitError) else f"{type(e).__name__}: {e}"
            self.log.error(
                "Block {block_id} could not be submitted to the {provider} provider: {error}",
                block_id=block.block_id,
                provider=self.provider.label,
                error=error,
            )
            status = JobStatus(JobState.FAILED, f"submit failed: {error}")
            block.status = status
            block.state = JobState.FAILED
            self._failed_start(
                block,
                f"block {block.block_id} could not be submitted to the "
                f"{self.provider.label} provider: {error}",
            )
            self._retire(block)
            return False
        block.job_id = job_id
        self.log.info(
            "Block {block_id} submitted as {provider} job {job_id}",
            block_id=block.block_id,
            provider=self.provider.label,
            job_id=job_id,
        )
        if block.cancelled or self._stopping:
            # Scaled in, or the scaler stopped, while it was being submitted.
            block.cancelled = True
            await self._cancel([block])
        return True

    def scale_in(
        self,
        count: Optional[int] = None,
        block_ids: Optional[Collection[str]] = None,
        *,
        only_idle: bool = False,
        reason: str = "scaling in",
    ) -> Deferred[List[str]]:
        """Cancel blocks: those named, or ``count`` chosen by :meth:`choose_for_scale_in`.

        First their managers are retired at the load source
        (:meth:`ILoadSource.retire_block`): they get no more tasks, and the
        tasks they hold, if any, are queued again without counting an
        attempt.  With ``only_idle``, a block one of whose managers holds a
        task now is left alone.  The blocks stop counting as active at once.
        Fires with the ids of the blocks cancelled.
        """
        if block_ids is not None:
            chosen = [self._blocks[b] for b in block_ids if b in self._blocks]
            chosen = [b for b in chosen if b.active]
        else:
            chosen = self.choose_for_scale_in(count or 0)
        retired = []
        for block in chosen:
            if self.load.retire_block(block.block_id, reason, only_idle):
                retired.append(block)
            else:
                self.log.info(
                    "Not stopping block {block_id}: one of its managers has a task now",
                    block_id=block.block_id,
                )
        chosen = retired
        if not chosen:
            return succeed([])
        self.log.info(
            "Stopping {n} block(s): {ids}", n=len(chosen), ids=", ".join(b.block_id for b in chosen)
        )
        for block in chosen:
            block.cancelled = True
        submitted = [b for b in chosen if b.job_id is not None]
        # Those still being submitted are cancelled when their submission returns.
        ids = [b.block_id for b in chosen]
        return Deferred.fromCoroutine(self._cancel(submitted)).addCallback(lambda _: ids)

    def choose_for_scale_in(self, count: int) -> List[Block]:
        """The ``count`` active blocks best stopped first.

        First blocks whose managers are all idle (the longest idle first),
        then blocks with no manager connected (the newest first), then busy
        blocks (the fewest tasks first).
        """
        managers = self.managers_by_block()

        def cost(block: Block) -> tuple[int, float]:
            mine = managers.get(block.block_id, [])
            if not mine:
                return (1, -block.submitted_at)
            if all(manager_is_idle(m) for m in mine):
                return (0, max(m.idle_since or 0.0 for m in mine))
            return (2, float(sum(m.active_tasks for m in mine)))

        return sorted(self.active_blocks(), key=cost)[: max(0, count)]

    async def _cancel(self, blocks: Sequence[Block]) -> None:
        jobs = [b for b in blocks if b.job_id is not None and not b.state.terminal]
        if not jobs:
            return
        try:
            results = await self.provider.cancel([b.job_id for b in jobs])
        except Exception as e:
            self.log.error(
                "The {provider} provider failed to cancel jobs {jobs}: {error}; will retry",
                provider=self.provider.label,
                jobs=[b.job_id for b in jobs],
                error=f"{type(e).__name__}: {e}",
            )
            for block in jobs:
                block.cancel_retry = True
            return
        now = self._clock.seconds()
        for block, cancelled in zip(jobs, results):
            block.cancel_retry = False
            if cancelled and not block.state.terminal:
                block.state = JobState.CANCELLED
                block.status = JobStatus(JobState.CANCELLED, "cancelled by the endpoint")
                block.ended_at = now
                self._retire(block)
            # Otherwise the job had already ended: the next poll says how.

    # -- following the blocks ------------------------------------------------------------

    def _schedule(self) -> PollSchedule:
        return PollSchedule(
            self.provider.status_polling_interval,
            self.prompt_poll_interval,
            self.first_poll_delay,
        )

    def _check(self) -> Optional[Deferred[None]]:
        """Every tick of the poller: note the managers; ask the provider when
        its polling interval has passed, or sooner while a block is in question."""
        self._note_managers()
        schedule = self._schedule()
        now = self._clock.seconds()
        if schedule.due(now, self._last_poll, self.blocks(), self.managers_by_block()):
            return self.poll()
        return None

    def poll(self) -> Deferred[None]:
        """Ask the provider for the state of every block now (one poll at a time)."""
        if self._polling is not None:
            return fresh_result(self._polling)
        polling = Deferred.fromCoroutine(self._poll())
        if polling.called:
            return polling
        self._polling = polling
        polling.addBoth(self._polled)
        return fresh_result(polling)

    def _polled(self, result: object) -> object:
        self._polling = None
        return result

    async def _poll(self) -> None:
        try:
            self._note_managers()
            now = self._last_poll = self._clock.seconds()
            retry = [b for b in self._blocks.values() if b.cancel_retry]
            if retry:
                await self._cancel(retry)
            schedule = self._schedule()
            watched = [b for b in self._blocks.values() if schedule.watched(b, now)]
            if not watched:
                return
            statuses = await self.provider.status([b.job_id for b in watched])
            for block, status in zip(watched, statuses):
                await self._update(block, status)
        except Exception:
            self.log.failure("Polling the {provider} provider failed", provider=self.provider.label)

    def _note_managers(self) -> None:
        now = self._clock.seconds()
        departures = self.load.departures()
        for each in self._blocks.values():
            gone = departures.get(each.block_id, 0)
            if gone > each.departures:
                each.departures = gone
                each.managers_seen = True
                each.manager_lost_at = now
        for block_id, managers in self.managers_by_block().items():
            block = self._blocks.get(block_id)
            if block is None:
                continue
            block.managers_seen = True
            block.manager_last_seen = now
            first = min(m.registered_at for m in managers)
            if block.manager_since is None or first < block.manager_since:
                block.manager_since = first
            if block.started_at is None or first < block.started_at:
                block.started_at = first
            if block.healthy:
                continue
            served = any(m.tasks_completed > 0 for m in managers)
            if served or now - first >= self.min_healthy_lifetime:
                block.healthy = True
                if self.consecutive_failures:
                    self.log.info(
                        "Block {block_id} is healthy ({how}): blocks start again",
                        block_id=block_id,
                        how="its managers return results"
                        if served
                        else f"a manager of it connected {now - first:.0f}s ago",
                    )
                self.consecutive_failures = 0

    async def _update(self, block: Block, status: JobStatus) -> None:
        if block.state.terminal:  # cancelled meanwhile
            return
        block.status = status
        if status.state == block.state:
            return
        block.state = status.state
        if status.state == JobState.RUNNING and block.started_at is None:
            block.started_at = self._clock.seconds()
        if not status.terminal:
            self.log.info(
                "Block {block_id} (job {job_id}) is {state}",
                block_id=block.block_id,
                job_id=block.job_id,
                state=status.state.name,
            )
            return
        now = self._clock.seconds()
        block.ended_at = now
        stopped = block.cancelled or status.state in (JobState.CANCELLED, JobState.SCALED_IN)
        # Measured to the last time a manager of it was seen connected, not to
        # now: a provider that polls slowly learns of the end late.
        healthy = block.healthy or (
            block.manager_since is not None
            and block.manager_last_seen is not None
            and block.manager_last_seen - block.manager_since >= self.min_healthy_lifetime
        )
        if not stopped and not healthy:
            self._failed_start(block, None)
        if self.managers_by_block().get(block.block_id):
            self.load.retire_block(block.block_id, f"its job ended: {status}", False)
        if not stopped and (
            block.failed_start or status.state in (JobState.FAILED, JobState.MISSING)
        ):
            tail = await self.provider.read_tail(status.stderr_path)
            why = (
                "before any of its managers connected"
                if not block.managers_seen
                else (f"{now - block.submitted_at:.0f}s after its submission")
            )
            if block.failed_start:
                self._note_error(
                    block,
                    f"block {block.block_id} (job {block.job_id}) ended {why}: {status}"
                    + (f"; its stderr ends: {last_lines(tail)}" if tail else ""),
                )
            self.log.error(
                "Block {block_id} (job {job_id}) ended {why}: {status}; stderr ({path}):\n{tail}",
                block_id=block.block_id,
                job_id=block.job_id,
                why=why,
                status=str(status),
                path=status.stderr_path,
                tail=tail if tail else "(none)",
            )
        else:
            self.log.info(
                "Block {block_id} (job {job_id}) ended: {status}",
                block_id=block.block_id,
                job_id=block.job_id,
                status=str(status),
            )
        self._retire(block)

    def _failed_start(self, block: Block, error: Optional[str]) -> None:
        block.failed_start = True
        self.failed_starts += 1
        self.consecutive_failures += 1
        self.last_failure_at = self._clock.seconds()
        if error is not None:
            self._note_error(block, error)

    def _note_error(self, block: Block, error: str) -> None:
        block.error = error
        self.last_error = error

    def _retire(self, block: Block) -> None:
        if self._blocks.pop(block.block_id, None) is not None:
            self._history.append(block)
            self._ended[block.state.name] += 1
