"""Finding processes by a marker in their environment.

A process started by the endpoint daemon (managers, workers, and whatever a
task starts) inherits ``FUNCX_ENDPOINT_DIR``; the RabbitMQ nodes of the test
harness and of ``funcx-service`` carry a marker of their own.  A marker
survives re-parenting to init and a new session, so it finds the leftovers of
a daemon killed with ``kill -9`` -- and only those: a process that merely
shares a (reused) session id is never taken for ours.
"""

from __future__ import annotations

import os
from typing import List

import psutil

__all__ = ["marked_processes"]


def marked_processes(name: str, value: str) -> List[psutil.Process]:
    """Live (non-zombie) processes started with ``name=value`` in their environment.

    This process and its ancestors are left out: a command run from inside a
    marked process must not find itself.  ``/proc/PID/environ`` holds the
    environment a process was started with, and is only readable for
    processes of this user (all of them for root).
    """
    needle = f"{name}={value}".encode()
    skip = {os.getpid()}
    try:
        skip.update(p.pid for p in psutil.Process().parents())
    except psutil.Error:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            proc = psutil.Process(int(entry))
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found
