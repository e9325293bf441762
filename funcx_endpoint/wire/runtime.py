"""The submitter's Python and dill versions with each task; the worker's environment
with each result.

A function pickled by one Python may not load in another: dill's pickles of
code hold bytecode, which changes between Python minor versions, and dill's
own format changes between its versions.  So the SDK announces the versions
it serialized with (``user_runtime``, :func:`local_runtime`) in the submit
body; the service stores them with the task and adds them to the task
message as an optional ``user_runtime`` field (funcX 1.0 endpoints, whose
``funcx_common`` messages ignore unknown fields, never see a difference).
Inside the endpoint they travel as one header line in front of the task
buffer (:func:`add_runtime_header`), as the resource specification does
(:mod:`funcx_endpoint.wire.resources`): routers pass it on unread and the
worker takes it off (:func:`split_runtime_header`).

The worker compares them with its own (:func:`runtime_difference`): when the
Python minor versions differ it loads functions from their source only (the
bytecode of another Python may crash the interpreter: an opaque
``WorkerLost``), and a task that cannot be loaded while the versions differ
is answered with ``VersionMismatch`` naming both sides.

Every result a worker makes carries its environment (:func:`worker_details`)
in the result message's optional ``details`` field, as Globus Compute's
results do (``python_version``, ``dill_version``, ``os``, plus ``host`` and
``funcx_version`` here); the service returns it with the task and the SDK
warns once when it differs from its own.
"""

from __future__ import annotations

import platform
import socket
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import dill

from funcx_endpoint.wire.headers import add_header, split_header

__all__ = [
    "RUNTIME_HEADER",
    "RUNTIME_KEYS",
    "UserRuntimeError",
    "add_runtime_header",
    "check_user_runtime",
    "describe_runtime",
    "local_runtime",
    "runtime_difference",
    "split_runtime_header",
    "worker_details",
]

#: The start of the header line a task buffer may carry inside the endpoint.
RUNTIME_HEADER = "#runtime:"

#: The keys of a ``user_runtime`` (all strings, all optional).
RUNTIME_KEYS = ("python_version", "dill_version")

_MAX_VALUE = 64


class UserRuntimeError(ValueError):
    """A ``user_runtime`` or runtime header that makes no sense."""


def local_runtime() -> Dict[str, str]:
    """This interpreter's ``user_runtime``: what the SDK announces."""
    return {
        "python_version": "{}.{}.{}".format(*sys.version_info[:3]),
        "dill_version": str(dill.__version__),
    }


def worker_details() -> Dict[str, str]:
    """The environment a worker reports with each result."""
    from funcx_endpoint.version import __version__

    details = local_runtime()
    details.update(os=platform.platform(), host=socket.gethostname(), funcx_version=__version__)
    return details


def check_user_runtime(value: Any) -> Dict[str, str]:
    """``value`` as a ``user_runtime`` (known keys only, short strings), or
    :class:`UserRuntimeError` saying what is wrong."""
    if not isinstance(value, Mapping):
        raise UserRuntimeError(f"user_runtime must be an object, got {type(value).__name__}")
    runtime: Dict[str, str] = {}
    for key in RUNTIME_KEYS:
        item = value.get(key)
        if item is None:
            continue
        if not isinstance(item, str) or not item or len(item) > _MAX_VALUE:
            raise UserRuntimeError(
                f"user_runtime[{key!r}] must be a version string of at most "
                f"{_MAX_VALUE} characters, got {item!r:.80}"
            )
        runtime[key] = item
    return runtime


def _minor(version: str) -> Tuple[str, ...]:
    return tuple(version.split(".")[:2])


def runtime_difference(theirs: Mapping[str, str], mine: Mapping[str, str]) -> Tuple[bool, bool]:
    """``(python_differs, dill_differs)``: whether the Python minor versions
    (3.10 against 3.11; patch releases keep bytecode) and the dill versions
    differ.  A version one side does not say is taken as the same."""
    python = theirs.get("python_version"), mine.get("python_version")
    dill_versions = theirs.get("dill_version"), mine.get("dill_version")
    python_differs = bool(python[0] and python[1] and _minor(python[0]) != _minor(python[1]))
    dill_differs = bool(
        dill_versions[0] and dill_versions[1] and dill_versions[0] != dill_versions[1]
    )
    return python_differs, dill_differs


def describe_runtime(runtime: Mapping[str, Any]) -> str:
    """``Python 3.11.2 with dill 0.3.6`` (``?`` for what is not known)."""
    return (
        f"Python {runtime.get('python_version') or '?'} "
        f"with dill {runtime.get('dill_version') or '?'}"
    )


def add_runtime_header(task_buffer: str, runtime: Mapping[str, str]) -> str:
    """``task_buffer`` with the header line that carries ``runtime`` in front."""
    return add_header(RUNTIME_HEADER, task_buffer, runtime)


def split_runtime_header(task_buffer: str) -> Tuple[Optional[Dict[str, str]], str]:
    """``(runtime, buffer)``: the header's runtime (None without a header) and
    the task buffer without it; :class:`UserRuntimeError` for a bad header."""
    if not task_buffer.startswith(RUNTIME_HEADER):
        return None, task_buffer
    value, rest = split_header(RUNTIME_HEADER, task_buffer, "runtime", UserRuntimeError)
    try:
        return check_user_runtime(value), rest
    except UserRuntimeError as exc:
        raise UserRuntimeError(f"unreadable runtime header: {exc}") from None
