"""Parsl's ``KubernetesProvider``, unchanged, made to start managers that find the interchange.

Parsl's provider runs the command it is given in a pod (``/bin/bash -c
"<worker_init> <command>"``), through its own ``kubernetes`` client
(``provider.kube_client``, configured when the provider was built).  The
endpoint's manager command names the manager info file on the endpoint's
host, which a pod does not have.  :class:`ParslKubernetesProvider` wraps the
provider (a config's, as given) and, through the provider's own client:

* puts the info file in the endpoint's Secret (as
  :class:`~funcx_endpoint.executor.providers.kubernetes.KubernetesPodProvider`
  does) and mounts it in every pod the provider creates: its
  ``kube_client`` is replaced by a proxy that adds the Secret volume and
  mount to the pod body Parsl built, and a timeout to every request;
* gives the provider the manager command as it runs in a pod
  (:func:`~funcx_endpoint.executor.providers.kube_spec.pod_command`) and a
  job name Kubernetes accepts as pod and container name;
* turns the client's errors into clear ones, holds calls back while the
  API is unavailable, and reports a pod that was gone when cancelled as
  cancelled (Parsl's provider would keep it running for ever).

Everything else (pod spec, states from the pod phase, ``status_polling_interval``
of 60 s) is Parsl's.  Like the provider, every method blocks: it is called
through a :class:`~funcx_endpoint.executor.providers.base.ProviderAdapter`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from funcx_endpoint.executor.providers.base import JobState, JobStatus
from funcx_endpoint.executor.providers.kube_api import (
    REQUEST_TIMEOUT,
    ApiBackoff,
    KubernetesApiError,
    api_host,
    describe_api_error,
    is_api_error,
    not_found,
    read_info_file,
)
from funcx_endpoint.executor.providers.kube_spec import (
    DEFAULT_INFO_DIR,
    DEFAULT_LOG_DIR,
    DEFAULT_PYTHON,
    INFO_VOLUME,
    dns_label,
    info_file_of,
    pod_command,
)
from funcx_endpoint.executor.providers.kubernetes import (
    delete_info_secret,
    endpoint_info_secret,
)

#: Parsl appends ``-<milliseconds>`` (14 characters) to the job name.
_JOB_NAME_LENGTH = 63 - 14


class _InfoMountingApi:
    """A ``CoreV1Api`` proxy: pods created get the info-file Secret mounted,
    and every request a timeout (unless the caller gave one)."""

    def __init__(self, api: Any, secret: str, info_dir: str, timeout: Tuple[float, float]):
        self._api = api
        self._secret = secret
        self._info_dir = info_dir
        self._timeout = timeout

    @property
    def wrapped(self) -> Any:
        return self._api

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._api, name)
        if not callable(method) or name.startswith("_"):
            return method

        def with_timeout(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("_request_timeout", self._timeout)
            return method(*args, **kwargs)

        return with_timeout

    def create_namespaced_pod(self, namespace: str, body: Any, **kwargs: Any) -> Any:
        mount_info_secret(body, self._secret, self._info_dir)
        kwargs.setdefault("_request_timeout", self._timeout)
        return self._api.create_namespaced_pod(namespace=namespace, body=body, **kwargs)


def mount_info_secret(pod: Any, secret: str, info_dir: str) -> None:
    """Add the info-file Secret volume, mounted read-only at ``info_dir`` in
    every container, to ``pod`` (a ``kubernetes.client.V1Pod``).  Also drops
    the ``None`` image pull secret Parsl puts when it has none."""
    from kubernetes import client

    spec = pod.spec
    volume = client.V1Volume(
        name=INFO_VOLUME,
        secret=client.V1SecretVolumeSource(secret_name=secret, default_mode=0o400),
    )
    spec.volumes = [v for v in (spec.volumes or []) if v.name != INFO_VOLUME] + [volume]
    for container in spec.containers:
        mount = client.V1VolumeMount(name=INFO_VOLUME, mount_path=info_dir, read_only=True)
        container.volume_mounts = [
            m for m in (container.volume_mounts or []) if m.name != INFO_VOLUME
        ] + [mount]
    if spec.image_pull_secrets is not None:
        spec.image_pull_secrets = [s for s in spec.image_pull_secrets if s is not None] or None


def _backoff_or_default(backoff: Optional[ApiBackoff]) -> ApiBackoff:
    return backoff if backoff is not None else ApiBackoff(5.0)


@attr.s(auto_attribs=True, eq=False, repr=False)
class ParslKubernetesProvider(Service):
    """Parsl's ``KubernetesProvider`` ``provider``, as the endpoint runs it (see
    the module's docstring).  ``working_dir`` identifies the endpoint (its
    Secret's name); ``info_dir``, ``log_dir`` and ``python`` are the pod's
    paths and interpreter (:func:`~funcx_endpoint.executor.providers.kube_spec.pod_command`)."""

    log = Logger()
    name = "parsl-kubernetes-provider"
    nodes_per_block = 1  # Parsl's provider makes one pod per block, whatever it says

    provider: Any
    _reactor: Any
    working_dir: str
    info_dir: str = attr.ib(default=DEFAULT_INFO_DIR, kw_only=True)
    log_dir: str = attr.ib(default=DEFAULT_LOG_DIR, kw_only=True)
    python: str = attr.ib(default=DEFAULT_PYTHON, kw_only=True)
    request_timeout: Tuple[float, float] = attr.ib(default=REQUEST_TIMEOUT, kw_only=True)
    backoff: ApiBackoff = attr.ib(default=None, kw_only=True, converter=_backoff_or_default)
    hostname: Optional[str] = attr.ib(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        self.info_secret = endpoint_info_secret(
            self.provider.namespace, self.working_dir, self.hostname, self.request_timeout
        )
        self._api: Any = self.provider.kube_client
        self.provider.kube_client = _InfoMountingApi(
            self._api, self.info_secret.name, self.info_dir, self.request_timeout
        )
        self._gone: Dict[Any, JobStatus] = {}

    def __repr__(self) -> str:
        return f"<ParslKubernetesProvider {self.provider!r}>"

    # Parsl's provider's attributes, for the strategy.
    label = property(lambda self: str(self.provider.label))
    init_blocks = property(lambda self: self.provider.init_blocks)
    min_blocks = property(lambda self: self.provider.min_blocks)
    max_blocks = property(lambda self: self.provider.max_blocks)
    parallelism = property(lambda self: self.provider.parallelism)
    status_polling_interval = property(lambda self: self.provider.status_polling_interval)
    resources = property(lambda self: self.provider.resources)
    cores_per_node = None

    def _api_error(self, e: Exception, action: str) -> KubernetesApiError:
        error = describe_api_error(e, action, api_host(self._api))
        self.backoff.failed(error)
        return error

    def submit(self, command: str, tasks_per_node: int, job_name: str = "funcx.block") -> Any:
        """Parsl's ``submit`` of the manager command as it runs in a pod."""
        ns = self.provider.namespace
        self.backoff.check(f"create a pod in namespace {ns!r}")
        info = read_info_file(info_file_of(command))
        try:
            self.info_secret.sync(self._api, info)
        except KubernetesApiError as e:
            self.backoff.failed(e)
            raise
        # exec: the manager replaces Parsl's bash, so it is the container's
        # first process and gets the TERM that deleting the pod sends.
        in_pod = "exec " + pod_command(
            command, self.info_dir, python=self.python, log_dir=self.log_dir
        )
        try:
            job_id = self.provider.submit(
                in_pod, tasks_per_node, job_name=dns_label(job_name, _JOB_NAME_LENGTH)
            )
        except Exception as e:
            if not is_api_error(e):
                raise
            raise self._api_error(e, f"create a pod in namespace {ns!r}") from e
        self.backoff.succeeded()
        return job_id

    def status(self, job_ids: Sequence[Any]) -> List[Any]:
        """Parsl's ``status`` (it reads each pod; it logs the errors itself)."""
        mine = [j for j in job_ids if j not in self._gone]
        statuses = iter(self.provider.status(mine) if mine else [])
        return [self._gone[j] if j in self._gone else next(statuses) for j in job_ids]

    def cancel(self, job_ids: Sequence[Any]) -> List[bool]:
        """Parsl's ``cancel``, a pod at a time; a pod gone already is not an error."""
        result = []
        for job_id in job_ids:
            if job_id in self._gone:
                result.append(False)
                continue
            try:
                result.extend(self.provider.cancel([job_id]))
            except Exception as e:
                if not_found(e):
                    self._gone[job_id] = JobStatus(JobState.CANCELLED, "pod was gone already")
                    result.append(False)
                    continue
                if not is_api_error(e):
                    raise
                raise self._api_error(e, f"delete pod {job_id!r}") from e
        return result

    def stopService(self) -> Deferred[None]:
        """Delete the info-file Secret (in a thread); errors are logged."""
        super().stopService()
        return delete_info_secret(self._reactor, self.info_secret, self._api, self.log)
