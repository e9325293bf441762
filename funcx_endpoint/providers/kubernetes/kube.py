"""funcX 1.0 import path of ``KubernetesProvider`` (its defining module there)::

    from funcx_endpoint.providers.kubernetes.kube import KubernetesProvider

This module only re-exports :class:`funcx_endpoint.config.kubernetes.KubernetesProvider`.
``KubeSimpleProvider`` is the same class under the name some funcX material
(and the ``KubeSimpleStrategy`` it pairs with) suggests; funcX 1.0.13 itself
defines only ``KubernetesProvider``.
"""

from funcx_endpoint.config.kubernetes import KubernetesProvider

KubeSimpleProvider = KubernetesProvider

__all__ = ["KubeSimpleProvider", "KubernetesProvider"]
