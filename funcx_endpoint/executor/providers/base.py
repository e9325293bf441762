"""The execution provider interface (Parsl's) and the adapter the endpoint calls.

A *provider* starts and stops *jobs*: one job is one block of managers, one
manager per node.  The interface is Parsl's ``ExecutionProvider``
(``submit``/``status``/``cancel`` plus the scaling attributes), so Parsl's
providers for Slurm, PBS, LSF, Kubernetes... work unchanged:
:class:`IExecutionProvider` describes it, :class:`JobState` and
:class:`JobStatus` mirror ``parsl.jobs.states``.

Parsl's providers block (they run ``sbatch`` and wait).  The endpoint never
calls a provider directly: it calls a :class:`ProviderAdapter`, whose methods
return Deferreds.  A provider marked :class:`INonBlockingProvider` (ours) is
called on the reactor thread; any other provider is called in a thread, one
call at a time (Parsl's providers are not written for concurrent calls).
"""

from __future__ import annotations

import enum
import os
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import attr
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

T = TypeVar("T")

#: How much of a job's stderr a failure report shows.
TAIL_BYTES = 2048


class JobState(enum.IntEnum):
    """The state of a provider job (the values of ``parsl.jobs.states.JobState``)."""

    UNKNOWN = 0  # the provider cannot tell
    PENDING = 1  # queued, not started
    RUNNING = 2
    CANCELLED = 3
    COMPLETED = 4  # ended by itself, successfully
    FAILED = 5
    TIMEOUT = 6  # walltime reached: expected for pilot jobs, not a failure by itself
    HELD = 7  # held or suspended by the batch system
    MISSING = 8  # ended without its managers ever connecting (Parsl's HTEX sets it)
    SCALED_IN = 9  # ended because it was deliberately scaled in

    @property
    def terminal(self) -> bool:
        """True for the states a job never leaves."""
        return self in TERMINAL_STATES

    def __str__(self) -> str:
        return self.name


TERMINAL_STATES = frozenset(
    {
        JobState.CANCELLED,
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.TIMEOUT,
        JobState.MISSING,
        JobState.SCALED_IN,
    }
)


@attr.s(auto_attribs=True, repr=False)
class JobStatus:
    """A job's state with its details, as Parsl's ``JobStatus``.

    ``exit_code`` is the exit code of the job's command (negative: killed by
    that signal); ``stdout_path``/``stderr_path`` name files holding the job's
    output, where the provider knows them.  Equal when all of them are.
    """

    state: JobState
    message: Optional[str] = None
    exit_code: Optional[int] = None
    stdout_path: Optional[str] = None
    stderr_path: Optional[str] = None

    @property
    def terminal(self) -> bool:
        """True once the job has ended."""
        return self.state in TERMINAL_STATES

    @property
    def status_name(self) -> str:
        """The state's name, e.g. ``"RUNNING"``."""
        return self.state.name

    @classmethod
    def from_foreign(cls, status: Any) -> JobStatus:
        """Convert a status object of another library (Parsl's) by state name.

        A state this module does not know becomes ``UNKNOWN``.
        """
        if isinstance(status, JobStatus):
            return status
        raw = getattr(status, "state", None)
        name = getattr(raw, "name", None)
        try:
            state = JobState[name] if isinstance(name, str) else JobState(int(raw))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            state = JobState.UNKNOWN
        return cls(
            state,
            message=getattr(status, "message", None),
            exit_code=getattr(status, "exit_code", None),
            stdout_path=getattr(status, "stdout_path", None),
            stderr_path=getattr(status, "stderr_path", None),
        )

    def __repr__(self) -> str:
        parts = [f"state={self.state.name}"]
        if self.exit_code is not None:
            parts.append(f"exit_code={self.exit_code}")
        if self.message is not None:
            parts.append(f"message={self.message!r}")
        return f"JobStatus({', '.join(parts)})"

    def __str__(self) -> str:
        if self.message:
            return f"{self.state.name} ({self.message})"
        return self.state.name


class ExecutionProviderError(Exception):
    """A provider could not do what it was asked (Parsl's ``ExecutionProviderException``)."""


class SubmitError(ExecutionProviderError):
    """A job could not be submitted.

    ``scheduler_message`` holds the batch scheduler's own words (the submit
    command's stderr, e.g. ``sbatch: error: Batch job submission failed:
    Invalid partition name specified``) when the provider gave them.
    """

    def __init__(self, message: str, scheduler_message: Optional[str] = None) -> None:
        super().__init__(message)
        self.scheduler_message = scheduler_message


def scheduler_message(error: BaseException, max_lines: int = 6) -> Optional[str]:
    """What the batch scheduler said, from a Parsl ``SubmitException`` (its
    ``stderr``, else its ``stdout``, one line per line joined by ``"; "``,
    the last ``max_lines``); None if the error carries no such output."""
    for name in ("stderr", "stdout"):
        text = getattr(error, name, None)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if isinstance(text, str) and text.strip():
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return "; ".join(lines[-max_lines:])
    return None


def submit_error(label: str, job_name: str, error: BaseException) -> SubmitError:
    """The :class:`SubmitError` for a provider's failed ``submit``: the
    scheduler's message (and the submit command's exit code) if the error has
    them, else the error itself."""
    if isinstance(error, SubmitError):
        return error
    said = scheduler_message(error)
    if said is None:
        return SubmitError(f"{type(error).__name__}: {error}")
    code = getattr(error, "retcode", None)
    exit_text = f" (exit code {code})" if isinstance(code, int) else ""
    return SubmitError(
        f"the {label} scheduler refused {job_name}{exit_text}: {said}", scheduler_message=said
    )


def parse_walltime(value: Any) -> Optional[float]:
    """Seconds in a provider's ``walltime``, read as Slurm reads a time limit
    (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``; a
    number is minutes); None if there is none or it cannot be read."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) * 60 if value > 0 else None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    days = 0
    if "-" in text:
        day_text, _, text = text.partition("-")
        if not day_text.isdigit():
            return None
        days = int(day_text)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    numbers = [int(p) for p in parts]
    if len(parts) == 1:
        seconds = numbers[0] * (3600 if days else 60)
    elif len(parts) == 2:
        seconds = numbers[0] * 3600 + numbers[1] * 60 if days else numbers[0] * 60 + numbers[1]
    else:
        seconds = numbers[0] * 3600 + numbers[1] * 60 + numbers[2]
    total = days * 86400 + seconds
    return float(total) if total > 0 else None


class IExecutionProvider(Interface):
    """Parsl's ``ExecutionProvider``: starts, watches and stops jobs (blocks).

    The methods may block (a Parsl provider runs scheduler commands), so only
    a :class:`ProviderAdapter` calls them.
    """

    label = Attribute("str: the provider's name, for logs")
    init_blocks = Attribute("int: blocks started at once")
    min_blocks = Attribute("int: fewest blocks kept")
    max_blocks = Attribute("int: most blocks at once")
    nodes_per_block = Attribute("int: nodes (managers) per block")
    parallelism = Attribute("float: the share of outstanding tasks given new slots (0 to 1)")
    resources = Attribute("dict: what the provider knows of each job, by job id")
    status_polling_interval = Attribute("float: seconds between calls to status()")

    def submit(command: str, tasks_per_node: int, job_name: str = "parsl.auto") -> Any:
        """Start a job running ``command`` ``tasks_per_node`` times on each of
        its ``nodes_per_block`` nodes; return its job id (or something false
        if it could not be submitted).  Raises :class:`ExecutionProviderError`."""

    def status(job_ids: Sequence[Any]) -> Sequence[Any]:
        """One :class:`JobStatus` (or Parsl's equivalent) per job id, in order."""

    def cancel(job_ids: Sequence[Any]) -> Sequence[bool]:
        """Stop the jobs; one bool per job id: whether it was being cancelled."""


class INonBlockingProvider(IExecutionProvider):
    """A provider whose methods return at once: it may be called on the reactor thread."""


class IAsyncProvider(Interface):
    """A provider as the endpoint uses it: every call returns a Deferred."""

    provider = Attribute("IExecutionProvider: the provider called")
    blocking = Attribute("bool: True if the provider's calls run in a thread")
    label = Attribute("str: the provider's label")
    init_blocks = Attribute("int")
    min_blocks = Attribute("int")
    max_blocks = Attribute("int")
    nodes_per_block = Attribute("int")
    parallelism = Attribute("float")
    status_polling_interval = Attribute("float: seconds between status polls")
    cores_per_node = Attribute("Optional[int]: cores of a node, where the provider knows")
    walltime = Attribute("Optional[float]: seconds a block may run, where the provider says")

    def submit(command: str, tasks_per_node: int, job_name: str) -> Deferred[Any]:
        """``provider.submit``; any failure, and a false job id, fail with
        :class:`SubmitError` (with the scheduler's message where the provider
        gave it)."""

    def status(job_ids: Sequence[Any]) -> Deferred[List[JobStatus]]:
        """``provider.status``, converted to this module's :class:`JobStatus`."""

    def cancel(job_ids: Sequence[Any]) -> Deferred[List[bool]]:
        """``provider.cancel``."""

    def read_tail(path: Optional[str], max_bytes: int = TAIL_BYTES) -> Deferred[Optional[str]]:
        """The last ``max_bytes`` of a job output file (None if unreadable),
        read where reading cannot block the reactor."""


def read_tail(path: Optional[str], max_bytes: int = TAIL_BYTES) -> Optional[str]:
    """The last ``max_bytes`` of the file at ``path`` as text; None if there is none."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except OSError:
        return None
    text = data.decode("utf-8", "replace")
    if size > max_bytes:
        text = "..." + text
    return text


def _int_attr(provider: Any, name: str, default: int) -> int:
    value = getattr(provider, name, default)
    return default if value is None else int(value)


@implementer(IAsyncProvider)
class ProviderAdapter(Service):
    """Calls an :class:`IExecutionProvider` without blocking the reactor.

    A provider that provides :class:`INonBlockingProvider` is called directly;
    any other (a Parsl provider) in a thread of ``reactor``'s pool
    (``IReactorThreads``, not needed for non-blocking providers), one call
    at a time.  The adapter is a service: it starts and stops the provider if
    that is a service too, and its ``stopService`` waits for a call in a
    thread to return.  ``working_dir`` is where a Parsl provider without a
    ``script_dir`` writes its submit scripts (``<working_dir>/submit_scripts``).
    """

    log = Logger()

    def __init__(self, provider: Any, reactor: Any, working_dir: Optional[str] = None) -> None:
        for method in ("submit", "status", "cancel"):
            if not callable(getattr(provider, method, None)):
                raise TypeError(f"{provider!r} is not an execution provider: no {method}()")
        self.provider = provider
        self.blocking = not INonBlockingProvider.providedBy(provider)
        self._reactor = reactor
        self._working_dir = working_dir
        self._lock = DeferredLock()

    def __repr__(self) -> str:
        mode = "in a thread" if self.blocking else "directly"
        return f"<ProviderAdapter {self.label!r} called {mode}>"

    # -- the provider's attributes ------------------------------------------------

    @property
    def label(self) -> str:
        return str(getattr(self.provider, "label", type(self.provider).__name__))

    @property
    def init_blocks(self) -> int:
        return _int_attr(self.provider, "init_blocks", 1)

    @property
    def min_blocks(self) -> int:
        return _int_attr(self.provider, "min_blocks", 0)

    @property
    def max_blocks(self) -> int:
        return _int_attr(self.provider, "max_blocks", 1)

    @property
    def nodes_per_block(self) -> int:
        return max(1, _int_attr(self.provider, "nodes_per_block", 1))

    @property
    def parallelism(self) -> float:
        value = getattr(self.provider, "parallelism", 1.0)
        return 1.0 if value is None else float(value)

    @property
    def status_polling_interval(self) -> float:
        value = getattr(self.provider, "status_polling_interval", 5.0)
        return 5.0 if not value or value <= 0 else float(value)

    @property
    def cores_per_node(self) -> Optional[int]:
        value = getattr(self.provider, "cores_per_node", None)
        return int(value) if value else None

    @property
    def walltime(self) -> Optional[float]:
        return parse_walltime(getattr(self.provider, "walltime", None))

    # -- lifecycle ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.blocking and self._working_dir is not None:
            self._give_script_dir(os.path.join(self._working_dir, "submit_scripts"))
        if IService.providedBy(self.provider) and not self.provider.running:
            self.provider.startService()

    def _give_script_dir(self, script_dir: str) -> None:
        # Parsl's executors set script_dir before the first submit; we do it
        # for them (and for the channel of older Parsl versions).
        targets = [self.provider, getattr(self.provider, "channel", None)]
        targets.extend(getattr(self.provider, "channels", None) or [])
        wanted = [t for t in targets if t is not None and getattr(t, "script_dir", 1) is None]
        if wanted:
            os.makedirs(script_dir, mode=0o700, exist_ok=True)
            for target in wanted:
                target.script_dir = script_dir

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # Wait for a call in progress in a thread, so that nothing touches the
        # provider after the endpoint has stopped.
        await self._lock.acquire()
        self._lock.release()
        if IService.providedBy(self.provider) and self.provider.running:
            await maybeDeferred(self.provider.stopService)

    # -- calls ------------------------------------------------------------------------

    def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        if not self.blocking:
            return maybeDeferred(function, *args, **kwargs)
        pool = self._reactor.getThreadPool()
        return self._lock.run(deferToThreadPool, self._reactor, pool, function, *args, **kwargs)

    def submit(self, command: str, tasks_per_node: int, job_name: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._submit(command, tasks_per_node, job_name))

    async def _submit(self, command: str, tasks_per_node: int, job_name: str) -> Any:
        try:
            job_id = await self._call(
                self.provider.submit, command, tasks_per_node, job_name=job_name
            )
        except Exception as e:
            raise submit_error(self.label, job_name, e) from e
        if not job_id and job_id != 0:
            raise SubmitError(f"{self.label} provider returned no job id for {job_name}")
        return job_id

    def status(self, job_ids: Sequence[Any]) -> Deferred[List[JobStatus]]:
        return Deferred.fromCoroutine(self._status(list(job_ids)))

    async def _status(self, job_ids: List[Any]) -> List[JobStatus]:
        result = [
            JobStatus.from_foreign(s) for s in await self._for_jobs(self.provider.status, job_ids)
        ]
        if len(result) != len(job_ids):
            raise ExecutionProviderError(
                f"{self.label} provider returned {len(result)} statuses for {len(job_ids)} jobs"
            )
        return result

    def cancel(self, job_ids: Sequence[Any]) -> Deferred[List[bool]]:
        return Deferred.fromCoroutine(self._cancel(list(job_ids)))

    async def _cancel(self, job_ids: List[Any]) -> List[bool]:
        return [bool(r) for r in await self._for_jobs(self.provider.cancel, job_ids)]

    async def _for_jobs(self, method: Callable[[List[Any]], Any], job_ids: List[Any]) -> Any:
        """``method(job_ids)``, a call of the provider (not made for no jobs: then [])."""
        return await self._call(method, job_ids) if job_ids else []

    def read_tail(
        self, path: Optional[str], max_bytes: int = TAIL_BYTES
    ) -> Deferred[Optional[str]]:
        if not path:
            return succeed(None)
        # A batch job's files may be on a shared file system that can hang:
        # read them in a thread.  Our own providers' files are local and small.
        if not self.blocking:
            return maybeDeferred(read_tail, path, max_bytes)
        pool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, read_tail, path, max_bytes)
