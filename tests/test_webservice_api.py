"""The funcX REST API of a real ``funcx-service`` process, over HTTPS, with the real broker.

One service process is shared by the tests of this run
(:func:`funcx_endpoint.testing.service.shared_service`: SQLite, the shared
RabbitMQ node); each test acts as users of its own (fresh clients), so tests
do not see each other's objects.  The tests play the endpoint themselves:
they consume tasks and publish results and status reports on the broker
with the credentials a registration hands out.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from txamqp.client import Closed

from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.connection import close_reason
from funcx_endpoint.amqp.publisher import ConfirmingPublisher, PublishFailed
from funcx_endpoint.testing.service import (
    APIClient,
    EndpointPlayer,
    ServiceProcess,
    amqp_connect,
    shared_service_async,
)
from funcx_endpoint.webservice import accounts, storage
from funcx_endpoint.webservice.settings import ServiceSettings
from funcx_endpoint.wire import (
    EPStatusReport,
    Result,
    Task,
    TaskTransition,
    deserialize,
    pack,
    pack_function,
    pack_payload,
    serialize,
    unpack,
    unpack_task_buffer,
)


def add(a, b=1):
    return a + b


FUNCTION_CODE = pack_function(add)
PAYLOAD = pack_payload((1,), {"b": 2})


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 15.0, step: float = 0.05
) -> Any:
    """Poll ``await predicate()`` (or a plain predicate) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, (Deferred,)) or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:g} s")
        await sleep(step)


class ServiceTestCase(TestCase):
    """Fresh users of the shared service, and helpers to play their endpoints."""

    timeout = 120

    async def set_up(self) -> None:
        self.service: ServiceProcess = await shared_service_async(reactor)
        self.alice = await self.user()
        self._amqp: List[Any] = []

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.set_up())

    async def user(self) -> APIClient:
        client_id, secret = await self.service.create_client_async(reactor)
        api = APIClient(reactor, self.service)
        await api.login(client_id, secret)
        api.credentials = (client_id, secret)  # type: ignore[attr-defined]
        return api

    # -- API shortcuts ------------------------------------------------------------------

    async def function(self, api: APIClient, public: bool = False) -> str:
        status, answer = await api.post(
            "/v2/functions",
            {
                "function_name": "add",
                "function_code": FUNCTION_CODE,
                "entry_point": "add",
                "container_uuid": None,
                "description": "adds",
                "public": public,
                "group": None,
            },
        )
        self.assertEqual(status, 200, answer)
        return str(answer["function_uuid"])

    async def endpoint(
        self, api: APIClient, endpoint_id: Optional[str] = None, **metadata: Any
    ) -> Dict[str, Any]:
        status, answer = await api.post(
            "/v2/endpoints",
            {
                "endpoint_name": "test-ep",
                "endpoint_uuid": endpoint_id or str(uuid.uuid4()),
                "metadata": {"endpoint_version": "test", "hostname": "here", **metadata},
            },
        )
        self.assertEqual(status, 200, answer)
        return dict(answer)

    async def submit(self, api: APIClient, tasks: List[Any], **body: Any) -> Dict[str, Any]:
        status, answer = await api.post("/v2/submit", {"tasks": tasks, **body})
        self.assertEqual(status, 200, answer)
        return dict(answer)

    async def task(self, api: APIClient, task_id: str) -> Dict[str, Any]:
        status, answer = await api.get(f"/v2/tasks/{task_id}")
        self.assertEqual(status, 200, answer)
        return dict(answer)

    async def done(self, api: APIClient, task_id: str) -> Dict[str, Any]:
        async def check() -> Any:
            answer = await self.task(api, task_id)
            return answer if answer["status"] in ("success", "failed") else None

        return await wait_until(check)  # type: ignore[no-any-return]

    def counts(self) -> Deferred[Dict[str, int]]:
        def read() -> Dict[str, int]:
            settings = ServiceSettings.load(self.service.state_dir)
            connection, call = storage.open_sync(settings.effective_database_url)
            try:
                return call(storage.counts)()
            finally:
                connection.close()

        return deferToThread(read)

    # -- AMQP, as an endpoint (or the broker's admin) --------------------------------------

    async def amqp(self, url: str) -> Any:
        client = await amqp_connect(reactor, url, self.service.broker_ca_file)
        self._amqp.append(client)
        if len(self._amqp) == 1:
            self.addCleanup(self._close_amqp)
        return client

    async def _close_amqp(self) -> None:
        for client in self._amqp:
            if client.transport is not None:
                closed = client.when_closed()
                client.transport.loseConnection()
                await closed

    async def admin(self) -> Any:
        """The broker's administrator, in the service's virtual host."""
        assert self.service.admin_amqp_url is not None
        return await self.amqp(self.service.admin_amqp_url)

    @staticmethod
    async def channel(client: Any) -> Any:
        return await client.open_channel(max(client.channels) + 1)

    async def publish(self, client: Any, exchange: str, routing_key: str, body: bytes) -> None:
        channel = await self.channel(client)
        publisher = ConfirmingPublisher(channel)
        await publisher.start()
        await publisher.publish(exchange, routing_key, body, {"delivery-mode": 2})

    async def take(
        self, client: Any, queue: str, count: int, settle: float = 0.3
    ) -> List[Delivery]:
        """Consume ``count`` messages from ``queue`` (acked); fails if more arrive."""
        channel = await self.channel(client)
        got: List[Delivery] = []
        tag = f"test-{uuid.uuid4()}"
        channel.handlers.consumers[tag] = got.append
        await channel.basic_consume(queue=queue, consumer_tag=tag)
        await wait_until(lambda: len(got) >= count)
        await sleep(settle)
        for delivery in got:
            channel.ack(delivery.delivery_tag)
        await channel.basic_cancel(consumer_tag=tag)
        self.assertEqual(len(got), count, f"expected {count} messages on {queue}")
        return got

    async def queue_depth(self, queue: str) -> int:
        if getattr(self, "_admin", None) is None:
            self._admin = await self.admin()
        admin = self._admin
        channel = await self.channel(admin)
        reply = await channel.queue_declare(queue=queue, passive=True)
        return int(reply.message_count)

    async def queue_exists(self, queue: str) -> bool:
        channel = await self.channel(await self.admin())
        try:
            await channel.queue_declare(queue=queue, passive=True)
        except Closed:
            return False
        return True

    def broker_user_exists(self, user: str) -> Deferred[bool]:
        """Whether the broker knows ``user`` (asked through its management API)."""
        import base64
        from urllib.error import HTTPError
        from urllib.parse import quote
        from urllib.request import Request, urlopen

        from funcx_endpoint.testing.rabbitmq import shared_node

        node = shared_node()

        def ask() -> bool:
            auth = base64.b64encode(f"{node.admin_user}:{node.admin_password}".encode()).decode()
            url = f"{node.management_url.rstrip('/')}/api/users/{quote(user, safe='')}"
            try:
                with urlopen(Request(url, headers={"Authorization": f"Basic {auth}"}), timeout=30):
                    return True
            except HTTPError as e:
                if e.code == 404:
                    return False
                raise

        return deferToThread(ask)

    def assert_error(
        self, status: int, answer: Any, expected: int, code: Optional[str] = None
    ) -> None:
        self.assertEqual(status, expected, answer)
        self.assertIsInstance(answer, dict)
        self.assertEqual(answer["http_status_code"], expected)
        self.assertTrue(answer["message"])
        self.assertEqual(answer["reason"], answer["message"])
        self.assertIn("error_args", answer)
        if code is not None:
            self.assertEqual(answer["code"], code)


def run(test: Callable[..., Any]) -> Callable[..., Deferred[None]]:
    """Run an ``async def`` test method as a Deferred."""

    def wrapper(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(test(self))

    wrapper.__name__ = test.__name__
    wrapper.__doc__ = test.__doc__
    return wrapper


class AuthTests(ServiceTestCase):
    """The Globus Auth calls (PROTOCOL.md section 6, notes A1)."""

    @run
    async def test_token_answers(self) -> None:
        api = APIClient(reactor, self.service)
        client_id, secret = self.alice.credentials  # type: ignore[attr-defined]
        answer = await api.login(client_id, secret)
        self.assertEqual(answer["resource_server"], "funcx_service")
        self.assertEqual(answer["other_tokens"], [])
        self.assertEqual(answer["token_type"], "Bearer")
        self.assertGreater(answer["expires_in"], 3600)
        both = await api.login(client_id, secret, scope=f"openid {answer['scope']}")
        self.assertEqual(both["resource_server"], "funcx_service")
        self.assertEqual([t["resource_server"] for t in both["other_tokens"]], ["auth.globus.org"])
        openid = await api.login(client_id, secret, scope="openid")
        self.assertEqual(openid["resource_server"], "auth.globus.org")
        # An openid token is not for the funcX API...
        status, error = await api.get("/v2/endpoints", token=openid["access_token"])
        self.assert_error(status, error, 403, "INSUFFICIENT_SCOPE")
        # ... but for userinfo (whoami) it is.
        status, me = await api.get("/v2/oauth2/userinfo", token=openid["access_token"])
        self.assertEqual(status, 200, me)
        status, ids = await api.get(
            f"/v2/api/identities?ids={me['sub']}", token=openid["access_token"]
        )
        self.assertEqual(status, 200)
        self.assertEqual([i["id"] for i in ids["identities"]], [me["sub"]])
        self.assertEqual(ids["identities"][0]["username"], me["preferred_username"])
        # Someone else's identity is not shown.
        bob = await self.user()
        status, theirs = await bob.get("/v2/oauth2/userinfo")
        status, ids = await api.get(
            f"/v2/api/identities?ids={theirs['sub']}", token=openid["access_token"]
        )
        self.assertEqual(ids["identities"], [])

    @run
    async def test_token_refusals(self) -> None:
        from urllib.parse import urlencode

        api = APIClient(reactor, self.service)
        client_id, secret = self.alice.credentials  # type: ignore[attr-defined]
        form = {"Content-Type": "application/x-www-form-urlencoded"}

        async def token(auth: Optional[str], fields: Dict[str, str]) -> Tuple[int, Any]:
            headers = dict(form)
            if auth is not None:
                headers["Authorization"] = auth
            return await api.request(
                "POST", "/v2/oauth2/token", raw=urlencode(fields).encode(), headers=headers
            )

        import base64

        def basic(user: str, password: str) -> str:
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        good = {"grant_type": "client_credentials", "scope": "openid"}
        for auth, fields, expected, error in (
            (basic(client_id, secret + "x"), good, 401, "invalid_client"),
            (basic(str(uuid.uuid4()), secret), good, 401, "invalid_client"),
            (None, good, 401, "invalid_client"),
            ("Basic !!!", good, 401, "invalid_client"),
            (
                basic(client_id, secret),
                {"grant_type": "password", "scope": "openid"},
                400,
                "unsupported_grant_type",
            ),
            (
                basic(client_id, secret),
                {"grant_type": "client_credentials", "scope": "x:y"},
                400,
                "invalid_scope",
            ),
            (basic(client_id, secret), {"grant_type": "client_credentials"}, 400, "invalid_scope"),
        ):
            status, answer = await token(auth, fields)
            self.assert_error(status, answer, expected)
            self.assertEqual(answer["error"], error)
        # Credentials as form fields (client_secret_post) work too.
        status, answer = await token(
            None, {**good, "client_id": client_id, "client_secret": secret}
        )
        self.assertEqual(status, 200, answer)

    @run
    async def test_bad_tokens_are_401(self) -> None:
        for headers in (
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer nope"},
            {"Authorization": "Basic eDp5"},
        ):
            status, answer = await self.alice.get("/v2/endpoints", headers=headers)
            self.assert_error(status, answer, 401)

    @run
    async def test_revoke_and_introspect(self) -> None:
        api = APIClient(reactor, self.service)
        client_id, secret = self.alice.credentials  # type: ignore[attr-defined]
        await api.login(client_id, secret)
        import base64
        from urllib.parse import urlencode

        basic = "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        form = "application/x-www-form-urlencoded"
        status, info = await api.request(
            "POST",
            "/v2/oauth2/token/introspect",
            raw=urlencode({"token": api.token}).encode(),
            headers={"Authorization": basic, "Content-Type": form},
        )
        self.assertEqual(status, 200, info)
        self.assertTrue(info["active"])
        self.assertEqual(info["client_id"], client_id)
        # A token sent other than as a form field revokes nothing: 400, not a 200 that
        # says it did.
        status, answer = await api.request(
            "POST",
            "/v2/oauth2/token/revoke",
            raw=json.dumps({"token": api.token}).encode(),
            headers={"Content-Type": "application/json"},
        )
        self.assert_error(status, answer, 400, "invalid_request")
        self.assertIn("form field token", answer["message"])
        status, answer = await api.get("/v2/endpoints")
        self.assertEqual(status, 200, answer)
        # funcx-endpoint logout: no credentials, and sometimes no token at all (funcX
        # 1.0's logout revokes a refresh token that client-credentials logins lack).
        for fields in ({"client_id": client_id}, {"token": api.token, "client_id": client_id}):
            status, answer = await api.request(
                "POST",
                "/v2/oauth2/token/revoke",
                raw=urlencode(fields).encode(),
                headers={"Content-Type": form},
            )
            self.assertEqual(status, 200, answer)
        status, answer = await api.get("/v2/endpoints")
        self.assert_error(status, answer, 401)
        status, info = await api.request(
            "POST",
            "/v2/oauth2/token/introspect",
            raw=urlencode({"token": api.token}).encode(),
            headers={"Authorization": basic, "Content-Type": form},
        )
        self.assertEqual(info, {"active": False})

    @run
    async def test_revoked_client_and_expired_token(self) -> None:
        bob = await self.user()
        client_id, _ = bob.credentials  # type: ignore[attr-defined]

        def revoke_and_expire() -> None:
            settings = ServiceSettings.load(self.service.state_dir)
            connection, call = storage.open_sync(settings.effective_database_url)
            try:
                call(accounts.revoke_client)(client_id, time.time())
                call(
                    lambda tx: tx.execute(
                        "UPDATE tokens SET expires = 1 WHERE client_id = ?",
                        (self.alice.credentials[0],),
                    )
                )()  # type: ignore[attr-defined]
            finally:
                connection.close()

        await deferToThread(revoke_and_expire)
        status, answer = await bob.get("/v2/endpoints")
        self.assert_error(status, answer, 401, "UNAUTHORIZED")
        status, answer = await self.alice.get("/v2/endpoints")
        self.assert_error(status, answer, 401, "TOKEN_EXPIRED")
        # A revoked client cannot log in again.
        status, answer = await APIClient(reactor, self.service).request(
            "POST",
            "/v2/oauth2/token",
            raw=b"grant_type=client_credentials&scope=openid",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": "Basic "
                + __import__("base64")
                .b64encode(f"{client_id}:{bob.credentials[1]}".encode())
                .decode(),
            },  # type: ignore[attr-defined]
        )
        self.assert_error(status, answer, 401)


class FunctionAndInputTests(ServiceTestCase):
    @run
    async def test_version(self) -> None:
        status, answer = await APIClient(reactor, self.service).get("/v2/version?service=all")
        self.assertEqual(status, 200)
        self.assertEqual(answer["api"], "1.0.13")
        self.assertEqual(answer["min_sdk_version"], "1.0.0")
        self.assertEqual(answer["min_ep_version"], "1.0.0")

    @run
    async def test_register_function(self) -> None:
        function_id = await self.function(self.alice)
        self.assertEqual(str(uuid.UUID(function_id)), function_id)

    @run
    async def test_bad_requests_change_nothing(self) -> None:
        api = self.alice
        endpoint = (await self.endpoint(api))["endpoint_id"]
        function_id = await self.function(api)
        before = await self.counts()
        queue = f"{endpoint}.tasks"
        good_fn = {"function_name": "f", "function_code": FUNCTION_CODE}
        cases: List[Tuple[str, str, Dict[str, Any], int, str]] = [
            ("POST", "/v2/functions", {"raw": b"{not json"}, 400, "INVALID_JSON"),
            ("POST", "/v2/functions", {"raw": b""}, 400, "MISSING_BODY"),
            ("POST", "/v2/functions", {"body": [1, 2]}, 400, "INVALID_BODY"),
            (
                "POST",
                "/v2/functions",
                {"body": {"function_code": FUNCTION_CODE}},
                400,
                "MISSING_FIELD",
            ),
            (
                "POST",
                "/v2/functions",
                {"body": {**good_fn, "function_name": 7}},
                400,
                "INVALID_TYPE",
            ),
            ("POST", "/v2/functions", {"body": {**good_fn, "public": "yes"}}, 400, "INVALID_TYPE"),
            (
                "POST",
                "/v2/functions",
                {"body": {**good_fn, "container_uuid": "x"}},
                400,
                "INVALID_UUID",
            ),
            (
                "POST",
                "/v2/functions",
                {"body": {**good_fn, "function_code": "oops"}},
                400,
                "INVALID_FUNCTION",
            ),
            (
                "POST",
                "/v2/functions",
                {"body": {**good_fn, "function_code": FUNCTION_CODE * 2}},
                400,
                "INVALID_FUNCTION",
            ),
            (
                "POST",
                "/v2/functions",
                {"body": {**good_fn, "function_name": ""}},
                422,
                "INVALID_VALUE",
            ),
            (
                "POST",
                "/v2/functions",
                {"raw": b'{"a": 1}', "headers": {"Content-Type": "text/plain"}},
                415,
                "UNSUPPORTED_MEDIA_TYPE",
            ),
            ("POST", "/v2/submit", {"body": {"tasks": "all"}}, 400, "INVALID_TYPE"),
            (
                "POST",
                "/v2/submit",
                {"body": {"tasks": [], "task_group_id": "tg"}},
                400,
                "INVALID_UUID",
            ),
            (
                "POST",
                "/v2/submit",
                {"body": {"tasks": [], "create_websocket_queue": 1}},
                400,
                "INVALID_TYPE",
            ),
            (
                "POST",
                "/v2/submit",
                {"body": {"tasks": [[function_id, endpoint, PAYLOAD]] * 10001}},
                400,
                "TOO_MANY_TASKS",
            ),
            ("POST", "/v2/submit", {"raw": b'{"tasks": [['}, 400, "INVALID_JSON"),
            ("GET", "/v2/tasks/not-a-uuid", {}, 400, "INVALID_UUID"),
            ("GET", f"/v2/tasks/{uuid.uuid4()}", {}, 404, "TASK_NOT_FOUND"),
            ("POST", "/v2/batch_status", {"body": {"task_ids": "x"}}, 400, "INVALID_TYPE"),
            ("POST", "/v2/batch_status", {"body": {"task_ids": ["nope"]}}, 400, "INVALID_UUID"),
            (
                "POST",
                "/v2/batch_status",
                {"body": {"task_ids": [str(uuid.uuid4())] * 4097}},
                400,
                "TOO_MANY_IDS",
            ),
            ("GET", "/v2/taskgroup/zzz", {}, 400, "INVALID_UUID"),
            ("GET", f"/v2/taskgroup/{uuid.uuid4()}", {}, 404, "TASK_GROUP_NOT_FOUND"),
            (
                "POST",
                "/v2/endpoints",
                {"body": {"endpoint_uuid": str(uuid.uuid4())}},
                400,
                "MISSING_FIELD",
            ),
            (
                "POST",
                "/v2/endpoints",
                {"body": {"endpoint_name": "e", "endpoint_uuid": "e1"}},
                400,
                "INVALID_UUID",
            ),
            (
                "POST",
                "/v2/endpoints",
                {"body": {"endpoint_name": "e", "metadata": [1]}},
                400,
                "INVALID_TYPE",
            ),
            (
                "POST",
                "/v2/endpoints",
                {"body": {"endpoint_name": "e", "metadata": {"allowed_functions": ["x"]}}},
                422,
                "INVALID_UUID",
            ),
            ("GET", "/v2/endpoints/xyz", {}, 400, "INVALID_UUID"),
            ("GET", f"/v2/endpoints/{uuid.uuid4()}", {}, 404, "ENDPOINT_NOT_FOUND"),
            ("GET", f"/v2/endpoints/{uuid.uuid4()}/status", {}, 404, "ENDPOINT_NOT_FOUND"),
            ("POST", f"/v2/endpoints/{endpoint}/lock", {"raw": b"{]"}, 400, "INVALID_JSON"),
            (
                "POST",
                f"/v2/endpoints/{endpoint}/whitelist",
                {"body": {"func": "nope"}},
                400,
                "INVALID_UUID",
            ),
            (
                "POST",
                f"/v2/endpoints/{endpoint}/whitelist",
                {"body": {"func": []}},
                400,
                "INVALID_TYPE",
            ),
            (
                "POST",
                f"/v2/endpoints/{endpoint}/whitelist",
                {"body": {"func": [str(uuid.uuid4())]}},
                404,
                "FUNCTION_NOT_FOUND",
            ),
            (
                "DELETE",
                f"/v2/endpoints/{endpoint}/whitelist/{function_id}",
                {},
                404,
                "FUNCTION_NOT_FOUND",
            ),
            ("DELETE", f"/v2/endpoints/{endpoint}/whitelist/abc", {}, 400, "INVALID_UUID"),
            ("GET", "/v2/nowhere", {}, 404, "NOT_FOUND"),
            ("PUT", "/v2/submit", {"body": {}}, 405, "METHOD_NOT_ALLOWED"),
        ]
        for method, path, kwargs, expected, code in cases:
            request: Dict[str, Any] = {}
            if "raw" in kwargs:
                request["raw"] = kwargs["raw"]
                request["headers"] = {
                    "Authorization": f"Bearer {api.token}",
                    "Content-Type": "application/json",
                    **kwargs.get("headers", {}),
                }
            body = kwargs.get("body", ...)
            if body is not ...:
                status, answer = await api.request(method, path, body, **request)
            else:
                status, answer = await api.request(method, path, **request)
            with self.subTest(method=method, path=path[:40], code=code):
                self.assert_error(status, answer, expected, code)
        self.assertEqual(await self.counts(), before)
        self.assertEqual(await self.queue_depth(queue), 0)
        status, answer = await api.get(f"/v2/endpoints/{endpoint}/whitelist")
        self.assertEqual(answer["functions"], [])

    @run
    async def test_oversized_body_is_413(self) -> None:
        before = await self.counts()
        big = "x" * (11 * 1024 * 1024)
        status, answer = await self.alice.post(
            "/v2/functions", {"function_name": "big", "function_code": f"{len(big)}\n{big}"}
        )
        self.assert_error(status, answer, 413, "REQUEST_TOO_LARGE")
        self.assertEqual(answer["max_request_size"], 10 * 1024 * 1024)
        self.assertEqual(await self.counts(), before)
        # The service is fine afterwards.
        await self.function(self.alice)

    @run
    async def test_oversized_chunked_body_is_413(self) -> None:
        """Without a Content-Length the limit holds too (the body is counted as it comes)."""
        import http.client
        import ssl
        from urllib.parse import urlsplit

        root = urlsplit(self.service.root_url)
        token = self.alice.token

        def send() -> Tuple[int, Any]:
            context = ssl.create_default_context(cafile=self.service.ca_file)
            connection = http.client.HTTPSConnection(root.hostname, root.port, context=context)
            try:
                chunk = b" " * (1024 * 1024)
                body = iter([b'{"function_name": "x", "function_code": "'] + [chunk] * 12 + [b'"}'])
                connection.request(
                    "POST",
                    "/v2/functions",
                    body=body,
                    encode_chunked=True,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                    },
                )
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        before = await self.counts()
        status, answer = await deferToThread(send)
        self.assert_error(status, answer, 413, "REQUEST_TOO_LARGE")
        self.assertEqual(await self.counts(), before)


def _escaped(body: Any) -> str:
    """``body`` as JSON, with ``LONE`` and ``LOW`` spelled as lone surrogate escapes."""
    return json.dumps(body).replace("LONE", "\\ud800").replace("LOW", "\\udfff")


class TextAndNumberTests(ServiceTestCase):
    """Text that is not valid Unicode, NaN and Infinity, numbers too big, crafted strings."""

    async def raw_post(self, path: str, text: str) -> Tuple[int, Any]:
        """POST ``text`` (JSON written by hand, escapes kept) as the body."""
        return await self.alice.request(
            "POST",
            path,
            raw=text.encode(),
            headers={
                "Authorization": f"Bearer {self.alice.token}",
                "Content-Type": "application/json",
            },
        )

    @run
    async def test_lone_surrogates_are_400_and_change_nothing(self) -> None:
        before = await self.counts()
        fresh = [str(uuid.uuid4()) for _ in range(4)]
        good_fn = {"function_name": "f", "function_code": FUNCTION_CODE}
        cases = [
            ("/v2/functions", {**good_fn, "function_name": "xLONE"}),
            ("/v2/functions", {**good_fn, "description": "LOW"}),
            ("/v2/endpoints", {"endpoint_name": "eLONE", "endpoint_uuid": fresh[0]}),
            (
                "/v2/endpoints",
                {"endpoint_name": "e", "endpoint_uuid": fresh[1], "metadata": {"k": "LONE"}},
            ),
            (
                "/v2/endpoints",
                {"endpoint_name": "e", "endpoint_uuid": fresh[2], "metadata": {"LOW": 1}},
            ),
        ]
        for path, body in cases:
            status, answer = await self.raw_post(path, _escaped(body))
            with self.subTest(path=path, body=str(body)[:60]):
                self.assert_error(status, answer, 400, "INVALID_TEXT")
        # Raw UTF-8-style surrogate bytes (json.loads of bytes lets them through).
        raw = json.dumps({"endpoint_name": "eLONE", "endpoint_uuid": fresh[3]}).encode()
        status, answer = await self.alice.request(
            "POST",
            "/v2/endpoints",
            raw=raw.replace(b"LONE", b"\xed\xa0\x80"),
            headers={
                "Authorization": f"Bearer {self.alice.token}",
                "Content-Type": "application/json",
            },
        )
        self.assert_error(status, answer, 400, "INVALID_TEXT")
        self.assertEqual(await self.counts(), before)
        for endpoint_id in fresh:
            self.assertFalse(await self.queue_exists(f"{endpoint_id}.tasks"))
            self.assertFalse(await self.broker_user_exists(f"funcx-ep-{endpoint_id}"))
        # A valid surrogate pair (an escaped emoji) is fine.
        status, answer = await self.raw_post(
            "/v2/functions", json.dumps({**good_fn, "function_name": "\U0001f600"})
        )
        self.assertEqual(status, 200, answer)

    @run
    async def test_lone_surrogate_payload_fails_its_task_alone(self) -> None:
        endpoint_id = (await self.endpoint(self.alice))["endpoint_id"]
        function_id = await self.function(self.alice)
        tasks = [[function_id, endpoint_id, PAYLOAD], [function_id, endpoint_id, "00\nLONE"]]
        status, answer = await self.raw_post("/v2/submit", _escaped({"tasks": tasks}))
        self.assertEqual(status, 200, answer)
        first, second = answer["results"]
        self.assertEqual(first["http_status_code"], 200)
        self.assertEqual((second["http_status_code"], second["code"]), (400, "INVALID_PAYLOAD"))
        self.assertIsNone(second["task_uuid"])
        view = await self.task(self.alice, first["task_uuid"])
        self.assertEqual(view["status"], "waiting-for-ep")

    @run
    async def test_nan_and_infinity(self) -> None:
        before = await self.counts()
        endpoint_id = str(uuid.uuid4())
        for literal in ("NaN", "Infinity", "-Infinity"):
            body = {"endpoint_name": "e", "endpoint_uuid": endpoint_id, "metadata": {"x": 0}}
            status, answer = await self.raw_post(
                "/v2/endpoints", json.dumps(body).replace('"x": 0', f'"x": {literal}')
            )
            with self.subTest(literal=literal):
                self.assert_error(status, answer, 400, "INVALID_JSON")
        self.assertEqual(await self.counts(), before)
        self.assertFalse(await self.queue_exists(f"{endpoint_id}.tasks"))
        # Heartbeat settings that are not finite positive numbers are ignored, and
        # every answer stays strict JSON.
        for period in ("inf", "nan", "-inf", "1e400", 10**400, -5, True):
            registered = await self.endpoint(
                self.alice, heartbeat_period=period, heartbeat_threshold=period
            )
            status, view = await self.alice.get(f"/v2/endpoints/{registered['endpoint_id']}")
            with self.subTest(period=str(period)[:20]):
                self.assertEqual(status, 200, view)
                self.assertIsNone(view["heartbeat_period"])
                self.assertEqual(view["heartbeat_threshold"], 120)
                json.dumps(view, allow_nan=False)
        status, listed = await self.alice.get("/v2/endpoints")
        self.assertEqual(status, 200)
        json.dumps(listed, allow_nan=False)

    @run
    async def test_crafted_allowed_functions_strings(self) -> None:
        before = await self.counts()
        started = time.monotonic()
        for text in (
            "-" * 100_000 + "1",
            "1+" * 100_000 + "1",
            "[" * 5000 + "]" * 5000,
            "(" * 50_000,
            "[" + "1," * 50_000 + "]",
        ):
            status, answer = await self.alice.post(
                "/v2/endpoints",
                {
                    "endpoint_name": "e",
                    "endpoint_uuid": str(uuid.uuid4()),
                    "metadata": {"allowed_functions": text},
                },
            )
            with self.subTest(text=text[:12]):
                self.assert_error(status, answer, 422, "INVALID_VALUE")
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(await self.counts(), before)
        # A long repr() list of ids, as funcX 1.0 endpoints send it, is read.
        ids = [str(uuid.uuid4()) for _ in range(3000)]
        registered = await self.endpoint(self.alice, allowed_functions=repr(ids))
        status, view = await self.alice.get(f"/v2/endpoints/{registered['endpoint_id']}")
        self.assertEqual(view["allowed_functions"], ids)


class EndpointTests(ServiceTestCase):
    @run
    async def test_registration_answer(self) -> None:
        endpoint_id = str(uuid.uuid4())
        answer = await self.endpoint(self.alice, endpoint_id)
        self.assertEqual(answer["endpoint_id"], endpoint_id)
        tasks, results = answer["task_queue_info"], answer["result_queue_info"]
        self.assertTrue(tasks["connection_url"].startswith("amqps://"))
        self.assertEqual(tasks["exchange"], "tasks")
        self.assertEqual(tasks["queue"], f"{endpoint_id}.tasks")
        self.assertEqual(results["exchange"], "results")
        self.assertEqual(results["queue"], "results")
        self.assertEqual(
            results["queue_publish_kwargs"],
            {
                "exchange": "results",
                "routing_key": f"{endpoint_id}.results",
                "mandatory": True,
                "properties": {"delivery_mode": 2},
            },
        )
        # Registering again keeps the broker credentials.
        again = await self.endpoint(self.alice, endpoint_id)
        self.assertEqual(again["task_queue_info"]["connection_url"], tasks["connection_url"])
        # No id: the service makes one.
        status, made = await self.alice.post("/v2/endpoints", {"endpoint_name": "x"})
        self.assertEqual(status, 200)
        uuid.UUID(made["endpoint_id"])

    @run
    async def test_registration_race_keeps_the_winners_credentials(self) -> None:
        """Two users registering the same new id at once: the loser changes nothing."""
        from twisted.internet.defer import gatherResults

        bob = await self.user()
        for _ in range(4):
            endpoint_id = str(uuid.uuid4())
            body = {"endpoint_name": "race", "endpoint_uuid": endpoint_id}
            answers = await gatherResults(
                [
                    Deferred.fromCoroutine(self.alice.post("/v2/endpoints", body)),
                    Deferred.fromCoroutine(bob.post("/v2/endpoints", body)),
                ]
            )
            statuses = sorted(status for status, _ in answers)
            self.assertEqual(statuses, [200, 403], answers)
            winner = next(answer for status, answer in answers if status == 200)
            # The winner's credentials work: the loser did not replace its password.
            client = await self.amqp(winner["task_queue_info"]["connection_url"])
            channel = await self.channel(client)
            await channel.queue_declare(queue=f"{endpoint_id}.tasks", passive=True)

    @run
    async def test_list_get_status(self) -> None:
        first = (await self.endpoint(self.alice, heartbeat_threshold="50"))["endpoint_id"]
        second = (await self.endpoint(self.alice))["endpoint_id"]
        status, listed = await self.alice.get("/v2/endpoints")
        self.assertEqual(status, 200)
        self.assertEqual([e["endpoint_id"] for e in listed], [first, second])
        self.assertEqual({e["status"] for e in listed}, {"offline"})
        status, metadata = await self.alice.get(f"/v2/endpoints/{first}")
        self.assertEqual(status, 200)
        self.assertEqual(metadata["endpoint_name"], "test-ep")
        self.assertEqual(metadata["metadata"]["hostname"], "here")
        self.assertEqual(metadata["heartbeat_threshold"], 50)
        self.assertEqual(metadata["ip_address"], "127.0.0.1")
        self.assertFalse(metadata["locked"])
        status, answer = await self.alice.get(f"/v2/endpoints/{first}/status")
        self.assertEqual(status, 200)
        self.assertEqual((answer["status"], answer["logs"]), ("offline", []))

    @run
    async def test_other_users_endpoints(self) -> None:
        bob = await self.user()
        endpoint_id = (await self.endpoint(self.alice))["endpoint_id"]
        before = await self.counts()
        status, answer = await bob.post(
            "/v2/endpoints", {"endpoint_name": "mine", "endpoint_uuid": endpoint_id}
        )
        self.assert_error(status, answer, 403, "ENDPOINT_FORBIDDEN")
        for method, path in (
            ("GET", ""),
            ("GET", "/status"),
            ("POST", "/lock"),
            ("DELETE", ""),
            ("GET", "/whitelist"),
            ("POST", "/whitelist"),
        ):
            body = (
                {"func": [str(uuid.uuid4())]} if path == "/whitelist" and method == "POST" else ...
            )
            kwargs = {} if body is ... else {"body": body}
            status, answer = await bob.request(
                method, f"/v2/endpoints/{endpoint_id}{path}", **kwargs
            )
            self.assert_error(status, answer, 404, "ENDPOINT_NOT_FOUND")
            self.assertNotIn("test-ep", json.dumps(answer))
        status, listed = await bob.get("/v2/endpoints")
        self.assertEqual(listed, [])
        self.assertEqual(await self.counts(), before)
        status, metadata = await self.alice.get(f"/v2/endpoints/{endpoint_id}")
        self.assertEqual((metadata["locked"], metadata["endpoint_name"]), (False, "test-ep"))

    @run
    async def test_lock_refuses_next_registration_once(self) -> None:
        endpoint_id = (await self.endpoint(self.alice))["endpoint_id"]
        status, answer = await self.alice.post(f"/v2/endpoints/{endpoint_id}/lock", {})
        self.assertEqual((status, answer), (200, {"endpoint_id": endpoint_id, "locked": True}))
        status, metadata = await self.alice.get(f"/v2/endpoints/{endpoint_id}")
        self.assertTrue(metadata["locked"])
        status, answer = await self.alice.post(
            "/v2/endpoints", {"endpoint_name": "e", "endpoint_uuid": endpoint_id}
        )
        self.assert_error(status, answer, 423, "ENDPOINT_LOCKED")
        await self.endpoint(self.alice, endpoint_id)
        # A lock without a body works too (the SDK sends {}).
        status, _ = await self.alice.post(f"/v2/endpoints/{endpoint_id}/lock")
        self.assertEqual(status, 200)

    @run
    async def test_delete(self) -> None:
        answer = await self.endpoint(self.alice)
        endpoint_id = answer["endpoint_id"]
        function_id = await self.function(self.alice)
        submitted = await self.submit(self.alice, [[function_id, endpoint_id, PAYLOAD]])
        task_id = submitted["results"][0]["task_uuid"]
        status, deleted = await self.alice.delete(f"/v2/endpoints/{endpoint_id}")
        self.assertEqual(status, 200)
        self.assertEqual(deleted, {"endpoint_id": endpoint_id, "deleted": True, "tasks_failed": 1})
        failed = await self.task(self.alice, task_id)
        self.assertEqual(failed["status"], "failed")
        self.assertEqual(failed["error_details"]["code"], "EndpointDeleted")
        self.assertIn("completion_t", failed)
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/status"), ("POST", "/lock")):
            status, error = await self.alice.request(method, f"/v2/endpoints/{endpoint_id}{path}")
            self.assert_error(status, error, 410, "ENDPOINT_DELETED")
        status, error = await self.alice.post(
            "/v2/endpoints", {"endpoint_name": "e", "endpoint_uuid": endpoint_id}
        )
        self.assert_error(status, error, 410, "ENDPOINT_DELETED")
        status, listed = await self.alice.get("/v2/endpoints")
        self.assertEqual(listed, [])
        submitted = await self.submit(self.alice, [[function_id, endpoint_id, PAYLOAD]])
        self.assertEqual(submitted["results"][0]["http_status_code"], 410)
        # Its broker user is gone: the credentials no longer log in.
        from funcx_endpoint.amqp.connection import AMQPError

        with self.assertRaises(AMQPError):
            await self.amqp(answer["task_queue_info"]["connection_url"])

    @run
    async def test_second_instance_is_409(self) -> None:
        answer = await self.endpoint(self.alice)
        endpoint_id = answer["endpoint_id"]
        running = await self.amqp(answer["task_queue_info"]["connection_url"])
        channel = await self.channel(running)
        await channel.basic_consume(queue=f"{endpoint_id}.tasks", consumer_tag="ep", exclusive=True)
        status, error = await self.alice.post(
            "/v2/endpoints", {"endpoint_name": "e", "endpoint_uuid": endpoint_id}
        )
        self.assert_error(status, error, 409, "ENDPOINT_ALREADY_RUNNING")
        self.assertIn("already running", error["message"])
        await channel.basic_cancel(consumer_tag="ep")
        await self.endpoint(self.alice, endpoint_id)

    @run
    async def test_whitelist(self) -> None:
        endpoint_id = (await self.endpoint(self.alice))["endpoint_id"]
        allowed = await self.function(self.alice)
        other = await self.function(self.alice)
        path = f"/v2/endpoints/{endpoint_id}/whitelist"
        status, answer = await self.alice.post(path, {"func": [allowed]})
        self.assertEqual(
            (status, answer), (200, {"endpoint_id": endpoint_id, "functions": [allowed]})
        )
        status, answer = await self.alice.get(path)
        self.assertEqual(answer["functions"], [allowed])
        submitted = await self.submit(
            self.alice, [[allowed, endpoint_id, PAYLOAD], [other, endpoint_id, PAYLOAD]]
        )
        self.assertEqual([r["http_status_code"] for r in submitted["results"]], [200, 403])
        self.assertEqual(submitted["results"][1]["code"], "FUNCTION_NOT_ALLOWED")
        status, answer = await self.alice.delete(f"{path}/{allowed}")
        self.assertEqual((status, answer["functions"]), (200, []))
        submitted = await self.submit(self.alice, [[other, endpoint_id, PAYLOAD]])
        self.assertEqual(submitted["results"][0]["http_status_code"], 200)

    @run
    async def test_allowed_functions_from_metadata(self) -> None:
        allowed = await self.function(self.alice)
        other = await self.function(self.alice)
        ours = (await self.endpoint(self.alice, allowed_functions=[allowed]))["endpoint_id"]
        # funcX 1.0 endpoints send their config as repr() strings.
        theirs = await self.endpoint(self.alice, config={"allowed_functions": f"['{allowed}']"})
        submitted = await self.submit(
            self.alice,
            [
                [allowed, ours, PAYLOAD],
                [other, ours, PAYLOAD],
                [other, theirs["endpoint_id"], PAYLOAD],
            ],
        )
        self.assertEqual([r["http_status_code"] for r in submitted["results"]], [200, 403, 403])


class TaskTests(ServiceTestCase):
    @run
    async def test_submit_mixed_batch(self) -> None:
        api = self.alice
        bob = await self.user()
        answer = await self.endpoint(api)
        endpoint_id = answer["endpoint_id"]
        function_id = await self.function(api)
        bobs_function = await self.function(bob)
        bobs_public = await self.function(bob, public=True)
        bobs_endpoint = (await self.endpoint(bob))["endpoint_id"]
        group = str(uuid.uuid4())
        tasks = [
            [function_id, endpoint_id, PAYLOAD],
            "not a task",
            [function_id, endpoint_id],
            ["nope", endpoint_id, PAYLOAD],
            [function_id, "nope", PAYLOAD],
            [str(uuid.uuid4()), endpoint_id, PAYLOAD],
            [bobs_function, endpoint_id, PAYLOAD],
            [function_id, str(uuid.uuid4()), PAYLOAD],
            [function_id, bobs_endpoint, PAYLOAD],
            [function_id, endpoint_id, "garbage"],
            [function_id, endpoint_id, pack_payload((1,), {}) + "3\nabc"],
            [bobs_public, endpoint_id, PAYLOAD],
            [function_id.upper(), endpoint_id, PAYLOAD],
        ]
        submitted = await self.submit(api, tasks, task_group_id=group)
        self.assertEqual(submitted["task_group_id"], group)
        codes = [r["http_status_code"] for r in submitted["results"]]
        self.assertEqual(codes, [200, 400, 400, 400, 400, 404, 404, 404, 403, 400, 400, 200, 200])
        for result in submitted["results"]:
            if result["http_status_code"] == 200:
                uuid.UUID(result["task_uuid"])
            else:
                self.assertIsNone(result["task_uuid"])
                self.assertTrue(result["reason"])
        created = [r["task_uuid"] for r in submitted["results"] if r["task_uuid"]]
        # Exactly the created tasks reach the endpoint's queue, with function_id.
        endpoint = await self.amqp(answer["task_queue_info"]["connection_url"])
        deliveries = await self.take(endpoint, f"{endpoint_id}.tasks", 3)
        messages = [unpack(d.body) for d in deliveries]
        self.assertEqual(sorted(m.task_id for m in messages), sorted(created))
        for message in messages:
            assert isinstance(message, Task)
            fn, args, kwargs = unpack_task_buffer(message.task_buffer)
            self.assertEqual(fn(*args, **kwargs), 3)
            self.assertIn(message.function_id, (function_id, bobs_public))
        self.assertEqual(deliveries[0].properties.get("delivery-mode"), 2)
        # The task group, pending views, batch status.
        status, group_answer = await api.get(f"/v2/taskgroup/{group}")
        self.assertEqual(group_answer["taskgroup_id"], group)
        self.assertEqual(sorted(t["id"] for t in group_answer["tasks"]), sorted(created))
        status, bobs_view = await bob.get(f"/v2/taskgroup/{group}")
        self.assertEqual(status, 404)
        view = await self.task(api, created[0])
        self.assertEqual(view, {"task_id": created[0], "status": "waiting-for-ep"})
        status, answer = await bob.get(f"/v2/tasks/{created[0]}")
        self.assert_error(status, answer, 404, "TASK_NOT_FOUND")
        unknown = str(uuid.uuid4())
        status, batch = await api.post("/v2/batch_status", {"task_ids": created + [unknown]})
        self.assertEqual(status, 200)
        self.assertEqual(sorted(batch["results"]), sorted(created))
        status, batch = await bob.post("/v2/batch_status", {"task_ids": created})
        self.assertEqual(batch["results"], {})

    @run
    async def test_results_and_dedupe(self) -> None:
        api = self.alice
        answer = await self.endpoint(api)
        endpoint_id = answer["endpoint_id"]
        function_id = await self.function(api)
        submitted = await self.submit(api, [[function_id, endpoint_id, PAYLOAD]] * 3)
        ok, failed, twice = [r["task_uuid"] for r in submitted["results"]]
        endpoint = await self.amqp(answer["result_queue_info"]["connection_url"])
        key = f"{endpoint_id}.results"
        transitions = [TaskTransition.now("execution-start", "worker")]
        await self.publish(
            endpoint, "results", key, pack(Result.success(ok, serialize(3), transitions))
        )
        await self.publish(
            endpoint,
            "results",
            key,
            pack(
                Result.failure(
                    failed,
                    "RemoteExecutionError",
                    "An error occurred during the execution of this task",
                    "Traceback (most recent call last):\nValueError: bad\n",
                )
            ),
        )
        await self.publish(
            endpoint, "results", key, pack(Result.success(twice, serialize("first")))
        )
        await self.publish(
            endpoint, "results", key, pack(Result.success(twice, serialize("second")))
        )
        done = await self.done(api, ok)
        self.assertEqual(done["status"], "success")
        self.assertEqual(deserialize(done["result"]), 3)
        float(done["completion_t"])
        done = await self.done(api, failed)
        self.assertEqual(done["status"], "failed")
        self.assertEqual(done["exception"], "Traceback (most recent call last):\nValueError: bad\n")
        self.assertEqual(done["error_details"]["code"], "RemoteExecutionError")
        self.assertNotIn("result", done)
        first = await self.done(api, twice)
        await self.publish(
            endpoint, "results", key, pack(Result.success(twice, serialize("third")))
        )
        await sleep(0.5)
        self.assertEqual(await self.task(api, twice), first)
        self.assertEqual(deserialize(first["result"]), "first")
        # Nothing is left unacknowledged on the results queue.
        await wait_until(lambda: _when(lambda: self.queue_depth("results"), lambda n: n == 0))

    @run
    async def test_unstorable_result_does_not_block_the_others(self) -> None:
        """A result holding a lone surrogate fails its task; results around it are stored."""
        api = self.alice
        bob = await self.user()
        answer = await self.endpoint(api)
        endpoint_id = answer["endpoint_id"]
        function_id = await self.function(api)
        bad, good = [
            r["task_uuid"]
            for r in (await self.submit(api, [[function_id, endpoint_id, PAYLOAD]] * 2))["results"]
        ]
        bobs = await self.endpoint(bob)
        bobs_task = (
            await self.submit(bob, [[await self.function(bob), bobs["endpoint_id"], PAYLOAD]])
        )["results"][0]["task_uuid"]
        endpoint = await self.amqp(answer["result_queue_info"]["connection_url"])
        bobs_endpoint = await self.amqp(bobs["result_queue_info"]["connection_url"])
        key = f"{endpoint_id}.results"

        def lone(message: Any) -> bytes:
            return pack(message).replace(b"LONE", b"\\ud800")

        await self.publish(endpoint, "results", key, lone(Result.success(bad, "00\nLONE")))
        await self.publish(
            endpoint,
            "results",
            key,
            lone(Result.failure(good, "RemoteExecutionError", "LONE", "TB")),
        )
        report = EPStatusReport(
            endpoint_id,
            {"managers": 1, "load": 0.5},
            {"LONE": [TaskTransition.now("running", "manager")]},
        )
        await self.publish(
            endpoint, "results", key, lone(report).replace(b'"load":0.5', b'"load":NaN')
        )
        await self.publish(
            bobs_endpoint,
            "results",
            f"{bobs['endpoint_id']}.results",
            pack(Result.success(bobs_task, serialize(3))),
        )
        # Bob's result is stored (the bad messages do not hold up the queue).
        self.assertEqual(deserialize((await self.done(bob, bobs_task))["result"]), 3)
        for task_id in (bad, good):
            done = await self.done(api, task_id)
            self.assertEqual(done["status"], "failed")
            self.assertEqual(done["error_details"]["code"], "MalformedResult")
            self.assertIn("lone surrogate", done["exception"])
            self.assertIn(task_id, done["exception"])

        async def logged() -> Any:
            status, body = await api.get(f"/v2/endpoints/{endpoint_id}/status")
            self.assertEqual(status, 200, body)
            return body if body["logs"] else None

        status_answer = await wait_until(logged)
        self.assertEqual(status_answer["logs"][0]["global_state"], {"managers": 1, "load": None})
        json.dumps(status_answer, allow_nan=False)
        await wait_until(lambda: _when(lambda: self.queue_depth("results"), lambda n: n == 0))

    @run
    async def test_result_under_another_routing_key_is_dropped(self) -> None:
        api = self.alice
        answer = await self.endpoint(api)
        other = (await self.endpoint(api))["endpoint_id"]
        function_id = await self.function(api)
        submitted = await self.submit(api, [[function_id, answer["endpoint_id"], PAYLOAD]])
        task_id = submitted["results"][0]["task_uuid"]
        admin = await self.admin()
        await self.publish(
            admin, "results", f"{other}.results", pack(Result.success(task_id, "00\nx\n"))
        )
        await self.publish(
            admin, "results", "junk.results", pack(Result.success(task_id, "00\nx\n"))
        )
        await self.publish(admin, "results", f"{other}.results", b"\x01{not a message")
        await wait_until(lambda: _when(lambda: self.queue_depth("results"), lambda n: n == 0))
        await sleep(0.3)
        self.assertEqual((await self.task(api, task_id))["status"], "waiting-for-ep")

    @run
    async def test_unroutable_task_is_sent_again(self) -> None:
        """A task the broker could not route (its queue vanished) is sent again."""
        api = self.alice
        answer = await self.endpoint(api)
        endpoint_id = answer["endpoint_id"]
        function_id = await self.function(api)
        admin = await self.admin()
        channel = await self.channel(admin)
        await channel.queue_delete(queue=f"{endpoint_id}.tasks")
        submitted = await self.submit(api, [[function_id, endpoint_id, PAYLOAD]])
        task_id = submitted["results"][0]["task_uuid"]
        endpoint = await self.amqp(answer["task_queue_info"]["connection_url"])

        async def queue_back() -> bool:
            try:
                return await self.queue_depth(f"{endpoint_id}.tasks") == 1
            except Closed:
                return False

        await wait_until(queue_back, timeout=20)
        (delivery,) = await self.take(endpoint, f"{endpoint_id}.tasks", 1)
        self.assertEqual(unpack(delivery.body).task_id, task_id)

    @run
    async def test_broker_connection_lost(self) -> None:
        """The broker drops the service's connection: it reconnects, tasks and results flow."""
        api = self.alice
        answer = await self.endpoint(api)
        endpoint_id = answer["endpoint_id"]
        function_id = await self.function(api)
        closed = await deferToThread(self._close_service_connections)
        self.assertGreaterEqual(closed, 1)
        submitted = await self.submit(api, [[function_id, endpoint_id, PAYLOAD]] * 5)
        self.assertEqual({r["http_status_code"] for r in submitted["results"]}, {200})
        task_ids = {r["task_uuid"] for r in submitted["results"]}
        player = EndpointPlayer(reactor, answer, self.service.broker_ca_file)
        await player.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(player.stop()))
        for task_id in task_ids:
            self.assertEqual(deserialize((await self.done(api, task_id))["result"]), 3)
        self.assertEqual({t.task_id for t in player.tasks}, task_ids)

    def _close_service_connections(self) -> int:
        """Close the service's broker connections (its virtual host's admin ones)."""
        import base64
        from urllib.parse import quote, unquote
        from urllib.request import Request, urlopen

        from funcx_endpoint.testing.rabbitmq import shared_node

        node = shared_node()
        vhost = unquote(str(self.service.admin_amqp_url).rsplit("/", 1)[1])
        auth = base64.b64encode(f"{node.admin_user}:{node.admin_password}".encode()).decode()
        base = node.management_url.rstrip("/")

        def call(method: str, path: str) -> Any:
            request = Request(
                base + path,
                method=method,
                headers={"Authorization": f"Basic {auth}", "X-Reason": "test"},
            )
            with urlopen(request, timeout=30) as response:
                body = response.read()
            return json.loads(body) if body else None

        names: List[str] = []
        deadline = time.monotonic() + 15
        while not names and time.monotonic() < deadline:
            connections = call("GET", f"/api/vhosts/{quote(vhost, safe='')}/connections")
            names = [c["name"] for c in connections if c.get("user") == node.admin_user]
            if not names:
                time.sleep(0.5)  # the management API's statistics lag a little
        for name in names:
            call("DELETE", f"/api/connections/{quote(name, safe='')}")
        return len(names)

    @run
    async def test_status_reports(self) -> None:
        api = self.alice
        answer = await self.endpoint(api, heartbeat_threshold=2)
        endpoint_id = answer["endpoint_id"]
        function_id = await self.function(api)
        submitted = await self.submit(api, [[function_id, endpoint_id, PAYLOAD]])
        task_id = submitted["results"][0]["task_uuid"]
        endpoint = await self.amqp(answer["result_queue_info"]["connection_url"])
        key = f"{endpoint_id}.results"
        report = EPStatusReport(
            endpoint_id,
            {
                "managers": 1,
                "total_workers": 2,
                "idle_workers": 1,
                "pending_tasks": 0,
                "outstanding_tasks": {"RAW": 1},
            },
            {
                task_id: [
                    TaskTransition.now("waiting-for-nodes", "interchange"),
                    TaskTransition.now("running", "manager"),
                ]
            },
        )
        await self.publish(endpoint, "results", key, pack(report))

        async def status() -> Dict[str, Any]:
            code, body = await api.get(f"/v2/endpoints/{endpoint_id}/status")
            self.assertEqual(code, 200)
            return dict(body)

        online = await wait_until(lambda: _when(status, lambda s: s["status"] == "online"))
        self.assertEqual(online["logs"][0]["global_state"]["managers"], 1)
        self.assertEqual((await self.task(api, task_id))["status"], "running")
        # No more reports: offline after the threshold (2 s, from the metadata).
        await wait_until(lambda: _when(status, lambda s: s["status"] == "offline"), timeout=6)
        # Reports again, then a final one: offline at once.
        await self.publish(
            endpoint, "results", key, pack(EPStatusReport(endpoint_id, {"managers": 0}, {}))
        )
        await wait_until(lambda: _when(status, lambda s: s["status"] == "online"))
        await self.publish(endpoint, "results", key, pack(EPStatusReport.final(endpoint_id)))
        final = await wait_until(
            lambda: _when(status, lambda s: s["status"] == "offline"), timeout=1
        )
        self.assertTrue(final["logs"][0]["final"])

    @run
    async def test_final_report_of_a_second_instance(self) -> None:
        """A final report while the task queue has a consumer keeps the endpoint online."""
        api = self.alice
        answer = await self.endpoint(api)
        endpoint_id = answer["endpoint_id"]
        running = await self.amqp(answer["task_queue_info"]["connection_url"])
        channel = await self.channel(running)
        await channel.basic_consume(queue=f"{endpoint_id}.tasks", consumer_tag="ep", exclusive=True)
        key = f"{endpoint_id}.results"

        async def status() -> str:
            code, body = await api.get(f"/v2/endpoints/{endpoint_id}/status")
            return str(body["status"])

        await self.publish(
            running, "results", key, pack(EPStatusReport(endpoint_id, {"managers": 1}, {}))
        )
        await wait_until(lambda: _when(status, lambda s: s == "online"))
        await self.publish(running, "results", key, pack(EPStatusReport.final(endpoint_id)))
        await sleep(0.5)
        self.assertEqual(await status(), "online")
        await channel.basic_cancel(consumer_tag="ep")
        await wait_until(lambda: _when(status, lambda s: s == "offline"), timeout=5)


class BrokerPermissionTests(ServiceTestCase):
    """What an endpoint's (and a user's) broker credentials can and cannot do."""

    async def refused(self, operation: Any) -> int:
        try:
            await operation
        except (Closed, PublishFailed) as e:
            code = e.code if isinstance(e, PublishFailed) else close_reason(e)[0]
            return int(code or 0)
        self.fail("the broker allowed it")

    @run
    async def test_endpoint_credentials(self) -> None:
        api = self.alice
        mine = await self.endpoint(api)
        theirs = (await self.endpoint(await self.user()))["endpoint_id"]
        mine_id = mine["endpoint_id"]
        client = await self.amqp(mine["task_queue_info"]["connection_url"])
        # Passive declares of what the endpoint uses work (funcX 1.0 endpoints do them).
        channel = await self.channel(client)
        await channel.exchange_declare(exchange="tasks", passive=True)
        await channel.exchange_declare(exchange="results", passive=True)
        await channel.queue_declare(queue=f"{mine_id}.tasks", passive=True)
        await channel.queue_declare(queue="results", passive=True)
        # Reading another endpoint's queue is refused.
        channel = await self.channel(client)
        self.assertEqual(await self.refused(channel.basic_consume(queue=f"{theirs}.tasks")), 403)
        channel = await self.channel(client)
        self.assertEqual(await self.refused(channel.basic_get(queue=f"{theirs}.tasks")), 403)
        # So is reading the results queue, and creating anything.
        channel = await self.channel(client)
        self.assertEqual(await self.refused(channel.basic_consume(queue="results")), 403)
        channel = await self.channel(client)
        self.assertEqual(
            await self.refused(channel.queue_declare(queue="mine-now", durable=True)), 403
        )
        # Publishing results under another endpoint's routing key is refused...
        forged = pack(Result.success(str(uuid.uuid4()), "00\nx\n"))
        self.assertEqual(
            await self.refused(self.publish(client, "results", f"{theirs}.results", forged)), 403
        )
        # ... and so is publishing tasks (to anyone's queue).
        self.assertEqual(
            await self.refused(self.publish(client, "tasks", f"{theirs}.tasks", b"\x01{}")), 403
        )
        # Its own routing key works.
        await self.publish(
            client, "results", f"{mine_id}.results", pack(EPStatusReport(mine_id, {}, {}))
        )

    @run
    async def test_result_queues_for_funcx_executor(self) -> None:
        api = self.alice
        answer = await self.endpoint(api)
        endpoint_id = answer["endpoint_id"]
        function_id = await self.function(api)
        status, info = await api.get("/v2/get_amqp_result_connection_url")
        self.assertEqual(status, 200, info)
        self.assertTrue(info["connection_url"].startswith("amqps://"))
        group = str(uuid.uuid4())
        submitted = await self.submit(
            api,
            [[function_id, endpoint_id, PAYLOAD]] * 2,
            task_group_id=group,
            create_websocket_queue=True,
        )
        ok, bad = [r["task_uuid"] for r in submitted["results"]]
        queue = info["queue_prefix"] + group
        endpoint = await self.amqp(answer["result_queue_info"]["connection_url"])
        key = f"{endpoint_id}.results"
        await self.publish(endpoint, "results", key, pack(Result.success(ok, serialize(3))))
        await self.publish(
            endpoint, "results", key, pack(Result.failure(bad, "RemoteExecutionError", "x", "TB"))
        )
        user = await self.amqp(info["connection_url"])
        deliveries = await self.take(user, queue, 2)
        copies = {m.task_id: m for m in (unpack(d.body) for d in deliveries)}
        self.assertEqual(deserialize(copies[ok].data), 3)
        self.assertIsNone(copies[ok].error_details)
        self.assertEqual(
            (copies[bad].data, copies[bad].error_details.code), ("TB", "RemoteExecutionError")
        )
        self.assertGreater(deliveries[0].properties["timestamp"], 1_600_000_000)
        # Another user's result credentials cannot read this queue, nor tasks.
        bob = await self.user()
        status, bobs = await bob.get("/v2/get_amqp_result_connection_url")
        self.assertNotEqual(bobs["queue_prefix"], info["queue_prefix"])
        other = await self.amqp(bobs["connection_url"])
        channel = await self.channel(other)
        self.assertEqual(await self.refused(channel.basic_consume(queue=queue)), 403)
        channel = await self.channel(user)
        self.assertEqual(
            await self.refused(channel.basic_consume(queue=f"{endpoint_id}.tasks")), 403
        )
        # The same URL again (credentials are stable).
        status, again = await api.get("/v2/get_amqp_result_connection_url")
        self.assertEqual(again, info)


async def _when(read: Callable[[], Any], condition: Callable[[Any], bool]) -> Any:
    """``await read()`` if ``condition`` holds for it (True if that value is falsy), else None."""
    value = await read()
    if not condition(value):
        return None
    return value if value else True


def boom(x):
    raise ValueError(f"bad {x}")


class OurSDKTests(ServiceTestCase):
    """This project's SDK (FuncXClient, the polling FuncXExecutor) against the real service."""

    @run
    async def test_client_and_executor(self) -> None:
        import globus_sdk

        from funcx_endpoint.sdk.client import FuncXClient
        from funcx_endpoint.sdk.errors import TaskExecutionFailed
        from funcx_endpoint.sdk.executor import FuncXExecutor

        answer = await self.endpoint(self.alice)
        player = EndpointPlayer(reactor, answer, self.service.broker_ca_file)
        await player.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(player.stop()))
        await player.report()
        endpoint_id = answer["endpoint_id"]

        def use_sdk() -> Dict[str, Any]:
            client = FuncXClient(
                self.service.base_url,
                authorizer=globus_sdk.AccessTokenAuthorizer(self.alice.token),
                ca_file=self.service.ca_file,
            )
            try:
                out: Dict[str, Any] = {"version": client.version_check()["api"]}
                function_id = client.register_function(add)
                task_id = client.run(1, b=5, endpoint_id=endpoint_id, function_id=function_id)
                deadline = time.monotonic() + 30
                while client.get_task(task_id)["pending"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                out["result"] = client.get_result(task_id)
                out["status"] = client.get_endpoint_status(endpoint_id)["status"]
                with FuncXExecutor(endpoint_id, funcx_client=client, poll_interval=0.1) as fx:
                    futures = [fx.submit(add, i, b=1) for i in range(20)]
                    out["executor"] = [f.result(timeout=60) for f in futures]
                    failing = fx.submit(boom, 4)
                    try:
                        failing.result(timeout=60)
                    except TaskExecutionFailed as e:
                        out["failure"] = (e.error_code, str(e))
                return out
            finally:
                client.close()

        out = await deferToThread(use_sdk)
        self.assertEqual(out["version"], "1.0.13")
        self.assertEqual(out["result"], 6)
        self.assertEqual(out["status"], "online")
        self.assertEqual(out["executor"], list(range(1, 21)))
        self.assertEqual(out["failure"][0], "RemoteExecutionError")
        self.assertIn("ValueError: bad 4", out["failure"][1])
