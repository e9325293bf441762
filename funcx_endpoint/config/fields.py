"""The machinery of the config classes: fields, their checks, and the base class.

A config class (:mod:`funcx_endpoint.config.model`) lists its keyword
arguments as :class:`Field` objects; :class:`ConfigObject` checks each value
given, keeps what was given, and reports the fields that are accepted for
funcX 1.0 compatibility but do nothing here (:class:`Unused`, :class:`Notice`).
"""

from __future__ import annotations

import difflib
import math
import re
import uuid
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple

import attr


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong kind.

    The message names the class and the field, and says what was expected.
    """


@attr.s(auto_attribs=True, frozen=True)
class Unused:
    """What a field accepted for funcX 1.0 compatibility means here, when it does nothing.

    ``meaning`` completes the warning the endpoint logs at start for such a
    field given in ``config.py`` (see :class:`Notice`); ``quiet`` lists the
    values that need no warning because they ask for what happens here anyway.
    ``partly``: the field is honoured, and only its other values (or parts)
    have no effect.
    """

    meaning: str
    quiet: Tuple[Any, ...] = ()
    partly: bool = False

    def wants_warning(self, value: Any) -> bool:
        """True unless ``value`` is one of the quiet values."""
        for quiet in self.quiet:
            try:
                if type(value) is type(quiet) and value == quiet:
                    return False
            except Exception:  # a value that cannot be compared: warn
                pass
        return True


@attr.s(auto_attribs=True, frozen=True)
class Notice:
    """A value given in ``config.py`` that this endpoint accepts but does not use as asked.

    ``setting`` names it (``HighThroughputExecutor.poll_period``); the
    endpoint logs one warning per notice when it starts (:meth:`text`).
    """

    setting: str
    value: Any
    meaning: str
    whole: bool = False  # the notice is about the object itself, not a field of it

    def text(self) -> str:
        value = repr(self.value)
        if len(value) > 80:
            value = value[:77] + "..."
        if self.whole:
            return f"{value}: {self.meaning}"
        return f"{self.setting}={value}: {self.meaning}"


# eq=False: fields compare and hash by identity (a field is one argument of one class).
@attr.s(auto_attribs=True, frozen=True, eq=False)
class Field:
    """One keyword argument of a config class: its default and its check.

    ``check`` receives the value and returns it, possibly normalised; it
    raises :class:`TypeError` or :class:`ValueError` with a description of
    what it expected, which :class:`ConfigObject` turns into a
    :class:`ConfigError` naming the field.  ``unused`` marks a field that
    funcX 1.0 had and that is accepted here without effect (see :class:`Unused`).
    """

    default: Any
    check: Callable[[Any], Any]
    doc: str
    default_factory: Optional[Callable[[], Any]] = None
    unused: Optional[Unused] = None

    def default_value(self) -> Any:
        if self.default_factory is not None:
            return self.default_factory()
        return self.default


def anything(value: Any) -> Any:
    """A check that accepts any value (fields funcX 1.0 never checked either)."""
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def number(
    minimum: Optional[float] = None,
    exclusive_minimum: bool = False,
    allow_inf: bool = False,
    integer: bool = False,
    maximum: Optional[float] = None,
) -> Callable[[Any], Any]:
    """A check for an int or float within bounds."""
    kind = "an integer" if integer else "a number"
    if minimum is not None:
        kind += f" {'>' if exclusive_minimum else '>='} {minimum:g}"
    if maximum is not None:
        kind += f"{' and' if minimum is not None else ''} <= {maximum:g}"

    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected {kind}, got {_describe(value)}")
        if math.isnan(value):
            raise ValueError(f"expected {kind}, got NaN")
        if math.isinf(value):
            if allow_inf and value > 0:
                return value
            raise ValueError(f"expected {kind}, got {value}")
        if integer and not isinstance(value, int):
            if value != int(value):
                raise TypeError(f"expected {kind}, got {_describe(value)}")
            value = int(value)
        if minimum is not None:
            if value < minimum or (exclusive_minimum and value == minimum):
                raise ValueError(f"expected {kind}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"expected {kind}, got {value}")
        return value

    return check


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Allow ``None`` besides what ``check`` accepts."""

    def optional_check(value: Any) -> Any:
        if value is None:
            return None
        return check(value)

    return optional_check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected True or False, got {_describe(value)}")
    return value


def string(pattern: Optional[str] = None, what: str = "a string") -> Callable[[Any], str]:
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected {what}, got {_describe(value)}")
        if compiled is not None and not compiled.fullmatch(value):
            raise ValueError(f"expected {what}, got {value!r}")
        return value

    return check


def choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(
                f"expected one of {', '.join(map(repr, choices))}, got {_describe(value)}"
            )
        return str(value)

    return check


def url(schemes: Tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a URL, got {_describe(value)}")
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in schemes:
            raise ValueError(
                f"expected a URL starting with {' or '.join(s + '://' for s in schemes)},"
                f" got {value!r}"
            )
        return value.rstrip("/")

    return check


def uuid_list(value: Any) -> List[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set)):
        raise TypeError(f"expected a list of function UUIDs, got {_describe(value)}")
    result = []
    for item in value:
        try:
            result.append(str(uuid.UUID(str(item))))
        except ValueError:
            raise ValueError(f"expected a list of function UUIDs, {item!r} is not a UUID") from None
    return result


def string_list(value: Any) -> List[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of strings, got {_describe(value)}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected a list of strings, got an item {_describe(item)}")
    return list(value)


def string_dict(value: Any) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict of strings to strings, got {_describe(value)}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(
                f"expected a dict of strings to strings, got {key!r}: {_describe(item)}"
            )
    return dict(value)


def port_range(value: Any) -> Tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"expected a (low, high) pair of ports, got {_describe(value)}")
    low, high = value
    if not 0 <= low <= high <= 65535:
        raise ValueError(f"expected 0 <= low <= high <= 65535, got {value!r}")
    return (low, high)


class ConfigObject:
    """Base of the config classes: keyword-only fields, each checked on entry.

    Subclasses declare ``fields``, a dict of name to :class:`Field`.  The
    values are available as attributes; :meth:`as_dict` gives them all.
    """

    fields: ClassVar[Dict[str, Field]] = {}
    #: Set on a class accepted for funcX 1.0 compatibility that behaves as
    #: another here: what using it means (a :class:`Notice` when used).
    unused_class: ClassVar[Optional[str]] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self).__name__
        if args:
            raise ConfigError(
                f"{cls} takes keyword arguments only (name=value), "
                f"got {len(args)} positional argument(s)"
            )
        for name in kwargs:
            if name not in self.fields:
                close = difflib.get_close_matches(name, list(self.fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{cls} got an unknown field {name!r}{hint} "
                    f"(known fields: {', '.join(sorted(self.fields))})"
                )
        for name, field in self.fields.items():
            value = kwargs[name] if name in kwargs else field.default_value()
            if name in kwargs or value is not None:
                try:
                    value = field.check(value)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{cls}.{name}: {e}") from None
            setattr(self, name, value)
        # What config.py gave, before normalisation: the notices name it.
        self.given: Dict[str, Any] = dict(kwargs)
        self.validate()

    def validate(self) -> None:
        """Check relations between fields; raise :class:`ConfigError`."""

    def notices(self) -> List[Notice]:
        """The values given that this endpoint accepts but does not use as
        asked (fields marked :class:`Unused`, and the class itself), each
        with what it means here; nested config objects add their own."""
        cls = type(self).__name__
        found = []
        if self.unused_class is not None:
            found.append(Notice(cls, self, self.unused_class, whole=True))
        for name, value in self.given.items():
            unused = self.fields[name].unused
            if unused is not None and unused.wants_warning(value):
                found.append(Notice(f"{cls}.{name}", value, unused.meaning))
        found.extend(self.relation_notices())
        for name in self.fields:
            value = getattr(self, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, ConfigObject):
                    found.extend(item.notices())
        return found

    def relation_notices(self) -> List[Notice]:
        """Notices that depend on several fields (subclasses add them)."""
        return []

    def as_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.fields}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, ConfigObject)
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        changed = []
        for name, field in self.fields.items():
            value = getattr(self, name)
            if value != field.default_value():
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    @classmethod
    def describe_fields(cls) -> Iterator[Tuple[str, Any, str]]:
        """(name, default, doc) for each field, for documentation."""
        for name, field in cls.fields.items():
            yield name, field.default_value(), field.doc
