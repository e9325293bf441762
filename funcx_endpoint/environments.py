"""The funcX 1.0 environments: names for the public services' URLs.

funcX 1.0 let a user name an environment instead of a URL, in the SDK
(``FuncXClient(environment=...)``, ``FUNCX_SDK_ENVIRONMENT``) and in an
endpoint's ``Config(environment=...)``.  Both read the table here.
"""

from __future__ import annotations

from typing import Mapping

#: The public funcX web service.
DEFAULT_SERVICE_ADDRESS = "https://api2.funcx.org/v2"

#: The service URL of each funcX 1.0 environment name.
ENVIRONMENT_ADDRESSES: Mapping[str, str] = {
    "production": DEFAULT_SERVICE_ADDRESS,
    "dev": "https://api.dev.funcx.org/v2",
    "local": "http://localhost:5000/v2",
}
