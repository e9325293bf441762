"""Tasks as the SDK sends and receives them: batches, task records, a cache of finished ones.

:class:`Batch` makes the body of ``POST /submit``; :func:`task_record` reads
the service's answer about a task; :class:`TaskCache` remembers the records
of finished tasks for a client.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from funcx_endpoint.sdk.errors import MalformedResponse, TaskCancelled, TaskExecutionFailed
from funcx_endpoint.wire import DeserializationError, deserialize, pack_payload
from funcx_endpoint.wire.resources import check_resource_specification

__all__ = ["Batch", "TaskCache", "TaskRecord", "canonical_uuid", "task_record"]

_DONE_STATUSES = frozenset({"success", "failed"})

TaskRecord = Dict[str, Any]


def canonical_uuid(value: Any, what: str) -> str:
    """``value`` as a canonical UUID string, or ValueError naming ``what``."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"{what} must be a UUID, got {value!r}") from None


def task_record(task_id: str, data: Mapping[str, Any]) -> TaskRecord:
    """The SDK's view of one task from the service's answer about it.

    Always has ``task_id``, ``status`` (lower-cased) and ``pending``.  A task
    is done when its status is ``success`` or ``failed`` (``cancelled`` for a
    task failed with ``TaskCancelled``); then the record has
    ``completion_t`` and either ``result`` (deserialized) or ``exception``: a
    :class:`TaskExecutionFailed` with the remote traceback text and error
    code, or the error that kept the result from being deserialized here;
    ``attempts`` (how many times the endpoint sent it to a manager) when the
    service says it (ours does; funcX's did not).
    """
    status = str(data.get("status") or "unknown").lower()
    record: TaskRecord = {
        "task_id": task_id,
        "status": status,
        "pending": status not in _DONE_STATUSES,
    }
    if record["pending"]:
        return record
    completion_t = data.get("completion_t")
    record["completion_t"] = completion_t
    worker = data.get("details")
    if isinstance(worker, dict):
        record["details"] = worker  # the environment of the worker that ran it
    attempts = data.get("attempts")
    if type(attempts) is int:
        record["attempts"] = attempts  # times sent to a manager (our service says it)
    if status == "success":
        if "result" not in data:
            record["exception"] = MalformedResponse(
                f"the service says task {task_id} succeeded but sent no result"
            )
            return record
        try:
            record["result"] = deserialize(data["result"])
        except DeserializationError as error:
            record["exception"] = error
        return record
    details = data.get("error_details")
    details = details if isinstance(details, dict) else {}
    code = details.get("code")
    user_message = details.get("user_message")
    remote_data = data.get("exception")
    error_class = TaskExecutionFailed
    if code == "TaskCancelled":
        # Stored as failed (funcX 1.0 clients know no other final status); shown so.
        record["status"] = "cancelled"
        error_class = TaskCancelled
    record["exception"] = error_class(
        str(remote_data) if remote_data else "(the service sent no error text)",
        completion_t,
        task_id=task_id,
        error_code=str(code) if code is not None else None,
        user_message=str(user_message) if user_message else None,
    )
    return record


def _funcx_1_0_add_arguments(
    function_id: str,
    endpoint_id: str,
    args: Optional[Sequence[Any]] = None,
    kwargs: Optional[Mapping[str, Any]] = None,
) -> Tuple[str, str, Optional[Sequence[Any]], Optional[Mapping[str, Any]]]:
    """The arguments of funcX 1.0.13's ``Batch.add``, bound by Python's rules."""
    return function_id, endpoint_id, args, kwargs


class Batch:
    """Tasks to submit together with :meth:`FuncXClient.batch_run`.

    ``task_group_id`` groups the tasks on the service (None: the client's
    session task group); ``resource_specification`` is what each of them
    asks of the endpoint's nodes (an ``MPIFunction``'s nodes and ranks).
    """

    def __init__(
        self,
        task_group_id: Optional[str] = None,
        *,
        create_websocket_queue: bool = False,
        resource_specification: Optional[Mapping[str, int]] = None,
    ) -> None:
        self.task_group_id = (
            canonical_uuid(task_group_id, "task_group_id") if task_group_id else None
        )
        self.create_websocket_queue = create_websocket_queue
        if resource_specification:
            check_resource_specification(resource_specification)  # fail here, not remotely
        #: What every task of the batch asks of the endpoint's nodes (MPI:
        #: ``num_nodes``, ``ranks_per_node``, ``num_ranks``), as Globus Compute's.
        self.resource_specification = dict(resource_specification or {}) or None
        self._tasks: List[List[str]] = []

    def add(
        self,
        *args: Any,
        endpoint_id: Optional[str] = None,
        function_id: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Add a task: run ``function_id`` on ``endpoint_id`` with these arguments.

        ``batch.add(*args, endpoint_id=..., function_id=..., **kwargs)``.  The
        funcX 1.0.13 form ``batch.add(function_id, endpoint_id, args=None,
        kwargs=None)`` (ids given positionally) is accepted too.
        """
        if endpoint_id is None and function_id is None:
            self._add_funcx_1_0_form(args, kwargs)
            return
        if endpoint_id is None or function_id is None:
            raise TypeError("Batch.add needs both endpoint_id= and function_id=")
        self.add_task(function_id, endpoint_id, args, kwargs)

    def _add_funcx_1_0_form(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        try:
            function_id, endpoint_id, task_args, task_kwargs = _funcx_1_0_add_arguments(
                *args, **kwargs
            )
        except TypeError:
            raise TypeError(
                "Batch.add takes (*args, endpoint_id=..., function_id=..., **kwargs) "
                "or (function_id, endpoint_id, args=None, kwargs=None)"
            ) from None
        self.add_task(function_id, endpoint_id, task_args or (), task_kwargs)

    def add_task(
        self,
        function_id: str,
        endpoint_id: str,
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Like :meth:`add`, with the arguments given as a sequence and a mapping.

        Use this when the function itself takes ``endpoint_id``,
        ``function_id``, ``args`` or ``kwargs`` keyword arguments.  Raises SerializationError if the
        arguments cannot be serialized (nothing is added then).
        """
        function_id = canonical_uuid(function_id, "function_id")
        endpoint_id = canonical_uuid(endpoint_id, "endpoint_id")
        payload = pack_payload(tuple(args), dict(kwargs) if kwargs else {})
        self._tasks.append([function_id, endpoint_id, payload])

    @property
    def tasks(self) -> List[List[str]]:
        """The tasks as sent: ``[function_id, endpoint_id, payload]`` each."""
        return [list(task) for task in self._tasks]

    def prepare(self, default_task_group_id: Optional[str] = None) -> Dict[str, Any]:
        """The ``POST /submit`` body for these tasks."""
        body: Dict[str, Any] = {
            "task_group_id": self.task_group_id or default_task_group_id,
            "create_websocket_queue": self.create_websocket_queue,
            "tasks": self.tasks,
        }
        if self.resource_specification:
            body["resource_specification"] = dict(self.resource_specification)
        return body

    def __len__(self) -> int:
        return len(self._tasks)


class TaskCache:
    """The records of finished tasks, kept for a client; safe to share between threads.

    Callers get copies, so changing one does not change what is kept.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: Dict[str, TaskRecord] = {}

    def get(self, task_id: str) -> Optional[TaskRecord]:
        """A copy of the record of ``task_id``, if it finished and was remembered."""
        with self._lock:
            record = self._records.get(task_id)
        return dict(record) if record is not None else None

    def remember(self, record: TaskRecord) -> None:
        """Keep ``record`` if its task is done (pending ones change)."""
        if not record["pending"]:
            with self._lock:
                self._records[record["task_id"]] = record
