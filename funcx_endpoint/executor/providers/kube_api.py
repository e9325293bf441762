"""Talking to the Kubernetes API: the client, its errors, a backoff, the info-file Secret.

The endpoint uses the official ``kubernetes`` client (the ``[kubernetes]``
extra), imported only when a Kubernetes provider is used.  The client
blocks, so everything here runs in a thread: the providers that use it are
called through a :class:`~funcx_endpoint.executor.providers.base.ProviderAdapter`,
one call at a time, never on the reactor thread.

Errors of the API become :class:`KubernetesApiError`, whose message says what
was tried, what the API answered and what to check.  Errors that say the API
is unavailable (it cannot be reached, a 5xx, 429) open an
:class:`ApiBackoff`: for a growing delay, calls fail at once without
touching the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from funcx_endpoint.executor.providers.base import ExecutionProviderError, SubmitError
from funcx_endpoint.executor.providers.kube_spec import secret_manifest

#: (connect, read) seconds for one API request; the client's default is none.
#: (The client's connection pool tries a request up to 4 times.)
REQUEST_TIMEOUT: Tuple[float, float] = (10.0, 30.0)

_HINTS = {
    401: "check the credentials (token, client certificate) of the kubeconfig's user",
    403: (
        "the endpoint's Kubernetes user or service account needs the RBAC verbs "
        "create, get, list and delete on pods, pods/log and secrets in this namespace"
    ),
}


class KubernetesApiError(SubmitError):
    """A Kubernetes API call failed.  ``status`` is the HTTP status (None if
    there was no answer); ``unavailable`` says the API could not serve it
    (unreachable, 5xx, 429) and a retry later may work."""

    def __init__(self, message: str, status: Optional[int] = None, unavailable: bool = False):
        super().__init__(message)
        self.status = status
        self.unavailable = unavailable


def _api_message(body: Any) -> Optional[str]:
    """The ``message`` of a Kubernetes ``Status`` body (JSON), if it has one."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body) if isinstance(body, str) else None
    except ValueError:
        return body.strip()[:500] if isinstance(body, str) and body.strip() else None
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return None


def describe_api_error(error: BaseException, action: str, where: str = "") -> KubernetesApiError:
    """``error`` (the client's ``ApiException``, or a connection error) as a
    :class:`KubernetesApiError` saying ``action`` failed, why, and what to check."""
    status = getattr(error, "status", None)
    if isinstance(status, int) and status > 0 and hasattr(error, "reason"):
        text = f"{status} {error.reason}"
        detail = _api_message(getattr(error, "body", None))
        message = f"Kubernetes API: could not {action}: {text}"
        if detail:
            message += f": {detail}"
        hint = _HINTS.get(status)
        if hint:
            message += f" ({hint})"
        return KubernetesApiError(message, status, unavailable=status >= 500 or status == 429)
    reason = getattr(error, "reason", None) or error  # urllib3's MaxRetryError wraps the cause
    where = f" at {where}" if where else ""
    return KubernetesApiError(
        f"Kubernetes API: could not {action}: cannot reach the API server{where}: "
        f"{type(reason).__name__}: {reason}",
        None,
        unavailable=True,
    )


def is_api_error(error: BaseException) -> bool:
    """Whether ``error`` comes from the API or the connection to it (not a bug here)."""
    # The client's ApiException and its subclasses (NotFoundException...), by
    # name: the client is an optional package.
    if isinstance(error, OSError) or any(
        kind.__name__ == "ApiException" for kind in type(error).__mro__
    ):
        return True
    try:
        import urllib3.exceptions
    except ImportError:  # pragma: no cover - the client depends on urllib3
        return False
    return isinstance(error, urllib3.exceptions.HTTPError)


class ApiBackoff:
    """Stops calls to an unavailable API for a while: ``initial`` seconds after
    the first failure, doubling up to ``maximum`` while failures go on.

    ``monotonic`` is the clock (called in the provider's thread).
    """

    def __init__(
        self,
        initial: float = 5.0,
        maximum: float = 300.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._monotonic = monotonic
        self.failures = 0
        self.until: Optional[float] = None
        self.last_error: Optional[KubernetesApiError] = None

    @property
    def waiting(self) -> bool:
        """True while calls are held back."""
        return self.until is not None and self._monotonic() < self.until

    def check(self, action: str) -> None:
        """Raise a :class:`KubernetesApiError` (unavailable) while calls are held back."""
        if self.until is None:
            return
        left = self.until - self._monotonic()
        if left > 0:
            raise KubernetesApiError(
                f"Kubernetes API: not trying to {action} for {left:.0f}s more: "
                f"{self.failures} call(s) failed in a row, the last with: {self.last_error}",
                self.last_error.status if self.last_error else None,
                unavailable=True,
            )

    def failed(self, error: KubernetesApiError) -> None:
        """Count ``error``: if it says the API is unavailable, hold calls back."""
        if not error.unavailable:
            return
        self.failures += 1
        self.last_error = error
        delay = min(self.maximum, self.initial * 2 ** (self.failures - 1))
        self.until = self._monotonic() + delay

    def succeeded(self) -> None:
        """The API answered: calls go through again at once."""
        self.failures = 0
        self.until = None
        self.last_error = None


def load_core_api(
    incluster: bool,
    kubeconfig: Optional[str] = None,
    context: Optional[str] = None,
) -> Any:
    """A ``kubernetes.client.CoreV1Api`` with a configuration of its own (the
    client's global default is left alone, for Parsl's provider).

    ``incluster``: the pod's service account; else the kubeconfig file
    ``kubeconfig``, ``$KUBECONFIG`` (read now), or ``~/.kube/config``.
    Blocks (reads files; an exec credential plugin runs a program).
    """
    try:
        from kubernetes import client, config
    except ImportError:
        raise KubernetesApiError(
            "the kubernetes package is not installed: pip install 'funcx-endpoint[kubernetes]'"
        ) from None
    configuration = client.Configuration()
    if incluster:
        where = "the in-cluster service account (incluster_config=True)"
    else:
        path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        where = f"the kubeconfig {path} (incluster_config=False)"
    try:
        if incluster:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(
                config_file=os.path.expanduser(path),
                context=context,
                client_configuration=configuration,
            )
    except Exception as e:  # ConfigException, OSError, YAML and key errors
        raise KubernetesApiError(
            f"cannot load the Kubernetes configuration from {where}: {type(e).__name__}: {e}"
        ) from e
    return client.CoreV1Api(client.ApiClient(configuration))


def api_host(api: Any) -> str:
    """The API server's URL a ``CoreV1Api`` talks to (for messages)."""
    return str(
        getattr(getattr(getattr(api, "api_client", None), "configuration", None), "host", "")
    )


class InfoSecret:
    """The Secret that holds the manager info file, one per endpoint.

    :meth:`sync` creates it, or replaces it when the info file changed (a new
    run of the endpoint has a new secret and maybe a new port); :meth:`delete`
    removes it.  Every method blocks.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str],
        request_timeout: Tuple[float, float] = REQUEST_TIMEOUT,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.labels: Dict[str, str] = dict(labels)
        self.request_timeout = request_timeout
        self._digest: Optional[str] = None

    @property
    def created(self) -> bool:
        """Whether this run has put the Secret in place."""
        return self._digest is not None

    def sync(self, api: Any, info: bytes) -> bool:
        """Put ``info`` in the Secret unless it is there already; True if it was written."""
        digest = hashlib.sha256(info).hexdigest()
        if digest == self._digest:
            return False
        body = secret_manifest(self.name, self.namespace, self.labels, info)
        where = f"secret {self.name!r} in namespace {self.namespace!r}"
        try:
            api.create_namespaced_secret(
                self.namespace, body, _request_timeout=self.request_timeout
            )
        except Exception as e:
            if not is_api_error(e):
                raise
            if getattr(e, "status", None) != 409:
                raise describe_api_error(e, f"create the {where}", api_host(api)) from e
            try:  # there from an earlier run: replace it
                api.replace_namespaced_secret(
                    self.name, self.namespace, body, _request_timeout=self.request_timeout
                )
            except Exception as e2:
                if not is_api_error(e2):
                    raise
                raise describe_api_error(e2, f"replace the {where}", api_host(api)) from e2
        self._digest = digest
        return True

    def delete(self, api: Any) -> None:
        """Delete the Secret (gone already is fine)."""
        try:
            api.delete_namespaced_secret(
                self.name, self.namespace, _request_timeout=self.request_timeout
            )
        except Exception as e:
            if not is_api_error(e):
                raise
            if getattr(e, "status", None) != 404:
                raise describe_api_error(
                    e, f"delete the secret {self.name!r} in namespace {self.namespace!r}"
                ) from e
        self._digest = None


def not_found(error: BaseException) -> bool:
    """True for the API's 404."""
    return is_api_error(error) and getattr(error, "status", None) == 404


def read_info_file(path: str) -> bytes:
    """The manager info file's bytes; a :class:`SubmitError` saying what is wrong otherwise."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SubmitError(f"cannot read the manager info file {path}: {e}") from e


__all__ = [
    "REQUEST_TIMEOUT",
    "ApiBackoff",
    "ExecutionProviderError",
    "InfoSecret",
    "KubernetesApiError",
    "api_host",
    "describe_api_error",
    "is_api_error",
    "load_core_api",
    "not_found",
    "read_info_file",
]
