"""The endpoint's status report on the result queue (``ep_status_report``).

Part of the queue messages of :mod:`funcx_endpoint.wire.messages`
(PROTOCOL.md section 4), which packs and unpacks it and re-exports it.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Union

from funcx_endpoint.wire.errors import MessageError
from funcx_endpoint.wire.fields import _MISSING, _dict, _Record, _required, _show, _uuid
from funcx_endpoint.wire.states import (
    TaskTransition,
    _check_statuses,
    _statuses_from_wire,
    _statuses_to_wire,
)

__all__ = ["EPStatusReport"]


class EPStatusReport(_Record):
    """An endpoint's periodic status: its state and the task transitions seen.

    ``global_state`` holds ``managers``, ``total_workers``, ``idle_workers``,
    ``pending_tasks``, ``outstanding_tasks`` and so on; a report whose
    ``global_state`` says ``heartbeat_period: 0`` is the last one (the
    endpoint is stopping).  ``task_statuses`` maps task ids to transitions;
    keys that are UUIDs are normalized, others kept as they are.
    """

    __slots__ = ("endpoint_id", "global_state", "task_statuses")
    message_type: ClassVar[str] = "ep_status_report"

    def __init__(
        self,
        endpoint_id: Union[str, uuid.UUID],
        global_state: Mapping[str, Any],
        task_statuses: Optional[Mapping[str, Sequence[TaskTransition]]] = None,
    ) -> None:
        self.endpoint_id: str = _uuid(endpoint_id, "endpoint_id")
        if not isinstance(global_state, Mapping):
            raise MessageError(f"global_state must be a mapping, got {_show(global_state)}")
        self.global_state: Dict[str, Any] = dict(global_state)
        self.task_statuses = _check_statuses(task_statuses or {}, _task_status_key)

    @classmethod
    def final(cls, endpoint_id: Union[str, uuid.UUID]) -> EPStatusReport:
        """The report an endpoint sends when it stops: no more reports coming."""
        return cls(endpoint_id, {"heartbeat_period": 0}, {})

    @property
    def is_final(self) -> bool:
        """Whether this report says the endpoint stopped (``heartbeat_period`` 0)."""
        return self.global_state.get("heartbeat_period", None) == 0

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready ``data`` of this message."""
        return {
            "endpoint_id": self.endpoint_id,
            "global_state": self.global_state,
            "task_statuses": _statuses_to_wire(self.task_statuses),
        }

    @classmethod
    def from_wire(cls, data: Dict[str, Any]) -> EPStatusReport:
        """The report a JSON-decoded ``data`` dict describes, or MessageError."""
        endpoint_id = _required(data, "endpoint_id", "data")
        # funcx_common also reads global_state under the alias ep_status_report.
        global_state = data.get("global_state", data.get("ep_status_report", _MISSING))
        if global_state is _MISSING:
            raise MessageError("data has no 'global_state' field")
        statuses = _statuses_from_wire(data)
        return cls(endpoint_id, _dict(global_state, "global_state"), statuses)


def _task_status_key(key: Any) -> str:
    if not isinstance(key, str):
        raise MessageError(f"task_statuses keys must be task id strings, got {_show(key)}")
    try:
        return _uuid(key, "task id")
    except MessageError:
        return key
