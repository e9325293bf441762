"""Tasks: ``POST /v2/submit``, their status, task groups, and the result queues
that give FuncXExecutor each result as it arrives.

What ``POST /v2/submit`` promises (task by task answers; 200 once tasks are
created) is in :mod:`funcx_endpoint.webservice.api`.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any, Dict, List, Optional, Set, Tuple

import attr

from funcx_endpoint.webservice.api_checks import (
    boolean_field,
    canonical_uuid,
    show,
    takes_batches,
    task_ids_field,
)
from funcx_endpoint.webservice.api_context import HandlerGroup, storage_unavailable
from funcx_endpoint.webservice.auth import API
from funcx_endpoint.webservice.http import (
    APIError,
    Call,
    Router,
    bad_request,
    not_found,
    utf8_encodable,
)
from funcx_endpoint.webservice.records import DONE_STATUSES
from funcx_endpoint.webservice.retention import delete_finished_task, mark_fetched
from funcx_endpoint.webservice.storage import (
    Endpoint,
    NewTask,
    SubmitContext,
    TokenInfo,
    UnsentTask,
)
from funcx_endpoint.webservice.tasks import text_size
from funcx_endpoint.wire import DeserializationError, pack_task_buffer
from funcx_endpoint.wire.resources import ResourceSpecificationError, check_resource_specification
from funcx_endpoint.wire.runtime import UserRuntimeError, check_user_runtime

__all__ = ["MAX_BATCH_STATUS_IDS", "MAX_TASKS_PER_SUBMIT", "TasksAPI", "queue_prefix"]

MAX_TASKS_PER_SUBMIT = 10_000
#: ``POST /batch_status`` ids per request (funcX 1.0.13's executor asks for 1024).
MAX_BATCH_STATUS_IDS = 4096
_TASK_GROUP_PREFIX = "taskgroup."


def queue_prefix(identity_id: str) -> str:
    """What the names of a user's result queues start with (the user may read those)."""
    return f"{_TASK_GROUP_PREFIX}{identity_id}."


def _resource_specification(value: Any) -> Optional[str]:
    """A batch's ``resource_specification`` (Globus Compute's MPI keys) as JSON
    text to store, None for none; 400 if it makes no sense."""
    if value is None or value == {}:
        return None
    try:
        check_resource_specification(value)
    except ResourceSpecificationError as e:
        raise bad_request(
            f"resource_specification: {e}", "INVALID_RESOURCE_SPECIFICATION"
        ) from None
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _user_runtime(value: Any) -> Optional[str]:
    """A batch's ``user_runtime`` (the submitter's Python and dill versions) as
    JSON text to store, None for none; 400 if it makes no sense."""
    if value is None:
        return None
    try:
        runtime = check_user_runtime(value)
    except UserRuntimeError as e:
        raise bad_request(str(e), "INVALID_USER_RUNTIME") from None
    return json.dumps(runtime, separators=(",", ":"), sort_keys=True) if runtime else None


def _refusal(status: int, code: str, reason: str) -> Dict[str, Any]:
    """The answer's entry for a task ``POST /v2/submit`` refused."""
    return {"task_uuid": None, "http_status_code": status, "code": code, "reason": reason}


@attr.s(auto_attribs=True)
class TasksAPI(HandlerGroup):
    """The task handlers; :meth:`install` adds them to a router."""

    #: users whose broker user for result queues was set up by this process
    _provisioned_users: Set[str] = attr.ib(factory=set, init=False)

    def install(self, router: Router) -> None:
        router.add("POST", "/v2/submit", self.submit, API)
        router.add("GET", "/v2/tasks/(?P<task_id>[^/]+)", self.get_task, API)
        router.add("DELETE", "/v2/tasks/(?P<task_id>[^/]+)", self.delete_task, API)
        router.add("POST", "/v2/batch_status", self.batch_status, API)
        router.add("GET", "/v2/taskgroup/(?P<task_group_id>[^/]+)", self.get_task_group, API)
        router.add("GET", "/v2/get_amqp_result_connection_url", self.result_connection_url, API)

    async def submit(self, call: Call) -> Tuple[int, Any]:
        # Text is checked task by task (a payload that is not valid Unicode fails alone);
        # the other strings kept are UUIDs.
        body = await call.json_object(check_text=False)
        return 200, await self.submit_as(call.identity, body)

    async def submit_as(self, me: TokenInfo, body: Dict[str, Any]) -> Dict[str, Any]:
        """What ``POST /v2/submit`` with ``body`` answers ``me`` (the portal submits so)."""
        items = body.get("tasks")
        if not isinstance(items, list):
            raise bad_request(
                "tasks must be a list of [function_id, endpoint_id, payload]", "INVALID_TYPE"
            )
        if len(items) > MAX_TASKS_PER_SUBMIT:
            raise bad_request(
                f"at most {MAX_TASKS_PER_SUBMIT} tasks per submit, got {len(items)}: "
                f"split the batch",
                "TOO_MANY_TASKS",
            )
        raw_group = body.get("task_group_id")
        task_group_id = (
            str(uuid.uuid4())
            if raw_group in (None, "")
            else canonical_uuid(raw_group, "task_group_id")
        )
        websocket = boolean_field(body, "create_websocket_queue")
        ws_queue = queue_prefix(me.identity_id) + task_group_id if websocket else None
        resources = _resource_specification(body.get("resource_specification"))
        runtime = _user_runtime(body.get("user_runtime"))

        # First pass: shapes and UUIDs, without the database.
        results: List[Optional[Dict[str, Any]]] = []
        parsed: List[Optional[Tuple[str, str, str]]] = []
        for index, item in enumerate(items):
            if not (
                isinstance(item, (list, tuple))
                and len(item) == 3
                and all(isinstance(x, str) for x in item)
            ):
                results.append(
                    _refusal(
                        400,
                        "INVALID_TASK",
                        f"task {index}: a task must be [function_id, endpoint_id, payload] "
                        f"(3 strings), got {show(item)}",
                    )
                )
                parsed.append(None)
                continue
            try:
                function_id = canonical_uuid(item[0], f"task {index}: function_id")
                endpoint_id = canonical_uuid(item[1], f"task {index}: endpoint_id")
            except APIError as e:
                results.append(_refusal(400, e.code, e.message))
                parsed.append(None)
                continue
            results.append(None)
            parsed.append((function_id, endpoint_id, item[2]))
        wanted = [p for p in parsed if p is not None]
        functions, endpoints, whitelists, containers = await self._submit_context(
            sorted({p[0] for p in wanted}), sorted({p[1] for p in wanted}), me.identity_id
        )

        # Second pass: each task against what exists.
        now = self.context.clock.seconds()
        new_tasks: List[NewTask] = []
        to_send: List[UnsentTask] = []
        for index, entry in enumerate(parsed):
            if entry is None:
                continue
            function_id, endpoint_id, payload = entry
            refusal = self._check_task(
                function_id, endpoint_id, functions, endpoints, whitelists, me.identity_id
            )
            if refusal is not None:
                results[index] = refusal
                continue
            function = functions[function_id]
            if "\x00" in payload:
                results[index] = _refusal(
                    400, "INVALID_PAYLOAD", f"task {index}: the payload contains NUL characters"
                )
                continue
            if not utf8_encodable(payload):
                results[index] = _refusal(
                    400,
                    "INVALID_PAYLOAD",
                    f"task {index}: the payload is not valid Unicode text (a lone surrogate)",
                )
                continue
            try:
                task_buffer = pack_task_buffer(function.function_code, payload)
            except DeserializationError as e:
                results[index] = _refusal(400, "INVALID_PAYLOAD", f"task {index}: bad payload: {e}")
                continue
            task_id = str(uuid.uuid4())
            new_tasks.append(
                NewTask(
                    task_id,
                    me.identity_id,
                    function_id,
                    endpoint_id,
                    task_group_id,
                    payload,
                    ws_queue,
                    now,
                    resources,
                    runtime,
                )
            )
            to_send.append(
                UnsentTask(
                    task_id,
                    endpoint_id,
                    function_id,
                    task_buffer,
                    function.container_uuid,
                    takes_batches(endpoints[endpoint_id].metadata),
                    containers.get(function.container_uuid) if function.container_uuid else None,
                    json.loads(resources) if resources else None,
                    json.loads(runtime) if runtime else None,
                )
            )
            results[index] = {"task_uuid": task_id, "http_status_code": 200}
        if new_tasks:
            usage = await self.context.usage(me.identity_id)
            self.context.quotas.check_tasks(
                usage, len(new_tasks), sum(text_size(t.payload) for t in new_tasks)
            )
            ids = [t.task_id for t in new_tasks]
            self.context.sender.reserve(ids)
            try:
                await self.context.storage.insert_tasks(new_tasks)
            except Exception:
                self.context.sender.release(ids)
                self.log.failure("Storing {n} new tasks failed", n=len(ids))
                raise storage_unavailable("could not store the tasks") from None
            # The tasks exist now: nothing below may turn into an error answer.
            try:
                if ws_queue is not None:
                    await self._ensure_result_queue(ws_queue)
                self.context.sender.send(to_send)
            except Exception:
                self.log.failure("Publishing new tasks failed; they will be sent again")
        return {"response": "batch", "task_group_id": task_group_id, "results": results}

    async def _submit_context(
        self, function_ids: List[str], endpoint_ids: List[str], identity: str
    ) -> SubmitContext:
        try:
            return await self.context.storage.submit_context(function_ids, endpoint_ids, identity)
        except Exception:
            self.log.failure("Reading the submit context failed")
            raise storage_unavailable("cannot read its database now") from None

    @staticmethod
    def _check_task(
        function_id: str,
        endpoint_id: str,
        functions: Dict[str, Any],
        endpoints: Dict[str, Endpoint],
        whitelists: Dict[str, List[str]],
        identity: str,
    ) -> Optional[Dict[str, Any]]:
        if function_id not in functions:
            return _refusal(404, "FUNCTION_NOT_FOUND", f"Function {function_id} not found")
        endpoint = endpoints.get(endpoint_id)
        if endpoint is None:
            return _refusal(404, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_id} not found")
        if endpoint.owner != identity:
            return _refusal(
                403,
                "ENDPOINT_FORBIDDEN",
                f"Endpoint {endpoint_id} belongs to another user; only its owner may "
                f"submit tasks to it",
            )
        if endpoint.deleted_at is not None:
            return _refusal(410, "ENDPOINT_DELETED", f"Endpoint {endpoint_id} was deleted")
        allowed = whitelists.get(endpoint_id)
        if allowed and function_id not in allowed:
            return _refusal(
                403,
                "FUNCTION_NOT_ALLOWED",
                f"Function {function_id} is not in the whitelist of endpoint {endpoint_id}",
            )
        if endpoint.allowed_functions is not None and function_id not in endpoint.allowed_functions:
            return _refusal(
                403,
                "FUNCTION_NOT_ALLOWED",
                f"Function {function_id} is not in the allowed_functions of endpoint {endpoint_id}",
            )
        return None

    async def _ensure_result_queue(self, queue: str) -> None:
        try:
            await self.context.broker.ensure_result_queue(queue, self.context.result_queue_ttl)
        except Exception as e:
            # The copies path declares it again before publishing into it.
            self.log.warn(
                "Could not declare result queue {queue} now: {error}", queue=queue, error=e
            )

    async def get_task(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        task_id = canonical_uuid(call.params["task_id"], "the task id")
        found = await self.context.storage.get_tasks([task_id], me.identity_id)
        if task_id not in found:
            raise not_found(f"Task {task_id} not found", "TASK_NOT_FOUND")
        await self._fetched(found)
        return 200, found[task_id]

    async def _fetched(self, found: Dict[str, Dict[str, Any]]) -> None:
        """Stamp the first fetch of finished tasks (their results expire sooner)."""
        done = [t for t, view in found.items() if view.get("status") in DONE_STATUSES]
        if not done:
            return
        try:
            await self.context.storage.run(mark_fetched, done, self.context.clock.seconds())
        except Exception:
            # The answer stands; the task then expires by its finish time only.
            self.log.failure("Recording the fetch of {n} results failed", n=len(done))

    async def delete_task(self, call: Call) -> Tuple[int, Any]:
        """Delete a finished task and its result (funcX deleted a result once fetched)."""
        me: TokenInfo = call.identity
        task_id = canonical_uuid(call.params["task_id"], "the task id")
        deleted = await self.context.storage.run(delete_finished_task, task_id, me.identity_id)
        if deleted is None:
            raise not_found(f"Task {task_id} not found", "TASK_NOT_FOUND")
        if not deleted:
            raise APIError(
                409,
                "TASK_NOT_FINISHED",
                f"Task {task_id} has not finished; only a finished task (and its result) "
                f"can be deleted",
            )
        return 200, {"task_id": task_id, "deleted": True}

    async def batch_status(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        canonical = task_ids_field(body, MAX_BATCH_STATUS_IDS)
        found = await self.context.storage.get_tasks(
            sorted(set(canonical.values())), me.identity_id
        )
        results = {asked: found[c] for asked, c in canonical.items() if c in found}
        await self._fetched(found)
        return 200, {"response": "batch", "results": results}

    async def get_task_group(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        task_group_id = canonical_uuid(call.params["task_group_id"], "the task group id")
        task_ids = await self.context.storage.task_group(task_group_id, me.identity_id)
        if not task_ids:
            raise not_found(f"Task group {task_group_id} not found", "TASK_GROUP_NOT_FOUND")
        return 200, {"taskgroup_id": task_group_id, "tasks": [{"id": t} for t in task_ids]}

    # -- result queues for FuncXExecutor --------------------------------------------

    async def result_connection_url(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        prefix = queue_prefix(me.identity_id)
        stored = await self.context.storage.get_user_broker(me.identity_id)
        if stored is None:
            stored = await self.context.storage.save_user_broker(
                me.identity_id, f"funcx-user-{me.identity_id}", secrets.token_urlsafe(24)
            )
        user, password = stored
        if me.identity_id not in self._provisioned_users:
            await self.context.broker_call(
                self.context.management.provision_user(user, password, prefix)
            )
            self._provisioned_users.add(me.identity_id)
        return 200, {
            "queue_prefix": prefix,
            "connection_url": self.context.broker_address.url(user, password),
        }
