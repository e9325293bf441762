"""Idle shutdown, as funcX 1.0 defines it (``Config.idle_heartbeats_soft`` and ``_hard``).

Every ``heartbeat_period`` seconds the endpoint looks at what moved since
the last look: tasks taken from the broker and results sent to it.  With
``idle_heartbeats_soft`` = 0 (the default) nothing else happens.  Otherwise,
as funcX 1.0.13's endpoint interchange did:

* a heartbeat in which a task or a result moved resets both counts;
* a heartbeat in which nothing moved adds one to the *hard* count; if, in
  addition, the endpoint has handled at least one task or result since it
  started and nothing is outstanding (no task running or queued, no result
  unsent), it adds one to the *soft* count, and the endpoint shuts down when
  the soft count reaches ``idle_heartbeats_soft``;
* otherwise (work outstanding, or none ever handled) it shuts down when the
  hard count exceeds ``max(idle_heartbeats_soft + 1, idle_heartbeats_hard)``:
  the catch-all for a task that will never come back.

(funcX 1.0 compared counts of tasks and results forwarded to decide that
nothing was outstanding; this endpoint knows its tasks in flight and its
unsent results, and uses those.)  Shutting down is a clean stop: the daemon
drains, stops its parts and exits with code 0.

:class:`IdleClock` is the rule, on counts alone; :class:`IdleShutdown` is the
daemon's ``idle`` part that applies it on a clock and shows it in
``funcx-endpoint status``.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Dict, Optional

import attr
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from funcx_endpoint.lifecycle import IStatusPart, start_loop, stop_loop


@attr.s(auto_attribs=True, frozen=True)
class Activity:
    """What the endpoint has done: ``moved`` counts tasks taken and results sent
    since it started; ``outstanding`` counts tasks in flight and results unsent."""

    moved: int
    outstanding: int


class IdleState(enum.Enum):
    OFF = "off"  # idle_heartbeats_soft is 0
    ACTIVE = "active"
    IDLE = "idle"  # the soft count runs
    POSSIBLY_IDLE = "possibly idle"  # the hard count is past the soft limit
    SHUTTING_DOWN = "shutting down"


class Change(enum.Enum):
    """What one heartbeat changed, for the log."""

    BECAME_ACTIVE = "active"
    BECAME_IDLE = "idle"
    BECAME_POSSIBLY_IDLE = "possibly idle"
    SOFT_LIMIT = "soft limit"
    HARD_LIMIT = "hard limit"


@attr.s(auto_attribs=True)
class IdleClock:
    """funcX 1.0's idle counts (see the module's docstring); :meth:`beat` once a heartbeat."""

    soft_limit: int
    hard_limit_given: int
    soft: int = 0
    hard: int = 0
    state: IdleState = attr.ib(default=IdleState.ACTIVE)
    _last_moved: int = 0

    def __attrs_post_init__(self) -> None:
        self.soft_limit = max(0, self.soft_limit)
        if not self.enabled:
            self.state = IdleState.OFF

    @property
    def enabled(self) -> bool:
        return self.soft_limit > 0

    @property
    def hard_limit(self) -> int:
        """The hard limit in force: never below ``soft_limit + 1`` (as in funcX 1.0)."""
        return max(self.soft_limit + 1, self.hard_limit_given)

    def beat(self, activity: Activity) -> Optional[Change]:
        """Count one heartbeat; say what changed (``SOFT_LIMIT``/``HARD_LIMIT``: shut down)."""
        if not self.enabled or self.state is IdleState.SHUTTING_DOWN:
            return None
        moved = activity.moved - self._last_moved
        self._last_moved = activity.moved
        if moved:
            was_counting = self.soft or self.hard
            self.soft = self.hard = 0
            self.state = IdleState.ACTIVE
            return Change.BECAME_ACTIVE if was_counting else None
        self.hard += 1
        if activity.moved and not activity.outstanding:
            self.soft += 1
            if self.soft >= self.soft_limit:
                self.state = IdleState.SHUTTING_DOWN
                return Change.SOFT_LIMIT
            if self.state is not IdleState.IDLE:
                self.state = IdleState.IDLE
                return Change.BECAME_IDLE
            return None
        if self.hard > self.hard_limit:
            self.state = IdleState.SHUTTING_DOWN
            return Change.HARD_LIMIT
        if self.hard > self.soft_limit and self.state is not IdleState.POSSIBLY_IDLE:
            self.state = IdleState.POSSIBLY_IDLE
            return Change.BECAME_POSSIBLY_IDLE
        return None

    def heartbeats_left(self) -> Optional[int]:
        """Heartbeats until a shutdown if nothing moves (None: off)."""
        if not self.enabled:
            return None
        if self.state is IdleState.SHUTTING_DOWN:
            return 0
        if self.state is IdleState.IDLE:
            return self.soft_limit - self.soft
        return self.hard_limit + 1 - self.hard


@attr.s(auto_attribs=True, eq=False, repr=False)
@implementer(IStatusPart)
class IdleShutdown(Service):
    """The daemon's ``idle`` part: applies an :class:`IdleClock` every ``period``
    seconds of ``clock`` to ``activity()``, and calls ``shut_down(reason)`` once
    a limit is reached."""

    log = Logger()
    name = "idle"

    _clock: IReactorTime
    period: float
    idle: IdleClock
    _activity: Callable[[], Activity]
    _shut_down: Callable[[str], None]
    _loop: Optional[LoopingCall] = attr.ib(default=None, init=False)

    def startService(self) -> None:
        super().startService()
        if not self.idle.enabled:
            return
        self._loop = start_loop(self.beat, self._clock, self.period, now=False)

    def stopService(self) -> None:
        super().stopService()
        stop_loop(self._loop)
        self._loop = None

    def _seconds_left(self) -> Optional[float]:
        left = self.idle.heartbeats_left()
        return None if left is None else left * self.period

    def beat(self) -> None:
        """One heartbeat: count, log what changed, shut down at a limit."""
        change = self.idle.beat(self._activity())
        if change is Change.BECAME_ACTIVE:
            self.log.info("Moved to active state (tasks or results moved since the last heartbeat)")
        elif change is Change.BECAME_IDLE:
            self.log.info(
                "In idle state (no task or result moved, none outstanding); shutting down "
                "in {seconds:g}s (idle_heartbeats_soft)",
                seconds=self._seconds_left(),
            )
        elif change is Change.BECAME_POSSIBLY_IDLE:
            self.log.info(
                "Possibly idle: no task or result moved; shutting down in {seconds:g}s "
                "(idle_heartbeats_hard)",
                seconds=self._seconds_left(),
            )
        elif change is Change.SOFT_LIMIT:
            self._stop_for(
                f"idle for {self.idle.soft} heartbeats of {self.period:g}s "
                f"(idle_heartbeats_soft={self.idle.soft_limit})",
                self.log.info,
            )
        elif change is Change.HARD_LIMIT:
            self._stop_for(
                f"no task or result moved in {self.idle.hard} heartbeats of {self.period:g}s "
                f"(idle_heartbeats_hard={self.idle.hard_limit})",
                self.log.warn,
            )

    def _stop_for(self, reason: str, report: Callable[..., None]) -> None:
        report("Shutting down: {reason}", reason=reason)
        stop_loop(self._loop)
        self._shut_down(reason)

    def status_fields(self) -> Dict[str, Any]:
        """The idle clock, for ``funcx-endpoint status``."""
        idle = self.idle
        if not idle.enabled:
            return {"idle_shutdown": {"state": idle.state.value}}
        return {
            "idle_shutdown": {
                "state": idle.state.value,
                "idle_heartbeats": f"{idle.soft}/{idle.soft_limit}",
                "no_movement_heartbeats": f"{idle.hard}/{idle.hard_limit}",
                "shut_down_in": f"{self._seconds_left():g}s",
            }
        }
