"""Who uses the service: clients, their identities, tokens and broker users.

Plain functions of a :class:`~funcx_endpoint.webservice.db.Tx` (one
transaction): :class:`~funcx_endpoint.webservice.storage.Storage` runs them
in database threads, the command-line tools directly.
"""

from __future__ import annotations

import uuid
from typing import Any, List, Optional, Sequence, Tuple

import attr

from funcx_endpoint.webservice.db import Tx
from funcx_endpoint.webservice.records import Client, Identity, TokenInfo


class NameTaken(Exception):
    """A client with that name exists (and is not revoked)."""


_CLIENT_SELECT = (
    "SELECT c.client_id, c.name, c.identity_id, c.secret_hash, c.created, c.revoked_at, "
    "i.username FROM clients c JOIN identities i ON i.identity_id = c.identity_id"
)


def _client(row: Sequence[Any]) -> Client:
    return Client(*row)


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
    return [
        Identity(*row)
        for row in tx.rows_in(
            "SELECT identity_id, username, name, email FROM identities "
            "WHERE identity_id IN ({ids})",
            identity_ids,
        )
    ]


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
    return tx.changes(
        "UPDATE tokens SET revoked = 1 WHERE token_hash = ? AND revoked = 0", (token_hash,)
    )


def purge_tokens(tx: Tx, now: float) -> int:
    """Forget tokens that expired (or were revoked) more than a day ago."""
    return tx.execute("DELETE FROM tokens WHERE expires < ?", (now - 86400,)).rowcount


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
