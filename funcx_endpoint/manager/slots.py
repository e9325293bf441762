"""One worker slot of the manager's pool: its process, and how that is started.

:class:`WorkerSlot` is what the pool knows of a slot (the image it runs, the
process in it now, the task it runs); :class:`WorkerProtocol` frames the
process's bytes and hands every event to the pool (:class:`IWorkerEvents`);
:func:`spawn_worker` starts the process of a
:class:`~funcx_endpoint.manager.containers.Launch` with its pipes and log
files; :func:`lost_message` says what happened when a worker died mid-task.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import Interface

from funcx_endpoint.manager.containers import (
    ENGINES,
    Launch,
    WorkerImage,
    describe_container_exit,
)
from funcx_endpoint.manager.images import BUSY, EMPTY, IDLE, STARTING, SWITCHING, SlotState
from funcx_endpoint.manager.pipes import TaskPipe
from funcx_endpoint.manager.workers_env import describe_exit, read_tail
from funcx_endpoint.wire import frames

__all__ = [
    "IWorkerEvents",
    "WorkerProtocol",
    "WorkerSlot",
    "how_it_ended",
    "lost_message",
    "spawn_worker",
    "start_failure_message",
]


class WorkerSlot:
    """One worker slot and the process running in it now."""

    __slots__ = (
        "index",
        "image",
        "wanted",
        "launch",
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
        "idle_since",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        # What it runs (None: an empty slot), and what it runs next (switching).
        self.image: Optional[WorkerImage] = None
        self.wanted: Optional[WorkerImage] = None
        self.launch: Optional[Launch] = None
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
        self.idle_since = 0.0

    @property
    def contained(self) -> bool:
        """Whether its worker runs in a container."""
        return self.image is not None and self.image.contained

    def state(self, idle: bool) -> SlotState:
        """What a placement policy sees of this slot (``idle``: in the pool's idle
        workers)."""
        image = self.wanted or self.image
        if image is None:
            state = EMPTY
        elif self.wanted is not None and self.wanted != self.image:
            state = SWITCHING
        elif self.task_id is not None:
            state = BUSY
        elif idle:
            state = IDLE
        else:
            state = STARTING
        return SlotState(self.index, image, state, self.idle_since)

    def close_pipes(self) -> bool:
        """Close both pipes of a process that exited but whose pipes stay open (a
        process it started holds them); whether it had any."""
        transport = self.transport
        if transport is None:
            return False
        if self.protocol is not None:
            self.protocol.pipe.close()
        launch = self.launch
        transport.closeChildFD(frames.RESULT_FD if launch is None else launch.result_fd)
        return True

    def signal(self, name: str) -> None:
        """Send signal ``name`` to the process, if it is still there."""
        if self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass


class IWorkerEvents(Interface):
    """What a worker's protocol tells the pool."""

    def frame_received(worker: WorkerSlot, kind: bytes, body: bytes) -> None:
        """A frame came from the worker."""

    def garbled(worker: WorkerSlot, problem: str) -> None:
        """The worker wrote bytes that are not frames."""

    def exited(worker: WorkerSlot, reason: Failure) -> None:
        """The process exited (its pipes may still be open)."""

    def ended(worker: WorkerSlot, reason: Failure) -> None:
        """The process exited and its pipes are closed."""


class WorkerProtocol(ProcessProtocol):
    """Frames to and from one worker process; events go to the pool.

    Frames to the worker go through its :class:`TaskPipe` (written at once);
    frames from it arrive on the result pipe Twisted reads.
    """

    def __init__(self, events: IWorkerEvents, worker: WorkerSlot, pipe: TaskPipe) -> None:
        self._events = events
        self._worker = worker
        self._decoder = frames.FrameDecoder()
        self.pipe = pipe

    def send(self, frame: bytes) -> None:
        """Write one frame to the worker's task pipe."""
        self.pipe.write(frame)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        launch = self._worker.launch
        if childFD != (frames.RESULT_FD if launch is None else launch.result_fd):
            return
        try:
            received = self._decoder.feed(data)
        except frames.FrameError as exc:
            self._events.garbled(self._worker, str(exc))
            return
        for kind, body in received:
            self._events.frame_received(self._worker, kind, body)

    def processExited(self, reason: Failure) -> None:
        self._events.exited(self._worker, reason)

    def processEnded(self, reason: Failure) -> None:
        self._events.ended(self._worker, reason)


def spawn_worker(
    reactor: Any, worker: WorkerSlot, launch: Launch, log_dir: str, events: IWorkerEvents
) -> None:
    """Start ``launch`` in ``worker``'s slot: the task pipe ours, the result pipe read by
    Twisted, output appended to ``worker-<index>.out`` / ``.err`` in ``log_dir``.

    The slot's process fields are reset and set; OSError if it cannot be spawned
    (the slot then has no process).
    """
    base = os.path.join(log_dir, f"worker-{worker.index}")
    out_fd = os.open(base + ".out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    err_fd = os.open(base + ".err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    worker.launch = launch
    worker.stderr_path = base + ".err"
    worker.stderr_offset = os.lseek(err_fd, 0, os.SEEK_END)
    worker.ready = False
    worker.versions = {}
    worker.task_id = None
    worker.kill_reason = None
    worker.exit_reason = None
    worker.phase = frames.PHASE_RUNNING
    worker.spawned_at = reactor.seconds()
    pipe, child_end = TaskPipe.open(reactor)
    protocol = WorkerProtocol(events, worker, pipe)
    worker.protocol = protocol
    child_fds: Dict[int, Any]
    if launch.pipes == "stdio":
        child_fds = {0: child_end, 1: "r", 2: err_fd}
    else:
        child_fds = {0: null_fd, 1: out_fd, 2: err_fd, frames.TASK_FD: child_end}
        child_fds[frames.RESULT_FD] = "r"
    try:
        worker.transport = reactor.spawnProcess(
            protocol, launch.argv[0], launch.argv, env=launch.env, childFDs=child_fds
        )
    except OSError:
        pipe.close()
        worker.transport = None
        worker.protocol = None
        raise
    finally:
        for fd in (out_fd, err_fd, null_fd, child_end):
            os.close(fd)
    worker.pid = worker.transport.pid


def lost_message(
    worker: WorkerSlot, pid: Optional[int], hostname: str, task_id: str, how: str
) -> str:
    """The WorkerLost message of a worker that died running ``task_id``."""
    where = f", in {worker.image.describe()}" if worker.image and worker.contained else ""
    parts = [
        f"Worker {worker.index} (pid {pid}{where}) on {hostname} died while running "
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


def how_it_ended(worker: WorkerSlot, reason: Failure) -> str:
    """How the worker's process ended, for people (a container's exit status spelled out)."""
    code = getattr(reason.value, "exitCode", None)
    if worker.contained and code is not None:
        return describe_container_exit(code)
    return describe_exit(reason)


def start_failure_message(worker: WorkerSlot, reason: Failure, hostname: str) -> str:
    """The ContainerError message of a container worker that died before it was
    ready: the image, what the engine's exit status means, what it said."""
    image = worker.image
    assert image is not None and image.contained
    engine = ENGINES[image.engine]
    code = getattr(reason.value, "exitCode", None)
    message = (
        f"Could not start a worker in {image.describe()} on {hostname}: "
        f"{engine.start_failure(code)}"
    )
    tail = read_tail(worker.stderr_path, worker.stderr_offset)
    if tail:
        message += f". {engine.name} said:\n{tail}"
    return message
