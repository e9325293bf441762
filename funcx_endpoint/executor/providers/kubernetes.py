"""Blocks as Kubernetes pods: funcX 1.0's ``KubernetesProvider``, and Parsl's.

:class:`KubernetesPodProvider` runs each block as one pod of the configured
image, whose container runs ``worker_init`` and then one manager (which starts
its workers in the pod).  It is what funcX 1.0's ``KubernetesProvider`` config
class (:class:`funcx_endpoint.config.kubernetes.KubernetesProvider`) becomes.
Parsl's ``parsl.providers.KubernetesProvider`` runs unchanged behind
:class:`~funcx_endpoint.executor.providers.parsl_kube.ParslKubernetesProvider`.
:func:`kubernetes_provider` picks between them.

Both use the official ``kubernetes`` client, which blocks: they are called
in a thread by the :class:`~funcx_endpoint.executor.providers.base.ProviderAdapter`,
one call at a time (the reason for the official client over an asynchronous
HTTP client: it reads every kind of kubeconfig — tokens, client
certificates, exec and auth-provider plugins, in-cluster service accounts —
and Parsl's provider needs it anyway).

The pod's manager reads the manager info file from a Secret mounted in the
pod (see :mod:`~funcx_endpoint.executor.providers.kube_spec`).

Job ids are pod names.  States follow the pod's phase
(:func:`~funcx_endpoint.executor.providers.kube_spec.pod_status`), read with
one list call per status poll; cancelling deletes the pod.  A pod that ended
by itself is deleted once its end has been reported, its log (for a failed
one) kept in ``<working_dir>/kubernetes/<pod>.log`` for the endpoint's error
message.  Pods left by an earlier run of the same endpoint are deleted
before the first pod of this run is created.
"""

from __future__ import annotations

import os
import secrets
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from funcx_endpoint.executor.providers.base import (
    JobState,
    JobStatus,
    ProviderAdapter,
    SubmitError,
)
from funcx_endpoint.executor.providers.kube_api import (
    REQUEST_TIMEOUT,
    ApiBackoff,
    InfoSecret,
    KubernetesApiError,
    api_host,
    describe_api_error,
    is_api_error,
    load_core_api,
    not_found,
    read_info_file,
)
from funcx_endpoint.executor.providers.kube_spec import (
    BLOCK,
    NAME,
    PodSettings,
    block_of,
    endpoint_key,
    endpoint_labels,
    info_file_of,
    label_value,
    pod_command,
    pod_manifest,
    pod_name,
    pod_status,
    secret_name,
    selector,
)

#: Final statuses of pods no longer followed that ``status`` still answers.
FINISHED_KEPT = 100
#: How much of a failed pod's log is kept.
LOG_TAIL_LINES = 100


@attr.s(auto_attribs=True)
class _Pod:
    name: str
    job_name: str
    cancelled: bool = False
    last: JobStatus = attr.Factory(lambda: JobStatus(JobState.PENDING))


@attr.s(auto_attribs=True, eq=False, repr=False)
class KubernetesPodProvider(Service):
    """Runs each block as one manager pod (``nodes_per_block`` is always 1).

    ``settings`` say what the pods are made of; ``working_dir`` receives the
    logs of failed pods.  ``incluster``, ``kubeconfig`` and ``context`` say
    how to reach the API (:func:`~funcx_endpoint.executor.providers.kube_api.load_core_api`),
    unless ``api`` (a ``CoreV1Api``, or a fake with its methods) is given.
    ``reactor`` runs the stop's API call in its thread pool and receives the
    log messages of calls made in threads.  The scaling attributes are only
    read by the strategy.

    Every provider method blocks: call them through a
    :class:`~funcx_endpoint.executor.providers.base.ProviderAdapter`.
    """

    log = Logger()
    name = "kubernetes-provider"
    nodes_per_block = 1

    settings: PodSettings
    _reactor: Any
    working_dir: str
    label: str = attr.ib(default="kubernetes", kw_only=True)
    init_blocks: int = attr.ib(default=0, kw_only=True)
    min_blocks: int = attr.ib(default=0, kw_only=True)
    max_blocks: int = attr.ib(default=10, kw_only=True)
    parallelism: float = attr.ib(default=1.0, kw_only=True)
    status_polling_interval: float = attr.ib(default=5.0, kw_only=True)
    incluster: bool = attr.ib(default=True, kw_only=True)
    kubeconfig: Optional[str] = attr.ib(default=None, kw_only=True)
    context: Optional[str] = attr.ib(default=None, kw_only=True)
    _api: Any = attr.ib(default=None, kw_only=True)
    request_timeout: Tuple[float, float] = attr.ib(default=REQUEST_TIMEOUT, kw_only=True)
    _given_backoff: Optional[ApiBackoff] = attr.ib(default=None, kw_only=True, alias="backoff")
    hostname: Optional[str] = attr.ib(default=None, kw_only=True)
    _unique: Callable[[], str] = attr.ib(default=lambda: secrets.token_hex(4), kw_only=True)

    def __attrs_post_init__(self) -> None:
        self.backoff = (
            self._given_backoff
            if self._given_backoff is not None
            else ApiBackoff(self.status_polling_interval)
        )
        # What a pod may use, for the strategy's estimate of workers per block.
        self.cores_per_node: Optional[int] = max(1, int(self.settings.max_cpu))
        self.info_secret = endpoint_info_secret(
            self.settings.namespace, self.working_dir, self.hostname, self.request_timeout
        )
        self.labels = dict(self.info_secret.labels)
        self._pods: Dict[str, _Pod] = {}
        self._finished: OrderedDict[str, JobStatus] = OrderedDict()
        self._leftovers_checked = False

    def __repr__(self) -> str:
        return (
            f"<KubernetesPodProvider {self.settings.image!r} in namespace "
            f"{self.settings.namespace!r}>"
        )

    @property
    def resources(self) -> Dict[str, Any]:
        """The pods followed now, by job id (pod name)."""
        return dict(self._pods)

    # -- calls in a thread ---------------------------------------------------------------

    def _note(self, level: str, fmt: str, **fields: Any) -> None:
        """Log from the provider's thread through the reactor thread."""
        emit = getattr(self.log, level)
        call = getattr(self._reactor, "callFromThread", None)
        if call is not None:
            call(emit, fmt, **fields)
        else:
            emit(fmt, **fields)

    def _client(self) -> Any:
        if self._api is None:
            self._api = load_core_api(self.incluster, self.kubeconfig, self.context)
        return self._api

    def _call(self, action: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``api.<method>``; its errors as :class:`KubernetesApiError`, counted
        by the backoff.  A 404 is raised as the client's exception, unchanged."""
        self.backoff.check(action)
        api = self._client()
        try:
            result = getattr(api, method)(*args, _request_timeout=self.request_timeout, **kwargs)
        except Exception as e:
            if not is_api_error(e):
                raise
            if not_found(e):
                self.backoff.succeeded()
                raise
            error = describe_api_error(e, action, api_host(api))
            self.backoff.failed(error)
            raise error from e
        self.backoff.succeeded()
        return result

    def submit(self, command: str, tasks_per_node: int, job_name: str = "funcx.block") -> str:
        """Create the block's pod: one manager (its workers inside), started by ``command``."""
        ns = self.settings.namespace
        self.backoff.check(f"create a pod in namespace {ns!r}")
        info = read_info_file(info_file_of(command))
        self._delete_leftovers()
        try:
            if self.info_secret.sync(self._client(), info):
                self._note(
                    "info",
                    "Kubernetes: the manager info file is in secret {name} (namespace {ns})",
                    name=self.info_secret.name,
                    ns=ns,
                )
        except KubernetesApiError as e:
            self.backoff.failed(e)
            raise
        self.backoff.succeeded()
        in_pod = pod_command(
            command,
            self.settings.info_dir,
            python=self.settings.python,
            log_dir=self.settings.log_dir,
        )
        labels = dict(self.labels)
        labels[NAME] = "funcx-manager"
        labels["app"] = label_value(job_name)
        block = block_of(job_name)
        if block is not None:
            labels[BLOCK] = label_value(block)
        for attempt in (1, 2):
            name = pod_name(self.settings, job_name, self._unique())
            body = pod_manifest(self.settings, name, in_pod, labels, self.info_secret.name)
            try:
                self._call(
                    f"create pod {name!r} in namespace {ns!r}", "create_namespaced_pod", ns, body
                )
            except KubernetesApiError as e:
                if e.status == 409 and attempt == 1:  # the name is taken: draw another
                    continue
                raise
            except Exception as e:
                if not_found(e):  # the namespace
                    raise describe_api_error(e, f"create pod {name!r} in namespace {ns!r}") from e
                raise
            break
        self._pods[name] = _Pod(name, job_name)
        self._note(
            "info",
            "Kubernetes: created pod {name} (image {image}, namespace {ns}) for {job_name}",
            name=name,
            image=self.settings.image,
            ns=ns,
            job_name=job_name,
        )
        return name

    def _delete_leftovers(self) -> None:
        """Delete the pods an earlier run of this endpoint left (once per run)."""
        if self._leftovers_checked:
            return
        listing = self._list_pods()
        left = [p.metadata.name for p in listing.items if p.metadata.name not in self._pods]
        if left:
            self._note(
                "warn",
                "Kubernetes: deleting {n} pod(s) an earlier run of this endpoint left: {names}",
                n=len(left),
                names=", ".join(left),
            )
        for name in left:
            self._delete_pod(name)
        self._leftovers_checked = True

    def _list_pods(self) -> Any:
        """This endpoint's pods (a ``V1PodList``); an unknown namespace is a
        :class:`KubernetesApiError` as any other error of the call."""
        ns = self.settings.namespace
        action = f"list pods in namespace {ns!r}"
        try:
            return self._call(
                action, "list_namespaced_pod", ns, label_selector=selector(self.labels)
            )
        except Exception as e:
            if not_found(e):
                raise describe_api_error(e, action) from e
            raise

    def _delete_pod(self, name: str) -> bool:
        """Delete a pod; False if it was gone already."""
        ns = self.settings.namespace
        try:
            self._call(
                f"delete pod {name!r} in namespace {ns!r}", "delete_namespaced_pod", name, ns
            )
        except Exception as e:
            if not_found(e):
                return False
            raise
        return True

    def status(self, job_ids: Sequence[Any]) -> List[JobStatus]:
        """The pods' states, from one list call; the last known ones while the
        API is held back (:class:`ApiBackoff`)."""
        followed = [j for j in job_ids if j in self._pods]
        found: Optional[Dict[str, Any]] = None
        if followed and not self.backoff.waiting:
            try:
                listing = self._list_pods()
            except KubernetesApiError as e:
                if not e.unavailable:
                    raise
                self._note("warn", "Kubernetes: pod states unknown for now: {error}", error=str(e))
            else:
                found = {p.metadata.name: p for p in listing.items}
        result = []
        for job_id in job_ids:
            pod = self._pods.get(job_id)
            if pod is None:
                result.append(
                    self._finished.get(job_id)
                    or JobStatus(JobState.MISSING, f"no pod {job_id!r} here")
                )
            elif found is None:
                result.append(pod.last)
            else:
                result.append(self._follow(pod, found.get(job_id)))
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)
        return result

    def _follow(self, pod: _Pod, seen: Any) -> JobStatus:
        if pod.cancelled:
            status = JobStatus(JobState.CANCELLED, "pod deleted by the endpoint")
            if seen is None:
                self._forget(pod, status)
            return status
        if seen is None:
            status = JobStatus(
                JobState.MISSING,
                f"pod {pod.name} is gone (deleted outside the endpoint, or evicted)",
            )
            self._forget(pod, status)
            return status
        status = pod_status(seen)
        if status.state == JobState.FAILED:
            status = attr.evolve(status, stderr_path=self._keep_log(pod.name))
        pod.last = status
        if status.terminal:
            if status.state == JobState.FAILED:
                self._note(
                    "warn",
                    "Kubernetes: pod {name} failed: {status}",
                    name=pod.name,
                    status=str(status),
                )
            try:
                self._delete_pod(pod.name)
            except Exception as e:
                self._note(
                    "warn",
                    "Kubernetes: could not delete the ended pod {name}: {error}",
                    name=pod.name,
                    error=str(e),
                )
            self._forget(pod, status)
        return status

    def _forget(self, pod: _Pod, status: JobStatus) -> None:
        self._pods.pop(pod.name, None)
        self._finished[pod.name] = status

    def _keep_log(self, name: str) -> Optional[str]:
        """Save the tail of a pod's log; its path, or None if there is none."""
        ns = self.settings.namespace
        try:
            text = self._call(
                f"read the log of pod {name!r}",
                "read_namespaced_pod_log",
                name,
                ns,
                tail_lines=LOG_TAIL_LINES,
            )
        except Exception as e:
            if not is_api_error(e) and not isinstance(e, KubernetesApiError):
                raise
            return None
        path = os.path.join(self.working_dir, "kubernetes", f"{name}.log")
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text if isinstance(text, str) else str(text))
        except OSError:
            return None
        return path

    def cancel(self, job_ids: Sequence[Any]) -> List[bool]:
        """Delete the pods: True for each pod deleted, False for one unknown or gone."""
        result = []
        errors: List[Exception] = []
        for job_id in job_ids:
            pod = self._pods.get(job_id)
            if pod is None or pod.cancelled:
                result.append(False)
                continue
            try:
                deleted = self._delete_pod(pod.name)
            except KubernetesApiError as e:
                errors.append(e)
                result.append(False)
                continue
            pod.cancelled = True
            result.append(deleted)
        if errors:
            raise errors[0]
        return result

    # -- lifecycle (on the reactor thread) -----------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Delete the info-file Secret (in a thread); errors are logged."""
        super().stopService()
        if self._api is None:
            return succeed(None)
        return delete_info_secret(self._reactor, self.info_secret, self._api, self.log)


def endpoint_info_secret(
    namespace: str,
    working_dir: str,
    hostname: Optional[str],
    request_timeout: Tuple[float, float] = REQUEST_TIMEOUT,
) -> InfoSecret:
    """The info-file Secret of the endpoint in ``working_dir`` on ``hostname``
    (None: this host): named and labelled after its :func:`endpoint_key`."""
    key = endpoint_key(os.path.abspath(working_dir), hostname)
    return InfoSecret(namespace, secret_name(key), endpoint_labels(key), request_timeout)


def delete_info_secret(
    reactor: Any, info_secret: InfoSecret, api: Any, log: Logger
) -> Deferred[None]:
    """Delete ``info_secret`` if this run created it, in a thread of ``reactor``'s
    pool; a failure is logged on ``log``, and the Deferred fires with None anyway."""
    if not info_secret.created:
        return succeed(None)
    pool = reactor.getThreadPool()
    d = deferToThreadPool(reactor, pool, info_secret.delete, api)
    d.addErrback(
        lambda f: log.warn(
            "Kubernetes: could not delete secret {name}: {error}",
            name=info_secret.name,
            error=f.getErrorMessage(),
        )
    )
    return d


#: The config's fields that :class:`KubernetesPodProvider` takes as they are,
#: for the strategy.
_SCALING_FIELDS = (
    "label",
    "init_blocks",
    "min_blocks",
    "max_blocks",
    "parallelism",
    "status_polling_interval",
)


def pod_provider_from_config(
    config_provider: Any, reactor: Any, working_dir: str, stop_grace_period: float = 10.0
) -> KubernetesPodProvider:
    """The :class:`KubernetesPodProvider` for funcX 1.0's ``KubernetesProvider`` config."""
    settings = PodSettings.from_config(config_provider, stop_grace_period=stop_grace_period)
    return KubernetesPodProvider(
        settings,
        reactor,
        os.path.join(working_dir, "blocks"),
        incluster=bool(config_provider.incluster_config),
        **{name: getattr(config_provider, name) for name in _SCALING_FIELDS},
    )


def is_parsl_kubernetes(provider: Any) -> bool:
    """Whether ``provider`` is Parsl's ``KubernetesProvider`` (without importing Parsl)."""
    import sys

    module = sys.modules.get("parsl.providers.kubernetes.kube")
    kind = getattr(module, "KubernetesProvider", None)
    return isinstance(kind, type) and isinstance(provider, kind)


def kubernetes_provider(
    config_provider: Any, reactor: Any, working_dir: str, stop_grace_period: float = 10.0
) -> Optional[ProviderAdapter]:
    """The adapter for a Kubernetes provider config, or None if it is not one.

    funcX 1.0's ``KubernetesProvider`` becomes a :class:`KubernetesPodProvider`;
    Parsl's ``KubernetesProvider`` is wrapped in a
    :class:`~funcx_endpoint.executor.providers.parsl_kube.ParslKubernetesProvider`.
    Without the ``kubernetes`` package, the endpoint refuses to start, saying so.
    """
    from funcx_endpoint.config import kubernetes as config_kubernetes

    if isinstance(config_provider, config_kubernetes.KubernetesProvider):
        import importlib.util

        if importlib.util.find_spec("kubernetes") is None:
            from funcx_endpoint.executor.providers.unavailable import UnavailableProvider

            return ProviderAdapter(
                UnavailableProvider(config_provider.label, config_kubernetes.NO_CLIENT), reactor
            )
        native = pod_provider_from_config(config_provider, reactor, working_dir, stop_grace_period)
        return ProviderAdapter(native, reactor, working_dir=working_dir)
    if is_parsl_kubernetes(config_provider):
        from funcx_endpoint.executor.providers.parsl_kube import ParslKubernetesProvider

        wrapped = ParslKubernetesProvider(config_provider, reactor, working_dir)
        return ProviderAdapter(wrapped, reactor, working_dir=working_dir)
    return None


__all__ = [
    "KubernetesPodProvider",
    "SubmitError",
    "delete_info_secret",
    "endpoint_info_secret",
    "is_parsl_kubernetes",
    "kubernetes_provider",
    "pod_provider_from_config",
]
