"""A raw AMP peer of a real interchange, over TLS: sends bytes as given.

For tests and fuzzing of what a stranger (or a registered manager) can send:
:func:`send_raw` connects to the interchange an info file describes, writes
the bytes (optionally after a well-formed ``Register``), and reports what came
back and whether the interchange closed the connection.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure

from funcx_endpoint.wire.info import ConnectionInfo, local_versions

__all__ = ["RawOutcome", "box_bytes", "register_box", "send_raw"]


def box_bytes(fields: Dict[bytes, bytes]) -> bytes:
    """One AMP box on the wire: each key and value with its 16-bit length."""
    out = []
    for key, value in fields.items():
        out.append(len(key).to_bytes(2, "big") + key)
        out.append(len(value).to_bytes(2, "big") + value)
    return b"".join(out) + b"\x00\x00"


def register_box(info: ConnectionInfo, ask: bytes = b"1", **overrides: bytes) -> Dict[bytes, bytes]:
    """The fields of a well-formed ``Register`` box for ``info``'s interchange."""
    versions = {k: v.encode() for k, v in local_versions().items()}
    fields: Dict[bytes, bytes] = {
        b"_command": b"Register",
        b"_ask": ask,
        b"secret": info.secret.encode(),
        b"manager_id": b"raw-peer",
        b"block_id": b"raw-block",
        b"hostname": b"raw-host",
        b"pid": b"1",
        b"worker_count": b"1",
        b"prefetch_capacity": b"0",
        b"worker_type": b"no_container",
        b"container_type": b"RAW",
        **{k.encode(): v for k, v in versions.items()},
    }
    for key, value in overrides.items():
        fields[key.encode()] = value
    return fields


@attr.s(auto_attribs=True)
class RawOutcome:
    """What the interchange did with the bytes."""

    received: bytes
    closed_by_peer: bool


class _Raw(Protocol):
    def __init__(self, chunks: List[bytes], done: Deferred[RawOutcome]) -> None:
        self.chunks = chunks
        self.done = done
        self.received: List[bytes] = []

    def connectionMade(self) -> None:
        for chunk in self.chunks:
            self.transport.write(chunk)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if not self.done.called:
            self.done.callback(RawOutcome(b"".join(self.received), True))


def send_raw(
    reactor: Any,
    info: ConnectionInfo,
    chunks: List[bytes],
    timeout: float = 5.0,
    host: str = "localhost",
) -> Deferred[RawOutcome]:
    """Write ``chunks`` to the interchange; fires with a :class:`RawOutcome`
    when it closes the connection, or after ``timeout`` (``closed_by_peer``
    False; the connection is then closed from here)."""
    done: Deferred[RawOutcome] = Deferred()
    trust = Certificate.loadPEM(info.ca_cert_pem.encode())
    endpoint = SSL4ClientEndpoint(
        reactor, "127.0.0.1", info.port, optionsForClientTLS(host, trustRoot=trust)
    )
    protocol = _Raw(chunks, done)
    connecting = connectProtocol(endpoint, protocol)

    def give_up() -> None:
        if not done.called:
            done.callback(RawOutcome(b"".join(protocol.received), False))
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]

    call = reactor.callLater(timeout, give_up)

    def failed(reason: Failure) -> None:
        if not done.called:
            done.errback(reason)

    connecting.addErrback(failed)

    def finished(result: Any) -> Any:
        if call.active():
            call.cancel()
        return result

    done.addBoth(finished)
    return done


def parse_boxes(data: bytes) -> Optional[List[Dict[bytes, bytes]]]:
    """The AMP boxes in ``data`` (None if it is not whole boxes)."""
    boxes: List[Dict[bytes, bytes]] = []
    box: Dict[bytes, bytes] = {}
    key: Optional[bytes] = None
    offset = 0
    while offset < len(data):
        if offset + 2 > len(data):
            return None
        length = int.from_bytes(data[offset : offset + 2], "big")
        offset += 2
        if offset + length > len(data):
            return None
        value = data[offset : offset + length]
        offset += length
        if key is None:
            if length == 0:
                boxes.append(box)
                box = {}
            else:
                key = value
        else:
            box[key] = value
            key = None
    return boxes if not box and key is None else None
