"""The spool of results the broker has not confirmed: ``unacked_results/``.

One file per task, named by its task id, holding the packed result message.
A file is written (temp file, fsync, rename, then fsync of the directory)
before the task's delivery is acknowledged, so a result survives the
endpoint, the broker or the machine going down; it is removed once the
broker confirms a later publish of it.  All disk work runs in a thread: fsync
takes milliseconds and the reactor must not wait for it.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable, Dict, Iterable, List, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

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
        return self._in_thread(self._write_many, batch)

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
        """Forget results the broker has confirmed."""
        batch = list(task_ids)
        self.count = max(0, self.count - len(batch))
        return self._in_thread(self._remove_many, batch)

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

        return self._in_thread(self._load_all).addCallback(loaded)
