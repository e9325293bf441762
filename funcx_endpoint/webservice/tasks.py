"""Functions and tasks: registration, submission, results, and their copies.

Plain functions of a :class:`~funcx_endpoint.webservice.db.Tx` (one
transaction): :class:`~funcx_endpoint.webservice.storage.Storage` runs them
in database threads.

Results are stored once: the first result of a task wins, later ones are
reported as duplicates and change nothing (the ``status`` guard in
:func:`store_results` makes that true even with concurrent writers).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from funcx_endpoint.webservice.containers import get_containers
from funcx_endpoint.webservice.db import Tx
from funcx_endpoint.webservice.records import (
    DONE_SQL,
    DONE_STATUSES,
    TASK_COLUMNS,
    FunctionInfo,
    IncomingResult,
    NewTask,
    ResultCopy,
    StoredOutcome,
    UnsentTask,
    task_view,
)


def insert_function(tx: Tx, row: Dict[str, Any]) -> None:
    tx.execute(
        "INSERT INTO functions (function_id, owner, name, entry_point, description, "
        "container_uuid, public, group_id, function_code, created, code_size) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row["function_id"],
            row["owner"],
            row["name"],
            row["entry_point"],
            row["description"],
            row["container_uuid"],
            1 if row["public"] else 0,
            row["group_id"],
            row["function_code"],
            row["created"],
            text_size(row["function_code"]),
        ),
    )


def visible_functions(
    tx: Tx, function_ids: Sequence[str], identity: str
) -> Dict[str, FunctionInfo]:
    """Those of ``function_ids`` that ``identity`` may use (its own, or public)."""
    rows = tx.rows_in(
        "SELECT function_id, owner, public, function_code, container_uuid FROM functions "
        "WHERE function_id IN ({ids}) AND (owner = ? OR public = 1)",
        function_ids,
        identity,
    )
    return {row[0]: FunctionInfo(row[0], row[1], bool(row[2]), row[3], row[4]) for row in rows}


def insert_tasks(tx: Tx, tasks: Sequence[NewTask]) -> None:
    # The optional columns are named only when a task has them.
    with_resources = any(t.resource_specification is not None for t in tasks)
    with_runtime = any(t.user_runtime is not None for t in tasks)
    extra_column = (", resource_specification" if with_resources else "") + (
        ", user_runtime" if with_runtime else ""
    )
    extra_value = ", ?" * (with_resources + with_runtime)
    tx.executemany(
        "INSERT INTO tasks (task_id, owner, function_id, endpoint_id, task_group_id, payload, "
        f"status, created, ws_queue, payload_size{extra_column}) "
        f"VALUES (?, ?, ?, ?, ?, ?, 'waiting-for-ep', ?, ?, ?{extra_value})",
        [
            (
                t.task_id,
                t.owner,
                t.function_id,
                t.endpoint_id,
                t.task_group_id,
                t.payload,
                t.created,
                t.ws_queue,
                text_size(t.payload),
                *((t.resource_specification,) if with_resources else ()),
                *((t.user_runtime,) if with_runtime else ()),
            )
            for t in tasks
        ],
    )


def mark_sent(tx: Tx, task_ids: Sequence[str]) -> None:
    tx.execute_in("UPDATE tasks SET sent = 1 WHERE task_id IN ({ids})", task_ids)


def send_unfinished_again(tx: Tx, endpoint_id: str) -> int:
    """Mark the endpoint's unfinished tasks unsent (they are published again); how many."""
    cursor = tx.execute(
        f"UPDATE tasks SET sent = 0 WHERE endpoint_id = ? AND sent = 1 "
        f"AND status NOT IN {DONE_SQL}",
        (endpoint_id,),
    )
    return int(cursor.rowcount or 0)


def unsent_tasks(tx: Tx, limit: int, created_before: float) -> List[UnsentTask]:
    """Tasks not yet confirmed by the broker, oldest first, with their task buffers
    and their functions' containers."""
    rows = tx.execute(
        "SELECT t.task_id, t.endpoint_id, t.function_id, t.payload, f.function_code, "
        "f.container_uuid, t.resource_specification, t.user_runtime "
        "FROM tasks t JOIN functions f ON f.function_id = t.function_id "
        "WHERE t.sent = 0 AND t.created < ? ORDER BY t.created LIMIT ?",
        (created_before, limit),
    ).fetchall()
    containers = get_containers(tx, [row[5] for row in rows if row[5] is not None])
    return [
        UnsentTask(
            task_id,
            endpoint_id,
            function_id,
            code + (payload or ""),
            container_id,
            container=None if container_id is None else containers.get(container_id),
            resource_specification=json.loads(resources) if resources else None,
            user_runtime=json.loads(runtime) if runtime else None,
        )
        for (
            task_id,
            endpoint_id,
            function_id,
            payload,
            code,
            container_id,
            resources,
            runtime,
        ) in rows
    ]


def text_size(text: Optional[str]) -> int:
    """The bytes ``text`` takes as UTF-8 (what quotas count)."""
    if not text:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def store_results(
    tx: Tx, results: Sequence[IncomingResult], now: Optional[float] = None
) -> List[StoredOutcome]:
    """Store each result unless its task is done already (the first result wins);
    ``now`` is when the task finished (retention counts from it)."""
    known: Dict[str, Tuple[str, str, Optional[str]]] = {
        task_id: (endpoint_id, status, ws_queue)
        for task_id, endpoint_id, status, ws_queue in tx.rows_in(
            "SELECT task_id, endpoint_id, status, ws_queue FROM tasks WHERE task_id IN ({ids})",
            list({r.task_id for r in results}),
        )
    }
    outcomes: List[StoredOutcome] = []
    for result in results:
        found = known.get(result.task_id)
        if found is None:
            outcomes.append(StoredOutcome(result.task_id, "unknown"))
            continue
        endpoint_id, status, ws_queue = found
        if endpoint_id != result.endpoint_id:
            outcomes.append(StoredOutcome(result.task_id, "wrong_endpoint"))
            continue
        if status in DONE_STATUSES:
            outcomes.append(StoredOutcome(result.task_id, "duplicate"))
            continue
        failed = result.error_code is not None
        updated = tx.execute(
            "UPDATE tasks SET status = ?, sent = 1, payload = NULL, completion_t = ?, "
            "result = ?, exception = ?, error_code = ?, error_message = ?, ws_pending = ?, "
            "finished = ?, details = ? "
            f"WHERE task_id = ? AND status NOT IN {DONE_SQL}",
            (
                "failed" if failed else "success",
                result.completion_t,
                None if failed else result.data,
                result.data if failed else None,
                result.error_code,
                result.error_message,
                0 if ws_queue is None else 1,
                now,
                result.details,
                result.task_id,
            ),
        ).rowcount
        if updated:
            known[result.task_id] = (endpoint_id, "success", ws_queue)
            outcomes.append(StoredOutcome(result.task_id, "stored", ws_queue))
        else:
            outcomes.append(StoredOutcome(result.task_id, "duplicate"))
    return outcomes


def get_tasks(tx: Tx, task_ids: Sequence[str], owner: str) -> Dict[str, Dict[str, Any]]:
    """The API view of those of ``task_ids`` that ``owner`` submitted."""
    rows = tx.rows_in(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id IN ({{ids}}) AND owner = ?",
        task_ids,
        owner,
    )
    return {row[0]: task_view(row) for row in rows}


def task_group(tx: Tx, task_group_id: str, owner: str) -> List[str]:
    return [
        row[0]
        for row in tx.execute(
            "SELECT task_id FROM tasks WHERE task_group_id = ? AND owner = ? ORDER BY created",
            (task_group_id, owner),
        ).fetchall()
    ]


def pending_copies(tx: Tx, limit: int) -> List[ResultCopy]:
    rows = tx.execute(
        "SELECT task_id, ws_queue, status, result, exception, error_code, error_message, "
        "completion_t FROM tasks WHERE ws_pending = 1 ORDER BY created LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        ResultCopy(task_id, queue, status, result if status == "success" else exc, code, msg, ct)
        for task_id, queue, status, result, exc, code, msg, ct in rows
    ]


def mark_copied(tx: Tx, task_ids: Sequence[str]) -> None:
    tx.execute_in("UPDATE tasks SET ws_pending = 0 WHERE task_id IN ({ids})", task_ids)
