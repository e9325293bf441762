"""Authentication: clients, secrets, access tokens, and the Globus Auth calls.

The service answers the few Globus Auth calls funcX clients make (PROTOCOL.md
section 6 and the funcX 1.0.13 notes A1), at its own root, so that
``GLOBUS_SDK_SERVICE_URL_AUTH=https://host:port/`` points globus-sdk here:

* ``POST /v2/oauth2/token``: client credentials (HTTP Basic or form fields)
  for tokens; the funcX scope gives a ``funcx_service`` token, ``openid``
  (``profile``, ``email``) an ``auth.globus.org`` one;
* ``GET /v2/oauth2/userinfo`` and ``GET /v2/api/identities`` (``whoami``);
* ``POST /v2/oauth2/token/revoke`` (``logout``; it sends no credentials and
  sometimes no token: a form, with or without a token, is answered 200; a body
  of another kind, 400);
* ``POST /v2/oauth2/token/introspect`` (client credentials).

One client is one user identity.  Client secrets are stored as scrypt hashes
(computed in a thread); access tokens as SHA-256 hashes (they are random
32-byte strings, so a fast hash is enough), with their expiry.  Checked
tokens are cached for a few seconds, so a busy client costs one database
look-up per token every few seconds; a revocation through this service is
seen at once, one by ``funcx-service revoke-client`` within that time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from funcx_endpoint.lifecycle import stop_loop
from funcx_endpoint.webservice.http import APIError, Call, Router, bad_request
from funcx_endpoint.webservice.ratelimit import LoginGuard
from funcx_endpoint.webservice.storage import Client, Storage, TokenInfo

FUNCX_RESOURCE_SERVER = "funcx_service"
AUTH_RESOURCE_SERVER = "auth.globus.org"
_AUTH_SCOPES = frozenset({"openid", "profile", "email"})
_AUTH_SCOPE_PREFIX = "urn:globus:auth:scope:auth.globus.org:"
_FORM = "application/x-www-form-urlencoded"

#: scrypt parameters: about 50 ms and 16 MiB per check.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1

API = (FUNCX_RESOURCE_SERVER,)
ANY_TOKEN = (FUNCX_RESOURCE_SERVER, AUTH_RESOURCE_SERVER)


# ---------------------------------------------------------------------------
# secrets and tokens


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """``scrypt$n$r$p$<salt>$<hash>`` of ``secret`` with a fresh salt (slow: ~50 ms)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return "$".join(
        [
            "scrypt",
            str(_SCRYPT_N),
            str(_SCRYPT_R),
            str(_SCRYPT_P),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        ]
    )


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches a :func:`hash_secret` value (constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


# ---------------------------------------------------------------------------
# checking tokens on API calls


class Authenticator:
    """Checks ``Authorization: Bearer`` tokens, with a short cache.

    A token is valid until its expiry time by ``clock``, the clock the
    token call that issued it used.
    """

    log = Logger()

    def __init__(self, storage: Storage, clock: IReactorTime, cache_seconds: float = 5.0) -> None:
        self._storage = storage
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._cache: Dict[str, Tuple[TokenInfo, float]] = {}

    def forget(self, hashed: str) -> None:
        self._cache.pop(hashed, None)

    async def __call__(self, call: Call, audiences: Tuple[str, ...]) -> TokenInfo:
        header = call.header("authorization") or ""
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "UNAUTHORIZED",
                "this call needs an access token (Authorization: Bearer <token>); log in "
                "with FUNCX_SDK_CLIENT_ID and FUNCX_SDK_CLIENT_SECRET from "
                "`funcx-service create-client NAME`",
                headers={"WWW-Authenticate": 'Bearer realm="funcx"'},
            )
        now = self._clock.seconds()
        hashed = token_hash(token)
        cached = self._cache.get(hashed)
        if cached is not None and cached[1] > now:
            info: Optional[TokenInfo] = cached[0]
        else:
            info = await self._storage.find_token(hashed)
            if info is not None and not info.revoked:
                if len(self._cache) > 50_000:
                    self._cache.clear()
                self._cache[hashed] = (info, now + self._cache_seconds)
        if info is None or info.revoked:
            raise APIError(
                401,
                "UNAUTHORIZED",
                "the access token (Authorization: Bearer) is not valid: it is unknown, or was "
                "revoked with its client; log in again",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if info.expires <= now:
            raise APIError(
                401,
                "TOKEN_EXPIRED",
                "the access token has expired; log in again for a new one",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if info.resource_server not in audiences:
            raise APIError(
                403,
                "INSUFFICIENT_SCOPE",
                f"this token is for {info.resource_server}; this call needs a token for "
                f"{' or '.join(audiences)} (ask for the funcX scope)",
            )
        return info


# ---------------------------------------------------------------------------
# the Globus Auth calls


def _oauth_error(status: int, error: str, message: str, **headers: str) -> APIError:
    code = "UNAUTHORIZED" if status == 401 else "BAD_REQUEST"
    return APIError(
        status, code, message, headers=headers or None, error=error, error_description=message
    )


def _in_thread_or_default(
    in_thread: Optional[Callable[..., Deferred[Any]]],
) -> Callable[..., Deferred[Any]]:
    return deferToThread if in_thread is None else in_thread


@attr.s(auto_attribs=True, eq=False)
class AuthAPI:
    """Handlers of the auth calls; :meth:`install` adds them to a router.

    Tokens are issued at ``clock.seconds()`` and last ``token_lifetime``
    seconds.  ``in_thread(fn, *args)`` runs the slow secret checks (scrypt)
    off the reactor thread: ``deferToThread`` unless given.  ``guard``
    decides whether a secret check runs at all (back-off after failed logins,
    :mod:`~funcx_endpoint.webservice.ratelimit`): one with the default limits
    on ``clock`` unless given.
    """

    log = Logger()

    storage: Storage
    authenticator: Authenticator
    clock: IReactorTime
    funcx_scope: str
    token_lifetime: int
    _in_thread: Callable[..., Deferred[Any]] = attr.ib(
        default=None, kw_only=True, converter=_in_thread_or_default
    )
    guard: LoginGuard = attr.ib(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.guard is None:
            self.guard = LoginGuard(self.clock)

    def install(self, router: Router) -> None:
        router.add("POST", "/v2/oauth2/token", self.token)
        router.add("POST", "/v2/oauth2/token/revoke", self.revoke)
        router.add("POST", "/v2/oauth2/token/introspect", self.introspect)
        router.add("GET", "/v2/oauth2/userinfo", self.userinfo, ANY_TOKEN)
        router.add("GET", "/v2/api/identities", self.identities, ANY_TOKEN)

    async def client_of(self, call: Call) -> Client:
        """The client whose credentials this call carries (the portal's sign-in too);
        401 (an APIError) for bad ones, with the back-off of failed logins."""
        return await self._client(call)

    async def _client(self, call: Call) -> Client:
        """The client that authenticated this call (HTTP Basic, or form fields)."""
        header = call.header("authorization") or ""
        scheme, _, encoded = header.partition(" ")
        client_id = secret = ""
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = (
                    base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
                )
            except (ValueError, binascii.Error, UnicodeDecodeError):
                raise _oauth_error(
                    401, "invalid_client", "the Basic authorization header is malformed"
                ) from None
        else:
            form = call.form()
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if not client_id or not secret:
            raise _oauth_error(
                401,
                "invalid_client",
                "client credentials are required (HTTP Basic client_id:client_secret)",
                **{"WWW-Authenticate": 'Basic realm="funcx"'},
            )
        found: List[Optional[Client]] = []

        async def verify() -> bool:
            client = await self.storage.get_client(client_id)
            found.append(client)
            # Verify even for unknown clients, so timing does not tell them apart.
            stored = client.secret_hash if client is not None else _DUMMY_HASH
            matches = await self._in_thread(verify_secret, secret, stored)
            return bool(matches) and client is not None and client.revoked_at is None

        if not await self.guard.check(client_id, call.client_ip(), verify):
            raise _oauth_error(
                401,
                "invalid_client",
                "bad client credentials: check FUNCX_SDK_CLIENT_ID and "
                "FUNCX_SDK_CLIENT_SECRET (the client may have been revoked)",
            )
        client = found[0]
        assert client is not None
        return client

    def _resource_server(self, scope: str) -> Optional[str]:
        if scope == self.funcx_scope:
            return FUNCX_RESOURCE_SERVER
        if scope in _AUTH_SCOPES or scope.startswith(_AUTH_SCOPE_PREFIX):
            return AUTH_RESOURCE_SERVER
        return None

    async def token(self, call: Call) -> Tuple[int, Any]:
        client = await self._client(call)
        form = call.form()
        grant = form.get("grant_type", "")
        if grant != "client_credentials":
            raise _oauth_error(
                400,
                "unsupported_grant_type",
                f"only grant_type=client_credentials is supported, not {grant!r}",
            )
        by_server: Dict[str, List[str]] = {}
        for scope in form.get("scope", "").split():
            server = self._resource_server(scope)
            if server is None:
                raise _oauth_error(
                    400,
                    "invalid_scope",
                    f"unknown scope {scope!r}; this service grants {self.funcx_scope} "
                    f"(funcX) and openid/profile/email",
                )
            if scope not in by_server.setdefault(server, []):
                by_server[server].append(scope)
        if not by_server:
            raise _oauth_error(400, "invalid_scope", "no scope was requested (form field scope)")
        now = self.clock.seconds()
        tokens = []
        for server in sorted(by_server, key=lambda s: s != FUNCX_RESOURCE_SERVER):
            token = new_token()
            scope_text = " ".join(by_server[server])
            info = TokenInfo(
                client.identity_id,
                client.client_id,
                server,
                scope_text,
                now,
                now + self.token_lifetime,
            )
            await self.storage.insert_token(token_hash(token), info)
            tokens.append(
                {
                    "access_token": token,
                    "expires_in": self.token_lifetime,
                    "token_type": "Bearer",
                    "scope": scope_text,
                    "resource_server": server,
                    "refresh_token": None,
                }
            )
        self.log.info(
            "Issued {servers} token(s) to client {client} ({name})",
            servers="+".join(str(t["resource_server"]) for t in tokens),
            client=client.client_id,
            name=client.name,
        )
        return 200, {**tokens[0], "other_tokens": tokens[1:]}

    async def revoke(self, call: Call) -> Tuple[int, Any]:
        token = call.form().get("token", "")
        if not token:
            content_type = (call.header("content-type") or "").split(";")[0].strip().lower()
            if call.raw_body().strip() and content_type != _FORM:
                # The token is a form field (RFC 7009); a body of another kind (say JSON)
                # revokes nothing, and a 200 would tell its sender it did.
                raise bad_request(
                    f"the token to revoke is missing: send it as the form field token "
                    f"(Content-Type: {_FORM}), not as {content_type or 'an untyped body'}",
                    "invalid_request",
                )
            # A form without a token: funcX 1.0's logout revokes the refresh token too,
            # which client-credentials logins do not have (globus-sdk then drops the
            # field).  Nothing to revoke, and that logout must not fail.
            return 200, {"active": False}
        hashed = token_hash(token)
        self.authenticator.forget(hashed)
        await self.storage.revoke_token(hashed)
        return 200, {"active": False}

    async def introspect(self, call: Call) -> Tuple[int, Any]:
        await self._client(call)
        token = call.form().get("token", "")
        if not token:
            raise bad_request("the token to introspect is missing (form field token)")
        info = await self.storage.find_token(token_hash(token))
        now = self.clock.seconds()
        if info is None or info.revoked or info.expires <= now:
            return 200, {"active": False}
        identities = await self.storage.get_identities([info.identity_id])
        username = identities[0].username if identities else None
        return 200, {
            "active": True,
            "scope": info.scope,
            "client_id": info.client_id,
            "sub": info.identity_id,
            "username": username,
            "aud": [info.resource_server],
            "iss": "funcx-service",
            "exp": int(info.expires),
            "iat": int(info.issued),
            "nbf": int(info.issued),
            "token_type": "Bearer",
            "identity_set": [info.identity_id],
        }

    async def userinfo(self, call: Call) -> Tuple[int, Any]:
        info: TokenInfo = call.identity
        identities = await self.storage.get_identities([info.identity_id])
        if not identities:
            raise APIError(401, "UNAUTHORIZED", "the identity of this token no longer exists")
        me = identities[0]
        view = _identity_view(me)
        return 200, {
            "sub": me.identity_id,
            "preferred_username": me.username,
            "name": me.name,
            "email": me.email,
            "organization": None,
            "identity_provider": _IDENTITY_PROVIDER,
            "identity_provider_display_name": "funcx-service",
            "identity_set": [
                {
                    "sub": me.identity_id,
                    "username": me.username,
                    "name": me.name,
                    "email": me.email,
                }
            ],
            "identity": view,
        }

    async def identities(self, call: Call) -> Tuple[int, Any]:
        """Only the caller's own identity is ever shown (others are left out)."""
        info: TokenInfo = call.identity
        wanted_ids = {i.strip() for v in call.query("ids") for i in v.split(",") if i.strip()}
        wanted_names = {
            n.strip() for v in call.query("usernames") for n in v.split(",") if n.strip()
        }
        identities = await self.storage.get_identities([info.identity_id])
        shown = [
            _identity_view(i)
            for i in identities
            if i.identity_id in wanted_ids or i.username in wanted_names
        ]
        return 200, {"identities": shown}


class TokenPurger(Service):
    """Forgets expired tokens now and then: every ``interval`` seconds of ``clock``,
    those that expired (by ``clock``) more than a day before."""

    log = Logger()
    name = "token-purge"

    def __init__(self, storage: Storage, clock: IReactorTime, interval: float = 3600.0) -> None:
        self._storage = storage
        self._clock = clock
        self._loop = LoopingCall(self.purge)
        self._loop.clock = clock
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        stop_loop(self._loop)

    def purge(self) -> Deferred[int]:
        """Purge once; fires with how many tokens were forgotten (0 if that failed)."""
        d = self._storage.purge_tokens(self._clock.seconds())

        def failed(failure: Any) -> int:
            self.log.failure("Purging expired tokens failed", failure)
            return 0

        return d.addErrback(failed)


_IDENTITY_PROVIDER = "6b5d0e1a-7c3a-4a55-9c36-6e9d58f0c5a1"
# The hash of a throw-away secret, checked against for unknown clients.
_DUMMY_HASH = (
    "scrypt$16384$8$1$4d71d+KDgjK8qy06j9mpAg==$ZeZQDzVP/L6UBSJTQpoEh2fmAnfjYvBQPCn0xEWO/gM="
)


def _identity_view(identity: Any) -> Dict[str, Any]:
    return {
        "id": identity.identity_id,
        "username": identity.username,
        "name": identity.name,
        "email": identity.email,
        "status": "used",
        "identity_provider": _IDENTITY_PROVIDER,
        "organization": None,
    }
