"""Providers start blocks of managers: here (:class:`LocalProvider`) or through Parsl's.

``base`` holds the interface (Parsl's ``ExecutionProvider``), the job states
and the :class:`ProviderAdapter` through which the endpoint calls any
provider without blocking the reactor; ``local`` holds our own provider, whose
processes and their stopping are in ``ranks``.
"""

from __future__ import annotations

from funcx_endpoint.executor.providers.base import (
    TERMINAL_STATES,
    ExecutionProviderError,
    IAsyncProvider,
    IExecutionProvider,
    INonBlockingProvider,
    JobState,
    JobStatus,
    ProviderAdapter,
    SubmitError,
    parse_walltime,
    scheduler_message,
)
from funcx_endpoint.executor.providers.local import LocalProvider, provider_from_config

__all__ = [
    "TERMINAL_STATES",
    "ExecutionProviderError",
    "IAsyncProvider",
    "IExecutionProvider",
    "INonBlockingProvider",
    "JobState",
    "JobStatus",
    "LocalProvider",
    "ProviderAdapter",
    "SubmitError",
    "parse_walltime",
    "provider_from_config",
    "scheduler_message",
]
