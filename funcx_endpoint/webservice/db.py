"""SQL databases for the service: SQLite (the default) or PostgreSQL, and migrations.

Queries are written once, with ``?`` placeholders; :class:`Tx` turns them
into the driver's style.  Everything here is synchronous DB-API: the service
runs it in adbapi's threads (:func:`make_pool`), never on the reactor
thread; the command-line tools call it directly (:func:`connect`).

The schema is versioned: ``schema_version`` holds the version, and
:func:`migrate` applies the missing steps of :data:`MIGRATIONS` in one
transaction, holding a lock so that two processes (the service and a
``funcx-service create-client``) starting at once do not both apply them.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import attr
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from zope.interface import Interface

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "DatabaseConfig",
    "DatabaseError",
    "IConnectionPool",
    "Tx",
    "chunks",
    "connect",
    "make_pool",
    "migrate",
]

#: Placeholders per statement for ``IN (...)`` lists (SQLite allows 32766).
CHUNK = 500
_PG_ADVISORY_LOCK = 0x66756E6378  # "funcx"


class DatabaseError(Exception):
    """The database cannot be used (bad URL, driver missing, newer schema...)."""


@attr.s(auto_attribs=True, frozen=True)
class DatabaseConfig:
    """Which database: ``kind`` is ``sqlite`` (``path``) or ``postgresql`` (``dsn``)."""

    kind: str
    path: Optional[str] = None
    dsn: Optional[str] = None

    @classmethod
    def from_url(cls, url: str) -> DatabaseConfig:
        """``sqlite:///abs/path``, ``sqlite:relative/path`` or ``postgresql://...``."""
        if url.startswith(("postgresql://", "postgres://")):
            return cls("postgresql", dsn=url)
        if url.startswith("sqlite:"):
            path = url[len("sqlite:") :]
            if path.startswith("///"):
                path = path[2:]
            elif path.startswith("//"):
                raise DatabaseError(f"use sqlite:///absolute/path, not {url!r}")
            if not path:
                raise DatabaseError("a sqlite: URL needs a file path")
            return cls("sqlite", path=os.path.abspath(path))
        raise DatabaseError(f"unsupported database URL scheme in {redact_url(url)!r}")

    def describe(self) -> str:
        """Where the database is, without a password."""
        if self.kind == "sqlite":
            return f"SQLite {self.path}"
        return f"PostgreSQL {redact_url(self.dsn or '')}"


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


class Dialect:
    """What differs between the two databases."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._cache: Dict[str, str] = {}
        self.real = "DOUBLE PRECISION" if kind == "postgresql" else "REAL"

    def sql(self, query: str) -> str:
        """``query`` with ``?`` placeholders in the driver's style."""
        if self.kind != "postgresql":
            return query
        converted = self._cache.get(query)
        if converted is None:
            # No query of ours has a literal ? or %.
            converted = self._cache[query] = query.replace("?", "%s")
        return converted

    def ddl(self, statement: str) -> str:
        return statement.replace("{REAL}", self.real)


class Tx:
    """A cursor that speaks ``?`` placeholders on either database."""

    __slots__ = ("cursor", "dialect")

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self.cursor = cursor
        self.dialect = dialect

    def execute(self, query: str, params: Sequence[Any] = ()) -> Tx:
        self.cursor.execute(self.dialect.sql(query), tuple(params))
        return self

    def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> Tx:
        params = [tuple(r) for r in rows]
        if self.dialect.kind == "postgresql":
            # psycopg2's executemany is one round trip per row; this sends pages.
            from psycopg2.extras import execute_batch

            execute_batch(_raw_cursor(self.cursor), self.dialect.sql(query), params, page_size=500)
        else:
            self.cursor.executemany(self.dialect.sql(query), params)
        return self

    def fetchone(self) -> Optional[Tuple[Any, ...]]:
        row = self.cursor.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> List[Tuple[Any, ...]]:
        return [tuple(row) for row in self.cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self.cursor.rowcount)

    def changes(self, query: str, params: Sequence[Any] = ()) -> bool:
        """Run ``query``; whether it changed any row."""
        return self.execute(query, params).rowcount > 0

    def rows_in(self, query: str, ids: Sequence[Any], *params: Any) -> List[Tuple[Any, ...]]:
        """All rows of ``query`` for ``ids``, asked :data:`CHUNK` ids at a time.

        ``{ids}`` in ``query`` stands for one chunk's placeholders; ``params``
        fill the placeholders after it.
        """
        rows: List[Tuple[Any, ...]] = []
        for chunk in chunks(list(ids)):
            rows += self.execute(query.format(ids=marks(len(chunk))), [*chunk, *params]).fetchall()
        return rows

    def execute_in(self, query: str, ids: Sequence[Any], *params: Any) -> int:
        """Run ``query`` (as :meth:`rows_in` says) for ``ids``; how many rows it changed."""
        changed = 0
        for chunk in chunks(list(ids)):
            changed += self.execute(query.format(ids=marks(len(chunk))), [*chunk, *params]).rowcount
        return changed


def _raw_cursor(cursor: Any) -> Any:
    """The driver's cursor behind adbapi's Transaction (which only proxies attributes)."""
    inner = getattr(cursor, "_cursor", None)
    return inner if inner is not None else cursor


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def marks(count: int) -> str:
    """``?, ?, ?`` for an ``IN`` list of ``count`` items."""
    return ", ".join("?" * count)


# ---------------------------------------------------------------------------
# connections


class IConnectionPool(Interface):
    """Runs functions of a DB-API cursor, each in a transaction of its own.

    :class:`twisted.enterprise.adbapi.ConnectionPool` (from :func:`make_pool`)
    is the service's: it runs them in database threads.
    """

    def runInteraction(interaction: Any, *args: Any, **kw: Any) -> Deferred[Any]:
        """``interaction(cursor, *args, **kw)``, committed if it returns, rolled back if
        it raises; a Deferred of its result."""

    def close() -> None:
        """Close the connections."""


def _sqlite_setup(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA busy_timeout = 15000")
    # WAL: readers never block the writer, and another process (a
    # `funcx-service create-client`) can use the file while the service runs.
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")


def connect(config: DatabaseConfig) -> Any:
    """A new DB-API connection (blocking; for tools and tests)."""
    if config.kind == "sqlite":
        assert config.path is not None
        os.makedirs(os.path.dirname(config.path), mode=0o700, exist_ok=True)
        created = not os.path.exists(config.path)
        connection = sqlite3.connect(config.path, timeout=15, check_same_thread=False)
        if created:
            os.chmod(config.path, 0o600)
        _sqlite_setup(connection)
        return connection
    psycopg2 = _psycopg2()
    try:
        return psycopg2.connect(config.dsn)
    except psycopg2.Error as e:
        raise DatabaseError(f"cannot connect to {config.describe()}: {str(e).strip()}") from None


def _psycopg2() -> Any:
    try:
        import psycopg2
    except ImportError:
        raise DatabaseError(
            "PostgreSQL needs psycopg2: pip install 'funcx-endpoint[postgresql]' "
            "(or psycopg2-binary)"
        ) from None
    return psycopg2


def make_pool(config: DatabaseConfig) -> adbapi.ConnectionPool:
    """An adbapi pool: one connection (one thread) for SQLite, a few for PostgreSQL.

    Nothing connects until the pool starts (``pool.start()`` or the reactor's
    start).
    """
    if config.kind == "sqlite":
        assert config.path is not None
        os.makedirs(os.path.dirname(config.path), mode=0o700, exist_ok=True)
        return adbapi.ConnectionPool(
            "sqlite3",
            config.path,
            timeout=15,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_noisy=False,
            cp_openfun=_sqlite_setup,
        )
    _psycopg2()
    return adbapi.ConnectionPool(
        "psycopg2", config.dsn, cp_min=1, cp_max=4, cp_noisy=False, cp_reconnect=True
    )


# ---------------------------------------------------------------------------
# schema

#: (version, description, statements); ``{REAL}`` is the float type.
MIGRATIONS: List[Tuple[int, str, List[str]]] = [
    (
        1,
        "identities, clients, tokens, functions, endpoints, tasks",
        [
            """CREATE TABLE identities (
                identity_id TEXT PRIMARY KEY,
                username TEXT NOT NULL,
                name TEXT NOT NULL,
                email TEXT,
                created {REAL} NOT NULL
            )""",
            """CREATE TABLE clients (
                client_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                identity_id TEXT NOT NULL REFERENCES identities (identity_id),
                secret_hash TEXT NOT NULL,
                created {REAL} NOT NULL,
                revoked_at {REAL}
            )""",
            "CREATE UNIQUE INDEX clients_active_name ON clients (name) WHERE revoked_at IS NULL",
            """CREATE TABLE tokens (
                token_hash TEXT PRIMARY KEY,
                identity_id TEXT NOT NULL,
                client_id TEXT NOT NULL,
                resource_server TEXT NOT NULL,
                scope TEXT NOT NULL,
                issued {REAL} NOT NULL,
                expires {REAL} NOT NULL,
                revoked INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX tokens_client ON tokens (client_id)",
            """CREATE TABLE functions (
                function_id TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                entry_point TEXT,
                description TEXT,
                container_uuid TEXT,
                public INTEGER NOT NULL DEFAULT 0,
                group_id TEXT,
                function_code TEXT NOT NULL,
                created {REAL} NOT NULL
            )""",
            "CREATE INDEX functions_owner ON functions (owner)",
            """CREATE TABLE endpoints (
                endpoint_id TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                metadata TEXT NOT NULL,
                allowed_functions TEXT,
                heartbeat_period {REAL},
                heartbeat_threshold {REAL},
                broker_user TEXT NOT NULL,
                broker_password TEXT NOT NULL,
                locked INTEGER NOT NULL DEFAULT 0,
                deleted_at {REAL},
                created {REAL} NOT NULL,
                registered_at {REAL} NOT NULL,
                registrations INTEGER NOT NULL DEFAULT 1,
                ip_address TEXT,
                last_report_at {REAL},
                final_report_at {REAL},
                recent_reports TEXT NOT NULL DEFAULT '[]'
            )""",
            "CREATE INDEX endpoints_owner ON endpoints (owner)",
            """CREATE TABLE whitelist (
                endpoint_id TEXT NOT NULL,
                function_id TEXT NOT NULL,
                PRIMARY KEY (endpoint_id, function_id)
            )""",
            """CREATE TABLE user_brokers (
                identity_id TEXT PRIMARY KEY,
                broker_user TEXT NOT NULL,
                broker_password TEXT NOT NULL
            )""",
            """CREATE TABLE tasks (
                task_id TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                function_id TEXT NOT NULL,
                endpoint_id TEXT NOT NULL,
                task_group_id TEXT NOT NULL,
                payload TEXT,
                status TEXT NOT NULL,
                sent INTEGER NOT NULL DEFAULT 0,
                created {REAL} NOT NULL,
                completion_t TEXT,
                result TEXT,
                exception TEXT,
                error_code TEXT,
                error_message TEXT,
                ws_queue TEXT,
                ws_pending INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX tasks_group ON tasks (task_group_id, owner)",
            "CREATE INDEX tasks_endpoint ON tasks (endpoint_id)",
            "CREATE INDEX tasks_unsent ON tasks (created) WHERE sent = 0",
            "CREATE INDEX tasks_ws_pending ON tasks (created) WHERE ws_pending = 1",
        ],
    ),
    (
        2,
        "containers and their images",
        [
            # Functions registered before this kept their container_uuid unchecked:
            # there is no foreign key from functions to containers.
            """CREATE TABLE containers (
                container_id TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                description TEXT,
                public INTEGER NOT NULL DEFAULT 0,
                created {REAL} NOT NULL,
                modified {REAL} NOT NULL
            )""",
            "CREATE INDEX containers_owner ON containers (owner)",
            """CREATE TABLE container_images (
                container_id TEXT NOT NULL REFERENCES containers (container_id),
                image_type TEXT NOT NULL,
                location TEXT NOT NULL,
                build_status TEXT,
                build_stderr TEXT,
                created {REAL} NOT NULL,
                modified {REAL} NOT NULL,
                PRIMARY KEY (container_id, image_type)
            )""",
        ],
    ),
    (
        3,
        "a task's resource specification (MPI nodes and ranks), as JSON",
        ["ALTER TABLE tasks ADD COLUMN resource_specification TEXT"],
    ),
    (
        4,
        "sizes for quotas, finish and fetch times for retention",
        [
            "ALTER TABLE functions ADD COLUMN code_size INTEGER NOT NULL DEFAULT 0",
            "UPDATE functions SET code_size = LENGTH(function_code)",
            "ALTER TABLE tasks ADD COLUMN payload_size INTEGER NOT NULL DEFAULT 0",
            "UPDATE tasks SET payload_size = COALESCE(LENGTH(payload), 0)",
            "ALTER TABLE tasks ADD COLUMN finished {REAL}",
            "ALTER TABLE tasks ADD COLUMN fetched {REAL}",
            "UPDATE tasks SET finished = created WHERE status IN ('success', 'failed')",
            # Tasks in flight of a user: counted (and their payloads summed) from this
            # index alone (status in it too, or SQLite reads the rows).
            "CREATE INDEX tasks_owner_unfinished ON tasks (owner, status, payload_size) "
            "WHERE status NOT IN ('success', 'failed')",
            "CREATE INDEX tasks_finished ON tasks (finished) WHERE finished IS NOT NULL",
            "CREATE INDEX tasks_fetched ON tasks (fetched) WHERE fetched IS NOT NULL",
        ],
    ),
    (
        5,
        "the submitter's Python and dill versions, and the worker's environment, as JSON",
        [
            "ALTER TABLE tasks ADD COLUMN user_runtime TEXT",
            "ALTER TABLE tasks ADD COLUMN details TEXT",
        ],
    ),
    (
        6,
        "which service instance publishes a task (or its result copy), and until when",
        [
            "ALTER TABLE tasks ADD COLUMN claimed_by TEXT",
            "ALTER TABLE tasks ADD COLUMN claimed_until {REAL}",
        ],
    ),
    (
        7,
        "the web portal: sessions, sign-in links, an hour of status reports, tasks by owner",
        [
            """CREATE TABLE portal_sessions (
                session_hash TEXT PRIMARY KEY,
                identity_id TEXT NOT NULL,
                client_id TEXT NOT NULL,
                csrf TEXT NOT NULL,
                created {REAL} NOT NULL,
                expires {REAL} NOT NULL,
                revoked INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX portal_sessions_identity ON portal_sessions (identity_id)",
            """CREATE TABLE portal_links (
                link_hash TEXT PRIMARY KEY,
                identity_id TEXT NOT NULL,
                client_id TEXT NOT NULL,
                created {REAL} NOT NULL,
                expires {REAL} NOT NULL,
                used {REAL}
            )""",
            """CREATE TABLE status_history (
                endpoint_id TEXT NOT NULL,
                at {REAL} NOT NULL,
                managers INTEGER NOT NULL,
                total_workers INTEGER NOT NULL,
                idle_workers INTEGER NOT NULL,
                pending_tasks INTEGER NOT NULL
            )""",
            "CREATE INDEX status_history_endpoint ON status_history (endpoint_id, at)",
            "CREATE INDEX tasks_owner_created ON tasks (owner, created)",
        ],
    ),
    (
        8,
        "how many times the endpoint sent a task to a manager (NULL: not known)",
        ["ALTER TABLE tasks ADD COLUMN attempts INTEGER"],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_migrate_lock = threading.Lock()


def _current_version(tx: Tx) -> int:
    row = tx.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate(config: DatabaseConfig) -> Tuple[int, int]:
    """Bring the schema of the database up to date; (version before, after).

    Blocking: opens a connection of its own.  Raises DatabaseError if the
    database was made by a newer service.
    """
    import time

    dialect = Dialect(config.kind)
    with _migrate_lock:
        connection = connect(config)
        if config.kind == "sqlite":
            # Statements are sent as they are (we BEGIN/COMMIT ourselves).
            connection.isolation_level = None
        cursor = connection.cursor()
        tx = Tx(cursor, dialect)
        try:
            if config.kind == "sqlite":
                # Take the write lock now: another process migrating waits here.
                cursor.execute("BEGIN IMMEDIATE")
            else:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_ADVISORY_LOCK,))
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                f"applied {dialect.real} NOT NULL)"
            )
            before = _current_version(tx)
            if before > SCHEMA_VERSION:
                raise DatabaseError(
                    f"the database has schema version {before}, newer than this "
                    f"service knows ({SCHEMA_VERSION}); upgrade funcx-endpoint"
                )
            for version, description, statements in MIGRATIONS:
                if version <= before:
                    continue
                for statement in statements:
                    cursor.execute(dialect.ddl(statement))
                tx.execute(
                    "INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
                    (version, description, time.time()),
                )
            if config.kind == "sqlite":
                cursor.execute("COMMIT")
            else:
                connection.commit()
        except BaseException:
            try:
                if config.kind == "sqlite":
                    if connection.in_transaction:
                        cursor.execute("ROLLBACK")
                else:
                    connection.rollback()
            finally:
                connection.close()
            raise
        connection.close()
    return before, SCHEMA_VERSION
