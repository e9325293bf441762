"""funcX 1.0 import path of ``KubernetesProvider`` (its defining module there)::

    from funcx_endpoint.providers.kubernetes.kube import KubernetesProvider

This module only re-exports :class:`funcx_endpoint.config.kubernetes.KubernetesProvider`.
"""

from funcx_endpoint.config.kubernetes import KubernetesProvider

__all__ = ["KubernetesProvider"]
