"""funcX 1.0 import path of the scaling strategies::

    from funcx_endpoint.strategies import SimpleStrategy, KubeSimpleStrategy

This package only re-exports :class:`funcx_endpoint.config.SimpleStrategy` and
:class:`funcx_endpoint.config.kubernetes.KubeSimpleStrategy`.
"""

from funcx_endpoint.config.kubernetes import KubeSimpleStrategy
from funcx_endpoint.config.model import SimpleStrategy

__all__ = ["KubeSimpleStrategy", "SimpleStrategy"]
