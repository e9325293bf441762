"""The portal: its pages, built on the service's own storage, API handlers and auth.

:class:`Portal` is a service of the web service's process.  Its resource
(:meth:`Portal.resource`) serves, under ``/portal``:

* sign-in with a client id and secret (the auth API's own check and back-off),
  or with a one-time link from ``funcx-service portal-link NAME``; sign-out;
* the user's endpoints, updated live; an endpoint's details, recent tasks and
  charts of the last hour;
* the user's functions; a form that sends a function to an endpoint, or a batch;
* the user's tasks, a page at a time, and a task's page that follows it live to
  its result or traceback.

What a user sees is selected by owner exactly as the REST API does: endpoints
with the storage's ``list_endpoints(owner)`` and the API's own liveness
(``EndpointsAPI.status_of``), tasks sent through ``TasksAPI.submit_as`` (the
code path of ``POST /v2/submit``: the same checks, quotas and dispatch), and
listings by ``owner = ?`` (:mod:`funcx_endpoint.portal.store`).  Templates are
Jinja2 with autoescaping on: every stored text is shown as text.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import jinja2
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from funcx_endpoint.lifecycle import stop_loop
from funcx_endpoint.portal import store, views
from funcx_endpoint.portal.live import LiveHub, Stream
from funcx_endpoint.portal.sessions import COOKIE, Sessions, set_cookie
from funcx_endpoint.portal.store import Session
from funcx_endpoint.portal.web import (
    PREFIX,
    STREAMED,
    Answer,
    Page,
    PageCall,
    PortalResource,
    Redirect,
)
from funcx_endpoint.webservice.api import FuncXAPI
from funcx_endpoint.webservice.auth import FUNCX_RESOURCE_SERVER, AuthAPI
from funcx_endpoint.webservice.http import APIError, Call
from funcx_endpoint.webservice.records import DONE_STATUSES, Endpoint, TokenInfo
from funcx_endpoint.webservice.storage import Storage
from funcx_endpoint.wire import SerializationError, pack_payload

__all__ = ["Portal", "TASKS_PER_PAGE"]

TASKS_PER_PAGE = 50
MAX_BATCH = 1000
MAX_LIVE_IDS = 100
_STATIC = os.path.join(os.path.dirname(__file__), "static")
_STATIC_TYPES = {"portal.css": b"text/css; charset=utf-8", "portal.js": b"text/javascript"}


def _uuid(text: Optional[str]) -> Optional[str]:
    """``text`` as a canonical UUID, or None if it is not one."""
    try:
        return str(uuid.UUID(text or ""))
    except ValueError:
        return None


def _safe_next(target: Optional[str]) -> str:
    """Where to go after sign-in: a page of the portal, nowhere else."""
    if (
        target
        and target.startswith(PREFIX + "/")
        and not target.startswith(PREFIX + "/sign")
        and ".." not in target
        and "\\" not in target
        and "//" not in target
    ):
        return target
    return PREFIX + "/endpoints"


class Portal(Service):
    """The portal's pages over the service's parts; see the module docstring.

    ``clock`` is the service's clock (session expiry, liveness, charts).
    :meth:`changed` (an observer of the result ingest) updates the live pages.
    """

    log = Logger()
    name = "portal"

    def __init__(
        self,
        storage: Storage,
        clock: IReactorTime,
        api: FuncXAPI,
        auth: AuthAPI,
        *,
        session_seconds: float = 8 * 3600,
        live_period: float = 5.0,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.api = api
        self.auth = auth
        self.sessions = Sessions(storage, clock, session_seconds)
        self.hub = LiveHub()
        self.live_period = live_period
        self._purge: Optional[LoopingCall] = None
        self._static: Dict[str, bytes] = {}
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("funcx_endpoint.portal", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters.update(when=views.when, duration=views.duration)
        self._resource = PortalResource(self.sessions, self._error_page)
        self._install(self._resource)

    def changed(self) -> None:
        """Results or reports were stored: the live pages read again."""
        self.hub.changed()

    def resource(self) -> PortalResource:
        return self._resource

    def startService(self) -> None:
        super().startService()
        self._purge = LoopingCall(self._purge_sessions)
        self._purge.clock = self.clock
        self._purge.start(3600.0, now=False)

    def stopService(self) -> None:
        super().stopService()
        stop_loop(self._purge)
        self.hub.close_all()

    async def _purge_sessions(self) -> None:
        try:
            await self.sessions.purge()
        except Exception:
            self.log.failure("Purging expired portal sessions failed")

    def _install(self, r: PortalResource) -> None:
        uid = "(?P<{}>[0-9a-fA-F-]{{36}})"
        r.add("GET", "/?", self.index, signed_in=False)
        r.add("GET", "/static/(?P<name>portal\\.(css|js))", self.static, signed_in=False)
        r.add("GET", "/signin", self.signin_page, signed_in=False)
        r.add("POST", "/signin", self.signin, signed_in=False)
        r.add("GET", "/link/(?P<token>[A-Za-z0-9_-]{1,128})", self.link_page, signed_in=False)
        r.add("POST", "/link", self.link_signin, signed_in=False)
        r.add("POST", "/signout", self.signout)
        r.add("GET", "/endpoints", self.endpoints_page)
        r.add("GET", "/endpoints/" + uid.format("endpoint_id"), self.endpoint_page)
        r.add("GET", "/functions", self.functions_page)
        r.add("GET", "/run", self.run_page)
        r.add("POST", "/run", self.run)
        r.add("POST", "/batch", self.batch)
        r.add("GET", "/tasks", self.tasks_page)
        r.add("GET", "/tasks/" + uid.format("task_id"), self.task_page)
        r.add("GET", "/live/endpoints", self.live_endpoints)
        r.add("GET", "/live/tasks", self.live_tasks)

    # -- rendering ---------------------------------------------------------------

    def render(self, template: str, call: Optional[PageCall], **context: Any) -> str:
        session = call.session if call is not None else None
        return self.templates.get_template(template).render(
            prefix=PREFIX,
            user=session.username if session is not None else None,
            csrf=call.csrf_token() if call is not None else "",
            **context,
        )

    def _error_page(self, status: int, message: str) -> str:
        return self.render("error.html", None, code=status, message=message)

    def page(self, template: str, call: PageCall, status: int = 200, **context: Any) -> Page:
        return Page(self.render(template, call, **context), status)

    async def index(self, call: PageCall) -> Answer:
        return Redirect(PREFIX + "/endpoints")

    async def static(self, call: PageCall) -> Answer:
        name = call.params["name"]
        data = self._static.get(name)
        if data is None:
            with open(os.path.join(_STATIC, name), "rb") as f:
                data = self._static[name] = f.read()
        request = call.request
        request.setHeader(b"content-type", _STATIC_TYPES[name])
        request.setHeader(b"cache-control", b"max-age=300")
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()
        return STREAMED

    # -- signing in and out --------------------------------------------------------

    async def signin_page(self, call: PageCall) -> Answer:
        return self.page("signin.html", call, next=call.query("next") or "", message=None)

    async def signin(self, call: PageCall) -> Answer:
        form = call.form()
        try:
            client = await self.auth.client_of(Call(call.request, {}))
        except APIError as e:
            message = (
                "Wrong client id or secret (or the client was revoked)."
                if e.status == 401
                else e.message
            )
            return self.page(
                "signin.html", call, e.status, next=form.get("next", ""), message=message
            )
        return await self._open_session(call, client.identity_id, client.client_id, form)

    async def _open_session(
        self, call: PageCall, identity_id: str, client_id: str, form: Dict[str, str]
    ) -> Answer:
        token, _ = await self.sessions.open(identity_id, client_id)
        set_cookie(call.request, COOKIE, token, int(self.sessions.lifetime), call.secure)
        return Redirect(_safe_next(form.get("next")))

    async def link_page(self, call: PageCall) -> Answer:
        return self.page("link.html", call, token=call.params["token"])

    async def link_signin(self, call: PageCall) -> Answer:
        form = call.form()
        found = await self.sessions.use_link(form.get("token", ""))
        if found is None:
            return self.page(
                "signin.html",
                call,
                401,
                next="",
                message="That sign-in link is used, expired or unknown; ask for a new one "
                "(funcx-service portal-link NAME).",
            )
        return await self._open_session(call, found[0], found[1], {})

    async def signout(self, call: PageCall) -> Answer:
        await self.sessions.close(call.cookie_token)
        set_cookie(call.request, COOKIE, "", 0, call.secure)
        return Redirect(PREFIX + "/signin")

    # -- endpoints --------------------------------------------------------------------

    def _me(self, session: Session) -> TokenInfo:
        """The session as the identity the API's handlers take."""
        return TokenInfo(
            session.identity_id,
            session.client_id,
            FUNCX_RESOURCE_SERVER,
            "portal",
            session.created,
            session.expires,
        )

    async def _endpoint_rows(self, owner: str, only: Optional[str] = None) -> List[Dict[str, Any]]:
        endpoints = await self.storage.list_endpoints(owner)
        now = self.clock.seconds()
        rows = []
        for endpoint in endpoints:
            if only is not None and endpoint.endpoint_id != only:
                continue
            rows.append(await self._endpoint_row(endpoint, now))
        return rows

    async def _endpoint_row(self, endpoint: Endpoint, now: float) -> Dict[str, Any]:
        status = await self.api.endpoints.status_of(endpoint)
        state: Dict[str, Any] = {}
        for report in endpoint.recent_reports:
            if not report.get("final"):
                state = report.get("global_state") or {}
                break
        online = status == "online"

        def count(key: str) -> str:
            value = state.get(key)
            return str(value) if online and isinstance(value, int) else "-"

        total, idle = state.get("total_workers"), state.get("idle_workers")
        running = (
            str(total - idle)
            if online and isinstance(total, int) and isinstance(idle, int)
            else "-"
        )
        metadata = endpoint.metadata
        return {
            "id": endpoint.endpoint_id,
            "name": endpoint.name,
            "status": status,
            "last_seen": views.ago(endpoint.last_report_at, now),
            "last_seen_at": views.when(endpoint.last_report_at),
            "host": str(metadata.get("hostname") or "-"),
            "version": str(metadata.get("endpoint_version") or "-"),
            "managers": count("managers"),
            "workers": count("total_workers"),
            "queued": count("pending_tasks"),
            "running": running,
        }

    async def endpoints_page(self, call: PageCall) -> Answer:
        assert call.session is not None
        rows = await self._endpoint_rows(call.session.identity_id)
        return self.page("endpoints.html", call, endpoints=rows)

    async def _own_endpoint(self, owner: str, endpoint_id: Optional[str]) -> Optional[Endpoint]:
        """As the REST API: another user's endpoint, or a deleted one, is not found."""
        if endpoint_id is None:
            return None
        endpoint = await self.storage.get_endpoint(endpoint_id)
        if endpoint is None or endpoint.owner != owner or endpoint.deleted_at is not None:
            return None
        return endpoint

    async def endpoint_page(self, call: PageCall) -> Answer:
        assert call.session is not None
        owner = call.session.identity_id
        endpoint = await self._own_endpoint(owner, _uuid(call.params["endpoint_id"]))
        if endpoint is None:
            return self.page("error.html", call, 404, code=404, message="No such endpoint.")
        now = self.clock.seconds()
        row = await self._endpoint_row(endpoint, now)
        since = now - 3600
        history = await self.storage.run(store.status_history, endpoint.endpoint_id, since)
        bins = await self.storage.run(store.finished_per_bin, endpoint.endpoint_id, since, 60.0)
        throughput = [(since + (b + 0.5) * 60, bins.get(b, 0) / 60) for b in range(60)]
        if not bins:
            throughput = []
        charts = [
            views.line_chart(
                "Tasks finished per second", [("tasks/s", throughput)], since, now, dots=False
            ),
            views.line_chart(
                "Queue depth",
                [("queued tasks", [(h[0], h[4]) for h in history])],
                since,
                now,
            ),
            views.line_chart(
                "Workers",
                [
                    ("workers", [(h[0], h[2]) for h in history]),
                    ("busy", [(h[0], h[2] - h[3]) for h in history]),
                    ("managers", [(h[0], h[1]) for h in history]),
                ],
                since,
                now,
            ),
        ]
        tasks, total = await self.storage.run(
            store.list_tasks, owner, 20, 0, endpoint.endpoint_id, None
        )
        return self.page(
            "endpoint.html",
            call,
            endpoint=endpoint,
            row=row,
            charts=charts,
            tasks=tasks,
            total=total,
            threshold=endpoint.threshold(self.api.context.heartbeat_threshold),
            metadata=json.dumps(endpoint.metadata, indent=2, sort_keys=True, default=str),
        )

    async def live_endpoints(self, call: PageCall) -> Answer:
        only = _uuid(call.query("id")) if call.query("id") else None
        return self._stream(call, "endpoints", lambda owner: self._endpoint_rows(owner, only))

    def _stream(
        self, call: PageCall, event: str, snapshot_of: Callable[[str], Awaitable[Any]]
    ) -> Answer:
        """Stream ``event``: ``snapshot_of(identity)`` of the caller's session, read
        anew each time, until the session ends (then the stream does)."""
        token = call.cookie_token

        async def snapshot() -> Optional[Any]:
            session = await self.sessions.find(token)
            if session is None:
                return None
            return await snapshot_of(session.identity_id)

        Stream(self.hub, self.clock, call.request, event, snapshot, self.live_period).start()
        return STREAMED

    # -- functions and running them ------------------------------------------------------

    async def functions_page(self, call: PageCall) -> Answer:
        assert call.session is not None
        functions = await self.storage.run(store.list_functions, call.session.identity_id)
        return self.page("functions.html", call, functions=functions)

    async def _run_page(
        self, call: PageCall, status: int = 200, message: Optional[str] = None, **values: str
    ) -> Page:
        assert call.session is not None
        owner = call.session.identity_id
        functions = await self.storage.run(store.list_functions, owner)
        endpoints = await self._endpoint_rows(owner)
        form = {
            "function_id": call.query("function") or "",
            "endpoint_id": call.query("endpoint") or "",
            "args": "[]",
            "kwargs": "{}",
            "batch": "[[1], [2], [3]]",
            **values,
        }
        return self.page(
            "run.html",
            call,
            status,
            functions=functions,
            endpoints=endpoints,
            form=form,
            message=message,
        )

    async def run_page(self, call: PageCall) -> Answer:
        return await self._run_page(call)

    async def _submit(
        self,
        call: PageCall,
        calls: List[Tuple[Any, Any]],
        form: Dict[str, str],
        then: Callable[[Dict[str, Any]], str],
    ) -> Answer:
        """Submit ``calls`` (args, kwargs) as ``POST /v2/submit`` would; a redirect to
        ``then(answer)``, or the run page again saying what was wrong."""
        assert call.session is not None
        function_id, endpoint_id = _uuid(form.get("function_id")), _uuid(form.get("endpoint_id"))
        if function_id is None or endpoint_id is None:
            return await self._run_page(call, 400, "Pick a function and an endpoint.", **form)
        try:
            payloads = [pack_payload(args, kwargs) for args, kwargs in calls]
        except SerializationError as e:
            return await self._run_page(call, 400, f"Cannot serialize: {e}", **form)
        body = {"tasks": [[function_id, endpoint_id, p] for p in payloads]}
        try:
            answer = await self.api.tasks.submit_as(self._me(call.session), body)
        except APIError as e:
            return await self._run_page(call, e.status, e.message, **form)
        refused = [r for r in answer["results"] if not r.get("task_uuid")]
        if refused:
            first = refused[0]
            message = f"{len(refused)} of {len(payloads)} refused: {first.get('reason')}"
            if len(refused) == len(payloads):
                return await self._run_page(
                    call, int(first.get("http_status_code", 400)), message, **form
                )
        return Redirect(f"{PREFIX}/{then(answer)}")

    @staticmethod
    def _run_form(call: PageCall) -> Dict[str, str]:
        """The fields of the run page's form (the CSRF token aside)."""
        form = call.form()
        form.pop("csrf", None)
        return form

    async def run(self, call: PageCall) -> Answer:
        form = self._run_form(call)
        try:
            args = json.loads(form.get("args") or "[]")
            kwargs = json.loads(form.get("kwargs") or "{}")
        except ValueError as e:
            return await self._run_page(call, 400, f"The arguments are not JSON: {e}", **form)
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return await self._run_page(
                call, 400, "Arguments must be a JSON list, keyword arguments a JSON object.", **form
            )
        return await self._submit(
            call,
            [(args, kwargs)],
            form,
            lambda answer: f"tasks/{answer['results'][0]['task_uuid']}",
        )

    async def batch(self, call: PageCall) -> Answer:
        form = self._run_form(call)
        try:
            batch = json.loads(form.get("batch") or "[]")
        except ValueError as e:
            return await self._run_page(call, 400, f"The batch is not JSON: {e}", **form)
        if (
            not isinstance(batch, list)
            or not batch
            or len(batch) > MAX_BATCH
            or not all(isinstance(item, list) for item in batch)
        ):
            return await self._run_page(
                call,
                400,
                f"A batch is a JSON list of 1 to {MAX_BATCH} argument lists, e.g. [[1], [2]].",
                **form,
            )
        return await self._submit(
            call,
            [(args, {}) for args in batch],
            form,
            lambda answer: f"tasks?group={answer['task_group_id']}",
        )

    # -- tasks -------------------------------------------------------------------------

    async def tasks_page(self, call: PageCall) -> Answer:
        assert call.session is not None
        try:
            number = max(1, int(call.query("page") or "1"))
        except ValueError:
            number = 1
        group = _uuid(call.query("group")) if call.query("group") else None
        endpoint = _uuid(call.query("endpoint")) if call.query("endpoint") else None
        tasks, total = await self.storage.run(
            store.list_tasks,
            call.session.identity_id,
            TASKS_PER_PAGE,
            (number - 1) * TASKS_PER_PAGE,
            endpoint,
            group,
        )
        pages = max(1, -(-total // TASKS_PER_PAGE))
        live = [t.task_id for t in tasks if t.status not in DONE_STATUSES][:MAX_LIVE_IDS]
        filters = (("group", group), ("endpoint", endpoint))
        query = "".join(f"&{name}={value}" for name, value in filters if value)
        return self.page(
            "tasks.html",
            call,
            tasks=tasks,
            total=total,
            number=number,
            pages=pages,
            group=group,
            query=query,
            live=",".join(live),
        )

    def _task_view(self, task: store.TaskRow, full: bool) -> Dict[str, Any]:
        view: Dict[str, Any] = {
            "id": task.task_id,
            "status": task.status,
            "finished": views.when(task.finished),
            "duration": views.duration(task.created, task.finished),
            "error_code": task.error_code or "",
            "attempts": "" if task.attempts is None else str(task.attempts),
        }
        if full and task.status == "success":
            view["result"] = views.show_result(task.result)
        if full and task.status == "failed":
            view["traceback"] = views.describe_error(task.exception, task.error_message)
        return view

    async def task_page(self, call: PageCall) -> Answer:
        assert call.session is not None
        task = await self.storage.run(
            store.task_row, str(uuid.UUID(call.params["task_id"])), call.session.identity_id
        )
        if task is None:
            return self.page("error.html", call, 404, code=404, message="No such task.")
        return self.page("task.html", call, task=task, view=self._task_view(task, True))

    async def live_tasks(self, call: PageCall) -> Answer:
        ids = [i for i in (_uuid(x) for x in (call.query("ids") or "").split(",")) if i]
        ids = ids[:MAX_LIVE_IDS]
        full = call.query("full") == "1"

        async def snapshot(owner: str) -> List[Dict[str, Any]]:
            found = await self.storage.run(store.tasks_by_id, ids, owner)
            if full:
                rows = await self.storage.run(store.task_row, ids[0], owner) if ids else None
                if rows is not None:
                    found[rows.task_id] = rows
            return [self._task_view(found[i], full) for i in ids if i in found]

        return self._stream(call, "tasks", snapshot)
