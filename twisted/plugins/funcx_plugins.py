# twistd plugins funcx-endpoint and funcx-service, defined in a module that stays
# cheap to import (the modules they name are imported only when used).
from funcx_endpoint.service_makers import funcx_endpoint, funcx_service  # noqa: F401
