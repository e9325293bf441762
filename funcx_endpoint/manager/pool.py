"""The manager's workers: spawn, feed one task at a time, supervise, respawn.

:class:`WorkerPool` owns a fixed number of worker slots (:mod:`.slots`), each
running one ``funcx_endpoint.worker`` process, directly or in a container
(:mod:`.containers`, started by a :class:`~.launcher.WorkerLauncher`).  Tasks
wait in one queue per image for an idle worker of their image (the queue is
the prefetch that keeps workers busy); which image each slot runs is the
placement policy's choice (:mod:`.images`, :mod:`.warm`).  Results go to
``on_result`` untouched.  The pool answers for a worker that cannot:
``WorkerLost`` when it dies (how, doing what, its stderr's end, a
container's exit status), ``TaskTimeout`` past the task timeout (killed),
``ContainerError`` for the tasks of an image that cannot start a worker
(not tried again for a growing while).  Dead workers are replaced; a stop
waits for them all to end (:mod:`.stopping`).
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from funcx_endpoint.manager.containers import RAW, WorkerImage
from funcx_endpoint.manager.images import (
    IImagePool,
    ImageHealth,
    IWorkerPlacement,
    OneImagePlacement,
    SlotState,
    TaskQueues,
    count_images,
)
from funcx_endpoint.manager.launcher import WorkerLauncher
from funcx_endpoint.manager.slots import (
    IWorkerEvents,
    WorkerProtocol,
    WorkerSlot,
    how_it_ended,
    lost_message,
    spawn_worker,
    start_failure_message,
)
from funcx_endpoint.manager.stopping import PoolStop
from funcx_endpoint.manager.workers_env import read_tail
from funcx_endpoint.wire import (
    ActorName,
    ErrorCode,
    PackedResult,
    TaskState,
    TaskTransition,
    frames,
)
from funcx_endpoint.wire.info import ManagerSettings

__all__ = ["WorkerPool", "WorkerProtocol"]

#: How many times in a row a worker may die before saying hello before the
#: manager gives up (its tasks then go elsewhere through the interchange).
MAX_START_FAILURES = 5
#: Seconds to wait, after a worker exited, for its pipes to close.
PIPE_CLOSE_GRACE = 2.0

ResultCallback = Callable[[bytes], None]


@implementer(IImagePool, IWorkerEvents)
class WorkerPool:
    """Runs tasks on ``worker_count`` supervised worker processes.

    ``on_result`` receives each encoded PackedResult.  ``on_fatal`` is
    called (once) with a reason if workers cannot be started at all;
    ``on_change`` when a slot starts a worker or empties (:meth:`images` and
    :attr:`cold_starts` may have changed).
    ``launcher`` starts workers (default: directly, with ``worker_command``
    in ``environment``); ``placement`` chooses the image of each slot
    (default: :class:`~funcx_endpoint.manager.images.OneImagePlacement` of
    no container).
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
        on_change: Callable[[], None] = lambda: None,
        hostname: str = "localhost",
        worker_command: Optional[Sequence[str]] = None,
        environment: Optional[Mapping[str, str]] = None,
        launcher: Optional[WorkerLauncher] = None,
        placement: Optional[IWorkerPlacement] = None,
        on_started: Optional[Callable[[str, int], None]] = None,
        on_finished: Optional[Callable[[str], None]] = None,
    ) -> None:
        self._reactor = reactor
        #: told ``(task id, ns)`` as each task is given to a worker, and the
        #: task id when its worker sends the result
        self._on_started = on_started
        self._on_finished = on_finished
        self.settings = settings
        self.log_dir = log_dir
        self._on_result = on_result
        self._on_fatal = on_fatal
        self._on_change = on_change
        self.hostname = hostname
        self.launcher = launcher or WorkerLauncher(reactor, settings, worker_command, environment)
        self.worker_command = self.launcher.worker_command
        self._environment = self.launcher.environment
        self.placement = placement or OneImagePlacement(RAW)
        self.kill_grace = settings.stop_grace_period / 2
        self._workers = [WorkerSlot(index) for index in range(worker_count)]
        self._queues = TaskQueues()
        self._idle: Deque[WorkerSlot] = deque()
        self._health = ImageHealth(reactor, lambda image: self._rebalance())
        self._start_failures = 0
        self._respawn_calls: Dict[int, IDelayedCall] = {}
        self._stopping = False
        self._stop = PoolStop(reactor, self._alive, self._kill)
        self._running: Dict[str, WorkerSlot] = {}
        self.tasks_done = 0
        #: Workers started for an image no other worker was running.
        self.cold_starts = 0

    # -- public -------------------------------------------------------------

    @property
    def worker_count(self) -> int:
        """Worker slots (each has a live worker, or one is being started)."""
        return len(self._workers)

    @property
    def queued(self) -> int:
        """Tasks waiting for a worker."""
        return len(self._queues)

    def counts(self) -> Dict[str, int]:
        """Workers ready and idle, tasks running and queued."""
        return {
            "workers": len(self._workers),
            "ready": sum(1 for w in self._workers if w.ready),
            "idle": len(self._idle),
            "running": len(self._running),
            "queued": len(self._queues),
        }

    # -- IImagePool: what a placement policy sees and does --------------------------

    def slots(self) -> List[SlotState]:
        """Every slot's image (the next one, if switching) and state."""
        idle = self._idle
        return [worker.state(worker in idle) for worker in self._workers]

    def images(self) -> Dict[WorkerImage, int]:
        """Workers by the image they run (or are starting, or switching to)."""
        return count_images(self.slots())

    def waiting(self) -> Dict[WorkerImage, int]:
        """Tasks waiting for a worker, by image."""
        return self._queues.waiting()

    def oldest_waiting(self) -> Optional[WorkerImage]:
        """The image of the task that has waited longest."""
        return self._queues.oldest()

    def failing(self, image: WorkerImage) -> bool:
        """Whether ``image`` could not start a worker and waits for its retry time."""
        return self._health.failing(image) is not None

    def run_worker(self, index: int, image: WorkerImage) -> None:
        """Make slot ``index`` run ``image`` (see :class:`IImagePool`)."""
        worker = self._workers[index]
        if self._stopping:
            return
        if worker.transport is None and index not in self._respawn_calls:
            worker.wanted = image  # an empty slot
            self._spawn(worker)
            return
        if image == worker.image:
            worker.wanted = None
            return
        worker.wanted = image
        if worker in self._idle:
            self._retire(worker)
        # A busy worker is replaced after its task, a starting one once ready.

    def _retire(self, worker: WorkerSlot) -> None:
        """End an idle worker (its task pipe closes; it exits) to run another image."""
        self._idle.remove(worker)
        worker.kill_reason = "switching"
        if worker.protocol is not None:
            worker.protocol.pipe.close()

    def _rebalance(self) -> None:
        if not self._stopping:
            self.placement.rebalance(self)

    def pids(self) -> List[int]:
        """Process ids of the live workers."""
        return [w.pid for w in self._workers if w.pid is not None and w.exit_reason is None]

    def start(self) -> None:
        """Spawn the workers the placement policy wants at first (by default, all)."""
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        self._rebalance()

    def submit(self, tasks: Sequence[Tuple[str, bytes]], image: WorkerImage = RAW) -> None:
        """Queue ``(task_id, task_buffer)`` pairs to run in ``image``; idle workers of
        that image start on them at once.  If ``image`` failed to start a worker and
        waits for its retry time, they fail now with ``ContainerError``."""
        if self._stopping:
            return
        if image.contained:
            why = self._health.failing(image)
            if why is not None:
                for task_id, _ in tasks:
                    self._answer_unstarted(task_id, ErrorCode.CONTAINER_ERROR, why)
                return
        queues = self._queues
        queues.add(image, tasks)
        idle = self._idle
        while idle and queues.count(image):
            worker = self._take_idle(image)
            if worker is None:
                break
            self._start_task(worker)
        if queues.count(image) and not self._has_worker_for(image, empty_too=True):
            self._rebalance()

    def _take_idle(self, image: WorkerImage) -> Optional[WorkerSlot]:
        idle = self._idle
        if idle[0].image == image:
            return idle.popleft()
        for worker in idle:
            if worker.image == image:
                idle.remove(worker)
                return worker
        return None

    def _has_worker_for(self, image: WorkerImage, empty_too: bool = False) -> bool:
        """Whether a slot runs ``image`` (with ``empty_too``: and none is empty)."""
        found = False
        for worker in self._workers:
            runs = worker.wanted or worker.image
            if runs == image:
                found = True
            elif runs is None and empty_too and worker.index not in self._respawn_calls:
                return False
        return found

    def cancel(self, task_id: str) -> bool:
        """Forget a queued task, or kill the worker running it; no result is sent."""
        if self._queues.remove(task_id):
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
        self._kill(worker)
        return True

    def stop(self) -> Deferred[None]:
        """Stop every worker: TERM, then KILL after half of ``stop_grace_period``.

        (Half, so that the manager is gone within the interchange's grace.)

        Queued tasks are dropped and running ones get no result.  Each call
        returns a new Deferred that fires once every worker process has
        ended.
        """
        if not self._stopping:
            self._stopping = True
            self._queues.clear()
            self._idle.clear()
            for call in self._respawn_calls.values():
                call.cancel()
            self._respawn_calls.clear()
            self._health.stop()
            for worker in self._workers:
                self._cancel_timeout(worker)
                worker.signal("TERM")
            self._stop.start(self.kill_grace)
        return self._stop.when_stopped()

    # -- processes ------------------------------------------------------------

    def _spawn(self, worker: WorkerSlot) -> None:
        self._respawn_calls.pop(worker.index, None)
        if self._stopping:
            return
        if worker.wanted is not None:
            worker.image, worker.wanted = worker.wanted, None
        image = worker.image
        if image is None:
            return  # an empty slot
        if not any(w.image == image and w.transport is not None for w in self._workers):
            self.cold_starts += 1  # no worker of its image runs: a cold start
        launch = self.launcher.launch(image, worker.index)
        try:
            spawn_worker(self._reactor, worker, launch, self.log_dir, self)
        except OSError as exc:
            self.log.error(
                "Could not start worker {index} ({command}): {error}",
                index=worker.index,
                command=" ".join(launch.argv),
                error=exc,
            )
            self._start_failed(worker, f"spawning it failed: {exc}")
            return
        self.log.debug(
            "Started worker {index} (pid {pid}, {image})",
            index=worker.index,
            pid=worker.pid,
            image=image.describe(),
        )
        self._on_change()

    def frame_received(self, worker: WorkerSlot, kind: bytes, body: bytes) -> None:
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
            if self._on_finished is not None:
                self._on_finished(task_id)
            self._on_result(body)
            self._next(worker)
        elif kind == frames.KIND_PHASE:
            worker.phase = body
        elif kind == frames.KIND_HELLO:
            try:
                worker.versions = frames.decode_hello(body)
            except frames.FrameError as exc:
                self.garbled(worker, str(exc))
                return
            worker.ready = True
            if worker.image is not None and worker.image.contained:
                self._health.succeeded(worker.image)
            else:
                self._start_failures = 0
            self.log.debug(
                "Worker {index} (pid {pid}) is ready: {versions}",
                index=worker.index,
                pid=worker.pid,
                versions=worker.versions,
            )
            self._next(worker)
        else:
            self.garbled(worker, f"unknown frame kind {kind!r}")

    def _next(self, worker: WorkerSlot) -> None:
        # A worker that has exited (its last result may still come through
        # the pipe) takes nothing: it would be answered WorkerLost unrun.
        if self._stopping or worker.kill_reason is not None or worker.exit_reason is not None:
            return
        if worker.wanted is not None and worker.wanted != worker.image:
            self._idle.append(worker)
            self._retire(worker)  # the slot switches to another image
            return
        assert worker.image is not None
        if self._queues.count(worker.image):
            self._start_task(worker)
        else:
            worker.idle_since = self._reactor.seconds()
            self._idle.append(worker)
            if len(self._queues):
                self._rebalance()  # tasks of other images wait

    def _start_task(self, worker: WorkerSlot) -> None:
        if worker.exit_reason is not None or worker.protocol is None:
            return  # dead: the task stays queued for a live worker
        assert worker.image is not None
        task_id, task_buffer = self._queues.pop(worker.image)
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

    def _cancel_timeout(self, worker: WorkerSlot) -> None:
        if worker.timeout_call is not None:
            if worker.timeout_call.active():
                worker.timeout_call.cancel()
            worker.timeout_call = None

    def _abandon_task(self, worker: WorkerSlot, why: str) -> Optional[str]:
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

    def _answer_failure(self, worker: WorkerSlot, task_id: str, code: str, message: str) -> None:
        statuses = [TaskTransition(worker.task_started_ns, TaskState.RUNNING, ActorName.MANAGER)]
        self._on_result(PackedResult.failure(task_id, code, message, None, statuses).encode())

    def _answer_unstarted(self, task_id: str, code: str, message: str) -> None:
        """Fail a task no worker has started."""
        self._on_result(PackedResult.failure(task_id, code, message).encode())

    def _kill(self, worker: WorkerSlot) -> None:
        """KILL the worker's process and, for a container, the container."""
        worker.signal("KILL")
        if worker.launch is not None and worker.transport is not None:
            self.launcher.kill(worker.launch)

    def _timed_out(self, worker: WorkerSlot, task_id: str) -> None:
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
        message = f"Task {task_id} ran longer than the task timeout of {timeout:g} s; "
        message += f"its worker (pid {worker.pid} on {self.hostname}) was killed"
        self._answer_failure(worker, task_id, ErrorCode.TASK_TIMEOUT, message)
        self._kill(worker)

    def garbled(self, worker: WorkerSlot, problem: str) -> None:
        self.log.error(
            "Worker {index} (pid {pid}) broke the frame protocol ({problem}); killing it",
            index=worker.index,
            pid=worker.pid,
            problem=problem,
        )
        self._kill(worker)

    def exited(self, worker: WorkerSlot, reason: Failure) -> None:
        worker.exit_reason = reason
        if worker.protocol is not None:
            worker.protocol.pipe.close()
        if worker in self._idle:
            self._idle.remove(worker)
        # Results written just before the exit may still be in the pipe:
        # the death is handled when the pipes close (processEnded), or after
        # a grace if something else holds them open.
        worker.pipe_timer = self._reactor.callLater(PIPE_CLOSE_GRACE, self._close_pipes, worker)

    def _close_pipes(self, worker: WorkerSlot) -> None:
        worker.pipe_timer = None
        if worker.close_pipes():
            self.log.warn(
                "Worker {index} (pid {pid}) exited but its pipes stayed open (a process it "
                "started holds them?); closed them",
                index=worker.index,
                pid=worker.pid,
            )

    def ended(self, worker: WorkerSlot, reason: Failure) -> None:
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
        how = how_it_ended(worker, reason)
        task_id = worker.task_id
        if self._stopping:
            if task_id is not None:
                self._running.pop(task_id, None)
            worker.task_id = None
            self.log.debug(
                "Worker {index} (pid {pid}) stopped: {how}", index=worker.index, pid=pid, how=how
            )
            self._stop.check()
            return
        if task_id is not None:
            self._cancel_timeout(worker)
            worker.task_id = None
            self._running.pop(task_id, None)
            message = lost_message(worker, pid, self.hostname, task_id, how)
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
            if worker.image is not None and worker.image.contained:
                self._image_failed(worker, reason)
            else:
                self._start_failed(worker, how)
            return
        self._spawn(worker)

    def _image_failed(self, worker: WorkerSlot, reason: Failure) -> None:
        """A worker of a container image died before it was ready: the image cannot
        start one.  Its waiting tasks fail (unless other workers of it run), the
        slot empties, and the image is not tried again until its retry time."""
        image = worker.image
        assert image is not None
        message = start_failure_message(worker, reason, self.hostname)
        worker.image = None
        worker.wanted = None
        self._on_change()
        delay = self._health.failed(image, message)
        if delay is not None:
            self.log.warn(
                "{message}\n(tried again in {delay:g} s, or when a task needs it after that)",
                message=message,
                delay=delay,
            )
        if not any(w.ready and w.image == image and w.exit_reason is None for w in self._workers):
            for task_id, _ in self._queues.take_all(image):
                self._answer_unstarted(task_id, ErrorCode.CONTAINER_ERROR, message)
        self._rebalance()

    def _start_failed(self, worker: WorkerSlot, how: str) -> None:
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

    # -- stopping -------------------------------------------------------------

    def _alive(self) -> List[WorkerSlot]:
        return [w for w in self._workers if w.transport is not None]
