"""Helpers shared by this project's tests (not part of the package API)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import psutil

import funcx_endpoint

if TYPE_CHECKING:
    from funcx_endpoint.endpoint.layout import EndpointDir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(funcx_endpoint.__file__)))


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for child processes: this checkout importable."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    parts = [REPO_ROOT] + [os.path.abspath(p) for p in path.split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("FUNCX_ENDPOINT_CONFIG_DIR", None)
    if extra:
        env.update(extra)
    return env


def run_cli(
    config_dir: str,
    *args: str,
    timeout: float = 120,
    env: Optional[Dict[str, str]] = None,
    input: Optional[str] = None,
) -> subprocess.CompletedProcess:
    """Run ``funcx-endpoint -c config_dir ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "funcx_endpoint.cli", "-c", config_dir, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        input=input,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def endpoint_processes(ep: EndpointDir, pid: Optional[int] = None) -> List[psutil.Process]:
    """The daemon ``pid``, its descendants, and every process that carries the
    endpoint's marker (managers and workers in their blocks' own sessions, and
    whatever they started), wherever they are now."""
    from funcx_endpoint.endpoint.layout import OWNER_ENV
    from funcx_endpoint.procs import marked_processes

    procs: Dict[int, psutil.Process] = {}
    if pid is not None and pid > 0:
        try:
            root = psutil.Process(pid)
            procs[pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    for proc in marked_processes(OWNER_ENV, ep.path):
        procs.setdefault(proc.pid, proc)
    return list(procs.values())


def alive(procs: List[psutil.Process]) -> List[psutil.Process]:
    """Those of ``procs`` still running (zombies count as gone)."""
    result = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                result.append(proc)
        except psutil.NoSuchProcess:
            pass
    return result
