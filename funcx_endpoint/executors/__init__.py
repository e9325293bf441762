"""funcX 1.0 import path of ``HighThroughputExecutor``::

    from funcx_endpoint.executors import HighThroughputExecutor

This package only re-exports :class:`funcx_endpoint.config.HighThroughputExecutor`
(the executor that runs is in :mod:`funcx_endpoint.executor`).
"""

from funcx_endpoint.config.model import HighThroughputExecutor

__all__ = ["HighThroughputExecutor"]
