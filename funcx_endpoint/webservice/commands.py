"""Commands to running endpoints: cancelling tasks and stopping endpoints.

``POST /v2/tasks/<id>/cancel`` and ``POST /v2/batch_cancel`` (``{"task_ids": [...]}``)
cancel tasks of the caller that are not done yet.  The service decides at
once: the task is stored as failed with error code ``TaskCancelled`` (so a
funcX 1.0 SDK, which knows only ``success`` and ``failed`` as final, stops
waiting too), its result copy is queued for a FuncXExecutor's result queue,
and a task not yet published is never published.  Whichever comes first
wins: a result stored before the cancel makes the cancel a no-op (answered
``cancelled: false`` with the task's status); a result arriving after it is
a duplicate and ignored.  Then, for an endpoint that offered
:data:`~funcx_endpoint.wire.ENDPOINT_COMMANDS` at registration, an
``endpoint_command`` ``cancel`` goes to its task queue, behind the task, so
the endpoint drops the task if it is queued there or kills its worker if it
runs.  A funcX 1.0 endpoint gets no command: it runs the task, and its result
is ignored.

``POST /v2/endpoints/<id>/lock`` (funcX 1.0's ``stop_endpoint``) also sends
a ``stop`` command (see :func:`send_command`).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence, Tuple

import attr

from funcx_endpoint.amqp import topology
from funcx_endpoint.webservice.api_checks import canonical_uuid, takes_commands, task_ids_field
from funcx_endpoint.webservice.api_context import APIContext, HandlerGroup
from funcx_endpoint.webservice.auth import API
from funcx_endpoint.webservice.db import Tx
from funcx_endpoint.webservice.http import Call, Router, not_found
from funcx_endpoint.webservice.records import DONE_SQL
from funcx_endpoint.webservice.storage import TokenInfo
from funcx_endpoint.wire import EndpointCommand, ErrorCode, pack

__all__ = ["CancelAPI", "MAX_CANCEL_IDS", "cancel_tasks", "send_command"]

#: Task ids per ``POST /v2/batch_cancel``.
MAX_CANCEL_IDS = 4096
_COMMAND_PROPERTIES = {"delivery-mode": 2}


@attr.s(auto_attribs=True, frozen=True)
class CancelOutcome:
    task_id: str
    endpoint_id: str
    cancelled: bool
    status: str


def cancel_tasks(tx: Tx, task_ids: Sequence[str], owner: str, now: float) -> List[CancelOutcome]:
    """Cancel those of ``task_ids`` that ``owner`` submitted and are not done."""
    outcomes = []
    rows = tx.rows_in(
        "SELECT task_id, endpoint_id, status FROM tasks WHERE task_id IN ({ids}) AND owner = ?",
        task_ids,
        owner,
    )
    for task_id, endpoint_id, status in rows:
        message = f"Task {task_id} was cancelled by its submitter"
        changed = tx.execute(
            "UPDATE tasks SET status = 'failed', sent = 1, payload = NULL, completion_t = ?, "
            "result = NULL, exception = ?, error_code = ?, error_message = ?, "
            "ws_pending = CASE WHEN ws_queue IS NULL THEN 0 ELSE 1 END "
            f"WHERE task_id = ? AND status NOT IN {DONE_SQL}",
            (
                f"{now:.3f}",
                f"{ErrorCode.TASK_CANCELLED}: {message}",
                ErrorCode.TASK_CANCELLED,
                message,
                task_id,
            ),
        ).rowcount
        outcomes.append(
            CancelOutcome(task_id, endpoint_id, bool(changed), "failed" if changed else status)
        )
    return outcomes


def endpoint_metadata(tx: Tx, endpoint_ids: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    return {
        endpoint_id: json.loads(metadata) if metadata else {}
        for endpoint_id, metadata in tx.rows_in(
            "SELECT endpoint_id, metadata FROM endpoints WHERE endpoint_id IN ({ids})",
            endpoint_ids,
        )
    }


async def send_command(context: APIContext, endpoint_id: str, command: EndpointCommand) -> bool:
    """Publish ``command`` to the endpoint's task queue; whether the broker took it.

    Only for endpoints that offered ENDPOINT_COMMANDS (the caller checks).
    """
    try:
        await context.broker.publish(
            topology.TASKS_EXCHANGE,
            topology.task_queue(endpoint_id),
            pack(command),
            _COMMAND_PROPERTIES,
        )
    except Exception as e:
        context.log.warn(
            "Could not send the {command} command to endpoint {eid}: {error}",
            command=command.command,
            eid=endpoint_id,
            error=e,
        )
        return False
    return True


class CancelAPI(HandlerGroup):
    """``POST /v2/tasks/<id>/cancel`` and ``POST /v2/batch_cancel``.

    (``DELETE /v2/tasks/<id>`` deletes a finished task and its result: see
    :mod:`~funcx_endpoint.webservice.retention`.)
    """

    def install(self, router: Router) -> None:
        router.add("POST", "/v2/tasks/(?P<task_id>[^/]+)/cancel", self.cancel_task, API)
        router.add("POST", "/v2/batch_cancel", self.batch_cancel, API)

    async def cancel_task(self, call: Call) -> Tuple[int, Any]:
        task_id = canonical_uuid(call.params["task_id"], "the task id")
        answers = await self._cancel(call, [task_id])
        if task_id not in answers:
            raise not_found(f"Task {task_id} not found", "TASK_NOT_FOUND")
        return 200, answers[task_id]

    async def batch_cancel(self, call: Call) -> Tuple[int, Any]:
        body = await call.json_object()
        canonical = task_ids_field(body, MAX_CANCEL_IDS)
        answers = await self._cancel(call, sorted(set(canonical.values())))
        return 200, {
            "results": {asked: answers[c] for asked, c in canonical.items() if c in answers}
        }

    async def _cancel(self, call: Call, task_ids: List[str]) -> Dict[str, Dict[str, Any]]:
        me: TokenInfo = call.identity
        storage = self.context.storage
        now = self.context.clock.seconds()
        outcomes = await storage.run(cancel_tasks, task_ids, me.identity_id, now)
        cancelled: Dict[str, List[str]] = {}
        for outcome in outcomes:
            if outcome.cancelled:
                cancelled.setdefault(outcome.endpoint_id, []).append(outcome.task_id)
        if cancelled:
            self.context.sender.kick()  # result copies for executors' queues
            metadata = await storage.run(endpoint_metadata, sorted(cancelled))
            for endpoint_id, ids in sorted(cancelled.items()):
                self.log.info(
                    "Cancelled {n} task(s) of endpoint {eid}", n=len(ids), eid=endpoint_id
                )
                if takes_commands(metadata.get(endpoint_id, {})):
                    await send_command(
                        self.context,
                        endpoint_id,
                        EndpointCommand.cancel(ids, "cancelled by its submitter", now),
                    )
        return {
            o.task_id: {"task_id": o.task_id, "cancelled": o.cancelled, "status": o.status}
            for o in outcomes
        }
