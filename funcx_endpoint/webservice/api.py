"""The funcX REST API v2 (PROTOCOL.md section 2, and the funcX 1.0.13 notes).

Every handler checks its input fully before it changes anything, so a bad
request (malformed JSON, wrong types, bad UUIDs, unknown ids, another user's
objects) gets a 4xx answer and leaves no trace.  ``POST /submit`` decides
task by task: a refused task gets its own 4xx entry in the answer and the
others are created.  Once tasks are created the answer is 200 whatever
happens with the broker: tasks wait in the database until it takes them
(globus-sdk retries 5xx answers to POSTs, which would create the tasks again).

Another user's endpoints, tasks and task groups are answered 404 (their
existence is not even confirmed); registering an endpoint id that another
user owns, or submitting to one, is refused with 403.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import uuid
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from funcx_endpoint.amqp import topology
from funcx_endpoint.version import __version__
from funcx_endpoint.webservice.auth import API
from funcx_endpoint.webservice.broker import IServiceBroker
from funcx_endpoint.webservice.dispatch import TaskSender
from funcx_endpoint.webservice.http import (
    APIError,
    Call,
    Router,
    bad_request,
    not_found,
    utf8_encodable,
)
from funcx_endpoint.webservice.management import (
    BrokerUnavailable,
    IBrokerAdministrator,
    ManagementError,
)
from funcx_endpoint.webservice.storage import Endpoint, NewTask, Storage, TokenInfo, UnsentTask
from funcx_endpoint.wire import (
    MESSAGE_BATCHES,
    DeserializationError,
    pack_task_buffer,
    unpack_buffers,
)

__all__ = ["BrokerAddress", "FuncXAPI", "FUNCX_API_VERSION", "MAX_TASKS_PER_SUBMIT"]

#: The funcX API version this service speaks (what funcX 1.0.13 clients expect).
FUNCX_API_VERSION = "1.0.13"
MIN_SDK_VERSION = "1.0.0"
MIN_EP_VERSION = "1.0.0"
MAX_TASKS_PER_SUBMIT = 10_000
#: ``POST /batch_status`` ids per request (funcX 1.0.13's executor asks for 1024).
MAX_BATCH_STATUS_IDS = 4096
MAX_NAME = 256
MAX_TEXT = 64 * 1024
MAX_METADATA = 256 * 1024
_UUID_IN_TEXT = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_UUID_TEXT = r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}"
_QUOTED_ID = rf"""(?:'{_UUID_TEXT}'|"{_UUID_TEXT}")"""
#: ``['<uuid>', ...]`` or ``('<uuid>', ...)`` as funcX 1.0 endpoints send them (repr()).
_QUOTED_ID_LIST = re.compile(rf"\s*[\[(]\s*(?:{_QUOTED_ID}\s*,\s*)*(?:{_QUOTED_ID}\s*)?[\])]\s*\Z")
#: Longer allowed_functions strings that are not lists of quoted ids are refused.
_MAX_LITERAL = 4096
_TASK_GROUP_PREFIX = "taskgroup."


@attr.s(auto_attribs=True, frozen=True)
class BrokerAddress:
    """Where endpoints and clients reach the broker: ``amqps://host:port/vhost``."""

    scheme: str
    host: str
    port: int
    vhost: str

    def url(self, user: str, password: str) -> str:
        return (
            f"{self.scheme}://{quote(user, safe='')}:{quote(password, safe='')}@"
            f"{self.host}:{self.port}/{quote(self.vhost, safe='')}"
        )


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def canonical_uuid(value: Any, what: str, status: int = 400) -> str:
    """``value`` as a canonical (lower-case, hyphenated) UUID, or an APIError."""
    if isinstance(value, str) and _CANONICAL_UUID.match(value):
        return value  # the usual case, 20 times cheaper than parsing
    if isinstance(value, str) and len(value) <= 64:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise APIError(status, "INVALID_UUID", f"{what} must be a UUID, got {_show(value)}")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _string(
    body: Dict[str, Any], key: str, *, required: bool, max_length: int, allow_empty: bool = False
) -> Optional[str]:
    value = body.get(key)
    if value is None:
        if required:
            raise bad_request(f"{key} is required (a string)", "MISSING_FIELD")
        return None
    if not isinstance(value, str):
        raise bad_request(f"{key} must be a string, got {_show(value)}", "INVALID_TYPE")
    if not value and not allow_empty and required:
        raise APIError(422, "INVALID_VALUE", f"{key} must not be empty")
    if len(value) > max_length:
        raise APIError(422, "INVALID_VALUE", f"{key} is longer than {max_length} characters")
    if "\x00" in value:
        raise bad_request(f"{key} must not contain NUL characters", "INVALID_VALUE")
    if not utf8_encodable(value):
        raise bad_request(
            f"{key} is not valid Unicode text (it holds a lone surrogate)", "INVALID_TEXT"
        )
    return value


def _boolean(body: Dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{key} must be true or false, got {_show(value)}", "INVALID_TYPE")
    return value


def _number(value: Any) -> Optional[float]:
    """A positive finite number from metadata (funcX 1.0 sends repr() strings); else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def takes_batches(metadata: Dict[str, Any]) -> bool:
    """Whether the endpoint offered MESSAGE_BATCHES when it registered."""
    features = metadata.get("wire_features")
    return isinstance(features, list) and MESSAGE_BATCHES in features


def allowed_functions_of(metadata: Dict[str, Any]) -> Optional[List[str]]:
    """The function ids an endpoint says it allows (None: any); 422 if malformed.

    Our endpoint sends ``metadata.allowed_functions`` (a list); funcX 1.0
    endpoints send their config's attributes as repr() strings in
    ``metadata.config``, so ``"['uuid', ...]"`` and ``"None"`` are read too.
    """
    value = metadata.get("allowed_functions")
    config = metadata.get("config")
    if value is None and isinstance(config, dict):
        value = config.get("allowed_functions")
    if value is None or value == "None" or value == "":
        return None
    if isinstance(value, str):
        value = _parse_id_list(value)
    if not isinstance(value, (list, tuple)):
        raise APIError(
            422, "INVALID_VALUE", "metadata.allowed_functions must be a list of function ids"
        )
    return [canonical_uuid(v, "each of metadata.allowed_functions", 422) for v in value]


def _parse_id_list(text: str) -> Any:
    """A repr() string of function ids as a list, cheaply (this runs on the reactor thread).

    A list or tuple of quoted ids is read with a regular expression whatever its
    length; anything else only up to :data:`_MAX_LITERAL` characters, by
    ``ast.literal_eval`` (whose parser can exhaust memory or recursion on crafted
    text), falling back to the ids found in the text.
    """
    if _QUOTED_ID_LIST.match(text):
        return _UUID_IN_TEXT.findall(text)
    if len(text) > _MAX_LITERAL:
        raise APIError(
            422,
            "INVALID_VALUE",
            "metadata.allowed_functions must be a list of function ids (as a string it is "
            f"too long to read: {len(text)} characters and not a list of quoted ids)",
        )
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _UUID_IN_TEXT.findall(text)


def _heartbeat_settings(metadata: Dict[str, Any]) -> Tuple[Optional[float], Optional[float]]:
    found = metadata.get("config")
    config: Dict[str, Any] = found if isinstance(found, dict) else {}
    period = _number(metadata.get("heartbeat_period", config.get("heartbeat_period")))
    threshold = _number(metadata.get("heartbeat_threshold", config.get("heartbeat_threshold")))
    return period, threshold


def _refusal(status: int, code: str, reason: str) -> Dict[str, Any]:
    return {"task_uuid": None, "http_status_code": status, "code": code, "reason": reason}


class FuncXAPI:
    """The ``/v2`` handlers; :meth:`install` adds them to a router.

    ``clock`` (the reactor by default) stamps what is stored (functions,
    tasks, registrations, deletions) and decides liveness: an endpoint is
    online while its last status report is at most its heartbeat threshold
    old by this clock.  ``min_sdk_version`` is what ``GET /version`` asks of clients.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        storage: Storage,
        broker: IServiceBroker,
        management: IBrokerAdministrator,
        sender: TaskSender,
        broker_address: BrokerAddress,
        *,
        heartbeat_threshold: float = 120.0,
        result_queue_ttl: int = 7 * 24 * 3600,
        min_sdk_version: str = MIN_SDK_VERSION,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor if clock is None else clock
        self.min_sdk_version = min_sdk_version
        self.storage = storage
        self.broker = broker
        self.management = management
        self.sender = sender
        self.broker_address = broker_address
        self.heartbeat_threshold = heartbeat_threshold
        self.result_queue_ttl = result_queue_ttl
        self._provisioned_users: set[str] = set()

    def install(self, router: Router) -> None:
        eid = "(?P<endpoint_id>[^/]+)"
        for method, path, handler, audiences in (
            ("GET", "/v2/version", self.version, None),
            ("POST", "/v2/functions", self.register_function, API),
            ("POST", "/v2/submit", self.submit, API),
            ("GET", "/v2/tasks/(?P<task_id>[^/]+)", self.get_task, API),
            ("POST", "/v2/batch_status", self.batch_status, API),
            ("GET", "/v2/taskgroup/(?P<task_group_id>[^/]+)", self.get_task_group, API),
            ("POST", "/v2/endpoints", self.register_endpoint, API),
            ("GET", "/v2/endpoints", self.list_endpoints, API),
            ("GET", f"/v2/endpoints/{eid}", self.get_endpoint, API),
            ("DELETE", f"/v2/endpoints/{eid}", self.delete_endpoint, API),
            ("GET", f"/v2/endpoints/{eid}/status", self.endpoint_status, API),
            ("POST", f"/v2/endpoints/{eid}/lock", self.lock_endpoint, API),
            ("GET", f"/v2/endpoints/{eid}/whitelist", self.get_whitelist, API),
            ("POST", f"/v2/endpoints/{eid}/whitelist", self.add_to_whitelist, API),
            (
                "DELETE",
                f"/v2/endpoints/{eid}/whitelist/(?P<function_id>[^/]+)",
                self.remove_from_whitelist,
                API,
            ),
            ("GET", "/v2/get_amqp_result_connection_url", self.result_connection_url, API),
        ):
            router.add(method, path, handler, audiences)

    # -- version --------------------------------------------------------------------

    async def version(self, call: Call) -> Tuple[int, Any]:
        return 200, {
            "api": FUNCX_API_VERSION,
            "min_ep_version": MIN_EP_VERSION,
            "min_sdk_version": self.min_sdk_version,
            "service": "funcx-service",
            "service_version": __version__,
        }

    # -- functions ------------------------------------------------------------------

    async def register_function(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        name = _string(body, "function_name", required=True, max_length=MAX_NAME)
        code = _string(body, "function_code", required=True, max_length=1 << 31)
        assert name is not None and code is not None
        entry_point = _string(body, "entry_point", required=False, max_length=MAX_NAME) or name
        description = _string(body, "description", required=False, max_length=MAX_TEXT)
        container = body.get("container_uuid")
        container = None if container in (None, "") else canonical_uuid(container, "container_uuid")
        group = body.get("group")
        group = None if group in (None, "") else canonical_uuid(group, "group")
        public = _boolean(body, "public")
        try:
            parts = unpack_buffers(code)
        except DeserializationError as e:
            raise bad_request(
                f"function_code is not a packed buffer: {e}", "INVALID_FUNCTION"
            ) from None
        if len(parts) != 1 or not parts[0]:
            raise bad_request(
                f"function_code must be one packed part (the serialized function), "
                f"it holds {len(parts)}",
                "INVALID_FUNCTION",
            )
        function_id = str(uuid.uuid4())
        await self.storage.insert_function(
            {
                "function_id": function_id,
                "owner": me.identity_id,
                "name": name,
                "entry_point": entry_point,
                "description": description,
                "container_uuid": container,
                "public": public,
                "group_id": group,
                "function_code": code,
                "created": self.clock.seconds(),
            }
        )
        return 200, {"function_uuid": function_id}

    # -- tasks ----------------------------------------------------------------------

    async def submit(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        # Text is checked task by task (a payload that is not valid Unicode fails alone);
        # the other strings kept are UUIDs.
        body = await call.json_object(check_text=False)
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
        websocket = _boolean(body, "create_websocket_queue")
        ws_queue = self.queue_prefix(me.identity_id) + task_group_id if websocket else None

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
                        f"(3 strings), got {_show(item)}",
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
        functions, endpoints, whitelists = await self._submit_context(
            sorted({p[0] for p in wanted}), sorted({p[1] for p in wanted}), me.identity_id
        )

        # Second pass: each task against what exists.
        now = self.clock.seconds()
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
                )
            )
            results[index] = {"task_uuid": task_id, "http_status_code": 200}
        if new_tasks:
            ids = [t.task_id for t in new_tasks]
            self.sender.reserve(ids)
            try:
                await self.storage.insert_tasks(new_tasks)
            except Exception:
                self.sender.release(ids)
                self.log.failure("Storing {n} new tasks failed", n=len(ids))
                raise APIError(
                    503,
                    "STORAGE_UNAVAILABLE",
                    "the service could not store the tasks (nothing was created); try again",
                    headers={"Retry-After": "5"},
                ) from None
            # The tasks exist now: nothing below may turn into an error answer.
            try:
                if ws_queue is not None:
                    await self._ensure_result_queue(ws_queue)
                self.sender.send(to_send)
            except Exception:
                self.log.failure("Publishing new tasks failed; they will be sent again")
        return 200, {"response": "batch", "task_group_id": task_group_id, "results": results}

    async def _submit_context(
        self, function_ids: List[str], endpoint_ids: List[str], identity: str
    ) -> Any:
        try:
            return await self.storage.submit_context(function_ids, endpoint_ids, identity)
        except Exception:
            self.log.failure("Reading the submit context failed")
            raise APIError(
                503,
                "STORAGE_UNAVAILABLE",
                "the service cannot read its database now (nothing was created); try again",
                headers={"Retry-After": "5"},
            ) from None

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
            await self.broker.ensure_result_queue(queue, self.result_queue_ttl)
        except Exception as e:
            # The copies path declares it again before publishing into it.
            self.log.warn(
                "Could not declare result queue {queue} now: {error}", queue=queue, error=e
            )

    async def get_task(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        task_id = canonical_uuid(call.params["task_id"], "the task id")
        found = await self.storage.get_tasks([task_id], me.identity_id)
        if task_id not in found:
            raise not_found(f"Task {task_id} not found", "TASK_NOT_FOUND")
        return 200, found[task_id]

    async def batch_status(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        task_ids = body.get("task_ids")
        if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
            raise bad_request("task_ids must be a list of task id strings", "INVALID_TYPE")
        if len(task_ids) > MAX_BATCH_STATUS_IDS:
            raise bad_request(
                f"at most {MAX_BATCH_STATUS_IDS} task ids per request, got {len(task_ids)}",
                "TOO_MANY_IDS",
            )
        canonical = {}
        for task_id in task_ids:
            canonical[task_id] = canonical_uuid(task_id, "each of task_ids")
        found = await self.storage.get_tasks(sorted(set(canonical.values())), me.identity_id)
        results = {asked: found[c] for asked, c in canonical.items() if c in found}
        return 200, {"response": "batch", "results": results}

    async def get_task_group(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        task_group_id = canonical_uuid(call.params["task_group_id"], "the task group id")
        task_ids = await self.storage.task_group(task_group_id, me.identity_id)
        if not task_ids:
            raise not_found(f"Task group {task_group_id} not found", "TASK_GROUP_NOT_FOUND")
        return 200, {"taskgroup_id": task_group_id, "tasks": [{"id": t} for t in task_ids]}

    # -- result queues for FuncXExecutor --------------------------------------------

    @staticmethod
    def queue_prefix(identity_id: str) -> str:
        return f"{_TASK_GROUP_PREFIX}{identity_id}."

    async def result_connection_url(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        prefix = self.queue_prefix(me.identity_id)
        stored = await self.storage.get_user_broker(me.identity_id)
        if stored is None:
            stored = await self.storage.save_user_broker(
                me.identity_id, f"funcx-user-{me.identity_id}", secrets.token_urlsafe(24)
            )
        user, password = stored
        if me.identity_id not in self._provisioned_users:
            await self._broker_call(self.management.provision_user(user, password, prefix))
            self._provisioned_users.add(me.identity_id)
        return 200, {
            "queue_prefix": prefix,
            "connection_url": self.broker_address.url(user, password),
        }

    # -- endpoints ------------------------------------------------------------------

    async def _broker_call(self, operation: Any) -> Any:
        try:
            return await operation
        except BrokerUnavailable as e:
            raise APIError(
                503,
                "BROKER_UNAVAILABLE",
                f"the message broker cannot be reached now ({e}); try again in a moment",
                headers={"Retry-After": "5"},
            ) from None
        except ManagementError as e:
            self.log.error("The broker's management API refused a request: {error}", error=e)
            raise APIError(
                500,
                "BROKER_PROVISIONING_FAILED",
                "the service could not set up broker access; the operator should check "
                "that the service's broker user is an administrator (see the service log)",
            ) from None

    async def _own_endpoint(self, call: Call, allow_deleted: bool = False) -> Endpoint:
        me: TokenInfo = call.identity
        endpoint_id = canonical_uuid(call.params["endpoint_id"], "the endpoint id")
        endpoint = await self.storage.get_endpoint(endpoint_id)
        if endpoint is None or endpoint.owner != me.identity_id:
            raise not_found(f"Endpoint {endpoint_id} not found", "ENDPOINT_NOT_FOUND")
        if endpoint.deleted_at is not None and not allow_deleted:
            raise APIError(410, "ENDPOINT_DELETED", f"Endpoint {endpoint_id} was deleted")
        return endpoint

    async def status_of(self, endpoint: Endpoint) -> str:
        status, check = endpoint.liveness(self.clock.seconds(), self.heartbeat_threshold)
        if check:
            consumers = await self.broker.task_queue_consumers(endpoint.endpoint_id)
            if consumers:
                # The final report came from an instance that could not start (or
                # one still letting go): an instance holds the task queue.
                status = "online"
        return status

    def endpoint_view(self, endpoint: Endpoint, status: str, full: bool = True) -> Dict[str, Any]:
        metadata = endpoint.metadata
        view: Dict[str, Any] = {
            "endpoint_id": endpoint.endpoint_id,
            "endpoint_name": endpoint.name,
            "status": status,
            "locked": endpoint.locked,
            "created": endpoint.created,
            "registered_at": endpoint.registered_at,
            "last_seen": endpoint.last_report_at,
            "hostname": metadata.get("hostname"),
            "endpoint_version": metadata.get("endpoint_version"),
        }
        if full:
            view.update(
                {
                    "registrations": endpoint.registrations,
                    "ip_address": endpoint.ip_address,
                    "allowed_functions": endpoint.allowed_functions,
                    "heartbeat_period": endpoint.heartbeat_period,
                    "heartbeat_threshold": endpoint.threshold(self.heartbeat_threshold),
                    "metadata": metadata,
                }
            )
        return view

    async def register_endpoint(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        name = _string(body, "endpoint_name", required=True, max_length=MAX_NAME)
        assert name is not None
        raw_id = body.get("endpoint_uuid")
        endpoint_id = (
            str(uuid.uuid4()) if raw_id in (None, "") else canonical_uuid(raw_id, "endpoint_uuid")
        )
        metadata = body.get("metadata")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise bad_request(f"metadata must be an object, got {_show(metadata)}", "INVALID_TYPE")
        if len(json.dumps(metadata)) > MAX_METADATA:
            raise APIError(422, "INVALID_VALUE", f"metadata is larger than {MAX_METADATA} bytes")
        allowed = allowed_functions_of(metadata)
        period, threshold = _heartbeat_settings(metadata)

        batches = takes_batches(metadata)
        existing = await self.storage.get_endpoint(endpoint_id)
        if existing is not None:
            if existing.owner != me.identity_id:
                raise APIError(
                    403,
                    "ENDPOINT_FORBIDDEN",
                    f"Endpoint {endpoint_id} is registered by another user; use another "
                    f"endpoint id (remove endpoint.json to get a new one)",
                )
            if existing.deleted_at is not None:
                raise APIError(
                    410,
                    "ENDPOINT_DELETED",
                    f"Endpoint {endpoint_id} was deleted; register under a new id "
                    f"(remove its endpoint.json)",
                )
            if existing.locked and await self.storage.consume_lock(endpoint_id):
                self.log.info("Refused locked endpoint {eid}; lock consumed", eid=endpoint_id)
                raise APIError(
                    423,
                    "ENDPOINT_LOCKED",
                    f"Endpoint {endpoint_id} was stopped remotely (locked); this registration "
                    f"is refused and the lock is cleared: start it again to run it",
                )
        consumers = await self._broker_call(self.broker.declare_task_queue(endpoint_id))
        if consumers:
            raise APIError(
                409,
                "ENDPOINT_ALREADY_RUNNING",
                f"Endpoint {endpoint_id} is already running: its task queue has "
                f"{consumers} consumer(s). Stop the other instance first "
                f"(funcx-endpoint stop), or wait a few seconds if it just stopped",
            )
        # Claim (or update) the row first and provision the broker user only once the
        # row is ours: of two users registering the same new id at once, the loser
        # must not replace the winner's broker password.  A new row keeps these
        # credentials; an existing one keeps its own.
        saved = await self.storage.save_registration(
            endpoint_id,
            me.identity_id,
            name,
            metadata,
            allowed,
            period,
            threshold,
            f"funcx-ep-{endpoint_id}",
            secrets.token_urlsafe(24),
            call.client_ip(),
            self.clock.seconds(),
        )
        if saved is None:
            # Another user (or a delete) won a race with this registration.
            raise APIError(
                403, "ENDPOINT_FORBIDDEN", f"Endpoint {endpoint_id} is registered by another user"
            )
        user, password = saved.broker_user, saved.broker_password
        await self._broker_call(self.management.provision_endpoint(user, password, endpoint_id))
        if existing is not None and takes_batches(existing.metadata) and not batches:
            # This start cannot read several tasks to a message (an older version):
            # what was sent so to its queue is sent again, one task per message.
            again = await self.storage.send_unfinished_again(endpoint_id)
            if again:
                self.log.info(
                    "Endpoint {eid} no longer takes task batches: {n} unfinished tasks "
                    "will be sent again one per message",
                    eid=endpoint_id,
                    n=again,
                )
        self.log.info(
            "Registered endpoint {eid} ({name}) for {who} from {ip}",
            eid=endpoint_id,
            name=name,
            who=me.identity_id,
            ip=call.client_ip(),
        )
        url = self.broker_address.url(user, password)
        answer = {
            "endpoint_id": endpoint_id,
            **topology.registration_queue_info(endpoint_id, url, url),
        }
        if batches:
            answer["wire_features"] = [MESSAGE_BATCHES]
        return 200, answer

    async def list_endpoints(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        endpoints = await self.storage.list_endpoints(me.identity_id)
        return 200, [self.endpoint_view(e, await self.status_of(e), full=False) for e in endpoints]

    async def get_endpoint(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        view = self.endpoint_view(endpoint, await self.status_of(endpoint))
        view["whitelist"] = await self.storage.get_whitelist(endpoint.endpoint_id)
        return 200, view

    async def endpoint_status(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        return 200, {
            "endpoint_id": endpoint.endpoint_id,
            "status": await self.status_of(endpoint),
            "last_seen": endpoint.last_report_at,
            "heartbeat_threshold": endpoint.threshold(self.heartbeat_threshold),
            "logs": endpoint.recent_reports,
        }

    async def lock_endpoint(self, call: Call) -> Tuple[int, Any]:
        await call.json_body(required=False)  # {} from the SDK; malformed JSON is refused
        endpoint = await self._own_endpoint(call)
        await self.storage.lock_endpoint(endpoint.endpoint_id)
        self.log.info("Endpoint {eid} locked (stopped remotely)", eid=endpoint.endpoint_id)
        return 200, {"endpoint_id": endpoint.endpoint_id, "locked": True}

    async def delete_endpoint(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        endpoint_id = endpoint.endpoint_id
        failed = await self.storage.delete_endpoint(
            endpoint_id,
            self.clock.seconds(),
            f"EndpointDeleted: endpoint {endpoint_id} was deleted before this task ran",
        )
        self.sender.kick()
        try:
            await self.broker.delete_queue(topology.task_queue(endpoint_id))
        except Exception as e:
            self.log.warn("Could not delete the task queue of {eid}: {e}", eid=endpoint_id, e=e)
        try:
            await self.management.delete_user(endpoint.broker_user)
        except Exception as e:
            self.log.warn("Could not delete broker user of {eid}: {e}", eid=endpoint_id, e=e)
        self.log.info(
            "Deleted endpoint {eid} ({n} unfinished task(s) failed)", eid=endpoint_id, n=failed
        )
        return 200, {"endpoint_id": endpoint_id, "deleted": True, "tasks_failed": failed}

    async def get_whitelist(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        functions = await self.storage.get_whitelist(endpoint.endpoint_id)
        return 200, {"endpoint_id": endpoint.endpoint_id, "functions": functions}

    async def add_to_whitelist(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        endpoint = await self._own_endpoint(call)
        raw = body.get("func")
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise bad_request("func must be a non-empty list of function ids", "INVALID_TYPE")
        function_ids = [canonical_uuid(f, "each of func") for f in raw]
        visible = await self.storage.visible_functions(function_ids, me.identity_id)
        missing = [f for f in function_ids if f not in visible]
        if missing:
            raise not_found(f"Function {missing[0]} not found", "FUNCTION_NOT_FOUND")
        await self.storage.add_to_whitelist(endpoint.endpoint_id, sorted(set(function_ids)))
        functions = await self.storage.get_whitelist(endpoint.endpoint_id)
        return 200, {"endpoint_id": endpoint.endpoint_id, "functions": functions}

    async def remove_from_whitelist(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        function_id = canonical_uuid(call.params["function_id"], "the function id")
        if not await self.storage.remove_from_whitelist(endpoint.endpoint_id, function_id):
            raise not_found(
                f"Function {function_id} is not in the whitelist of endpoint "
                f"{endpoint.endpoint_id}",
                "FUNCTION_NOT_FOUND",
            )
        functions = await self.storage.get_whitelist(endpoint.endpoint_id)
        return 200, {"endpoint_id": endpoint.endpoint_id, "functions": functions}
