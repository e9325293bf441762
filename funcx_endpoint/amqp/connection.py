"""Connecting to RabbitMQ: URLs, TLS, login, and a reconnecting service.

:class:`AMQPConnectionService` keeps one connection up with Twisted's
``ClientService`` (backoff with jitter), logs in and lets its owner set up
channels in ``prepareConnection``.  Errors that retrying cannot cure (a
refused login, a missing queue, a queue held exclusively by someone else)
are fatal: the service stops retrying and reports them once.
"""

from __future__ import annotations

import random
from typing import Any, Awaitable, Callable, Iterable, List, Optional, Set
from urllib.parse import quote, unquote, urlsplit

import attr
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed
from txamqp.message import Message
from zope.interface import implementer

from funcx_endpoint.amqp.client import AMQPClient
from funcx_endpoint.amqp.interfaces import IAMQPConnectionService
from funcx_endpoint.observer import OneShotObserver
from funcx_endpoint.tls import trust_root

ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405


class AMQPURLError(ValueError):
    """An AMQP URL that cannot be used."""


@attr.s(auto_attribs=True, frozen=True, repr=False)
class AMQPURL:
    """A parsed ``amqp[s]://user:password@host:port/vhost`` URL."""

    scheme: str
    host: str
    port: int
    username: str
    password: str
    vhost: str

    @classmethod
    def parse(cls, url: str) -> AMQPURL:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise AMQPURLError(f"bad AMQP URL {redact(url)}: {e}") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise AMQPURLError(
                f"bad AMQP URL {redact(url)}: the scheme must be amqp:// or amqps://"
            )
        if not parts.hostname:
            raise AMQPURLError(f"bad AMQP URL {redact(url)}: no host")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        vhost = unquote(path) if path else "/"
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port or (5671 if parts.scheme == "amqps" else 5672),
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            vhost=vhost,
        )

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    def redacted(self) -> str:
        """The URL with its password replaced by ``***`` (for logs and errors)."""
        vhost = quote(self.vhost, safe="")
        return f"{self.scheme}://{quote(self.username)}:***@{self.host}:{self.port}/{vhost}"

    def __repr__(self) -> str:
        return f"AMQPURL({self.redacted()})"

    def __str__(self) -> str:
        return self.redacted()


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return url.replace(parts.netloc, f"{user}:***@{netloc[1]}", 1)
    except ValueError:
        return "<unparseable URL>"


def client_endpoint(
    reactor: Any, url: AMQPURL, ca_file: Optional[str] = None, timeout: float = 30
) -> IStreamClientEndpoint:
    """A TCP (amqp) or TLS (amqps) endpoint for ``url``.

    TLS verifies the certificate and the host name, against ``ca_file`` if
    given, else the system's trusted CAs.
    """
    tcp = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if not url.tls:
        return tcp
    return wrapClientTLS(optionsForClientTLS(url.host, trustRoot=trust_root(ca_file)), tcp)


class AMQPError(Exception):
    """A broker error, with the reply code when the broker gave one.

    ``retry_after``, on an error that is not fatal, caps the delay before the
    connection service tries again (e.g. to try again soon while a condition
    that should clear by itself lasts).
    """

    def __init__(
        self,
        message: str,
        code: Optional[int] = None,
        fatal: bool = False,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.fatal = fatal
        self.retry_after = retry_after


def close_reason(reason: Any) -> tuple[Optional[int], str]:
    """(reply code, reply text) of a broker close, from txAMQP's reason forms."""
    if isinstance(reason, Failure):
        reason = reason.value
    if isinstance(reason, Closed) and reason.args:
        reason = reason.args[0]
    if isinstance(reason, Message):
        try:
            return int(reason.reply_code), str(reason.reply_text)
        except AttributeError:
            pass
    if isinstance(reason, Failure):
        return None, reason.getErrorMessage()
    return None, str(reason)


class _Shield:
    """Keeps a connection's loss from ``ClientService`` until the connection is ready.

    ``ClientService`` has no transition for a connection that is lost before
    (or after) its ``prepareConnection`` failed; it raises ``NoTransition``
    from ``connectionLost``.  A shielded connection reports its loss to the
    service only once :meth:`arm` was called (by a successful set-up);
    otherwise only the AMQP protocol hears of it, and the failed set-up is
    what the service sees.
    """

    def __init__(self, wrapped: Any, client: AMQPClient) -> None:
        self._wrapped = wrapped
        self._client = client
        self.armed = False
        client.shield = self

    def arm(self) -> None:
        self.armed = True

    def makeConnection(self, transport: Any) -> None:
        self._wrapped.makeConnection(transport)

    def connectionLost(self, reason: Failure) -> None:
        if self.armed:
            self._wrapped.connectionLost(reason)
        else:
            self._client.connectionLost(reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class _ShieldingFactory(Factory):
    def __init__(self, wrapped: Any, factory: AMQPConnectionFactory) -> None:
        self._wrapped = wrapped
        self._factory = factory

    def buildProtocol(self, addr: Any) -> Any:
        proxy = self._wrapped.buildProtocol(addr)
        if proxy is None:
            return None
        return _Shield(proxy, self._factory.last_built)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


@implementer(IStreamClientEndpoint)
class _ShieldingEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint, factory: AMQPConnectionFactory) -> None:
        self._endpoint = endpoint
        self._factory = factory

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._endpoint.connect(_ShieldingFactory(factory, self._factory))
        # ClientService expects the protocol its own factory built.
        return d.addCallback(lambda shield: shield._wrapped)


class AMQPConnectionFactory(Factory):
    """Builds :class:`AMQPClient` protocols for one URL."""

    noisy = False

    def __init__(self, url: AMQPURL, heartbeat: int, clock: Any) -> None:
        self.url = url
        self.heartbeat = heartbeat
        self.clock = clock

    def buildProtocol(self, addr: Any) -> AMQPClient:
        client = AMQPClient(vhost=self.url.vhost, heartbeat=self.heartbeat, clock=self.clock)
        client.factory = self
        self.last_built = client
        return client


async def login(client: AMQPClient, url: AMQPURL) -> None:
    """Authenticate and open the vhost; a refusal raises a fatal AMQPError."""
    try:
        await client.authenticate(url.username, url.password, mechanism="PLAIN")
    except Closed as e:
        tls_error = _tls_error(e)
        if tls_error is not None:
            raise AMQPError(
                f"TLS verification of the broker at {url.host}:{url.port} failed "
                f"({tls_error}); if it uses a private CA, configure its CA file "
                f"(amqp_ca_file in config.py)",
                fatal=True,
            ) from None
        code, text = close_reason(e)
        if code == ACCESS_REFUSED or "ACCESS_REFUSED" in text:
            raise AMQPError(
                f"the broker refused the login of {url.username!r} at {url.redacted()}: {text}",
                code,
                fatal=True,
            ) from None
        if code == 530 or "NOT_ALLOWED" in text:  # no access to the vhost
            raise AMQPError(
                f"the broker refused access to vhost {url.vhost!r}: {text}", code, fatal=True
            ) from None
        raise AMQPError(f"the broker closed the connection during login: {text}", code) from None


def _tls_error(error: Closed) -> Optional[str]:
    """The TLS failure behind a closed connection, if that is what it was."""
    reason = error.args[0] if error.args else None
    if isinstance(reason, Failure) and reason.check(SSL.Error, VerificationError):
        return str(reason.value) or "certificate rejected"
    return None


PrepareFunction = Callable[[AMQPClient], Awaitable[None]]


@implementer(IAMQPConnectionService)
class AMQPConnectionService(Service):
    """Keeps one AMQP connection up; the owner sets up channels in ``prepare``.

    ``prepare(client)`` runs after each login; when it raises an
    :class:`AMQPError` with ``fatal`` set, retrying stops and
    ``when_fatal()`` observers hear of it.  Any other failure retries with
    exponential backoff and jitter.

    The TLS handshake, login and ``prepare`` together must finish within
    ``setup_timeout`` seconds, else the connection is aborted and retried (a
    peer that accepts TCP and says nothing must not hold the endpoint in
    "connecting" forever).  A connection lost less than ``stable_after``
    seconds after it was set up counts as a failed attempt for the backoff,
    so a broker that keeps closing fresh connections is not hammered.
    """

    log = Logger()
    setup_timeout = 30.0
    stable_after = 10.0

    def __init__(
        self,
        reactor: Any,
        url: AMQPURL,
        prepare: PrepareFunction,
        *,
        ca_file: Optional[str] = None,
        heartbeat: int = 30,
        name: Optional[str] = None,
        endpoint: Optional[IStreamClientEndpoint] = None,
        max_delay: float = 30.0,
        setup_timeout: Optional[float] = None,
    ) -> None:
        self.url = url
        if setup_timeout is not None:
            self.setup_timeout = setup_timeout
        self._reactor = reactor
        self._prepare = prepare
        self._fatal: OneShotObserver[AMQPError] = OneShotObserver()
        self.fatal_error: Optional[AMQPError] = None
        self.client: Optional[AMQPClient] = None
        self.connections = 0
        self.lost_at: Optional[float] = None  # when the last prepared connection was lost
        self._connected_at = 0.0
        self._short_lived = 0  # consecutive connections lost soon after set-up
        self._retry_cap: Optional[float] = None
        self._closing: Set[AMQPClient] = set()  # failed set-ups, not yet closed
        if name:
            self.setName(name)
        rng = random.Random()
        factory = AMQPConnectionFactory(url, heartbeat, reactor)
        self._backoff = backoffPolicy(
            initialDelay=0.25, maxDelay=max_delay, factor=2.0, jitter=rng.random
        )
        self._client_service = ClientService(
            _ShieldingEndpoint(endpoint or client_endpoint(reactor, url, ca_file), factory),
            factory,
            retryPolicy=self._retry_delay,
            clock=reactor,
            prepareConnection=self._prepare_connection,
        )

    def _retry_delay(self, attempt: int) -> float:
        # After a fatal error the service is being stopped; never retry.
        if self.fatal_error is not None:
            return 3600.0
        delay = self._backoff(attempt + self._short_lived)
        cap, self._retry_cap = self._retry_cap, None
        return min(delay, cap) if cap is not None else delay

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.transport is not None

    def state(self) -> str:
        if self.fatal_error is not None:
            return "failed"
        if self.connected:
            return "connected"
        return "connecting" if self.running else "stopped"

    def _prepare_connection(self, client: Any) -> Deferred[None]:
        return ensureDeferred(self._setup(client))

    async def _setup(self, client: AMQPClient) -> None:
        timed_out = []

        def too_slow() -> None:
            timed_out.append(True)
            if client.transport is not None:
                client.transport.abortConnection()

        timer = self._reactor.callLater(self.setup_timeout, too_slow)
        try:
            await login(client, self.url)
            await self._prepare(client)
            if timed_out:
                raise AMQPError("timed out")
        except Exception as e:
            if timed_out and not (isinstance(e, AMQPError) and e.fatal):
                error = AMQPError(
                    f"the TLS and AMQP handshake with the broker did not finish within "
                    f"{self.setup_timeout:g} s"
                )
                self._setup_failed(client, error)
                raise error from None
            self._setup_failed(client, e)
            raise
        finally:
            if timer.active():
                timer.cancel()
        if client.transport is None:
            raise AMQPError("the connection was lost during set-up")
        client.shield.arm()
        self.client = client
        self.connections += 1
        self._connected_at = self._reactor.seconds()
        self.log.info("Connected to {url}", url=self.url.redacted())
        client.when_closed().addCallback(self._lost, client)

    def _setup_failed(self, client: AMQPClient, e: Exception) -> None:
        if client.transport is not None:
            # ClientService does not track a connection whose set-up failed:
            # stopService waits for it to close.  Tracked before a fatal error
            # is reported: its observers may stop this service at once.
            self._closing.add(client)
            client.when_closed().addCallback(lambda _: self._closing.discard(client))
            client.transport.loseConnection()
        if isinstance(e, AMQPError):
            if e.fatal:
                self._fail(e)
            else:
                self._retry_cap = e.retry_after
                self.log.warn(
                    "AMQP set-up at {url} failed, will retry: {error}",
                    url=self.url.redacted(),
                    error=e.message,
                )
        else:
            self.log.warn(
                "AMQP set-up at {url} failed, will retry: {error}", url=self.url.redacted(), error=e
            )

    def _lost(self, reason: Any, client: AMQPClient) -> None:
        if self.client is client:
            self.client = None
        now = self._reactor.seconds()
        self.lost_at = now
        if now - self._connected_at < self.stable_after:
            self._short_lived += 1
        else:
            self._short_lived = 0
        if self.running:
            code, text = close_reason(reason)
            self.log.warn(
                "Lost the connection to {url} ({text}); reconnecting",
                url=self.url.redacted(),
                text=text,
            )

    def _fail(self, error: AMQPError) -> None:
        if self.fatal_error is not None:
            return
        self.fatal_error = error
        self.log.error("Giving up on {url}: {error}", url=self.url.redacted(), error=error.message)
        # Stop retrying; the owner decides what to do next.
        self._reactor.callLater(0, self._client_service.stopService)
        self._fatal.fire(error)

    def when_fatal(self) -> Deferred[AMQPError]:
        """Fires with the fatal error, if one ever happens."""
        return self._fatal.when_fired()

    def fail(self, error: AMQPError) -> None:
        """Report a fatal error found after set-up (e.g. a cancelled consumer)."""
        self._fail(error)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.loseConnection()

    def when_connected(self) -> Deferred[AMQPClient]:
        """The next (or current) prepared connection."""
        d: Deferred[Any] = self._client_service.whenConnected(failAfterFailures=None)
        return d

    def startService(self) -> None:
        super().startService()
        self._client_service.startService()

    def stopService(self) -> Deferred[None]:
        """Stop retrying; fires when every connection of this service is closed."""
        super().stopService()
        waits: List[Deferred[Any]] = [self._client_service.stopService()]
        for client in list(self._closing):
            waits.append(client.when_closed())
            if client.transport is not None:
                client.transport.abortConnection()
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)


def connected_or_refused(
    connected: Deferred[Any],
    fatal: Iterable[Deferred[AMQPError]],
    refused: Callable[[AMQPError], Exception],
) -> Deferred[None]:
    """Fires when ``connected`` does; fails with ``refused(error)`` if one of
    ``fatal`` (``when_fatal()`` Deferreds) fires first.  A failure of
    ``connected`` (its service stopped) is left to ``fatal`` to explain."""
    ready: Deferred[None] = Deferred()

    def up(_: Any) -> None:
        if not ready.called:
            ready.callback(None)

    def down(error: AMQPError) -> None:
        if not ready.called:
            ready.errback(refused(error))

    connected.addCallbacks(up, lambda _: None)
    for d in fatal:
        d.addCallback(down)
    return ready
