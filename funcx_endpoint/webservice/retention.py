"""Retention: finished tasks and their results do not stay forever.

A finished task (success or failure) is deleted, result and all,
``task_retention`` seconds after it finished.  funcX's service deleted a
result as soon as a client had fetched it (``GET /tasks/<id>``,
``POST /batch_status``); here a fetched result is deleted
``fetched_retention`` seconds after its first fetch (0: at the next purge),
so a client that retries a fetch, or asks for the status then the result,
still finds it.  ``DELETE /v2/tasks/<id>`` deletes a finished task at once.

:class:`RetentionPurger` deletes expired tasks every ``interval`` seconds of
its clock, in batches (a short transaction each).  A task whose result copy
to its task group's result queue is still pending is kept until it is sent.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from funcx_endpoint.lifecycle import PeriodicService
from funcx_endpoint.webservice.db import Tx, chunks, marks
from funcx_endpoint.webservice.records import DONE_SQL
from funcx_endpoint.webservice.storage import Storage

__all__ = ["RetentionPurger", "delete_finished_task", "mark_fetched", "purge_tasks"]

#: Tasks deleted per transaction.
PURGE_BATCH = 2000


def mark_fetched(tx: Tx, task_ids: Sequence[str], now: float) -> int:
    """Stamp the first fetch of those of ``task_ids`` that are finished; how many."""
    changed = 0
    for chunk in chunks(list(task_ids)):
        changed += tx.execute(
            f"UPDATE tasks SET fetched = ? WHERE task_id IN ({marks(len(chunk))}) "
            f"AND fetched IS NULL AND status IN {DONE_SQL}",
            [now, *chunk],
        ).rowcount
    return changed


def delete_finished_task(tx: Tx, task_id: str, owner: str) -> Optional[bool]:
    """Delete ``owner``'s task ``task_id`` if it is finished: True; False if it is
    not finished; None if there is no such task of ``owner``."""
    row = tx.execute(
        "SELECT status FROM tasks WHERE task_id = ? AND owner = ?", (task_id, owner)
    ).fetchone()
    if row is None:
        return None
    return tx.changes(
        f"DELETE FROM tasks WHERE task_id = ? AND owner = ? AND status IN {DONE_SQL}",
        (task_id, owner),
    )


def purge_tasks(tx: Tx, finished_before: float, fetched_before: float, limit: int) -> int:
    """Delete up to ``limit`` finished tasks that finished before ``finished_before``
    or were first fetched before ``fetched_before`` (none with a result copy pending)."""
    return int(
        tx.execute(
            "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks WHERE "
            "(finished < ? OR fetched < ?) AND ws_pending = 0 "
            f"AND status IN {DONE_SQL} LIMIT ?)",
            (finished_before, fetched_before, limit),
        ).rowcount
        or 0
    )


@attr.s(auto_attribs=True, eq=False)
class RetentionPurger(PeriodicService):
    """Deletes expired tasks every ``interval`` seconds of ``clock``; see the module."""

    log = Logger()
    name = "task-retention"

    _storage: Storage
    _clock: IReactorTime
    task_retention: float
    fetched_retention: float
    interval: float = 60.0
    #: Tasks deleted so far.
    purged: int = attr.ib(default=0, init=False)

    def check(self) -> Deferred[int]:
        """The periodic call: one :meth:`purge`."""
        return self.purge()

    def purge(self) -> Deferred[int]:
        """Purge once (batch after batch); fires with how many tasks were deleted
        (what was deleted before a failure, which is logged)."""
        return Deferred.fromCoroutine(self._purge())

    async def _purge(self) -> int:
        now = self._clock.seconds()
        total = 0
        try:
            while True:
                deleted = await self._storage.run(
                    purge_tasks,
                    now - self.task_retention,
                    now - self.fetched_retention,
                    PURGE_BATCH,
                )
                total += deleted
                if deleted < PURGE_BATCH:
                    break
        except Exception:
            self.log.failure(
                "Deleting expired tasks failed (tried again in {s:g} s)", s=self.interval
            )
        if total:
            self.log.info("Deleted {n} expired tasks and their results", n=total)
        self.purged += total
        return total
