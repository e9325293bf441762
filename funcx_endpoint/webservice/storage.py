"""What the service stores, and how: clients, tokens, functions, endpoints, tasks.

Each operation is a plain function of a :class:`~funcx_endpoint.webservice.db.Tx`
(one transaction), so the command-line tools can run it directly, and
:class:`Storage` runs it in adbapi's database threads for the service:
``await storage.get_tasks(ids, owner)``.  Nothing here touches the reactor.

Results are stored once: the first result of a task wins, later ones are
reported as duplicates and change nothing (the ``status`` guard in
:func:`store_results` makes that true even with concurrent writers).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, cast

import attr
from twisted.internet.defer import Deferred

from funcx_endpoint.webservice.db import (
    DatabaseConfig,
    Dialect,
    IConnectionPool,
    Tx,
    chunks,
    make_pool,
    marks,
    migrate,
)

_T = TypeVar("_T")

DONE_STATUSES = ("success", "failed")
_DONE_SQL = "('success', 'failed')"

#: Task states of status reports, as the task status the API shows, and how far along.
_STATE_STATUS = {
    "waiting-for-nodes": "waiting-for-nodes",
    "waiting-for-launch": "waiting-for-launch",
    "running": "running",
    "execution-start": "running",
    "execution-end": "running",
}
_STATUS_RANK = {"waiting-for-ep": 0, "waiting-for-nodes": 1, "waiting-for-launch": 2, "running": 3}


class NameTaken(Exception):
    """A client with that name exists (and is not revoked)."""


# ---------------------------------------------------------------------------
# records


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


_ENDPOINT_COLUMNS = (
    "endpoint_id, owner, name, metadata, allowed_functions, heartbeat_period, "
    "heartbeat_threshold, broker_user, broker_password, locked, deleted_at, created, "
    "registered_at, registrations, ip_address, last_report_at, final_report_at, recent_reports"
)


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
        (
            eid,
            owner,
            name,
            metadata,
            allowed,
            period,
            threshold,
            user,
            password,
            locked,
            deleted,
            created,
            registered,
            registrations,
            ip,
            last,
            final,
            reports,
        ) = row
        return cls(
            eid,
            owner,
            name,
            json.loads(metadata) if metadata else {},
            json.loads(allowed) if allowed else None,
            period,
            threshold,
            user,
            password,
            bool(locked),
            deleted,
            created,
            registered,
            registrations,
            ip,
            last,
            final,
            json.loads(reports) if reports else [],
        )

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


@attr.s(auto_attribs=True, frozen=True)
class IncomingResult:
    """A result from the broker: ``endpoint_id`` is the one its routing key names."""

    task_id: str
    endpoint_id: str
    data: str
    error_code: Optional[str]
    error_message: Optional[str]
    completion_t: str


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


_TASK_COLUMNS = "task_id, owner, status, completion_t, result, exception, error_code, error_message"


def task_view(row: Sequence[Any]) -> Dict[str, Any]:
    """The API's answer about a task (``GET /tasks/<id>``) from its row."""
    task_id, _owner, status, completion_t, result, exception, code, message = row
    answer: Dict[str, Any] = {"task_id": task_id, "status": status}
    if status in DONE_STATUSES:
        answer["completion_t"] = completion_t
        if status == "success":
            answer["result"] = result
        else:
            answer["exception"] = exception
            answer["error_details"] = {"code": code, "user_message": message}
    return answer


# ---------------------------------------------------------------------------
# clients, identities, tokens


def _client(row: Sequence[Any]) -> Client:
    return Client(*row)


_CLIENT_SELECT = (
    "SELECT c.client_id, c.name, c.identity_id, c.secret_hash, c.created, c.revoked_at, "
    "i.username FROM clients c JOIN identities i ON i.identity_id = c.identity_id"
)


def create_client(tx: Tx, client_id: str, name: str, secret_hash: str, now: float) -> Client:
    """A new client and its own identity; NameTaken if an active client has ``name``."""
    if tx.execute(
        "SELECT 1 FROM clients WHERE name = ? AND revoked_at IS NULL", (name,)
    ).fetchone():
        raise NameTaken(name)
    identity_id = str(uuid.uuid4())
    username = f"{name}@funcx-service"
    tx.execute(
        "INSERT INTO identities (identity_id, username, name, email, created) "
        "VALUES (?, ?, ?, ?, ?)",
        (identity_id, username, name, None, now),
    )
    tx.execute(
        "INSERT INTO clients (client_id, name, identity_id, secret_hash, created) "
        "VALUES (?, ?, ?, ?, ?)",
        (client_id, name, identity_id, secret_hash, now),
    )
    return Client(client_id, name, identity_id, secret_hash, now, None, username)


def get_client(tx: Tx, client_id: str) -> Optional[Client]:
    row = tx.execute(_CLIENT_SELECT + " WHERE c.client_id = ?", (client_id,)).fetchone()
    return None if row is None else _client(row)


def list_clients(tx: Tx) -> List[Client]:
    return [_client(r) for r in tx.execute(_CLIENT_SELECT + " ORDER BY c.created").fetchall()]


def revoke_client(tx: Tx, key: str, now: float) -> Optional[Client]:
    """Revoke the active client whose id or name is ``key``, and all its tokens."""
    row = tx.execute(
        _CLIENT_SELECT + " WHERE (c.client_id = ? OR c.name = ?) AND c.revoked_at IS NULL",
        (key, key),
    ).fetchone()
    if row is None:
        return None
    client = _client(row)
    tx.execute("UPDATE clients SET revoked_at = ? WHERE client_id = ?", (now, client.client_id))
    tx.execute("UPDATE tokens SET revoked = 1 WHERE client_id = ?", (client.client_id,))
    return attr.evolve(client, revoked_at=now)


def get_identities(tx: Tx, identity_ids: Sequence[str]) -> List[Identity]:
    found: List[Identity] = []
    for chunk in chunks(list(identity_ids)):
        found += [
            Identity(*row)
            for row in tx.execute(
                "SELECT identity_id, username, name, email FROM identities "
                f"WHERE identity_id IN ({marks(len(chunk))})",
                chunk,
            ).fetchall()
        ]
    return found


def insert_token(tx: Tx, token_hash: str, info: TokenInfo) -> None:
    tx.execute(
        "INSERT INTO tokens (token_hash, identity_id, client_id, resource_server, scope, "
        "issued, expires) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            token_hash,
            info.identity_id,
            info.client_id,
            info.resource_server,
            info.scope,
            info.issued,
            info.expires,
        ),
    )


def find_token(tx: Tx, token_hash: str) -> Optional[TokenInfo]:
    """The token with this hash, valid or not (``revoked`` also if its client is)."""
    row = tx.execute(
        "SELECT t.identity_id, t.client_id, t.resource_server, t.scope, t.issued, t.expires, "
        "t.revoked, c.revoked_at FROM tokens t JOIN clients c ON c.client_id = t.client_id "
        "WHERE t.token_hash = ?",
        (token_hash,),
    ).fetchone()
    if row is None:
        return None
    identity_id, client_id, server, scope, issued, expires, revoked, client_revoked = row
    return TokenInfo(
        identity_id,
        client_id,
        server,
        scope,
        issued,
        expires,
        revoked=bool(revoked) or client_revoked is not None,
    )


def revoke_token(tx: Tx, token_hash: str) -> bool:
    return (
        tx.execute(
            "UPDATE tokens SET revoked = 1 WHERE token_hash = ? AND revoked = 0", (token_hash,)
        ).rowcount
        > 0
    )


def purge_tokens(tx: Tx, now: float) -> int:
    """Forget tokens that expired (or were revoked) more than a day ago."""
    return tx.execute("DELETE FROM tokens WHERE expires < ?", (now - 86400,)).rowcount


# ---------------------------------------------------------------------------
# functions


def insert_function(tx: Tx, row: Dict[str, Any]) -> None:
    tx.execute(
        "INSERT INTO functions (function_id, owner, name, entry_point, description, "
        "container_uuid, public, group_id, function_code, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        ),
    )


def visible_functions(
    tx: Tx, function_ids: Sequence[str], identity: str
) -> Dict[str, FunctionInfo]:
    """Those of ``function_ids`` that ``identity`` may use (its own, or public)."""
    found: Dict[str, FunctionInfo] = {}
    for chunk in chunks(list(function_ids)):
        for row in tx.execute(
            "SELECT function_id, owner, public, function_code, container_uuid FROM functions "
            f"WHERE function_id IN ({marks(len(chunk))}) AND (owner = ? OR public = 1)",
            [*chunk, identity],
        ).fetchall():
            found[row[0]] = FunctionInfo(row[0], row[1], bool(row[2]), row[3], row[4])
    return found


# ---------------------------------------------------------------------------
# endpoints


def get_endpoint(tx: Tx, endpoint_id: str) -> Optional[Endpoint]:
    row = tx.execute(
        f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints WHERE endpoint_id = ?", (endpoint_id,)
    ).fetchone()
    return None if row is None else Endpoint.from_row(row)


def get_endpoints(tx: Tx, endpoint_ids: Sequence[str]) -> Dict[str, Endpoint]:
    found: Dict[str, Endpoint] = {}
    for chunk in chunks(list(endpoint_ids)):
        for row in tx.execute(
            f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints WHERE endpoint_id IN ({marks(len(chunk))})",
            chunk,
        ).fetchall():
            endpoint = Endpoint.from_row(row)
            found[endpoint.endpoint_id] = endpoint
    return found


def list_endpoints(tx: Tx, owner: str) -> List[Endpoint]:
    return [
        Endpoint.from_row(row)
        for row in tx.execute(
            f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints "
            "WHERE owner = ? AND deleted_at IS NULL ORDER BY created",
            (owner,),
        ).fetchall()
    ]


def consume_lock(tx: Tx, endpoint_id: str) -> bool:
    """Unlock a locked endpoint; whether it was locked."""
    return (
        tx.execute(
            "UPDATE endpoints SET locked = 0 WHERE endpoint_id = ? AND locked = 1", (endpoint_id,)
        ).rowcount
        > 0
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
        "ws_pending = CASE WHEN ws_queue IS NULL THEN 0 ELSE 1 END "
        f"WHERE endpoint_id = ? AND status NOT IN {_DONE_SQL}",
        (f"{now:.3f}", message, message, endpoint_id),
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
    for chunk in chunks(list(endpoint_ids)):
        for endpoint_id, function_id in tx.execute(
            "SELECT endpoint_id, function_id FROM whitelist "
            f"WHERE endpoint_id IN ({marks(len(chunk))})",
            chunk,
        ).fetchall():
            found.setdefault(endpoint_id, []).append(function_id)
    return found


def add_to_whitelist(tx: Tx, endpoint_id: str, function_ids: Sequence[str]) -> None:
    tx.executemany(
        "INSERT INTO whitelist (endpoint_id, function_id) VALUES (?, ?) "
        "ON CONFLICT (endpoint_id, function_id) DO NOTHING",
        [(endpoint_id, function_id) for function_id in function_ids],
    )


def remove_from_whitelist(tx: Tx, endpoint_id: str, function_id: str) -> bool:
    return (
        tx.execute(
            "DELETE FROM whitelist WHERE endpoint_id = ? AND function_id = ?",
            (endpoint_id, function_id),
        ).rowcount
        > 0
    )


def record_reports(tx: Tx, reports: Sequence[Report], log_size: int) -> int:
    """Record status reports; apply their task transitions; tasks whose status moved."""
    moved = 0
    for report in reports:
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
        if report.task_statuses:
            moved += _apply_transitions(tx, report.endpoint_id, report.task_statuses)
    return moved


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
    ids = list(latest)
    for chunk in chunks(ids):
        rows = tx.execute(
            f"SELECT task_id, status FROM tasks WHERE task_id IN ({marks(len(chunk))}) "
            f"AND endpoint_id = ? AND status NOT IN {_DONE_SQL}",
            [*chunk, endpoint_id],
        ).fetchall()
        for task_id, status in rows:
            new = latest[task_id]
            if _STATUS_RANK.get(new, 0) > _STATUS_RANK.get(status, 0):
                moved += tx.execute(
                    f"UPDATE tasks SET status = ? WHERE task_id = ? AND status NOT IN {_DONE_SQL}",
                    (new, task_id),
                ).rowcount
    return moved


def get_user_broker(tx: Tx, identity_id: str) -> Optional[Tuple[str, str]]:
    row = tx.execute(
        "SELECT broker_user, broker_password FROM user_brokers WHERE identity_id = ?",
        (identity_id,),
    ).fetchone()
    return None if row is None else (row[0], row[1])


def save_user_broker(tx: Tx, identity_id: str, user: str, password: str) -> Tuple[str, str]:
    """Store the identity's broker user unless it has one; the one stored."""
    tx.execute(
        "INSERT INTO user_brokers (identity_id, broker_user, broker_password) VALUES (?, ?, ?) "
        "ON CONFLICT (identity_id) DO NOTHING",
        (identity_id, user, password),
    )
    stored = get_user_broker(tx, identity_id)
    assert stored is not None
    return stored


# ---------------------------------------------------------------------------
# tasks


def insert_tasks(tx: Tx, tasks: Sequence[NewTask]) -> None:
    tx.executemany(
        "INSERT INTO tasks (task_id, owner, function_id, endpoint_id, task_group_id, payload, "
        "status, created, ws_queue) VALUES (?, ?, ?, ?, ?, ?, 'waiting-for-ep', ?, ?)",
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
            )
            for t in tasks
        ],
    )


def mark_sent(tx: Tx, task_ids: Sequence[str]) -> None:
    for chunk in chunks(list(task_ids)):
        tx.execute(f"UPDATE tasks SET sent = 1 WHERE task_id IN ({marks(len(chunk))})", chunk)


def send_unfinished_again(tx: Tx, endpoint_id: str) -> int:
    """Mark the endpoint's unfinished tasks unsent (they are published again); how many."""
    cursor = tx.execute(
        f"UPDATE tasks SET sent = 0 WHERE endpoint_id = ? AND sent = 1 "
        f"AND status NOT IN {_DONE_SQL}",
        (endpoint_id,),
    )
    return int(cursor.rowcount or 0)


def unsent_tasks(tx: Tx, limit: int, created_before: float) -> List[UnsentTask]:
    """Tasks not yet confirmed by the broker, oldest first, with their task buffers."""
    rows = tx.execute(
        "SELECT t.task_id, t.endpoint_id, t.function_id, t.payload, f.function_code, "
        "f.container_uuid FROM tasks t JOIN functions f ON f.function_id = t.function_id "
        "WHERE t.sent = 0 AND t.created < ? ORDER BY t.created LIMIT ?",
        (created_before, limit),
    ).fetchall()
    return [
        UnsentTask(task_id, endpoint_id, function_id, code + (payload or ""), container)
        for task_id, endpoint_id, function_id, payload, code, container in rows
    ]


def store_results(tx: Tx, results: Sequence[IncomingResult]) -> List[StoredOutcome]:
    """Store each result unless its task is done already (the first result wins)."""
    known: Dict[str, Tuple[str, str, Optional[str]]] = {}
    ids = list({r.task_id for r in results})
    for chunk in chunks(ids):
        for task_id, endpoint_id, status, ws_queue in tx.execute(
            "SELECT task_id, endpoint_id, status, ws_queue FROM tasks "
            f"WHERE task_id IN ({marks(len(chunk))})",
            chunk,
        ).fetchall():
            known[task_id] = (endpoint_id, status, ws_queue)
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
            "result = ?, exception = ?, error_code = ?, error_message = ?, ws_pending = ? "
            f"WHERE task_id = ? AND status NOT IN {_DONE_SQL}",
            (
                "failed" if failed else "success",
                result.completion_t,
                None if failed else result.data,
                result.data if failed else None,
                result.error_code,
                result.error_message,
                0 if ws_queue is None else 1,
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
    found: Dict[str, Dict[str, Any]] = {}
    for chunk in chunks(list(task_ids)):
        for row in tx.execute(
            f"SELECT {_TASK_COLUMNS} FROM tasks "
            f"WHERE task_id IN ({marks(len(chunk))}) AND owner = ?",
            [*chunk, owner],
        ).fetchall():
            found[row[0]] = task_view(row)
    return found


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
    for chunk in chunks(list(task_ids)):
        tx.execute(f"UPDATE tasks SET ws_pending = 0 WHERE task_id IN ({marks(len(chunk))})", chunk)


def count_online_candidates(tx: Tx, since: float) -> int:
    """Endpoints that reported since ``since`` (for ``funcx-service status``)."""
    row = tx.execute(
        "SELECT COUNT(*) FROM endpoints WHERE deleted_at IS NULL AND last_report_at >= ? "
        "AND (final_report_at IS NULL OR final_report_at < last_report_at)",
        (since,),
    ).fetchone()
    return int(row[0]) if row else 0


def counts(tx: Tx) -> Dict[str, int]:
    """How many of each thing are stored (for ``status``)."""
    result = {}
    for table, where in (
        ("clients", "revoked_at IS NULL"),
        ("endpoints", "deleted_at IS NULL"),
        ("functions", "1 = 1"),
        ("tasks", "1 = 1"),
    ):
        row = tx.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()
        result[table] = int(row[0]) if row else 0
    return result


# ---------------------------------------------------------------------------
# the asynchronous face


class Storage:
    """The service's storage: every method runs in a database thread.

    ``open()`` migrates the schema (in a thread) and starts the pool;
    ``close()`` stops it.  A storage given a ``pool`` (any
    :class:`~funcx_endpoint.webservice.db.IConnectionPool`) is open at once:
    the caller has migrated its database.
    """

    def __init__(
        self, config: DatabaseConfig, reactor: Any, *, pool: Optional[IConnectionPool] = None
    ) -> None:
        self.config = config
        self.dialect = Dialect(config.kind)
        self._reactor = reactor
        self._pool: Optional[IConnectionPool] = pool

    def describe(self) -> str:
        return self.config.describe()

    async def open(self) -> Tuple[int, int]:
        from twisted.internet.threads import deferToThreadPool

        versions: Tuple[int, int] = await deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), migrate, self.config
        )
        pool = make_pool(self.config)
        pool.start()
        # adbapi's pool has the methods of IConnectionPool; it cannot declare them.
        self._pool = cast(IConnectionPool, pool)
        return versions

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def run(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """``fn(tx, *args)`` in one transaction (in a database thread, with adbapi's pool)."""
        if self._pool is None:
            raise RuntimeError("the storage is not open")
        dialect = self.dialect
        return self._pool.runInteraction(lambda txn: fn(Tx(txn, dialect), *args))

    # One line per operation: this is the storage interface the service uses.

    def get_client(self, client_id: str) -> Deferred[Optional[Client]]:
        return self.run(get_client, client_id)

    def get_identities(self, ids: Sequence[str]) -> Deferred[List[Identity]]:
        return self.run(get_identities, ids)

    def insert_token(self, token_hash: str, info: TokenInfo) -> Deferred[None]:
        return self.run(insert_token, token_hash, info)

    def find_token(self, token_hash: str) -> Deferred[Optional[TokenInfo]]:
        return self.run(find_token, token_hash)

    def revoke_token(self, token_hash: str) -> Deferred[bool]:
        return self.run(revoke_token, token_hash)

    def purge_tokens(self, now: float) -> Deferred[int]:
        return self.run(purge_tokens, now)

    def insert_function(self, row: Dict[str, Any]) -> Deferred[None]:
        return self.run(insert_function, row)

    def visible_functions(
        self, ids: Sequence[str], identity: str
    ) -> Deferred[Dict[str, FunctionInfo]]:
        return self.run(visible_functions, ids, identity)

    def get_endpoint(self, endpoint_id: str) -> Deferred[Optional[Endpoint]]:
        return self.run(get_endpoint, endpoint_id)

    def list_endpoints(self, owner: str) -> Deferred[List[Endpoint]]:
        return self.run(list_endpoints, owner)

    def consume_lock(self, endpoint_id: str) -> Deferred[bool]:
        return self.run(consume_lock, endpoint_id)

    def save_registration(self, *args: Any) -> Deferred[Optional[Endpoint]]:
        return self.run(save_registration, *args)

    def lock_endpoint(self, endpoint_id: str) -> Deferred[None]:
        return self.run(lock_endpoint, endpoint_id)

    def delete_endpoint(self, endpoint_id: str, now: float, message: str) -> Deferred[int]:
        return self.run(delete_endpoint, endpoint_id, now, message)

    def get_whitelist(self, endpoint_id: str) -> Deferred[List[str]]:
        return self.run(get_whitelist, endpoint_id)

    def add_to_whitelist(self, endpoint_id: str, function_ids: Sequence[str]) -> Deferred[None]:
        return self.run(add_to_whitelist, endpoint_id, function_ids)

    def remove_from_whitelist(self, endpoint_id: str, function_id: str) -> Deferred[bool]:
        return self.run(remove_from_whitelist, endpoint_id, function_id)

    def record_reports(self, reports: Sequence[Report], log_size: int) -> Deferred[int]:
        return self.run(record_reports, reports, log_size)

    def get_user_broker(self, identity_id: str) -> Deferred[Optional[Tuple[str, str]]]:
        return self.run(get_user_broker, identity_id)

    def save_user_broker(
        self, identity_id: str, user: str, password: str
    ) -> Deferred[Tuple[str, str]]:
        return self.run(save_user_broker, identity_id, user, password)

    def submit_context(
        self, function_ids: Sequence[str], endpoint_ids: Sequence[str], identity: str
    ) -> Deferred[Tuple[Dict[str, FunctionInfo], Dict[str, Endpoint], Dict[str, List[str]]]]:
        """The functions, endpoints and whitelists a submit needs, in one transaction."""

        def context(tx: Tx) -> Any:
            return (
                visible_functions(tx, function_ids, identity),
                get_endpoints(tx, endpoint_ids),
                whitelists(tx, endpoint_ids),
            )

        return self.run(context)

    def insert_tasks(self, tasks: Sequence[NewTask]) -> Deferred[None]:
        return self.run(insert_tasks, tasks)

    def mark_sent(self, task_ids: Sequence[str]) -> Deferred[None]:
        return self.run(mark_sent, task_ids)

    def send_unfinished_again(self, endpoint_id: str) -> Deferred[int]:
        return self.run(send_unfinished_again, endpoint_id)

    def unsent_tasks(self, limit: int, created_before: float) -> Deferred[List[UnsentTask]]:
        return self.run(unsent_tasks, limit, created_before)

    def store_results(self, results: Sequence[IncomingResult]) -> Deferred[List[StoredOutcome]]:
        return self.run(store_results, results)

    def get_tasks(self, task_ids: Sequence[str], owner: str) -> Deferred[Dict[str, Dict[str, Any]]]:
        return self.run(get_tasks, task_ids, owner)

    def task_group(self, task_group_id: str, owner: str) -> Deferred[List[str]]:
        return self.run(task_group, task_group_id, owner)

    def pending_copies(self, limit: int) -> Deferred[List[ResultCopy]]:
        return self.run(pending_copies, limit)

    def mark_copied(self, task_ids: Sequence[str]) -> Deferred[None]:
        return self.run(mark_copied, task_ids)


def open_sync(database_url: str) -> Tuple[Any, Callable[[Callable[..., _T]], Callable[..., _T]]]:
    """For tools: a migrated connection, and ``call(fn)(*args)`` running ``fn`` in a transaction."""
    config = DatabaseConfig.from_url(database_url)
    migrate(config)
    from funcx_endpoint.webservice.db import connect

    connection = connect(config)
    dialect = Dialect(config.kind)

    def call(fn: Callable[..., _T]) -> Callable[..., _T]:
        def run(*args: Any) -> _T:
            cursor = connection.cursor()
            try:
                value = fn(Tx(cursor, dialect), *args)
                connection.commit()
                return value
            except BaseException:
                connection.rollback()
                raise
            finally:
                cursor.close()

        return run

    return connection, call


__all__ = [
    "Client",
    "Endpoint",
    "FunctionInfo",
    "Identity",
    "IncomingResult",
    "NameTaken",
    "NewTask",
    "Report",
    "ResultCopy",
    "Storage",
    "StoredOutcome",
    "TokenInfo",
    "UnsentTask",
    "open_sync",
    "task_view",
]
