"""The one list framing every link of the endpoint uses.

A list of byte strings is written as, for each item, its length as a 4-byte
big-endian unsigned integer and then the item itself.  The same framing
serves three places:

* inside AMP values: a batch of tasks, a batch of results
  (:mod:`funcx_endpoint.wire.amp`);
* on a worker's pipes, where the stream is an endless list and each item is
  one frame (:mod:`funcx_endpoint.wire.frames`);
* inside one result on its way back (:mod:`funcx_endpoint.wire.results`):
  header fields and the payload, which routers pass on without decoding.

:func:`decode_list` can return memoryviews instead of copies, so a router
that only forwards a large item never copies it.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, List, Literal, Optional, Sequence, Union, overload

__all__ = [
    "LENGTH",
    "MAX_ITEM",
    "FramingError",
    "ListDecoder",
    "Pieces",
    "decode_list",
    "decode_list_pieces",
    "encode_list",
    "join_pieces",
]

#: The length prefix of every item.
LENGTH = struct.Struct(">I")
#: The largest item (the length field is 32 bits).
MAX_ITEM = 0xFFFFFFFF

Buffer = Union[bytes, bytearray, memoryview]


class FramingError(ValueError):
    """Bytes that are not a list in this framing (truncated, or too long)."""


def encode_list(items: Iterable[Buffer]) -> bytes:
    """``items`` as one byte string: each a 4-byte length and its bytes."""
    pack = LENGTH.pack
    parts: List[Buffer] = []
    append = parts.append
    for item in items:
        append(pack(len(item)))
        append(item)
    return b"".join(parts)


@overload
def decode_list(data: Buffer) -> List[bytes]: ...


@overload
def decode_list(data: Buffer, views: Literal[False]) -> List[bytes]: ...


@overload
def decode_list(data: Buffer, views: Literal[True]) -> List[memoryview]: ...


def decode_list(data: Buffer, views: bool = False) -> List[Any]:
    """The items :func:`encode_list` encoded into ``data``.

    With ``views``, items are memoryviews of ``data`` (no copy; they keep
    ``data`` alive).  Raises :class:`FramingError` if ``data`` is not a whole
    list.
    """
    source: Buffer = memoryview(data) if views and not isinstance(data, memoryview) else data
    items: List[Any] = []
    append = items.append
    offset = 0
    end = len(data)
    unpack_from = LENGTH.unpack_from
    while offset < end:
        if end - offset < 4:
            raise FramingError("truncated list: a length prefix is cut short")
        (size,) = unpack_from(data, offset)
        offset += 4
        if end - offset < size:
            raise FramingError(f"truncated list: an item of {size} bytes is cut short")
        append(source[offset : offset + size])
        offset += size
    return items


#: An item read from several received chunks, as views of each, in order.
Pieces = List[memoryview]


def decode_list_pieces(chunks: Sequence[Buffer]) -> List[Union[memoryview, Pieces]]:
    """The items of a list whose bytes arrived in ``chunks`` (their
    concatenation is the list), without joining the chunks.

    An item that lies within one chunk is a memoryview of it; one that spans
    chunks is a list of views (:data:`Pieces`), so a large item is never
    copied.  Raises :class:`FramingError` if the chunks are not a whole list.
    """
    if len(chunks) == 1:
        return list(decode_list(chunks[0], views=True))
    reader = _PieceReader(chunks)
    items: List[Union[memoryview, Pieces]] = []
    while not reader.at_end():
        head = reader.read(4)
        (size,) = LENGTH.unpack(head[0] if len(head) == 1 else b"".join(head))
        pieces = reader.read(size)
        items.append(pieces[0] if len(pieces) == 1 else pieces)
    return items


def join_pieces(item: Union[Buffer, Pieces]) -> bytes:
    """``item`` (a buffer or pieces) as bytes (a copy: for small items)."""
    if isinstance(item, list):
        return b"".join(item)
    return bytes(item)


class _PieceReader:
    """Reads byte counts across a sequence of chunks, as views."""

    def __init__(self, chunks: Sequence[Buffer]) -> None:
        self._chunks = [memoryview(chunk) for chunk in chunks if len(chunk)]
        self._index = 0
        self._offset = 0

    def at_end(self) -> bool:
        return self._index >= len(self._chunks)

    def read(self, count: int) -> Pieces:
        pieces: Pieces = []
        chunks = self._chunks
        while count:
            if self._index >= len(chunks):
                raise FramingError(f"truncated list: {count} more bytes were due")
            chunk = chunks[self._index]
            piece = chunk[self._offset : self._offset + count]
            pieces.append(piece)
            count -= len(piece)
            self._offset += len(piece)
            if self._offset >= len(chunk):
                self._index += 1
                self._offset = 0
        if not pieces:
            pieces.append(memoryview(b""))
        return pieces


class ListDecoder:
    """Reads a list in this framing from a stream, item by item, incrementally.

    :meth:`feed` takes whatever arrived and returns the items it completed.
    Input is kept in one buffer that is compacted once per call, so a 10 MB
    item arriving in 64 KB reads costs linear time.  Empty items and items
    over ``max_item`` bytes are refused (a peer sending them is not speaking
    this protocol).
    """

    def __init__(self, max_item: int = MAX_ITEM) -> None:
        self._buffer = bytearray()
        self._max = max_item

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole item yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[bytes]:
        """Add ``data``; return the items now complete.  FramingError on garbage."""
        buffer = self._buffer
        if not buffer and len(data) >= 4:
            # Fast path: the common case of whole items in one read (no copy).
            items = self._split(data)
            if items is not None:
                return items
        buffer += data
        items = []
        offset = 0
        end = len(buffer)
        unpack_from = LENGTH.unpack_from
        while end - offset >= 4:
            (size,) = unpack_from(buffer, offset)
            self._check(size)
            if end - offset - 4 < size:
                break
            start = offset + 4
            items.append(bytes(buffer[start : start + size]))
            offset = start + size
        if offset:
            del buffer[:offset]
        return items

    def _split(self, data: bytes) -> Optional[List[bytes]]:
        """Items of ``data`` if it holds only whole items, else None."""
        items = []
        offset = 0
        end = len(data)
        unpack_from = LENGTH.unpack_from
        while offset < end:
            if end - offset < 4:
                return None
            (size,) = unpack_from(data, offset)
            self._check(size)
            start = offset + 4
            if end - start < size:
                return None
            items.append(data[start : start + size])
            offset = start + size
        return items

    def _check(self, size: int) -> None:
        if size == 0 or size > self._max:
            raise FramingError(f"bad item length {size} (limit {self._max})")
