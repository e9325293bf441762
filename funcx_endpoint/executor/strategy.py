"""When to start and stop blocks: funcX's simple strategy, on a clock.

:class:`SimpleStrategy` looks at the load every ``interval`` seconds
(a ``LoopingCall`` on the injected clock) and tells the :class:`BlockScaler`
to scale out or in.  The limits come from the provider (``init_blocks``,
``min_blocks``, ``max_blocks``, ``nodes_per_block``, ``parallelism``), as
with Parsl's providers.  The rules, in the order they are applied:

1. At start, ``init_blocks`` blocks are submitted.
2. *Active* blocks are those submitted and not ended nor being cancelled
   (pending, running, held or of unknown state), except those whose
   walltime ends soon (see :mod:`~funcx_endpoint.executor.walltime`): a
   draining block, or one that drains before a replacement could start,
   counts as gone already, so its replacement is requested in time.  Each holds
   ``slots_per_block = nodes_per_block * workers_per_manager`` tasks, where
   ``workers_per_manager`` is the mean ``worker_count`` of the connected
   managers, or, before any connects, the estimate from the executor's
   config (:func:`estimate_workers_per_node`).
3. Scale out: first up to ``min_blocks``; then, if the outstanding tasks
   exceed the slots of the active blocks (those just requested included) by
   ``excess``, by ``ceil(excess * parallelism / slots_per_block)`` blocks, and
   by at least one if there are tasks and no block at all (so parallelism 0
   means: one block while there is work, else ``min_blocks``).  Never past
   ``max_blocks`` active blocks.
4. Back off after failed starts (see :class:`BlockScaler`): after ``k`` in a
   row, no block is submitted until ``min(backoff_base * 2**(k-1),
   backoff_cap)`` seconds after the last one.  A block proving healthy (a
   manager of it sent a result, or stayed connected ``min_healthy_lifetime``)
   resets ``k``; a manager that merely connects, then quits, does not.
   This holds the ``min_blocks`` top-up too: a block that cannot start is
   not retried in a loop.  Once the backoff has reached its cap (after
   ``give_up_after`` failed starts in a row: by default the first ``k``
   whose delay reaches ``backoff_cap``, 6 with the defaults) and no manager
   is connected, the tasks waiting for a manager fail with
   ``BlockStartFailed`` and the scaler's last error (the scheduler's own
   message where there is one) instead of waiting forever; tasks that
   arrive while that lasts fail at the next tick.  A block is still tried
   when tasks are there and the backoff allows (at most once per
   ``backoff_cap`` seconds), so the endpoint serves again once a block starts.
5. Scale in, when not scaling out: a block is idle when none of its
   managers has a task (since the latest ``idle_since`` of its managers), or
   when it has no manager connected (since the strategy first saw it so).
   Blocks idle for ``max_idletime`` seconds are cancelled, longest idle
   first, never below ``min_blocks``, and only while the blocks left still
   have a slot for every outstanding task (with no outstanding task, every
   idle block down to ``min_blocks``).  The managers of the chosen blocks
   are retired at the interchange first (no more tasks for them; a block
   that took a task since the decision is kept), then the blocks cancelled.

With hard routing by container (``per_type``), every block serves one
container type (its managers are started with ``--container-type``), and
the rules apply to each type apart (:meth:`SimpleStrategy.decide_per_type`):
a type's outstanding tasks against the slots of its own blocks; the initial
and ``min_blocks`` blocks are ``RAW``; ``max_blocks`` bounds all types
together, types with no block served first.  A type that needs its first
block while ``max_blocks`` are active takes the place of idle blocks of types
with no outstanding task, at once (without waiting ``max_idletime``): so a
type never waits for more than the work of the others.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from funcx_endpoint.config.bounds import MAX_WORKERS_PER_NODE
from funcx_endpoint.executor.blocks import Block, BlockScaler, manager_is_idle
from funcx_endpoint.executor.degraded import DegradedBlocks
from funcx_endpoint.executor.interface import ILoadSource, ManagerInfo
from funcx_endpoint.executor.providers.local import provider_from_config
from funcx_endpoint.executor.walltime import WalltimeWatch, drain_margin
from funcx_endpoint.lifecycle import IStatusPart, stop_loop
from funcx_endpoint.observer import fresh_result
from funcx_endpoint.wire.errors import ErrorCode

#: Seconds before a Parsl provider is asked about a new block (see BlockScaler).
FIRST_POLL_DELAY = 10.0

#: The container type of blocks started for no type in particular.
RAW_TYPE = "RAW"


def estimate_workers_per_node(
    max_workers_per_node: float,
    cores_per_worker: float,
    cores_per_node: Optional[int] = None,
) -> int:
    """Workers a manager will start, before one has told us.

    ``cores_per_node // cores_per_worker`` (this machine's cores when the
    provider does not say), capped by ``max_workers_per_node``, at least 1.
    """
    cores = cores_per_node or os.cpu_count() or 1
    workers = max(1, min(MAX_WORKERS_PER_NODE, math.floor(cores / cores_per_worker + 1e-9)))
    if math.isfinite(max_workers_per_node):
        workers = min(workers, max(1, int(max_workers_per_node)))
    return workers


@attr.s(auto_attribs=True, frozen=True)
class Decision:
    """What one strategy tick decided, and why."""

    scale_out: int = 0
    scale_in: Tuple[str, ...] = ()
    #: per-type blocks to start (hard routing): (container type, how many)
    scale_out_types: Tuple[Tuple[str, int], ...] = ()
    held: bool = False  # a scale-out was wanted but failed starts hold it back
    reason: str = ""


def _at_least_one(value: Any) -> int:
    return max(1, int(value))


@attr.s(auto_attribs=True, eq=False, repr=False)
class SimpleStrategy(Service):
    """funcX's simple scaling strategy (see the module's docstring for the rules).

    ``scaler`` owns the blocks and its provider holds the limits; ``load``
    gives the outstanding tasks and the connected managers; ``clock`` drives
    a tick every ``interval`` seconds.  ``workers_per_node`` is the estimate
    of workers per manager used until managers report theirs.
    """

    log = Logger()
    name = "strategy"

    scaler: BlockScaler
    load: ILoadSource
    _clock: IReactorTime
    interval: float = attr.ib(default=5.0, kw_only=True)
    max_idletime: float = attr.ib(default=120.0, kw_only=True)
    workers_per_node: int = attr.ib(default=1, kw_only=True, converter=_at_least_one)
    backoff_base: float = attr.ib(default=10.0, kw_only=True)
    backoff_cap: float = attr.ib(default=300.0, kw_only=True)
    per_type: bool = attr.ib(default=False, kw_only=True)
    give_up_after: Optional[int] = attr.ib(default=None, kw_only=True)
    walltimes: Optional[WalltimeWatch] = attr.ib(default=None, kw_only=True)
    tasks_failed: int = attr.ib(default=0, init=False)
    _unmanned_since: Dict[str, float] = attr.ib(factory=dict, init=False)
    _loop: Optional[LoopingCall] = attr.ib(default=None, init=False)
    _ticking: Optional[Deferred[Decision]] = attr.ib(default=None, init=False)
    _held_logged_for: Optional[float] = attr.ib(default=None, init=False)

    # -- lifecycle --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        provider = self.scaler.provider
        init = min(provider.init_blocks, provider.max_blocks)
        if init > 0:
            self.log.info("Starting {n} initial block(s)", n=init)
            self.scaler.scale_out(init)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stop_loop(self._loop)
        self._loop = None
        ticking = self._ticking
        if ticking is None:
            return succeed(None)
        return fresh_result(ticking).addCallback(lambda _: None)

    # -- decisions --------------------------------------------------------------------

    def tick(self) -> Deferred[Decision]:
        """Decide and act once; errors are logged, never raised (the loop goes on)."""
        ticking = Deferred.fromCoroutine(self._tick())
        if not ticking.called:
            self._ticking = ticking

            def done(result: Decision) -> Decision:
                self._ticking = None
                return result

            ticking.addCallback(done)
        return ticking

    async def _tick(self) -> Decision:
        try:
            decision = self.decide_per_type() if self.per_type else self.decide()
            for container_type, count in decision.scale_out_types:
                self.log.info(
                    "Scaling out by {n} block(s) for container type {container_type}: {reason}",
                    n=count,
                    container_type=container_type,
                    reason=decision.reason,
                )
                await self.scaler.scale_out(count, container_type)
            if decision.scale_out:
                self.log.info(
                    "Scaling out by {n} block(s): {reason}",
                    n=decision.scale_out,
                    reason=decision.reason,
                )
                await self.scaler.scale_out(decision.scale_out)
            elif decision.scale_in:
                self.log.info(
                    "Scaling in block(s) {ids}: {reason}",
                    ids=", ".join(decision.scale_in),
                    reason=decision.reason,
                )
                await self.scaler.scale_in(
                    block_ids=decision.scale_in,
                    only_idle=True,
                    reason=f"scaling in: {decision.reason}",
                )
            self._give_up_if_hopeless()
            return decision
        except Exception:
            self.log.failure("The scaling strategy failed; it tries again in {s}s", s=self.interval)
            return Decision(reason="error")

    def failures_before_giving_up(self) -> int:
        """Failed starts in a row after which waiting tasks fail (see the module)."""
        if self.give_up_after is not None:
            return max(1, self.give_up_after)
        k = 1
        while self.backoff_base * 2 ** (k - 1) < self.backoff_cap and k < 30:
            k += 1
        return k

    def _give_up_if_hopeless(self) -> None:
        failures = self.scaler.consecutive_failures
        if failures < self.failures_before_giving_up() or self.load.managers():
            return
        if not self.load.outstanding_tasks():
            return
        message = (
            f"no block of managers could start: {failures} failed start(s) in a row with "
            f"the {self.scaler.provider.label} provider; the last: "
            f"{self.scaler.last_error or 'unknown'}"
        )
        failed = self.load.fail_waiting(ErrorCode.BLOCK_START_FAILED, message)
        if failed:
            self.tasks_failed += failed
            self.log.error("Failed {n} waiting task(s): {message}", n=failed, message=message)

    def workers_per_manager(self, managers: List[ManagerInfo]) -> int:
        """The mean worker count of the connected managers, else the estimate."""
        counts = [m.worker_count for m in managers if m.worker_count > 0]
        if not counts:
            return self.workers_per_node
        return max(1, round(sum(counts) / len(counts)))

    def backoff_until(self) -> Optional[float]:
        """When new blocks may be submitted again after failed starts; None: now."""
        failures = self.scaler.consecutive_failures
        last = self.scaler.last_failure_at
        if failures <= 0 or last is None:
            return None
        delay = min(self.backoff_base * 2 ** min(failures - 1, 30), self.backoff_cap)
        return last + delay

    def decide(self) -> Decision:
        """What to do now (the rules of the module's docstring); changes nothing
        but the strategy's record of blocks without managers."""
        now = self._clock.seconds()
        provider = self.scaler.provider
        min_blocks = provider.min_blocks
        max_blocks = provider.max_blocks
        parallelism = provider.parallelism
        by_block = self.scaler.managers_by_block()
        # Draining blocks (walltime, lost managers) count as gone: they are replaced.
        active = [b for b in self.scaler.active_blocks() if not b.draining]
        if self.walltimes is not None:
            ending = self.walltimes.ending
            active = [b for b in active if not ending(b, by_block.get(b.block_id, []), now)]
        count = len(active)
        tasks = self.load.outstanding_tasks()
        per_block = max(1, provider.nodes_per_block) * self.workers_per_manager(
            [m for managers in by_block.values() for m in managers]
        )
        slots = count * per_block
        self._track_unmanned(active, by_block, now)

        wanted = 0
        reasons = []
        if count < min_blocks:
            wanted = min_blocks - count
            reasons.append(f"{count} active block(s) < min_blocks {min_blocks}")
        covered = slots + wanted * per_block
        if tasks > covered:
            extra = math.ceil((tasks - covered) * parallelism / per_block - 1e-9)
            if count + wanted == 0:
                extra = max(extra, 1)
            if extra > 0:
                reasons.append(
                    f"{tasks} outstanding task(s) > {covered} slot(s) "
                    f"({per_block} per block, parallelism {parallelism:g})"
                )
            wanted += extra
        wanted = max(0, min(wanted, max_blocks - count))
        if wanted > 0:
            reason = "; ".join(reasons)
            hold = self.backoff_until()
            if hold is not None and now < hold:
                if self._held_logged_for != hold:
                    self._held_logged_for = hold
                    self.log.warn(
                        "Not starting blocks for {s:.0f}s after {k} failed block start(s) in "
                        "a row (wanted {n}: {reason}); the last: {error}",
                        s=hold - now,
                        k=self.scaler.consecutive_failures,
                        n=wanted,
                        reason=reason,
                        error=self.scaler.last_error or "unknown",
                    )
                return Decision(held=True, reason=reason)
            return Decision(scale_out=wanted, reason=reason)

        if count <= min_blocks:
            return Decision(reason="steady")
        idle: List[Tuple[float, Block]] = []
        for block in active:
            since = self._idle_since(block, by_block.get(block.block_id, []))
            if since is not None and now - since >= self.max_idletime:
                idle.append((since, block))
        idle.sort(key=lambda pair: pair[0])
        chosen: List[str] = []
        for _, block in idle:
            left = count - len(chosen) - 1
            if left < min_blocks or left * per_block < tasks:
                break
            chosen.append(block.block_id)
        if chosen:
            return Decision(
                scale_in=tuple(chosen),
                reason=f"idle for {self.max_idletime:g}s or more, {tasks} outstanding task(s)",
            )
        return Decision(reason="steady")

    def decide_per_type(self) -> Decision:
        """What to do now, each container type's blocks for its own tasks (hard
        routing; see the module's docstring)."""
        now = self._clock.seconds()
        provider = self.scaler.provider
        min_blocks, max_blocks = provider.min_blocks, provider.max_blocks
        by_block = self.scaler.managers_by_block()
        # Draining blocks (walltime, lost managers) count as gone: they are replaced.
        active = [b for b in self.scaler.active_blocks() if not b.draining]
        if self.walltimes is not None:
            ending = self.walltimes.ending
            active = [b for b in active if not ending(b, by_block.get(b.block_id, []), now)]
        load: Any = self.load
        tasks_by_type: Dict[str, int] = dict(load.outstanding_by_type())
        per_block = max(1, provider.nodes_per_block) * self.workers_per_manager(
            [m for managers in by_block.values() for m in managers]
        )
        self._track_unmanned(active, by_block, now)
        blocks_of: Dict[str, List[Block]] = {}
        for block in active:
            blocks_of.setdefault(block.container_type, []).append(block)

        wanted: Dict[str, int] = {}
        reasons = []
        if len(active) < min_blocks:
            wanted[RAW_TYPE] = min_blocks - len(active)
            reasons.append(f"{len(active)} active block(s) < min_blocks {min_blocks}")
        for container_type, tasks in sorted(tasks_by_type.items()):
            count = len(blocks_of.get(container_type, ())) + wanted.get(container_type, 0)
            excess = tasks - count * per_block
            if excess <= 0:
                continue
            extra = math.ceil(excess * provider.parallelism / per_block - 1e-9)
            if count == 0:
                extra = max(extra, 1)
            if extra > 0:
                wanted[container_type] = wanted.get(container_type, 0) + extra
                reasons.append(
                    f"{tasks} outstanding task(s) of type {container_type} > "
                    f"{count * per_block} slot(s)"
                )
        room = max(0, max_blocks - len(active))
        # One block for each type with none first, then the rest by need.
        order = sorted(wanted, key=lambda t: (bool(blocks_of.get(t)), -wanted[t], t))
        given: Dict[str, int] = {}
        for container_type in order:
            if room and not blocks_of.get(container_type):
                given[container_type] = 1
                room -= 1
        for container_type in order:
            n = min(wanted[container_type] - given.get(container_type, 0), room)
            if n > 0:
                given[container_type] = given.get(container_type, 0) + n
                room -= n
        chosen = [(t, given[t]) for t in order if given.get(t)]
        starved = [t for t in order if not blocks_of.get(t) and t not in given]
        reason = "; ".join(reasons)
        if chosen:
            hold = self.backoff_until()
            if hold is not None and now < hold:
                return Decision(held=True, reason=reason)
            return Decision(scale_out_types=tuple(chosen), reason=reason)
        idle: List[Tuple[float, Block]] = []
        for block in active:
            since = self._idle_since(block, by_block.get(block.block_id, []))
            if since is not None:
                idle.append((since, block))
        idle.sort(key=lambda pair: pair[0])
        if starved:
            # Make room at once: idle blocks of types nobody waits for.
            spare = [b.block_id for _, b in idle if not tasks_by_type.get(b.container_type)]
            spare = spare[: len(starved)]
            if spare:
                return Decision(
                    scale_in=tuple(spare),
                    reason=f"container type(s) {', '.join(starved)} need a block and "
                    f"max_blocks {max_blocks} are active",
                )
        scale_in: List[str] = []
        left_of = {t: len(b) for t, b in blocks_of.items()}
        for since, block in idle:
            if now - since < self.max_idletime or len(active) - len(scale_in) <= min_blocks:
                continue
            of_type = block.container_type
            if (left_of[of_type] - 1) * per_block < tasks_by_type.get(of_type, 0):
                continue
            left_of[of_type] -= 1
            scale_in.append(block.block_id)
        if scale_in:
            return Decision(
                scale_in=tuple(scale_in), reason=f"idle for {self.max_idletime:g}s or more"
            )
        return Decision(reason="steady")

    def _track_unmanned(
        self, active: List[Block], by_block: Dict[str, List[ManagerInfo]], now: float
    ) -> None:
        unmanned = {b.block_id for b in active if not by_block.get(b.block_id)}
        for block_id in list(self._unmanned_since):
            if block_id not in unmanned:
                del self._unmanned_since[block_id]
        for block_id in unmanned:
            self._unmanned_since.setdefault(block_id, now)

    def _idle_since(self, block: Block, managers: List[ManagerInfo]) -> Optional[float]:
        if not managers:
            return self._unmanned_since.get(block.block_id)
        if not all(manager_is_idle(m) for m in managers):
            return None
        return max(m.idle_since or 0.0 for m in managers)

    def status_fields(self) -> Dict[str, Any]:
        """The strategy's state for ``funcx-endpoint status``."""
        hold = self.backoff_until()
        now = self._clock.seconds()
        return {
            "strategy": {
                "name": "simple",
                "interval": self.interval,
                "max_idletime": self.max_idletime,
                "backoff_remaining": round(max(0.0, hold - now), 1) if hold else 0.0,
                "tasks_failed_for_want_of_blocks": self.tasks_failed,
            }
        }


@implementer(IStatusPart)
@attr.s(auto_attribs=True, eq=False)
class ScalingService(Service):
    """The ``providers`` part of the endpoint: a block scaler, its strategy
    and, for a provider with a walltime, the walltime watch.

    Starts the scaler (and so the provider), then the strategy and the
    watch; stops those first, then the scaler, which cancels every block and
    waits for the provider to stop.
    """

    name = "providers"

    scaler: BlockScaler
    strategy: SimpleStrategy
    walltimes: Optional[WalltimeWatch] = None
    degraded: Optional[DegradedBlocks] = None

    def startService(self) -> None:
        super().startService()
        self.scaler.startService()
        self.strategy.startService()
        if self.walltimes is not None:
            self.walltimes.startService()
        if self.degraded is not None:
            self.degraded.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.walltimes is not None:
            self.walltimes.stopService()
        if self.degraded is not None:
            self.degraded.stopService()
        await maybeDeferred(self.strategy.stopService)
        await maybeDeferred(self.scaler.stopService)

    def status_fields(self) -> Dict[str, Any]:
        """Blocks by state (and each block, under ``blocks.list``) and the strategy's state."""
        fields = self.scaler.status_fields()
        fields["blocks"]["list"] = self.scaler.describe_blocks()
        fields.update(self.strategy.status_fields())
        if self.walltimes is not None:
            fields["blocks"]["walltime"] = self.walltimes.walltime
            fields["blocks"]["drain_margin"] = self.walltimes.margin
        return fields


def scaling_from_config(
    executor: Any,
    *,
    reactor: Any,
    load: ILoadSource,
    command_template: str,
    working_dir: str,
    stop_grace_period: float = 10.0,
    local_options: Optional[Mapping[str, Any]] = None,
    per_type: bool = False,
) -> ScalingService:
    """Build the provider, scaler and strategy of a ``HighThroughputExecutor`` config.

    ``reactor`` spawns processes, keeps time and runs threads; ``load`` is
    the interchange; ``command_template`` starts one manager and contains
    ``{block_id}``; ``working_dir`` (or the executor's ``working_dir`` under it)
    receives block output and submit scripts;
    ``local_options`` go to our ``LocalProvider`` (see :func:`provider_from_config`);
    ``per_type``: blocks per container type (hard routing; ``load`` must then
    provide :class:`~funcx_endpoint.executor.interface.ITypedLoadSource`).
    """
    if executor.working_dir:
        # Relative to the endpoint's directory (an absolute one replaces it).
        working_dir = os.path.join(working_dir, executor.working_dir)
    provider = provider_from_config(
        executor.provider,
        reactor,
        working_dir,
        stop_grace_period=stop_grace_period,
        local_options=local_options,
    )
    # A batch scheduler's job names take letters, digits and a few marks only.
    job_label = re.sub(r"[^A-Za-z0-9_.-]", "_", executor.label)
    scaler = BlockScaler(
        provider,
        load,
        reactor,
        command_template,
        job_name_prefix=f"funcx.{job_label}",
        # A batch scheduler's accounting may not list a job at once (see BlockScaler).
        first_poll_delay=FIRST_POLL_DELAY if provider.blocking else 0.0,
    )
    walltimes = None
    if provider.walltime:
        margin = drain_margin(provider.walltime, executor.walltime_drain_margin)
        walltimes = WalltimeWatch(scaler, load, reactor, provider.walltime, margin)
    strategy = SimpleStrategy(
        scaler,
        load,
        reactor,
        per_type=per_type,
        interval=executor.strategy.interval,
        max_idletime=executor.strategy.max_idletime,
        workers_per_node=estimate_workers_per_node(
            executor.max_workers_per_node, executor.cores_per_worker, provider.cores_per_node
        ),
        walltimes=walltimes,
    )
    return ScalingService(scaler, strategy, walltimes, DegradedBlocks(scaler, load, reactor))
