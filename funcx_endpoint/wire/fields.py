"""Field checks and the record base shared by the message classes.

Every check raises :class:`~funcx_endpoint.wire.errors.MessageError` naming
the field; the names keep their leading underscore: they are this package's
own helpers, not API.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from funcx_endpoint.wire.errors import MessageError

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# Like funcx_common (pydantic's .json()): compact, ASCII only.  ASCII output
# also survives lone surrogates, which UTF-8 encoding would refuse.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_decode_json = json.JSONDecoder().decode


def _show(value: Any) -> str:
    """``value`` for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _uuid(value: Any, field: str) -> str:
    """``value`` (str or UUID) as a lowercase canonical UUID string."""
    if type(value) is str:
        if _CANONICAL_UUID.match(value):
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    elif isinstance(value, uuid.UUID):
        return str(value)
    raise MessageError(f"{field} must be a UUID, got {_show(value)}")


def _optional_uuid(value: Any, field: str) -> Optional[str]:
    return None if value is None else _uuid(value, field)


def _str(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    raise MessageError(f"{field} must be a string, got {type(value).__name__} {_show(value)}")


def _optional_str(value: Any, field: str) -> Optional[str]:
    return None if value is None else _str(value, field)


def _int(value: Any, field: str) -> int:
    kind = type(value)
    if kind is int:
        return value
    if kind is float and value.is_integer():
        return int(value)
    raise MessageError(f"{field} must be an integer, got {kind.__name__} {_show(value)}")


def _optional_int(value: Any, field: str) -> Optional[int]:
    return None if value is None else _int(value, field)


def _dict(value: Any, field: str) -> Dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise MessageError(f"{field} must be an object, got {type(value).__name__} {_show(value)}")


def _optional_dict(value: Any, field: str) -> Optional[Dict[str, Any]]:
    if value is None or isinstance(value, dict):
        return value
    raise MessageError(f"{field} must be a dict or null, got {_show(value)}")


def _list(value: Any, field: str) -> List[Any]:
    if isinstance(value, list):
        return value
    raise MessageError(f"{field} must be a list, got {type(value).__name__} {_show(value)}")


_MISSING: Any = object()


def _required(data: Mapping[str, Any], field: str, where: str) -> Any:
    value = data.get(field, _MISSING)
    if value is _MISSING:
        raise MessageError(f"{where} has no {field!r} field")
    return value


class _Record:
    """Equality and repr from ``__slots__``."""

    __slots__: ClassVar[Tuple[str, ...]] = ()
    #: Optional fields that the repr leaves out when they are None (most messages lack them).
    _quiet: ClassVar[Tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        names = [n for n in self.__slots__ if n not in self._quiet or getattr(self, n) is not None]
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__name__}({fields})"

    def _with_set(self, data: Dict[str, Any], *names: str) -> Dict[str, Any]:
        """``data`` plus each optional field of ``names`` that is not None."""
        for name in names:
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data
