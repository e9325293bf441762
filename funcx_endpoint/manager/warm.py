"""Soft routing's manager: workers of several images, a bounded number warm.

:class:`WarmPlacement` is the placement policy (:class:`~funcx_endpoint.
manager.images.IWorkerPlacement`) of a manager that serves tasks of any
container type (``scheduler_mode="soft"``): its worker slots start empty, and
a slot starts a worker (a container) of an image when a task of that image
waits.  A worker that finishes stays warm for the next task of its image.
The number of warm workers is bounded per image (``per_type``) and in all
(``total``, at most the slots).  When tasks of an image wait and no slot is
free, the idle worker used least recently (of an image no task waits for) is
retired to make room, but only for an image that has no worker at all: an
image with workers waits for them rather than cost another image its warm
container.  Busy workers are never interrupted.

The interchange hears which images are warm (``WarmContainers``,
:class:`WarmReport`) and prefers this manager for their tasks.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Set, Tuple

import attr
from zope.interface import implementer

from funcx_endpoint.manager.containers import RAW, WorkerImage
from funcx_endpoint.manager.images import EMPTY, IDLE, IImagePool, IWorkerPlacement, count_images

__all__ = ["WarmPlacement", "WarmReport"]


@implementer(IWorkerPlacement)
@attr.s(auto_attribs=True)
class WarmPlacement:
    """Workers of any image on demand; warm ones kept, least recently used retired.

    ``per_type``: at most this many workers of one image (None: no limit but
    the slots); ``total``: at most this many workers in all (None: the slots).
    """

    per_type: Optional[int] = None
    total: Optional[int] = None

    def rebalance(self, pool: IImagePool) -> None:
        waiting = pool.waiting()
        if not waiting:
            return
        slots = pool.slots()
        per_type = self.per_type or len(slots)
        total_limit = min(self.total or len(slots), len(slots))
        have = count_images(slots)
        running = sum(have.values())
        empty = [slot for slot in slots if slot.state == EMPTY]
        # Idle workers no waiting task wants, least recently used first.
        spare = sorted(
            (slot for slot in slots if slot.state == IDLE and slot.image not in waiting),
            key=lambda slot: slot.since,
        )
        oldest = pool.oldest_waiting()
        for image in sorted(waiting, key=lambda i: (i != oldest, -waiting[i])):
            if pool.failing(image):
                continue
            want = min(waiting[image], per_type - have.get(image, 0))
            while want > 0:
                if empty and running < total_limit:
                    slot = empty.pop(0)
                    running += 1
                elif spare and not have.get(image):
                    slot = spare.pop(0)
                    assert slot.image is not None
                    have[slot.image] -= 1
                else:
                    break
                pool.run_worker(slot.index, image)
                have[image] = have.get(image, 0) + 1
                want -= 1


@attr.s(auto_attribs=True)
class WarmReport:
    """What a manager tells the interchange (``WarmContainers``): its workers per
    container type (the interchange's queue key: a container id, or ``RAW``),
    and its cold starts; :meth:`update` says whether it changed since it was
    last sent."""

    #: The container types each image served (tasks of several containers may
    #: share an image).
    types: Dict[WorkerImage, Set[str]] = attr.Factory(dict)
    _sent: Optional[Tuple[Dict[str, int], int]] = None

    def served(self, image: WorkerImage, container_type: Optional[str]) -> None:
        """A task of ``container_type`` (None: no container) runs in ``image``."""
        self.types.setdefault(image, set()).add(container_type or "RAW")

    def warm(self, images: Dict[WorkerImage, int]) -> Dict[str, int]:
        """Warm workers per container type, given the workers per image."""
        warm: Dict[str, int] = {}
        for image, count in images.items():
            for container_type in self.types.get(image) or _default_types(image):
                warm[container_type] = warm.get(container_type, 0) + count
        return warm

    def update(
        self, images: Dict[WorkerImage, int], cold_starts: int
    ) -> Optional[Tuple[Dict[str, int], int]]:
        """The ``(warm, cold_starts)`` to send, or None if the same was sent last."""
        report = (self.warm(images), cold_starts)
        if report == self._sent:
            return None
        self._sent = report
        return report


def _default_types(image: WorkerImage) -> Iterable[str]:
    return ["RAW"] if image == RAW else []
