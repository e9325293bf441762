"""A task's resource specification (MPI tasks), and how it rides with the task buffer.

A task may carry a ``resource_specification``: how many nodes and MPI ranks
its command needs, as Globus Compute's ``MPIFunction`` tasks say it::

    {"num_nodes": 2, "ranks_per_node": 2}            # 4 ranks
    {"num_nodes": 2, "num_ranks": 3}                 # 2 ranks on one node, 1 on the other

It travels in the task message's optional ``resource_specification`` field
(see :class:`~funcx_endpoint.wire.messages.Task`; an endpoint that does not
know the field ignores it).  Inside the endpoint the specification is put in
front of the task buffer as one header line (:func:`add_resources_header`):
the interchange and the managers route the buffer without reading it, and
the worker (:func:`split_resources_header`) takes the line off again.  A
packed task buffer starts with a digit, so the ``#`` of the header cannot be
mistaken for one.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

from funcx_endpoint.wire.headers import add_header, split_header

__all__ = [
    "RESOURCES_HEADER",
    "ResourceSpecificationError",
    "add_resources_header",
    "check_resource_specification",
    "split_resources_header",
]

#: The start of the header line a task buffer may carry inside the endpoint.
RESOURCES_HEADER = "#resources:"

#: The keys a resource specification may have (Globus Compute's MPI keys).
KNOWN_KEYS = ("num_nodes", "ranks_per_node", "num_ranks")


class ResourceSpecificationError(ValueError):
    """A resource specification that cannot be met or makes no sense."""


def _count(spec: Mapping[str, Any], key: str) -> Optional[int]:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ResourceSpecificationError(
            f"resource_specification[{key!r}] must be a positive integer, got {value!r}"
        )
    return value


def check_resource_specification(spec: Any) -> Dict[str, int]:
    """``spec`` completed (every key of :data:`KNOWN_KEYS` set), or
    :class:`ResourceSpecificationError` saying what is wrong.

    ``num_nodes`` defaults to 1; ``ranks_per_node`` to enough for
    ``num_ranks`` (else 1); ``num_ranks`` to ``num_nodes * ranks_per_node``.
    Each node gets at least one rank and at most ``ranks_per_node``.
    """
    if not isinstance(spec, Mapping):
        raise ResourceSpecificationError(
            f"a resource specification must be a dict, got {type(spec).__name__}"
        )
    unknown = sorted(str(key) for key in spec if key not in KNOWN_KEYS)
    if unknown:
        raise ResourceSpecificationError(
            f"unknown resource_specification keys {unknown}; known: {list(KNOWN_KEYS)}"
        )
    num_nodes = _count(spec, "num_nodes") or 1
    ranks_per_node = _count(spec, "ranks_per_node")
    num_ranks = _count(spec, "num_ranks")
    if ranks_per_node is None:
        ranks_per_node = math.ceil(num_ranks / num_nodes) if num_ranks else 1
    if num_ranks is None:
        num_ranks = num_nodes * ranks_per_node
    if num_ranks > num_nodes * ranks_per_node:
        raise ResourceSpecificationError(
            f"num_ranks={num_ranks} is more than num_nodes * ranks_per_node = "
            f"{num_nodes} * {ranks_per_node}"
        )
    if num_ranks < num_nodes:
        raise ResourceSpecificationError(
            f"num_ranks={num_ranks} leaves some of the num_nodes={num_nodes} nodes without a rank"
        )
    return {"num_nodes": num_nodes, "ranks_per_node": ranks_per_node, "num_ranks": num_ranks}


def add_resources_header(task_buffer: str, spec: Mapping[str, Any]) -> str:
    """``task_buffer`` with the header line that carries ``spec`` in front."""
    return add_header(RESOURCES_HEADER, task_buffer, spec)


def split_resources_header(task_buffer: str) -> Tuple[Optional[Any], str]:
    """``(spec, buffer)``: the header's specification (None if there is no
    header) and the task buffer without it.

    The specification is returned as it was read (check it with
    :func:`check_resource_specification`); a header that is not JSON is a
    :class:`ResourceSpecificationError`.
    """
    return split_header(RESOURCES_HEADER, task_buffer, "resources", ResourceSpecificationError)
