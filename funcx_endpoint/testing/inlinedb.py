"""A connection pool that runs each transaction at once, in the calling thread.

:class:`InlineConnectionPool` gives the web service's real
:class:`~funcx_endpoint.webservice.storage.Storage` (the same SQL, the same
schema, the same transactions) without database threads, so that a test on
a :class:`twisted.internet.task.Clock` sees every storage operation done when
the call that started it returns.  The service itself uses adbapi's pool.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from funcx_endpoint.webservice.db import DatabaseConfig, IConnectionPool, connect, migrate

__all__ = ["InlineConnectionPool"]


@implementer(IConnectionPool)
class InlineConnectionPool:
    """One connection to ``config``'s database, whose schema it migrates first."""

    def __init__(self, config: DatabaseConfig) -> None:
        migrate(config)
        self._connection: Any = connect(config)

    def runInteraction(
        self, interaction: Callable[..., Any], *args: Any, **kw: Any
    ) -> Deferred[Any]:
        if self._connection is None:
            return fail(RuntimeError("the connection pool is closed"))
        cursor = self._connection.cursor()
        try:
            result = interaction(cursor, *args, **kw)
            self._connection.commit()
        except BaseException:
            self._connection.rollback()
            return fail()
        finally:
            cursor.close()
        return succeed(result)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
