"""A registry of things test processes start (RabbitMQ nodes, Slurm clusters) that
must not outlive them: one JSON file per thing, naming its owner process.

A later run reads the registry and cleans up after owners that died without
doing so themselves (a killed test run).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Tuple

import psutil

from funcx_endpoint import tls


def registry_dir(kind: str) -> str:
    """This user's registry directory for things of ``kind`` ("rabbitmq", "slurm")."""
    return os.path.join(tempfile.gettempdir(), f"funcx-test-{kind}-{os.getuid()}")


def progress(kind: str, message: str) -> None:
    """Say ``message`` on stderr at once: a test run that pauses while a broker or
    a cluster starts (or is reaped) should say why."""
    try:
        sys.stderr.write(f"[funcx {kind}] {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class OwnerRegistry:
    """The registry directory ``path``: one ``<key>.json`` file per entry."""

    def __init__(self, path: str) -> None:
        self.path = path

    def entry_path(self, key: str) -> str:
        return os.path.join(self.path, f"{key}.json")

    def register(self, key: str, fields: Dict[str, Any]) -> None:
        """Record ``fields`` under ``key``, owned by this process."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        me = psutil.Process()
        entry = {"owner_pid": me.pid, "owner_create_time": me.create_time(), **fields}
        tls.write_private_file(self.entry_path(key), json.dumps(entry).encode())

    def unregister(self, key: str) -> None:
        remove_entry(self.entry_path(key))

    def entries(self) -> List[Tuple[str, Dict[str, Any]]]:
        """Every readable entry, as (its file, its fields), in file name order."""
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.path, name)
            try:
                with open(path) as f:
                    entries.append((path, json.load(f)))
            except (OSError, ValueError):
                continue
        return entries

    def orphans(self) -> Iterator[Tuple[str, Dict[str, Any]]]:
        """The entries whose owner process is gone (the caller cleans up, then
        :func:`remove_entry`)."""
        for path, entry in self.entries():
            if not owner_alive(entry):
                yield path, entry


def owner_alive(entry: Dict[str, Any]) -> bool:
    """Whether the entry's owner process still runs (the same process: its start
    time matches, so a reused pid does not count)."""
    pid, create_time = entry.get("owner_pid"), entry.get("owner_create_time")
    if not isinstance(pid, int):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if not isinstance(create_time, (int, float)):
            return True
        return abs(proc.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def remove_entry(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
