"""FuncXClient: the funcX 1.0 web service API, on globus-sdk's BaseClient.

The client is blocking (it is a globus-sdk client, built on ``requests``):
call it from a thread (``deferToThread``) inside a reactor.  It is safe to
share one client between threads, as :class:`FuncXExecutor
<funcx_endpoint.sdk.executor.FuncXExecutor>` does.

Where things come from:

* The service URL: the ``funcx_service_address`` argument, else
  ``FUNCX_SERVICE_ADDRESS``, else the URL of the ``environment`` argument (or
  ``FUNCX_SDK_ENVIRONMENT``) if one is named, else the public
  ``https://api2.funcx.org/v2``.
* The CA to verify the service (and the auth service) with: the ``ca_file``
  argument, else ``FUNCX_SERVICE_CA_FILE``, else globus-sdk's own
  ``GLOBUS_SDK_VERIFY_SSL``, else the system CAs.
* The token: the ``authorizer`` argument, else a client-credentials login
  from ``FUNCX_SDK_CLIENT_ID`` / ``FUNCX_SDK_CLIENT_SECRET``
  (:mod:`funcx_endpoint.sdk.login`).

Retries: every request is retried as globus-sdk does, except that a submit
is retried only when the service cannot have acted on it, and a certificate
verification failure never (:mod:`funcx_endpoint.sdk.retries` says why).
"""

from __future__ import annotations

import os
import re
import uuid
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import quote

import globus_sdk

from funcx_endpoint.environments import DEFAULT_SERVICE_ADDRESS, ENVIRONMENT_ADDRESSES
from funcx_endpoint.sdk.environment import EnvironmentCheck
from funcx_endpoint.sdk.errors import (
    BatchSubmissionError,
    FuncxAPIError,
    MalformedResponse,
    TaskPending,
    TaskRefused,
    VersionMismatch,
)
from funcx_endpoint.sdk.login import client_credentials_authorizer, transport_arguments
from funcx_endpoint.sdk.retries import (
    RETRY_CHECKS,
    submit_retry_check,
    tls_verification_retry_check,
)
from funcx_endpoint.sdk.tasks import Batch, TaskCache, TaskRecord, canonical_uuid, task_record
from funcx_endpoint.version import __version__
from funcx_endpoint.wire import pack_function
from funcx_endpoint.wire.runtime import local_runtime

# Batch, task_record and the retry checks were defined here: SDK users may import them from here.
__all__ = [
    "CA_FILE_ENV",
    "DEFAULT_SERVICE_ADDRESS",
    "ENVIRONMENT_ADDRESSES",
    "ENVIRONMENT_ENV",
    "FUNCX_API_VERSION",
    "MAX_BATCH_STATUS_IDS",
    "SERVICE_ADDRESS_ENV",
    "Batch",
    "FuncXClient",
    "submit_retry_check",
    "task_record",
    "tls_verification_retry_check",
]

#: The environment variable naming the service URL (ends in ``/v2``).
SERVICE_ADDRESS_ENV = "FUNCX_SERVICE_ADDRESS"
#: The environment variable naming a CA file to verify the service with.
CA_FILE_ENV = "FUNCX_SERVICE_CA_FILE"
#: The environment variable naming a funcX environment (as funcX 1.0 had).
ENVIRONMENT_ENV = "FUNCX_SDK_ENVIRONMENT"
#: The funcX API (SDK) version this client speaks; compared with the
#: service's ``min_sdk_version``.
FUNCX_API_VERSION = "1.0.13"
#: The most task ids asked for in one ``POST /batch_status``.
MAX_BATCH_STATUS_IDS = 1000


# ---------------------------------------------------------------------------
# Helpers


def _version_tuple(version: str) -> Tuple[int, ...]:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(version))
    if match is None:
        raise MalformedResponse(f"the service sent an unreadable version {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _version_at_least(version: str, minimum: str) -> bool:
    mine, theirs = _version_tuple(version), _version_tuple(minimum)
    width = max(len(mine), len(theirs))
    return mine + (0,) * (width - len(mine)) >= theirs + (0,) * (width - len(theirs))


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _data(response: globus_sdk.GlobusHTTPResponse) -> Any:
    return response.data


def _dict_data(response: globus_sdk.GlobusHTTPResponse, call: str) -> Dict[str, Any]:
    data = response.data
    if not isinstance(data, dict):
        raise MalformedResponse(f"{call}: expected a JSON object, got {type(data).__name__}")
    return data


def _answer(response: globus_sdk.GlobusHTTPResponse, call: str, key: str, kind: type) -> Any:
    """``key`` of the JSON object ``response`` holds, which must be a ``kind``
    (:class:`MalformedResponse` naming ``call`` otherwise)."""
    value = _dict_data(response, call).get(key)
    if not isinstance(value, kind):
        what = f"{key} object" if kind is dict else key
        raise MalformedResponse(f"{call}: the answer has no {what}")
    return value


# ---------------------------------------------------------------------------
# The client


def _service_address(address: Optional[str], environment: Optional[str]) -> str:
    if address:
        return address.rstrip("/")
    from_env = os.environ.get(SERVICE_ADDRESS_ENV)
    if from_env:
        return from_env.rstrip("/")
    name = environment or os.environ.get(ENVIRONMENT_ENV)
    if not name:
        return DEFAULT_SERVICE_ADDRESS
    try:
        return ENVIRONMENT_ADDRESSES[name]
    except KeyError:
        raise ValueError(
            f"unknown funcX environment {name!r} (known: {', '.join(ENVIRONMENT_ADDRESSES)}); "
            f"give the service URL with funcx_service_address or {SERVICE_ADDRESS_ENV}"
        ) from None


class FuncXClient(globus_sdk.BaseClient):
    """A client of the funcX 1.0 web service (REST API at a URL ending in ``/v2``).

    ``funcx_service_address``, ``ca_file``, ``environment`` and the login are
    resolved as the module documentation says.  ``http_timeout`` is in
    seconds (None: globus-sdk's ``GLOBUS_SDK_HTTP_TIMEOUT``, else 60).
    ``task_group_id`` is the session task group of :meth:`run` and
    :meth:`create_batch` (a new one by default).  ``do_version_check`` calls
    :meth:`version_check` now, as funcX 1.0 did.  Other keyword arguments go
    to globus-sdk's ``BaseClient``: with globus-sdk 4 ``transport`` (used
    as is, so ``ca_file`` and ``http_timeout`` do not apply to it) and
    ``retry_config``; with globus-sdk 3 ``transport_params`` (merged with
    the CA, timeout and retry checks set here).
    """

    service_name = "funcx"
    error_class = FuncxAPIError

    def __init__(
        self,
        funcx_service_address: Optional[str] = None,
        *,
        authorizer: Optional[globus_sdk.authorizers.GlobusAuthorizer] = None,
        ca_file: Optional[str] = None,
        http_timeout: Optional[float] = None,
        environment: Optional[str] = None,
        task_group_id: Optional[str] = None,
        do_version_check: bool = False,
        app_name: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        base_url = _service_address(funcx_service_address, environment)
        ca_file = ca_file or os.environ.get(CA_FILE_ENV) or None
        if ca_file is not None and not os.path.isfile(ca_file):
            raise ValueError(f"the CA file {ca_file!r} does not exist")
        verify_ssl: Union[str, None] = ca_file
        self._owned_clients: List[globus_sdk.BaseClient] = []
        if authorizer is None:
            authorizer = client_credentials_authorizer(
                verify_ssl=verify_ssl, http_timeout=http_timeout
            )
            self._owned_clients.append(authorizer.confidential_client)
        self._owns_transport = "transport" not in kwargs
        if self._owns_transport:
            transport_params = kwargs.pop("transport_params", None)
            kwargs.update(
                transport_arguments(verify_ssl, http_timeout, RETRY_CHECKS, transport_params)
            )
        super().__init__(
            base_url=base_url,
            authorizer=authorizer,
            app_name=app_name or f"funcx-sdk-{FUNCX_API_VERSION} funcx-endpoint-{__version__}",
            **kwargs,
        )
        self.funcx_service_address = base_url
        self.session_task_group_id = (
            canonical_uuid(task_group_id, "task_group_id") if task_group_id else str(uuid.uuid4())
        )
        self._finished = TaskCache()
        #: The Python and dill versions announced with each task (the
        #: endpoint's workers check them before loading it); this
        #: interpreter's by default.
        self.user_runtime: Dict[str, str] = local_runtime()
        self._environment = EnvironmentCheck()
        if do_version_check:
            self.version_check()

    def _register_standard_retry_checks(self, retry_config: Any) -> None:
        # globus-sdk 4 calls this while constructing; 3.x gets the checks
        # through transport_params instead.
        retry_config.checks.register_many_checks(RETRY_CHECKS)
        super()._register_standard_retry_checks(retry_config)

    def close(self) -> None:
        """Close the HTTP sessions this client made (its own and its login's)."""
        for client in self._owned_clients:
            client.transport.session.close()
        if self._owns_transport:
            self.transport.session.close()
        base_close = getattr(super(), "close", None)  # globus-sdk 4 only
        if base_close is not None:
            base_close()

    # -- service --------------------------------------------------------------

    def version_check(self) -> Dict[str, Any]:
        """``GET /version?service=all``; raises VersionMismatch if this SDK is too old.

        Returns the answer: ``{"api", "min_ep_version", "min_sdk_version"}``.
        """
        data = _dict_data(self.get("version", query_params={"service": "all"}), "version")
        minimum = data.get("min_sdk_version")
        if minimum is None or "min_ep_version" not in data:
            raise MalformedResponse("version: the answer lacks min_sdk_version or min_ep_version")
        if not _version_at_least(FUNCX_API_VERSION, str(minimum)):
            raise VersionMismatch(FUNCX_API_VERSION, str(minimum))
        return data

    # -- functions ------------------------------------------------------------

    def register_function(
        self,
        function: Callable[..., Any],
        function_name: Optional[str] = None,
        container_uuid: Optional[str] = None,
        description: Optional[str] = None,
        public: bool = False,
        group: Optional[str] = None,
    ) -> str:
        """Register ``function`` (``POST /functions``); its function id.

        With ``container_uuid`` (from :meth:`register_container`) its tasks run
        in that container.  Raises SerializationError if the function cannot
        be serialized.
        """
        name = function_name or getattr(function, "__name__", None) or type(function).__name__
        body = {
            "function_name": name,
            "function_code": pack_function(function),
            "entry_point": name,
            "container_uuid": (
                canonical_uuid(container_uuid, "container_uuid") if container_uuid else None
            ),
            "description": description,
            "public": bool(public),
            "group": canonical_uuid(group, "group") if group else None,
        }
        response = self.post("functions", data=body)
        function_id: str = _answer(response, "register_function", "function_uuid", str)
        return function_id

    # -- containers -----------------------------------------------------------

    def register_container(
        self,
        location: str,
        container_type: str,
        name: str = "",
        description: str = "",
        *,
        public: bool = False,
    ) -> str:
        """Register a container image (``POST /containers``); the new container's id.

        ``location`` is where an endpoint finds the image (a registry reference
        such as ``python:3.11``, or a path); ``container_type`` one of
        ``docker``, ``singularity``, ``shifter``, ``podman``, ``apptainer``.
        Pass the id to :meth:`register_function` (``container_uuid``) to run
        that function in it.  ``public`` (this service's addition) lets other
        users use it too.
        """
        body: Dict[str, Any] = {
            "name": name,
            "location": location,
            "description": description,
            "type": container_type,
        }
        if public:
            body["public"] = True
        response = self.post("containers", data=body)
        container_id: str = _answer(response, "register_container", "container_id", str)
        return container_id

    def get_container(
        self, container_uuid: str, container_type: Optional[str] = None
    ) -> Dict[str, Any]:
        """A container as the service has it (``GET /containers/<id>/<type>``).

        With a ``container_type``: its image of that type, as funcX 1.0 gave
        it (``container_uuid``, ``name``, ``type``, ``location``,
        ``build_status``...; 404 if it has none).  Without (this service's
        addition): the container with all its ``images``.
        """
        path = f"containers/{canonical_uuid(container_uuid, 'container_uuid')}"
        if container_type is not None:
            path += "/" + quote(container_type, safe="")
        container: Dict[str, Any] = _answer(self.get(path), "get_container", "container", dict)
        return container

    def add_container_image(
        self, container_uuid: str, location: str, container_type: str
    ) -> Dict[str, Any]:
        """Give a container of yours an image of another type, or move the one it has
        (``PUT /containers/<id>/<type>``, this service's addition); the image as
        :meth:`get_container` gives it.  Functions registered with the container
        run in it on endpoints of either type."""
        path = (
            f"containers/{canonical_uuid(container_uuid, 'container_uuid')}/"
            f"{quote(container_type, safe='')}"
        )
        response = self.put(path, data={"location": location})
        container: Dict[str, Any] = _answer(response, "add_container_image", "container", dict)
        return container

    # -- tasks ----------------------------------------------------------------

    def create_batch(
        self,
        task_group_id: Optional[str] = None,
        resource_specification: Optional[Dict[str, int]] = None,
    ) -> Batch:
        """An empty :class:`Batch` in ``task_group_id`` (default: the session's),
        its tasks asking for ``resource_specification`` (MPI nodes and ranks)."""
        return Batch(
            task_group_id or self.session_task_group_id,
            resource_specification=resource_specification,
        )

    def batch_run(self, batch: Batch) -> List[str]:
        """Submit ``batch`` (``POST /submit``); the task ids, in the batch's order.

        If the service refuses some tasks, raises :class:`BatchSubmissionError`
        naming each refused task's index and reason and carrying the ids of
        the tasks that were created.
        """
        if not len(batch):
            return []
        body = batch.prepare(self.session_task_group_id)
        if self.user_runtime:
            body.setdefault("user_runtime", dict(self.user_runtime))
        data = _dict_data(self.post("submit", data=body), "submit")
        results = data.get("results")
        if not isinstance(results, list) or len(results) != len(batch):
            raise MalformedResponse(
                f"submit: expected a list of {len(batch)} results, got {results!r:.200}"
            )
        task_ids: List[Optional[str]] = []
        failures: List[TaskRefused] = []
        for index, item in enumerate(results):
            item = item if isinstance(item, dict) else {}
            try:
                status = int(item.get("http_status_code") or 200)
            except (TypeError, ValueError):
                status = 500
            task_id = item.get("task_uuid")
            if 200 <= status < 300 and isinstance(task_id, str):
                task_ids.append(task_id)
                continue
            reason = item.get("reason") or item.get("message") or "no reason given"
            if 200 <= status < 300:
                status, reason = 500, "the service returned no task id"
            task_ids.append(None)
            failures.append(TaskRefused(index, status, str(reason)))
        if failures:
            raise BatchSubmissionError(task_ids, failures)
        return [task_id for task_id in task_ids if task_id is not None]

    def run(self, *args: Any, endpoint_id: str, function_id: str, **kwargs: Any) -> str:
        """Run ``function_id`` on ``endpoint_id`` with these arguments; the task id.

        Raises :class:`TaskRefused` if the service refuses the task.
        """
        batch = self.create_batch()
        batch.add(*args, endpoint_id=endpoint_id, function_id=function_id, **kwargs)
        try:
            return self.batch_run(batch)[0]
        except BatchSubmissionError as error:
            raise error.failures[0] from error

    def get_task(self, task_id: str) -> TaskRecord:
        """What is known of a task (``GET /tasks/<id>``), as :func:`task_record` says.

        A finished task is remembered and not asked for again.
        """
        cached = self._finished.get(task_id)
        if cached is not None:
            return cached
        path = f"tasks/{canonical_uuid(task_id, 'task_id')}"
        record = task_record(task_id, _dict_data(self.get(path), "get_task"))
        self._environment.check(record, self.user_runtime)
        self._finished.remember(record)
        return dict(record)

    def get_result(self, task_id: str) -> Any:
        """The result of a task.

        Raises :class:`TaskPending` if it is not done, and the task's error
        (:class:`TaskExecutionFailed` with the remote traceback) if it failed.
        """
        record = self.get_task(task_id)
        if record["pending"]:
            raise TaskPending(task_id, record["status"])
        if "exception" in record:
            raise record["exception"].with_traceback(None)
        return record["result"]

    def get_batch_result(self, task_ids: Iterable[str]) -> Dict[str, TaskRecord]:
        """What is known of many tasks (``POST /batch_status``), keyed by task id.

        Records are as :func:`task_record` says; failed tasks are included
        with their ``exception``.  Ids are asked for at most
        :data:`MAX_BATCH_STATUS_IDS` per request, and finished tasks only
        once.  Ids the service does not report are left out.
        """
        wanted = list(dict.fromkeys(task_ids))
        answer: Dict[str, TaskRecord] = {}
        missing = []
        for task_id in wanted:
            cached = self._finished.get(task_id)
            if cached is None:
                missing.append(task_id)
            else:
                answer[task_id] = cached
        for task_id, record in self.fetch_task_records(missing).items():
            self._finished.remember(record)
            answer[task_id] = dict(record)
        return {task_id: answer[task_id] for task_id in wanted if task_id in answer}

    def fetch_task_records(self, task_ids: Sequence[str]) -> Dict[str, TaskRecord]:
        """Ask the service about ``task_ids`` now, bypassing the result cache.

        Like :meth:`get_batch_result` but nothing is remembered, so a caller
        that keeps the results elsewhere (the executor's futures) does not
        keep them twice.
        """
        records: Dict[str, TaskRecord] = {}
        for task_id, value in self._batch_answers("batch_status", task_ids, "batch"):
            records[task_id] = record = task_record(task_id, value)
            self._environment.check(record, self.user_runtime)
        return records

    def _batch_answers(
        self, path: str, task_ids: Iterable[str], what: str
    ) -> Iterator[Tuple[str, Dict[str, Any]]]:
        """``POST /path`` with ``task_ids`` (as many requests as it takes); the
        answer's ``results``: each task id (as asked) and its object."""
        by_canonical = {canonical_uuid(task_id, "task_id"): task_id for task_id in task_ids}
        for chunk in _chunks(list(by_canonical), MAX_BATCH_STATUS_IDS):
            data = _dict_data(self.post(path, data={"task_ids": list(chunk)}), what)
            results = data.get("results")
            if not isinstance(results, dict):
                raise MalformedResponse(f"{path}: the answer has no results object")
            for key, value in results.items():
                try:
                    task_id = by_canonical.get(canonical_uuid(key, "task_id"))
                except ValueError:
                    continue
                if task_id is not None and isinstance(value, dict):
                    yield task_id, value

    def cancel(self, task_id: str) -> bool:
        """Cancel a task (``POST /tasks/<id>/cancel``); whether it was cancelled now.

        A cancelled task ends with :class:`TaskCancelled` (status ``cancelled``);
        the endpoint drops it if it is queued there, or kills its worker if it
        runs.  False if it had finished already: the first of its result and
        the cancel wins.
        """
        path = f"tasks/{canonical_uuid(task_id, 'task_id')}/cancel"
        answer = _dict_data(self.post(path, data={}), "cancel")
        return bool(answer.get("cancelled"))

    def cancel_batch(self, task_ids: Iterable[str]) -> Dict[str, bool]:
        """Cancel many tasks (``POST /batch_cancel``); for each task id known to the
        service, whether it was cancelled now (see :meth:`cancel`)."""
        answers = self._batch_answers("batch_cancel", task_ids, "cancel")
        return {task_id: bool(value.get("cancelled")) for task_id, value in answers}

    def get_taskgroup_tasks(self, task_group_id: str) -> List[Dict[str, Any]]:
        """The tasks of a task group (``GET /taskgroup/<id>``): ``[{"id": ...}, ...]``."""
        canonical = canonical_uuid(task_group_id, "task_group_id")
        data = _dict_data(self.get(f"taskgroup/{canonical}"), "get_taskgroup_tasks")
        answered = data.get("taskgroup_id")
        if answered is not None and canonical_uuid(answered, "taskgroup_id") != canonical:
            raise MalformedResponse(
                f"get_taskgroup_tasks: asked for {canonical}, the service answered {answered}"
            )
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            raise MalformedResponse("get_taskgroup_tasks: the answer has no tasks list")
        return tasks

    # -- endpoints ------------------------------------------------------------

    def _endpoint_path(self, endpoint_id: str, *rest: str) -> str:
        return "/".join(["endpoints", canonical_uuid(endpoint_id, "endpoint_id"), *rest])

    def get_endpoints(self) -> Any:
        """The caller's endpoints (``GET /endpoints``), as the service gives them."""
        return _data(self.get("endpoints"))

    def get_endpoint_metadata(self, endpoint_id: str) -> Any:
        """An endpoint's metadata (``GET /endpoints/<id>``), as the service gives it."""
        return _data(self.get(self._endpoint_path(endpoint_id)))

    def get_endpoint_status(self, endpoint_id: str) -> Any:
        """An endpoint's status (``GET /endpoints/<id>/status``): ``{"status", "logs"}``."""
        return _data(self.get(self._endpoint_path(endpoint_id, "status")))

    def stop_endpoint(self, endpoint_id: str) -> Any:
        """Stop an endpoint remotely (``POST /endpoints/<id>/lock``).

        A running endpoint of this project drains and exits (``stop_sent`` in
        the answer), and the service refuses to register it until its owner
        starts it again on its host (that start is refused once more, which
        clears the lock); a funcX 1.0 endpoint's next registration is refused
        once."""
        return _data(self.post(self._endpoint_path(endpoint_id, "lock"), data={}))

    def delete_endpoint(self, endpoint_id: str) -> Any:
        """Delete an endpoint (``DELETE /endpoints/<id>``)."""
        return _data(self.delete(self._endpoint_path(endpoint_id)))

    def get_whitelist(self, endpoint_id: str) -> Any:
        """The functions an endpoint allows (``GET /endpoints/<id>/whitelist``)."""
        return _data(self.get(self._endpoint_path(endpoint_id, "whitelist")))

    def add_to_whitelist(self, endpoint_id: str, function_ids: Union[str, Iterable[str]]) -> Any:
        """Allow functions on an endpoint (``POST /endpoints/<id>/whitelist``)."""
        ids = [function_ids] if isinstance(function_ids, str) else list(function_ids)
        body = {"func": [canonical_uuid(f, "function_id") for f in ids]}
        return _data(self.post(self._endpoint_path(endpoint_id, "whitelist"), data=body))

    def delete_from_whitelist(
        self, endpoint_id: str, function_ids: Union[str, Iterable[str]]
    ) -> List[Any]:
        """Disallow functions (one ``DELETE /endpoints/<id>/whitelist/<fn>`` each)."""
        ids = [function_ids] if isinstance(function_ids, str) else list(function_ids)
        return [
            _data(
                self.delete(
                    self._endpoint_path(endpoint_id, "whitelist", canonical_uuid(f, "function_id"))
                )
            )
            for f in ids
        ]
