"""funcX 1.0 import path of ``KubeSimpleStrategy`` (its defining module there); a re-export."""

from funcx_endpoint.config.kubernetes import KubeSimpleStrategy

__all__ = ["KubeSimpleStrategy"]
