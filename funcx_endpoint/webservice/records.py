"""What the service stores: clients, tokens, functions, containers, endpoints and tasks,
as records.

Frozen values that the storage functions (:mod:`~funcx_endpoint.webservice.accounts`,
:mod:`~funcx_endpoint.webservice.endpoints`, :mod:`~funcx_endpoint.webservice.tasks`)
make from rows or take as arguments, and that
:class:`~funcx_endpoint.webservice.storage.Storage` hands between the database
threads and the service.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr

DONE_STATUSES = ("success", "failed")
#: :data:`DONE_STATUSES` as an SQL list.
DONE_SQL = "('success', 'failed')"


@attr.s(auto_attribs=True, frozen=True)
class Client:
    client_id: str
    name: str
    identity_id: str
    secret_hash: str
    created: float
    revoked_at: Optional[float]
    username: str = ""


@attr.s(auto_attribs=True, frozen=True)
class Identity:
    identity_id: str
    username: str
    name: str
    email: Optional[str]


@attr.s(auto_attribs=True, frozen=True)
class TokenInfo:
    identity_id: str
    client_id: str
    resource_server: str
    scope: str
    issued: float
    expires: float
    revoked: bool = False


@attr.s(auto_attribs=True, frozen=True)
class FunctionInfo:
    function_id: str
    owner: str
    public: bool
    function_code: str
    container_uuid: Optional[str]


#: The kinds of container image a container may have (``image_type``), lower case.
CONTAINER_TYPES = ("docker", "singularity", "shifter", "podman", "apptainer")
#: What a registered image's ``build_status`` is (funcX 1.0's name: the user provided it).
PROVIDED = "provided"


@attr.s(auto_attribs=True, frozen=True)
class ImageInfo:
    """One image of a container: where an endpoint of ``image_type`` finds it."""

    image_type: str
    location: str
    created: float
    modified: float
    build_status: Optional[str] = PROVIDED
    build_stderr: Optional[str] = None


@attr.s(auto_attribs=True, frozen=True)
class ContainerInfo:
    """A registered container and its images (at most one of each type)."""

    container_id: str
    owner: str
    name: str
    description: Optional[str]
    public: bool
    created: float
    modified: float
    images: Tuple[ImageInfo, ...]

    def image(self, image_type: str) -> Optional[ImageInfo]:
        """Its image of ``image_type``, if it has one."""
        for image in self.images:
            if image.image_type == image_type:
                return image
        return None

    def visible_to(self, identity: str) -> bool:
        """Whether ``identity`` may see and use it: its owner's, or public."""
        return self.public or self.owner == identity


@attr.s(auto_attribs=True, frozen=True)
class Endpoint:
    endpoint_id: str
    owner: str
    name: str
    metadata: Dict[str, Any]
    allowed_functions: Optional[List[str]]
    heartbeat_period: Optional[float]
    heartbeat_threshold: Optional[float]
    broker_user: str
    broker_password: str = attr.ib(repr=False)
    locked: bool
    deleted_at: Optional[float]
    created: float
    registered_at: float
    registrations: int
    ip_address: Optional[str]
    last_report_at: Optional[float]
    final_report_at: Optional[float]
    recent_reports: List[Dict[str, Any]]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Endpoint:
        """The endpoint of a row of :data:`ENDPOINT_COLUMNS` (JSON columns decoded)."""
        values = dict(zip(_ENDPOINT_FIELDS, row))
        values["metadata"] = json.loads(values["metadata"]) if values["metadata"] else {}
        allowed = values["allowed_functions"]
        values["allowed_functions"] = json.loads(allowed) if allowed else None
        values["locked"] = bool(values["locked"])
        reports = values["recent_reports"]
        values["recent_reports"] = json.loads(reports) if reports else []
        return cls(**values)

    def threshold(self, default: float) -> float:
        """Seconds without a report after which this endpoint counts as offline."""
        if self.heartbeat_threshold:
            return float(self.heartbeat_threshold)
        if self.heartbeat_period:
            return max(4 * float(self.heartbeat_period), 10.0)
        return default

    def liveness(self, now: float, default_threshold: float) -> Tuple[str, bool]:
        """("online"|"offline", whether a final report makes it depend on the broker).

        Online while periodic reports come within the threshold; a final report
        (``heartbeat_period: 0``) newer than the last periodic one means offline,
        unless the endpoint's task queue still has a consumer (a second instance
        that failed to start sends final reports while the first one runs): the
        second value says the caller should check that.
        """
        threshold = self.threshold(default_threshold)
        last, final = self.last_report_at, self.final_report_at
        if final is not None and (last is None or final >= last):
            if now - final <= threshold and last is not None and now - last <= threshold:
                return "offline", True
            return "offline", False
        if last is not None and now - last <= threshold:
            return "online", False
        return "offline", False


# The endpoints table's columns have the names of the record's fields.
_ENDPOINT_FIELDS = tuple(field.name for field in attr.fields(Endpoint))
#: The columns :meth:`Endpoint.from_row` reads, in its order.
ENDPOINT_COLUMNS = ", ".join(_ENDPOINT_FIELDS)


@attr.s(auto_attribs=True, frozen=True)
class NewTask:
    task_id: str
    owner: str
    function_id: str
    endpoint_id: str
    task_group_id: str
    payload: str
    ws_queue: Optional[str]
    created: float
    #: The batch's resource specification as JSON text (None: none).
    resource_specification: Optional[str] = None
    #: The submitter's Python and dill versions as JSON text (None: not said).
    user_runtime: Optional[str] = None


@attr.s(auto_attribs=True, frozen=True)
class UnsentTask:
    task_id: str
    endpoint_id: str
    function_id: str
    task_buffer: str
    container_uuid: Optional[str]
    #: Whether its endpoint takes several tasks per message (MESSAGE_BATCHES);
    #: unknown (False: one per message, which every endpoint reads) on resends.
    batchable: bool = False
    #: The container ``container_uuid`` names, with its images (None if it names
    #: none, or one that is not stored: functions registered before containers were).
    container: Optional[ContainerInfo] = None
    #: What the task asks of the endpoint's nodes (MPI), sent in its message.
    resource_specification: Optional[Dict[str, Any]] = None
    #: The submitter's Python and dill versions, sent in its message.
    user_runtime: Optional[Dict[str, Any]] = None


@attr.s(auto_attribs=True, frozen=True)
class IncomingResult:
    """A result from the broker: ``endpoint_id`` is the one its routing key names."""

    task_id: str
    endpoint_id: str
    data: str
    error_code: Optional[str]
    error_message: Optional[str]
    completion_t: str
    #: The environment of the worker that ran it, as JSON text (None: not said).
    details: Optional[str] = None
    #: How many times the endpoint sent it to a manager (None: the result does not say).
    attempts: Optional[int] = None


@attr.s(auto_attribs=True, frozen=True)
class StoredOutcome:
    """What :func:`store_results` did with one result.

    ``outcome``: ``stored``, ``duplicate``, ``unknown`` (no such task) or
    ``wrong_endpoint`` (the task was sent to another endpoint).
    """

    task_id: str
    outcome: str
    ws_queue: Optional[str] = None


@attr.s(auto_attribs=True, frozen=True)
class ResultCopy:
    """A finished task whose result must be copied to its task group's queue."""

    task_id: str
    ws_queue: str
    status: str
    data: str
    error_code: Optional[str]
    error_message: Optional[str]
    completion_t: str


@attr.s(auto_attribs=True, frozen=True)
class Report:
    """A status report to record (``endpoint_id`` checked against the routing key)."""

    endpoint_id: str
    global_state: Dict[str, Any]
    task_statuses: Dict[str, List[Tuple[int, str]]]  # task id -> [(timestamp ns, state)]
    final: bool
    received: float
    #: real-time task states (``task_states``): transitions only, not a status report
    states_only: bool = False


TASK_COLUMNS = (
    "task_id, owner, status, completion_t, result, exception, error_code, error_message, details, "
    "attempts"
)


def task_view(row: Sequence[Any]) -> Dict[str, Any]:
    """The API's answer about a task (``GET /tasks/<id>``) from its row."""
    task_id, _owner, status, completion_t, result, exception, code, message, details = row[:9]
    attempts = row[9]
    answer: Dict[str, Any] = {"task_id": task_id, "status": status}
    if attempts is not None:
        # Not in funcX 1.0's answer (its SDK ignores fields it does not know).
        answer["attempts"] = attempts
    if status in DONE_STATUSES:
        answer["completion_t"] = completion_t
        if details:
            # The worker's environment, as Globus Compute's service returns it.
            answer["details"] = json.loads(details)
        if status == "success":
            answer["result"] = result
        else:
            answer["exception"] = exception
            answer["error_details"] = {"code": code, "user_message": message}
    return answer
