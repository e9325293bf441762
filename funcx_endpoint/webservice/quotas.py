"""Per-user quotas: functions, stored bytes, endpoints, tasks in flight.

A user may hold at most :class:`Quotas` ``functions`` registered functions,
``endpoints`` endpoints (not deleted), ``tasks_in_flight`` tasks not yet
finished, and ``stored_bytes`` bytes of function code plus payloads of tasks
in flight.  A request that would go over is refused whole, nothing created:

* ``429 FUNCTION_QUOTA``, ``ENDPOINT_QUOTA``, ``TASK_QUOTA`` (counts; for tasks,
  with ``Retry-After``: tasks finishing make room);
* ``413 STORAGE_QUOTA`` (bytes).

The answer says the limit, the usage and what to do.  Usage is read from the
database before the request's own write, so two requests of one user racing
(on two service instances) can go over by one request; the next one is refused.
Results are not counted: they are bounded by the result size limit and expire
(:mod:`~funcx_endpoint.webservice.retention`).
"""

from __future__ import annotations

from typing import Any

import attr

from funcx_endpoint.webservice.db import Tx
from funcx_endpoint.webservice.http import APIError
from funcx_endpoint.webservice.records import DONE_SQL

__all__ = ["Quotas", "Usage", "user_usage"]

MIB = 1024 * 1024


@attr.s(auto_attribs=True, frozen=True)
class Usage:
    """What a user holds now."""

    functions: int
    function_bytes: int
    endpoints: int
    tasks_in_flight: int
    task_bytes: int

    @property
    def stored_bytes(self) -> int:
        return self.function_bytes + self.task_bytes


def user_usage(tx: Tx, owner: str) -> Usage:
    functions, function_bytes = tx.execute(
        "SELECT COUNT(*), COALESCE(SUM(code_size), 0) FROM functions WHERE owner = ?", (owner,)
    ).fetchone() or (0, 0)
    (endpoints,) = tx.execute(
        "SELECT COUNT(*) FROM endpoints WHERE owner = ? AND deleted_at IS NULL", (owner,)
    ).fetchone() or (0,)
    tasks, task_bytes = tx.execute(
        "SELECT COUNT(*), COALESCE(SUM(payload_size), 0) FROM tasks "
        f"WHERE owner = ? AND status NOT IN {DONE_SQL}",
        (owner,),
    ).fetchone() or (0, 0)
    return Usage(int(functions), int(function_bytes), int(endpoints), int(tasks), int(task_bytes))


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} bytes"


@attr.s(auto_attribs=True, frozen=True)
class Quotas:
    """The limits per user (settings ``max_functions`` & co.; see the module)."""

    functions: int = 10_000
    stored_bytes: int = 1024 * MIB
    endpoints: int = 20
    tasks_in_flight: int = 100_000

    def _bytes(self, usage: Usage, adding: int, what: str) -> None:
        _refuse_over(
            self.stored_bytes,
            usage.stored_bytes,
            adding,
            413,
            "STORAGE_QUOTA",
            f"{what} would take this user's stored data to "
            f"{_size(usage.stored_bytes + adding)}, over the quota of "
            f"{_size(self.stored_bytes)} (functions {_size(usage.function_bytes)}, "
            f"payloads of unfinished tasks {_size(usage.task_bytes)}); wait for tasks to "
            f"finish, or ask the operator for a larger quota",
        )

    def check_function(self, usage: Usage, code_size: int) -> None:
        """Refuse registering one more function of ``code_size`` bytes if over."""
        _refuse_over(
            self.functions,
            usage.functions,
            1,
            429,
            "FUNCTION_QUOTA",
            f"this user has {usage.functions} functions registered, the quota is "
            f"{self.functions}; register a function once and reuse its id",
        )
        self._bytes(usage, code_size, "this function")

    def check_endpoint(self, usage: Usage) -> None:
        """Refuse registering one more (new) endpoint if over."""
        _refuse_over(
            self.endpoints,
            usage.endpoints,
            1,
            429,
            "ENDPOINT_QUOTA",
            f"this user has {usage.endpoints} endpoints, the quota is {self.endpoints}; "
            f"delete endpoints no longer used (DELETE /v2/endpoints/<id>) or reuse one",
        )

    def check_tasks(self, usage: Usage, count: int, payload_bytes: int) -> None:
        """Refuse submitting ``count`` tasks of ``payload_bytes`` in all if over."""
        _refuse_over(
            self.tasks_in_flight,
            usage.tasks_in_flight,
            count,
            429,
            "TASK_QUOTA",
            f"this user has {usage.tasks_in_flight} tasks not finished; {count} more "
            f"would go over the quota of {self.tasks_in_flight} tasks in flight; nothing "
            f"was submitted: wait for results, then submit again",
            headers={"Retry-After": "10"},
        )
        self._bytes(usage, payload_bytes, f"these {count} tasks")


def _refuse_over(
    limit: int, used: int, adding: int, status: int, code: str, message: str, **extra: Any
) -> None:
    """Raise the APIError ``status`` ``code`` (with the quota and the usage) if adding
    ``adding`` to ``used`` goes over ``limit``."""
    if used + adding > limit:
        raise APIError(status, code, message, quota=limit, usage=used, **extra)
