"""The service's storage: its database, and the operations the service runs on it.

Each operation is a plain function of a :class:`~funcx_endpoint.webservice.db.Tx`
(one transaction), kept by what it is about (:mod:`~funcx_endpoint.webservice.accounts`,
:mod:`~funcx_endpoint.webservice.endpoints`, :mod:`~funcx_endpoint.webservice.tasks`,
:mod:`~funcx_endpoint.webservice.containers`;
the records in :mod:`~funcx_endpoint.webservice.records`), so the command-line tools
can run it directly (:func:`open_sync`), and :class:`Storage` runs it in adbapi's
database threads for the service: ``await storage.get_tasks(ids, owner)``.
Nothing here touches the reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from funcx_endpoint.webservice.accounts import (
    find_token,
    get_client,
    get_identities,
    get_user_broker,
    insert_token,
    purge_tokens,
    revoke_token,
    save_user_broker,
)
from funcx_endpoint.webservice.containers import (
    get_container,
    get_containers,
    insert_container,
    put_image,
)
from funcx_endpoint.webservice.db import (
    DatabaseConfig,
    Dialect,
    IConnectionPool,
    Tx,
    make_pool,
    migrate,
)
from funcx_endpoint.webservice.endpoints import (
    add_to_whitelist,
    consume_lock,
    delete_endpoint,
    get_endpoint,
    get_endpoints,
    get_whitelist,
    list_endpoints,
    lock_endpoint,
    record_reports,
    remove_from_whitelist,
    save_registration,
    whitelists,
)
from funcx_endpoint.webservice.records import (
    Client,
    ContainerInfo,
    Endpoint,
    FunctionInfo,
    Identity,
    ImageInfo,
    IncomingResult,
    NewTask,
    Report,
    ResultCopy,
    StoredOutcome,
    TokenInfo,
    UnsentTask,
)
from funcx_endpoint.webservice.tasks import (
    Claim,
    get_tasks,
    insert_function,
    insert_tasks,
    mark_copied,
    mark_sent,
    pending_copies,
    send_unfinished_again,
    store_results,
    task_group,
    unsent_tasks,
    visible_functions,
)

_T = TypeVar("_T")
#: What :meth:`Storage.submit_context` reads: functions, endpoints, whitelists, containers.
SubmitContext = Tuple[
    Dict[str, FunctionInfo], Dict[str, Endpoint], Dict[str, List[str]], Dict[str, ContainerInfo]
]


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
        ("containers", "1 = 1"),
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
    ``close()`` stops it.  With a ``claim`` (several service instances share
    the database), tasks and result copies are claimed by this instance, by
    ``clock``'s time (see :mod:`~funcx_endpoint.webservice.tasks`).  A storage given a ``pool`` (any
    :class:`~funcx_endpoint.webservice.db.IConnectionPool`) is open at once:
    the caller has migrated its database.
    """

    def __init__(
        self,
        config: DatabaseConfig,
        reactor: Any,
        *,
        pool: Optional[IConnectionPool] = None,
        claim: Optional[Claim] = None,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self.config = config
        self.claim = claim
        self._clock: IReactorTime = reactor if clock is None else clock
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

    def insert_container(self, container: ContainerInfo) -> Deferred[None]:
        return self.run(insert_container, container)

    def get_container(self, container_id: str) -> Deferred[Optional[ContainerInfo]]:
        return self.run(get_container, container_id)

    def put_image(self, container_id: str, image: ImageInfo) -> Deferred[None]:
        return self.run(put_image, container_id, image)

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
    ) -> Deferred[SubmitContext]:
        """The functions, endpoints, whitelists and the functions' containers a submit
        needs, in one transaction."""

        def context(tx: Tx) -> SubmitContext:
            functions = visible_functions(tx, function_ids, identity)
            return (
                functions,
                get_endpoints(tx, endpoint_ids),
                whitelists(tx, endpoint_ids),
                get_containers(
                    tx, [f.container_uuid for f in functions.values() if f.container_uuid]
                ),
            )

        return self.run(context)

    def insert_tasks(self, tasks: Sequence[NewTask]) -> Deferred[None]:
        return self.run(insert_tasks, tasks, self.claim)

    def mark_sent(self, task_ids: Sequence[str]) -> Deferred[None]:
        return self.run(mark_sent, task_ids)

    def send_unfinished_again(self, endpoint_id: str) -> Deferred[int]:
        return self.run(send_unfinished_again, endpoint_id)

    def unsent_tasks(self, limit: int, created_before: float) -> Deferred[List[UnsentTask]]:
        return self.run(unsent_tasks, limit, created_before, self.claim, self._clock.seconds())

    def store_results(
        self, results: Sequence[IncomingResult], now: Optional[float] = None
    ) -> Deferred[List[StoredOutcome]]:
        """Store results; ``now`` (the service's clock) stamps when the tasks finished
        (and, with a claim, from when this instance's claims on their copies run)."""
        return self.run(store_results, results, now, self.claim)

    def get_tasks(self, task_ids: Sequence[str], owner: str) -> Deferred[Dict[str, Dict[str, Any]]]:
        return self.run(get_tasks, task_ids, owner)

    def task_group(self, task_group_id: str, owner: str) -> Deferred[List[str]]:
        return self.run(task_group, task_group_id, owner)

    def pending_copies(self, limit: int) -> Deferred[List[ResultCopy]]:
        return self.run(pending_copies, limit, self.claim, self._clock.seconds())

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


# The records of the storage interface, for its users (the service's API and dispatch).
__all__ = [
    "Claim",
    "Client",
    "ContainerInfo",
    "Endpoint",
    "FunctionInfo",
    "Identity",
    "ImageInfo",
    "IncomingResult",
    "NewTask",
    "Report",
    "ResultCopy",
    "Storage",
    "StoredOutcome",
    "SubmitContext",
    "TokenInfo",
    "UnsentTask",
    "count_online_candidates",
    "counts",
    "open_sync",
]
