"""funcX 1.0 import path of ``Config``: a ``config.py`` written for funcX 1.0 reads::

    from funcx_endpoint.endpoint.utils.config import Config

This module only re-exports :class:`funcx_endpoint.config.Config`.
"""

from funcx_endpoint.config.model import Config

__all__ = ["Config"]
