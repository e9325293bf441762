"""The spool of results the broker has not confirmed: ``unacked_results/``.

One file per task, named by its task id, holding the packed result message.
A file is written (temp file, fsync, rename, then fsync of the directory)
before the task's delivery is acknowledged, so a result survives the
endpoint, the broker or the machine going down; it is removed once the
broker confirms a later publish of it.  All disk work runs in a thread: fsync
takes milliseconds and the reactor must not wait for it.

Operations on the same task id run one after the other, in the order they
were called (a remove called after a write waits for the write, or it could
finish first and leave an orphan file, sent again after a restart); those on
different task ids may run at the same time.  ``load`` waits for everything
called before it, and everything called after it waits for ``load``.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

Blocking = Callable[..., Deferred]


def _valid_name(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


class ResultSpool:
    """Durable storage of unconfirmed results, one file per task."""

    log = Logger()

    def __init__(self, directory: str, run_in_thread: Blocking) -> None:
        """``run_in_thread(f, *args)`` runs ``f`` off the reactor thread
        (``deferToThread`` in the daemon)."""
        self.directory = directory
        self._in_thread = run_in_thread
        self.count = 0  # files in the spool, as far as we know
        # Fires (with None) when the last operation called on a task id ends.
        self._last: Dict[str, Deferred[None]] = {}
        # The same for the last load (which concerns every task id).
        self._last_load: Optional[Deferred[None]] = None

    def _in_order(
        self, task_ids: List[str], f: Callable[..., Any], *args: Any, everything: bool = False
    ) -> Deferred[Any]:
        """``run_in_thread(f, *args)`` once the operations called before on
        ``task_ids`` (all of them if ``everything``), and the last load, ended."""
        before: List[Deferred[None]] = []
        if everything:
            before.extend(self._last.values())
        else:
            before.extend(self._last[t] for t in task_ids if t in self._last)
        if self._last_load is not None:
            before.append(self._last_load)
        waits = [_after(d) for d in {id(d): d for d in before}.values()]
        done: Deferred[None] = Deferred()
        if everything:
            self._last_load = done
        for task_id in task_ids:
            self._last[task_id] = done

        def finished(result: Any) -> Any:
            if self._last_load is done:
                self._last_load = None
            for task_id in task_ids:
                if self._last.get(task_id) is done:
                    del self._last[task_id]
            done.callback(None)
            return result

        start = gatherResults(waits) if waits else succeed(None)
        return start.addCallback(lambda _: self._in_thread(f, *args)).addBoth(finished)

    def _ensure_dir(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def _write_many(self, items: List[Tuple[str, bytes]]) -> int:
        self._ensure_dir()
        written = 0
        for task_id, data in items:
            final = os.path.join(self.directory, task_id)
            temp = os.path.join(self.directory, f".{task_id}.tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
            written += 1
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return written

    def write(self, items: Iterable[Tuple[str, bytes]], replacing: bool = False) -> Deferred:
        """Write ``(task_id, packed result)`` pairs durably; fires when fsynced.

        ``replacing``: the files exist already and are overwritten (atomically).
        """
        batch = list(items)
        if not replacing:
            self.count += len(batch)
        return self._in_order([task_id for task_id, _ in batch], self._write_many, batch)

    def _remove_many(self, task_ids: List[str]) -> int:
        removed = 0
        for task_id in task_ids:
            try:
                os.unlink(os.path.join(self.directory, task_id))
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def remove(self, task_ids: Iterable[str]) -> Deferred:
        """Forget results the broker has confirmed.

        Fires with the number of files removed; never fails: an error is
        logged here (and the files are sent again after a restart).
        """
        batch = list(task_ids)
        self.count = max(0, self.count - len(batch))

        def failed(failure: Failure) -> int:
            self.log.failure(
                "Could not remove confirmed results {task_ids} from the spool",
                failure,
                task_ids=batch,
            )
            return 0

        return self._in_order(batch, self._remove_many, batch).addErrback(failed)

    def _load_all(self) -> Dict[str, bytes]:
        self._ensure_dir()
        found: Dict[str, bytes] = {}
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(path)  # a write that never finished: its task was not acked
                continue
            if not _valid_name(name):
                continue
            with open(path, "rb") as f:
                found[name] = f.read()
        return found

    def load(self) -> Deferred:
        """Fires with ``{task_id: packed result}`` of everything spooled."""

        def loaded(found: Dict[str, bytes]) -> Dict[str, bytes]:
            self.count = len(found)
            return found

        return self._in_order([], self._load_all, everything=True).addCallback(loaded)


def _after(d: Deferred[None]) -> Deferred[None]:
    """A new Deferred that fires (with None) when ``d``, which never fails, fires."""
    fresh: Deferred[None] = Deferred()
    d.addCallback(lambda _: fresh.callback(None))
    return fresh
