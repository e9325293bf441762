"""Which routing policy an executor's configuration asks for.

:func:`scheduler_mode` reads ``worker_mode``, ``container_uri`` and
``scheduler_mode`` of a
:class:`~funcx_endpoint.config.model.HighThroughputExecutor`;
:func:`routing_for` builds the policy (:mod:`funcx_endpoint.executor.routing`,
:mod:`funcx_endpoint.executor.soft_routing`) the interchange's dispatcher
asks where tasks go.  :mod:`funcx_endpoint.executor.interchange` re-exports
these names.
"""

from __future__ import annotations

from typing import Any, Optional

from funcx_endpoint.executor.interface import IRoutingPolicy
from funcx_endpoint.executor.routing import LeastLoadedRouting
from funcx_endpoint.executor.soft_routing import WarmFirstRouting

__all__ = ["hard_routing", "routing_for", "scheduler_mode"]


def scheduler_mode(executor: Any) -> str:
    """How tasks are routed by type: ``raw`` (no containers, or one image for
    every worker: every task is ``RAW``), ``hard`` or ``soft``."""
    if executor.worker_mode == "no_container" or getattr(executor, "container_uri", None):
        return "raw"
    return "soft" if executor.scheduler_mode == "soft" else "hard"


def hard_routing(executor: Any) -> bool:
    """Whether managers serve one container type each, started in blocks per type."""
    return scheduler_mode(executor) == "hard"


def _kubernetes(provider: Any) -> bool:
    return "Kubernetes" in type(provider).__name__


def routing_for(executor: Any, clock: Any) -> IRoutingPolicy:
    """The routing policy of ``executor`` (see :func:`scheduler_mode`)."""
    mode = scheduler_mode(executor)
    if mode == "soft":
        interval = executor.cold_routing_interval
        return WarmFirstRouting(clock, cold_routing_interval=10.0 if interval is None else interval)
    if mode == "raw":
        return LeastLoadedRouting(containers=False)
    provider = executor.provider
    unservable = None
    if _kubernetes(provider):
        image = getattr(provider, "image", None) or "its image"

        def unservable(container_type: str) -> Optional[str]:
            return (
                f"the Kubernetes provider starts every manager in one image ({image}), so "
                f"no manager can run container {container_type}: hard routing by "
                f"container needs a provider that starts managers per container type"
            )

    return LeastLoadedRouting(containers=True, unservable=unservable)
