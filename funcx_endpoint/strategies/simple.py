"""funcX 1.0 import path of ``SimpleStrategy`` (its defining module there); a re-export."""

from funcx_endpoint.config.model import SimpleStrategy

__all__ = ["SimpleStrategy"]
