"""A provider this version accepts in ``config.py`` but cannot run: it refuses to start.

An endpoint whose executor names such a provider (funcX 1.0's
``KubernetesProvider`` without the ``kubernetes`` client installed) loads its
configuration and builds its service as usual, then fails to start with
:class:`~funcx_endpoint.lifecycle.StartupError` and the given message (exit
code ``EX_CONFIG``), before any block is submitted.
"""

from __future__ import annotations

from typing import Any, List, Sequence

from twisted.application.service import IService, Service
from zope.interface import implementer

from funcx_endpoint.executor.providers.base import ExecutionProviderError, INonBlockingProvider
from funcx_endpoint.lifecycle import EX_CONFIG, StartupError


@implementer(INonBlockingProvider, IService)
class UnavailableProvider(Service):
    """Stands for a configured provider that cannot run; ``startService`` raises ``why``."""

    init_blocks = 0
    min_blocks = 0
    max_blocks = 0
    nodes_per_block = 1
    parallelism = 1.0
    status_polling_interval = 5.0

    def __init__(self, label: str, why: str) -> None:
        self.label = label
        self.why = why
        self.resources: dict = {}

    def startService(self) -> None:
        raise StartupError(self.why, EX_CONFIG)

    def submit(self, command: str, tasks_per_node: int, job_name: str = "funcx") -> Any:
        raise ExecutionProviderError(self.why)

    def status(self, job_ids: Sequence[Any]) -> List[Any]:
        raise ExecutionProviderError(self.why)

    def cancel(self, job_ids: Sequence[Any]) -> List[bool]:
        raise ExecutionProviderError(self.why)
