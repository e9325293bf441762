"""Fuzz surfaces: every input the endpoint and the service take from outside.

Each :class:`Surface` builds the real component once (on a ``Clock`` or a
``MemoryReactorClock`` where it can, a real process where the parsing under
test needs a real socket), feeds it one input at a time, and classifies what
happened (:class:`Tally`):

``5xx``
    an HTTP answer of 500 or more;
``4xx`` and ``unanswered`` (counted, not faults)
    REST inputs answered 400-499, and raw requests over TCP whose connection
    ended with no HTTP answer at all;
``hang``
    no answer where one was due (a request not answered, a message neither
    settled nor taken, a connection neither answered nor closed), or the
    component no longer serves a well-formed input afterwards;
``crash``
    an exception out of the component, or a process that died;
``tracebacks``
    log events carrying a failure (what ``log.failure`` writes as a traceback),
    or "Traceback" lines in a service process's log.

The hypothesis strategies give raw bytes, not only valid strings.  The suite
(tests/test_fuzz.py) runs a bounded number of examples per surface and
asserts zero of each; ``benchmarks/fuzz/run`` runs many and prints the counts.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import tempfile
import uuid
from io import BytesIO, StringIO
from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import implementer

__all__ = ["SURFACES", "Surface", "Tally", "make_surface", "run_surface"]

_MAX_EXAMPLES_SHOWN = 5


@attr.s(auto_attribs=True)
class Tally:
    """Counts of one surface's inputs and of what went wrong."""

    name: str
    inputs: int = 0
    five_xx: int = 0
    four_xx: int = 0
    unanswered: int = 0
    hangs: int = 0
    crashes: int = 0
    tracebacks: int = 0
    examples: List[str] = attr.Factory(list)

    def bad(self) -> int:
        return self.five_xx + self.hangs + self.crashes + self.tracebacks

    def note(self, kind: str, data: Any, detail: str = "") -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < _MAX_EXAMPLES_SHOWN:
            self.examples.append(f"{kind}: {data!r:.300} {detail:.300}")

    def line(self) -> str:
        return (
            f"{self.name:<22} inputs {self.inputs:>7}  4xx {self.four_xx:>5}  "
            f"unanswered {self.unanswered:>5}  5xx {self.five_xx:>5}  "
            f"hangs {self.hangs:>5}  crashes {self.crashes:>5}  tracebacks {self.tracebacks:>5}"
        )


@implementer(ILogObserver)
class _FailureWatch:
    """Counts log events with a failure (tracebacks) or at critical level."""

    def __init__(self) -> None:
        self.count = 0
        self.last: Optional[str] = None

    def __call__(self, event: Dict[str, Any]) -> None:
        if "log_failure" in event or event.get("log_level") == LogLevel.critical:
            self.count += 1
            failure = event.get("log_failure")
            self.last = failure.getErrorMessage() if failure is not None else str(event)[:200]


class Surface:
    """One input surface: ``strategy`` draws inputs, :meth:`feed` takes one."""

    name = "surface"
    strategy: Any = st.binary()

    def __init__(self) -> None:
        self.tally = Tally(self.name)
        self._watch = _FailureWatch()

    def start(self) -> None:
        globalLogPublisher.addObserver(self._watch)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self._watch)

    def feed(self, data: Any) -> None:
        """Feed one input; count it and what went wrong."""
        self.tally.inputs += 1
        before = self._watch.count
        try:
            self.check(data)
        except _Hang as e:
            self.tally.note("hangs", data, str(e))
        except Exception as e:
            self.tally.note("crashes", data, f"{type(e).__name__}: {e}")
        if self._watch.count > before:
            self.tally.tracebacks += self._watch.count - before
            if len(self.tally.examples) < _MAX_EXAMPLES_SHOWN:
                self.tally.examples.append(f"traceback: {data!r:.300} {self._watch.last}")

    def check(self, data: Any) -> None:
        raise NotImplementedError


class _Hang(Exception):
    pass


# -- REST, in process -------------------------------------------------------------------

_TOKEN = "<token>"
_paths = st.one_of(
    st.sampled_from(
        [
            "/v2/version",
            "/v2/functions",
            "/v2/endpoints",
            "/v2/submit",
            "/v2/batch_status",
            "/v2/tasks/" + str(uuid.uuid4()),
            "/v2/endpoints/" + str(uuid.uuid4()) + "/status",
            "/v2/oauth2/token",
            "/v2/oauth2/userinfo",
            "/v2/containers",
        ]
    ),
    st.binary(max_size=60).map(lambda b: "/v2/" + b.decode("latin-1")),
    st.text(max_size=40).map(lambda t: "/" + t),
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_bodies = st.one_of(
    st.binary(max_size=300),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(
            [
                "tasks",
                "function",
                "function_name",
                "endpoint_name",
                "endpoint_uuid",
                "task_ids",
                "function_uuid",
                "endpoint",
                "payload",
                "metadata",
                "create_queue",
            ]
        ),
        _json_values,
        max_size=5,
    ).map(lambda v: json.dumps(v).encode()),
)
_HEADER_NAMES = [
    b"Authorization",
    b"Content-Type",
    b"Accept",
    b"Content-Length",
    b"X-Forwarded-For",
    b"User-Agent",
    b"X-Other",
]


def _headers(values: Any) -> Any:
    return st.lists(st.tuples(st.sampled_from(_HEADER_NAMES), values), max_size=4)


_ascii = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
#: Header values a client can send as text (the token, JSON types, ASCII).
_text_headers = _headers(
    st.one_of(
        st.just(_TOKEN.encode()),
        st.sampled_from([b"application/json", b"application/x-www-form-urlencoded"]),
        _ascii.map(str.encode),
        _ascii.map(lambda t: b"Bearer " + t.encode()),
    )
)
#: Any bytes (the issue 12 finding: non-UTF-8 Authorization or Content-Type).
_raw_values = st.one_of(
    st.just(_TOKEN.encode()),
    st.binary(max_size=80),
    st.binary(max_size=40).map(lambda b: b"Bearer " + b),
    st.binary(max_size=20).map(lambda b: b"application/json" + b),
)
_raw_headers = st.tuples(
    st.one_of(st.none(), _raw_values),  # Authorization
    st.one_of(st.none(), _raw_values),  # Content-Type
    _headers(_raw_values),
).map(
    lambda t: (
        [(b"Authorization", v) for v in [t[0]] if v is not None]
        + [(b"Content-Type", v) for v in [t[1]] if v is not None]
        + t[2]
    )
)
_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "POST", "POST"])


class _ServiceSurface(Surface):
    """A surface of an in-process service (funcx_endpoint.testing.inprocess) on a
    test clock, started with the surface and stopped with it."""

    def start(self) -> None:
        super().start()
        from funcx_endpoint.testing.inprocess import InProcessService

        self.clock = Clock()
        self.service = InProcessService(tempfile.mkdtemp(prefix="funcx-fuzz-"), self.clock)
        self.service.startService()

    def stop(self) -> None:
        self.service.stopService()
        self.clock.advance(0)
        super().stop()


class RestInProcess(_ServiceSurface):
    """Methods, paths, headers and bodies against the service's real resource
    (funcx_endpoint.testing.inprocess), through treq's StubTreq."""

    name = "rest (in process)"
    strategy = st.tuples(_methods, _paths, _text_headers, _bodies)

    def start(self) -> None:
        super().start()
        from treq.testing import StubTreq

        self.token = self.service.issue_token()
        self.http: Any = StubTreq(self.service.api_resource)

    def check(self, data: Any) -> None:
        from twisted.web.http_headers import Headers

        method, path, headers, body = data
        raw = Headers()
        for name, value in headers:
            if value == _TOKEN.encode():
                value = b"Bearer " + self.token.encode()
            if b"\r" in value or b"\n" in value or name == b"Content-Length":
                continue  # what no HTTP client can send as one header
            raw.addRawHeader(name, value)
        try:
            url = "http://in-process" + path
            d = self.http.request(method, url.encode("latin-1"), headers=raw, data=body)
        except Exception:
            return  # the client refused to send it
        self.http.flush()
        self.clock.advance(0)
        self.http.flush()
        outcome: List[Any] = []
        d.addBoth(outcome.append)
        if not outcome:
            raise _Hang("no answer")
        response = outcome[0]
        if hasattr(response, "code"):
            if response.code >= 500:
                self.tally.note("five_xx", data, str(response.code))
            elif response.code >= 400:
                self.tally.four_xx += 1
        # A failure here is the client's (a URL it cannot parse), not the service's.


class RestHeadersInProcess(RestInProcess):
    """:class:`RestInProcess` with header values of any bytes."""

    name = "rest headers (in process)"
    strategy = st.tuples(_methods, _paths, _raw_headers, _bodies)


# -- REST headers and request lines, over a real TCP socket ------------------------------


#: A declared body up to this size is sent (a bigger one is not: the service waits for it).
_MAX_BODY_SENT = 1024 * 1024


def _declared_body(headers: List[Tuple[bytes, bytes]]) -> Optional[bytes]:
    """The body that ``headers`` promise, as Twisted reads them (a valid Content-Length
    or ``Transfer-Encoding: chunked``), so that the service is not left waiting for it;
    ``b""`` if none; None if the promised body is too big to send."""
    body = b""
    for name, value in headers:
        value = value.strip(b" \t")
        if name.lower() == b"content-length" and value.isdigit():
            if len(value) > 8 or int(value) > _MAX_BODY_SENT:
                return None
            body = b"x" * int(value)
        elif name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
            body = b"0\r\n\r\n"
    return body


class RestOverTCP(Surface):
    """Raw request lines and headers to a real ``funcx-service`` process over
    TLS (the parsing of twisted.web and webservice/http.py): 5xx, no answer
    within ``timeout`` seconds, the process gone, tracebacks in its log."""

    name = "rest headers (tcp)"
    timeout = 3.0
    strategy = st.tuples(
        st.sampled_from([b"GET", b"POST", b"POST", b"PUT", b"\xff\xfe", b""]),
        st.one_of(
            st.sampled_from([b"/v2/version", b"/v2/functions", b"/v2/submit", b"/v2/oauth2/token"]),
            st.binary(max_size=40),
        ),
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(_HEADER_NAMES), st.binary(max_size=30)),
                st.binary(max_size=200),
            ),
            max_size=5,
        ),
        st.one_of(st.just(0), st.integers(16_000, 40_000)),  # a long header line, half the time
    )

    def start(self) -> None:
        super().start()
        from funcx_endpoint.testing.service import shared_service

        self.service = shared_service()
        base = self.service.base_url  # https://host:port/v2
        hostport = base.split("://", 1)[1].split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        self.address = (host, int(port))
        self.context = ssl.create_default_context(cafile=self.service.ca_file)
        self.context.check_hostname = False
        self._log_tracebacks = self._count_log_tracebacks()

    def _count_log_tracebacks(self) -> int:
        try:
            with open(self.service.log_file, "rb") as f:
                return f.read().count(b"Traceback")
        except OSError:
            return 0

    def check(self, data: Any) -> None:
        method, path, headers, long_line = data
        lines = [method + b" " + (path or b"/") + b" HTTP/1.1", b"Host: localhost"]
        sent = []
        for name, value in headers:
            name = name.replace(b"\r", b"").replace(b"\n", b"").replace(b":", b"") or b"X"
            value = value.replace(b"\r", b"").replace(b"\n", b"")
            lines.append(name + b": " + value)
            sent.append((name, value))
        if long_line:
            lines.append(b"X-Long: " + b"a" * long_line)
        lines.append(b"Connection: close")
        body = _declared_body(sent)
        request = b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")
        answer = b""
        try:
            with socket.create_connection(self.address, timeout=self.timeout) as raw:
                with self.context.wrap_socket(raw, server_hostname="localhost") as conn:
                    conn.sendall(request)
                    while True:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
        except (socket.timeout, TimeoutError):
            if not answer and body is not None:
                raise _Hang(f"no answer within {self.timeout:g} s") from None
            # else: a body too big to send was declared; the service rightly waits for it
        except (ConnectionError, ssl.SSLError, OSError):
            pass  # closed on us: an answer of sorts
        if not self.service.running:
            raise RuntimeError("the service process died")
        status = answer.split(b" ", 2)[1:2] if answer.startswith(b"HTTP/") else []
        if not status or not status[0].isdigit():
            self.tally.unanswered += 1
        elif int(status[0]) >= 500:
            self.tally.note("five_xx", data, status[0].decode())
        elif int(status[0]) >= 400:
            self.tally.four_xx += 1
        now = self._count_log_tracebacks()
        if now > self._log_tracebacks:
            self.tally.tracebacks += now - self._log_tracebacks
            if len(self.tally.examples) < _MAX_EXAMPLES_SHOWN:
                self.tally.examples.append(f"traceback in the service log: {data!r:.200}")
            self._log_tracebacks = now


# -- queue messages -------------------------------------------------------------------------


def _message_bodies() -> Any:
    from funcx_endpoint.wire import Result, Task, pack

    def packed_task(fields: Tuple[str, str, Optional[str]]) -> bytes:
        task_id, buffer, function_id = fields
        return pack(Task(task_id, buffer, function_id=function_id))

    def packed_result(fields: Tuple[str, str]) -> bytes:
        return pack(Result.success(fields[0], fields[1]))

    ids = st.uuids().map(str)
    tasks = st.tuples(ids, st.text(max_size=50), st.one_of(st.none(), ids)).map(packed_task)
    results = st.tuples(ids, st.text(max_size=50)).map(packed_result)

    def mutate(t: Tuple[bytes, int, bytes]) -> bytes:
        body, at, patch = t
        at = at % (len(body) + 1)
        return body[:at] + patch + body[at + len(patch) :]

    return st.one_of(
        st.binary(max_size=400),
        tasks,
        results,
        st.tuples(st.one_of(tasks, results), st.integers(0, 400), st.binary(max_size=6)).map(
            mutate
        ),
        st.one_of(tasks, results).map(lambda b: b[: len(b) // 2]),
        _json_values.map(lambda v: json.dumps(v).encode()),
    )


class TaskQueue(Surface):
    """Task-queue messages to the endpoint (the intake of endpoint/transport.py,
    over the fake broker of funcx_endpoint.testing.amqp): after each, a
    well-formed task must still reach the interchange."""

    name = "task queue (endpoint)"

    @property
    def strategy(self) -> Any:
        return _message_bodies()

    def start(self) -> None:
        super().start()
        from funcx_endpoint.amqp import topology
        from funcx_endpoint.amqp.spool import ResultSpool
        from funcx_endpoint.endpoint.broker_info import BrokerInfo
        from funcx_endpoint.endpoint.transport import build_transport
        from funcx_endpoint.testing.amqp import FakeBroker
        from funcx_endpoint.testing.interchanges import HoldingInterchange
        from funcx_endpoint.testing.threads import InlineThreads

        self.endpoint_id = str(uuid.uuid4())
        url = "amqp://endpoint:secret@broker.example:5672/%2F"
        info = BrokerInfo.from_registration(
            {
                "endpoint_id": self.endpoint_id,
                **topology.registration_queue_info(self.endpoint_id, url, url),
            }
        )
        self.queue = topology.task_queue(self.endpoint_id)
        self.clock = Clock()
        self.broker = FakeBroker(self.clock)
        self.broker.declare_endpoint(self.endpoint_id)
        self.fatal: List[Any] = []
        spool = ResultSpool(tempfile.mkdtemp(prefix="funcx-fuzz-spool-"), InlineThreads())
        self.transport, self.interchange = build_transport(
            self.clock,
            lambda: info,
            spool,
            HoldingInterchange,
            connect=self.broker.connection_service,
            on_fatal=lambda message, code: self.fatal.append((message, code)),
        )
        self.transport.startService()
        for side in ("results", "tasks"):
            self.broker.services[side].connect()
            self.clock.advance(0)

    def stop(self) -> None:
        self.transport.stopService()
        self.clock.advance(0)
        super().stop()

    def check(self, data: Any) -> None:
        from funcx_endpoint.wire import Task, pack

        self.broker.enqueue(self.queue, data)
        self.clock.advance(0)
        probe = Task(str(uuid.uuid4()), "probe")
        self.broker.enqueue(self.queue, pack(probe))
        self.clock.advance(0)
        results_channel = self.broker.services["results"].client
        if results_channel is not None and 1 in results_channel.channels:
            results_channel.channels[1].confirm()
            self.clock.advance(0)
        if self.fatal:
            raise RuntimeError(f"the transport gave up: {self.fatal[-1]}")
        if self.broker.violations:
            raise RuntimeError(f"AMQP violation: {self.broker.violations[-1]}")
        if probe.task_id not in self.interchange.held:
            raise _Hang("a well-formed task after it was not taken")
        self.interchange.answer(list(self.interchange.held))
        self.clock.advance(0)


class ResultsQueue(_ServiceSurface):
    """Results-queue messages to the service (webservice/ingest.py, in process):
    each must be acknowledged, and a well-formed result after it stored."""

    name = "results queue (service)"

    @property
    def strategy(self) -> Any:
        return _message_bodies()

    def start(self) -> None:
        super().start()
        self.endpoint_id = self.service.add_endpoint()
        self.clock.advance(0)

    def check(self, data: Any) -> None:
        acked: List[Any] = []
        self.service.broker.deliver(f"{self.endpoint_id}.results", data).addBoth(acked.append)
        for _ in range(3):
            self.clock.advance(0)
        if not acked:
            self.clock.advance(2.0)  # a retry after a database error
            if not acked:
                raise _Hang("the message was never acknowledged")


# -- AMP boxes to the interchange ----------------------------------------------------------


def _amp_fields() -> Any:
    from funcx_endpoint.testing.rawamp import box_bytes

    keys = st.one_of(
        st.sampled_from(
            [
                b"_command",
                b"_ask",
                b"_answer",
                b"_error",
                b"secret",
                b"pid",
                b"manager_id",
                b"worker_count",
                b"results",
                b"reason",
                b"warm",
                b"cold_starts",
                b"block_id",
            ]
        ),
        st.binary(min_size=1, max_size=20),
    )
    values = st.one_of(
        st.sampled_from(
            [
                b"Register",
                b"Heartbeat",
                b"SendResults",
                b"Quitting",
                b"WarmContainers",
                b"1",
                b"-1",
                b"abc",
                b"1e400",
                b"\xff",
            ]
        ),
        st.binary(max_size=60),
    )
    boxes = st.dictionaries(keys, values, max_size=8).map(box_bytes)
    return st.one_of(boxes, st.binary(max_size=200), st.lists(boxes, max_size=3).map(b"".join))


class AMPBoxes(Surface):
    """AMP boxes to the interchange's manager connections (executor/connection.py
    and registry.py) before registering (a stranger) and after (a manager).
    The interchange runs on a MemoryReactorClock, peers through iosim: after
    each input the connection is answered or closed, and a new manager still
    registers."""

    registered = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return "amp boxes (registered)" if self.registered else "amp boxes (stranger)"

    @property
    def strategy(self) -> Any:
        return _amp_fields()

    def start(self) -> None:
        super().start()
        from twisted.internet.testing import MemoryReactorClock

        from funcx_endpoint.config.model import HighThroughputExecutor
        from funcx_endpoint.executor.interchange import Interchange
        from funcx_endpoint.testing.interchanges import CollectingSink
        from funcx_endpoint.wire.info import ConnectionInfo

        self.reactor = MemoryReactorClock()
        self.interchange = Interchange(
            self.reactor,
            tempfile.mkdtemp(prefix="funcx-fuzz-ix-"),
            HighThroughputExecutor(),
            CollectingSink(),
            heartbeat_period=10.0,
            heartbeat_threshold=30.0,
            registration_timeout=5.0,
        )
        self.interchange.startService()
        self.factory = self.reactor.sslServers[-1][1]
        self.info = ConnectionInfo.read(self.interchange.info_file)
        self.count = 0

    def stop(self) -> None:
        self.interchange.stopService()
        for _ in range(30):
            self.reactor.advance(1)
        super().stop()

    def _connect(self) -> Tuple[Any, Any, Any]:
        from twisted.internet.protocol import Protocol
        from twisted.test import iosim

        class Peer(Protocol):
            def __init__(self) -> None:
                self.received = b""
                self.lost = False

            def dataReceived(self, data: bytes) -> None:
                self.received += data

            def connectionLost(self, reason: Any = None) -> None:
                self.lost = True

        server = self.factory.buildProtocol(None)
        peer = Peer()
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            peer,
            iosim.makeFakeClient(peer),
            greet=False,
            clock=self.reactor,
        )
        return server, peer, pump

    def _register(self, peer: Any, pump: Any, manager_id: bytes) -> bool:
        from funcx_endpoint.testing.rawamp import box_bytes, parse_boxes, register_box

        peer.transport.write(box_bytes(register_box(self.info, manager_id=manager_id)))
        pump.flush()
        boxes = parse_boxes(peer.received) or []
        return any(b.get(b"_answer") == b"1" for b in boxes)

    def check(self, data: Any) -> None:
        self.count += 1
        server, peer, pump = self._connect()
        if self.registered and not self._register(peer, pump, b"fuzz-%d" % self.count):
            raise _Hang("a well-formed Register was not answered")
        peer.received = b""
        peer.transport.write(data)
        pump.flush()
        # Either answered/closed now, or dropped by the deadline or the heartbeat threshold.
        for _ in range(40):
            if peer.lost:
                break
            self.reactor.advance(1)
            pump.flush()
        if not peer.lost:
            server.transport.loseConnection()
            pump.flush()
            raise _Hang("the connection was neither closed nor dropped")
        # The interchange still takes a new manager.
        _, other, other_pump = self._connect()
        if not self._register(other, other_pump, b"probe-%d" % self.count):
            raise _Hang("a new manager could not register afterwards")
        other.transport.loseConnection()
        other_pump.flush()


class AMPRegistered(AMPBoxes):
    registered = True


# -- worker pipe frames ------------------------------------------------------------------------


class WorkerFrames(Surface):
    """Frames on a worker's task pipe (worker/main.py, wire/frames.py): the
    worker ends with an exit status (0, or 2 for what it cannot read), never
    with an exception."""

    name = "worker pipe frames"

    @property
    def strategy(self) -> Any:
        from funcx_endpoint.wire import frames

        body = st.one_of(
            st.binary(max_size=200),
            st.tuples(
                st.text(st.characters(max_codepoint=127), max_size=40),
                st.integers(0, 2**63 - 1),
                st.binary(max_size=100),
            ).map(lambda t: frames.KIND_TASK + frames.encode_task(t[0], t[1], t[2])[5:]),
            st.binary(max_size=100).map(lambda b: frames.KIND_TASK + b),
        )
        framed = body.map(lambda b: struct.pack(">I", len(b)) + b)
        return st.one_of(
            framed, st.binary(max_size=200), st.lists(framed, max_size=3).map(b"".join)
        )

    def check(self, data: Any) -> None:
        from funcx_endpoint.worker.main import Worker

        out = BytesIO()
        worker = Worker(BytesIO(data), out)
        with contextlib.redirect_stderr(StringIO()):  # its one-line complaints
            status = worker.serve()
        if status not in (0, 2):
            raise RuntimeError(f"exit status {status}")


# -- the control socket ---------------------------------------------------------------------------


class ControlSocket(Surface):
    """Lines on the daemon's control socket (endpoint/control.py): each gets a
    JSON answer, or the connection closes (a line too long)."""

    name = "control socket"
    strategy = st.one_of(
        st.binary(max_size=300),
        _json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
        st.sampled_from([b'{"command": "status"}\n', b'{"command": ["x"]}\n', b"[]\n"]),
        st.integers(0, 3).map(lambda n: b"x" * (70_000 * n) + b"\n"),
    )

    def check(self, data: Any) -> None:
        from twisted.internet.testing import StringTransport

        from funcx_endpoint.endpoint.control import ControlFactory

        protocol = ControlFactory({"status": lambda: {"state": "running"}}).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        protocol.dataReceived(b'\n{"command": "status"}\n')
        if transport.disconnecting:
            return
        for line in transport.value().splitlines():
            json.loads(line)
        if b'"state": "running"' not in transport.value():
            raise _Hang("a good request after it got no answer")


# -- config.py values ------------------------------------------------------------------

_NUMBERS = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 65535, 65536, 4096, 4097, 64, 65, 1e-9, 10**6, True, "1", None]),
)


def _numeric_fields() -> List[Tuple[str, str]]:
    from funcx_endpoint.config import model

    found = []
    for cls in (
        model.Config,
        model.HighThroughputExecutor,
        model.LocalProvider,
        model.SimpleStrategy,
    ):
        for name, field in cls.fields.items():
            default = field.default_value()
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                found.append((cls.__name__, name))
    return found


class ConfigValues(Surface):
    """Every numeric field of the config classes at its bounds and beyond: a
    value is accepted or refused with a ConfigError, nothing else; accepted
    values respect the bounds the endpoint relies on."""

    name = "config values"

    @property
    def strategy(self) -> Any:
        return st.tuples(st.sampled_from(_numeric_fields()), _NUMBERS)

    def check(self, data: Any) -> None:
        from funcx_endpoint.config import model
        from funcx_endpoint.config.bounds import AMQP_SHORT_MAX, MAX_WORKERS_PER_NODE

        (cls_name, field), value = data
        cls = getattr(model, cls_name)
        try:
            made = cls(**{field: value})
        except model.ConfigError as e:
            if "\n" in str(e):
                raise RuntimeError(f"a multi-line message: {e}") from None
            return
        got = getattr(made, field)
        if field in ("amqp_prefetch", "amqp_heartbeat") and not 0 <= got <= AMQP_SHORT_MAX:
            raise RuntimeError(f"{field}={got} accepted")
        if field == "max_workers_per_node" and got != float("inf") and got > MAX_WORKERS_PER_NODE:
            raise RuntimeError(f"{field}={got} accepted")
        if cls_name == "LocalProvider" and field == "nodes_per_block" and got > 64:
            raise RuntimeError(f"{field}={got} accepted")


SURFACES: Dict[str, Callable[[], Surface]] = {
    "rest": RestInProcess,
    "rest-headers": RestHeadersInProcess,
    "rest-tcp": RestOverTCP,
    "task-queue": TaskQueue,
    "results-queue": ResultsQueue,
    "amp-stranger": AMPBoxes,
    "amp-registered": AMPRegistered,
    "worker-frames": WorkerFrames,
    "control": ControlSocket,
    "config": ConfigValues,
}


def make_surface(name: str) -> Surface:
    """A new surface by its short name (see :data:`SURFACES`)."""
    return SURFACES[name]()


def run_surface(surface: Surface, examples: int, seed: Optional[int] = None) -> Tally:
    """Feed ``examples`` inputs drawn by hypothesis to ``surface``; its tally.

    Nothing fails on a bad outcome: it is counted (the caller asserts)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    @settings(
        max_examples=examples,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(surface.strategy)
    def one(data: Any) -> None:
        surface.feed(data)

    if seed is not None:
        one = fixed_seed(seed)(one)
    surface.start()
    try:
        one()
    finally:
        surface.stop()
    return surface.tally
