"""The web service's API in this process on a Clock: time decides, the test moves it.

:class:`~funcx_endpoint.testing.inprocess.InProcessService` is the service's
real resource, auth, storage (SQLite) and dispatch, on fakes of the broker
and its management API; requests go through treq's StubTreq and are answered
before the call returns.  The service reads the time only from the Clock, so
token lifetimes, endpoint liveness, resend timing, the token purge and the
stored timestamps all follow ``clock.advance``.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any, Dict, Optional, Tuple

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from funcx_endpoint.amqp.connection import AMQPURL
from funcx_endpoint.testing.fakebroker import FakeBrokerAdministrator, FakeServiceBroker
from funcx_endpoint.testing.inlinedb import InlineConnectionPool
from funcx_endpoint.testing.inprocess import FUNCX_SCOPE, InProcessService
from funcx_endpoint.webservice import endpoints
from funcx_endpoint.webservice.broker import IServiceBroker, ServiceBroker
from funcx_endpoint.webservice.db import DatabaseConfig, IConnectionPool, make_pool
from funcx_endpoint.webservice.management import IBrokerAdministrator, ManagementAPI
from funcx_endpoint.wire import pack_function, pack_payload

START = 1_000_000.0


def add(a, b=1):
    return a + b


class InterfaceTests(SynchronousTestCase):
    """The fakes and the real parts they stand in for provide the same interfaces."""

    def test_broker(self) -> None:
        self.assertTrue(verifyObject(IServiceBroker, FakeServiceBroker(lambda d, c: None)))
        real = ServiceBroker(Clock(), AMQPURL.parse("amqp://u:p@localhost:5672/"), print)
        self.assertTrue(verifyObject(IServiceBroker, real))

    def test_administrator(self) -> None:
        self.assertTrue(verifyObject(IBrokerAdministrator, FakeBrokerAdministrator()))
        real = ManagementAPI(Clock(), "http://u:p@localhost:15672/", http_client=object())  # type: ignore[arg-type]
        self.assertTrue(verifyObject(IBrokerAdministrator, real))

    def test_connection_pool(self) -> None:
        config = DatabaseConfig.from_url("sqlite://" + os.path.abspath(self.mktemp()) + "/db")
        inline = InlineConnectionPool(config)
        self.addCleanup(inline.close)
        self.assertTrue(verifyObject(IConnectionPool, inline))
        # adbapi's pool has the methods; it cannot declare the interface.
        pooled = make_pool(config)
        self.addCleanup(pooled.close)
        self.assertTrue(verifyObject(IConnectionPool, pooled, tentative=True))


class ClockedServiceTestCase(SynchronousTestCase):
    """An in-process service on a Clock at :data:`START`, and a StubTreq for it."""

    options: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = InProcessService(self.mktemp(), self.clock, **self.options)
        self.service.startService()
        self.http: Any = StubTreq(self.service.resource())
        # Cleanups run last first: stop the service, then nothing may be left scheduled.
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))
        self.addCleanup(lambda: self.successResultOf(self.service.stopService()))

    def request(
        self,
        method: str,
        path: str,
        *,
        token: Optional[str] = None,
        json: Any = None,
        **kwargs: Any,
    ) -> Tuple[int, Any]:
        """``(status, JSON answer)`` of one request, answered at once."""
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if json is not None:
            kwargs["json"] = json
        d = self.http.request(method, "https://funcx.example" + path, headers=headers, **kwargs)
        self.http.flush()
        response = self.successResultOf(d)
        return response.code, self.successResultOf(self.http.json_content(response))

    def status_of(self, endpoint_id: str) -> str:
        code, answer = self.request(
            "GET", f"/v2/endpoints/{endpoint_id}/status", token=self.service.issue_token()
        )
        self.assertEqual(code, 200, answer)
        return str(answer["status"])

    def submit_one(self, endpoint_id: str) -> str:
        token = self.service.issue_token()
        code, answer = self.request(
            "POST",
            "/v2/functions",
            token=token,
            json={"function_name": "add", "function_code": pack_function(add)},
        )
        self.assertEqual(code, 200, answer)
        task = [answer["function_uuid"], endpoint_id, pack_payload((1,), {"b": 2})]
        code, answer = self.request("POST", "/v2/submit", token=token, json={"tasks": [task]})
        self.assertEqual(code, 200, answer)
        return str(answer["results"][0]["task_uuid"])


class TokenLifetimeTests(ClockedServiceTestCase):
    options = {"token_lifetime": 3600}

    def login(self) -> Dict[str, Any]:
        client_id, secret = self.service.add_client()
        code, answer = self.request(
            "POST",
            "/v2/oauth2/token",
            auth=(client_id, secret),
            data={"grant_type": "client_credentials", "scope": FUNCX_SCOPE},
        )
        self.assertEqual(code, 200, answer)
        return dict(answer)

    def introspect(self, token: str) -> Dict[str, Any]:
        client_id, secret = self.service.add_client()
        code, answer = self.request(
            "POST", "/v2/oauth2/token/introspect", auth=(client_id, secret), data={"token": token}
        )
        self.assertEqual(code, 200, answer)
        return dict(answer)

    def test_token_expires_with_the_clock(self) -> None:
        """A token works for its lifetime by the service's clock, and not a moment longer."""
        token = self.login()["access_token"]
        self.assertEqual(self.request("GET", "/v2/endpoints", token=token), (200, []))
        self.clock.advance(3599)
        self.assertEqual(self.request("GET", "/v2/endpoints", token=token), (200, []))
        self.clock.advance(1)
        code, answer = self.request("GET", "/v2/endpoints", token=token)
        self.assertEqual((code, answer["code"]), (401, "TOKEN_EXPIRED"))
        # A new login gives a token that works again.
        token = self.login()["access_token"]
        self.assertEqual(self.request("GET", "/v2/endpoints", token=token)[0], 200)

    def test_introspection_follows_the_clock(self) -> None:
        """Introspection shows when the token was issued and expires, by the clock."""
        token = self.login()["access_token"]
        answer = self.introspect(token)
        self.assertTrue(answer["active"])
        self.assertEqual((answer["iat"], answer["exp"]), (START, START + 3600))
        self.clock.advance(3600)
        self.assertEqual(self.introspect(token), {"active": False})

    def test_expired_tokens_are_purged_a_day_later(self) -> None:
        """The hourly purge (on the clock) forgets tokens a day after they expired."""
        self.service.issue_token()
        count = lambda: self.service.pool.runInteraction(  # noqa: E731
            lambda cursor: cursor.execute("SELECT COUNT(*) FROM tokens").fetchone()[0]
        )
        self.assertEqual(self.successResultOf(count()), 1)
        hours = 0
        while self.successResultOf(count()) == 1 and hours < 48:
            self.clock.advance(3600)
            hours += 1
        # Expired after 1 h, purged at the first hourly run more than 24 h after that.
        self.assertEqual(hours, 26)


class LivenessTests(ClockedServiceTestCase):
    options = {"heartbeat_threshold": 120.0}

    def test_offline_after_the_threshold_without_reports(self) -> None:
        """Online while the last report is at most heartbeat_threshold old by the clock."""
        endpoint_id = self.service.add_endpoint()
        self.assertEqual(self.status_of(endpoint_id), "offline")  # the report is not in yet
        self.clock.advance(0)
        self.assertEqual(self.status_of(endpoint_id), "online")
        self.clock.advance(120)
        self.assertEqual(self.status_of(endpoint_id), "online")
        self.clock.advance(1)
        self.assertEqual(self.status_of(endpoint_id), "offline")
        # A report brings it back.
        self.service.report(endpoint_id)
        self.clock.advance(0)
        self.assertEqual(self.status_of(endpoint_id), "online")

    def test_endpoint_threshold_from_its_heartbeat_period(self) -> None:
        """An endpoint's own heartbeat period sets its threshold (4 periods, at least 10 s)."""
        endpoint_id = self.service.add_endpoint(heartbeat_period=5)
        self.clock.advance(0)
        self.clock.advance(20)
        self.assertEqual(self.status_of(endpoint_id), "online")
        self.clock.advance(1)
        self.assertEqual(self.status_of(endpoint_id), "offline")

    def test_final_report(self) -> None:
        """A final report (the endpoint stopped) makes it offline at once."""
        endpoint_id = self.service.add_endpoint()
        self.clock.advance(0)
        self.clock.advance(5)
        self.service.report(endpoint_id, final=True)
        self.clock.advance(0)
        self.assertEqual(self.status_of(endpoint_id), "offline")


class TimestampTests(ClockedServiceTestCase):
    def test_stored_times_come_from_the_clock(self) -> None:
        """Registration, submission and result times are the clock's."""
        endpoint_id = self.service.add_endpoint()
        self.clock.advance(0)  # its first report is stored
        self.clock.advance(10)
        task_id = self.submit_one(endpoint_id)
        self.assertEqual(self.service.tasks[task_id].created, START + 10)
        [function] = self.service.functions
        created = self.service._run(
            lambda tx: tx.execute(
                "SELECT created FROM functions WHERE function_id = ?", (function,)
            ).fetchone()[0]
        )
        self.assertEqual(created, START + 10)
        endpoint = self.service.endpoints[endpoint_id]
        self.assertEqual((endpoint.created, endpoint.last_report_at), (START, START))

        self.clock.advance(2.5)
        self.service.run_task(task_id)
        self.clock.advance(0)
        code, answer = self.request("GET", f"/v2/tasks/{task_id}", token=self.service.issue_token())
        self.assertEqual((code, answer["status"]), (200, "success"))
        self.assertEqual(answer["completion_t"], f"{START + 12.5:.3f}")

        self.clock.advance(1)
        code, answer = self.request(
            "DELETE", f"/v2/endpoints/{endpoint_id}", token=self.service.issue_token()
        )
        self.assertEqual(code, 200, answer)
        deleted = self.service._run(endpoints.get_endpoint, endpoint_id)
        self.assertEqual(deleted.deleted_at, START + 13.5)


class ResendTests(ClockedServiceTestCase):
    options = {"resend_interval": 2.0}

    def test_unconfirmed_tasks_are_sent_again_once_a_second_old(self) -> None:
        """A task the broker did not take is sent again by the resend loop, but only
        once it is a second old by the clock (a newer one is being sent by its submit)."""
        endpoint_id = self.service.add_endpoint()
        self.clock.advance(0)
        broker = self.service.broker
        broker.disconnect()
        task_id = self.submit_one(endpoint_id)
        self.assertEqual(self.service.published_tasks, {})
        broker.reconnect()  # the sender is kicked: it looks soon, and finds it too new
        self.clock.advance(0.25)
        self.assertEqual(self.service.published_tasks, {})
        self.clock.advance(1.5)  # the resend loop's first run is at START + 2
        self.assertEqual(self.service.published_tasks, {})
        self.clock.advance(0.25)
        self.assertEqual(list(self.service.published_tasks), [task_id])
        self.assertFalse(self.service.tasks[task_id].sent)
        self.clock.advance(0.125)  # confirms are recorded in batches
        self.assertTrue(self.service.tasks[task_id].sent)

    def test_stop_cancels_a_pending_kick(self) -> None:
        """A reconnection schedules a look at the stored tasks; stopping cancels it."""
        self.service.broker.reconnect()
        self.assertEqual(len(self.clock.getDelayedCalls()), 3)  # resend loop, purge, kick
        # The cleanup stops the service and checks that nothing is left scheduled.


class HarnessTests(ClockedServiceTestCase):
    """What the harness itself promises."""

    def test_users_own_their_objects(self) -> None:
        """Users named by the test are distinct identities; each sees only its own."""
        mine = self.service.add_endpoint()
        theirs = self.service.add_endpoint(owner="someone-else")
        self.clock.advance(0)
        code, answer = self.request("GET", "/v2/endpoints", token=self.service.issue_token())
        self.assertEqual([e["endpoint_id"] for e in answer], [mine])
        code, answer = self.request(
            "GET", f"/v2/endpoints/{theirs}", token=self.service.issue_token()
        )
        self.assertEqual((code, answer["code"]), (404, "ENDPOINT_NOT_FOUND"))
        self.assertNotEqual(
            self.service.user().identity_id, self.service.user("someone-else").identity_id
        )
        self.assertEqual(list(self.service.endpoints), [mine, theirs])

    def test_registration_provisions_a_broker_user(self) -> None:
        """Registering goes through the fake administrator: the endpoint's own user."""
        endpoint_id = self.service.add_endpoint(status="offline")
        user = self.service.administrator.users[f"funcx-ep-{endpoint_id}"]
        self.assertEqual(user.permissions["read"], f"^{re.escape(endpoint_id)}\\.tasks$")

    def test_broker_away_at_registration(self) -> None:
        """An unreachable management API is the service's 503, with Retry-After."""
        self.service.administrator.unavailable = True
        code, answer = self.request(
            "POST",
            "/v2/endpoints",
            token=self.service.issue_token(),
            json={"endpoint_name": "ep", "endpoint_uuid": str(uuid.uuid4())},
        )
        self.assertEqual((code, answer["code"]), (503, "BROKER_UNAVAILABLE"))

    def test_requests_are_recorded_and_failures_injected(self) -> None:
        self.service.fail_next("GET", "/v2/version", 503, {"code": "X"})
        self.assertEqual(self.request("GET", "/v2/version"), (503, {"code": "X"}))
        code, answer = self.request("GET", "/v2/version")
        self.assertEqual((code, answer["api"]), (200, "1.0.13"))
        self.assertEqual(len(self.service.requests_to("GET", "/v2/version")), 2)
