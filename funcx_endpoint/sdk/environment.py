"""The SDK's side of the version check: what it announces, and the warning it gives once.

With each submit the client announces the Python and dill versions it
serializes with (:attr:`FuncXClient.user_runtime`, by default
:func:`~funcx_endpoint.wire.runtime.local_runtime`); the endpoint's workers
compare them with their own before loading a task
(:mod:`funcx_endpoint.wire.runtime`).  Every result comes back with the
environment of the worker that ran it (the task record's ``details``):
:class:`EnvironmentCheck` warns once, with :class:`EnvironmentMismatchWarning`,
when that differs from the client's (Python minor version or dill version).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Dict, Mapping, Optional

from funcx_endpoint.wire.runtime import describe_runtime, runtime_difference

__all__ = ["EnvironmentCheck", "EnvironmentMismatchWarning"]


class EnvironmentMismatchWarning(UserWarning):
    """The endpoint's workers run another Python or dill than this client."""


class EnvironmentCheck:
    """Compares the workers' environments in task records with the client's;
    warns the first time one differs (once per client)."""

    def __init__(self) -> None:
        self.warned: Optional[str] = None  # the warning given, if any
        self._lock = threading.Lock()

    def check(self, record: Mapping[str, Any], mine: Mapping[str, str]) -> None:
        """Look at a task record's ``details`` (the worker's environment)."""
        details = record.get("details")
        if self.warned is not None or not isinstance(details, dict):
            return
        theirs: Dict[str, str] = {
            key: str(value) for key, value in details.items() if isinstance(value, str)
        }
        if not any(runtime_difference(theirs, mine)):
            return
        with self._lock:
            if self.warned is not None:
                return
            where = ", ".join(f"{key} {theirs[key]}" for key in ("os", "host") if theirs.get(key))
            self.warned = (
                f"The endpoint's worker that ran task {record.get('task_id')} runs "
                f"{describe_runtime(theirs)}{f' ({where})' if where else ''}, and this client "
                f"{describe_runtime(mine)}: functions and results serialized on one side "
                f"may not load on the other"
            )
        warnings.warn(self.warned, EnvironmentMismatchWarning, stacklevel=3)
