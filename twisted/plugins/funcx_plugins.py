# twistd plugins of funcx-endpoint; kept to one statement each so that twistd's
# plugin scan stays cheap: the modules they name are imported only when used.
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
