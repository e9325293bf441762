"""A real ``funcx-service`` process for tests, benchmarks and demos.

:class:`ServiceProcess` runs the service (``twistd -n funcx-service``) as a
child process with a state directory of its own and a free port, and learns
where it answers from its readiness report.  By default it uses the test
run's shared RabbitMQ node (:func:`funcx_endpoint.testing.rabbitmq.shared_node`)
through ``--amqp-url``/``--management-url``, which saves the ~10 s an
embedded broker takes to boot; ``embedded=True`` runs the embedded one.

:func:`shared_service` gives every test of a process the same service,
started on first use and stopped when the process ends, however it ends:
``atexit`` on a normal exit, and a pipe otherwise (the service watches it
with ``--stop-on-eof-fd`` and stops when this process is gone, SIGKILL
included).

Tests share one service safely by each using clients of their own
(:meth:`ServiceProcess.create_client`): one client is one user, who sees
only their own functions, endpoints and tasks.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from funcx_endpoint.testing.shared import SharedInstance
from funcx_endpoint.twistd import runner_command

__all__ = [
    "ServiceProcess",
    "ServiceStartError",
    "shared_service",
    "shared_service_async",
    "stop_shared_service",
]

_LOGGER = "funcx_endpoint.endpoint.logs.make_observer"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ServiceStartError(Exception):
    """The service did not come up; the message has the tail of its log."""


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for the service: this checkout importable."""
    env = dict(os.environ)
    parts = [_REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.pop("FUNCX_SERVICE_STATE_DIR", None)
    if extra:
        env.update(extra)
    return env


_ENV_LOCK = threading.Lock()


def sdk_client(env: Dict[str, str], **options: Any) -> Any:
    """Our SDK's ``FuncXClient(**options)``, made with ``env`` in ``os.environ``
    (restored after; one thread at a time)."""
    from funcx_endpoint.sdk import FuncXClient

    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return FuncXClient(**options)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _make_vhost(node: Any, vhost: str) -> None:
    """Create ``vhost`` on a RabbitMQNode, with all permissions for its admin user."""
    import base64
    from urllib.request import Request, urlopen

    auth = base64.b64encode(f"{node.admin_user}:{node.admin_password}".encode()).decode()
    headers = {"Authorization": f"Basic {auth}", "Content-Type": "application/json"}
    base = node.management_url.rstrip("/")
    name = quote(vhost, safe="")
    for url, body in (
        (f"{base}/api/vhosts/{name}", {}),
        (
            f"{base}/api/permissions/{name}/{quote(node.admin_user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        ),
    ):
        request = Request(url, data=json.dumps(body).encode(), headers=headers, method="PUT")
        with urlopen(request, timeout=30) as response:
            response.read()


def _info_field(key: str, doc: str) -> property:
    """A read-only attribute: ``info[key]`` (what the started service said), a string."""
    return property(lambda service: str(service.info[key]), doc=doc)


class ServiceProcess:
    """One ``funcx-service`` child process; see the module docstring."""

    def __init__(
        self,
        state_dir: Optional[str] = None,
        *,
        embedded: bool = False,
        database_url: Optional[str] = None,
        args: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self._owns_dir = state_dir is None
        self.state_dir = os.path.abspath(state_dir or tempfile.mkdtemp(prefix="funcx-service-"))
        self.embedded = embedded
        self.database_url = database_url
        self.args = list(args)
        self.env = env
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.info: Dict[str, Any] = {}
        #: The broker administrator's URL for this service's virtual host (shared node only).
        self.admin_amqp_url: Optional[str] = None
        self._lifeline: Optional[int] = None
        self._lock = threading.RLock()

    # -- where it is ----------------------------------------------------------------

    base_url = _info_field("base_url", "The funcX API base URL (``.../v2``).")
    root_url = _info_field("root_url", "The service's root URL (its HTTPS site).")
    auth_url = _info_field("auth_url", "The value for ``GLOBUS_SDK_SERVICE_URL_AUTH``.")
    ca_file = _info_field("ca_file", "The CA file that verifies the service's HTTPS certificate.")

    @property
    def broker_ca_file(self) -> str:
        """The CA file that verifies the broker's AMQPS certificate."""
        return str(self.info.get("broker_ca_file") or self.info["ca_file"])

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    @property
    def log_file(self) -> str:
        return os.path.join(self.state_dir, "funcx-service.log")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def client_env(self, client: Optional[Tuple[str, str]] = None) -> Dict[str, str]:
        """Environment variables for a client process (our SDK or the real funcX SDK)."""
        env = {
            "FUNCX_SERVICE_ADDRESS": self.base_url,
            "FUNCX_SERVICE_CA_FILE": self.ca_file,
            "GLOBUS_SDK_SERVICE_URL_AUTH": self.auth_url,
            "GLOBUS_SDK_VERIFY_SSL": self.ca_file,
            "SSL_CERT_FILE": self.broker_ca_file,
        }
        if client is not None:
            env["FUNCX_SDK_CLIENT_ID"], env["FUNCX_SDK_CLIENT_SECRET"] = client
        return env

    # -- lifecycle ----------------------------------------------------------------------

    def _broker_settings(self) -> Dict[str, Any]:
        if self.embedded:
            return {}
        from funcx_endpoint.testing.rabbitmq import shared_node

        node = shared_node()
        user = quote(node.admin_user, safe="")
        password = quote(node.admin_password, safe="")
        # A virtual host per service: a service is the only consumer of its
        # results queue, and tests run several services on the shared node.
        vhost = f"funcx-service-{uuid.uuid4().hex[:12]}"
        _make_vhost(node, vhost)
        self.admin_amqp_url = node.amqps_url.rsplit("/", 1)[0] + "/" + quote(vhost, safe="")
        return {
            "amqp_url": self.admin_amqp_url,
            "management_url": f"http://{user}:{password}@{node.host}:{node.management_port}/",
            "broker_ca_file": node.ca_cert_path,
        }

    def argv(self, ready_fd: int, lifeline_fd: int) -> List[str]:
        argv = runner_command() + [
            "--nodaemon",
            "--pidfile",
            "",
            "--logger",
            _LOGGER,
            "funcx-service",
            "--state-dir",
            self.state_dir,
            "--ready-fd",
            str(ready_fd),
            "--stop-on-eof-fd",
            str(lifeline_fd),
        ]
        if not os.path.exists(os.path.join(self.state_dir, "service.json")):
            # Settings with passwords go to the settings file, not the command line.
            from funcx_endpoint.webservice.settings import ServiceSettings

            settings = ServiceSettings.load(
                self.state_dir,
                {"port": 0, "database_url": self.database_url, **self._broker_settings()},
            )
            settings.save()
        return argv + self.args

    def start(self, timeout: float = 120.0) -> None:
        """Start the service and return when it is ready (blocking)."""
        with self._lock:
            if self.running:
                return
            ready_read, ready_write = os.pipe()
            life_read, life_write = os.pipe()
            output = open(os.path.join(self.state_dir, "stdout.txt"), "ab")
            try:
                self.process = subprocess.Popen(
                    self.argv(ready_write, life_read),
                    pass_fds=(ready_write, life_read),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.state_dir,
                    env=child_env(self.env),
                    start_new_session=True,
                )
            finally:
                output.close()
                os.close(ready_write)
                os.close(life_read)
            self._lifeline = life_write
            try:
                report = self._await_report(ready_read, timeout)
            finally:
                os.close(ready_read)
            if report is None or report.get("state") != "ready":
                why = "no report" if report is None else report.get("message")
                self._kill()
                raise ServiceStartError(
                    f"funcx-service did not start ({why}); log {self.log_file}:\n{self.log_tail()}"
                )
            self.info = report

    def _await_report(self, fd: int, timeout: float) -> Optional[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            while b"\n" in data:
                line, data = data.split(b"\n", 1)
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("state") != "progress":
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if not ready:
                if self.process is not None and self.process.poll() is not None:
                    return None
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            data += chunk

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the service (TERM, then KILL after ``timeout``); blocking."""
        with self._lock:
            process = self.process
            if process is None:
                return
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self._close_lifeline()
            self.process = None

    def kill(self) -> None:
        """Kill the service at once (SIGKILL), as a crash would."""
        with self._lock:
            self._kill()

    def _kill(self) -> None:
        process = self.process
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()
        self._close_lifeline()
        self.process = None

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            try:
                os.close(self._lifeline)
            except OSError:
                pass
            self._lifeline = None

    def restart(self, timeout: float = 120.0) -> None:
        self.stop()
        self.start(timeout)

    def destroy(self) -> None:
        """Stop the service and remove its state directory if this object made it."""
        self.stop()
        if self._owns_dir:
            import shutil

            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- clients --------------------------------------------------------------------------

    def create_client(self, name: Optional[str] = None) -> Tuple[str, str]:
        """A new client (a new user identity) of this service: ``(client_id, secret)``.

        Uses the service's storage directly, as ``funcx-service create-client`` does.
        """
        from funcx_endpoint.webservice import accounts, storage
        from funcx_endpoint.webservice.auth import hash_secret, new_secret
        from funcx_endpoint.webservice.settings import ServiceSettings

        settings = ServiceSettings.load(self.state_dir)
        connection, call = storage.open_sync(settings.effective_database_url)
        client_id, secret = str(uuid.uuid4()), new_secret()
        try:
            call(accounts.create_client)(
                client_id, name or f"test-{client_id[:8]}", hash_secret(secret), time.time()
            )
        finally:
            connection.close()
        return client_id, secret

    def endpoint_metadata(self, endpoint_id: str) -> Dict[str, Any]:
        """What the endpoint sent at its last registration (read from the service's storage)."""
        from funcx_endpoint.webservice import storage
        from funcx_endpoint.webservice.settings import ServiceSettings

        settings = ServiceSettings.load(self.state_dir)
        connection, call = storage.open_sync(settings.effective_database_url)
        try:
            endpoint = call(storage.get_endpoint)(endpoint_id)
        finally:
            connection.close()
        if endpoint is None:
            raise KeyError(f"no endpoint {endpoint_id} at the service")
        return dict(endpoint.metadata)

    # -- from a running reactor -------------------------------------------------------------

    def _in_thread(self, reactor: Any, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def start_async(self, reactor: Any) -> Deferred[None]:
        return self._in_thread(reactor, self.start)

    def stop_async(self, reactor: Any) -> Deferred[None]:
        return self._in_thread(reactor, self.stop)

    def restart_async(self, reactor: Any) -> Deferred[None]:
        return self._in_thread(reactor, self.restart)

    def create_client_async(
        self, reactor: Any, name: Optional[str] = None
    ) -> Deferred[Tuple[str, str]]:
        return self._in_thread(reactor, self.create_client, name)


# -- the service shared by every test of a process ------------------------------------------


def _start_unless_running(service: ServiceProcess) -> None:
    if not service.running:
        service.start()


# Its exit hook is registered after its first start, which started the shared
# RabbitMQ node and registered that one's: atexit runs hooks last-in first-out,
# so the service stops before its broker.
_SHARED: SharedInstance[ServiceProcess] = SharedInstance(
    ServiceProcess, _start_unless_running, ServiceProcess.destroy
)


def shared_service() -> ServiceProcess:
    """The process-wide service (SQLite, the shared RabbitMQ node), started on first use.

    Tests must not stop or restart it; use a :class:`ServiceProcess` of their
    own for that.
    """
    return _SHARED.get()


def shared_service_async(reactor: Any) -> Deferred[ServiceProcess]:
    """:func:`shared_service` from a running reactor (started in a thread)."""
    return _SHARED.get_async(reactor)


def stop_shared_service() -> None:
    _SHARED.stop()


# -- talking to a service from trial tests ---------------------------------------------------

FUNCX_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
_NO_BODY = object()


class APIClient:
    """HTTP calls to a service with treq; each answer is ``(status, decoded JSON)``.

    Connections are not kept (nothing is left open for trial to complain of).
    ``token`` is sent as ``Authorization: Bearer`` unless a call passes its own
    ``headers``.
    """

    def __init__(self, reactor: Any, service: ServiceProcess, token: Optional[str] = None) -> None:
        from treq.client import HTTPClient
        from twisted.internet.ssl import Certificate
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        with open(service.ca_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        pool = HTTPConnectionPool(reactor, persistent=False)
        self._http = HTTPClient(
            Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool)
        )
        self.service = service
        self.token = token

    async def request(
        self,
        method: str,
        path: str,
        body: Any = _NO_BODY,
        *,
        raw: Optional[bytes] = None,
        headers: Optional[Dict[str, str]] = None,
        token: Optional[str] = None,
    ) -> Tuple[int, Any]:
        """``path`` is relative to the service root (``/v2/...``)."""
        import treq

        sent: Dict[Any, Any] = {}
        bearer = token if token is not None else self.token
        if headers is None and bearer:
            sent["Authorization"] = [f"Bearer {bearer}"]
        for name, value in (headers or {}).items():
            sent[name] = [value]
        data = None
        if raw is not None:
            data = raw
        elif body is not _NO_BODY:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", ["application/json"])
        response = await self._http.request(
            method, self.service.root_url + path, data=data, headers=sent
        )
        content = await treq.content(response)
        try:
            decoded = json.loads(content)
        except ValueError:
            decoded = content
        return response.code, decoded

    async def get(self, path: str, **kwargs: Any) -> Tuple[int, Any]:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body: Any = _NO_BODY, **kwargs: Any) -> Tuple[int, Any]:
        return await self.request("POST", path, body, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Tuple[int, Any]:
        return await self.request("DELETE", path, **kwargs)

    async def login(self, client_id: str, secret: str, scope: str = FUNCX_SCOPE) -> Dict[str, Any]:
        """Client-credentials token request; sets :attr:`token`; the whole answer."""
        import base64
        from urllib.parse import urlencode

        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        status, answer = await self.request(
            "POST",
            "/v2/oauth2/token",
            raw=urlencode({"grant_type": "client_credentials", "scope": scope}).encode(),
            headers={
                "Authorization": f"Basic {basic}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        if status != 200:
            raise AssertionError(f"login failed: {status} {answer}")
        self.token = answer["access_token"]
        return dict(answer)


async def amqp_connect(reactor: Any, url: str, ca_file: Optional[str]) -> Any:
    """A logged-in :class:`~funcx_endpoint.amqp.client.AMQPClient` for ``url`` (no reconnects).

    Close it with ``client.transport.loseConnection()``.
    """
    from funcx_endpoint.amqp.connection import (
        AMQPURL,
        AMQPConnectionFactory,
        client_endpoint,
        login,
    )

    parsed = AMQPURL.parse(url)
    factory = AMQPConnectionFactory(parsed, 0, reactor)
    client: Any = await client_endpoint(reactor, parsed, ca_file).connect(factory)
    try:
        await login(client, parsed)
    except BaseException:
        if client.transport is not None:
            closed = client.when_closed()
            client.transport.loseConnection()
            await closed
        raise
    return client


class EndpointPlayer:
    """Plays a registered endpoint on the broker: runs its tasks here, publishes results.

    Built from a registration answer (``POST /v2/endpoints``) and the broker's
    CA file.  Tasks are run in this process with this project's deserializer
    (fine for tests: the functions are the tests' own); a failing function
    gets a ``RemoteExecutionError`` result with its traceback, like a real
    endpoint.  ``run_tasks=False`` only collects the tasks.
    """

    def __init__(
        self,
        reactor: Any,
        registration: Dict[str, Any],
        ca_file: Optional[str],
        run_tasks: bool = True,
    ) -> None:
        self.reactor = reactor
        self.registration = registration
        self.endpoint_id = str(registration["endpoint_id"])
        self.ca_file = ca_file
        self.run_tasks = run_tasks
        self.tasks: List[Any] = []
        #: The task messages as received (bytes), in order.
        self.bodies: List[bytes] = []
        self.published = 0
        self._client: Any = None
        self._publisher: Any = None

    async def start(self) -> None:
        from funcx_endpoint.amqp.publisher import ConfirmingPublisher

        url = self.registration["task_queue_info"]["connection_url"]
        self._client = await amqp_connect(self.reactor, url, self.ca_file)
        publish_channel = await self._client.open_channel(2)
        self._publisher = ConfirmingPublisher(publish_channel)
        await self._publisher.start()
        channel = await self._client.open_channel(1)
        await channel.basic_qos(prefetch_count=100)
        channel.handlers.consumers["player"] = lambda delivery: self._on_task(channel, delivery)
        await channel.basic_consume(
            queue=self.registration["task_queue_info"]["queue"],
            consumer_tag="player",
            exclusive=True,
        )

    def publish(self, message: Any) -> Deferred[None]:
        from funcx_endpoint.wire import pack

        return self._publisher.publish(
            "results", f"{self.endpoint_id}.results", pack(message), {"delivery-mode": 2}
        )

    def report(self, final: bool = False) -> Deferred[None]:
        from funcx_endpoint.wire import EPStatusReport

        if final:
            return self.publish(EPStatusReport.final(self.endpoint_id))
        return self.publish(
            EPStatusReport(
                self.endpoint_id,
                {
                    "managers": 1,
                    "total_workers": 1,
                    "idle_workers": 1,
                    "pending_tasks": 0,
                    "outstanding_tasks": {},
                },
                {},
            )
        )

    def _on_task(self, channel: Any, delivery: Any) -> None:
        from funcx_endpoint.wire import Result, serialize, unpack, unpack_task_buffer

        self.bodies.append(delivery.body)
        task: Any = unpack(delivery.body)
        self.tasks.append(task)
        if self.run_tasks:
            try:
                fn, args, kwargs = unpack_task_buffer(task.task_buffer)
                result = Result.success(task.task_id, serialize(fn(*args, **kwargs)))
            except Exception as error:
                import traceback

                text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                result = Result.failure(
                    task.task_id,
                    "RemoteExecutionError",
                    "An error occurred during the execution of this task",
                    text,
                )
            d = self.publish(result)

            def published(_: Any) -> None:
                self.published += 1
                channel.ack(delivery.delivery_tag)

            d.addCallback(published)
        else:
            channel.ack(delivery.delivery_tag)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.transport is not None:
            closed = client.when_closed()
            client.transport.loseConnection()
            await closed
