"""The manager info file, the settings a manager applies, and version checks.

The interchange writes the info file (0600; :class:`ConnectionInfo`) so that
a manager learns where to connect, which CA to trust and the endpoint's
secret without any of it on its command line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Iterable, Optional, Tuple

import attr
import dill

from funcx_endpoint.version import __version__

__all__ = [
    "ConnectionInfo",
    "InfoFileError",
    "ManagerSettings",
    "info_file_is_private",
    "local_versions",
    "versions_differ",
]

# ---------------------------------------------------------------------------
# Versions


#: Most workers one manager starts, whatever the cores (and the count that
#: ``max_workers_per_node`` may not exceed in config.py unless it is ``inf``).
MAX_WORKERS_PER_NODE = 4096


def local_versions() -> Dict[str, str]:
    """The Python, dill and funcx-endpoint versions of this process."""
    return {
        "python_version": "{}.{}.{}".format(*sys.version_info[:3]),
        "dill_version": dill.__version__,
        "funcx_version": __version__,
    }


def versions_differ(mine: Dict[str, str], theirs: Dict[str, str]) -> bool:
    """Whether serialized functions may not travel between the two sides.

    Python must agree on major.minor (bytecode changes between them) and dill
    on its exact version (its pickles change between releases).
    """

    def major_minor(version: str) -> str:
        return ".".join(version.split(".")[:2])

    return major_minor(mine["python_version"]) != major_minor(theirs["python_version"]) or (
        mine["dill_version"] != theirs["dill_version"]
    )


# ---------------------------------------------------------------------------
# The manager info file


class InfoFileError(ValueError):
    """A manager info file that is missing, unreadable or incomplete."""


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _str_tuple(values: Iterable[Any]) -> Tuple[str, ...]:
    return tuple(str(value) for value in values)


@attr.s(auto_attribs=True, frozen=True)
class ManagerSettings:
    """What a manager applies: worker counts, limits and timings.

    ``max_workers_per_node`` None means no bound besides the cores;
    ``task_timeout`` None means tasks may run forever.
    """

    heartbeat_period: float = 30.0
    heartbeat_threshold: float = 120.0
    task_timeout: Optional[float] = None
    result_size_limit: int = 10 * 1024 * 1024
    stop_grace_period: float = 10.0
    worker_debug: bool = False
    max_workers_per_node: Optional[float] = None
    cores_per_worker: float = 1.0
    mem_per_worker: Optional[float] = None
    available_accelerators: Tuple[str, ...] = attr.ib(default=(), converter=_str_tuple)
    prefetch_capacity: int = 1
    worker_environment: Dict[str, str] = attr.Factory(dict)
    batch_interval: float = 0.001
    #: How workers run: ``no_container``, or a container engine (``podman``...).
    worker_mode: str = "no_container"
    #: The image every worker runs (the endpoint-wide form), or None: each task's
    #: container says which.
    container_uri: Optional[str] = None
    #: The image types taken from a task's container, in order; empty: the engine's.
    container_image_types: Tuple[str, ...] = attr.ib(default=(), converter=_str_tuple)
    #: Options added to the engine's command line (split as a shell would).
    container_cmd_options: str = ""

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict of these settings."""
        data = attr.asdict(self)
        data["available_accelerators"] = list(self.available_accelerators)
        data["container_image_types"] = list(self.container_image_types)
        return data

    @classmethod
    def from_json(cls, data: Any) -> ManagerSettings:
        """Settings from :meth:`to_json`'s output; unknown keys are ignored."""
        if not isinstance(data, dict):
            raise InfoFileError("settings must be a JSON object")
        known = {field.name for field in attr.fields(cls)}
        try:
            values = {key: value for key, value in data.items() if key in known}
            for key in ("task_timeout", "max_workers_per_node", "mem_per_worker"):
                if key in values:
                    values[key] = _optional_float(values[key])
            for key in (
                "heartbeat_period",
                "heartbeat_threshold",
                "stop_grace_period",
                "batch_interval",
            ):
                if key in values:
                    values[key] = float(values[key])
            for key in ("cores_per_worker",):
                if key in values:
                    values[key] = float(values[key])
            for key in ("result_size_limit", "prefetch_capacity"):
                if key in values:
                    values[key] = int(values[key])
            if "available_accelerators" in values:
                values["available_accelerators"] = [
                    str(a) for a in values["available_accelerators"]
                ]
            if "worker_mode" in values:
                values["worker_mode"] = str(values["worker_mode"] or "no_container")
            if "container_cmd_options" in values:
                values["container_cmd_options"] = str(values["container_cmd_options"] or "")
            if "container_uri" in values:
                uri = values["container_uri"]
                values["container_uri"] = None if uri is None else str(uri)
            if "container_image_types" in values:
                values["container_image_types"] = [str(t) for t in values["container_image_types"]]
            if "worker_environment" in values:
                values["worker_environment"] = {
                    str(k): str(v) for k, v in dict(values["worker_environment"]).items()
                }
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise InfoFileError(f"bad settings: {exc}") from None


@attr.s(auto_attribs=True, frozen=True)
class ConnectionInfo:
    """Where and how a manager connects to the interchange (the info file's content)."""

    address: str
    port: int
    ca_cert_pem: str
    secret: str = attr.ib(repr=False)
    settings: ManagerSettings = attr.Factory(ManagerSettings)

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict, secret included."""
        return {
            "address": self.address,
            "port": self.port,
            "ca_cert_pem": self.ca_cert_pem,
            "secret": self.secret,
            "settings": self.settings.to_json(),
        }

    def write(self, path: str) -> None:
        """Write the info file atomically, readable by the owner only (0600)."""
        # Imported here: the interchange writes info files, managers only read
        # them, and a manager imports nothing of the project but the wire and
        # worker packages.
        from funcx_endpoint.files import write_atomically

        write_atomically(path, json.dumps(self.to_json(), indent=1).encode("utf-8"), 0o600)

    @classmethod
    def read(cls, path: str) -> ConnectionInfo:
        """Read an info file; InfoFileError saying what is wrong otherwise."""
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except OSError as exc:
            raise InfoFileError(f"cannot read the manager info file {path}: {exc}") from None
        except ValueError as exc:
            raise InfoFileError(f"the manager info file {path} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InfoFileError(f"the manager info file {path} must hold a JSON object")
        missing = [k for k in ("address", "port", "ca_cert_pem", "secret") if k not in data]
        if missing:
            raise InfoFileError(f"the manager info file {path} lacks {', '.join(missing)}")
        try:
            settings = ManagerSettings.from_json(data.get("settings", {}))
            return cls(
                address=str(data["address"]),
                port=int(data["port"]),
                ca_cert_pem=str(data["ca_cert_pem"]),
                secret=str(data["secret"]),
                settings=settings,
            )
        except (TypeError, ValueError) as exc:
            raise InfoFileError(f"the manager info file {path} is invalid: {exc}") from None


def info_file_is_private(path: str) -> bool:
    """Whether only the owner may read ``path`` (as an info file must be)."""
    return (os.stat(path).st_mode & 0o077) == 0
