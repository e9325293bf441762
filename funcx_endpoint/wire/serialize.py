"""funcX 1.0 serialization of functions and data, and packed buffers.

A serialized item is a string: a two-character method id, a newline, and a
body (PROTOCOL.md section 1):

``00``
    data: base64 of ``dill.dumps(obj)``.
``01``
    code: base64 of ``dill.dumps(function)``.
``02``
    code: base64 of ``pickle.dumps(function)``.  Read only: never written.
``03``
    code: base64 of a pickled ``(name, source)`` pair, the source found with
    :func:`inspect.getsource`; loaded by running the source and taking
    ``name``.
``04``
    the same with :func:`dill.source.getsource`.  This is what the real funcX
    1.0.13 SDK sends for every function.
``10``
    combined: ``"04\\n:<04 body>:01\\n:<01 body>"``; a reader tries each in
    turn.  funcX 1.0.13 writes the inner ids *with* their newline and can only
    read them that way; this module writes them so and reads both forms.

Bodies are written as MIME base64 (a newline every 76 characters and one at
the end), exactly like funcX, and read with or without those newlines.

Choices this module makes (and funcX does not):

* Callables are tried as ``04``, ``01``, ``03`` (funcX: ``04 01 03 02 10``;
  ``02`` always fails there and ``10`` cannot succeed when both ``04`` and
  ``01`` failed).  ``04`` comes first because only source survives a
  difference in Python or dill versions: a dill 0.4 pickle of a function does
  not load under the dill 0.3.5.1 that funcX 1.0.13 pins.
* The source methods apply only to plain functions, and only when the source
  can stand alone: it is dedented, decorators are dropped (the function object
  being serialized is the undecorated one, or it would not have this source),
  and a function that closes over variables is left to ``01``, which keeps
  them.  A lambda is written as ``04`` with the source
  ``_funcx_lambda = <the lambda expression>`` and the name ``_funcx_lambda``,
  which funcX 1.0.13 endpoints load too; funcX itself writes the name
  ``<lambda>``, which funcX endpoints cannot load (ours can).
* Loading ``03``/``04`` runs the source in a fresh namespace with postponed
  evaluation of annotations (so ``def f(x: np.ndarray)`` loads without
  numpy), and a payload named ``<lambda>`` (as the real SDK writes) is loaded
  by evaluating the one lambda expression found in its source.
* Plain data (``None``, numbers, strings, bytes, and tuples, lists, dicts and
  sets of them) is pickled with the C pickler, which writes the same bytes as
  dill for those types, tens of times faster.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import pickle
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Sequence,
    Tuple,
)

import dill
import dill.source

from funcx_endpoint.wire.buffers import (
    pack_buffers,
    pack_task_buffer,
    split_task_buffer,
    unpack_buffers,
)
from funcx_endpoint.wire.errors import DeserializationError, SerializationError
from funcx_endpoint.wire.source import (
    LAMBDA_NAME,
    _dill_getsource,
    _load_source,
    _standalone_source,
)

__all__ = [
    "CODE_METHODS",
    "DATA_METHOD",
    "DEFAULT_CODE_METHODS",
    "LAMBDA_NAME",
    "METHOD_COMBINED",
    "METHOD_DATA",
    "METHOD_DILL_CODE",
    "METHOD_PICKLE_CODE",
    "METHOD_SOURCE_DILL",
    "METHOD_SOURCE_INSPECT",
    "Serializer",
    "default_serializer",
    "deserialize",
    "pack_buffers",
    "pack_function",
    "pack_payload",
    "pack_task_buffer",
    "serialize",
    "split_task_buffer",
    "unpack_buffers",
    "unpack_task_buffer",
]

METHOD_DATA = "00"
METHOD_DILL_CODE = "01"
METHOD_PICKLE_CODE = "02"
METHOD_SOURCE_INSPECT = "03"
METHOD_SOURCE_DILL = "04"
METHOD_COMBINED = "10"

#: The method used for everything that is not callable.
DATA_METHOD = METHOD_DATA
#: The code methods this module can write.
CODE_METHODS = (METHOD_SOURCE_DILL, METHOD_DILL_CODE, METHOD_SOURCE_INSPECT, METHOD_COMBINED)
#: The order in which code methods are tried by default.
DEFAULT_CODE_METHODS = (METHOD_SOURCE_DILL, METHOD_DILL_CODE, METHOD_SOURCE_INSPECT)
#: The methods whose parts make up a ``10`` payload, in order.
_COMBINED_PARTS = (METHOD_SOURCE_DILL, METHOD_DILL_CODE)

# funcX 1.0.13 pickles with protocol 4; pinning it keeps our output identical to
# what the real SDK writes for the same data, whatever the local default.
_PICKLE_PROTOCOL = 4
_HEADER_LENGTH = 3
# Plain data is checked item by item before taking the C pickler.  The check
# costs a tenth of what dill spends per item, so it pays even when it fails;
# the budget only stops it on huge or self-containing structures.
_PLAIN_CHECK_BUDGET = 100_000
_PLAIN_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
_PLAIN_SEQUENCES = frozenset({tuple, list, set, frozenset})


def _b64encode(raw: bytes) -> str:
    """MIME base64 of ``raw`` as funcX writes it (76-character lines)."""
    return base64.encodebytes(raw).decode("ascii")


def _b64decode(body: str, method: str) -> bytes:
    """Decode base64 ``body`` (newlines allowed anywhere), or raise."""
    compact = body.replace("\n", "")
    if "\r" in compact:
        compact = compact.replace("\r", "")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DeserializationError(
            f"payload with header {method!r}: the body is not valid base64 ({exc})"
        ) from None


def _is_plain(obj: Any) -> bool:
    """True if ``obj`` is built only of types the C pickler writes like dill."""
    budget = _PLAIN_CHECK_BUDGET
    stack = [obj]
    while stack:
        item = stack.pop()
        kind = type(item)
        budget -= 1
        if budget < 0:
            return False
        if kind in _PLAIN_SCALARS:
            continue
        if kind in _PLAIN_SEQUENCES:
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            return False
    return True


def _describe_load_failure(method: str, what: str, exc: BaseException) -> str:
    """A message for a pickle that would not load, with a likely cause."""
    if isinstance(exc, ImportError):
        hint = "is the module it needs installed here?"
    elif isinstance(exc, EOFError) or "truncated" in str(exc):
        hint = "is the payload truncated?"
    else:
        hint = "serialized with a different Python or dill version?"
    return (
        f"could not load the {what} in a payload with header {method!r}: "
        f"{type(exc).__name__}: {exc} ({hint})"
    )


def _unpickle(raw: bytes, method: str, what: str, loads: Callable[[bytes], Any]) -> Any:
    """``loads(raw)``, with any failure turned into a DeserializationError."""
    try:
        return loads(raw)
    except Exception as exc:
        raise DeserializationError(_describe_load_failure(method, what, exc)) from exc


def _loads_data(raw: bytes) -> Any:
    """``dill.loads(raw)``, tens of times faster for what the C unpickler reads.

    dill writes standard pickles that refer to dill's own helpers by module
    and name, which the C unpickler finds by importing them; only dill's
    renamings (``__builtin__`` names, ``dill.dill``) need dill's unpickler,
    and the C one fails on those, so dill is asked then.
    """
    try:
        return pickle.loads(raw)
    except Exception:
        return dill.loads(raw)


def _dill_dumps(obj: Any) -> bytes:
    return dill.dumps(obj, protocol=_PICKLE_PROTOCOL)


def _dumps_data(obj: Any) -> bytes:
    if _is_plain(obj):
        return pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)
    return _dill_dumps(obj)


def _write_pickled(method: str, dumps: Callable[[Any], bytes], obj: Any, failure: str) -> str:
    """``obj`` pickled by ``dumps`` as an item of ``method``; SerializationError
    saying ``failure`` if it cannot be."""
    try:
        raw = dumps(obj)
    except Exception as exc:
        raise SerializationError(
            f"{failure} {_describe(obj)}: {type(exc).__name__}: {exc}"
        ) from exc
    return f"{method}\n" + _b64encode(raw)


# ---------------------------------------------------------------------------
# The serializer


class Serializer:
    """Writes and reads funcX 1.0 serialized items.

    ``code_methods`` is the order in which code methods are tried for
    callables; the first that succeeds is used.  Readers accept every method
    whatever this order is, except that with ``load_bytecode`` false functions
    pickled with their bytecode (``01``, ``02``, the ``01`` part of ``10``) are
    refused: the bytecode of another Python minor version may crash the
    interpreter that runs it, so a worker loads such a function from its source
    only (see :mod:`funcx_endpoint.wire.runtime`).
    """

    def __init__(
        self, code_methods: Sequence[str] = DEFAULT_CODE_METHODS, *, load_bytecode: bool = True
    ) -> None:
        unknown = [m for m in code_methods if m not in CODE_METHODS]
        if unknown or not code_methods:
            raise ValueError(
                f"code_methods must be a non-empty sequence of {', '.join(CODE_METHODS)}; "
                f"got {list(code_methods)!r}"
            )
        self.code_methods: Tuple[str, ...] = tuple(code_methods)
        self._code_writers: Mapping[str, Callable[[Any], str]] = {
            METHOD_DILL_CODE: self._write_dill_code,
            METHOD_SOURCE_INSPECT: self._write_source_inspect,
            METHOD_SOURCE_DILL: self._write_source_dill,
            METHOD_COMBINED: self._write_combined,
        }
        self._readers: Mapping[str, Callable[[str, str], Any]] = {
            METHOD_DATA + "\n": self._read_data,
            METHOD_DILL_CODE + "\n": self._read_dill_code,
            METHOD_PICKLE_CODE + "\n": self._read_pickle_code,
            METHOD_SOURCE_INSPECT + "\n": self._read_source,
            METHOD_SOURCE_DILL + "\n": self._read_source,
            METHOD_COMBINED + "\n": self._read_combined,
        }
        if not load_bytecode:
            self._readers = dict(
                self._readers,
                **{
                    METHOD_DILL_CODE + "\n": self._refuse_bytecode,
                    METHOD_PICKLE_CODE + "\n": self._refuse_bytecode,
                },
            )

    # -- writing ------------------------------------------------------------

    def serialize(self, obj: Any, method: Optional[str] = None) -> str:
        """``obj`` as a header-prefixed string.

        Callables get the code methods in :attr:`code_methods` order (or only
        ``method`` if given), anything else ``00``.  Raises
        SerializationError, naming why each method failed, if none works.
        """
        if method is not None:
            if method == METHOD_DATA:
                return self._write_data(obj)
            writer = self._code_writers.get(method)
            if writer is None:
                raise SerializationError(f"{method!r} is not a method this serializer writes")
            return writer(obj)
        if not callable(obj):
            return self._write_data(obj)
        failures = []
        for code_method in self.code_methods:
            try:
                return self._code_writers[code_method](obj)
            except SerializationError as exc:
                failures.append(f"{code_method}: {exc}")
        raise SerializationError(
            f"could not serialize {_describe(obj)} with any code method: " + "; ".join(failures)
        )

    def _write_data(self, obj: Any) -> str:
        return _write_pickled(METHOD_DATA, _dumps_data, obj, "could not serialize")

    def _write_dill_code(self, fn: Any) -> str:
        return _write_pickled(METHOD_DILL_CODE, _dill_dumps, fn, "dill could not pickle")

    def _write_source(self, fn: Any, method: str, getsource: Callable[[Any], str]) -> str:
        name, source = _standalone_source(fn, getsource)
        return f"{method}\n" + _b64encode(pickle.dumps((name, source), protocol=_PICKLE_PROTOCOL))

    def _write_source_inspect(self, fn: Any) -> str:
        return self._write_source(fn, METHOD_SOURCE_INSPECT, inspect.getsource)

    def _write_source_dill(self, fn: Any) -> str:
        return self._write_source(fn, METHOD_SOURCE_DILL, _dill_getsource)

    def _write_combined(self, fn: Any) -> str:
        chunks: List[str] = []
        failures = []
        for part_method in _COMBINED_PARTS:
            try:
                serialized = self._code_writers[part_method](fn)
            except SerializationError as exc:
                failures.append(f"{part_method}: {exc}")
                continue
            # funcX 1.0.13 keeps the newline of the inner header: "04\n".
            chunks.append(serialized[:_HEADER_LENGTH])
            chunks.append(serialized[_HEADER_LENGTH:])
        if not chunks:
            raise SerializationError(
                f"could not serialize {_describe(fn)} with any part of method 10: "
                + "; ".join(failures)
            )
        return "10\n" + ":".join(chunks)

    def pack_function(self, fn: Callable[..., Any]) -> str:
        """The ``function_code`` to register for ``fn``: one packed part."""
        if not callable(fn):
            raise SerializationError(f"only callables can be registered, got {_describe(fn)}")
        return pack_buffers([self.serialize(fn)])

    def pack_payload(
        self, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None
    ) -> str:
        """The payload submitted for a task: packed serialized args and kwargs."""
        if isinstance(args, (str, bytes)):
            raise SerializationError(f"args must be a tuple or list, got {_describe(args)}")
        return pack_buffers(
            [
                self._write_data(tuple(args)),
                self._write_data(dict(kwargs) if kwargs is not None else {}),
            ]
        )

    # -- reading ------------------------------------------------------------

    def deserialize(self, payload: str) -> Any:
        """The object a header-prefixed string holds.

        Raises DeserializationError, saying which header was seen and what
        went wrong, for anything that cannot be loaded.
        """
        if not isinstance(payload, str):
            raise DeserializationError(
                f"a serialized payload must be a str, got {type(payload).__name__}"
            )
        header = payload[:_HEADER_LENGTH]
        reader = self._readers.get(header)
        if reader is None:
            if len(header) < _HEADER_LENGTH or header[2] != "\n":
                raise DeserializationError(
                    f"the payload has no method header (it starts {payload[:20]!r}; "
                    f"expected two digits and a newline, e.g. '00\\n')"
                )
            raise DeserializationError(
                f"unknown serialization method header {header!r} (known: "
                + ", ".join(repr(h) for h in self._readers)
                + ")"
            )
        return reader(header[:2], payload[_HEADER_LENGTH:])

    def _read_data(self, method: str, body: str) -> Any:
        return _unpickle(_b64decode(body, method), method, "data", _loads_data)

    def _read_dill_code(self, method: str, body: str) -> Any:
        return _unpickle(_b64decode(body, method), method, "function", dill.loads)

    def _read_pickle_code(self, method: str, body: str) -> Any:
        return _unpickle(_b64decode(body, method), method, "function", pickle.loads)

    def _refuse_bytecode(self, method: str, body: str) -> Any:
        raise DeserializationError(
            f"the function was pickled with its bytecode (method {method!r}), which is not "
            f"loaded into another Python version, and has no source to load instead"
        )

    def _read_source(self, method: str, body: str) -> Any:
        pair = _unpickle(_b64decode(body, method), method, "(name, source) pair", dill.loads)
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise DeserializationError(
                f"payload with header {method!r} should hold a (name, source) pair, "
                f"got {_describe(pair)}"
            )
        return _load_source(pair[0], pair[1], method)

    def _read_combined(self, method: str, body: str) -> Any:
        fields = body.split(":")
        if len(fields) < 2 or len(fields) % 2:
            raise DeserializationError(
                f"payload with header {method!r} should be ':'-separated pairs of method "
                f"id and body, found {len(fields)} fields"
            )
        failures = []
        for index in range(0, len(fields), 2):
            part_method = fields[index].rstrip("\n")
            reader = self._readers.get(part_method + "\n")
            if reader is None or part_method in (METHOD_DATA, METHOD_COMBINED):
                failures.append(f"{part_method!r}: not a code method")
                continue
            try:
                return reader(part_method, fields[index + 1])
            except DeserializationError as exc:
                failures.append(str(exc))
        raise DeserializationError(
            "no part of the combined (header '10') payload could be loaded: " + "; ".join(failures)
        )

    def unpack_task_buffer(
        self,
        task_buffer: str,
        function_cache: Optional[MutableMapping[str, Callable[..., Any]]] = None,
    ) -> Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]:
        """The function, args and kwargs of a task buffer, loaded and checked.

        ``function_cache``, if given, maps serialized function parts to loaded
        functions: it is consulted and filled.  Raises DeserializationError
        whose ``part`` names the part that was wrong.
        """
        fn_part, args_part, kwargs_part = split_task_buffer(task_buffer)
        fn = function_cache.get(fn_part) if function_cache is not None else None
        if fn is None:
            fn = self._load_part(fn_part, "function")
            if not callable(fn):
                raise DeserializationError(
                    f"the function part of the task buffer holds {_describe(fn)}, "
                    f"which is not callable",
                    part="function",
                )
            if function_cache is not None:
                function_cache[fn_part] = fn
        args = self._load_part(args_part, "args")
        if type(args) is not tuple:
            if not isinstance(args, (tuple, list)):
                raise DeserializationError(
                    f"the args part of the task buffer must hold a tuple, it holds "
                    f"{_describe(args)}",
                    part="args",
                )
            args = tuple(args)
        kwargs = self._load_part(kwargs_part, "kwargs")
        if not isinstance(kwargs, dict):
            raise DeserializationError(
                f"the kwargs part of the task buffer must hold a dict, it holds "
                f"{_describe(kwargs)}",
                part="kwargs",
            )
        for key in kwargs:
            if not isinstance(key, str):
                raise DeserializationError(
                    f"the kwargs part of the task buffer has a non-string key {key!r}",
                    part="kwargs",
                )
        return fn, args, kwargs

    def _load_part(self, part: str, name: str) -> Any:
        try:
            return self.deserialize(part)
        except DeserializationError as exc:
            raise DeserializationError(f"{name} part of the task buffer: {exc}", part=name) from exc


def _describe(obj: Any) -> str:
    """A short description of ``obj`` for error messages (no huge reprs)."""
    kind = type(obj)
    name = getattr(obj, "__qualname__", None)
    if isinstance(name, str) and callable(obj):
        return f"{kind.__name__} {name}"
    if kind.__module__ == "builtins":
        return f"a {kind.__qualname__}"
    return f"a {kind.__module__}.{kind.__qualname__}"


#: The serializer used by the module-level functions.
default_serializer = Serializer()

serialize = default_serializer.serialize
deserialize = default_serializer.deserialize
pack_function = default_serializer.pack_function
pack_payload = default_serializer.pack_payload
unpack_task_buffer = default_serializer.unpack_task_buffer
