"""Pure helpers for the manager's worker processes: how many, their environment, how they ended.

Used by :class:`~funcx_endpoint.manager.pool.WorkerPool` and the manager's
command line; nothing here keeps state or touches the reactor.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any, Dict, List, Mapping, Optional

from twisted.python.failure import Failure

from funcx_endpoint.wire.environment import without_credentials
from funcx_endpoint.wire.info import MAX_WORKERS_PER_NODE, ManagerSettings

__all__ = [
    "ACCELERATOR_VARIABLES",
    "count_workers",
    "describe_exit",
    "read_tail",
    "worker_environment",
]

#: Environment variables that pin a worker to one accelerator.
ACCELERATOR_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
#: Bytes of a dead worker's stderr read for the WorkerLost message.
STDERR_TAIL_BYTES = 4096
STDERR_TAIL_LINES = 15


def count_workers(
    settings: ManagerSettings, cpu_count: int, memory_gb: Optional[float] = None
) -> int:
    """How many workers a node runs.

    One per accelerator when there are accelerators; else as many as the
    cores allow (``cpu_count / cores_per_worker``) and, with
    ``mem_per_worker``, the memory too; never more than
    ``max_workers_per_node`` nor ``MAX_WORKERS_PER_NODE``, never fewer than one.
    """
    limits: List[float] = []
    if settings.max_workers_per_node is not None:
        limits.append(settings.max_workers_per_node)
    if settings.available_accelerators:
        limits.append(len(settings.available_accelerators))
    else:
        limits.append(cpu_count / settings.cores_per_worker)
        if settings.mem_per_worker and memory_gb is not None:
            limits.append(memory_gb / settings.mem_per_worker)
    return max(1, min(MAX_WORKERS_PER_NODE, math.floor(min(limits))))


def worker_environment(
    base: Mapping[str, str],
    settings: ManagerSettings,
    index: int,
) -> Dict[str, str]:
    """The environment of worker ``index``: ``base`` without credentials (see
    :mod:`funcx_endpoint.wire.environment`), the configured variables, its device."""
    env = without_credentials(base)
    env.update(settings.worker_environment)
    env["FUNCX_WORKER_ID"] = str(index)
    env["PYTHONUNBUFFERED"] = "1"
    accelerators = settings.available_accelerators
    if accelerators:
        device = accelerators[index % len(accelerators)]
        for name in ACCELERATOR_VARIABLES:
            env[name] = device
    return env


def describe_exit(reason: Failure) -> str:
    """How a process ended, for people: exit code or signal name."""
    value: Any = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"it was killed by {name} ({sig})"
    code = getattr(value, "exitCode", None)
    if code is None:
        return f"it ended ({reason.getErrorMessage()})"
    return f"it exited with code {code}"


def read_tail(path: str, offset: int, limit: int = STDERR_TAIL_BYTES) -> str:
    """The last lines written to ``path`` after ``offset`` (at most ``limit`` bytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            start = max(offset, end - limit)
            f.seek(start)
            data = f.read(end - start)
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    if start > offset and lines:
        lines = lines[1:]  # the first line is probably cut
    return "\n".join(lines[-STDERR_TAIL_LINES:])
