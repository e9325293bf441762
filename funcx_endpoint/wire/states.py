"""Task states, the actors that record them, and one recorded transition."""

from __future__ import annotations

import enum
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence, Union

from funcx_endpoint.wire.errors import MessageError
from funcx_endpoint.wire.fields import _dict, _int, _list, _Record, _required, _show

__all__ = ["ActorName", "TaskState", "TaskTransition"]


class _StrEnum(str, enum.Enum):
    """A str enum whose ``str()`` is its value."""

    def __str__(self) -> str:
        return str(self.value)


class TaskState(_StrEnum):
    """The states of a task, as funcx_common names them."""

    RECEIVED = "received"
    WAITING_FOR_EP = "waiting-for-ep"
    WAITING_FOR_NODES = "waiting-for-nodes"
    WAITING_FOR_LAUNCH = "waiting-for-launch"
    EXECUTION_START = "execution-start"
    EXECUTION_END = "execution-end"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    RESULT_RECEIVED = "result-received"
    RESULT_ENQUEUED = "result-enqueued"
    ACTION_PROVIDER_RECEIVED = "action-provider-received"
    ACTION_PROVIDER_TASK_SUBMITTED = "action-provider-task-submitted"
    ACTION_PROVIDER_TASK_GROUP_IN_PROGRESS = "action-provider-task-group-in-progress"
    ACTION_PROVIDER_TASK_GROUP_COMPLETED = "action-provider-task-group-completed"
    ACTION_PROVIDER_TASK_GROUP_ERROR = "action-provider-task-group-error"


class ActorName(_StrEnum):
    """The parts of the system that record task transitions."""

    WORKER = "worker"
    MANAGER = "manager"
    INTERCHANGE = "interchange"
    ENDPOINT = "endpoint"
    RESULT_PROCESSOR = "result-processor"
    WEB_SERVICE = "web-service"
    ACTION_PROVIDER = "action-provider"


# Value -> member; str-enum members hash like their values, so members work
# as keys too.  Faster than TaskState(value).
_STATES: Dict[str, TaskState] = {member.value: member for member in TaskState}
_ACTORS: Dict[str, ActorName] = {member.value: member for member in ActorName}


class TaskTransition(_Record):
    """One state change of a task: when (ns since the epoch), to what, by whom."""

    __slots__ = ("timestamp", "state", "actor")

    def __init__(
        self, timestamp: int, state: Union[TaskState, str], actor: Union[ActorName, str]
    ) -> None:
        self.timestamp: int = _int(timestamp, "timestamp")
        found_state = _STATES.get(state) if isinstance(state, str) else None
        if found_state is None:
            raise MessageError(f"unknown task state {_show(state)}")
        found_actor = _ACTORS.get(actor) if isinstance(actor, str) else None
        if found_actor is None:
            raise MessageError(f"unknown actor {_show(actor)}")
        self.state: TaskState = found_state
        self.actor: ActorName = found_actor

    @classmethod
    def now(cls, state: Union[TaskState, str], actor: Union[ActorName, str]) -> TaskTransition:
        """A transition to ``state`` by ``actor`` happening now."""
        return cls(time.time_ns(), state, actor)

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready dict of this transition."""
        return {"timestamp": self.timestamp, "state": self.state.value, "actor": self.actor.value}

    @classmethod
    def from_wire(cls, data: Any, where: str = "task transition") -> TaskTransition:
        """The transition a JSON-decoded dict describes, or MessageError."""
        data = _dict(data, where)
        timestamp = _required(data, "timestamp", where)
        state = _required(data, "state", where)
        actor = _required(data, "actor", where)
        try:
            return cls(timestamp, state, actor)
        except MessageError as exc:
            raise MessageError(f"{where}: {exc}") from None


def _transitions_to_wire(transitions: Sequence[TaskTransition]) -> List[Dict[str, Any]]:
    return [t.to_wire() for t in transitions]


def _transitions_from_wire(value: Any, where: str) -> List[TaskTransition]:
    from_wire = TaskTransition.from_wire
    return [from_wire(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where))]


def _check_transitions(value: Any, field: str) -> List[TaskTransition]:
    if isinstance(value, tuple):
        value = list(value)
    elif not isinstance(value, list):
        raise MessageError(f"{field} must be a list of TaskTransitions, got {_show(value)}")
    for item in value:
        if type(item) is not TaskTransition:
            raise MessageError(f"{field} must hold TaskTransitions, got {_show(item)}")
    return value


def _check_statuses(
    value: Mapping[Any, Sequence[TaskTransition]], task_id_of: Callable[[Any], str]
) -> Dict[str, List[TaskTransition]]:
    """A message's ``task_statuses`` checked: keys made task ids by ``task_id_of``,
    values lists of TaskTransitions."""
    statuses: Dict[str, List[TaskTransition]] = {}
    for key, transitions in value.items():
        task_id = task_id_of(key)
        statuses[task_id] = _check_transitions(transitions, f"task_statuses[{task_id!r}]")
    return statuses


def _statuses_to_wire(
    statuses: Mapping[str, Sequence[TaskTransition]],
) -> Dict[str, List[Dict[str, Any]]]:
    return {task_id: _transitions_to_wire(transitions) for task_id, transitions in statuses.items()}


def _statuses_from_wire(data: Dict[str, Any]) -> Dict[str, List[TaskTransition]]:
    """The (required) ``task_statuses`` of a message's ``data``, decoded."""
    statuses = _dict(_required(data, "task_statuses", "data"), "task_statuses")
    return {
        key: _transitions_from_wire(value, f"task_statuses[{key!r}]")
        for key, value in statuses.items()
    }
