"""Registration's answers and exit codes, through treq's StubTreq.

Against the service's own API in this process (funcx_endpoint.testing.inprocess)
for what the service really answers, and against a scripted resource for
answers it should never give (no endpoint id, another id, no broker details).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from funcx_endpoint.amqp import topology
from funcx_endpoint.config import Config
from funcx_endpoint.endpoint.auth import Authenticator, AuthError, Token, TokenStore
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.endpoint.registration import Registration
from funcx_endpoint.lifecycle import StartupError
from funcx_endpoint.testing.inprocess import InProcessService
from funcx_endpoint.webservice.api_context import BrokerAddress

SERVICE = "https://funcx.example/v2"


class FakeEndpoints(Resource):
    """``POST /v2/endpoints`` answering what the test says; records requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: List[Tuple[int, Any]] = []
        self.requests: List[Dict[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        body = json.loads(request.content.read(), parse_constant=_not_json)
        self.requests.append(
            {"path": request.path, "body": body, "auth": request.getHeader("authorization")}
        )
        code, answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer):
            answer = answer(body)
        request.setResponseCode(code)
        request.setHeader("content-type", "application/json")
        return json.dumps(answer).encode()


def _not_json(name: str) -> Any:
    raise AssertionError(f"the registration request holds {name}, which is not JSON")


class FakeAuthenticator:
    def __init__(self) -> None:
        self.tokens = ["token-1", "token-2"]
        self.calls: List[bool] = []

    async def token(self, force_new: bool = False) -> str:
        self.calls.append(force_new)
        return self.tokens[1] if force_new else self.tokens[0]


def ok(body: Dict[str, Any]) -> Dict[str, Any]:
    endpoint_id = body["endpoint_uuid"]
    url = "amqps://ep:secret@broker.example:5671/%2F"
    return {"endpoint_id": endpoint_id, **topology.registration_queue_info(endpoint_id, url, url)}


class RegistrationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeEndpoints()
        self.stub = StubTreq(self.fake)
        self.clock = Clock()
        config_dir = os.path.abspath(self.mktemp())
        self.ep = EndpointDir(config_dir, "ep")
        os.makedirs(self.ep.path)
        self.auth = FakeAuthenticator()
        self.registration = Registration(
            self.clock, self.ep, Config(funcx_service_address=SERVICE), self.stub, self.auth
        )

    def register(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self.registration.register())
        self.stub.flush()
        return d

    def failure_code(self, d: Deferred[None]) -> Tuple[int, str]:
        failure = self.failureResultOf(d, StartupError)
        return failure.value.exit_code, failure.value.message

    def test_success_saves_the_id(self) -> None:
        self.fake.answers = [(200, ok)]
        self.successResultOf(self.register())
        [request] = self.fake.requests
        self.assertEqual(request["path"], b"/v2/endpoints")
        self.assertEqual(request["auth"], "Bearer token-1")
        self.assertEqual(request["body"]["endpoint_name"], "ep")
        metadata = request["body"]["metadata"]
        self.assertIn("endpoint_version", metadata)
        self.assertEqual(metadata["heartbeat_period"], 30.0)
        # Infinite config values are sent as funcX 1.0 sends them (repr()): strict JSON.
        self.assertEqual(metadata["config"]["executors"][0]["max_workers_per_node"], "inf")
        endpoint_id = request["body"]["endpoint_uuid"]
        self.assertEqual(self.ep.endpoint_id(), endpoint_id)
        info = self.registration.broker_info
        assert info is not None
        self.assertEqual(info.tasks.queue, f"{endpoint_id}.tasks")
        self.assertEqual(info.results.routing_key, f"{endpoint_id}.results")
        self.assertEqual(info.tasks.url.host, "broker.example")

    def test_broker_address_saved_without_password(self) -> None:
        """endpoint.json records where the broker is (for `diagnose`), never its password."""
        self.fake.answers = [(200, ok)]
        self.successResultOf(self.register())
        saved = self.ep.read_endpoint_json()
        self.assertEqual(saved["broker"]["tasks"], "amqps://ep:***@broker.example:5671/%2F")
        self.assertEqual(saved["broker"]["results"], "amqps://ep:***@broker.example:5671/%2F")
        with open(self.ep.endpoint_json) as f:
            self.assertNotIn("secret", f.read())

    def test_pinned_id_is_reused(self) -> None:
        pinned = str(uuid.uuid4())
        self.ep.write_endpoint_json({"endpoint_id": pinned})
        self.fake.answers = [(200, ok)]
        self.successResultOf(self.register())
        self.assertEqual(self.fake.requests[0]["body"]["endpoint_uuid"], pinned)

    def test_refusals_map_to_exit_codes(self) -> None:
        cases = {
            409: (69, "refused"),
            410: (69, "gone (deleted)"),
            423: (69, "locked (stopped remotely)"),
            429: (69, "a quota of this user is reached"),
            400: (65, "rejected the registration request"),
            422: (65, "rejected the registration request"),
            403: (77, "refused the registration (403)"),
            500: (75, "try again later"),
        }
        for status, (code, text) in cases.items():
            self.fake.answers = [(status, {"code": "X", "message": f"because {status}"})]
            exit_code, message = self.failure_code(self.register())
            self.assertEqual(exit_code, code, status)
            self.assertIn(text, message)
            self.assertIn(f"because {status}", message)
            self.assertIsNone(self.ep.endpoint_id())

    def test_other_id_returned(self) -> None:
        self.fake.answers = [(200, lambda body: dict(ok(body), endpoint_id=str(uuid.uuid4())))]
        exit_code, message = self.failure_code(self.register())
        self.assertEqual(exit_code, 70)
        self.assertIn("refusing to continue", message)
        self.assertIsNone(self.ep.endpoint_id())

    def test_no_endpoint_id(self) -> None:
        self.fake.answers = [(200, {"hello": "world"})]
        self.assertEqual(self.failure_code(self.register())[0], 65)

    def test_no_broker_details(self) -> None:
        self.fake.answers = [(200, lambda body: {"endpoint_id": body["endpoint_uuid"]})]
        exit_code, message = self.failure_code(self.register())
        self.assertEqual(exit_code, 65)
        self.assertIn("lacks broker details", message)

    def test_stale_token_is_renewed_once(self) -> None:
        self.fake.answers = [(401, {"message": "token expired"}), (200, ok)]
        self.successResultOf(self.register())
        self.assertEqual(self.auth.calls, [False, True])
        self.assertEqual(
            [r["auth"] for r in self.fake.requests], ["Bearer token-1", "Bearer token-2"]
        )

    def test_network_error_retries_then_75(self) -> None:
        # A service that cannot be reached: every request is refused.
        registration = Registration(
            self.clock,
            self.ep,
            Config(funcx_service_address=SERVICE),
            _RefusingHTTP(),
            self.auth,
            retry_delays=(1.0, 2.0),
        )
        d = Deferred.fromCoroutine(registration.register())
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.assertNoResult(d)
        self.clock.advance(2.0)
        failure = self.failureResultOf(d, StartupError)
        self.assertEqual(failure.value.exit_code, 75)
        self.assertIn("cannot reach the funcX service", failure.value.message)
        self.assertIn("retried 2 times", failure.value.message)


class _ServiceTokens:
    """Tokens the in-process service issues to one of its users."""

    def __init__(self, service: InProcessService, user: str) -> None:
        self.service = service
        self.user = user

    async def token(self, force_new: bool = False) -> str:
        return self.service.issue_token(self.user)


class RealServiceTests(SynchronousTestCase):
    """Registration against the service's own API (in this process, on a Clock)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.service = InProcessService(
            self.mktemp(),
            self.clock,
            broker_address=BrokerAddress("amqps", "broker.example", 5671, "/"),
        )
        self.service.startService()
        self.addCleanup(lambda: self.successResultOf(self.service.stopService()))
        self.stub = StubTreq(self.service.resource())

    def register(self, user: str = "owner", endpoint_id: Optional[str] = None) -> Deferred[None]:
        ep = EndpointDir(os.path.abspath(self.mktemp()), "ep")
        os.makedirs(ep.path)
        if endpoint_id is not None:
            ep.write_endpoint_json({"endpoint_id": endpoint_id})
        self.registration = Registration(
            self.clock,
            ep,
            Config(funcx_service_address=SERVICE),
            self.stub,
            _ServiceTokens(self.service, user),
        )
        d = Deferred.fromCoroutine(self.registration.register())
        self.stub.flush()
        return d

    def refusal(self, d: Deferred[None]) -> Tuple[int, str]:
        failure = self.failureResultOf(d, StartupError)
        return failure.value.exit_code, failure.value.message

    def test_registered_with_its_own_broker_user(self) -> None:
        """The answer gives the endpoint's queues and the broker user made for it."""
        self.successResultOf(self.register())
        info = self.registration.broker_info
        assert info is not None
        endpoint_id = info.endpoint_id
        self.assertEqual(info.tasks.queue, f"{endpoint_id}.tasks")
        self.assertEqual(info.results.routing_key, f"{endpoint_id}.results")
        self.assertEqual((info.tasks.url.host, info.tasks.url.port), ("broker.example", 5671))
        user = self.service.administrator.users[info.tasks.url.username]
        self.assertEqual(user.password, info.tasks.url.password)
        stored = self.service.endpoints[endpoint_id]
        self.assertEqual((stored.name, stored.heartbeat_period), ("ep", 30.0))
        self.assertEqual(stored.owner, self.service.user("owner").identity_id)
        # Registering again (a restart) is the same endpoint, with the same broker user.
        self.successResultOf(self.register(endpoint_id=endpoint_id))
        self.assertEqual(self.registration.broker_info, info)

    def test_refusals(self) -> None:
        """What the service refuses, and the exit code each refusal gives."""
        self.successResultOf(self.register())
        assert self.registration.broker_info is not None
        endpoint_id = self.registration.broker_info.endpoint_id
        code, message = self.refusal(self.register("someone-else", endpoint_id))
        self.assertEqual(code, 77)
        self.assertIn("registered by another user", message)

        queue = f"{endpoint_id}.tasks"
        self.service.broker.consumers[queue] = 1  # another instance consumes its tasks
        code, message = self.refusal(self.register(endpoint_id=endpoint_id))
        self.assertEqual(code, 69)
        self.assertIn("already running", message)
        del self.service.broker.consumers[queue]

        self.service.administrator.unavailable = True
        code, message = self.refusal(self.register(endpoint_id=endpoint_id))
        self.assertEqual(code, 75)
        self.assertIn("try again later", message)
        self.service.administrator.unavailable = False

        status, _ = self.service.call("POST", f"/v2/endpoints/{endpoint_id}/lock", {}, user="owner")
        self.assertEqual(status, 200)
        code, message = self.refusal(self.register(endpoint_id=endpoint_id))
        self.assertEqual(code, 69)
        self.assertIn("locked (stopped remotely)", message)
        # The refusal consumed the lock: the next start registers.
        self.successResultOf(self.register(endpoint_id=endpoint_id))

        status, _ = self.service.call("DELETE", f"/v2/endpoints/{endpoint_id}", user="owner")
        self.assertEqual(status, 200)
        code, message = self.refusal(self.register(endpoint_id=endpoint_id))
        self.assertEqual(code, 69)
        self.assertIn("gone (deleted)", message)


class _RefusingHTTP:
    async def post(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")


class _FailingAuthenticator:
    """Raises ``AuthError(status)`` for the first token (or the renewed one)."""

    def __init__(self, status: Optional[int], on_renewal: bool = False) -> None:
        self.status = status
        self.on_renewal = on_renewal

    async def token(self, force_new: bool = False) -> str:
        if force_new == self.on_renewal:
            raise AuthError(f"the auth service answered {self.status}", self.status)
        return "token-1"


class AuthFailureTests(SynchronousTestCase):
    def test_auth_failures_map_to_exit_codes(self) -> None:
        cases = [
            (None, False, 77),  # no credentials
            (401, False, 77),
            (403, False, 77),
            (500, False, 75),  # the auth service fails: try again later
            (503, False, 75),
            (401, True, 77),
            (502, True, 75),
        ]
        for status, on_renewal, expected in cases:
            fake = FakeEndpoints()
            fake.answers = [(401, {"message": "token expired"}), (200, ok)]
            stub = StubTreq(fake)
            config_dir = os.path.abspath(self.mktemp())
            ep = EndpointDir(config_dir, "ep")
            os.makedirs(ep.path)
            registration = Registration(
                Clock(),
                ep,
                Config(funcx_service_address=SERVICE),
                stub,
                _FailingAuthenticator(status, on_renewal),
            )
            d = Deferred.fromCoroutine(registration.register())
            stub.flush()
            failure = self.failureResultOf(d, StartupError)
            with self.subTest(status=status, on_renewal=on_renewal):
                self.assertEqual(failure.value.exit_code, expected)
                self.assertIn(f"answered {status}", failure.value.message)
                if expected == 75:
                    self.assertIn("try again later", failure.value.message)


class FakeRevoke(Resource):
    """An auth service's revoke call: records where it was asked, answers ``code``."""

    isLeaf = True

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code
        self.requests: List[Tuple[str, bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        self.requests.append(
            (request.getHeader("host") + request.uri.decode(), request.content.read())
        )
        request.setResponseCode(self.code)
        request.setHeader("content-type", "application/json")
        if self.code == 200:
            return b'{"active": false}'
        return b'{"code": "X", "message": "cannot revoke now"}'


class LogoutTests(SynchronousTestCase):
    def logout(self, code: int) -> Tuple[FakeRevoke, TokenStore, Deferred[bool]]:
        fake = FakeRevoke(code)
        stub = StubTreq(fake)
        store = TokenStore(os.path.abspath(self.mktemp()))
        store.save(Token("the-token", 2e9, "scope", "client-1", "https://issuer.example/"))
        # The authenticator is made for another auth service (the first endpoint's
        # config): the token is revoked where it was issued.
        auth = Authenticator(stub, "https://other.example/", store, Clock())  # type: ignore[arg-type]
        d = Deferred.fromCoroutine(auth.logout())
        stub.flush()
        return fake, store, d

    def test_revokes_at_the_tokens_own_service(self) -> None:
        fake, store, d = self.logout(200)
        self.assertTrue(self.successResultOf(d))
        [(uri, body)] = fake.requests
        self.assertEqual(uri, "issuer.example/v2/oauth2/token/revoke")
        self.assertIn(b"token=the-token", body)
        self.assertIsNone(store.load())

    def test_a_refused_revocation_is_reported(self) -> None:
        fake, store, d = self.logout(503)
        failure = self.failureResultOf(d, AuthError)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("did not revoke the token", failure.value.message)
        self.assertIn("cannot revoke now", failure.value.message)
        self.assertIsNone(store.load())  # removed all the same
