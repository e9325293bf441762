"""Which image each worker runs: task queues per image, failing images, placement.

A manager's :class:`~funcx_endpoint.manager.pool.WorkerPool` runs each task in
a worker of the task's image (:class:`~funcx_endpoint.manager.containers.WorkerImage`:
an engine and an image, or no container).  Three objects here hold what that
takes, each with its own state:

* :class:`TaskQueues`: tasks waiting for a worker, one queue per image, and
  which image's task has waited longest;
* :class:`ImageHealth`: images that could not start a worker, each until its
  retry time (a growing backoff), so that a missing image fails its tasks at
  once with the engine's message instead of making the manager spin;
* a placement policy (:class:`IWorkerPlacement`) that decides which image each
  worker slot runs, through the small :class:`IImagePool` view of the pool.

:class:`OneImagePlacement` is the default: all of a manager's workers run one
image at a time (the manager of hard routing, which gets the tasks of one
container; and the endpoint-wide form, where every task runs in one image).
Its ``default`` image starts with the manager (no container, or the
endpoint-wide image); None starts no worker until a task says which image.
When tasks of another image wait and no worker is busy or starting, it
switches every slot to that image (so tasks of several images are run in
turn, never failed).

Soft routing needs another policy on the same interface: workers of several
images in one manager, a bounded number of images warm, the least recently
used image's idle workers replaced for an image that waits
(:meth:`IImagePool.run_worker` on an idle slot does that), and the pool's
:meth:`IImagePool.slots` to report to the interchange which images are warm.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Attribute, Interface, implementer

from funcx_endpoint.manager.containers import WorkerImage

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "IImagePool",
    "IWorkerPlacement",
    "ImageHealth",
    "OneImagePlacement",
    "SlotState",
    "TaskQueues",
    "count_images",
]

#: Seconds an image that could not start a worker is not tried again, at first;
#: doubled at each failure in a row, up to :data:`BACKOFF_MAX`.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0

#: The states of a worker slot (:attr:`SlotState.state`).
STARTING, IDLE, BUSY, SWITCHING, EMPTY = "starting", "idle", "busy", "switching", "empty"


class TaskQueues:
    """Tasks waiting for a worker: ``(task_id, buffer)`` pairs, first in first out
    per image; :meth:`oldest` says which image's first task came first."""

    __slots__ = ("_queues", "_count", "_sequence")

    def __init__(self) -> None:
        self._queues: Dict[WorkerImage, Deque[Tuple[int, str, bytes]]] = {}
        self._count = 0
        self._sequence = 0

    def __len__(self) -> int:
        return self._count

    def add(self, image: WorkerImage, tasks: Sequence[Tuple[str, bytes]]) -> None:
        """Queue ``tasks`` for workers of ``image``."""
        queue = self._queues.get(image)
        if queue is None:
            queue = self._queues[image] = deque()
        sequence = self._sequence
        for task_id, buffer in tasks:
            queue.append((sequence, task_id, buffer))
            sequence += 1
        self._sequence = sequence
        self._count += len(tasks)

    def count(self, image: WorkerImage) -> int:
        """Tasks waiting for ``image``."""
        queue = self._queues.get(image)
        return len(queue) if queue else 0

    def pop(self, image: WorkerImage) -> Tuple[str, bytes]:
        """The first task waiting for ``image`` (IndexError if none)."""
        _, task_id, buffer = self._queues[image].popleft()
        self._count -= 1
        return task_id, buffer

    def take_all(self, image: WorkerImage) -> List[Tuple[str, bytes]]:
        """Remove and return every task waiting for ``image``."""
        queue = self._queues.pop(image, None)
        if not queue:
            return []
        self._count -= len(queue)
        return [(task_id, buffer) for _, task_id, buffer in queue]

    def remove(self, task_id: str) -> bool:
        """Forget a waiting task; whether it was here."""
        for queue in self._queues.values():
            for item in queue:
                if item[1] == task_id:
                    queue.remove(item)
                    self._count -= 1
                    return True
        return False

    def clear(self) -> None:
        self._queues.clear()
        self._count = 0

    def waiting(self) -> Dict[WorkerImage, int]:
        """Tasks waiting, by image (images with none left out)."""
        return {image: len(queue) for image, queue in self._queues.items() if queue}

    def oldest(self) -> Optional[WorkerImage]:
        """The image of the task that has waited longest, or None."""
        found: Optional[Tuple[int, WorkerImage]] = None
        for image, queue in self._queues.items():
            if queue and (found is None or queue[0][0] < found[0]):
                found = (queue[0][0], image)
        return None if found is None else found[1]


@attr.s(auto_attribs=True)
class _Failure:
    message: str
    failures: int
    retry_at: float
    call: Optional[IDelayedCall] = None


@attr.s(auto_attribs=True, eq=False)
class ImageHealth:
    """Images that could not start a worker: why, and when to try again.

    ``on_retry(image)`` is called (on ``clock``) when a failing image's retry
    time comes, ``first`` seconds after its first failure, doubling up to
    ``most``; :meth:`stop` cancels the pending calls.
    """

    _clock: IReactorTime
    _on_retry: Callable[[WorkerImage], None]
    _first: float = BACKOFF_FIRST
    _most: float = BACKOFF_MAX
    _failed: Dict[WorkerImage, _Failure] = attr.ib(factory=dict, init=False)

    def failing(self, image: WorkerImage) -> Optional[str]:
        """Why ``image`` cannot start a worker, while it waits for its retry; else None."""
        failure = self._failed.get(image)
        if failure is None or self._clock.seconds() >= failure.retry_at:
            return None
        return failure.message

    def failed(self, image: WorkerImage, message: str) -> Optional[float]:
        """``image`` could not start a worker: the seconds until it may be tried again,
        or None when it was failing already (workers of one attempt failing
        together count once; the message is the newest)."""
        now = self._clock.seconds()
        failure = self._failed.get(image)
        if failure is not None and now < failure.retry_at:
            failure.message = message
            return None
        failures = 1 if failure is None else failure.failures + 1
        delay = min(self._first * 2 ** (failures - 1), self._most)
        self._failed[image] = _Failure(message, failures, now + delay)
        self._failed[image].call = self._clock.callLater(delay, self._retry, image)
        return delay

    def _retry(self, image: WorkerImage) -> None:
        failure = self._failed.get(image)
        if failure is not None:
            failure.call = None
        self._on_retry(image)

    def succeeded(self, image: WorkerImage) -> None:
        """A worker of ``image`` started: its record is cleared."""
        failure = self._failed.pop(image, None)
        if failure is not None and failure.call is not None and failure.call.active():
            failure.call.cancel()

    def stop(self) -> None:
        """Cancel the pending retry calls."""
        for failure in self._failed.values():
            if failure.call is not None and failure.call.active():
                failure.call.cancel()
            failure.call = None


@attr.s(auto_attribs=True, frozen=True)
class SlotState:
    """One worker slot as a placement policy sees it.

    ``image``: what it runs, or will run once it has switched (None: empty);
    ``state``: ``starting``, ``idle``, ``busy`` (running a task), ``switching``
    (its worker is ending, to be replaced by one of ``image``) or ``empty``
    (no worker, none coming); ``since``: when its worker last became idle
    (for least recently used choices).
    """

    index: int
    image: Optional[WorkerImage]
    state: str
    since: float = 0.0


def count_images(slots: Sequence[SlotState]) -> Dict[WorkerImage, int]:
    """Slots by image (empty ones left out)."""
    found: Dict[WorkerImage, int] = {}
    for slot in slots:
        if slot.image is not None:
            found[slot.image] = found.get(slot.image, 0) + 1
    return found


class IImagePool(Interface):
    """What a placement policy sees of a worker pool, and the one thing it does."""

    worker_count = Attribute("int: the worker slots")

    def slots() -> List[SlotState]:
        """Every slot's image and state."""

    def images() -> Dict[WorkerImage, int]:
        """Workers by the image they run (or are starting, or switching to)."""

    def waiting() -> Dict[WorkerImage, int]:
        """Tasks waiting for a worker, by image."""

    def oldest_waiting() -> Optional[WorkerImage]:
        """The image of the task that has waited longest, or None."""

    def failing(image: WorkerImage) -> bool:
        """Whether ``image`` failed to start a worker and waits for its retry time."""

    def run_worker(index: int, image: WorkerImage) -> None:
        """Make slot ``index`` run ``image``: at once if it is empty; an idle worker of
        another image is stopped and replaced; a busy one after its task."""


class IWorkerPlacement(Interface):
    """Decides which image each worker slot of a pool runs."""

    def rebalance(pool: IImagePool) -> None:
        """Called when tasks wait for an image no worker runs, when a worker goes
        idle while tasks of other images wait, when slots become empty, and
        when a failing image's retry time comes; calls ``pool.run_worker``."""


@implementer(IWorkerPlacement)
@attr.s(auto_attribs=True)
class OneImagePlacement:
    """All workers run one image at a time (see the module docstring)."""

    default: Optional[WorkerImage]

    def rebalance(self, pool: IImagePool) -> None:
        slots = pool.slots()
        wanted = pool.oldest_waiting()
        if wanted is not None:
            others = [s for s in slots if s.state != EMPTY and s.image != wanted]
            if any(s.state != IDLE for s in others):
                return  # one image at a time: the other image's work finishes first
            for slot in slots:
                if slot.state == EMPTY or slot.image != wanted:
                    pool.run_worker(slot.index, wanted)
            return
        default = self.default
        if default is None or pool.failing(default):
            return
        for slot in slots:
            if slot.state == EMPTY:
                pool.run_worker(slot.index, default)
