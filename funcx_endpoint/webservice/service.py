"""The web service process: its parts, started in order and stopped in reverse.

:class:`WebService` starts, in order::

    tls        the CA and server certificate (generated at the first start)
    broker     the embedded RabbitMQ node (unless --amqp-url), about 10 s: a child
               service, restarted if it dies, stopped last
    storage    the database, its schema migrated
    amqp       the service's broker connection: topology, results consumer
    sender     publishes tasks, re-sends what the broker did not confirm
    https      the REST API and the auth calls

Parts that need what an earlier part learned (the embedded broker's
credentials, the chosen port) are built when their turn comes.  Progress,
readiness or failure go to whoever started the service as JSON lines on a
pipe (``--ready-fd``): ``{"state": "progress"|"ready"|"failed", ...}``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, List, Optional

from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from funcx_endpoint import tls
from funcx_endpoint.amqp.connection import AMQPURL, connected_or_refused
from funcx_endpoint.amqp.failover import cluster_endpoint, parse_hosts
from funcx_endpoint.lifecycle import (
    EX_CONFIG,
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    Phase,
    StartupError,
    StartupReporter,
    exit_status,
)
from funcx_endpoint.portal.pages import Portal
from funcx_endpoint.portal.web import Dispatch
from funcx_endpoint.procs import write_daemon_info
from funcx_endpoint.rabbitmq.node import NodeIdentity, RabbitMQError
from funcx_endpoint.rabbitmq.service import RabbitMQNodeService
from funcx_endpoint.version import __version__
from funcx_endpoint.webservice import embedded_broker
from funcx_endpoint.webservice.api import FuncXAPI
from funcx_endpoint.webservice.api_context import BrokerAddress
from funcx_endpoint.webservice.auth import AuthAPI, Authenticator, TokenPurger
from funcx_endpoint.webservice.broker import ServiceBroker
from funcx_endpoint.webservice.cluster import FailoverAdministrator, management_apis
from funcx_endpoint.webservice.db import DatabaseConfig, redact_url
from funcx_endpoint.webservice.dispatch import TaskSender
from funcx_endpoint.webservice.health import HealthAPI
from funcx_endpoint.webservice.http import APIResource, JSONSite, Router, error_body
from funcx_endpoint.webservice.ingest import ResultIngest
from funcx_endpoint.webservice.lifeline import watch_eof
from funcx_endpoint.webservice.management import ManagementAPI
from funcx_endpoint.webservice.quotas import Quotas
from funcx_endpoint.webservice.retention import RetentionPurger
from funcx_endpoint.webservice.settings import ServiceSettings, client_env_lines
from funcx_endpoint.webservice.storage import Claim, Storage

__all__ = ["StartupReporter", "WebService", "exit_status", "load_tls_options"]


class _Switch(Resource):
    """The site's root: 503 until :attr:`target` (the API) is set, then the API."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.target: Optional[Resource] = None

    def render(self, request: Any) -> Any:
        if self.target is not None:
            return self.target.render(request)
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"retry-after", b"5")
        return json.dumps(
            error_body(503, "STARTING", "the service is starting; try again in a few seconds")
        ).encode()


class _TrackingFactory(WrappingFactory):
    """Keeps the site's open connections, so that a stop can close them all."""

    def close_all(self) -> Deferred[None]:
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        return succeed(None)


def _host_names(settings: ServiceSettings) -> tuple[List[str], List[str]]:
    """Host names and IPs the generated certificate is valid for."""
    import ipaddress

    names = ["localhost"]
    ips = ["127.0.0.1"]
    for candidate in (socket.gethostname(), socket.getfqdn(), settings.public_host):
        if not candidate:
            continue
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            if candidate not in names:
                names.append(candidate)
        else:
            if candidate not in ips:
                ips.append(candidate)
    if settings.interface not in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
        if settings.interface not in ips:
            ips.append(settings.interface)
    return names, ips


class WebService(MultiService):
    """The whole service; see the module docstring.

    Every part reads the time from ``clock`` (the reactor by default).
    """

    log = Logger()
    name = "funcx-service"

    def __init__(
        self,
        settings: ServiceSettings,
        reactor: Any,
        reporter: StartupReporter,
        *,
        stop_on_eof_fd: Optional[int] = None,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._reactor = reactor
        self._clock: IReactorTime = reactor if clock is None else clock
        self._reporter = reporter
        self._stop_on_eof_fd = stop_on_eof_fd
        self.phase = Phase.STOPPED
        self.started_at: Optional[float] = None
        self._startup: Optional[Deferred[None]] = None
        self._session_at_build = os.getsid(0)
        self.embedded: Optional[RabbitMQNodeService] = None
        self.storage: Optional[Storage] = None
        self.broker: Optional[ServiceBroker] = None
        self.management: Optional[ManagementAPI | FailoverAdministrator] = None
        self.sender: Optional[TaskSender] = None
        self.ingest: Optional[ResultIngest] = None
        self.port: Optional[IListeningPort] = None
        self._factory: Optional[_TrackingFactory] = None
        self._root: Optional[_Switch] = None
        self._purger: Optional[TokenPurger] = None
        self._retention: Optional[RetentionPurger] = None
        self.portal: Optional[Portal] = None
        self._tls_files: Optional[tls.TLSFiles] = None
        self.info: Dict[str, Any] = {}

    # -- start ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.phase = Phase.STARTING
        self.started_at = self._clock.seconds()
        settings = self.settings
        session = os.getsid(0)
        write_daemon_info(
            settings.daemon_info_file,
            os.getpid(),
            session if session != self._session_at_build else None,
        )
        if self._stop_on_eof_fd is not None:
            watch_eof(self._reactor, self._stop_on_eof_fd, self._parent_gone)
        self._startup = Deferred.fromCoroutine(self._start())
        self._startup.addErrback(self._start_failed)

    def _parent_gone(self) -> None:
        self.log.info("The process that started this service is gone; stopping")
        if self._reactor.running:
            self._reactor.stop()

    async def _start(self) -> None:
        settings = self.settings
        settings.save()
        self._progress(f"funcx-service {__version__} starting in {settings.state_dir}")
        ca_file, cert_options = await self._tls()
        # Listen first: a taken port fails the start at once, before a broker
        # boots; until the service is ready every call is answered 503.
        self._root = _Switch()
        site = JSONSite(self._root, settings.max_request_size, self._clock)
        self._factory = _TrackingFactory(site)
        self.port = self._listen(self._factory, cert_options)
        port_number = int(getattr(self.port.getHost(), "port", settings.port))
        if settings.port != port_number:
            settings.port = port_number
            settings.save()

        if settings.embedded_broker:
            node = await self._start_embedded_broker()
            amqp_url = AMQPURL.parse(embedded_broker.admin_amqp_url(node))
            management_url = embedded_broker.management_url(node)
            broker_ca = ca_file
            public = BrokerAddress("amqps", settings.public_host, node.ports.amqps, "/")
        else:
            assert settings.amqp_url is not None
            amqp_url = AMQPURL.parse(settings.amqp_url)
            management_url = settings.management_url or _default_management_url(amqp_url)
            broker_ca = settings.broker_ca_file
            public = _public_address(settings.broker_public_url, amqp_url)

        config = DatabaseConfig.from_url(settings.effective_database_url)
        # Several instances share the database: each publishes what it stored.
        claim = (
            Claim(settings.effective_instance_id, settings.claim_seconds)
            if self._shared()
            else None
        )
        storage = Storage(config, self._reactor, claim=claim, clock=self._clock)
        self._progress(f"Opening the database ({config.describe()})")
        try:
            before, after = await storage.open()
        except Exception as e:
            raise StartupError(f"cannot open the database {config.describe()}: {e}") from None
        self.storage = storage
        if before != after:
            self.log.info("Database schema migrated from version {a} to {b}", a=before, b=after)

        apis = management_apis(
            self._reactor, management_url, settings.management_hosts, amqp_url.vhost, broker_ca
        )
        self.management = apis[0] if len(apis) == 1 else FailoverAdministrator(apis)
        holder: List[ResultIngest] = []
        broker_tls_ca = broker_ca if amqp_url.tls else None
        broker = ServiceBroker(
            self._reactor,
            amqp_url,
            lambda delivery, channel: holder[0].on_delivery(delivery, channel),
            ca_file=broker_tls_ca,
            queue_type=settings.queue_type,
            shared=self._shared(),
            endpoint=(
                cluster_endpoint(
                    self._reactor,
                    amqp_url,
                    parse_hosts(settings.amqp_hosts, amqp_url.port),
                    broker_tls_ca,
                )
                if settings.amqp_hosts
                else None
            ),
        )
        sender = TaskSender(
            self._reactor,
            storage,
            broker,
            resend_interval=settings.resend_interval,
            result_queue_ttl=settings.result_queue_ttl,
            clock=self._clock,
        )
        ingest = ResultIngest(
            self._reactor,
            storage,
            sender,
            status_log_size=settings.status_log_size,
            clock=self._clock,
        )
        holder.append(ingest)
        self.broker, self.sender, self.ingest = broker, sender, ingest
        self._progress(f"Connecting to the broker at {amqp_url.redacted()}")
        broker.startService()
        first = connected_or_refused(
            broker.when_connected(),
            [broker.connection.when_fatal()],
            lambda error: StartupError(
                f"the broker refused the service: {error.message}", EX_CONFIG
            ),
        )
        try:
            await _with_timeout(self._reactor, first, 30.0)
        except TimeoutError:
            self.log.warn(
                "The broker at {url} is not reachable yet; serving anyway (tasks wait)",
                url=amqp_url.redacted(),
            )
        sender.startService()

        router = Router()
        authenticator = Authenticator(storage, self._clock)
        auth = AuthAPI(
            storage,
            authenticator,
            self._clock,
            settings.funcx_scope,
            settings.token_lifetime,
            in_thread=lambda fn, *args: deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), fn, *args
            ),
        )
        auth.install(router)
        api = FuncXAPI(
            self._reactor,
            storage,
            broker,
            self.management,
            sender,
            public,
            heartbeat_threshold=settings.heartbeat_threshold,
            result_queue_ttl=settings.result_queue_ttl,
            clock=self._clock,
            quotas=Quotas(
                functions=settings.max_functions,
                stored_bytes=settings.max_stored_bytes,
                endpoints=settings.max_endpoints,
                tasks_in_flight=settings.max_tasks_in_flight,
            ),
        )
        api.install(router)
        HealthAPI(broker, self.embedded).install(router)
        proxies = frozenset(p.strip() for p in (settings.trusted_proxies or "").split(","))
        self.portal = Portal(storage, self._clock, api, auth)
        ingest.observers.append(self.portal.changed)
        self.portal.startService()
        api_resource = APIResource(router, authenticator, proxies - {""})
        self._root.target = Dispatch(api_resource, self.portal.resource())

        self._purger = TokenPurger(storage, self._clock)
        self._purger.startService()
        self._retention = RetentionPurger(
            storage, self._clock, settings.task_retention, settings.fetched_result_retention
        )
        self._retention.startService()

        host = settings.public_host
        root = f"{settings.scheme}://{host}:{port_number}"
        self.info = {
            "pid": os.getpid(),
            "version": __version__,
            "state_dir": settings.state_dir,
            "root_url": root,
            "base_url": root + "/v2",
            "auth_url": root + "/",
            "portal_url": root + "/portal/",
            "ca_file": ca_file,
            "broker": {
                "embedded": settings.embedded_broker,
                "node": self.embedded.identity.name if self.embedded is not None else None,
                "service_url": amqp_url.redacted(),
                "management_url": redact_url(management_url),
                "public_url": public.url("USER", "PASSWORD").replace("USER:PASSWORD@", ""),
            },
            "broker_ca_file": broker_ca,
            "database": config.describe(),
            "log_file": settings.log_file,
            "started": self.started_at,
        }
        self.info["env"] = client_env_lines(self.info)
        settings.write_runtime(self.info)
        self.phase = Phase.RUNNING
        self.log.info(
            "funcx-service ready at {url} (pid {pid})", url=self.info["base_url"], pid=os.getpid()
        )
        self._reporter.ready(**self.info)

    def _shared(self) -> bool:
        """Whether other instances may share the database and the broker's virtual host."""
        settings = self.settings
        return bool(settings.amqp_hosts or settings.instance_id) or settings.queue_type == "quorum"

    def _progress(self, message: str) -> None:
        self.log.info("{message}", message=message)
        self._reporter.progress(message)

    async def _tls(self) -> tuple[Optional[str], Any]:
        """The CA file clients trust, and the server's TLS options (None: plain HTTP)."""
        settings = self.settings
        if settings.tls_cert:
            assert settings.tls_key is not None
            options = load_tls_options(settings.tls_cert, settings.tls_key)
            if settings.embedded_broker:
                # The embedded broker's AMQPS needs a certificate too: the given one.
                self._tls_files = tls.TLSFiles(
                    settings.tls_ca or settings.tls_cert,
                    settings.tls_cert,
                    settings.tls_key,
                    "",
                )
            return settings.tls_ca, (None if settings.insecure_http else options)
        names, ips = _host_names(settings)
        files = await deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            tls.ensure_ca_and_server_cert,
            settings.tls_dir,
            names,
            ips,
            ca_common_name="funcx-service private CA",
        )
        self._tls_files = files
        if settings.insecure_http:
            return files.ca_cert, None
        return files.ca_cert, load_tls_options(files.server_cert, files.server_key)

    async def _start_embedded_broker(self) -> NodeIdentity:
        """Start the node as a child service (stopped last, with the children)."""
        assert self._tls_files is not None
        node = self.embedded = embedded_broker.embedded_broker(
            self.settings.broker_dir,
            self._tls_files,
            self._reactor,
            self.settings.interface,
            clock=self._clock,
        )
        self._progress(
            f"Starting the embedded RabbitMQ broker in {self.settings.broker_dir} (about 10 s)"
        )
        started = time.monotonic()
        node.setServiceParent(self)
        try:
            await node.when_ready()
        except RabbitMQError as e:
            raise StartupError(
                f"the embedded RabbitMQ broker did not start: {e}", EX_UNAVAILABLE
            ) from None
        self._progress(f"Embedded broker ready in {time.monotonic() - started:.1f} s")
        return node.identity

    def _listen(self, factory: Any, cert_options: Any) -> IListeningPort:
        settings = self.settings
        try:
            if cert_options is None:
                return self._reactor.listenTCP(settings.port, factory, interface=settings.interface)
            return self._reactor.listenSSL(
                settings.port, factory, cert_options, interface=settings.interface
            )
        except Exception as e:
            raise StartupError(
                f"cannot listen on {settings.interface}:{settings.port}: {e}", EX_UNAVAILABLE
            ) from None

    def _start_failed(self, failure: Failure) -> None:
        self.phase = Phase.FAILED
        if failure.check(StartupError):
            error = failure.value
            assert isinstance(error, StartupError)
            message, code = error.message, error.exit_code
            self.log.error("funcx-service failed to start: {message}", message=message)
        else:
            message, code = f"internal error: {failure.getErrorMessage()}", EX_SOFTWARE
            self.log.failure("funcx-service failed to start", failure)
        if exit_status.code == EX_OK:
            exit_status.code = code
        self._reporter.failed(message, code)
        if self._reactor.running:
            self._reactor.stop()

    # -- stop -------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        # The children (the embedded broker) are stopped last, by _stop.
        self.phase = Phase.STOPPING
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._startup is not None and not self._startup.called:
            self._startup.cancel()
        for purger in (self._purger, self._retention, self.portal):
            if purger is not None and purger.running:
                purger.stopService()
        steps = [
            ("https", self._stop_http),
            ("sender", lambda: self.sender.stopService() if self.sender else None),
            ("amqp", lambda: self.broker.stopService() if self.broker else None),
            ("management", lambda: self.management.close() if self.management else None),
            ("storage", lambda: self.storage.close() if self.storage else None),
            ("broker", self._stop_children),
        ]
        for name, step in steps:
            self.log.debug("Stopping {part}", part=name)
            try:
                await maybeDeferred(step)
            except Exception:
                self.log.failure("Error while stopping {part}", part=name)
        self.settings.remove_runtime()
        try:
            os.unlink(self.settings.daemon_info_file)
        except FileNotFoundError:
            pass
        self.phase = Phase.STOPPED
        self.log.info("funcx-service stopped")

    async def _stop_http(self) -> None:
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
        if self._factory is not None:
            await self._factory.close_all()

    def _stop_children(self) -> Any:
        """Stop the child services (the embedded broker) and wait for them."""
        if self.embedded is not None:
            self.log.info("Stopping the embedded RabbitMQ broker")
        return MultiService.stopService(self)


def load_tls_options(cert_file: str, key_file: str) -> ssl.CertificateOptions:
    """TLS options serving ``cert_file`` (the server certificate, then its chain) with
    ``key_file``, speaking HTTP/1.1 only."""
    from cryptography import x509
    from OpenSSL import crypto

    with open(cert_file, "rb") as f:
        cert_pem = f.read()
    with open(key_file, "rb") as f:
        key_pem = f.read()
    certs = x509.load_pem_x509_certificates(cert_pem)
    leaf = crypto.X509.from_cryptography(certs[0])
    chain = [crypto.X509.from_cryptography(c) for c in certs[1:]]
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    # ALPN: HTTP/1.1 only (clients that offer h2 must not pick it).
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain,
        acceptableProtocols=[b"http/1.1"],
    )


def _default_management_url(url: AMQPURL) -> str:
    from urllib.parse import quote

    return f"http://{quote(url.username, safe='')}:{quote(url.password, safe='')}@{url.host}:15672/"


def _public_address(public_url: Optional[str], service_url: AMQPURL) -> BrokerAddress:
    if public_url:
        parsed = AMQPURL.parse(public_url)
        return BrokerAddress(parsed.scheme, parsed.host, parsed.port, parsed.vhost)
    return BrokerAddress(service_url.scheme, service_url.host, service_url.port, service_url.vhost)


def _with_timeout(reactor: Any, d: Deferred[Any], seconds: float) -> Deferred[Any]:
    result: Deferred[Any] = Deferred()

    def expire() -> None:
        if not result.called:
            result.errback(TimeoutError(f"not done within {seconds:g} s"))

    call = reactor.callLater(seconds, expire)

    def done(value: Any) -> None:
        if call.active():
            call.cancel()
        if not result.called:
            result.callback(value)

    def failed(failure: Failure) -> None:
        if call.active():
            call.cancel()
        if not result.called:
            result.errback(failure)

    d.addCallbacks(done, failed)
    return result
