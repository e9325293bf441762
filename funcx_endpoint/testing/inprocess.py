"""The real funcX web service API in the test's own process.

:class:`InProcessService` assembles the service's own parts, as
:class:`~funcx_endpoint.webservice.service.WebService` does: the REST API
(:class:`~funcx_endpoint.webservice.api.FuncXAPI`), the auth calls and token
checks (:mod:`~funcx_endpoint.webservice.auth`), the storage on SQLite (in a
directory the test gives), the task sender and the result ingest
(:mod:`~funcx_endpoint.webservice.dispatch`).  Only the outside components are
fakes: the broker and its management API
(:mod:`~funcx_endpoint.testing.fakebroker`).  The database runs each
transaction at once on the calling thread
(:class:`~funcx_endpoint.testing.inlinedb.InlineConnectionPool`), and the auth
calls check secrets on it too, so with a :class:`~twisted.internet.task.Clock`
as reactor a request through ``treq.testing.StubTreq(service.resource())``
is answered before the call returns::

    clock = Clock()
    service = InProcessService(self.mktemp(), clock)
    http = StubTreq(service.resource())

Clients that block (the SDK: globus-sdk on ``requests``) cannot use StubTreq:
:meth:`InProcessService.listen` serves the same resource on 127.0.0.1 (HTTP or
HTTPS) with the service's own site, and the test runs the client in a
thread while the reactor serves.  All state lives on the reactor thread.

The test also plays the endpoints (through the fake broker, with the
messages a real endpoint sends): :meth:`~InProcessService.add_endpoint`
registers one through the API and sends a status report; tasks the service
publishes are collected, and :meth:`~InProcessService.run_task` runs one with
the worker's :class:`~funcx_endpoint.worker.execute.TaskRunner` and sends its
result (``run_tasks=True`` runs every task as it is published).  Reports and
results are stored when the reactor next runs its delayed calls (with a
Clock: ``advance(0)``); the Deferreds these methods return fire then.

Users are named by the test (``"test-user"`` by default); each is a real
client of the service with an identity of its own.  Every request through
:meth:`resource` is recorded (:attr:`requests`) and may be answered with an
injected failure instead (:meth:`fail_next`); the set-up calls the harness
makes itself are not.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar

from treq.testing import StubTreq
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from funcx_endpoint.amqp import topology
from funcx_endpoint.testing.fakebroker import (
    FakeBrokerAdministrator,
    FakeServiceBroker,
    PublishedMessage,
)
from funcx_endpoint.testing.inlinedb import InlineConnectionPool
from funcx_endpoint.testing.recording import (
    RecordedRequest,
    RecordingResource,
    ServedService,
    serve,
)
from funcx_endpoint.tls import TLSFiles
from funcx_endpoint.version import __version__
from funcx_endpoint.webservice import accounts
from funcx_endpoint.webservice.api import MIN_SDK_VERSION, FuncXAPI
from funcx_endpoint.webservice.api_context import BrokerAddress
from funcx_endpoint.webservice.auth import (
    FUNCX_RESOURCE_SERVER,
    AuthAPI,
    Authenticator,
    TokenPurger,
    hash_secret,
    new_secret,
    new_token,
    token_hash,
)
from funcx_endpoint.webservice.db import DatabaseConfig, Tx
from funcx_endpoint.webservice.dispatch import TaskSender
from funcx_endpoint.webservice.http import APIResource, Router
from funcx_endpoint.webservice.ingest import ResultIngest
from funcx_endpoint.webservice.quotas import Quotas
from funcx_endpoint.webservice.records import ENDPOINT_COLUMNS, Endpoint, TokenInfo
from funcx_endpoint.webservice.retention import RetentionPurger
from funcx_endpoint.webservice.settings import DEFAULT_FUNCX_SCOPE, MIB
from funcx_endpoint.webservice.storage import Storage
from funcx_endpoint.wire import (
    ActorName,
    EndpointCommand,
    EPStatusReport,
    ErrorCode,
    PackedResult,
    Result,
    ResultErrorDetails,
    Task,
    TaskBatchMessage,
    TaskTransition,
    pack,
    serialize,
    unpack,
)
from funcx_endpoint.worker.execute import TaskRunner

__all__ = [
    "DEFAULT_USER",
    "FUNCX_SCOPE",
    "InProcessService",
    "ServedService",
    "StoredFunction",
    "StoredTask",
    "TestUser",
]

FUNCX_SCOPE = DEFAULT_FUNCX_SCOPE
#: The user tokens and endpoints belong to unless a test names another.
DEFAULT_USER = "test-user"
_REMOTE_ERROR_MESSAGE = "An error occurred during the execution of this task"
#: A secret hash nothing matches: the client of a user made for tokens alone cannot log in.
_NO_SECRET = "!"

_T = TypeVar("_T")


@dataclass(frozen=True)
class TestUser:
    """A user of the service: a client, its identity and, if it may log in, its secret."""

    __test__ = False  # not a test case, whatever trial's collector thinks of the name

    name: str
    client_id: str
    identity_id: str
    secret: Optional[str]


@dataclass(frozen=True)
class StoredTask:
    """A task as stored (a row of ``tasks``); ``payload`` is gone once it has a result."""

    task_id: str
    owner: str
    function_id: str
    endpoint_id: str
    task_group_id: str
    payload: Optional[str]
    status: str
    sent: bool
    created: float


@dataclass(frozen=True)
class StoredFunction:
    """A registered function as stored."""

    function_id: str
    owner: str
    name: str
    public: bool
    function_code: str


def _now(d: Deferred[_T]) -> _T:
    """The result of a Deferred that has fired (the inline database makes most so)."""
    box: List[Any] = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("the operation did not finish at once")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    result: _T = box[0]
    return result


class _Table(Mapping[str, _T]):
    """A read-only mapping over the rows of ``table`` that ``where`` selects, read
    at each use: keyed by the first of ``columns``, in order of creation, each
    row made into ``make(row)``."""

    def __init__(
        self,
        run: Callable[..., Any],
        table: str,
        columns: str,
        make: Callable[[Tuple[Any, ...]], _T],
        where: str = "1 = 1",
    ) -> None:
        self._run = run
        key = columns.split(",", 1)[0]
        self._select = f"SELECT {columns} FROM {table} WHERE {where} AND {key} = ?"
        # rowid: the tasks of one submit share their creation time.
        self._keys = f"SELECT {key} FROM {table} WHERE {where} ORDER BY created, rowid"
        self._make = make

    def __getitem__(self, key: str) -> _T:
        row = self._run(lambda tx: tx.execute(self._select, (key,)).fetchone())
        if row is None:
            raise KeyError(key)
        return self._make(row)

    def __iter__(self) -> Iterator[str]:
        return iter(self._all_keys())

    def __len__(self) -> int:
        return len(self._all_keys())

    def _all_keys(self) -> List[str]:
        rows: List[Tuple[Any, ...]] = self._run(lambda tx: tx.execute(self._keys).fetchall())
        return [row[0] for row in rows]


def _stored_task(row: Tuple[Any, ...]) -> StoredTask:
    task_id, owner, function_id, endpoint_id, group, payload, status, sent, created = row
    return StoredTask(
        task_id, owner, function_id, endpoint_id, group, payload, status, bool(sent), created
    )


def _stored_function(row: Tuple[Any, ...]) -> StoredFunction:
    function_id, owner, name, public, function_code = row
    return StoredFunction(function_id, owner, name, bool(public), function_code)


class InProcessService(MultiService):
    """The service's real API, storage and dispatch on fake broker parts; see the module.

    ``directory`` holds the SQLite database.  ``clock`` (default: ``reactor``)
    is the service's clock: token lifetimes, endpoint liveness, resend timing.
    Start it (``startService``: the task sender's resend loop and the token
    purge run on the clock) and stop it at the end of the test.
    """

    def __init__(
        self,
        directory: str,
        reactor: Any,
        *,
        clock: Optional[IReactorTime] = None,
        funcx_scope: str = FUNCX_SCOPE,
        token_lifetime: int = 48 * 3600,
        heartbeat_threshold: float = 120.0,
        resend_interval: float = 2.0,
        min_sdk_version: str = MIN_SDK_VERSION,
        run_tasks: bool = False,
        max_body: int = 10 * MIB,
        broker_address: BrokerAddress = BrokerAddress("amqps", "localhost", 5671, "/"),
        quotas: Optional[Quotas] = None,
        task_retention: Optional[float] = None,
        fetched_result_retention: float = 3600.0,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.clock: IReactorTime = reactor if clock is None else clock
        self.funcx_scope = funcx_scope
        self.token_lifetime = token_lifetime
        self.run_tasks = run_tasks
        self.max_body = max_body
        os.makedirs(directory, exist_ok=True)
        config = DatabaseConfig.from_url("sqlite:///" + os.path.abspath(directory) + "/db.sqlite3")
        self.pool = InlineConnectionPool(config)
        self.storage = Storage(config, reactor, pool=self.pool)
        self.broker = FakeServiceBroker(lambda d, channel: self.ingest.on_delivery(d, channel))
        self.administrator = FakeBrokerAdministrator()
        self.sender = TaskSender(
            reactor, self.storage, self.broker, resend_interval=resend_interval, clock=self.clock
        )
        self.sender.setServiceParent(self)
        self.ingest = ResultIngest(reactor, self.storage, self.sender, clock=self.clock)
        TokenPurger(self.storage, self.clock).setServiceParent(self)
        #: Deletes expired tasks, if a ``task_retention`` was given (else none runs).
        self.retention: Optional[RetentionPurger] = None
        if task_retention is not None:
            self.retention = RetentionPurger(
                self.storage, self.clock, task_retention, fetched_result_retention
            )
            self.retention.setServiceParent(self)

        router = Router()
        self.authenticator = Authenticator(self.storage, self.clock)
        #: The auth calls' handlers (the portal's sign-in checks secrets with them).
        self.auth = AuthAPI(
            self.storage,
            self.authenticator,
            self.clock,
            funcx_scope,
            token_lifetime,
            in_thread=maybeDeferred,
        )
        self.auth.install(router)
        self.api = FuncXAPI(
            reactor,
            self.storage,
            self.broker,
            self.administrator,
            self.sender,
            broker_address,
            heartbeat_threshold=heartbeat_threshold,
            min_sdk_version=min_sdk_version,
            clock=self.clock,
            quotas=quotas,
        )
        self.api.install(router)
        #: The service's own resource: what the HTTPS site of a real service serves.
        self.api_resource = APIResource(router, self.authenticator)
        self._recorder = RecordingResource(self.api_resource)
        #: ``requests_to(method, path)``: the recorded requests for ``method path``
        #: (e.g. ``"POST", "/v2/submit"``).
        self.requests_to = self._recorder.requests_to
        #: ``fail_next(method, path, status=500, body=None, *, times=1, headers=None)``:
        #: answer the next ``times`` ``method path`` requests with an error instead
        #: (``body`` defaults to the service's error body; ``status=None`` drops the
        #: connection without an answer, the request received).
        self.fail_next = self._recorder.fail_next
        # StubTreq makes its methods at run time; mypy cannot see them.
        self._setup_http: Any = StubTreq(self.api_resource)

        self.users: Dict[str, TestUser] = {}
        #: task id -> (endpoint id, the task as the service published it)
        self.published_tasks: Dict[str, Tuple[str, Task]] = {}
        #: (endpoint id, command) the service sent to endpoints, in order
        self.commands: List[Tuple[str, EndpointCommand]] = []
        self._runner = TaskRunner()
        self.broker.on_publish(self._published)

        #: Tasks, functions and (not deleted) endpoints as stored, read at each use.
        self.tasks: Mapping[str, StoredTask] = _Table(
            self._run, "tasks", ", ".join(f.name for f in fields(StoredTask)), _stored_task
        )
        self.functions: Mapping[str, StoredFunction] = _Table(
            self._run,
            "functions",
            ", ".join(f.name for f in fields(StoredFunction)),
            _stored_function,
        )
        self.endpoints: Mapping[str, Endpoint] = _Table(
            self._run, "endpoints", ENDPOINT_COLUMNS, Endpoint.from_row, "deleted_at IS NULL"
        )

    def stopService(self) -> Deferred[None]:
        """Stop once every report and result sent is stored; then close the database."""

        async def stop() -> None:
            await self.broker.when_settled()
            await maybeDeferred(super(InProcessService, self).stopService)
            self.storage.close()

        return Deferred.fromCoroutine(stop())

    def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return _now(self.storage.run(fn, *args))

    # -- serving -------------------------------------------------------------------

    def resource(self) -> IResource:
        """The root resource to serve: records requests, injects failures, then the API."""
        return self._recorder

    @property
    def requests(self) -> List[RecordedRequest]:
        """Every request received through :meth:`resource`, in order."""
        return self._recorder.requests

    def listen(
        self, *, interface: str = "127.0.0.1", port: int = 0, tls_files: Optional[TLSFiles] = None
    ) -> ServedService:
        """Serve :meth:`resource` on ``interface`` with the service's site; where it is.

        With ``tls_files`` (:func:`funcx_endpoint.tls.ensure_ca_and_server_cert`)
        it serves HTTPS with that server certificate.  Stop it with
        ``served.stop()``, which closes the connections clients keep open too.
        """
        return serve(self.reactor, self.resource(), self.max_body, interface, port, tls_files)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        user: Optional[str] = DEFAULT_USER,
    ) -> Tuple[int, Any]:
        """``(status, JSON answer)`` of one API call as ``user`` (None: no token),
        made at once and not recorded."""
        headers = {}
        if user is not None:
            headers["Authorization"] = f"Bearer {self.issue_token(user)}"
        kwargs: Dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        http = self._setup_http
        response = _now(http.request(method, "http://in-process" + path, **kwargs))
        http.flush()
        return response.code, _now(http.json_content(response))

    # -- users and tokens ------------------------------------------------------------

    def user(self, name: str = DEFAULT_USER) -> TestUser:
        """The user called ``name``, made (a client of its own) on first use."""
        found = self.users.get(name)
        if found is None:
            client_id = str(uuid.uuid4())
            client = self._run(
                accounts.create_client, client_id, name, _NO_SECRET, self.clock.seconds()
            )
            found = self.users[name] = TestUser(name, client_id, client.identity_id, None)
        return found

    def add_client(self, name: Optional[str] = None) -> Tuple[str, str]:
        """``(client_id, secret)`` to log in as the user ``name`` with.

        Without a name a new user is made, named by its client id.
        """
        if name is None:
            name = str(uuid.uuid4())
            secret = new_secret()
            client = self._run(
                accounts.create_client, name, name, hash_secret(secret), self.clock.seconds()
            )
            self.users[name] = TestUser(name, name, client.identity_id, secret)
            return name, secret
        user = self.user(name)
        if user.secret is None:
            secret = new_secret()
            self._run(_set_secret_hash, user.client_id, hash_secret(secret))
            user = self.users[name] = TestUser(user.name, user.client_id, user.identity_id, secret)
        assert user.secret is not None
        return user.client_id, user.secret

    def issue_token(self, user: str = DEFAULT_USER) -> str:
        """A funcX access token for ``user``, issued now by the service's clock, as the
        token call would."""
        found = self.user(user)
        token = new_token()
        now = self.clock.seconds()
        info = TokenInfo(
            found.identity_id,
            found.client_id,
            FUNCX_RESOURCE_SERVER,
            self.funcx_scope,
            now,
            now + self.token_lifetime,
        )
        self._run(accounts.insert_token, token_hash(token), info)
        return token

    def revoke_tokens(self) -> None:
        """Revoke every access token, as the revoke call would (the next use gets 401)."""
        for hashed in self._run(_active_token_hashes):
            self.authenticator.forget(hashed)
            self._run(accounts.revoke_token, hashed)

    # -- playing the endpoints ---------------------------------------------------------

    def add_endpoint(
        self,
        endpoint_id: Optional[str] = None,
        name: str = "test-endpoint",
        owner: str = DEFAULT_USER,
        status: str = "online",
        **metadata: Any,
    ) -> str:
        """Register an endpoint of ``owner`` through the API; its id.

        ``status="online"`` then sends its first status report; ``"offline"``
        sends none.
        """
        code, answer = self.call(
            "POST",
            "/v2/endpoints",
            {
                "endpoint_name": name,
                "endpoint_uuid": endpoint_id or str(uuid.uuid4()),
                "metadata": {"endpoint_version": __version__, "hostname": "in-process", **metadata},
            },
            user=owner,
        )
        if code != 200:
            raise RuntimeError(f"the service refused the registration: {code} {answer}")
        registered = str(answer["endpoint_id"])
        if status == "online":
            self.report(registered)
        elif status != "offline":
            raise ValueError(f"status must be online or offline, not {status!r}")
        return registered

    def send(self, endpoint_id: str, message: Any) -> Deferred[None]:
        """Publish ``message`` as the endpoint does; fires once the service stored it."""
        return self.broker.deliver(f"{endpoint_id}.results", pack(message))

    def report(
        self,
        endpoint_id: str,
        task_statuses: Optional[Dict[str, List[TaskTransition]]] = None,
        final: bool = False,
    ) -> Deferred[None]:
        """Send a status report of the endpoint (``final``: the one it sends as it stops)."""
        if final:
            return self.send(endpoint_id, EPStatusReport.final(endpoint_id))
        state = {
            "managers": 1,
            "total_workers": 1,
            "idle_workers": 1,
            "pending_tasks": 0,
            "outstanding_tasks": {},
            "heartbeat_period": 30,
        }
        return self.send(endpoint_id, EPStatusReport(endpoint_id, state, task_statuses or {}))

    def _published(self, message: PublishedMessage) -> None:
        if message.exchange != topology.TASKS_EXCHANGE:
            return
        unpacked = unpack(message.body)
        endpoint_id = message.queue[: -len(".tasks")]
        if isinstance(unpacked, EndpointCommand):
            self.commands.append((endpoint_id, unpacked))
            return
        tasks = unpacked.tasks if isinstance(unpacked, TaskBatchMessage) else [unpacked]
        for task in tasks:
            assert isinstance(task, Task)
            self.published_tasks[task.task_id] = (endpoint_id, task)
            if self.run_tasks:
                self.run_task(task.task_id)

    def _endpoint_of(self, task_id: str) -> str:
        return self.tasks[task_id].endpoint_id

    def run_task(self, task_id: str) -> Deferred[None]:
        """Run a published task here, with the worker's runner, and send its result."""
        try:
            endpoint_id, task = self.published_tasks[task_id]
        except KeyError:
            raise KeyError(f"task {task_id} was not published (is the broker away?)") from None
        packed = PackedResult.decode(self._runner.run(task_id, self._ns(), task.task_buffer))
        # As the endpoint's publisher writes it:
        return self.broker.deliver(f"{endpoint_id}.results", packed.message())

    def set_status(self, task_id: str, status: str) -> Deferred[None]:
        """Report a state of a pending task (e.g. ``running``) from its endpoint."""
        transition = TaskTransition(self._ns(), status, ActorName.MANAGER)
        return self.report(self._endpoint_of(task_id), {task_id: [transition]})

    def set_serialized_result(self, task_id: str, data: str) -> Deferred[None]:
        """Send a task's successful result, already serialized."""
        return self.send(self._endpoint_of(task_id), Result.success(task_id, data))

    def set_result(self, task_id: str, value: Any) -> Deferred[None]:
        """Send a task's successful result: ``value``."""
        return self.set_serialized_result(task_id, serialize(value))

    def set_exception(
        self,
        task_id: str,
        traceback_text: str,
        code: str = ErrorCode.REMOTE_EXECUTION_ERROR,
        user_message: str = _REMOTE_ERROR_MESSAGE,
    ) -> Deferred[None]:
        """Send a task's failure: ``traceback_text``, error ``code``."""
        details = ResultErrorDetails(code, user_message)
        return self.send(self._endpoint_of(task_id), Result(task_id, traceback_text, details))

    def _ns(self) -> int:
        return int(self.clock.seconds() * 1e9)


def _set_secret_hash(tx: Tx, client_id: str, secret_hash: str) -> None:
    tx.execute("UPDATE clients SET secret_hash = ? WHERE client_id = ?", (secret_hash, client_id))


def _active_token_hashes(tx: Tx) -> List[str]:
    return [r[0] for r in tx.execute("SELECT token_hash FROM tokens WHERE revoked = 0").fetchall()]
