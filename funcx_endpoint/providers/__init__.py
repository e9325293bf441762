"""funcX 1.0 import path of its own provider::

    from funcx_endpoint.providers import KubernetesProvider

This package only re-exports :class:`funcx_endpoint.config.kubernetes.KubernetesProvider`.
The providers the endpoint runs are in :mod:`funcx_endpoint.executor.providers`;
Parsl's (``parsl.providers``) come from Parsl, the ``[parsl]`` extra.
"""

from funcx_endpoint.config.kubernetes import KubernetesProvider

__all__ = ["KubernetesProvider"]
