"""Functions as source code: the ``03`` and ``04`` serialization methods.

Writing takes a plain function's source as it can stand alone (dedented,
undecorated); a lambda becomes ``_funcx_lambda = <expression>``.  Loading
runs the source in a fresh namespace with postponed evaluation of
annotations and takes the named function (or the one lambda).
"""

from __future__ import annotations

import ast
import builtins
import textwrap
import types
from typing import Any, Callable, Dict, Tuple

import dill
import dill.source

from funcx_endpoint.wire.errors import DeserializationError, SerializationError

#: The name under which a lambda's source binds it in ``03``/``04`` payloads.
LAMBDA_NAME = "_funcx_lambda"
# The compile flag that makes annotations lazy strings; the
# ``from __future__ import annotations`` line above binds that feature object.
_ANNOTATIONS_FLAG: int = annotations.compiler_flag


def _standalone_source(fn: Any, getsource: Callable[[Any], str]) -> Tuple[str, str]:
    """The ``(name, source)`` pair that recreates plain function ``fn``.

    Raises SerializationError when ``fn`` cannot be recreated from its source
    alone: not a plain function, no source, a closure, or source that does
    not define it.
    """
    if not isinstance(fn, types.FunctionType):
        raise SerializationError(
            f"{type(fn).__name__} objects have no standalone source; only plain functions do"
        )
    code = fn.__code__
    if code.co_freevars:
        raise SerializationError(
            f"function {fn.__qualname__} uses variables of an enclosing function "
            f"({', '.join(code.co_freevars)}), which its source cannot carry"
        )
    try:
        source = getsource(fn)
    except Exception as exc:  # OSError, TypeError, IndexError from dill.source...
        raise SerializationError(
            f"could not find the source of {fn.__qualname__}: {type(exc).__name__}: {exc}"
        ) from exc
    source = textwrap.dedent(source)
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise SerializationError(
            f"the source found for {fn.__qualname__} does not parse on its own: {exc}"
        ) from exc
    if code.co_name == "<lambda>":
        return LAMBDA_NAME, f"{LAMBDA_NAME} = {_lambda_segment(source, tree, code)}\n"
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name:
            lines = source.splitlines(keepends=True)
            # node.lineno is the ``def`` line, after any decorators.
            text = "".join(lines[node.lineno - 1 : node.end_lineno])
            if not text.endswith("\n"):
                text += "\n"
            return code.co_name, text
    raise SerializationError(
        f"the source found for {fn.__qualname__} does not define {code.co_name!r} at its top level"
    )


def _lambda_segment(source: str, tree: ast.AST, code: types.CodeType) -> str:
    """The text of the one lambda in ``source`` that compiles to ``code``."""
    matches = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Lambda):
            continue
        segment = ast.get_source_segment(source, node)
        if segment is None:
            continue
        try:
            compiled = compile(f"({segment})", "<string>", "eval", dont_inherit=True)
        except SyntaxError:
            continue
        for const in compiled.co_consts:
            if isinstance(const, types.CodeType) and const.co_code == code.co_code:
                matches.append(segment)
                break
    if len(matches) != 1:
        raise SerializationError(
            f"could not single out the lambda in its source line "
            f"({len(matches)} lambda expressions there match it)"
        )
    # A lambda spanning lines needs brackets to stand on the right of ``=``.
    return matches[0] if "\n" not in matches[0] else f"({matches[0]})"


def _fresh_namespace() -> Dict[str, Any]:
    # "__main__" makes dill pickle by value anything the source defines
    # (e.g. a class whose instance the function returns).
    return {"__name__": "__main__", "__builtins__": builtins}


def _load_source(name: Any, source: Any, method: str) -> Callable[..., Any]:
    """Run ``source`` in a fresh namespace and return what it calls ``name``."""
    if not isinstance(name, str) or not isinstance(source, str):
        raise DeserializationError(
            f"payload with header {method!r} should hold a (name, source) pair of "
            f"strings, got ({type(name).__name__}, {type(source).__name__})"
        )
    source = textwrap.dedent(source)
    namespace = _fresh_namespace()
    if name == "<lambda>":
        return _load_lambda(source, namespace, method)
    try:
        code = compile(source, "<string>", "exec", flags=_ANNOTATIONS_FLAG, dont_inherit=True)
        exec(code, namespace)
    except Exception as exc:
        raise DeserializationError(
            f"the source of function {name!r} (header {method!r}) failed to run: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    fn = namespace.get(name)
    if fn is None:
        raise DeserializationError(
            f"the source in a payload with header {method!r} does not define {name!r}"
        )
    if not callable(fn):
        raise DeserializationError(
            f"the source in a payload with header {method!r} defines {name!r} as a "
            f"{type(fn).__name__}, not a function"
        )
    return fn


def _load_lambda(source: str, namespace: Dict[str, Any], method: str) -> Callable[..., Any]:
    """Evaluate the single lambda expression in ``source`` (real-SDK payloads)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise DeserializationError(
            f"the source of a lambda (header {method!r}) does not parse: {exc}"
        ) from exc
    lambdas = [node for node in ast.walk(tree) if isinstance(node, ast.Lambda)]
    if len(lambdas) != 1:
        raise DeserializationError(
            f"the source of a lambda (header {method!r}) holds {len(lambdas)} lambda "
            f"expressions, so which one was meant is unknown; define the function "
            f"with def instead"
        )
    try:
        code = compile(
            ast.Expression(lambdas[0]),
            "<string>",
            "eval",
            flags=_ANNOTATIONS_FLAG,
            dont_inherit=True,
        )
        return eval(code, namespace)
    except Exception as exc:
        raise DeserializationError(
            f"the lambda in a payload with header {method!r} failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _dill_getsource(fn: Any) -> str:
    return dill.source.getsource(fn, lstrip=True)
