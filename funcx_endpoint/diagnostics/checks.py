"""The checks of ``funcx-endpoint diagnose``.

Each check gives a :class:`Check`: ``ok``, ``WARN`` (worth a look, not an
error), ``FAIL`` (the endpoint cannot work so) or ``skip`` (could not be
checked, because an earlier check failed or something is not known yet), with
what was seen and, when not ok, what to do.

Local checks (daemon state, spool disk space, log errors) read files and are
plain functions, run before the reactor.  Network checks are coroutines on
the reactor, each bounded by a timeout of the injected clock: the service
over HTTPS (reachability, TLS, version, clock skew from its ``Date`` header),
the credentials (a token, and the endpoint's own record), and the broker (TCP,
TLS, and an AMQP ``Connection.Start`` in answer to the protocol header).  The
broker's address is what the last registration answered, saved (without its
password) in ``endpoint.json``.
"""

from __future__ import annotations

import email.utils
import json
import os
import shutil
import struct
from typing import Any, Dict, List, Optional, Tuple

import attr
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from funcx_endpoint.amqp.connection import AMQPURL, AMQPURLError
from funcx_endpoint.config.model import Config
from funcx_endpoint.endpoint.auth import (
    AuthError,
    config_authenticator,
    error_message,
    headers,
    http_client,
)
from funcx_endpoint.endpoint.layout import EndpointDir, EndpointState
from funcx_endpoint.tls import trust_root

OK, WARN, FAIL, SKIP = "ok", "WARN", "FAIL", "skip"
#: Clock skew against the service: up to WARN_SKEW seconds is fine, over FAIL_SKEW
#: tokens and heartbeats go wrong.
WARN_SKEW = 5.0
FAIL_SKEW = 60.0
#: Free space of the spool's file system below which results cannot be kept safe.
FAIL_FREE_BYTES = 100 * 1024 * 1024
WARN_FREE_BYTES = 1024 * 1024 * 1024
LOG_TAIL_BYTES = 256 * 1024
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


@attr.s(auto_attribs=True)
class Check:
    """One line of the check list."""

    name: str
    outcome: str
    detail: str
    advice: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome == FAIL

    def as_dict(self) -> Dict[str, str]:
        return attr.asdict(self)


# --- local checks -------------------------------------------------------------


def check_daemon(ep: EndpointDir, status: Optional[Dict[str, Any]], error: str = "") -> Check:
    """The daemon's state from its files, and what its control socket said."""
    state = ep.state()
    if state is EndpointState.DISCONNECTED:
        return Check(
            "daemon",
            FAIL,
            f"the daemon (pid {ep.read_pid()}) died without cleaning up",
            "see the last errors of the log below; `funcx-endpoint start` cleans up and starts it",
        )
    if state is EndpointState.ELSEWHERE:
        return Check("daemon", SKIP, f"runs on host {ep.runs_elsewhere()}", "diagnose it there")
    if state is not EndpointState.RUNNING:
        return Check("daemon", OK, f"{state.value} (not running)")
    if status is None:
        return Check(
            "daemon",
            FAIL,
            f"running (pid {ep.read_pid()}) but its control socket did not answer: {error}",
            "it may be stuck: `funcx-endpoint stop` then `start` it",
        )
    connections = {
        k: v for k, v in status.items() if k.startswith("broker_") and k.endswith("_connection")
    }
    down = {k: v for k, v in connections.items() if v != "connected"}
    detail = f"running (pid {status.get('pid')}, {status.get('phase', '?')})"
    if connections:
        detail += "; broker " + ", ".join(
            f"{k[len('broker_') : -len('_connection')]} {v}" for k, v in connections.items()
        )
    if down:
        return Check(
            "daemon", WARN, detail, "the broker connection is not up: see the broker check"
        )
    return Check("daemon", OK, detail)


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_spool(ep: EndpointDir) -> Check:
    """Free space (and write access) where unconfirmed results are spooled."""
    where = _existing_ancestor(ep.spool_dir)
    try:
        usage = shutil.disk_usage(where)
    except OSError as e:
        return Check("spool disk", FAIL, f"cannot stat {where}: {e}", "check the file system")
    spooled = 0
    if os.path.isdir(ep.spool_dir):
        spooled = len(os.listdir(ep.spool_dir))
    detail = (
        f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB at {where}; "
        f"{spooled} result(s) spooled"
    )
    if not os.access(where, os.W_OK):
        return Check("spool disk", FAIL, detail + "; not writable", f"make {where} writable")
    if usage.free < FAIL_FREE_BYTES:
        return Check(
            "spool disk", FAIL, detail, "free some space: results cannot be kept safe without it"
        )
    if usage.free < WARN_FREE_BYTES:
        return Check("spool disk", WARN, detail, "little space left; free some")
    return Check("spool disk", OK, detail)


def log_errors(path: str, limit: int = 5, tail_bytes: int = LOG_TAIL_BYTES) -> List[str]:
    """The last ``limit`` error (or critical) entries of the log at ``path``, text
    or JSON lines, each with its continuation lines (tracebacks)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - tail_bytes))
        text = f.read().decode(errors="replace")
    lines = text.splitlines()
    if size > tail_bytes and lines:
        lines = lines[1:]  # a partial first line
    entries: List[List[str]] = []
    current: Optional[List[str]] = None
    for line in lines:
        if line.startswith("\t"):
            if current is not None:
                current.append(line)
            continue
        current = None
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            level = event.get("log_level") if isinstance(event, dict) else None
            name = level.get("name") if isinstance(level, dict) else level
            if name in ("error", "critical"):
                entries.append([f"[{name}] {event.get('text') or event.get('log_format', '')}"])
            continue
        if "[error]" in line or "[critical]" in line:
            current = [line]
            entries.append(current)
    # An entry with a long traceback keeps its first line and its last lines.
    return ["\n".join(e if len(e) <= 12 else e[:1] + ["\t..."] + e[-10:]) for e in entries[-limit:]]


def check_log(path: str) -> Check:
    """The last errors in the endpoint's log."""
    if not os.path.exists(path):
        return Check("log", SKIP, f"no log at {path} (never started?)")
    try:
        errors = log_errors(path)
    except OSError as e:
        return Check("log", WARN, f"cannot read {path}: {e}")
    if not errors:
        return Check("log", OK, f"no errors in the end of {path}")
    shown = "\n".join(errors)
    return Check(
        "log",
        WARN,
        f"{len(errors)} recent error(s) in {path}; the last:\n{shown}",
        "they may be old; see the log for what happened around them",
    )


def broker_urls(ep: EndpointDir) -> List[AMQPURL]:
    """The broker addresses of the last registration (tasks, then results if other)."""
    saved = ep.read_endpoint_json().get("broker")
    urls: List[AMQPURL] = []
    if isinstance(saved, dict):
        for key in ("tasks", "results"):
            try:
                url = AMQPURL.parse(str(saved.get(key)))
            except AMQPURLError:
                continue
            if all((u.host, u.port, u.scheme) != (url.host, url.port, url.scheme) for u in urls):
                urls.append(url)
    return urls


# --- network checks -----------------------------------------------------------


def _tls_failure(failure_or_error: Any) -> bool:
    reasons = getattr(failure_or_error, "reasons", None)
    if reasons is None and isinstance(failure_or_error, Failure):
        reasons = [failure_or_error]
    return any(isinstance(r, Failure) and r.check(SSL.Error) for r in reasons or ())


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(error) or type(error).__name__


def _timed_out(e: BaseException) -> bool:
    """Whether ``e`` is what a timeout (of :func:`_bounded` or of connecting) raised."""
    return isinstance(e, (defer.TimeoutError, error.TimeoutError, error.ConnectingCancelledError))


def _bounded(d: Deferred[Any], timeout: float, clock: Any) -> Deferred[Any]:
    d.addTimeout(timeout, clock)
    return d


@attr.s(auto_attribs=True)
class ServiceAnswer:
    """What ``GET /version`` told: the checks of the service and of the clock."""

    service: Check
    clock: Check
    reachable: bool


def _json_or_empty(body: bytes) -> Any:
    """The JSON ``body`` decodes to ({} if it is not JSON)."""
    try:
        return json.loads(body)
    except ValueError:
        return {}


async def check_service(reactor: Any, config: Config, timeout: float) -> ServiceAnswer:
    """``GET <service>/version``: reachable, TLS verified, answering; and the skew
    of this clock against its ``Date`` header."""
    address = config.funcx_service_address
    try:
        http, pool = http_client(reactor, config.service_ca_file)
    except OSError as e:
        check = Check("service", FAIL, f"cannot read service_ca_file: {e}", "fix service_ca_file")
        return ServiceAnswer(check, Check("clock", SKIP, "service not asked"), False)
    try:
        before = reactor.seconds()
        response = await _bounded(
            http.get(address + "/version", headers=headers({"Accept": "application/json"})),
            timeout,
            reactor,
        )
        body = await _bounded(response.content(), timeout, reactor)
        after = reactor.seconds()
    except Exception as e:
        skipped = Check("clock", SKIP, "the service did not answer")
        if _tls_failure(e):
            return ServiceAnswer(
                Check(
                    "service",
                    FAIL,
                    f"{address}: TLS verification failed ({_describe(e)})",
                    "set service_ca_file in config.py to the service's CA file (a private "
                    "service prints it), or fix the service's certificate",
                ),
                skipped,
                False,
            )
        what = f"no answer within {timeout:g} s" if _timed_out(e) else None
        return ServiceAnswer(
            Check(
                "service",
                FAIL,
                f"cannot reach {address}: {what or _describe(e)}",
                "is the service running, and is funcx_service_address in config.py right? "
                "(a proxy or firewall in between?)",
            ),
            skipped,
            False,
        )
    finally:
        await pool.closeCachedConnections()
    data = _json_or_empty(body)
    tls = "TLS verified" if address.startswith("https:") else "plain HTTP (no TLS)"
    if response.code != 200 or not isinstance(data, dict):
        service = Check(
            "service",
            FAIL,
            f"{address}/version answered {response.code}",
            "is funcx_service_address the service's base URL (ending in /v2)?",
        )
    else:
        service = Check(
            "service",
            OK if address.startswith("https:") else WARN,
            f"{address} answers ({tls}; API {data.get('api', '?')})",
            "" if address.startswith("https:") else "use https:// outside a test setup",
        )
    return ServiceAnswer(service, clock_check(response, before, after), True)


def clock_check(response: Any, before: float, after: float) -> Check:
    """The skew of this clock against the ``Date`` header of ``response``."""
    dates = response.headers.getRawHeaders(b"date") or []
    try:
        stamp = email.utils.parsedate_to_datetime(dates[0].decode()).timestamp()
    except (IndexError, TypeError, ValueError):
        return Check("clock", SKIP, "the service sent no Date header")
    return skew_check((before + after) / 2 - stamp, after - before)


def skew_check(skew: float, round_trip: float = 0.0) -> Check:
    """``skew`` seconds ahead of the service (the Date header has 1 s resolution)."""
    slack = 1.0 + round_trip / 2
    size = max(0.0, abs(skew) - slack)
    detail = f"this clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} the service"
    if size > FAIL_SKEW:
        return Check("clock", FAIL, detail, "synchronize the clock (NTP: chrony, timesyncd)")
    if size > WARN_SKEW:
        return Check("clock", WARN, detail, "synchronize the clock (NTP)")
    return Check("clock", OK, detail)


async def check_credentials(reactor: Any, config: Config, ep: EndpointDir, timeout: float) -> Check:
    """A token for these credentials, and the service's record of this endpoint."""
    auth, pool = config_authenticator(reactor, config, ep.config_dir)
    http = auth.http
    endpoint_id = ep.endpoint_id()
    path = f"/endpoints/{endpoint_id}" if endpoint_id else "/endpoints"
    try:
        for force_new in (False, True):
            token = await _bounded(
                Deferred.fromCoroutine(auth.token(force_new=force_new)), timeout, reactor
            )
            response = await _bounded(
                http.get(
                    config.funcx_service_address + path,
                    headers=headers(
                        {"Authorization": f"Bearer {token}", "Accept": "application/json"}
                    ),
                ),
                timeout,
                reactor,
            )
            body = await _bounded(response.content(), timeout, reactor)
            if response.code != 401:
                break
    except AuthError as e:
        return Check("credentials", FAIL, e.message, "set valid client credentials")
    except Exception as e:
        return Check("credentials", FAIL, f"the service did not answer: {_describe(e)}")
    finally:
        await pool.closeCachedConnections()
    data = _json_or_empty(body)
    if not isinstance(data, (dict, list)):
        data = {}
    message = error_message(data) if isinstance(data, dict) else ""
    if response.code == 401:
        return Check(
            "credentials",
            FAIL,
            f"the service refused the token (401: {message})",
            "check FUNCX_SDK_CLIENT_ID / FUNCX_SDK_CLIENT_SECRET; `funcx-endpoint logout` "
            "drops a saved token",
        )
    if endpoint_id is None:
        if response.code == 200:
            return Check("credentials", OK, "accepted (this endpoint is not registered yet)")
        return Check("credentials", FAIL, f"GET /endpoints answered {response.code}: {message}")
    if response.code in (403, 404):
        return Check(
            "credentials",
            FAIL,
            f"accepted, but endpoint {endpoint_id} is not found for them ({response.code})",
            "are these the credentials it was registered with? If the endpoint was deleted, "
            "remove endpoint.json to register anew",
        )
    if response.code == 410:
        return Check(
            "credentials",
            FAIL,
            f"accepted, but endpoint {endpoint_id} was deleted at the service",
            "remove endpoint.json to register under a new id",
        )
    if response.code != 200 or not isinstance(data, dict):
        return Check("credentials", FAIL, f"{path} answered {response.code}: {message}")
    detail = f"accepted; endpoint {endpoint_id} is {data.get('status', '?')} at the service"
    if data.get("locked"):
        return Check(
            "credentials",
            WARN,
            detail + " and locked (stopped remotely)",
            "its next registration is refused once; start it again to run it",
        )
    return Check("credentials", OK, detail)


class _AMQPProbe(Protocol):
    """Sends the AMQP 0-9-1 protocol header; fires with the first frame's start."""

    def __init__(self) -> None:
        self.answer: Deferred[bytes] = Deferred()
        self._data = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(AMQP_HEADER)

    def dataReceived(self, data: bytes) -> None:
        self._data += data
        if len(self._data) >= 11 and not self.answer.called:
            self.answer.callback(self._data[:11])
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.answer.called:
            self.answer.errback(reason)


def parse_connection_start(frame: bytes) -> Optional[str]:
    """None if ``frame`` starts an AMQP Connection.Start method frame, else what it is."""
    if frame.startswith(b"AMQP"):
        return f"the server wants another AMQP version ({frame[:8]!r})"
    frame_type, _channel, _size, class_id, method_id = struct.unpack("!BHIHH", frame[:11])
    if (frame_type, class_id, method_id) != (1, 10, 10):
        return f"not an AMQP Connection.Start (frame {frame_type}, method {class_id}.{method_id})"
    return None


async def check_broker(
    reactor: Any, url: AMQPURL, ca_file: Optional[str], timeout: float, label: str = "broker"
) -> Check:
    """TCP (and TLS, for amqps) to the broker, and its answer to the AMQP header."""
    where = f"{url.scheme}://{url.host}:{url.port}"
    endpoint: Any = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if url.tls:
        try:
            options = optionsForClientTLS(url.host, trustRoot=trust_root(ca_file))
        except OSError as e:
            return Check(label, FAIL, f"cannot read the broker's CA file: {e}", "fix amqp_ca_file")
        endpoint = wrapClientTLS(options, endpoint)
    probe = _AMQPProbe()
    connected: Optional[Any] = None
    try:
        connected = await _bounded(connectProtocol(endpoint, probe), timeout, reactor)
        frame = await _bounded(probe.answer, timeout, reactor)
    except Exception as e:
        failure = Failure(e)
        if _tls_failure(failure) or _tls_failure(e):
            return Check(
                label,
                FAIL,
                f"{where}: TLS verification failed ({_describe(e)})",
                "set amqp_ca_file in config.py to the broker's CA file (or service_ca_file if "
                "the same CA signs both)",
            )
        what = f"no answer within {timeout:g} s" if _timed_out(e) else None
        return Check(
            label,
            FAIL,
            f"cannot reach {where}: {what or _describe(e)}",
            f"is the broker running and reachable from here (firewall: outbound port {url.port})?",
        )
    finally:
        if connected is not None and connected.transport is not None:
            connected.transport.abortConnection()
    problem = parse_connection_start(frame)
    if problem is not None:
        return Check(label, FAIL, f"{where}: {problem}", "is this the broker's AMQP port?")
    tls = "TLS verified" if url.tls else "plain AMQP (no TLS)"
    return Check(
        label,
        OK if url.tls else WARN,
        f"{where} answers AMQP 0-9-1 ({tls}; its password is not checked here)",
        "" if url.tls else "plain AMQP: use amqps outside a test setup",
    )


async def network_checks(
    reactor: Any, config: Config, ep: EndpointDir, urls: List[AMQPURL], timeout: float
) -> List[Check]:
    """Service, clock, credentials and broker (at ``urls``, see :func:`broker_urls`)
    checks, run concurrently; each step (connecting, an answer) bounded by ``timeout``."""
    from twisted.internet.defer import gatherResults

    service_d = Deferred.fromCoroutine(check_service(reactor, config, timeout))
    ca_file = config.amqp_ca_file or config.service_ca_file
    broker_ds = [
        Deferred.fromCoroutine(
            check_broker(reactor, url, ca_file, timeout, "broker" if i == 0 else "broker results")
        )
        for i, url in enumerate(urls)
    ]
    answer: ServiceAnswer = await service_d
    checks = [answer.service, answer.clock]
    if answer.reachable:
        checks.append(await Deferred.fromCoroutine(check_credentials(reactor, config, ep, timeout)))
    else:
        checks.append(Check("credentials", SKIP, "the service is not reachable"))
    if broker_ds:
        checks.extend(await gatherResults(broker_ds))
    else:
        checks.append(
            Check(
                "broker",
                SKIP,
                "its address is not known yet: the service tells it at registration",
                "start the endpoint once, then diagnose again",
            )
        )
    return checks


def summarize(checks: List[Check]) -> Tuple[int, int, int]:
    """(failed, warned, ok) counts."""
    return (
        sum(c.outcome == FAIL for c in checks),
        sum(c.outcome == WARN for c in checks),
        sum(c.outcome == OK for c in checks),
    )
