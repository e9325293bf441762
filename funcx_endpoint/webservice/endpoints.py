"""The endpoints the service knows: registrations, locks, whitelists, status reports.

Plain functions of a :class:`~funcx_endpoint.webservice.db.Tx` (one
transaction): :class:`~funcx_endpoint.webservice.storage.Storage` runs them
in database threads.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from funcx_endpoint.webservice.db import Tx
from funcx_endpoint.webservice.records import DONE_SQL, ENDPOINT_COLUMNS, Endpoint, Report

#: Task states of status reports, as the task status the API shows, and how far along.
_STATE_STATUS = {
    "waiting-for-nodes": "waiting-for-nodes",
    "waiting-for-launch": "waiting-for-launch",
    "running": "running",
    "execution-start": "running",
    "execution-end": "running",
}
_STATUS_RANK = {"waiting-for-ep": 0, "waiting-for-nodes": 1, "waiting-for-launch": 2, "running": 3}


def get_endpoint(tx: Tx, endpoint_id: str) -> Optional[Endpoint]:
    row = tx.execute(
        f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE endpoint_id = ?", (endpoint_id,)
    ).fetchone()
    return None if row is None else Endpoint.from_row(row)


def get_endpoints(tx: Tx, endpoint_ids: Sequence[str]) -> Dict[str, Endpoint]:
    rows = tx.rows_in(
        f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE endpoint_id IN ({{ids}})", endpoint_ids
    )
    endpoints = [Endpoint.from_row(row) for row in rows]
    return {endpoint.endpoint_id: endpoint for endpoint in endpoints}


def list_endpoints(tx: Tx, owner: str) -> List[Endpoint]:
    return [
        Endpoint.from_row(row)
        for row in tx.execute(
            f"SELECT {ENDPOINT_COLUMNS} FROM endpoints "
            "WHERE owner = ? AND deleted_at IS NULL ORDER BY created",
            (owner,),
        ).fetchall()
    ]


def consume_lock(tx: Tx, endpoint_id: str) -> bool:
    """Unlock a locked endpoint; whether it was locked."""
    return tx.changes(
        "UPDATE endpoints SET locked = 0 WHERE endpoint_id = ? AND locked = 1", (endpoint_id,)
    )


def save_registration(
    tx: Tx,
    endpoint_id: str,
    owner: str,
    name: str,
    metadata: Dict[str, Any],
    allowed_functions: Optional[List[str]],
    heartbeat_period: Optional[float],
    heartbeat_threshold: Optional[float],
    broker_user: str,
    broker_password: str,
    ip_address: Optional[str],
    now: float,
) -> Optional[Endpoint]:
    """Create the endpoint or update the caller's own; None if it is another's or deleted.

    An existing endpoint keeps its broker user and password.
    """
    tx.execute(
        "INSERT INTO endpoints (endpoint_id, owner, name, metadata, allowed_functions, "
        "heartbeat_period, heartbeat_threshold, broker_user, broker_password, created, "
        "registered_at, ip_address) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (endpoint_id) DO UPDATE SET name = excluded.name, "
        "metadata = excluded.metadata, allowed_functions = excluded.allowed_functions, "
        "heartbeat_period = excluded.heartbeat_period, "
        "heartbeat_threshold = excluded.heartbeat_threshold, "
        "registered_at = excluded.registered_at, ip_address = excluded.ip_address, "
        "registrations = endpoints.registrations + 1 "
        "WHERE endpoints.owner = excluded.owner AND endpoints.deleted_at IS NULL",
        (
            endpoint_id,
            owner,
            name,
            json.dumps(metadata),
            None if allowed_functions is None else json.dumps(allowed_functions),
            heartbeat_period,
            heartbeat_threshold,
            broker_user,
            broker_password,
            now,
            now,
            ip_address,
        ),
    )
    endpoint = get_endpoint(tx, endpoint_id)
    if endpoint is None or endpoint.owner != owner or endpoint.deleted_at is not None:
        return None
    return endpoint


def lock_endpoint(tx: Tx, endpoint_id: str) -> None:
    tx.execute("UPDATE endpoints SET locked = 1 WHERE endpoint_id = ?", (endpoint_id,))


def delete_endpoint(tx: Tx, endpoint_id: str, now: float, message: str) -> int:
    """Mark the endpoint deleted and fail its unfinished tasks; how many failed."""
    tx.execute(
        "UPDATE endpoints SET deleted_at = ?, locked = 0 WHERE endpoint_id = ?",
        (now, endpoint_id),
    )
    tx.execute("DELETE FROM whitelist WHERE endpoint_id = ?", (endpoint_id,))
    return tx.execute(
        "UPDATE tasks SET status = 'failed', sent = 1, payload = NULL, completion_t = ?, "
        "exception = ?, error_code = 'EndpointDeleted', error_message = ?, "
        "ws_pending = CASE WHEN ws_queue IS NULL THEN 0 ELSE 1 END, finished = ? "
        f"WHERE endpoint_id = ? AND status NOT IN {DONE_SQL}",
        (f"{now:.3f}", message, message, now, endpoint_id),
    ).rowcount


def get_whitelist(tx: Tx, endpoint_id: str) -> List[str]:
    return [
        row[0]
        for row in tx.execute(
            "SELECT function_id FROM whitelist WHERE endpoint_id = ? ORDER BY function_id",
            (endpoint_id,),
        ).fetchall()
    ]


def whitelists(tx: Tx, endpoint_ids: Sequence[str]) -> Dict[str, List[str]]:
    found: Dict[str, List[str]] = {}
    for endpoint_id, function_id in tx.rows_in(
        "SELECT endpoint_id, function_id FROM whitelist WHERE endpoint_id IN ({ids})",
        endpoint_ids,
    ):
        found.setdefault(endpoint_id, []).append(function_id)
    return found


def add_to_whitelist(tx: Tx, endpoint_id: str, function_ids: Sequence[str]) -> None:
    tx.executemany(
        "INSERT INTO whitelist (endpoint_id, function_id) VALUES (?, ?) "
        "ON CONFLICT (endpoint_id, function_id) DO NOTHING",
        [(endpoint_id, function_id) for function_id in function_ids],
    )


def remove_from_whitelist(tx: Tx, endpoint_id: str, function_id: str) -> bool:
    return tx.changes(
        "DELETE FROM whitelist WHERE endpoint_id = ? AND function_id = ?",
        (endpoint_id, function_id),
    )


def record_reports(tx: Tx, reports: Sequence[Report], log_size: int) -> int:
    """Record status reports; apply their task transitions; tasks whose status moved."""
    moved = 0
    for report in reports:
        if report.states_only:
            moved += _apply_transitions(tx, report.endpoint_id, report.task_statuses)
            continue
        row = tx.execute(
            "SELECT recent_reports FROM endpoints WHERE endpoint_id = ? AND deleted_at IS NULL",
            (report.endpoint_id,),
        ).fetchone()
        if row is None:
            continue
        recent = json.loads(row[0]) if row[0] else []
        entry = {
            "timestamp": round(report.received, 3),
            "final": report.final,
            "global_state": report.global_state,
            "task_statuses": sum(len(v) for v in report.task_statuses.values()),
        }
        recent = [entry, *recent][:log_size]
        column = "final_report_at" if report.final else "last_report_at"
        tx.execute(
            f"UPDATE endpoints SET {column} = ?, recent_reports = ? WHERE endpoint_id = ?",
            (report.received, json.dumps(recent), report.endpoint_id),
        )
        if not report.final:
            _keep_history(tx, report)
        if report.task_statuses:
            moved += _apply_transitions(tx, report.endpoint_id, report.task_statuses)
    return moved


#: How long the counts of each status report are kept (the portal's charts show an hour).
HISTORY_SECONDS = 3600.0


def _count(value: Any) -> int:
    """A report's count as a stored integer (0 for what is not a finite number)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0
    return max(0, min(int(value), 2**62))


def _keep_history(tx: Tx, report: Report) -> None:
    """Keep the report's counts for :data:`HISTORY_SECONDS`, dropping older ones."""
    state = report.global_state
    tx.execute(
        "INSERT INTO status_history (endpoint_id, at, managers, total_workers, idle_workers, "
        "pending_tasks) VALUES (?, ?, ?, ?, ?, ?)",
        (
            report.endpoint_id,
            report.received,
            _count(state.get("managers")),
            _count(state.get("total_workers")),
            _count(state.get("idle_workers")),
            _count(state.get("pending_tasks")),
        ),
    )
    tx.execute(
        "DELETE FROM status_history WHERE endpoint_id = ? AND at < ?",
        (report.endpoint_id, report.received - HISTORY_SECONDS),
    )


def _apply_transitions(
    tx: Tx, endpoint_id: str, task_statuses: Dict[str, List[Tuple[int, str]]]
) -> int:
    latest: Dict[str, str] = {}
    for task_id, transitions in task_statuses.items():
        best: Optional[Tuple[int, str]] = None
        for timestamp, state in transitions:
            status = _STATE_STATUS.get(state)
            if status is not None and (best is None or timestamp >= best[0]):
                best = (timestamp, status)
        if best is not None:
            latest[task_id] = best[1]
    moved = 0
    for task_id, status in tx.rows_in(
        "SELECT task_id, status FROM tasks WHERE task_id IN ({ids}) "
        f"AND endpoint_id = ? AND status NOT IN {DONE_SQL}",
        list(latest),
        endpoint_id,
    ):
        new = latest[task_id]
        if _STATUS_RANK.get(new, 0) > _STATUS_RANK.get(status, 0):
            moved += tx.execute(
                f"UPDATE tasks SET status = ? WHERE task_id = ? AND status NOT IN {DONE_SQL}",
                (new, task_id),
            ).rowcount
    return moved
