"""The endpoint's login: client credentials, a token file, and the HTTP client.

Credentials come from ``FUNCX_SDK_CLIENT_ID`` / ``FUNCX_SDK_CLIENT_SECRET``
(Globus Auth client credentials, PROTOCOL.md section 6).  The access token
they buy is kept in ``<config dir>/tokens.json`` (0600), so a later start,
``whoami`` or ``logout`` can use it while it is valid, even without the
variables.  The auth service is the config's ``auth_address`` when set, else
``GLOBUS_SDK_SERVICE_URL_AUTH``, else the funcX service's own root (where

the private service answers the Globus Auth calls), or Globus Auth for the
public funcX service.
"""

from __future__ import annotations

import base64
import json
import os
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlencode, urlsplit, urlunsplit

import attr
from treq.client import HTTPClient
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers

from funcx_endpoint.files import write_atomically
from funcx_endpoint.tls import trust_root

if TYPE_CHECKING:
    from funcx_endpoint.config.model import Config

FUNCX_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
GLOBUS_AUTH = "https://auth.globus.org/"
PUBLIC_SERVICE_HOSTS = ("api2.funcx.org", "api.funcx.org", "api.dev.funcx.org")
TOKEN_FILE = "tokens.json"


class AuthError(Exception):
    """Login failed; the message says what to do.  ``status`` is the HTTP status."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def headers(values: Dict[str, str]) -> Headers:
    """treq/twisted.web headers from a plain dict."""
    return Headers({name: [value] for name, value in values.items()})


def funcx_scope() -> str:
    return os.environ.get("FUNCX_SCOPE") or FUNCX_SCOPE


def auth_base_url(service_address: str, configured: Optional[str] = None) -> str:
    """Where the Globus-Auth-compatible calls go (ends with ``/``)."""
    url = configured or os.environ.get("GLOBUS_SDK_SERVICE_URL_AUTH")

    if not url:
        parts = urlsplit(service_address)
        if parts.hostname in PUBLIC_SERVICE_HOSTS:
            url = GLOBUS_AUTH
        else:
            url = urlunsplit((parts.scheme, parts.netloc, "/", "", ""))
    return url if url.endswith("/") else url + "/"


def client_credentials(
    environ: Optional[Mapping[str, str]] = None,
) -> Optional[Tuple[str, str]]:
    """``(client id, secret)`` from ``environ`` (default: the environment), or None."""
    if environ is None:
        environ = os.environ
    client_id = environ.get("FUNCX_SDK_CLIENT_ID", "").strip()
    secret = environ.get("FUNCX_SDK_CLIENT_SECRET", "").strip()
    if client_id and secret:
        return client_id, secret
    if client_id or secret:
        raise AuthError(
            "set both FUNCX_SDK_CLIENT_ID and FUNCX_SDK_CLIENT_SECRET (one of them is empty)"
        )
    return None


def http_client(
    reactor: Any, ca_file: Optional[str] = None
) -> Tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client verifying HTTPS against ``ca_file`` (or the system's CAs)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca_file))
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=30)
    return HTTPClient(agent), pool


@attr.s(auto_attribs=True)
class Token:
    """A cached access token."""

    access_token: str
    expires_at: float
    scope: str
    client_id: str
    auth_url: str

    def valid(self, now: float) -> bool:
        return self.expires_at - 60 > now


class TokenStore:
    """``tokens.json`` in the config directory, mode 0600."""

    def __init__(self, config_dir: str) -> None:
        self.path = os.path.join(config_dir, TOKEN_FILE)

    def load(self) -> Optional[Token]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return Token(**{k: data[k] for k in attr.fields_dict(Token)})
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def save(self, token: Token) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        write_atomically(self.path, json.dumps(attr.asdict(token)).encode(), mode=0o600)

    def remove(self) -> bool:
        try:
            os.unlink(self.path)
            return True
        except FileNotFoundError:
            return False


async def _json(response: Any) -> Dict[str, Any]:
    body = await response.content()
    try:
        data = json.loads(body)
    except ValueError:
        data = {"message": body[:200].decode(errors="replace")}
    return data if isinstance(data, dict) else {"message": str(data)[:200]}


def error_message(data: Dict[str, Any]) -> str:
    """The human part of a JSON error body (funcX, Globus or OAuth style)."""
    for key in ("message", "reason", "error_description", "detail", "error"):
        value = data.get(key)
        if value:
            return str(value)
    return "no details"


@attr.s(auto_attribs=True, eq=False)
class Authenticator:
    """Gets (and caches, in ``store``) access tokens for the funcX scope from
    the auth service at ``auth_url``, through ``http``; ``clock`` tells expiry."""

    http: HTTPClient
    auth_url: str
    store: TokenStore
    clock: Any
    #: Where the client credentials are; None: the environment.  The daemon
    #: gives the variables it took out of its environment (so that managers
    #: and workers do not inherit them).
    environ: Optional[Mapping[str, str]] = None

    async def request_token(self, client_id: str, secret: str, scope: str) -> Dict[str, Any]:
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        response = await self.http.post(
            self.auth_url + "v2/oauth2/token",
            data=urlencode({"grant_type": "client_credentials", "scope": scope}).encode(),
            headers=headers(
                {
                    "Authorization": f"Basic {basic}",
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Accept": "application/json",
                }
            ),
        )
        data = await _json(response)
        if response.code != 200:
            if response.code in (400, 401, 403):
                raise AuthError(
                    f"the auth service at {self.auth_url} refused the client credentials "
                    f"({response.code}: {error_message(data)}); check FUNCX_SDK_CLIENT_ID and "
                    f"FUNCX_SDK_CLIENT_SECRET",
                    response.code,
                )
            raise AuthError(
                f"the auth service at {self.auth_url} answered {response.code}: "
                f"{error_message(data)}",
                response.code,
            )
        return data

    async def token(self, force_new: bool = False) -> str:
        """A valid access token for the funcX scope."""
        now = self.clock.seconds()
        creds = client_credentials(self.environ)
        cached = self.store.load()
        if (
            not force_new
            and cached is not None
            and cached.valid(now)
            and cached.auth_url == self.auth_url
            and (creds is None or cached.client_id == creds[0])
        ):
            return cached.access_token
        if creds is None:
            raise AuthError(
                "no credentials: set FUNCX_SDK_CLIENT_ID and FUNCX_SDK_CLIENT_SECRET (for a "
                "private service, `funcx-service create-client NAME` prints them)"
            )
        scope = funcx_scope()
        data = await self.request_token(creds[0], creds[1], scope)
        try:
            token = Token(
                access_token=str(data["access_token"]),
                expires_at=now + float(data.get("expires_in", 0)),
                scope=str(data.get("scope", scope)),
                client_id=creds[0],
                auth_url=self.auth_url,
            )
        except (KeyError, TypeError, ValueError):
            raise AuthError(f"the auth service sent no access token: {data!r:.200}") from None
        self.store.save(token)
        return token.access_token

    async def userinfo(self) -> Dict[str, Any]:
        """Who the credentials belong to (``whoami``)."""
        creds = client_credentials(self.environ)
        if creds is None:
            cached = self.store.load()
            if cached is None or not cached.valid(self.clock.seconds()):
                raise AuthError(
                    "not logged in: set FUNCX_SDK_CLIENT_ID and FUNCX_SDK_CLIENT_SECRET"
                )
            access = cached.access_token
        else:
            data = await self.request_token(creds[0], creds[1], "openid")
            access = str(data.get("access_token", ""))
        response = await self.http.get(
            self.auth_url + "v2/oauth2/userinfo",
            headers=headers({"Authorization": f"Bearer {access}", "Accept": "application/json"}),
        )
        data = await _json(response)
        if response.code != 200:
            raise AuthError(
                f"the auth service answered {response.code}: {error_message(data)}",
                response.code,
            )
        return data

    async def logout(self) -> bool:
        """Revoke the cached token and remove the token file; True if there was one.

        The token is revoked at the auth service that issued it (its ``auth_url``),
        whichever service this authenticator was made for.  The file is removed
        whatever happens; AuthError (after removing it) if the service did not
        confirm the revocation.
        """
        cached = self.store.load()
        if cached is None:
            return False
        try:
            response = await self.http.post(
                cached.auth_url + "v2/oauth2/token/revoke",
                data=urlencode(
                    {"token": cached.access_token, "client_id": cached.client_id}
                ).encode(),
                headers=headers(
                    {
                        "Content-Type": "application/x-www-form-urlencoded",
                        "Accept": "application/json",
                    }
                ),
            )
            data = await _json(response)
        finally:
            self.store.remove()
        if response.code != 200:
            raise AuthError(
                f"the auth service at {cached.auth_url} did not revoke the token "
                f"({response.code}: {error_message(data)}); it stays valid until it expires",
                response.code,
            )
        return True


def config_authenticator(
    reactor: Any, config: Config, config_dir: str
) -> Tuple[Authenticator, HTTPConnectionPool]:
    """An :class:`Authenticator` for the service of ``config`` (its address,
    ``auth_address`` and ``service_ca_file``), caching tokens in ``config_dir``;
    and its HTTP connection pool, for the caller to close."""
    http, pool = http_client(reactor, config.service_ca_file)
    auth_url = auth_base_url(config.funcx_service_address, config.auth_address)
    return Authenticator(http, auth_url, TokenStore(config_dir), reactor), pool
