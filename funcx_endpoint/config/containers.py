"""The executor's container fields: how workers run, directly or in containers.

``worker_mode`` (``no_container`` or an engine), ``container_cmd_options``, and
Globus Compute's endpoint-wide container (``container_type`` with
``container_uri``; funcX 1.0 called the image ``container_image``).  The
engines themselves are :mod:`funcx_endpoint.manager.containers`; see
``docs/containers.rst``.
"""

from __future__ import annotations

from typing import Any, Dict, List

from funcx_endpoint.config.fields import (
    ConfigError,
    Field,
    Notice,
    Unused,
    choice,
    optional,
    string,
)

__all__ = [
    "CONTAINER_ENGINES",
    "CONTAINER_FIELDS",
    "FUNCX10_WORKER_MODES",
    "WORKER_MODES",
    "container_notices",
    "resolve_containers",
]

#: The container engines a worker mode may name (:mod:`funcx_endpoint.manager.containers`).
CONTAINER_ENGINES = ("docker", "podman", "singularity", "apptainer", "shifter")
#: The worker modes: workers run directly, or in containers of an engine.
WORKER_MODES = ("no_container", *CONTAINER_ENGINES)
#: funcX 1.0's worker modes, and the mode each runs as here.
FUNCX10_WORKER_MODES = {
    "singularity_reuse": "singularity",
    "singularity_single_use": "singularity",
    "shifter_reuse": "shifter",
}


def _worker_mode(value: Any) -> str:
    """A worker mode; funcX 1.0's ``singularity_reuse`` and the like run as their
    engine's mode (with a notice)."""
    mode = string(what="a worker mode such as 'no_container'")(value)
    mode = FUNCX10_WORKER_MODES.get(mode, mode)
    if mode not in WORKER_MODES:
        raise ValueError(f"expected one of {', '.join(map(repr, WORKER_MODES))}, got {mode!r}")
    return mode


CONTAINER_FIELDS: Dict[str, Field] = {
    "worker_mode": Field(
        "no_container",
        _worker_mode,
        "How workers are started: 'no_container' (directly), or in containers of "
        "an engine: 'docker', 'podman', 'singularity', 'apptainer', 'shifter'.",
        unused=Unused(
            "funcX 1.0's reuse/single-use modes run as their engine's mode here, "
            "with workers reused",
            WORKER_MODES,
            partly=True,
        ),
    ),
    "container_cmd_options": Field(
        "",
        optional(string()),
        "Extra options for the container engine's command, split as a shell would "
        "(e.g. '--memory 2g' for docker/podman, '--bind /data' for apptainer).",
    ),
    # Globus Compute's endpoint-wide container (funcX 1.0's container_type and
    # container_image meant the same).
    "container_type": Field(
        None,
        optional(choice(*CONTAINER_ENGINES)),
        "The engine of the endpoint-wide container (Globus Compute's form): with "
        "container_uri, every worker runs that image with it (it sets worker_mode "
        "when that is not given).",
    ),
    "container_uri": Field(
        None,
        optional(string(r".+", "an image name")),
        "The image every worker runs (Globus Compute's form); None: each task's "
        "container says which (or none: no container).",
    ),
    "container_image": Field(
        None,
        optional(string(r".+", "an image name")),
        "funcX 1.0's name of container_uri.",
    ),
}


def resolve_containers(executor: Any) -> None:
    """The endpoint-wide form: ``container_type`` is the engine (the worker mode
    unless one was given), ``container_uri`` (or ``container_image``) the image.
    ConfigError when they contradict each other."""
    if executor.container_uri is None and executor.container_image is not None:
        executor.container_uri = executor.container_image
    engine = executor.container_type
    if engine is not None and executor.container_uri is not None:
        if executor.worker_mode == "no_container" and "worker_mode" not in executor.given:
            executor.worker_mode = engine
        elif executor.worker_mode != engine:
            raise ConfigError(
                f"HighThroughputExecutor: container_type={engine!r} and "
                f"worker_mode={executor.worker_mode!r} name different engines; give one"
            )
    if executor.container_uri is not None and executor.worker_mode == "no_container":
        raise ConfigError(
            f"HighThroughputExecutor: container_uri={executor.container_uri!r} needs a "
            f"container engine: set container_type (or worker_mode) to one of "
            f"{', '.join(map(repr, CONTAINER_ENGINES))}"
        )


def container_notices(executor: Any) -> List[Notice]:
    """``container_type`` without an image: nothing runs it."""
    if executor.container_type is not None and executor.container_uri is None:
        return [
            Notice(
                "HighThroughputExecutor.container_type",
                executor.container_type,
                "without container_uri (or container_image) no container is run for "
                "it: set worker_mode to run each task's container, or container_uri "
                "to run every worker in one image",
            )
        ]
    return []
