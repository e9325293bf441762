"""What the Kubernetes providers send and read: names, pod and secret manifests, pod states.

Pure functions over plain dicts (the JSON of the Kubernetes REST API); nothing
here imports the ``kubernetes`` client or talks to a cluster, so all of it is
tested without one.  :mod:`funcx_endpoint.executor.providers.kubernetes`
sends these manifests.

How a pod's manager finds the interchange: the manager info file (address,
port, CA certificate, the endpoint's secret) is put in a Kubernetes Secret,
one per endpoint (:func:`secret_manifest`), and mounted read-only into each
manager pod at ``info_dir`` (:func:`pod_manifest`).  The pod's command names
only the mounted file (:func:`pod_command`), so the secret is in neither the
command nor the environment of the pod spec; who can read Secrets in the
namespace can read it, as with any Kubernetes Secret.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import shlex
import socket
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attr

from funcx_endpoint.executor.providers.base import JobState, JobStatus

#: Where the info-file Secret is mounted in a manager pod.
DEFAULT_INFO_DIR = "/etc/funcx-manager"
#: The key (so the file name) of the info file in the Secret.
INFO_KEY = "manager-info.json"
#: Where a pod's manager writes its log and its workers' output (the mounted
#: Secret is read-only, so not beside the info file as elsewhere).
DEFAULT_LOG_DIR = "/tmp/funcx-manager"
#: The Python that runs the manager in the image.
DEFAULT_PYTHON = "python3"
#: The volume holding the info file.
INFO_VOLUME = "funcx-manager-info"

MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
NAME = "app.kubernetes.io/name"
BLOCK = "funcx-block"

#: Waiting reasons of a container that will not start without a change:
#: such a pod is reported FAILED (and deleted) instead of PENDING forever.
STUCK_REASONS = frozenset(
    {
        "ErrImageNeverPull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
    }
)

PHASES = {
    "Pending": JobState.PENDING,
    "Running": JobState.RUNNING,
    "Succeeded": JobState.COMPLETED,
    "Failed": JobState.FAILED,
    "Unknown": JobState.UNKNOWN,
}

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def dns_label(text: str, max_length: int = 63, fallback: str = "funcx") -> str:
    """``text`` made a DNS-1123 label (lower case letters, digits and ``-``, at
    most ``max_length``), as Kubernetes wants pod and container names."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    name = re.sub(r"-{2,}", "-", name)[:max_length].strip("-")
    return name or fallback


def label_value(text: str) -> str:
    """``text`` made a valid label value (at most 63 characters)."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")
    assert _LABEL_VALUE.match(value), value
    return value


def endpoint_key(working_dir: str, hostname: Optional[str] = None) -> str:
    """A short id of this endpoint (host and directory): its pods' and Secret's label."""
    host = hostname if hostname is not None else socket.gethostname()
    return hashlib.sha256(f"{host}\0{working_dir}".encode()).hexdigest()[:12]


def block_of(job_name: str) -> Optional[str]:
    """The block id in a job name the block scaler gave (``funcx.<label>.block-<id>``)."""
    found = re.search(r"block-([A-Za-z0-9]+)$", job_name)
    return found.group(1) if found else None


def selector(labels: Mapping[str, str]) -> str:
    """An equality label selector matching ``labels``."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def endpoint_labels(key: str) -> Dict[str, str]:
    """The labels every object of the endpoint with this :func:`endpoint_key` carries."""
    return {MANAGED_BY: "funcx-endpoint", INSTANCE: f"funcx-{key}"}


def secret_name(key: str) -> str:
    """The name of the endpoint's info-file Secret."""
    return f"funcx-{key}-manager-info"


class NotAManagerCommand(ValueError):
    """The block command names no manager info file."""


def info_file_of(command: str) -> str:
    """The ``--info-file`` path of a manager command line."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word == "--info-file" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--info-file="):
            return word.split("=", 1)[1]
    raise NotAManagerCommand(f"no --info-file in the manager command {command!r}")


def pod_command(
    command: str,
    info_dir: str = DEFAULT_INFO_DIR,
    *,
    python: str = DEFAULT_PYTHON,
    log_dir: str = DEFAULT_LOG_DIR,
) -> str:
    """The manager command as it runs in a pod.

    The info file is the one mounted at ``info_dir``; the manager logs to
    ``log_dir``; a command that runs ``<python> -m funcx_endpoint.manager``
    runs it with the image's ``python``, not the endpoint's interpreter path.
    """
    words = shlex.split(command)
    out: List[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--info-file" and i + 1 < len(words):
            out += [word, f"{info_dir.rstrip('/')}/{INFO_KEY}"]
            i += 2
            continue
        if word.startswith("--info-file="):
            word = f"--info-file={info_dir.rstrip('/')}/{INFO_KEY}"
        out.append(word)
        i += 1
    if "--info-file" not in out and not any(w.startswith("--info-file=") for w in out):
        raise NotAManagerCommand(f"no --info-file in the manager command {command!r}")
    if len(out) >= 3 and out[1:3] == ["-m", "funcx_endpoint.manager"]:
        out[0] = python
    if "--log-dir" not in out:
        out += ["--log-dir", log_dir]
    return shlex.join(out)


@attr.s(auto_attribs=True, frozen=True)
class PodSettings:
    """What a manager pod is made of (funcX 1.0's ``KubernetesProvider`` fields)."""

    image: str
    namespace: str = "default"
    max_cpu: float = 2
    max_mem: str = "500Mi"
    init_cpu: float = 1
    init_mem: str = "250Mi"
    worker_init: str = ""
    pod_name: Optional[str] = None
    user_id: Optional[str] = None
    group_id: Optional[str] = None
    run_as_non_root: bool = False
    secret: Optional[str] = None  # an image pull secret
    persistent_volumes: Tuple[Tuple[str, str], ...] = ()
    info_dir: str = DEFAULT_INFO_DIR
    log_dir: str = DEFAULT_LOG_DIR
    python: str = DEFAULT_PYTHON
    stop_grace_period: float = 10.0

    @classmethod
    def from_config(cls, provider: Any, **more: Any) -> PodSettings:
        """The settings of a ``funcx_endpoint.config.kubernetes.KubernetesProvider``."""
        names = [f.name for f in attr.fields(cls) if f.name in provider.fields]
        values: Dict[str, Any] = {name: getattr(provider, name) for name in names}
        values["persistent_volumes"] = tuple(
            (claim, path) for claim, path in (provider.persistent_volumes or [])
        )
        values.update(more)
        return cls(**values)


def _quantity(value: float) -> str:
    """A CPU quantity as Kubernetes writes it (``2``, ``0.5``)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def pod_name(settings: PodSettings, job_name: str, unique: str) -> str:
    """A pod's name: the configured ``pod_name`` or the job name, and ``unique``."""
    base = settings.pod_name or job_name
    return f"{dns_label(base, 63 - len(unique) - 1)}-{unique}"


def pod_manifest(
    settings: PodSettings,
    name: str,
    command: str,
    labels: Mapping[str, str],
    info_secret: str,
) -> Dict[str, Any]:
    """The pod running one manager: ``command`` (see :func:`pod_command`) after
    ``worker_init``, with the info-file Secret ``info_secret`` mounted read-only."""
    # exec: the manager is the container's first process and gets the TERM
    # that deleting the pod sends (a shell there would ignore it).
    script = f"exec {command}"
    if settings.worker_init.strip():
        script = f"{settings.worker_init}\n{script}"
    mounts: List[Dict[str, Any]] = [
        {"name": INFO_VOLUME, "mountPath": settings.info_dir, "readOnly": True}
    ]
    volumes: List[Dict[str, Any]] = [
        {
            "name": INFO_VOLUME,
            "secret": {
                "secretName": info_secret,
                # Owner-only when the pod runs as root; else readable by the
                # pod's group (fsGroup), the only way a non-root user reads it.
                "defaultMode": 0o440 if settings.group_id else 0o400,
            },
        }
    ]
    for claim, path in settings.persistent_volumes:
        volume = dns_label(f"pv-{claim}")
        mounts.append({"name": volume, "mountPath": path})
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim}})
    container: Dict[str, Any] = {
        "name": "manager",
        "image": settings.image,
        "command": ["/bin/sh", "-c", script],
        "resources": {
            "limits": {"cpu": _quantity(settings.max_cpu), "memory": settings.max_mem},
            "requests": {"cpu": _quantity(settings.init_cpu), "memory": settings.init_mem},
        },
        "volumeMounts": mounts,
        "env": [
            {"name": "FUNCX_JOB_NAME", "value": name},
            {
                "name": "FUNCX_POD_NAME",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
        ],
    }
    spec: Dict[str, Any] = {
        "restartPolicy": "Never",
        # The manager needs no access to the Kubernetes API; the functions its
        # workers run get no service account token either.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": int(math.ceil(settings.stop_grace_period)) + 5,
        "containers": [container],
        "volumes": volumes,
    }
    if settings.user_id and settings.group_id:
        container["securityContext"] = {
            "runAsUser": int(settings.user_id),
            "runAsGroup": int(settings.group_id),
            "runAsNonRoot": bool(settings.run_as_non_root),
        }
        spec["securityContext"] = {"fsGroup": int(settings.group_id)}
    elif settings.run_as_non_root:
        container["securityContext"] = {"runAsNonRoot": True}
    if settings.secret:
        spec["imagePullSecrets"] = [{"name": settings.secret}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": dict(labels)},
        "spec": spec,
    }


def secret_manifest(
    name: str, namespace: str, labels: Mapping[str, str], info: bytes
) -> Dict[str, Any]:
    """The Secret holding the manager info file (key :data:`INFO_KEY`)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "data": {INFO_KEY: base64.b64encode(info).decode("ascii")},
    }


def _get(obj: Any, *path: str) -> Any:
    """Follow ``path`` through dicts (camelCase keys) or client models (snake_case)."""
    for key in path:
        if obj is None:
            return None
        if isinstance(obj, Mapping):
            obj = obj.get(key)
        else:
            obj = getattr(obj, re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(), None)
    return obj


def _container_states(pod: Any) -> Sequence[Any]:
    return _get(pod, "status", "containerStatuses") or []


def pod_status(pod: Any, log_path: Optional[str] = None) -> JobStatus:
    """A pod's phase as a job status (a dict of the API's JSON, or a client model).

    Pending, Running, Succeeded, Failed, Unknown become PENDING, RUNNING,
    COMPLETED, FAILED, UNKNOWN; a pending pod whose container is stuck (one
    of :data:`STUCK_REASONS`) is FAILED.  The message says why, the exit code
    is the container's.
    """
    phase = _get(pod, "status", "phase") or "Unknown"
    state = PHASES.get(phase, JobState.UNKNOWN)
    message = _get(pod, "status", "message")
    reason = _get(pod, "status", "reason")
    exit_code: Optional[int] = None
    for container in _container_states(pod):
        waiting = _get(container, "state", "waiting")
        terminated = _get(container, "state", "terminated")
        if terminated is not None:
            exit_code = _get(terminated, "exitCode")
            reason = reason or _get(terminated, "reason")
            message = message or _get(terminated, "message")
        elif waiting is not None and _get(waiting, "reason"):
            reason = _get(waiting, "reason")
            message = _get(waiting, "message") or message
            if reason in STUCK_REASONS and state in (JobState.PENDING, JobState.RUNNING):
                state = JobState.FAILED
    if state == JobState.PENDING and not reason:
        for condition in _get(pod, "status", "conditions") or []:
            if _get(condition, "type") == "PodScheduled" and _get(condition, "status") == "False":
                reason, message = _get(condition, "reason"), _get(condition, "message")
    text = None
    if reason or message:
        text = ": ".join(str(part) for part in (reason, message) if part)
    stderr = log_path if state == JobState.FAILED else None
    return JobStatus(state, text, exit_code, None, stderr)
