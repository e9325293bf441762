"""The manager's workers: spawn, feed one task at a time, supervise, respawn.

:class:`WorkerPool` owns a fixed number of worker slots.  Each slot runs one
worker process (``python -m funcx_endpoint.worker``) started with
``reactor.spawnProcess``: the task pipe on the worker's fd 3, the result pipe
on its fd 4 (see :mod:`funcx_endpoint.wire.frames`), its stdout and stderr
appended to ``worker-<n>.out`` / ``worker-<n>.err`` in the log directory.

Tasks wait in the pool's queue and go to an idle worker as soon as there is
one (a worker that answers gets its next task at once, so the queue is the
prefetch that keeps workers busy).  Results (encoded packed results,
made by the worker) go to ``on_result`` untouched.  The pool answers for the
worker when the worker cannot: ``WorkerLost`` when it dies (how it died, what
it was doing, the end of its stderr), ``TaskTimeout`` when it runs past the
task timeout (it is killed).  A dead worker is replaced, after a growing
delay when it keeps dying at start.

:class:`WorkerProtocol` only frames bytes; every decision is the pool's.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint.manager.pipes import TaskPipe
from funcx_endpoint.manager.workers_env import describe_exit, read_tail, worker_environment
from funcx_endpoint.wire import (
    ActorName,
    ErrorCode,
    PackedResult,
    TaskState,
    TaskTransition,
    frames,
)
from funcx_endpoint.wire.info import (
    ManagerSettings,
)

__all__ = ["WorkerPool", "WorkerProtocol"]

#: How many times in a row a worker may die before saying hello before the
#: manager gives up (its tasks then go elsewhere through the interchange).
MAX_START_FAILURES = 5
#: Seconds to wait, after a worker exited, for its pipes to close.
PIPE_CLOSE_GRACE = 2.0

ResultCallback = Callable[[bytes], None]


class _Worker:
    """One worker slot and the process running in it now."""

    __slots__ = (
        "index",
        "protocol",
        "transport",
        "pid",
        "ready",
        "versions",
        "task_id",
        "task_started_ns",
        "phase",
        "timeout_call",
        "kill_reason",
        "spawned_at",
        "stderr_path",
        "stderr_offset",
        "exit_reason",
        "pipe_timer",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.protocol: Optional[WorkerProtocol] = None
        self.transport: Any = None
        self.pid: Optional[int] = None
        self.ready = False
        self.versions: Dict[str, Any] = {}
        self.task_id: Optional[str] = None
        self.task_started_ns = 0
        self.phase = frames.PHASE_RUNNING
        self.timeout_call: Optional[IDelayedCall] = None
        self.kill_reason: Optional[str] = None
        self.spawned_at = 0.0
        self.stderr_path = ""
        self.stderr_offset = 0
        self.exit_reason: Optional[Failure] = None
        self.pipe_timer: Optional[IDelayedCall] = None

    def signal(self, name: str) -> None:
        """Send signal ``name`` to the process, if it is still there."""
        if self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass


class WorkerProtocol(ProcessProtocol):
    """Frames to and from one worker process; events go to the pool.

    Frames to the worker go through its :class:`TaskPipe` (written at once);
    frames from it arrive on the result pipe Twisted reads.
    """

    def __init__(self, pool: WorkerPool, worker: _Worker, pipe: TaskPipe) -> None:
        self._pool = pool
        self._worker = worker
        self._decoder = frames.FrameDecoder()
        self.pipe = pipe

    def send(self, frame: bytes) -> None:
        """Write one frame to the worker's task pipe."""
        self.pipe.write(frame)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != frames.RESULT_FD:
            return
        try:
            received = self._decoder.feed(data)
        except frames.FrameError as exc:
            self._pool._garbled(self._worker, str(exc))
            return
        for kind, body in received:
            self._pool._frame(self._worker, kind, body)

    def processExited(self, reason: Failure) -> None:
        self._pool._exited(self._worker, reason)

    def processEnded(self, reason: Failure) -> None:
        self._pool._ended(self._worker, reason)


class WorkerPool:
    """Runs tasks on ``settings``-many supervised worker processes.

    ``on_result`` receives each encoded PackedResult.  ``on_fatal`` is
    called (once) with a reason if workers cannot be started at all.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        worker_count: int,
        settings: ManagerSettings,
        log_dir: str,
        on_result: ResultCallback,
        on_fatal: Callable[[str], None] = lambda reason: None,
        hostname: str = "localhost",
        worker_command: Optional[Sequence[str]] = None,
        environment: Optional[Mapping[str, str]] = None,
        on_started: Optional[Callable[[str, int], None]] = None,
    ) -> None:
        self._reactor = reactor
        #: told ``(task id, ns)`` as each task is given to a worker
        self._on_started = on_started
        self.settings = settings
        self.log_dir = log_dir
        self._on_result = on_result
        self._on_fatal = on_fatal
        self.hostname = hostname
        self.worker_command = list(
            worker_command or [sys.executable, "-m", "funcx_endpoint.worker"]
        )
        self._environment = dict(os.environ if environment is None else environment)
        self.kill_grace = settings.stop_grace_period / 2
        self._workers = [_Worker(index) for index in range(worker_count)]
        self._queue: Deque[Tuple[str, bytes]] = deque()
        self._idle: Deque[_Worker] = deque()
        self._start_failures = 0
        self._respawn_calls: Dict[int, IDelayedCall] = {}
        self._stopping = False
        self._kill_call: Optional[IDelayedCall] = None
        self._stop_waiters: List[Deferred[None]] = []
        self._running: Dict[str, _Worker] = {}
        self.tasks_done = 0

    # -- public -------------------------------------------------------------

    @property
    def worker_count(self) -> int:
        """Worker slots (each has a live worker, or one is being started)."""
        return len(self._workers)

    @property
    def queued(self) -> int:
        """Tasks waiting for a worker."""
        return len(self._queue)

    def counts(self) -> Dict[str, int]:
        """Workers ready and idle, tasks running and queued."""
        return {
            "workers": len(self._workers),
            "ready": sum(1 for w in self._workers if w.ready),
            "idle": len(self._idle),
            "running": len(self._running),
            "queued": len(self._queue),
        }

    def pids(self) -> List[int]:
        """Process ids of the live workers."""
        return [w.pid for w in self._workers if w.pid is not None and w.exit_reason is None]

    def start(self) -> None:
        """Spawn every worker."""
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        for worker in self._workers:
            self._spawn(worker)

    def submit(self, tasks: Sequence[Tuple[str, bytes]]) -> None:
        """Queue ``(task_id, task_buffer)`` pairs; idle workers start on them at once."""
        if self._stopping:
            return
        self._queue.extend(tasks)
        idle = self._idle
        while idle and self._queue:
            self._start_task(idle.popleft())

    def cancel(self, task_id: str) -> bool:
        """Forget a queued task, or kill the worker running it; no result is sent."""
        for item in self._queue:
            if item[0] == task_id:
                self._queue.remove(item)
                return True
        worker = self._running.get(task_id)
        if worker is None:
            return False
        self.log.info(
            "Killing worker {index} (pid {pid}): its task {task_id} was cancelled",
            index=worker.index,
            pid=worker.pid,
            task_id=task_id,
        )
        self._abandon_task(worker, "cancelled")
        worker.signal("KILL")
        return True

    def stop(self) -> Deferred[None]:
        """Stop every worker: TERM, then KILL after half of ``stop_grace_period``.

        (Half, so that the manager is gone within the interchange's grace.)

        Queued tasks are dropped and running ones get no result.  Each call
        returns a new Deferred that fires once every worker process has
        ended.
        """
        waiter: Deferred[None] = Deferred()
        self._stop_waiters.append(waiter)
        if not self._stopping:
            self._stopping = True
            self._queue.clear()
            self._idle.clear()
            for call in self._respawn_calls.values():
                call.cancel()
            self._respawn_calls.clear()
            for worker in self._workers:
                self._cancel_timeout(worker)
                worker.signal("TERM")
            if self._alive():
                self._kill_call = self._reactor.callLater(self.kill_grace, self._kill_all)
        self._check_stopped()
        return waiter

    # -- processes ------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        self._respawn_calls.pop(worker.index, None)
        if self._stopping:
            return
        base = os.path.join(self.log_dir, f"worker-{worker.index}")
        args = self.worker_command + [
            "--worker-id",
            str(worker.index),
            "--result-size-limit",
            str(self.settings.result_size_limit),
        ]
        if self.settings.worker_debug:
            args.append("--debug")
        env = worker_environment(self._environment, self.settings, worker.index)
        out_fd = os.open(base + ".out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err_fd = os.open(base + ".err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        worker.stderr_path = base + ".err"
        worker.stderr_offset = os.lseek(err_fd, 0, os.SEEK_END)
        worker.ready = False
        worker.versions = {}
        worker.task_id = None
        worker.kill_reason = None
        worker.exit_reason = None
        worker.phase = frames.PHASE_RUNNING
        worker.spawned_at = self._reactor.seconds()
        pipe, child_end = TaskPipe.open(self._reactor)
        protocol = WorkerProtocol(self, worker, pipe)
        worker.protocol = protocol
        try:
            worker.transport = self._reactor.spawnProcess(
                protocol,
                args[0],
                args,
                env=env,
                childFDs={
                    0: null_fd,
                    1: out_fd,
                    2: err_fd,
                    frames.TASK_FD: child_end,
                    frames.RESULT_FD: "r",
                },
            )
        except OSError as exc:
            pipe.close()
            worker.transport = None
            worker.protocol = None
            self.log.error(
                "Could not start worker {index} ({command}): {error}",
                index=worker.index,
                command=" ".join(args),
                error=exc,
            )
            self._start_failed(worker, f"spawning it failed: {exc}")
            return
        finally:
            os.close(out_fd)
            os.close(err_fd)
            os.close(null_fd)
            os.close(child_end)
        worker.pid = worker.transport.pid
        self.log.debug("Started worker {index} (pid {pid})", index=worker.index, pid=worker.pid)

    def _frame(self, worker: _Worker, kind: bytes, body: bytes) -> None:
        if kind == frames.KIND_RESULT:
            task_id = worker.task_id
            if task_id is None:
                if worker.kill_reason is not None:
                    return  # it finished as it was being killed; answered already
                self.log.warn(
                    "Worker {index} sent a result while it had no task; ignored",
                    index=worker.index,
                )
                return
            self._cancel_timeout(worker)
            worker.task_id = None
            del self._running[task_id]
            self.tasks_done += 1
            self._on_result(body)
            self._next(worker)
        elif kind == frames.KIND_PHASE:
            worker.phase = body
        elif kind == frames.KIND_HELLO:
            try:
                worker.versions = frames.decode_hello(body)
            except frames.FrameError as exc:
                self._garbled(worker, str(exc))
                return
            worker.ready = True
            self._start_failures = 0
            self.log.debug(
                "Worker {index} (pid {pid}) is ready: {versions}",
                index=worker.index,
                pid=worker.pid,
                versions=worker.versions,
            )
            self._next(worker)
        else:
            self._garbled(worker, f"unknown frame kind {kind!r}")

    def _next(self, worker: _Worker) -> None:
        # A worker that has exited (its last result may still come through
        # the pipe) takes nothing: it would be answered WorkerLost unrun.
        if self._stopping or worker.kill_reason is not None or worker.exit_reason is not None:
            return
        if self._queue:
            self._start_task(worker)
        else:
            self._idle.append(worker)

    def _start_task(self, worker: _Worker) -> None:
        if worker.exit_reason is not None or worker.protocol is None:
            return  # dead: the task stays queued for a live worker
        task_id, task_buffer = self._queue.popleft()
        started = time.time_ns()
        worker.task_id = task_id
        worker.task_started_ns = started
        worker.phase = frames.PHASE_RUNNING
        self._running[task_id] = worker
        timeout = self.settings.task_timeout
        if timeout:
            worker.timeout_call = self._reactor.callLater(timeout, self._timed_out, worker, task_id)
        assert worker.protocol is not None
        worker.protocol.send(frames.encode_task(task_id, started, task_buffer))
        if self._on_started is not None:
            self._on_started(task_id, started)

    def _cancel_timeout(self, worker: _Worker) -> None:
        if worker.timeout_call is not None:
            if worker.timeout_call.active():
                worker.timeout_call.cancel()
            worker.timeout_call = None

    def _abandon_task(self, worker: _Worker, why: str) -> Optional[str]:
        """Forget the worker's task (it gets no result from the worker) and mark it killed."""
        self._cancel_timeout(worker)
        task_id = worker.task_id
        worker.task_id = None
        worker.kill_reason = why
        if task_id is not None:
            self._running.pop(task_id, None)
        if worker in self._idle:
            self._idle.remove(worker)
        return task_id

    def _answer_failure(self, worker: _Worker, task_id: str, code: str, message: str) -> None:
        statuses = [TaskTransition(worker.task_started_ns, TaskState.RUNNING, ActorName.MANAGER)]
        self._on_result(PackedResult.failure(task_id, code, message, None, statuses).encode())

    def _timed_out(self, worker: _Worker, task_id: str) -> None:
        worker.timeout_call = None
        if worker.task_id != task_id:
            return
        timeout = self.settings.task_timeout
        self.log.warn(
            "Task {task_id} ran past the task timeout of {timeout} s; killing worker "
            "{index} (pid {pid})",
            task_id=task_id,
            timeout=timeout,
            index=worker.index,
            pid=worker.pid,
        )
        self._abandon_task(worker, "timeout")
        self._answer_failure(
            worker,
            task_id,
            ErrorCode.TASK_TIMEOUT,
            f"Task {task_id} ran longer than the task timeout of {timeout:g} s; "
            f"its worker (pid {worker.pid} on {self.hostname}) was killed",
        )
        worker.signal("KILL")

    def _garbled(self, worker: _Worker, problem: str) -> None:
        self.log.error(
            "Worker {index} (pid {pid}) broke the frame protocol ({problem}); killing it",
            index=worker.index,
            pid=worker.pid,
            problem=problem,
        )
        worker.signal("KILL")

    def _exited(self, worker: _Worker, reason: Failure) -> None:
        worker.exit_reason = reason
        if worker.protocol is not None:
            worker.protocol.pipe.close()
        if worker in self._idle:
            self._idle.remove(worker)
        # Results written just before the exit may still be in the pipe:
        # the death is handled when the pipes close (processEnded), or after
        # a grace if something else holds them open.
        worker.pipe_timer = self._reactor.callLater(PIPE_CLOSE_GRACE, self._close_pipes, worker)

    def _close_pipes(self, worker: _Worker) -> None:
        worker.pipe_timer = None
        transport = worker.transport
        if transport is not None:
            self.log.warn(
                "Worker {index} (pid {pid}) exited but its pipes stayed open (a process it "
                "started holds them?); closing them",
                index=worker.index,
                pid=worker.pid,
            )
            if worker.protocol is not None:
                worker.protocol.pipe.close()
            transport.closeChildFD(frames.RESULT_FD)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if worker.pipe_timer is not None:
            if worker.pipe_timer.active():
                worker.pipe_timer.cancel()
            worker.pipe_timer = None
        reason = worker.exit_reason or reason
        worker.exit_reason = reason
        pid = worker.pid
        if worker.protocol is not None:
            worker.protocol.pipe.close()
        worker.transport = None
        worker.protocol = None
        if worker in self._idle:
            self._idle.remove(worker)
        how = describe_exit(reason)
        task_id = worker.task_id
        if self._stopping:
            if task_id is not None:
                self._running.pop(task_id, None)
            worker.task_id = None
            self.log.debug(
                "Worker {index} (pid {pid}) stopped: {how}", index=worker.index, pid=pid, how=how
            )
            self._check_stopped()
            return
        if task_id is not None:
            self._cancel_timeout(worker)
            worker.task_id = None
            self._running.pop(task_id, None)
            message = self._lost_message(worker, pid, task_id, how)
            self.log.warn("{message}", message=message)
            self._answer_failure(worker, task_id, ErrorCode.WORKER_LOST, message)
        elif worker.kill_reason is None:
            tail = read_tail(worker.stderr_path, worker.stderr_offset)
            self.log.warn(
                "Worker {index} (pid {pid}) died {when}: {how}{tail}",
                index=worker.index,
                pid=pid,
                when="while idle" if worker.ready else "before it was ready",
                how=how,
                tail=f"; its stderr ends with:\n{tail}" if tail else "",
            )
        if not worker.ready and worker.kill_reason is None:
            self._start_failed(worker, how)
            return
        self._spawn(worker)

    def _start_failed(self, worker: _Worker, how: str) -> None:
        self._start_failures += 1
        if self._start_failures >= MAX_START_FAILURES:
            tail = read_tail(worker.stderr_path, worker.stderr_offset) if worker.stderr_path else ""
            reason = (
                f"{self._start_failures} workers in a row died before they were ready "
                f"(the last: {how})"
            )
            if tail:
                reason += f"; its stderr ends with:\n{tail}"
            self._on_fatal(reason)
            return
        delay = min(0.1 * 2**self._start_failures, 10.0)
        self._respawn_calls[worker.index] = self._reactor.callLater(delay, self._spawn, worker)

    def _lost_message(self, worker: _Worker, pid: Optional[int], task_id: str, how: str) -> str:
        parts = [
            f"Worker {worker.index} (pid {pid}) on {self.hostname} died while running "
            f"task {task_id}: {how}."
        ]
        if worker.phase == frames.PHASE_LOADING:
            python = worker.versions.get("python", "unknown")
            dill = worker.versions.get("dill", "unknown")
            parts.append(
                f"It died while deserializing the task's function: the function was "
                f"probably serialized with a Python or dill version other than the "
                f"worker's (Python {python}, dill {dill})."
            )
        tail = read_tail(worker.stderr_path, worker.stderr_offset)
        if tail:
            parts.append(f"The end of its stderr ({worker.stderr_path}):\n{tail}")
        return " ".join(parts)

    # -- stopping -------------------------------------------------------------

    def _alive(self) -> List[_Worker]:
        return [w for w in self._workers if w.transport is not None]

    def _kill_all(self) -> None:
        self._kill_call = None
        for worker in self._alive():
            self.log.warn(
                "Worker {index} (pid {pid}) did not stop within {grace} s; killing it",
                index=worker.index,
                pid=worker.pid,
                grace=self.kill_grace,
            )
            worker.signal("KILL")

    def _check_stopped(self) -> None:
        if not self._stopping or self._alive():
            return
        if self._kill_call is not None:
            if self._kill_call.active():
                self._kill_call.cancel()
            self._kill_call = None
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
