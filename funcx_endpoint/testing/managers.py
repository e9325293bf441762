"""Start real ``funcx-manager`` processes from tests and benchmarks.

:func:`spawn_manager` runs ``python -m funcx_endpoint.manager`` with
``reactor.spawnProcess`` against an interchange's info file, with this
checkout importable, and returns a :class:`ManagerProcess` that collects the
child's output and tells when it ended::

    manager = spawn_manager(reactor, interchange.info_file, "block-0",
                            log_dir=tmp, worker_count=1)
    ...
    manager.terminate()
    status = await manager.when_ended()
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

import funcx_endpoint
from funcx_endpoint.observer import fire_all

__all__ = ["ManagerProcess", "package_environment", "spawn_manager"]

_OUTPUT_LIMIT = 1024 * 1024


def package_environment(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment with this package importable (PYTHONPATH)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(funcx_endpoint.__file__)))
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if extra:
        env.update(extra)
    return env


class ManagerProcess(ProcessProtocol):
    """A manager child process: its pid, output, and end."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.output = bytearray()
        self.pid: Optional[int] = None
        self.exit_code: Optional[int] = None
        self.exit_signal: Optional[int] = None
        self.ended = False
        self._waiters: List[Deferred[Optional[int]]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        transport: Any = self.transport
        self.pid = transport.pid
        transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if len(self.output) < _OUTPUT_LIMIT:
            self.output += data

    def processEnded(self, reason: Failure) -> None:
        value: Any = reason.value
        self.exit_code = getattr(value, "exitCode", None)
        self.exit_signal = getattr(value, "signal", None)
        self.ended = True
        fire_all(self._waiters, self.exit_code)

    def when_ended(self) -> Deferred[Optional[int]]:
        """A new Deferred firing with the exit code (None if killed by a signal)."""
        waiter: Deferred[Optional[int]] = Deferred()
        if self.ended:
            waiter.callback(self.exit_code)
        else:
            self._waiters.append(waiter)
        return waiter

    def signal(self, name: str) -> None:
        """Send ``name`` (``"TERM"``, ``"KILL"``...) unless it has ended."""
        if self.transport is not None and not self.ended:
            transport: Any = self.transport
            try:
                transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def terminate(self) -> None:
        """SIGTERM: the manager stops its workers and exits."""
        self.signal("TERM")

    def kill(self) -> None:
        """SIGKILL: the manager dies at once (its workers follow, by PDEATHSIG)."""
        if self.pid is not None and not self.ended:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def spawn_manager(
    reactor: Any,
    info_file: str,
    block_id: str = "0",
    *,
    manager_id: Optional[str] = None,
    log_dir: Optional[str] = None,
    worker_count: Optional[int] = None,
    extra_args: Sequence[str] = (),
    env: Optional[Dict[str, str]] = None,
    python: str = sys.executable,
) -> ManagerProcess:
    """Start a manager for the interchange whose info file is ``info_file``."""
    args = [python, "-m", "funcx_endpoint.manager", "--info-file", info_file]
    args += ["--block-id", block_id]
    if manager_id is not None:
        args += ["--manager-id", manager_id]
    if log_dir is not None:
        args += ["--log-dir", log_dir]
    if worker_count is not None:
        args += ["--worker-count", str(worker_count)]
    args += list(extra_args)
    process = ManagerProcess(args)
    reactor.spawnProcess(
        process,
        python,
        args,
        env=package_environment(env),
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    return process
