"""What the portal keeps and reads in the service's database.

Plain functions of a :class:`~funcx_endpoint.webservice.db.Tx` (one transaction),
run by :class:`~funcx_endpoint.webservice.storage.Storage` (``storage.run``) in the
service and directly by ``funcx-service portal-link``.

Sessions and one-time sign-in links are stored as SHA-256 hashes of their random
tokens, with their expiry, so that a copy of the database signs nobody in and a
session can be revoked.  Every listing takes the owner and selects ``owner = ?``:
the portal shows a user only what the REST API would.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr

from funcx_endpoint.webservice.accounts import _CLIENT_SELECT, _client
from funcx_endpoint.webservice.db import Tx
from funcx_endpoint.webservice.endpoints import HISTORY_SECONDS
from funcx_endpoint.webservice.records import Client

__all__ = [
    "FunctionRow",
    "Session",
    "TaskRow",
    "active_client_named",
    "finished_per_bin",
    "find_session",
    "insert_link",
    "insert_session",
    "list_functions",
    "list_tasks",
    "purge",
    "revoke_session",
    "revoke_sessions",
    "status_history",
    "task_row",
    "token_hash",
    "use_link",
]


def token_hash(token: str) -> str:
    """What is stored of a session or link token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@attr.s(auto_attribs=True, frozen=True)
class Session:
    """A signed-in browser: whose, its CSRF token, until when."""

    identity_id: str
    client_id: str
    csrf: str
    created: float
    expires: float
    username: str = ""


def insert_session(
    tx: Tx, hashed: str, identity_id: str, client_id: str, csrf: str, now: float, expires: float
) -> None:
    tx.execute(
        "INSERT INTO portal_sessions (session_hash, identity_id, client_id, csrf, created, "
        "expires) VALUES (?, ?, ?, ?, ?, ?)",
        (hashed, identity_id, client_id, csrf, now, expires),
    )


def find_session(tx: Tx, hashed: str, now: float) -> Optional[Session]:
    """The session, unless unknown, revoked, expired, or its client revoked."""
    row = tx.execute(
        "SELECT s.identity_id, s.client_id, s.csrf, s.created, s.expires, i.username "
        "FROM portal_sessions s JOIN clients c ON c.client_id = s.client_id "
        "JOIN identities i ON i.identity_id = s.identity_id "
        "WHERE s.session_hash = ? AND s.revoked = 0 AND s.expires > ? AND c.revoked_at IS NULL",
        (hashed, now),
    ).fetchone()
    return None if row is None else Session(*row)


def revoke_session(tx: Tx, hashed: str) -> bool:
    return tx.changes("UPDATE portal_sessions SET revoked = 1 WHERE session_hash = ?", (hashed,))


def revoke_sessions(tx: Tx, identity_id: str) -> int:
    """Revoke every session of ``identity_id``; how many were active."""
    return int(
        tx.execute(
            "UPDATE portal_sessions SET revoked = 1 WHERE identity_id = ? AND revoked = 0",
            (identity_id,),
        ).rowcount
    )


def insert_link(
    tx: Tx, hashed: str, identity_id: str, client_id: str, now: float, expires: float
) -> None:
    tx.execute(
        "INSERT INTO portal_links (link_hash, identity_id, client_id, created, expires) "
        "VALUES (?, ?, ?, ?, ?)",
        (hashed, identity_id, client_id, now, expires),
    )


def use_link(tx: Tx, hashed: str, now: float) -> Optional[Tuple[str, str]]:
    """``(identity_id, client_id)`` of an unused, unexpired link, now used; else None."""
    if not tx.changes(
        "UPDATE portal_links SET used = ? WHERE link_hash = ? AND used IS NULL AND expires > ?",
        (now, hashed, now),
    ):
        return None
    row = tx.execute(
        "SELECT l.identity_id, l.client_id FROM portal_links l "
        "JOIN clients c ON c.client_id = l.client_id "
        "WHERE l.link_hash = ? AND c.revoked_at IS NULL",
        (hashed,),
    ).fetchone()
    return None if row is None else (row[0], row[1])


def purge(tx: Tx, now: float) -> int:
    """Delete expired or revoked sessions, expired links, and status history older than
    an hour (of endpoints that no longer report); how many rows."""
    count = tx.execute(
        "DELETE FROM portal_sessions WHERE expires <= ? OR revoked = 1", (now,)
    ).rowcount
    count += tx.execute("DELETE FROM portal_links WHERE expires <= ?", (now,)).rowcount
    count += tx.execute(
        "DELETE FROM status_history WHERE at < ?", (now - HISTORY_SECONDS,)
    ).rowcount
    return int(count)


def active_client_named(tx: Tx, name: str) -> Optional[Client]:
    """The active client called ``name`` (or with id ``name``)."""
    row = tx.execute(
        _CLIENT_SELECT + " WHERE (c.name = ? OR c.client_id = ?) AND c.revoked_at IS NULL",
        (name, name),
    ).fetchone()
    return None if row is None else _client(row)


# ---------------------------------------------------------------------------
# listings, all by owner


@attr.s(auto_attribs=True, frozen=True)
class FunctionRow:
    function_id: str
    name: str
    description: Optional[str]
    created: float
    public: bool
    container_uuid: Optional[str]


def list_functions(tx: Tx, owner: str) -> List[FunctionRow]:
    return [
        FunctionRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5])
        for r in tx.execute(
            "SELECT function_id, name, description, created, public, container_uuid "
            "FROM functions WHERE owner = ? ORDER BY created DESC",
            (owner,),
        ).fetchall()
    ]


@attr.s(auto_attribs=True, frozen=True)
class TaskRow:
    """A task as the portal lists it; ``result`` and ``exception`` only for one task."""

    task_id: str
    function_id: str
    function_name: Optional[str]
    endpoint_id: str
    task_group_id: str
    status: str
    created: float
    finished: Optional[float]
    error_code: Optional[str]
    error_message: Optional[str]
    #: How many times the endpoint sent it to a manager (None: not known yet).
    attempts: Optional[int] = None
    result: Optional[str] = None
    exception: Optional[str] = None
    details: Optional[str] = None


_TASK_SELECT = (
    "SELECT t.task_id, t.function_id, f.name, t.endpoint_id, t.task_group_id, t.status, "
    "t.created, t.finished, t.error_code, t.error_message, t.attempts"
)
_TASK_FROM = " FROM tasks t LEFT JOIN functions f ON f.function_id = t.function_id"


def list_tasks(
    tx: Tx,
    owner: str,
    limit: int,
    offset: int,
    endpoint_id: Optional[str] = None,
    group: Optional[str] = None,
) -> Tuple[List[TaskRow], int]:
    """A page of ``owner``'s tasks, newest first, and how many there are in all."""
    where = " WHERE t.owner = ?"
    params: List[Any] = [owner]
    if endpoint_id is not None:
        where += " AND t.endpoint_id = ?"
        params.append(endpoint_id)
    if group is not None:
        where += " AND t.task_group_id = ?"
        params.append(group)
    counted = tx.execute("SELECT COUNT(*) FROM tasks t" + where, params).fetchone()
    total = counted[0] if counted else 0
    order = " ORDER BY t.created ASC, t.task_id" if group else " ORDER BY t.created DESC, t.task_id"
    rows = tx.execute(
        _TASK_SELECT + _TASK_FROM + where + order + " LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return [TaskRow(*row) for row in rows], int(total)


def task_row(tx: Tx, task_id: str, owner: str) -> Optional[TaskRow]:
    row = tx.execute(
        _TASK_SELECT
        + ", t.result, t.exception, t.details"
        + _TASK_FROM
        + " WHERE t.task_id = ? AND t.owner = ?",
        (task_id, owner),
    ).fetchone()
    return None if row is None else TaskRow(*row)


def tasks_by_id(tx: Tx, task_ids: Sequence[str], owner: str) -> Dict[str, TaskRow]:
    rows = tx.rows_in(
        _TASK_SELECT + _TASK_FROM + " WHERE t.task_id IN ({ids}) AND t.owner = ?",
        task_ids,
        owner,
    )
    return {row[0]: TaskRow(*row) for row in rows}


History = List[Tuple[float, int, int, int, int]]


def status_history(tx: Tx, endpoint_id: str, since: float) -> History:
    """``(at, managers, total_workers, idle_workers, pending_tasks)`` since ``since``."""
    return [
        (float(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]))
        for r in tx.execute(
            "SELECT at, managers, total_workers, idle_workers, pending_tasks "
            "FROM status_history WHERE endpoint_id = ? AND at >= ? ORDER BY at",
            (endpoint_id, since),
        ).fetchall()
    ]


def finished_per_bin(tx: Tx, endpoint_id: str, since: float, width: float) -> Dict[int, int]:
    """Tasks of the endpoint finished since ``since``, counted per ``width`` seconds."""
    floor = "FLOOR" if tx.dialect.kind == "postgresql" else ""
    rows = tx.execute(
        f"SELECT CAST({floor}((finished - ?) / ?) AS INTEGER) AS bin, COUNT(*) FROM tasks "
        "WHERE endpoint_id = ? AND finished IS NOT NULL AND finished >= ? GROUP BY bin",
        (since, width, endpoint_id, since),
    ).fetchall()
    return {int(r[0]): int(r[1]) for r in rows}
