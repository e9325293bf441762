"""funcX 1.0 import path of ``HighThroughputExecutor`` (its defining module there).

This module only re-exports :class:`funcx_endpoint.config.HighThroughputExecutor`.
"""

from funcx_endpoint.config.model import HighThroughputExecutor

__all__ = ["HighThroughputExecutor"]
