"""Negotiated messages beyond funcX 1.0: real-time task states and endpoint commands.

Both travel only between peers that agreed to them at registration (the
endpoint offers the feature in ``metadata.wire_features``, the service
answers with the features it accepts), so a funcX 1.0 endpoint or service
never sees them:

* :class:`TaskStatesMessage` (``task_states``, feature :data:`TASK_STATES`),
  endpoint to service on the results exchange: task transitions as they
  happen, batched (at most one message per flush interval).  Its
  ``task_statuses`` has the shape of an ``ep_status_report``'s.
* :class:`EndpointCommand` (``endpoint_command``, feature
  :data:`ENDPOINT_COMMANDS`), service to endpoint on the endpoint's task
  queue: ``cancel`` (``task_ids``) or ``stop`` (drain and exit).  A funcX 1.0
  endpoint would answer an unknown message type on its task queue as a
  malformed task, which is why the service sends commands only to endpoints
  that offered the feature.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Union

from funcx_endpoint.wire.errors import MessageError
from funcx_endpoint.wire.fields import _list, _optional_str, _Record, _required, _show, _uuid
from funcx_endpoint.wire.states import (
    TaskTransition,
    _check_statuses,
    _statuses_from_wire,
    _statuses_to_wire,
)

__all__ = [
    "ENDPOINT_COMMANDS",
    "TASK_STATES",
    "EndpointCommand",
    "TaskStatesMessage",
]

#: The endpoint sends task transitions as they happen (``task_states``).
TASK_STATES = "task-states-v1"
#: The service may send ``endpoint_command`` messages on the endpoint's task queue.
ENDPOINT_COMMANDS = "endpoint-commands-v1"


class TaskStatesMessage(_Record):
    """Task transitions of one endpoint since its last such message."""

    __slots__ = ("endpoint_id", "task_statuses")
    message_type: ClassVar[str] = "task_states"

    def __init__(
        self,
        endpoint_id: Union[str, uuid.UUID],
        task_statuses: Mapping[str, Sequence[TaskTransition]],
    ) -> None:
        self.endpoint_id: str = _uuid(endpoint_id, "endpoint_id")
        self.task_statuses = _check_statuses(task_statuses, _task_id)

    def to_wire(self) -> Dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            "task_statuses": _statuses_to_wire(self.task_statuses),
        }

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> TaskStatesMessage:
        statuses = _statuses_from_wire(data)
        return cls(_required(data, "endpoint_id", "data"), statuses)


def _task_id(key: Any) -> str:
    return _uuid(key, "task_statuses key")


class EndpointCommand(_Record):
    """A command from the service to a running endpoint.

    ``cancel``: drop the queued tasks of ``task_ids``, kill the running ones
    (each ends with a ``TaskCancelled`` result).  ``stop``: drain and exit,
    as ``funcx-endpoint stop`` would (``reason`` goes into the log).
    ``issued_at`` is the service's clock when it sent the command; an endpoint
    ignores a ``stop`` issued before it registered (by the same clock): one
    left in the queue of an endpoint that was not running must not stop the
    next start.
    """

    __slots__ = ("command", "task_ids", "reason", "issued_at")
    message_type: ClassVar[str] = "endpoint_command"
    CANCEL: ClassVar[str] = "cancel"
    STOP: ClassVar[str] = "stop"
    COMMANDS: ClassVar[tuple] = (CANCEL, STOP)

    def __init__(
        self,
        command: str,
        task_ids: Sequence[str] = (),
        reason: Optional[str] = None,
        issued_at: Optional[float] = None,
    ) -> None:
        if command not in self.COMMANDS:
            raise MessageError(
                f"unknown endpoint command {_show(command)} (known: {', '.join(self.COMMANDS)})"
            )
        self.command: str = command
        self.task_ids: List[str] = [
            _uuid(task_id, "task_ids[]")
            for task_id in _list(
                list(task_ids) if isinstance(task_ids, tuple) else task_ids, "task_ids"
            )
        ]
        self.reason: Optional[str] = _optional_str(reason, "reason")
        if issued_at is not None and (
            isinstance(issued_at, bool) or not isinstance(issued_at, (int, float))
        ):
            raise MessageError(f"issued_at must be a number or null, got {_show(issued_at)}")
        self.issued_at: Optional[float] = None if issued_at is None else float(issued_at)

    @classmethod
    def cancel(
        cls,
        task_ids: Sequence[str],
        reason: Optional[str] = None,
        issued_at: Optional[float] = None,
    ) -> EndpointCommand:
        return cls(cls.CANCEL, task_ids, reason, issued_at)

    @classmethod
    def stop(
        cls, reason: Optional[str] = None, issued_at: Optional[float] = None
    ) -> EndpointCommand:
        return cls(cls.STOP, (), reason, issued_at)

    def to_wire(self) -> Dict[str, Any]:
        return {
            "command": self.command,
            "task_ids": self.task_ids,
            "reason": self.reason,
            "issued_at": self.issued_at,
        }

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> EndpointCommand:
        return cls(
            _required(data, "command", "data"),
            data.get("task_ids") or (),
            data.get("reason"),
            data.get("issued_at"),
        )
