"""Which environment variables are credentials, kept from managers and workers.

The daemon needs the owner's client secret (to get tokens) and the web
service its database and broker passwords; a task never does, and any
function could read them from ``os.environ``.  The daemon takes them out of
its own environment before anything is started (:func:`take_credentials`),
and the provider and the manager drop them again from what they pass on
(:func:`without_credentials`), for a manager started by other means (a batch
job whose shell profile sets them).  Variables set on purpose in
``worker_environment`` are not touched.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, MutableMapping

__all__ = ["CREDENTIAL_VARIABLES", "is_credential", "take_credentials", "without_credentials"]

#: Always credentials (the client id too: it names the owner's account, and with
#: it alone an SDK in a task fails asking for the secret).
CREDENTIAL_VARIABLES = frozenset(
    {
        "FUNCX_SDK_CLIENT_ID",
        "FUNCX_SDK_CLIENT_SECRET",
        "GLOBUS_COMPUTE_CLIENT_ID",
        "GLOBUS_COMPUTE_CLIENT_SECRET",
    }
)
_PREFIXES = ("FUNCX_", "GLOBUS_")
_MARKERS = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|API_KEY")
# scheme://user:password@host: a URL with a password in it.
_URL_WITH_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")


def is_credential(name: str, value: str = "") -> bool:
    """Whether the variable ``name`` (with ``value``) carries a credential of the
    endpoint or the service: a name of :data:`CREDENTIAL_VARIABLES`; a
    ``FUNCX_*``/``GLOBUS_*`` name with SECRET, TOKEN, PASSWORD ... in it; or a
    ``FUNCX_*``/``GLOBUS_*`` URL with a password (the service's database and
    broker URLs)."""
    upper = name.upper()
    if upper in CREDENTIAL_VARIABLES:
        return True
    if not upper.startswith(_PREFIXES):
        return False
    return bool(_MARKERS.search(upper) or _URL_WITH_PASSWORD.match(value))


def without_credentials(environ: Mapping[str, str]) -> Dict[str, str]:
    """A copy of ``environ`` without its credentials (see :func:`is_credential`)."""
    return {name: value for name, value in environ.items() if not is_credential(name, value)}


def take_credentials(environ: MutableMapping[str, str]) -> Dict[str, str]:
    """Remove the credentials from ``environ`` (the daemon's ``os.environ``, so that
    nothing it starts inherits them); return them, for the parts that need them."""
    taken = {name: value for name, value in environ.items() if is_credential(name, value)}
    for name in taken:
        del environ[name]
    return taken
