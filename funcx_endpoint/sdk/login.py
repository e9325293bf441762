"""Logging in to funcX with client credentials (no browser), and globus-sdk glue.

A funcX client logs in as a *client* (a confidential app): its id and secret
come from ``FUNCX_SDK_CLIENT_ID`` and ``FUNCX_SDK_CLIENT_SECRET`` (a private
service makes them with ``funcx-service create-client NAME``).  globus-sdk
trades them for an access token for the funcX scope at the auth service,
whose URL is globus-sdk's own setting ``GLOBUS_SDK_SERVICE_URL_AUTH`` (a
private funcX service answers ``/v2/oauth2/token`` at its root, so that
variable is its root URL).  The token lives in memory only; the authorizer
fetches a new one when it expires or when the service answers 401.

This module also hides the few differences between globus-sdk 3.x and 4.x
that the SDK meets (how a client's transport and retry checks are set up).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import globus_sdk
from globus_sdk.transport import RequestsTransport, RetryCheck

from funcx_endpoint.sdk.errors import LoginError

__all__ = [
    "CLIENT_ID_ENV",
    "CLIENT_SECRET_ENV",
    "DEFAULT_FUNCX_SCOPE",
    "FUNCX_RESOURCE_SERVER",
    "SCOPE_ENV",
    "client_credentials_authorizer",
    "funcx_scope",
    "transport_arguments",
]

#: The environment variables holding the client credentials.
CLIENT_ID_ENV = "FUNCX_SDK_CLIENT_ID"
CLIENT_SECRET_ENV = "FUNCX_SDK_CLIENT_SECRET"
#: The environment variable that overrides the funcX scope.
SCOPE_ENV = "FUNCX_SCOPE"
#: The scope of the funcX web service in Globus Auth.
DEFAULT_FUNCX_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
#: The resource server name the auth service gives funcX tokens.
FUNCX_RESOURCE_SERVER = "funcx_service"

VerifySSL = Union[bool, str, None]

# globus-sdk 4 takes a ready RequestsTransport (``transport=``) and keeps retry
# checks in a RetryConfig; 3.x builds the transport itself from
# ``transport_params`` (which also carries the retry checks).
_SDK_TAKES_TRANSPORT = "transport" in inspect.signature(globus_sdk.BaseClient.__init__).parameters


def funcx_scope(environ: Optional[Mapping[str, str]] = None) -> str:
    """The funcX scope to ask for: ``FUNCX_SCOPE`` if set, else the public one."""
    env = os.environ if environ is None else environ
    return env.get(SCOPE_ENV) or DEFAULT_FUNCX_SCOPE


def transport_arguments(
    verify_ssl: VerifySSL = None,
    http_timeout: Optional[float] = None,
    retry_checks: Iterable[RetryCheck] = (),
    transport_params: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Keyword arguments that give a globus-sdk client a configured transport.

    ``verify_ssl`` is a CA file, True/False, or None for globus-sdk's default
    (``GLOBUS_SDK_VERIFY_SSL``, else the system CAs); ``http_timeout`` is in
    seconds (None: ``GLOBUS_SDK_HTTP_TIMEOUT``, else 60).  ``retry_checks``
    are only placed here for globus-sdk 3.x, where they run before the
    default checks; with 4.x a client registers them in
    ``_register_standard_retry_checks``.  ``transport_params`` (globus-sdk
    3.x only, e.g. ``max_retries``) are merged in; with 4.x pass
    ``retry_config=`` to the client instead.
    """
    if _SDK_TAKES_TRANSPORT:
        if transport_params:
            raise TypeError(
                "transport_params is a globus-sdk 3 argument; with globus-sdk "
                f"{globus_sdk.__version__} pass transport= or retry_config="
            )
        return {"transport": RequestsTransport(verify_ssl=verify_ssl, http_timeout=http_timeout)}
    params: Dict[str, Any] = {  # pragma: no cover - globus-sdk 3.x
        "verify_ssl": verify_ssl,
        "http_timeout": http_timeout,
        **(transport_params or {}),
    }
    params["retry_checks"] = [*retry_checks, *params.get("retry_checks", ())]
    return {"transport_params": params}  # pragma: no cover - globus-sdk 3.x


def client_credentials_authorizer(
    client_id: Optional[str] = None,
    client_secret: Optional[str] = None,
    *,
    scope: Optional[str] = None,
    verify_ssl: VerifySSL = None,
    http_timeout: Optional[float] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> globus_sdk.ClientCredentialsAuthorizer:
    """An authorizer that logs in as a client and keeps a funcX token in memory.

    The id and secret default to ``FUNCX_SDK_CLIENT_ID`` and
    ``FUNCX_SDK_CLIENT_SECRET``; the scope to ``FUNCX_SCOPE``, else
    :data:`DEFAULT_FUNCX_SCOPE`.  The auth service is the one globus-sdk is
    configured for (``GLOBUS_SDK_SERVICE_URL_AUTH``), reached with the same
    ``verify_ssl`` and ``http_timeout`` as the funcX service.

    The first token is fetched now, so wrong credentials raise here (a
    :class:`globus_sdk.AuthAPIError`).  Raises :class:`LoginError` if the
    credentials are missing.
    """
    env = os.environ if environ is None else environ
    client_id = client_id or env.get(CLIENT_ID_ENV) or None
    client_secret = client_secret or env.get(CLIENT_SECRET_ENV) or None
    if not client_id or not client_secret:
        missing = [
            name
            for name, value in ((CLIENT_ID_ENV, client_id), (CLIENT_SECRET_ENV, client_secret))
            if not value
        ]
        raise LoginError(
            f"no funcX credentials: {' and '.join(missing)} not set. "
            f"Set {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV} "
            f"(from `funcx-service create-client NAME`), or pass an authorizer"
        )
    auth_client = globus_sdk.ConfidentialAppAuthClient(
        client_id,
        client_secret,
        **transport_arguments(verify_ssl, http_timeout),
    )
    try:
        return globus_sdk.ClientCredentialsAuthorizer(auth_client, scopes=scope or funcx_scope(env))
    except BaseException:
        auth_client.transport.session.close()
        raise
