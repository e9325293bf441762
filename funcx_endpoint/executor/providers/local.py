"""A provider that runs blocks of managers as processes on this machine.

:class:`LocalProvider` has Parsl's provider interface but never blocks: it
spawns processes with ``reactor.spawnProcess`` and learns of their end from
the reactor, so ``submit``, ``status`` and ``cancel`` return at once and are
called on the reactor thread (it provides ``INonBlockingProvider``).

One job (block) is ``nodes_per_block * tasks_per_node`` copies of
``/bin/sh -c "<worker_init>\\n<command>"``, as Parsl's ``SingleNodeLauncher``
starts them.  Each copy (a *rank*) runs in a session and process group of its
own, whose id is the rank's pid, so that stopping it reaches everything it
started: TERM to the group, KILL after the grace period.  When a rank's
first process exits by itself, whatever is left in its group gets the same
treatment, so nothing a block started outlives it, or the endpoint.  Output
goes to ``<working_dir>/<job_id>.<rank>.stdout`` and ``.stderr``; job ids
(``local.0``, ``local.1``...) go on from those of earlier runs found there,
so a restart keeps the output of the blocks before it.

Job states: RUNNING while any rank runs; then COMPLETED if every rank exited
with 0, else FAILED (the first failed rank's exit code, negative for a
signal); CANCELLED from the moment ``cancel`` accepted it.

A job whose end has been reported (by ``status``, or by ``cancel``
accepting it) and whose processes are all gone is dropped; only its final
status is remembered, for the :data:`FINISHED_KEPT` most recent ones, so
that an endpoint running for months does not accumulate them.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from funcx_endpoint.config import model as config_model
from funcx_endpoint.executor.providers.base import (
    INonBlockingProvider,
    JobState,
    JobStatus,
    ProviderAdapter,
    SubmitError,
)
from funcx_endpoint.executor.providers.kubernetes import kubernetes_provider
from funcx_endpoint.executor.providers.ranks import (
    IProcessGroups,
    ProcessGroups,
    Rank,
    RankReaper,
    describe_exit,
)
from funcx_endpoint.wire.environment import without_credentials

# Run by the spawned interpreter: become a session (and process group)
# leader, then become the shell.  The pid, hence the group id, stays the same.
SETSID_SHIM = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"

#: Final statuses of dropped jobs remembered (``status`` answers MISSING
#: for older ones).
FINISHED_KEPT = 100


class _Job:
    """A block: its ranks and whether it was cancelled."""

    def __init__(self, job_id: str, job_name: str, command: str) -> None:
        self.job_id = job_id
        self.job_name = job_name
        self.command = command
        self.ranks: List[Rank] = []
        self.cancelled = False
        self.reported = False  # its end was reported: it may be dropped once gone

    def __repr__(self) -> str:
        return f"<job {self.job_id} ({self.job_name}) {self.status()}>"

    @property
    def ended(self) -> bool:
        """True once every rank's process has exited."""
        return all(r.ended for r in self.ranks)

    def gone(self, process_groups: bool) -> bool:
        """True once every rank's process has exited and, as far as is known
        without asking the system, its group too (or we gave up on it)."""
        for rank in self.ranks:
            if not rank.ended:
                return False
            if rank.terminator is not None:
                if not rank.terminator.called:
                    return False
            elif process_groups and rank.pid is not None and not rank.group_gone:
                return False
        return True

    def status(self) -> JobStatus:
        first = self.ranks[0] if self.ranks else None
        out = first.stdout_path if first else None
        err = first.stderr_path if first else None
        if self.cancelled:
            return JobStatus(JobState.CANCELLED, "cancelled", None, out, err)
        if not self.ended:
            return JobStatus(JobState.RUNNING, None, None, out, err)
        failed = [r for r in self.ranks if r.exit_code != 0]
        if not failed:
            return JobStatus(JobState.COMPLETED, None, 0, out, err)
        rank = failed[0]
        message = f"rank {rank.rank} (pid {rank.pid}) {describe_exit(rank.exit_code)}"
        if len(self.ranks) > 1:
            message += f"; {len(failed)} of {len(self.ranks)} processes failed"
        return JobStatus(
            JobState.FAILED, message, rank.exit_code, rank.stdout_path, rank.stderr_path
        )


@implementer(INonBlockingProvider)
class LocalProvider(Service):
    """Runs each block as ``nodes_per_block * tasks_per_node`` local processes.

    ``reactor`` spawns the processes (``IReactorProcess``) and, unless
    ``clock`` is given, times the grace periods.  ``working_dir`` receives the
    output files.  The scaling attributes (``init_blocks`` ... ``parallelism``)
    are only read by the strategy.  ``process_groups`` puts each rank in a
    session of its own (through the interpreter ``python`` and
    :data:`SETSID_SHIM`) and signals whole groups through ``groups``
    (:class:`IProcessGroups`); tests with a fake reactor turn it off or pass
    a fake ``groups``.  ``run_in_thread(f, *args)`` (a Deferred) runs the
    slow part of a group check (``groups.alive``) off the reactor thread; by
    default in the reactor's thread pool, or, for a reactor without threads
    (a fake one), at once.  Ranks are stopped by :attr:`reaper` (a
    :class:`~funcx_endpoint.executor.providers.ranks.RankReaper`, which says
    how groups are checked).

    As a service, ``stopService`` cancels every job and fires once all their
    processes, and whatever they started in their groups, have exited.
    """

    log = Logger()
    name = "local-provider"

    def __init__(
        self,
        reactor: IReactorProcess,
        working_dir: str,
        *,
        clock: Optional[IReactorTime] = None,
        label: str = "local",
        init_blocks: int = 1,
        min_blocks: int = 0,
        max_blocks: int = 1,
        nodes_per_block: int = 1,
        parallelism: float = 1.0,
        worker_init: str = "",
        cmd_timeout: float = 30.0,
        stop_grace_period: float = 10.0,
        status_polling_interval: float = 1.0,
        env: Optional[Mapping[str, str]] = None,
        process_groups: bool = True,
        groups: Optional[IProcessGroups] = None,
        python: str = sys.executable,
        shell: str = "/bin/sh",
        run_in_thread: Optional[Callable[..., Deferred[Any]]] = None,
    ) -> None:
        self._reactor = reactor
        self.reaper = RankReaper(
            clock if clock is not None else cast(IReactorTime, reactor),
            groups if groups is not None else ProcessGroups(),
            run_in_thread if run_in_thread is not None else _thread_runner(reactor),
            process_groups=process_groups,
            grace_period=stop_grace_period,
        )
        self.working_dir = working_dir
        self._label = label
        self.init_blocks = init_blocks
        self.min_blocks = min_blocks
        self.max_blocks = max_blocks
        self.nodes_per_block = nodes_per_block
        self.parallelism = parallelism
        self.worker_init = worker_init
        self.cmd_timeout = cmd_timeout  # Parsl's attribute; spawning does not wait
        self._status_polling_interval = status_polling_interval
        self._env = env
        self._python = python
        self._shell = shell
        self.script_dir: Optional[str] = working_dir
        self.cores_per_node: Optional[int] = None
        self.mem_per_node: Optional[float] = None
        self._jobs: Dict[str, _Job] = {}
        self._finished: OrderedDict[str, JobStatus] = OrderedDict()
        self._next_job = 0
        self._stopping = False

    # -- Parsl's attributes --------------------------------------------------------

    @property
    def label(self) -> str:
        return self._label

    @property
    def status_polling_interval(self) -> float:
        return self._status_polling_interval

    @property
    def stop_grace_period(self) -> float:
        """Seconds between TERM and KILL when a rank is stopped."""
        return self.reaper.grace_period

    @property
    def resources(self) -> Dict[str, _Job]:
        """The jobs not dropped yet (see the module's docstring), by job id."""
        return dict(self._jobs)

    # -- the provider interface ----------------------------------------------------

    def submit(self, command: str, tasks_per_node: int, job_name: str = "funcx.block") -> str:
        """Start the job's processes now; return its job id (``<label>.<n>``).

        Raises :class:`SubmitError` if the provider is stopping or a process
        cannot be started (the ranks already started are then stopped).
        """
        if self._stopping:
            raise SubmitError(f"{self.label} provider is stopping; {job_name} not started")
        self._drop_finished()
        copies = self.nodes_per_block * max(1, int(tasks_per_node))
        job_id = f"{self.label}.{self._next_job}"
        self._next_job += 1
        script = command
        if self.worker_init.strip():
            script = f"{self.worker_init}\n{command}"
        job = _Job(job_id, job_name, command)
        try:
            os.makedirs(self.working_dir, mode=0o700, exist_ok=True)
            for rank in range(copies):
                job.ranks.append(self._spawn(job, rank, copies, script, tasks_per_node))
        except Exception as e:
            job.cancelled = True
            job.reported = True  # by the SubmitError
            for started in job.ranks:
                self.reaper.when_stopped(started)
            if job.ranks:
                self._jobs[job_id] = job
            raise SubmitError(f"could not start {job_name} ({job_id}): {e}") from e
        self._jobs[job_id] = job
        self.log.info(
            "Started block job {job_id} ({job_name}): {n} process(es), pids {pids}",
            job_id=job_id,
            job_name=job_name,
            n=copies,
            pids=[r.pid for r in job.ranks],
        )
        return job_id

    def _spawn(self, job: _Job, rank: int, copies: int, script: str, tasks_per_node: int) -> Rank:
        base = os.path.join(self.working_dir, f"{job.job_id}.{rank}")
        proto = Rank(
            job.job_id,
            rank,
            base + ".stdout",
            base + ".stderr",
            lambda ended: self._rank_ended(job, ended),
        )
        env = without_credentials(os.environ if self._env is None else self._env)
        env.update(
            FUNCX_JOB_ID=job.job_id,
            FUNCX_JOB_NAME=job.job_name,
            FUNCX_JOB_RANK=str(rank),
            FUNCX_JOB_SIZE=str(copies),
            FUNCX_TASKS_PER_NODE=str(tasks_per_node),
        )
        if self.reaper.process_groups:
            executable = self._python
            args = [self._python, "-S", "-c", SETSID_SHIM, self._shell, "-c", script]
        else:
            executable = self._shell
            args = [self._shell, "-c", script]
        fds: List[int] = []
        try:
            fds.append(os.open(os.devnull, os.O_RDONLY))
            for path in (proto.stdout_path, proto.stderr_path):
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            self._reactor.spawnProcess(
                proto, executable, args, env=env, childFDs={0: fds[0], 1: fds[1], 2: fds[2]}
            )
        finally:
            for fd in fds:
                os.close(fd)
        return proto

    def status(self, job_ids: Sequence[Any]) -> List[JobStatus]:
        """The jobs' states; an unknown job id is MISSING."""
        result = []
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None:
                finished = self._finished.get(job_id)
                if finished is None:
                    finished = JobStatus(JobState.MISSING, f"no job {job_id!r} here")
                result.append(finished)
            else:
                status = job.status()
                if status.terminal:
                    job.reported = True
                result.append(status)
        self._drop_finished()
        return result

    def _drop_finished(self) -> None:
        """Forget the jobs whose end was reported and whose processes are gone."""
        for job_id, job in list(self._jobs.items()):
            if job.reported and job.gone(self.reaper.process_groups):
                del self._jobs[job_id]
                self._finished[job_id] = job.status()
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)

    def cancel(self, job_ids: Sequence[Any]) -> List[bool]:
        """TERM each job's process groups now, KILL after the grace period.

        True for a job that was running (it is CANCELLED from now on); False
        for an unknown job or one that had already ended.
        """
        result = []
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None or job.cancelled or job.ended:
                result.append(False)
                continue
            self.log.info("Cancelling block job {job_id}", job_id=job_id)
            job.cancelled = True
            job.reported = True
            for rank in job.ranks:
                self.reaper.when_stopped(rank)
            result.append(True)
        return result

    def when_gone(self, job_id: str) -> Deferred[None]:
        """A Deferred that fires when every process of the job, and every
        process left in their groups, has exited (it does not stop them)."""
        job = self._jobs.get(job_id)
        if job is None:
            return succeed(None)  # dropped: gone already
        waits = [self.reaper.when_gone(r) for r in job.ranks]
        return gatherResults(waits).addCallback(lambda _: None)

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        os.makedirs(self.working_dir, mode=0o700, exist_ok=True)
        # Number on from an earlier run's jobs, so that their output stays.
        self._next_job = max(self._next_job, self._first_free_job_number())

    def _first_free_job_number(self) -> int:
        prefix = self.label + "."
        highest = -1
        for name in os.listdir(self.working_dir):
            number = name[len(prefix) :].split(".", 1)[0]
            if name.startswith(prefix) and number.isdigit():
                highest = max(highest, int(number))
        return highest + 1

    def stopService(self) -> Deferred[None]:
        """Cancel every job; fire when all their processes have exited."""
        super().stopService()
        self._stopping = True
        waits: List[Deferred[None]] = []
        for job in self._jobs.values():
            if not job.ended and not job.cancelled:
                self.log.info("Stopping block job {job_id}", job_id=job.job_id)
                job.cancelled = True
            waits.extend(self.reaper.when_stopped(rank) for rank in job.ranks)
        return gatherResults(waits).addCallback(lambda _: None)

    # -- ends and stops ------------------------------------------------------------------

    def _rank_ended(self, job: _Job, rank: Rank) -> None:
        ended = "Block job {job_id} rank {rank} (pid {pid}) {how}"
        if job.cancelled or rank.exit_code == 0:
            report = self.log.info
        else:
            report, ended = self.log.warn, ended + "; its stderr is in {path}"
        report(
            ended,
            job_id=job.job_id,
            rank=rank.rank,
            pid=rank.pid,
            how=describe_exit(rank.exit_code),
            path=rank.stderr_path,
        )
        self.reaper.rank_ended(rank)


def _thread_runner(reactor: Any) -> Callable[..., Deferred[Any]]:
    """``run_in_thread`` for ``reactor``: its thread pool if it has one,
    else (a fake reactor) a call at once."""
    if IReactorThreads.providedBy(reactor):

        def in_pool(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        return in_pool
    return maybeDeferred


def provider_from_config(
    config_provider: Any,
    reactor: Any,
    working_dir: str,
    *,
    stop_grace_period: float = 10.0,
    local_options: Optional[Mapping[str, Any]] = None,
) -> ProviderAdapter:
    """The runtime provider for an executor's ``provider`` config field.

    The config's :class:`~funcx_endpoint.config.model.LocalProvider` becomes
    our :class:`LocalProvider` (output in ``<working_dir>/blocks``), called
    on the reactor thread; any other object (a Parsl provider) is called in a
    thread, with its submit scripts in ``<working_dir>/submit_scripts``; funcX
    1.0's ``KubernetesProvider`` and Parsl's become Kubernetes providers
    (:func:`~funcx_endpoint.executor.providers.kubernetes.kubernetes_provider`).
    ``reactor`` must spawn processes, keep time and run threads;
    ``local_options`` are more keyword arguments for our :class:`LocalProvider`.
    """
    kube = kubernetes_provider(config_provider, reactor, working_dir, stop_grace_period)
    if kube is not None:
        return kube
    if isinstance(config_provider, config_model.LocalProvider):
        # Every field of the config's provider is an argument of ours, of the same name.
        settings = {name: getattr(config_provider, name) for name in config_provider.fields}
        native = LocalProvider(
            reactor,
            os.path.join(working_dir, "blocks"),
            label=config_provider.label,
            stop_grace_period=stop_grace_period,
            **settings,
            **dict(local_options or {}),
        )
        return ProviderAdapter(native, reactor)
    return ProviderAdapter(config_provider, reactor, working_dir=working_dir)
