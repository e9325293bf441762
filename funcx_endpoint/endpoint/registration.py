"""Registering the endpoint with the funcX web service at start.

``POST /endpoints`` with the endpoint's name, its pinned id (from
``endpoint.json``) and metadata; the answer names the broker queues (section
3 of PROTOCOL.md).  Failures become a :class:`StartupError` with the exit
code of PROTOCOL.md section 2, which ``funcx-endpoint start`` reports:

======================================  ====
409, 410, 423 (refused, gone, locked)   69
429 (a quota of the user's reached)     69
network error (after retries)           75
the service returned another id         70
no ``endpoint_id`` / 400 / 422          65
401, 403 (credentials refused)          77
======================================  ====
"""

from __future__ import annotations

import getpass
import json
import math
import socket
import uuid
from typing import Any, Dict, List, Optional

import attr
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from zope.interface import implementer

from funcx_endpoint.config.model import Config
from funcx_endpoint.endpoint.auth import Authenticator, AuthError, error_message, headers
from funcx_endpoint.endpoint.broker_info import BrokerInfo
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.endpoint.service import StartupError
from funcx_endpoint.lifecycle import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    IReadyPart,
)
from funcx_endpoint.observer import OneShotObserver
from funcx_endpoint.version import __version__
from funcx_endpoint.wire import ENDPOINT_COMMANDS, MESSAGE_BATCHES, TASK_STATES

NETWORK_ERRORS = (
    ConnectError,
    DNSLookupError,
    TimeoutError,
    ResponseFailed,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    OSError,
)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as repr() strings (``"inf"``), as funcX 1.0
    endpoints send config values: they are not JSON, and the service refuses them."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def wire_features(config: Config) -> List[str]:
    """The features beyond funcX 1.0 this endpoint offers the service at registration."""
    features = [MESSAGE_BATCHES] if config.message_batches else []
    if config.task_states:
        features.append(TASK_STATES)
    features.append(ENDPOINT_COMMANDS)  # cancel and stop over the task queue
    return features


def endpoint_metadata(endpoint_dir: EndpointDir, config: Config) -> Dict[str, Any]:
    """What the service learns about this endpoint at registration (strict JSON:
    ``max_workers_per_node = inf`` is sent as ``"inf"``)."""
    executor = config.executors[0]
    return _finite(
        {
            "endpoint_version": __version__,
            "hostname": socket.getfqdn(),
            "local_user": getpass.getuser(),
            "ip_address": None,
            "sdk_version": None,
            "implementation": "funcx-endpoint (Twisted)",
            "allowed_functions": config.allowed_functions,
            "heartbeat_period": config.heartbeat_period,
            "heartbeat_threshold": config.heartbeat_threshold,
            "wire_features": wire_features(config),
            "config": {
                "_type": "Config",
                "funcx_service_address": config.funcx_service_address,
                "heartbeat_period": config.heartbeat_period,
                "heartbeat_threshold": config.heartbeat_threshold,
                "task_timeout": config.task_timeout,
                "result_size_limit": config.result_size_limit,
                "executors": [
                    {
                        "_type": "HighThroughputExecutor",
                        "label": executor.label,
                        "provider": type(executor.provider).__name__,
                        "max_workers_per_node": executor.max_workers_per_node,
                        "cores_per_worker": executor.cores_per_worker,
                    }
                ],
            },
        }
    )


@attr.s(auto_attribs=True, eq=False, repr=False)
@implementer(IReadyPart)
class Registration(Service):
    """Registers at start; ``broker_info`` is known once ``when_ready()`` fires.

    It registers ``endpoint_dir``'s endpoint with ``config`` through ``http``,
    as ``authenticator`` logs in, retrying after ``retry_delays`` (times of
    ``clock``); ``pool``, the HTTP connection pool, is closed on stop.
    """

    log = Logger()
    name = "registration"

    _clock: Any
    endpoint_dir: EndpointDir
    config: Config
    http: HTTPClient
    authenticator: Authenticator
    _pool: Any = None
    _retry_delays: tuple = (1.0, 2.0, 4.0)
    #: started by its owner (``funcx-endpoint start``): may clear a remote stop's
    #: lock; False for starts that are no one's decision (systemd, ``--keep-lock``)
    clear_lock: bool = attr.ib(default=True, kw_only=True)
    broker_info: Optional[BrokerInfo] = attr.ib(default=None, init=False)
    answer: Dict[str, Any] = attr.ib(factory=dict, init=False)
    _ready: Optional[Deferred[None]] = attr.ib(default=None, init=False)
    _registered: OneShotObserver[None] = attr.ib(factory=OneShotObserver, init=False)

    def startService(self) -> None:
        super().startService()
        self._ready = Deferred.fromCoroutine(self.register())
        self._ready.addBoth(self._registered.fire)

    def when_ready(self) -> Deferred[None]:
        """Fires once registered; fails with a StartupError saying why not."""
        return self._registered.when_fired()

    def ready_info(self) -> Dict[str, Any]:
        return {"endpoint_id": self.broker_info.endpoint_id} if self.broker_info else {}

    def stopService(self) -> Any:
        super().stopService()
        if self._ready is not None and not self._ready.called:
            self._ready.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None

    def requested_id(self) -> str:
        """The pinned id from ``endpoint.json``, or a new one."""
        return self.endpoint_dir.endpoint_id() or str(uuid.uuid4())

    async def register(self) -> None:
        endpoint_id = self.requested_id()
        url = self.config.funcx_service_address + "/endpoints"
        metadata = endpoint_metadata(self.endpoint_dir, self.config)
        if self.clear_lock:
            metadata["clear_lock"] = True
        body = {
            "endpoint_name": self.endpoint_dir.name,
            "endpoint_uuid": endpoint_id,
            "metadata": metadata,
        }
        attempt = 0
        while True:
            try:
                answer = await self._post(url, body)
                break
            except NETWORK_ERRORS as e:
                if _host_mismatch(e):
                    raise StartupError(
                        f"the certificate of the funcX service at "
                        f"{self.config.funcx_service_address} is not for that host name "
                        f"({_describe(e)}); funcx_service_address in config.py must name a "
                        f"host the service's certificate covers",
                        EX_CONFIG,
                    ) from None
                if _tls_failure(e):
                    raise StartupError(
                        f"the funcX service at {self.config.funcx_service_address} failed TLS "
                        f"verification ({_describe(e)}); for a private service set "
                        f"service_ca_file in config.py to the CA file it printed",
                        EX_CONFIG,
                    ) from None
                if attempt >= len(self._retry_delays):
                    raise StartupError(
                        f"cannot reach the funcX service at {self.config.funcx_service_address}: "
                        f"{_describe(e)}; is it running, and is funcx_service_address right? "
                        f"(retried {attempt} times)",
                        EX_TEMPFAIL,
                    ) from None
                delay = self._retry_delays[attempt]
                attempt += 1
                self.log.warn(
                    "Registration: the service is unreachable ({error}); retrying in {delay:g} s",
                    error=_describe(e),
                    delay=delay,
                )
                await _sleep(self._clock, delay)
        returned = answer.get("endpoint_id")
        if not returned:
            raise StartupError(
                f"the service's registration answer has no endpoint_id: {json.dumps(answer)[:300]}",
                EX_DATAERR,
            )
        if str(returned) != endpoint_id:
            raise StartupError(
                f"the service registered this endpoint as {returned}, not as {endpoint_id} "
                f"(the id in {self.endpoint_dir.endpoint_json}); refusing to continue",
                EX_SOFTWARE,
            )
        try:
            self.broker_info = BrokerInfo.from_registration(answer)
        except ValueError as e:
            raise StartupError(f"bad registration answer: {e}", EX_DATAERR) from None
        self.answer = answer
        data = self.endpoint_dir.read_endpoint_json()
        data.update(
            {
                "endpoint_id": endpoint_id,
                "service": self.config.funcx_service_address,
                # Where the broker is, its password redacted: for `diagnose`.
                "broker": {
                    "tasks": self.broker_info.tasks.url.redacted(),
                    "results": self.broker_info.results.url.redacted(),
                },
            }
        )
        self.endpoint_dir.write_endpoint_json(data)
        self.log.info(
            "Registered as endpoint {endpoint_id} with {service}",
            endpoint_id=endpoint_id,
            service=self.config.funcx_service_address,
        )

    async def _post(self, url: str, body: Dict[str, Any]) -> Dict[str, Any]:
        try:
            token = await self.authenticator.token()
        except AuthError as e:
            raise _auth_failure(e) from None

        for retry_auth in (True, False):
            request_headers = headers(
                {
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                }
            )
            response = await self.http.post(
                url, data=json.dumps(body, allow_nan=False).encode(), headers=request_headers
            )
            raw = await response.content()
            try:
                data = json.loads(raw)
            except ValueError:
                data = {"message": raw[:300].decode(errors="replace")}
            if not isinstance(data, dict):
                data = {"message": str(data)[:300]}
            if response.code == 401 and retry_auth:
                # A cached token the service no longer knows: get a fresh one, once.
                try:
                    token = await self.authenticator.token(force_new=True)
                except AuthError as e:
                    raise _auth_failure(e) from None
                continue
            break
        code = response.code
        if 200 <= code < 300:
            return data
        message = error_message(data)
        if code in (409, 410, 423):
            what = {409: "refused", 410: "gone (deleted)", 423: "locked (stopped remotely)"}[code]
            raise StartupError(
                f"the service refused the registration: endpoint {body['endpoint_uuid']} is "
                f"{what}: {message}",
                EX_UNAVAILABLE,
            )
        if code == 429:
            raise StartupError(
                f"the service refused the registration: a quota of this user is reached "
                f"({message}); delete endpoints you no longer use (funcx-endpoint list "
                f"--remote, delete --remote ID) or ask the service's administrator",
                EX_UNAVAILABLE,
            )
        if code in (401, 403):
            raise StartupError(
                f"the service refused the registration ({code}): {message}", EX_NOPERM
            )
        if code in (400, 422):
            raise StartupError(
                f"the service rejected the registration request ({code}): {message}",
                EX_DATAERR,
            )
        if code >= 500:
            raise StartupError(
                f"the service failed ({code}): {message}; try again later", EX_TEMPFAIL
            )
        raise StartupError(f"unexpected answer {code} from the service: {message}", EX_UNAVAILABLE)


def _tls_failure(error: BaseException) -> bool:
    """The certificate was refused: not trusted (``SSL.Error``) or not for this
    host name (service-identity's ``VerificationError``); retrying cannot help."""
    reasons = getattr(error, "reasons", None) or []
    return any(r.check(SSL.Error, VerificationError, CertificateError) for r in reasons)


def _host_mismatch(error: BaseException) -> bool:
    reasons = getattr(error, "reasons", None) or []
    return any(r.check(VerificationError) for r in reasons)


def _describe(error: BaseException) -> str:
    if isinstance(error, ResponseFailed):
        reasons = getattr(error, "reasons", None) or []
        return "; ".join(r.getErrorMessage() for r in reasons) or "the connection failed"
    return str(error) or type(error).__name__


def _sleep(clock: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


def _auth_failure(error: AuthError) -> StartupError:
    """Refused, or no credentials at all: a permission problem; the auth service
    failing (5xx): a temporary one."""
    if error.status is not None and error.status >= 500:
        return StartupError(f"{error.message}; try again later", EX_TEMPFAIL)
    return StartupError(error.message, EX_NOPERM)
