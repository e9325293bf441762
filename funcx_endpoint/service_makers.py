"""The twistd ServiceMakers of ``funcx-endpoint`` and ``funcx-service``.

Defined once, here: ``twisted/plugins/funcx_plugins.py`` re-exports them for
twistd's plugin scan, and :mod:`funcx_endpoint.twistd` (the runner the CLIs
start) uses them directly.  This module stays cheap to import: the modules the
makers name are imported only when one is used.
"""

from __future__ import annotations

from twisted.application.service import ServiceMaker

funcx_endpoint = ServiceMaker(
    "funcX endpoint", "funcx_endpoint.endpoint.tap", "Run a funcX endpoint.", "funcx-endpoint"
)

funcx_service = ServiceMaker(
    "funcX web service",
    "funcx_endpoint.webservice.tap",
    "Run a private funcX web service.",
    "funcx-service",
)

SERVICE_MAKERS = (funcx_endpoint, funcx_service)
