"""The processes of a local block, and how they are stopped.

A :class:`Rank` is one process of a block (the protocol the reactor calls),
the leader of a process group of its own.  A :class:`RankReaper` stops ranks
and what they leave in their groups: TERM, then KILL after the grace period,
polling the group until it is empty.  Both are used by
:class:`~funcx_endpoint.executor.providers.local.LocalProvider`, which decides
when a rank is stopped; the reaper decides how.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, ClassVar, Dict, List, Optional

import attr
import psutil
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from funcx_endpoint.observer import fresh_result

__all__ = [
    "GROUP_POLL_INTERVAL",
    "GROUP_POLL_MAX_INTERVAL",
    "KILL_WAIT",
    "IProcessGroups",
    "ProcessGroups",
    "Rank",
    "RankReaper",
    "describe_exit",
]

#: How soon a stopping rank's process group is first checked for survivors;
#: the interval doubles after each check, up to :data:`GROUP_POLL_MAX_INTERVAL`.
GROUP_POLL_INTERVAL = 0.1
#: The longest interval between two checks of a stopping rank's process group.
GROUP_POLL_MAX_INTERVAL = 1.0
#: How long processes get to disappear after KILL before we give up on them.
KILL_WAIT = 5.0

_SIGNAL_NAMES: Dict[int, str] = {int(signal.SIGTERM): "TERM", int(signal.SIGKILL): "KILL"}


class IProcessGroups(Interface):
    """Signals process groups and tells whether one still has a live process."""

    def signal(pgid: int, signum: int) -> None:
        """Send ``signum`` to the group; ``ProcessLookupError`` if it is empty."""

    def exists(pgid: int) -> bool:
        """True while the group has any process, zombies included.

        Cheap (one system call): the provider calls it on the reactor thread.
        (An object without this method is treated as if it always said True.)
        """

    def alive(pgid: int) -> bool:
        """True while a process of the group runs (zombies do not count).

        May be slow (it may scan the process table): the provider calls it in
        a thread, and only once :meth:`exists` said True.
        """


@implementer(IProcessGroups)
class ProcessGroups:
    """The real process groups: ``os.killpg`` and the process table.

    Unit tests with a fake reactor pass a fake :class:`IProcessGroups`.
    """

    def signal(self, pgid: int, signum: int) -> None:
        """``os.killpg``: raises ``ProcessLookupError`` if the group is empty."""
        os.killpg(pgid, signum)

    def exists(self, pgid: int) -> bool:
        """``os.killpg(pgid, 0)``: True while the group has a process, even a zombie."""
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            # Only processes we may not signal (a setuid program) are left:
            # there is nothing more we can do about them.
            return False
        return True

    def alive(self, pgid: int) -> bool:
        """True while a process of the group runs; walks the whole process
        table (blocking: the provider calls it in a thread).

        Zombies do not count: a killed process whose parent died waits, dead,
        until init reaps it, which some inits do only every second or two.
        """
        if not self.exists(pgid):
            return False
        for proc in psutil.process_iter(["status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                    return True
            except (OSError, psutil.Error):
                continue
        return False


def describe_exit(code: Optional[int]) -> str:
    """``exited with code 3`` or ``killed by SIGTERM`` for an exit code (negative: signal)."""
    if code is None:
        return "running"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}"


@attr.s(auto_attribs=True, eq=False, repr=False)
class Rank(ProcessProtocol):
    """One process of a job (and its process group): the protocol the reactor calls.

    ``on_ended(rank)`` is called when the process has exited (``exit_code``
    set: negative for a signal).  The reaper keeps its state of the rank's
    stop here too.
    """

    job_id: str
    rank: int
    stdout_path: str
    stderr_path: str
    _on_ended: Callable[[Rank], None]
    pid: Optional[int] = attr.ib(default=None, init=False)  # also the process group id
    process: Optional[IProcessTransport] = attr.ib(default=None, init=False)
    ended: bool = attr.ib(default=False, init=False)
    exit_code: Optional[int] = attr.ib(default=None, init=False)
    group_gone: bool = attr.ib(default=False, init=False)
    terminator: Optional[Deferred[None]] = attr.ib(default=None, init=False)
    # Polls of the group waiting for their next check (woken early when
    # the rank ends or its group is found empty).
    sleepers: List[Deferred[None]] = attr.ib(factory=list, init=False)
    # Callers waiting for the scan of the group in progress, if any.
    scan_waiters: Optional[List[Deferred[bool]]] = attr.ib(default=None, init=False)

    def __repr__(self) -> str:
        return f"<rank {self.rank} of job {self.job_id} pid={self.pid}>"

    def makeConnection(self, process: Any) -> None:
        self.process = process
        self.pid = process.pid
        super().makeConnection(process)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            code = 0
        elif isinstance(value, ProcessTerminated):
            if value.exitCode is not None:
                code = value.exitCode
            else:
                code = -(value.signal or 0)
        else:  # pragma: no cover - the reactor passes only these two
            code = -1
        self.ended = True
        self.exit_code = code
        self._on_ended(self)


@attr.s(auto_attribs=True, eq=False)
class RankReaper:
    """Stops ranks and whatever they started in their process groups.

    With ``process_groups``, signals go to a rank's whole group through
    ``groups`` (:class:`IProcessGroups`), else to its process only.  A
    stopping rank's group is checked cheaply (``groups.exists``) after
    :data:`GROUP_POLL_INTERVAL` seconds, then at doubling intervals up to
    :data:`GROUP_POLL_MAX_INTERVAL` (timed by ``clock``), and at once when
    the rank's process ends; the process table is scanned
    (``groups.alive``, through ``run_in_thread``) only while the group still
    exists after its leader ended, to tell zombies from live processes.
    ``grace_period``: seconds between TERM and KILL.
    """

    log: ClassVar[Logger] = Logger()

    _clock: IReactorTime
    _groups: IProcessGroups
    _run_in_thread: Callable[..., Deferred[Any]]
    process_groups: bool = attr.ib(default=True, kw_only=True)
    grace_period: float = attr.ib(default=10.0, kw_only=True)

    def rank_ended(self, rank: Rank) -> None:
        """The rank's process exited: its polls look again, and whatever it
        left behind in its group goes too."""
        self._wake(rank)
        if rank.terminator is None and not self.rank_gone(rank):
            Deferred.fromCoroutine(self._stop_leftovers(rank))

    async def _stop_leftovers(self, rank: Rank) -> None:
        """Stop what the ended rank left in its group, unless only zombies are."""
        try:
            if not await self._scan(rank) or rank.terminator is not None:
                return
            self.log.info(
                "Stopping processes left in the group of block job {job_id} rank {rank}",
                job_id=rank.job_id,
                rank=rank.rank,
            )
            self.when_stopped(rank, scanned=True)
        except Exception:
            self.log.failure("Error while stopping what {rank} left", rank=repr(rank))

    def rank_gone(self, rank: Rank) -> bool:
        """True once the rank's process has exited and its group is known to be
        empty.  Cheap: it does not scan the process table (see :meth:`_check_gone`)."""
        if not rank.ended:
            return False
        if not self.process_groups or rank.group_gone or rank.pid is None:
            return True
        exists = getattr(self._groups, "exists", None)
        if exists is not None and not exists(rank.pid):
            self._group_emptied(rank)
        return rank.group_gone

    async def _check_gone(self, rank: Rank) -> bool:
        """:meth:`rank_gone`, telling a group of zombies from a live one by a
        scan of the process table in a thread."""
        if self.rank_gone(rank):
            return True
        if not rank.ended:
            return False
        return not await self._scan(rank)

    def _scan(self, rank: Rank) -> Deferred[bool]:
        """Fires with ``groups.alive`` of the rank's group, asked in a thread;
        callers during a scan share it.  A failed scan counts as alive."""
        waiter: Deferred[bool] = Deferred()
        if rank.scan_waiters is not None:
            rank.scan_waiters.append(waiter)
            return waiter
        waiters = rank.scan_waiters = [waiter]

        def failed(failure: Failure) -> bool:
            self.log.failure("Could not check process group {pgid}", failure, pgid=rank.pid)
            return True

        def finished(alive: bool) -> None:
            rank.scan_waiters = None
            if not alive:
                self._group_emptied(rank)
            for w in waiters:
                w.callback(alive)

        self._run_in_thread(self._groups.alive, rank.pid).addCallback(bool).addErrback(
            failed
        ).addCallback(finished)
        return waiter

    def _group_emptied(self, rank: Rank) -> None:
        rank.group_gone = True
        self._wake(rank)

    def _wake(self, rank: Rank) -> None:
        """Polls of the rank's group waiting for their next check check now."""
        for sleeper in list(rank.sleepers):
            if not sleeper.called:
                sleeper.callback(None)

    def _signal(self, rank: Rank, signum: int) -> None:
        if self.process_groups and rank.pid is not None and not rank.group_gone:
            try:
                self._groups.signal(rank.pid, signum)
                return
            except ProcessLookupError:
                # No such group: either it is empty, or the rank has not
                # called setsid() yet; then signal the process itself.
                if rank.ended:
                    rank.group_gone = True
                    return
            except PermissionError:
                self.log.warn("Not allowed to signal process group {pgid}", pgid=rank.pid)
        if not rank.ended and rank.process is not None:
            try:
                rank.process.signalProcess(_SIGNAL_NAMES.get(signum, signum))
            except ProcessExitedAlready:
                pass

    def when_stopped(self, rank: Rank, scanned: bool = False) -> Deferred[None]:
        """Stop the rank (TERM, KILL after the grace period) unless that is
        under way; a fresh Deferred that fires when it is gone (or given up on)."""
        if rank.terminator is None:
            if self.rank_gone(rank):
                return succeed(None)
            rank.terminator = Deferred.fromCoroutine(self._terminate(rank, scanned))
        return fresh_result(rank.terminator)

    def when_gone(self, rank: Rank) -> Deferred[None]:
        """Fires when the rank's process and every process left in its group
        have exited; it does not stop them."""
        return Deferred.fromCoroutine(self._wait_gone(rank, None)).addCallback(lambda _: None)

    async def _terminate(self, rank: Rank, scanned: bool = False) -> None:
        """TERM, KILL after the grace period.  Unless ``scanned`` (a scan just
        found live processes), an ended rank's group is scanned first."""
        survivors = "Block job {job_id} rank {rank} (pid {pid}) still has processes {wait}s after "
        stages = (
            (signal.SIGTERM, self.grace_period, self.log.warn, survivors + "TERM; killing them"),
            (signal.SIGKILL, KILL_WAIT, self.log.error, survivors + "KILL; giving up on them"),
        )
        try:
            if rank.ended and not scanned and await self._check_gone(rank):
                return  # only zombies were left
            for signum, wait, report, message in stages:
                self._signal(rank, signum)
                if await self._wait_gone(rank, wait):
                    return
                report(message, job_id=rank.job_id, rank=rank.rank, pid=rank.pid, wait=wait)
        except Exception:
            self.log.failure("Error while stopping {rank}", rank=repr(rank))

    async def _wait_gone(self, rank: Rank, timeout: Optional[float]) -> bool:
        """Poll until the rank is gone (True) or ``timeout`` seconds pass (False).

        The interval grows from :data:`GROUP_POLL_INTERVAL` to
        :data:`GROUP_POLL_MAX_INTERVAL`; the rank's end, or another poll
        finding its group empty, ends the wait early.
        """
        deadline = None if timeout is None else self._clock.seconds() + timeout
        interval = GROUP_POLL_INTERVAL
        while not await self._check_gone(rank):
            delay = interval
            if deadline is not None:
                remaining = deadline - self._clock.seconds()
                if remaining <= 1e-9:
                    return False
                delay = min(delay, remaining)
            await self._sleep(rank, delay)
            interval = min(interval * 2, GROUP_POLL_MAX_INTERVAL)
        return True

    async def _sleep(self, rank: Rank, seconds: float) -> None:
        """Wait ``seconds``, or until :meth:`_wake` wakes the rank's polls."""
        sleeper: Deferred[None] = Deferred()
        call = self._clock.callLater(seconds, sleeper.callback, None)
        rank.sleepers.append(sleeper)
        try:
            await sleeper
        finally:
            rank.sleepers.remove(sleeper)
            if call.active():
                call.cancel()
