"""Functions and tasks: registration, submission, results, and their copies.

Plain functions of a :class:`~funcx_endpoint.webservice.db.Tx` (one
transaction): :class:`~funcx_endpoint.webservice.storage.Storage` runs them
in database threads.

Results are stored once: the first result of a task wins, later ones are
reported as duplicates and change nothing (the ``status`` guard in
:func:`store_results` makes that true even with concurrent writers).

Several service instances may share the database.  Each task (and each
pending result copy) is *claimed* by the instance that stored it
(:class:`Claim`: ``claimed_by``, ``claimed_until``): only that instance sends
it again while the claim lasts; once the claim has expired (its instance is
gone, or silent) another instance claims it, in the same transaction that
reads it (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two live instances
never publish the same task.  Without a claim (one instance) every unsent
task is the reader's.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr

from funcx_endpoint.webservice.containers import get_containers
from funcx_endpoint.webservice.db import Tx, chunks, marks
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


@attr.s(auto_attribs=True, frozen=True)
class Claim:
    """This instance (``instance``) and how long its claims last (``seconds``)."""

    instance: str
    seconds: float


def _claimable(claim: Optional[Claim], alias: str = "") -> str:
    """The condition that a row is free for ``claim``'s instance (placeholders: me, now)."""
    if claim is None:
        return "1 = 1"
    return f"({alias}claimed_by = ? OR {alias}claimed_until IS NULL OR {alias}claimed_until < ?)"


def _take(tx: Tx, task_ids: Sequence[str], claim: Optional[Claim], now: float) -> None:
    """Claim ``task_ids`` for ``claim``'s instance until ``now`` plus its lease."""
    if claim is None or not task_ids:
        return
    for chunk in chunks(list(task_ids)):
        tx.execute(
            f"UPDATE tasks SET claimed_by = ?, claimed_until = ? "
            f"WHERE task_id IN ({marks(len(chunk))})",
            [claim.instance, now + claim.seconds, *chunk],
        )


def _lock_clause(tx: Tx) -> str:
    return " FOR UPDATE OF t SKIP LOCKED" if tx.dialect.kind == "postgresql" else ""


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


def insert_tasks(tx: Tx, tasks: Sequence[NewTask], claim: Optional[Claim] = None) -> None:
    """Store new tasks; with a ``claim``, as its instance's to publish (others only
    once the claim expired)."""
    # The optional columns are named only when they are used.
    with_resources = any(t.resource_specification is not None for t in tasks)
    with_runtime = any(t.user_runtime is not None for t in tasks)
    extra_column = (", resource_specification" if with_resources else "") + (
        ", user_runtime" if with_runtime else ""
    )
    extra_value = ", ?" * (with_resources + with_runtime)
    if claim is not None:
        extra_column += ", claimed_by, claimed_until"
        extra_value += ", ?, ?"
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
                *((claim.instance, t.created + claim.seconds) if claim is not None else ()),
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


def unsent_tasks(
    tx: Tx,
    limit: int,
    created_before: float,
    claim: Optional[Claim] = None,
    now: Optional[float] = None,
) -> List[UnsentTask]:
    """Tasks not yet confirmed by the broker, oldest first, with their task buffers
    and their functions' containers; with a ``claim``, only those free for its
    instance at ``now``, which are claimed for it."""
    now = created_before if now is None else now
    params: List[Any] = [created_before]
    if claim is not None:
        params += [claim.instance, now]
    rows = tx.execute(
        "SELECT t.task_id, t.endpoint_id, t.function_id, t.payload, f.function_code, "
        "f.container_uuid, t.resource_specification, t.user_runtime "
        "FROM tasks t JOIN functions f ON f.function_id = t.function_id "
        f"WHERE t.sent = 0 AND t.created < ? AND {_claimable(claim, 't.')} "
        f"ORDER BY t.created LIMIT ?{_lock_clause(tx) if claim is not None else ''}",
        (*params, limit),
    ).fetchall()
    _take(tx, [row[0] for row in rows], claim, now)
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
    tx: Tx,
    results: Sequence[IncomingResult],
    now: Optional[float] = None,
    claim: Optional[Claim] = None,
) -> List[StoredOutcome]:
    """Store each result unless its task is done already (the first result wins);
    ``now`` is when the task finished (retention counts from it); with a
    ``claim``, the stored ones' result copies are its instance's to send."""
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
            "finished = ?, details = ?, attempts = COALESCE(?, attempts) "
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
                result.attempts,
                result.task_id,
            ),
        ).rowcount
        if updated:
            known[result.task_id] = (endpoint_id, "success", ws_queue)
            outcomes.append(StoredOutcome(result.task_id, "stored", ws_queue))
            if ws_queue is not None:
                _take(tx, [result.task_id], claim, 0.0 if now is None else now)
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


def pending_copies(
    tx: Tx, limit: int, claim: Optional[Claim] = None, now: float = 0.0
) -> List[ResultCopy]:
    """Result copies not yet confirmed (with a ``claim``: those free for its instance,
    which are claimed for it)."""
    params: List[Any] = [] if claim is None else [claim.instance, now]
    rows = tx.execute(
        "SELECT t.task_id, t.ws_queue, t.status, t.result, t.exception, t.error_code, "
        f"t.error_message, t.completion_t FROM tasks t WHERE t.ws_pending = 1 "
        f"AND {_claimable(claim, 't.')} ORDER BY t.created LIMIT ?"
        f"{_lock_clause(tx) if claim is not None else ''}",
        (*params, limit),
    ).fetchall()
    _take(tx, [row[0] for row in rows], claim, now)
    return [
        ResultCopy(task_id, queue, status, result if status == "success" else exc, code, msg, ct)
        for task_id, queue, status, result, exc, code, msg, ct in rows
    ]


def mark_copied(tx: Tx, task_ids: Sequence[str]) -> None:
    tx.execute_in("UPDATE tasks SET ws_pending = 0 WHERE task_id IN ({ids})", task_ids)
