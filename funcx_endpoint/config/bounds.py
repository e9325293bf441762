"""Upper bounds of config values, and the checks of addresses and CA files.

A value past these bounds is not a preference but a mistake that would hang
or exhaust the machine later (``amqp_prefetch=10**6`` cannot be encoded in
AMQP's 16-bit field, ``cores_per_worker=1e-9`` asks for billions of
workers, ``nodes_per_block=10**6`` on the LocalProvider forks until the pid
limit): the config is refused when it is loaded, with the reason.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Any, Optional

from funcx_endpoint.wire.info import MAX_WORKERS_PER_NODE

__all__ = [
    "AMQP_SHORT_MAX",
    "LOCAL_MAX_MANAGERS",
    "LOCAL_MAX_NODES_PER_BLOCK",
    "MAX_WORKERS_PER_NODE",
    "ca_file_problem",
    "check_workers_per_node",
    "local_managers_problem",
    "host_address",
]

#: AMQP ``short`` fields (``basic.qos`` prefetch-count, ``connection.tune``
#: heartbeat) hold at most this.
AMQP_SHORT_MAX = 65535
#: The LocalProvider runs every "node" of a block as a process on this
#: machine: at most this many per block ...
LOCAL_MAX_NODES_PER_BLOCK = 64
#: ... and at most this many managers in all its blocks.
LOCAL_MAX_MANAGERS = 256

# Underscores are not RFC 1123, but some clusters name their nodes so.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def host_address(value: Any) -> str:
    """A check for the interchange's address: an IPv4 or IPv6 address, or a DNS
    host name (RFC 1123).  A dotted string of numbers that is no IPv4 address
    (``999.1.1.1``) is refused: taken for a host name, it would make the
    interchange listen on every interface."""
    if not isinstance(value, str):
        raise TypeError(f"expected an IP address or host name, got {type(value).__name__}")
    text = value.strip()
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()  # all-numeric top label: a mistyped IP address
    ):
        raise ValueError(f"expected an IP address or host name, got {value!r}")
    return text


def check_workers_per_node(
    max_workers_per_node: float, cores_per_worker: float, cpu_count: Optional[int] = None
) -> Optional[str]:
    """Why these settings give too many workers per node (on a node with this
    machine's ``cpu_count`` cores), or None when they are fine."""
    if math.isfinite(max_workers_per_node):
        if max_workers_per_node > MAX_WORKERS_PER_NODE:
            return (
                f"max_workers_per_node ({max_workers_per_node:g}) is above "
                f"{MAX_WORKERS_PER_NODE}, the most workers a manager starts"
            )
        return None
    cores = cpu_count or os.cpu_count() or 1
    workers = cores / cores_per_worker
    if workers > MAX_WORKERS_PER_NODE:
        return (
            f"cores_per_worker={cores_per_worker:g} gives {workers:.3g} workers per node on "
            f"this machine's {cores} cores, more than {MAX_WORKERS_PER_NODE}; raise "
            f"cores_per_worker or set max_workers_per_node"
        )
    return None


def local_managers_problem(nodes_per_block: int, max_blocks: int) -> Optional[str]:
    """Why a LocalProvider with these settings would start too many manager
    processes on this machine (``.field: reason`` or ``: reason``), or None."""
    if nodes_per_block > LOCAL_MAX_NODES_PER_BLOCK:
        return (
            f".nodes_per_block: at most {LOCAL_MAX_NODES_PER_BLOCK} managers per block run "
            f"on this machine, got {nodes_per_block}"
        )
    if max_blocks * nodes_per_block > LOCAL_MAX_MANAGERS:
        return (
            f": max_blocks * nodes_per_block = {max_blocks * nodes_per_block} managers on "
            f"this machine; at most {LOCAL_MAX_MANAGERS}"
        )
    return None


def ca_file_problem(path: str) -> Optional[str]:
    """Why the CA file at ``path`` cannot be used (missing, unreadable, not a PEM
    certificate), or None when it holds at least one PEM certificate."""
    from twisted.internet.ssl import Certificate

    try:
        with open(path, "rb") as f:
            data = f.read(1024 * 1024)
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        Certificate.loadPEM(data)
    except Exception as e:  # OpenSSL's errors are many and undocumented
        return f"{path} holds no valid PEM certificate ({type(e).__name__})"
    return None
