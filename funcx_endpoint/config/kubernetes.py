"""funcX 1.0's Kubernetes pieces of ``config.py``: its provider and its strategy.

funcX 1.0.13 shipped its own ``KubernetesProvider`` (pods per container type)
and ``KubeSimpleStrategy``.  A ``config.py`` using them loads here unchanged:
the provider's fields are those of funcX 1.0.13 and are checked as it checked
them.  The endpoint runs each block as one manager pod of ``image``
(:class:`funcx_endpoint.executor.providers.kubernetes.KubernetesPodProvider`),
through the ``kubernetes`` client (the ``[kubernetes]`` extra); without that
package, an endpoint using this provider refuses to start (:data:`NO_CLIENT`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from funcx_endpoint.config.fields import (
    ConfigError,
    ConfigObject,
    Field,
    Unused,
    boolean,
    number,
    optional,
    string,
)
from funcx_endpoint.config.model import SimpleStrategy

#: Why an endpoint with this provider does not start without the client package.
NO_CLIENT = (
    "funcX 1.0's KubernetesProvider needs the kubernetes Python client, which is not "
    "installed: pip install 'funcx-endpoint[kubernetes]'"
)


def _volumes(value: Any) -> List[Tuple[str, str]]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, str) for x in v)
        for v in value
    ):
        raise TypeError(f"expected a list of (claim name, mount path) pairs, got {value!r}")
    return [(v[0], v[1]) for v in value]


class KubernetesProvider(ConfigObject):
    """funcX 1.0.13's Kubernetes provider (``funcx_endpoint.providers.kubernetes.kube``):
    its fields, checked.  Each block is one pod running one manager (so
    ``nodes_per_block`` is 1 whatever it says, as in funcX 1.0)."""

    fields = {
        "image": Field(None, string(), "Container image of the worker pods (required)."),
        "namespace": Field("default", string(), "Namespace of the pods."),
        "nodes_per_block": Field(
            1,
            number(1, integer=True),
            "Pods per block: always 1 (as in funcX 1.0).",
            unused=Unused("every block is one pod (as in funcX 1.0)", quiet=(1,)),
        ),
        "init_blocks": Field(0, number(0, integer=True), "Blocks at start (funcX 1.0: 0)."),
        "min_blocks": Field(0, number(0, integer=True), "Fewest blocks kept."),
        "max_blocks": Field(10, number(0, integer=True), "Most blocks at once."),
        "max_cpu": Field(2, number(0), "CPU limit of a pod."),
        "max_mem": Field("500Mi", string(), "Memory limit of a pod."),
        "init_cpu": Field(1, number(0), "CPU request of a pod."),
        "init_mem": Field("250Mi", string(), "Memory request of a pod."),
        "parallelism": Field(1, number(0), "Ratio of slots to outstanding tasks."),
        "worker_init": Field("", string(), "Commands run first in a pod."),
        "pod_name": Field(None, optional(string()), "Name of the pods (a time is appended)."),
        "user_id": Field(None, optional(string()), "Unix user id to run the pods as."),
        "group_id": Field(None, optional(string()), "Unix group id to run the pods as."),
        "run_as_non_root": Field(False, boolean, "Run the pods as non-root."),
        "secret": Field(None, optional(string()), "Secret for pulling the image."),
        "incluster_config": Field(
            True, optional(boolean), "Use the in-cluster config (False: ~/.kube/config)."
        ),
        "persistent_volumes": Field(
            None, optional(_volumes), "(claim name, mount path) pairs.", default_factory=list
        ),
    }

    label = "kubernetes"
    status_polling_interval = 5.0
    image: str
    namespace: str
    nodes_per_block: int
    init_blocks: int
    min_blocks: int
    max_blocks: int
    parallelism: float
    worker_init: str
    pod_name: Optional[str]
    persistent_volumes: Optional[List[Tuple[str, str]]]

    def validate(self) -> None:
        if self.image is None:
            raise ConfigError("KubernetesProvider: image is required (the worker pods' image)")
        if self.init_blocks != 0:
            # funcX 1.0.13 asserted this: it cannot know which container to start.
            raise ConfigError(
                f"KubernetesProvider.init_blocks: must be 0 (as in funcX 1.0), "
                f"got {self.init_blocks}"
            )

    # Recognisably a provider (the config's check); the endpoint calls the
    # provider it becomes (KubernetesPodProvider), never these.
    def _run_elsewhere(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("the endpoint runs this through KubernetesPodProvider")

    submit = status = cancel = _run_elsewhere


class KubeSimpleStrategy(SimpleStrategy):
    """funcX 1.0.13's strategy for its Kubernetes provider: the same fields as
    :class:`SimpleStrategy`, and it scales as that one here."""

    unused_class = (
        "scales as SimpleStrategy here (funcX 1.0 scaled Kubernetes pods per "
        "container type; here every pod runs the configured image)"
    )
