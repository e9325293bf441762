"""The web portal in this process, on a Clock: sessions, CSRF, headers, escaping,
ownership, submitting, pages and live streams.

The portal is built over :class:`~funcx_endpoint.testing.inprocess.InProcessService`
(the service's real API, auth and storage on SQLite, fake broker) and reached
through treq's StubTreq, as the site serves it (:class:`~funcx_endpoint.portal.web.Dispatch`).
The real browser test is :mod:`tests.test_portal_browser`.
"""

from __future__ import annotations

import base64
import html
import json
import os
import pickle
import re
import time
from http.cookies import SimpleCookie
from typing import Any, Dict, List, Optional, Tuple

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from funcx_endpoint.portal import store, views
from funcx_endpoint.portal.live import LiveHub, Stream
from funcx_endpoint.portal.pages import TASKS_PER_PAGE, Portal
from funcx_endpoint.portal.sessions import new_link
from funcx_endpoint.portal.web import Dispatch
from funcx_endpoint.testing.inprocess import InProcessService
from funcx_endpoint.webservice.endpoints import HISTORY_SECONDS
from funcx_endpoint.wire import (
    ActorName,
    ErrorCode,
    Result,
    TaskState,
    TaskTransition,
    pack_function,
    serialize,
)

START = 1_000_000.0


def add(a, b=10):
    return a + b


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


class PortalTestCase(SynchronousTestCase):
    """A portal over an in-process service on a Clock; a cookie jar per browser."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.service = InProcessService(self.mktemp(), self.clock)
        self.service.startService()
        self.portal = Portal(self.service.storage, self.clock, self.service.api, self.service.auth)
        self.portal.startService()
        self.service.ingest.observers.append(self.portal.changed)
        self.http: Any = StubTreq(Dispatch(self.service.resource(), self.portal.resource()))
        self.jars: Dict[str, Dict[str, str]] = {}
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))
        self.addCleanup(lambda: self.successResultOf(self.service.stopService()))
        self.addCleanup(self.portal.stopService)
        # Reports and results sent are stored, queued tasks flushed, before the stop.
        self.addCleanup(lambda: self.clock.pump([0, 1]))

    def request(
        self,
        method: str,
        path: str,
        browser: str = "a",
        data: Optional[Dict[str, str]] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> Tuple[Any, str]:
        """``(response, body)``; cookies kept per ``browser`` as a browser would."""
        jar = self.jars.setdefault(browser, {})
        sent = dict(headers or {})
        if jar:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        kwargs: Dict[str, Any] = {"headers": sent, "allow_redirects": False}
        if data is not None:
            kwargs["data"] = data
        d = self.http.request(method, "https://portal.example" + path, **kwargs)
        self.http.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.http.content(response)).decode()
        for raw in response.headers.getRawHeaders("set-cookie") or []:
            cookie: SimpleCookie = SimpleCookie()
            cookie.load(raw)
            for name, morsel in cookie.items():
                if morsel["max-age"] == "0":
                    jar.pop(name, None)
                else:
                    jar[name] = morsel.value
        return response, body

    def csrf(self, body: str) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', body)
        assert found is not None, body
        return found.group(1)

    def sign_in(self, user: str = "alice", browser: Optional[str] = None) -> str:
        browser = browser or user
        client_id, secret = self.service.add_client(user)
        _, page = self.request("GET", "/portal/signin", browser)
        response, _ = self.request(
            "POST",
            "/portal/signin",
            browser,
            {"client_id": client_id, "client_secret": secret, "csrf": self.csrf(page)},
        )
        self.assertEqual(response.code, 303)
        return browser

    def page(self, path: str, browser: str = "alice") -> str:
        response, body = self.request("GET", path, browser)
        self.assertEqual(response.code, 200, body)
        return body

    def register(self, name: str = "add", user: str = "alice") -> str:
        code, answer = self.service.call(
            "POST",
            "/v2/functions",
            {"function_name": name, "function_code": pack_function(add)},
            user=user,
        )
        self.assertEqual(code, 200, answer)
        return str(answer["function_uuid"])

    def run_function(
        self, function_id: str, endpoint_id: str, args: str, browser: str = "alice"
    ) -> Any:
        body = self.page("/portal/run", browser)
        response, answer = self.request(
            "POST",
            "/portal/run",
            browser,
            {
                "csrf": self.csrf(body),
                "function_id": function_id,
                "endpoint_id": endpoint_id,
                "args": args,
                "kwargs": "{}",
            },
        )
        return response, answer

    def start_task(self, args: str) -> Tuple[str, str, str]:
        """Alice signs in and runs a new function on a new endpoint of hers:
        ``(endpoint id, the task page's path, task id)``."""
        self.sign_in()
        function_id = self.register()
        endpoint_id = self.service.add_endpoint(owner="alice")
        response, _ = self.run_function(function_id, endpoint_id, args)
        self.assertEqual(response.code, 303)
        location = response.headers.getRawHeaders("location")[0]
        return endpoint_id, location, location.rsplit("/", 1)[1]


class SignInTests(PortalTestCase):
    def test_cookie_is_secure_httponly_samesite_and_expires(self) -> None:
        client_id, secret = self.service.add_client("alice")
        _, page = self.request("GET", "/portal/signin")
        response, _ = self.request(
            "POST",
            "/portal/signin",
            data={"client_id": client_id, "client_secret": secret, "csrf": self.csrf(page)},
        )
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/portal/endpoints"])
        cookie = [c for c in response.headers.getRawHeaders("set-cookie") if "funcx_portal=" in c]
        self.assertEqual(len(cookie), 1)
        for part in ("Secure", "HttpOnly", "SameSite=strict", "Path=/portal", "Max-Age=28800"):
            self.assertIn(part, cookie[0])
        # Only a hash of the cookie's token is stored.
        token = SimpleCookie(cookie[0])["funcx_portal"].value
        rows = self.service._run(
            lambda tx: tx.execute("SELECT session_hash FROM portal_sessions").fetchall()
        )
        self.assertEqual([r[0] for r in rows], [store.token_hash(token)])
        self.assertIn("alice@funcx-service", self.page("/portal/endpoints", "a"))

    def test_goes_back_only_to_pages_of_the_portal(self) -> None:
        client_id, secret = self.service.add_client("alice")
        for asked, went in (
            ("/portal/tasks?page=2", "/portal/tasks?page=2"),
            ("https://evil.example/", "/portal/endpoints"),
            ("/portal/..//evil.example", "/portal/endpoints"),
            ("//evil.example/portal/", "/portal/endpoints"),
        ):
            _, page = self.request("GET", "/portal/signin", asked)
            response, _ = self.request(
                "POST",
                "/portal/signin",
                asked,
                {
                    "client_id": client_id,
                    "client_secret": secret,
                    "csrf": self.csrf(page),
                    "next": asked,
                },
            )
            self.assertEqual(response.headers.getRawHeaders("location"), [went])

    def test_wrong_secret_is_refused(self) -> None:
        client_id, _ = self.service.add_client("alice")
        _, page = self.request("GET", "/portal/signin")
        response, body = self.request(
            "POST",
            "/portal/signin",
            data={"client_id": client_id, "client_secret": "nope", "csrf": self.csrf(page)},
        )
        self.assertEqual(response.code, 401)
        self.assertIn("Wrong client id or secret", body)
        self.assertNotIn("funcx_portal", self.jars["a"])

    def test_pages_need_a_session(self) -> None:
        response, _ = self.request("GET", "/portal/tasks")
        self.assertEqual(response.code, 303)
        self.assertEqual(
            response.headers.getRawHeaders("location"), ["/portal/signin?next=/portal/tasks"]
        )
        response, _ = self.request("GET", "/portal/live/endpoints")
        self.assertEqual(response.code, 303)

    def test_sign_out_revokes_the_session(self) -> None:
        browser = self.sign_in()
        stolen = dict(self.jars[browser])
        body = self.page("/portal/endpoints")
        response, _ = self.request("POST", "/portal/signout", browser, {"csrf": self.csrf(body)})
        self.assertEqual(response.code, 303)
        self.assertNotIn("funcx_portal", self.jars[browser])
        # The old cookie, replayed, opens nothing.
        self.jars["thief"] = stolen
        self.clock.advance(2)  # past the session cache
        response, _ = self.request("GET", "/portal/endpoints", "thief")
        self.assertEqual(response.code, 303)

    def test_session_expires(self) -> None:
        self.sign_in()
        self.page("/portal/endpoints")
        self.clock.advance(8 * 3600 + 1)
        response, _ = self.request("GET", "/portal/endpoints", "alice")
        self.assertEqual(response.code, 303)

    def test_revoking_the_users_sessions_or_client_ends_them(self) -> None:
        self.sign_in()
        identity = self.service.user("alice").identity_id
        self.assertEqual(self.service._run(store.revoke_sessions, identity), 1)
        self.clock.advance(2)
        response, _ = self.request("GET", "/portal/endpoints", "alice")
        self.assertEqual(response.code, 303)

    def test_one_time_link(self) -> None:
        self.service.add_client("alice")
        made = self.service._run(lambda tx: new_link(_Call(tx), "alice", START))
        assert made is not None
        token, client = made
        self.assertEqual(client.name, "alice")
        page = self.page(f"/portal/link/{token}", "a")
        response, _ = self.request(
            "POST", "/portal/link", "a", {"csrf": self.csrf(page), "token": token}
        )
        self.assertEqual(response.code, 303)
        self.assertIn("alice@funcx-service", self.page("/portal/endpoints", "a"))
        # Once only.
        page = self.page(f"/portal/link/{token}", "b")
        response, body = self.request(
            "POST", "/portal/link", "b", {"csrf": self.csrf(page), "token": token}
        )
        self.assertEqual(response.code, 401)
        self.assertIn("used, expired or unknown", body)

    def test_link_expires(self) -> None:
        self.service.add_client("alice")
        made = self.service._run(lambda tx: new_link(_Call(tx), "alice", START))
        assert made is not None
        self.clock.advance(15 * 60 + 1)
        page = self.page(f"/portal/link/{made[0]}", "a")
        response, _ = self.request(
            "POST", "/portal/link", "a", {"csrf": self.csrf(page), "token": made[0]}
        )
        self.assertEqual(response.code, 401)


class _Call:
    """``call(fn)(*args)`` in one given transaction, as open_sync's ``call``."""

    def __init__(self, tx: Any) -> None:
        self.tx = tx

    def __call__(self, fn: Any) -> Any:
        return lambda *args: fn(self.tx, *args)


class CSRFAndHeaderTests(PortalTestCase):
    def test_post_without_or_with_a_wrong_token_is_refused(self) -> None:
        self.sign_in()
        function_id = self.register()
        endpoint_id = self.service.add_endpoint(owner="alice")
        form = {"function_id": function_id, "endpoint_id": endpoint_id, "args": "[1]"}
        for extra in ({}, {"csrf": "forged"}):
            response, body = self.request("POST", "/portal/run", "alice", {**form, **extra})
            self.assertEqual(response.code, 403)
            self.assertIn("CSRF", body)
        self.assertEqual(len(self.service.tasks), 0)
        response, _ = self.request("POST", "/portal/signout", "alice", {})
        self.assertEqual(response.code, 403)
        self.assertEqual(self.request("GET", "/portal/endpoints", "alice")[0].code, 200)

    def test_post_from_another_origin_is_refused(self) -> None:
        self.sign_in()
        body = self.page("/portal/endpoints")
        response, _ = self.request(
            "POST",
            "/portal/signout",
            "alice",
            {"csrf": self.csrf(body)},
            headers={"Origin": "https://evil.example"},
        )
        self.assertEqual(response.code, 403)

    def test_sign_in_form_needs_its_token(self) -> None:
        client_id, secret = self.service.add_client("alice")
        response, _ = self.request(
            "POST", "/portal/signin", data={"client_id": client_id, "client_secret": secret}
        )
        self.assertEqual(response.code, 403)

    def test_security_headers_on_every_answer(self) -> None:
        self.sign_in()
        for path in ("/portal/signin", "/portal/endpoints", "/portal/nowhere"):
            response, _ = self.request("GET", path, "alice")
            csp = response.headers.getRawHeaders("content-security-policy")[0]
            self.assertIn("script-src 'self'", csp)
            self.assertIn("style-src 'self'", csp)
            self.assertIn("frame-ancestors 'none'", csp)
            self.assertNotIn("unsafe-inline", csp)
            self.assertEqual(response.headers.getRawHeaders("x-frame-options"), ["DENY"])
            self.assertEqual(response.headers.getRawHeaders("referrer-policy"), ["same-origin"])

    def test_pages_have_no_inline_script_or_style(self) -> None:
        self.sign_in()
        for path in ("/portal/endpoints", "/portal/run", "/portal/tasks", "/portal/functions"):
            body = self.page(path)
            self.assertNotIn("<script>", body)
            self.assertNotIn("style=", body)
            self.assertNotIn("<style", body)

    def test_root_redirects_and_the_api_is_still_served(self) -> None:
        response, _ = self.request("GET", "/")
        self.assertEqual(response.headers.getRawHeaders("location"), ["/portal/"])
        response, body = self.request("GET", "/v2/version")
        self.assertEqual(json.loads(body)["service"], "funcx-service")
        response, body = self.request("GET", "/portal/static/portal.js")
        self.assertIn("EventSource", body)


class EscapingTests(PortalTestCase):
    def test_names_are_shown_as_text(self) -> None:
        self.sign_in()
        evil = "<script>alert(1)</script>"
        self.register(evil)
        self.service.add_endpoint(name="<b>ep</b>", owner="alice", hostname="<img src=x>")
        functions = self.page("/portal/functions")
        self.assertIn(html.escape(evil), functions)
        self.assertNotIn(evil, functions)
        endpoints = self.page("/portal/endpoints")
        self.assertIn("&lt;b&gt;ep&lt;/b&gt;", endpoints)
        self.assertIn("&lt;img src=x&gt;", endpoints)
        self.assertNotIn("<img src=x>", endpoints)
        self.assertIn(html.escape(evil), self.page("/portal/run"))


class OwnershipTests(PortalTestCase):
    def test_another_user_sees_none_of_it(self) -> None:
        self.sign_in("alice")
        self.sign_in("bob")
        function_id = self.register("alices-function")
        endpoint_id = self.service.add_endpoint(name="alices-endpoint", owner="alice")
        response, _ = self.run_function(function_id, endpoint_id, "[1]")
        task_id = response.headers.getRawHeaders("location")[0].rsplit("/", 1)[1]
        for path in ("/portal/endpoints", "/portal/functions", "/portal/tasks", "/portal/run"):
            body = self.page(path, "bob")
            for secret in ("alices-function", "alices-endpoint", endpoint_id, task_id):
                self.assertNotIn(secret, body)
        for path in (f"/portal/endpoints/{endpoint_id}", f"/portal/tasks/{task_id}"):
            response, _ = self.request("GET", path, "bob")
            self.assertEqual(response.code, 404)
        # Bob cannot submit to Alice's endpoint: the API's own refusal.
        response, body = self.run_function(self.register("bobs", "bob"), endpoint_id, "[1]", "bob")
        self.assertEqual(response.code, 403)
        self.assertIn("belongs to another user", body)


class RunAndTaskTests(PortalTestCase):
    def test_run_shows_the_result(self) -> None:
        _, location, task_id = self.start_task("[1, 2]")
        self.assertIn("waiting-for-ep", self.page(location))
        self.service.run_task(task_id)
        self.clock.advance(0)
        body = self.page(location)
        self.assertIn('data-status="success"', body)
        self.assertIn('<pre id="result" data-field="result">3</pre>', body)

    def test_attempts_are_shown(self) -> None:
        endpoint_id, location, task_id = self.start_task("[1, 2]")
        cell = '<td data-field="attempts">{}</td>'
        self.assertIn(cell.format(""), self.page("/portal/tasks"))
        # Sent to a manager, lost with it, sent to another: two attempts.
        launch = TaskTransition(1, TaskState.WAITING_FOR_LAUNCH, ActorName.INTERCHANGE)
        self.service.send(endpoint_id, Result.success(task_id, serialize(3), [launch, launch]))
        self.clock.advance(0)
        self.assertIn('<dd data-field="attempts" id="task-attempts">2</dd>', self.page(location))
        self.assertIn(cell.format(2), self.page("/portal/tasks"))

    def test_failure_shows_the_traceback(self) -> None:
        _, location, task_id = self.start_task("[1]")
        self.service.set_exception(task_id, "Traceback:\n  ValueError: <bad> value")
        self.clock.advance(0)
        body = self.page(location)
        self.assertIn("ValueError: &lt;bad&gt; value", body)
        self.assertIn(ErrorCode.REMOTE_EXECUTION_ERROR, body)

    def test_bad_arguments_are_explained(self) -> None:
        self.sign_in()
        function_id = self.register()
        endpoint_id = self.service.add_endpoint(owner="alice")
        response, body = self.run_function(function_id, endpoint_id, "[1,")
        self.assertEqual(response.code, 400)
        self.assertIn("not JSON", body)
        self.assertEqual(len(self.service.tasks), 0)

    def test_batch_and_pages(self) -> None:
        self.sign_in()
        function_id = self.register()
        endpoint_id = self.service.add_endpoint(owner="alice")
        body = self.page("/portal/run")
        batch = json.dumps([[i] for i in range(TASKS_PER_PAGE * 2 + 20)])
        response, _ = self.request(
            "POST",
            "/portal/batch",
            "alice",
            {
                "csrf": self.csrf(body),
                "function_id": function_id,
                "endpoint_id": endpoint_id,
                "batch": batch,
            },
        )
        self.assertEqual(response.code, 303)
        location = response.headers.getRawHeaders("location")[0]
        self.assertTrue(location.startswith("/portal/tasks?group="))
        self.assertEqual(len(self.service.tasks), TASKS_PER_PAGE * 2 + 20)
        first = self.page(location)
        self.assertIn("120 tasks; page 1 of 3", first)
        self.assertEqual(first.count("data-task-id="), TASKS_PER_PAGE)
        last = self.page("/portal/tasks?page=3")
        self.assertEqual(last.count("data-task-id="), 20)
        self.assertIn('id="newer"', last)
        self.assertNotIn('id="older"', last)


class EndpointPageTests(PortalTestCase):
    def test_status_counts_and_charts(self) -> None:
        self.sign_in()
        endpoint_id = self.service.add_endpoint(owner="alice", hostname="node-1")
        for _ in range(3):
            self.clock.advance(30)
            self.service.report(endpoint_id)
        self.clock.advance(0)
        body = self.page("/portal/endpoints")
        self.assertIn('data-status="online"', body)
        self.assertIn("node-1", body)
        page = self.page(f"/portal/endpoints/{endpoint_id}")
        self.assertEqual(page.count("<polyline"), 4)  # queue depth; workers, busy, managers
        self.clock.advance(121)
        self.assertIn('data-status="offline"', self.page("/portal/endpoints"))

    def test_purge_drops_old_history_sessions_and_links(self) -> None:
        self.sign_in()
        endpoint_id = self.service.add_endpoint(owner="alice")
        self.clock.advance(0)
        self.assertEqual(len(self.service._run(store.status_history, endpoint_id, 0.0)), 1)
        self.clock.advance(8 * 3600)
        self.successResultOf(self.portal.sessions.purge())
        self.assertEqual(self.service._run(store.status_history, endpoint_id, 0.0), [])
        count = self.service._run(
            lambda tx: tx.execute("SELECT COUNT(*) FROM portal_sessions").fetchone()[0]
        )
        self.assertEqual(count, 0)

    def test_history_is_kept_for_an_hour(self) -> None:
        endpoint_id = self.service.add_endpoint(owner="alice")
        self.clock.advance(0)
        self.clock.advance(HISTORY_SECONDS + 10)
        self.service.report(endpoint_id)
        self.clock.advance(0)
        rows = self.service._run(store.status_history, endpoint_id, 0.0)
        self.assertEqual([r[0] for r in rows], [START + HISTORY_SECONDS + 10])


class InternalErrorTests(PortalTestCase):
    def test_a_failing_page_is_a_500_page_and_one_logged_failure(self) -> None:
        self.sign_in()

        def broken(tx: Any, owner: str) -> Any:
            raise RuntimeError("the database fell over")

        self.patch(store, "list_functions", broken)
        response, body = self.request("GET", "/portal/functions", "alice")
        self.assertEqual(response.code, 500)
        self.assertIn("The portal failed to answer", body)
        self.assertNotIn("fell over", body)  # the log says why, not the page
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class LiveStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = LiveHub()
        self.value: Any = [1]

    async def snapshot(self) -> Any:
        return self.value

    def events(self, request: DummyRequest) -> List[str]:
        return re.findall(rb"event: (\w+)", b"".join(request.written))  # type: ignore[arg-type]

    def test_sends_changes_and_wakes_on_changed(self) -> None:
        request = DummyRequest([b""])
        stream = Stream(self.hub, self.clock, request, "tasks", self.snapshot, period=5.0)
        stream.start()
        self.clock.advance(0)
        self.assertEqual(self.events(request), [b"tasks"])
        self.clock.advance(5)
        self.assertEqual(len(self.events(request)), 1)  # unchanged: nothing sent
        self.value = [2]
        self.hub.changed()
        self.clock.advance(0.1)
        self.assertEqual(len(self.events(request)), 2)
        self.assertIn(b"data: [2]", b"".join(request.written))  # type: ignore[arg-type]
        stream.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(request.finished, 1)

    def test_wake_ups_read_at_most_every_tenth_of_a_second(self) -> None:
        reads: List[float] = []

        async def counted() -> Any:
            reads.append(self.clock.seconds())
            return self.value

        request = DummyRequest([b""])
        stream = Stream(self.hub, self.clock, request, "tasks", counted, period=5.0)
        stream.start()
        self.clock.advance(0)
        for _ in range(5):
            self.hub.changed()
            self.clock.advance(0.02)
        self.clock.advance(0.2)
        self.assertEqual([round(t, 2) for t in reads], [0.0, 0.1])
        stream.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ends_when_the_session_ends(self) -> None:
        request = DummyRequest([b""])
        Stream(self.hub, self.clock, request, "tasks", self.snapshot).start()
        self.clock.advance(0)
        self.value = None
        self.hub.changed()
        self.clock.advance(0.1)
        self.assertEqual(self.events(request), [b"tasks", b"signedout"])
        self.assertEqual(self.hub.streams, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ends_after_its_lifetime(self) -> None:
        request = DummyRequest([b""])
        Stream(self.hub, self.clock, request, "e", self.snapshot, period=5, lifetime=12).start()
        self.clock.pump([0, 5, 5, 5])
        self.assertEqual(request.finished, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ViewTests(SynchronousTestCase):
    def test_plain_results_are_shown(self) -> None:
        self.assertEqual(views.show_result(serialize({"a": [1, 2.5, "x"]})), "{'a': [1, 2.5, 'x']}")

    def test_other_pickles_are_not_loaded(self) -> None:
        payload = "00\n" + base64.b64encode(pickle.dumps(Evil())).decode()
        shown = views.show_result(payload)
        self.assertIn("non-plain type (posix.system)", shown)
        self.assertIn("get_result", shown)

    def test_traceback_text(self) -> None:
        self.assertEqual(views.describe_error("Traceback: boom", None), "Traceback: boom")
        self.assertEqual(views.describe_error(serialize("Traceback: x"), None), "Traceback: x")
        self.assertEqual(views.describe_error(None, "lost"), "lost")

    def test_chart_escapes_its_labels(self) -> None:
        svg = views.line_chart("<t>", [("<l>", [(1.0, 2.0), (2.0, 3.0)])], 0.0, 3.0)
        self.assertIn("&lt;t&gt;", svg)
        self.assertIn("&lt;l&gt;", svg)
        self.assertIn("<polyline", svg)
        self.assertIn("no reports", views.line_chart("t", [("l", [])], 0.0, 3.0))
        self.assertEqual(views.line_chart("t", [("l", [(1.0, 1.0)])], 0.0, 3.0).count("<circle"), 1)


class CommandTests(SynchronousTestCase):
    """``funcx-service portal-link`` and ``portal-revoke`` on the storage (no service runs)."""

    def test_link_and_revoke(self) -> None:
        from funcx_endpoint.webservice.settings import ServiceSettings
        from funcx_endpoint.webservice.storage import open_sync
        from tests.test_webservice_cli import funcx_service

        state_dir = os.path.abspath(self.mktemp())
        self.assertEqual(funcx_service(state_dir, "create-client", "alice").returncode, 0)
        made = funcx_service(state_dir, "portal-link", "alice")
        self.assertEqual(made.returncode, 0, made.stderr)
        found = re.fullmatch(
            r"https://localhost:\d+/portal/link/([A-Za-z0-9_-]{43})\n", made.stdout
        )
        self.assertIsNotNone(found, made.stdout)
        self.assertIn("15 minutes", made.stderr)
        assert found is not None
        settings = ServiceSettings.load(state_dir)
        connection, call = open_sync(settings.effective_database_url)
        self.addCleanup(connection.close)
        self.assertIsNotNone(call(store.use_link)(store.token_hash(found.group(1)), time.time()))
        client = call(store.active_client_named)("alice")
        call(store.insert_session)("h", client.identity_id, client.client_id, "c", 0.0, 2e9)
        revoked = funcx_service(state_dir, "portal-revoke", "alice")
        self.assertEqual(revoked.returncode, 0, revoked.stderr)
        self.assertIn("Ended 1 portal session(s) of 'alice'", revoked.stdout)
        self.assertIsNone(call(store.find_session)("h", time.time()))
        self.assertEqual(funcx_service(state_dir, "portal-link", "nobody").returncode, 66)
