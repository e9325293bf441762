"""Processes: liveness, pidfiles, and finding processes by a marker.

Shared by ``funcx-endpoint`` (its daemon's files, see
:mod:`funcx_endpoint.endpoint.layout`) and ``funcx-service``.

Markers: a process started by the endpoint daemon (managers, workers, and whatever a
task starts) inherits ``FUNCX_ENDPOINT_DIR``; the RabbitMQ nodes of the test
harness and of ``funcx-service`` carry a marker of their own.  A marker
survives re-parenting to init and a new session, so it finds the leftovers of
a daemon killed with ``kill -9`` -- and only those: a process that merely
shares a (reused) session id is never taken for ours.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any, Dict, Iterable, List, Optional

import psutil

from funcx_endpoint.files import write_atomically

__all__ = [
    "command_line_has",
    "marked_processes",
    "pid_alive",
    "processes",
    "read_daemon_info",
    "read_daemon_session",
    "this_host",
    "read_pidfile",
    "write_daemon_info",
]


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (and is not a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return False
        if e.errno != errno.EPERM:
            raise
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 3 (after the parenthesised command) is the state.
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def command_line_has(pid: int, *words: bytes) -> bool:
    """True if ``pid`` is alive and its command line contains one of ``words``
    (a guard against a reused pid)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(word in cmdline for word in words)


def processes(pids: Iterable[int]) -> List[psutil.Process]:
    """psutil handles of those of ``pids`` that exist."""
    result = []
    for pid in pids:
        try:
            result.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return result


def read_pidfile(path: str) -> Optional[int]:
    """The pid in ``path``; None if there is no pidfile, -1 if it is garbled (stale)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return -1
    try:
        return int(text)
    except ValueError:
        return -1


def this_host() -> str:
    """The name of the machine this runs on (as ``daemon.json`` records it)."""
    return socket.gethostname()


def write_daemon_info(path: str, pid: int, session: Optional[int]) -> None:
    """Record a daemon's pid, the session it owns (None: not its own) and the
    host it runs on, 0600."""
    info = {"pid": pid, "session": session, "host": this_host()}
    write_atomically(path, json.dumps(info).encode())


def read_daemon_info(path: str, pid: int) -> Dict[str, Any]:
    """What daemon ``pid`` recorded in ``path`` (empty if it is another's, or none)."""
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict) or info.get("pid") != pid:
        return {}
    return info


def read_daemon_session(path: str, pid: int) -> Optional[int]:
    """The session daemon ``pid`` recorded in ``path`` as its own, if any."""
    session = read_daemon_info(path, pid).get("session")
    return session if isinstance(session, int) and session > 0 else None


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
