"""A stub of the Kubernetes API: the part the endpoint's Kubernetes providers use.

No Kubernetes cluster runs in the tests.  :class:`KubeApiStub` is a
``twisted.web`` resource answering, as the real API server does (JSON
bodies, ``Status`` objects for errors, the same status codes), the
requests of the official ``kubernetes`` client for:

* pods in a namespace: create, list (with an equality ``labelSelector``),
  read, read status, read log, delete;
* secrets in a namespace: create, read, replace, delete.

It checks the bearer token (401 otherwise), that the namespace exists (404),
names (409 when taken) and what the real server validates of the fields the
providers send: object and container names, label keys and values, volumes
of the mounts (422).  Every pod body created is kept in :attr:`created`, in
order, as it was sent; every request in :attr:`requests`.

The test drives the pods: :meth:`set_phase`, :meth:`set_waiting`,
:meth:`set_log`; or a :class:`~funcx_endpoint.testing.kubelet.LocalKubelet`
runs them.  :meth:`fail` answers the next matching requests with an error;
:meth:`stall` holds them unanswered (a hung server).

:func:`serve` listens on loopback with TLS (a CA of its own) and
:func:`write_kubeconfig` writes the kubeconfig a client reaches it with.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = ["KubeApiStub", "StubServer", "serve", "write_kubeconfig"]

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "AlreadyExists",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}
_PHRASES = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    409: b"Conflict",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")


@attr.s(auto_attribs=True)
class _Fault:
    method: str
    path_part: str
    code: int
    times: int
    message: Optional[str]
    stall: bool = False

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and method == self.method and self.path_part in path


def _status(code: int, message: str, reason: str) -> Dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _check_labels(kind: str, name: str, labels: Any) -> None:
    if labels is None:
        return
    if not isinstance(labels, dict):
        raise ApiError(400, f"{kind} {name!r}: metadata.labels must be an object")
    for key, value in labels.items():
        prefix, _, short = key.rpartition("/")
        if (
            (prefix and not _SUBDOMAIN.match(prefix))
            or not _QUALIFIED.match(short)
            or (len(short) > 63)
        ):
            raise ApiError(
                422, f'{kind} "{name}" is invalid: metadata.labels: Invalid value: "{key}"'
            )
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ApiError(
                422, f'{kind} "{name}" is invalid: metadata.labels: Invalid value: "{value}"'
            )


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ApiError(422, f"{kind} is invalid: metadata.name: Required value")
    if len(name) > 253 or not _SUBDOMAIN.match(name):
        raise ApiError(
            422,
            f'{kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": a '
            "lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
            "characters, '-' or '.'",
        )
    return name


def _check_pod(pod: Dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    name = _check_name("Pod", meta.get("name"))
    _check_labels("Pod", name, meta.get("labels"))
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        raise ApiError(422, f'Pod "{name}" is invalid: spec.containers: Required value')
    volumes = {v.get("name") for v in (spec.get("volumes") or []) if isinstance(v, dict)}
    for i, container in enumerate(containers):
        cname = container.get("name")
        if not isinstance(cname, str) or len(cname) > 63 or not _LABEL.match(cname):
            raise ApiError(
                422,
                f'Pod "{name}" is invalid: spec.containers[{i}].name: Invalid value: '
                f'"{cname}": a lowercase RFC 1123 label must consist of lower case '
                "alphanumeric characters or '-'",
            )
        if not container.get("image"):
            raise ApiError(
                422, f'Pod "{name}" is invalid: spec.containers[{i}].image: Required value'
            )
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") not in volumes:
                raise ApiError(
                    422,
                    f'Pod "{name}" is invalid: spec.containers[{i}].volumeMounts.name: '
                    f'Not found: "{mount.get("name")}"',
                )
            if not str(mount.get("mountPath", "")).startswith("/"):
                raise ApiError(
                    422,
                    f'Pod "{name}" is invalid: spec.containers[{i}].volumeMounts.mountPath: '
                    "must be an absolute path",
                )
    return name


class KubeApiStub(Resource):
    """The Kubernetes API subset described in the module's docstring.

    ``token`` is the bearer token it accepts; ``namespaces`` those that exist.
    ``on_pod_created(pod)`` and ``on_pod_deleted(pod)`` are called for a
    kubelet; with ``graceful_delete`` a deleted pod stays (with a
    ``deletionTimestamp``) until :meth:`remove_pod`, as on a node.
    """

    isLeaf = True

    def __init__(self, token: str = "stub-token", namespaces: Tuple[str, ...] = ("default",)):
        super().__init__()
        self.token = token
        self.namespaces = set(namespaces)
        self.pods: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self.secrets: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self.logs: Dict[Tuple[str, str], str] = {}
        self.created: List[Dict[str, Any]] = []
        self.deleted: List[str] = []
        self.requests: List[Tuple[str, str]] = []
        self.stalled: List[Request] = []
        self.graceful_delete = False
        self.on_pod_created: Optional[Callable[[Dict[str, Any]], None]] = None
        self.on_pod_deleted: Optional[Callable[[Dict[str, Any]], None]] = None
        self._faults: List[_Fault] = []
        self._uids = itertools.count(1)
        self._version = itertools.count(1)

    # -- what the test drives ---------------------------------------------------------------

    def fail(
        self, method: str, path_part: str, code: int, times: int = 1, message: Optional[str] = None
    ) -> None:
        """Answer the next ``times`` ``method`` requests whose path contains
        ``path_part`` with ``code`` (a ``Status`` body)."""
        self._faults.append(_Fault(method, path_part, code, times, message))

    def stall(self, method: str, path_part: str, times: int = 1) -> None:
        """Hold the next ``times`` matching requests unanswered (see :meth:`release`)."""
        self._faults.append(_Fault(method, path_part, 0, times, None, stall=True))

    def release(self) -> None:
        """Close the connections of the stalled requests."""
        stalled, self.stalled = self.stalled, []
        for request in stalled:
            transport: Any = request.transport
            if request.channel is not None and transport is not None:
                transport.abortConnection()

    def pod(self, name: str, namespace: str = "default") -> Dict[str, Any]:
        """The stored pod (KeyError if there is none)."""
        return self.pods[(namespace, name)]

    def pod_names(self, namespace: str = "default") -> List[str]:
        return sorted(name for ns, name in self.pods if ns == namespace)

    def secret_data(self, name: str, namespace: str = "default") -> Dict[str, bytes]:
        """A stored secret's data, decoded."""
        data = self.secrets[(namespace, name)].get("data") or {}
        return {key: base64.b64decode(value) for key, value in data.items()}

    def set_phase(
        self,
        name: str,
        phase: str,
        namespace: str = "default",
        *,
        exit_code: Optional[int] = None,
        reason: Optional[str] = None,
        message: Optional[str] = None,
    ) -> None:
        """Put the pod in ``phase``; for Succeeded/Failed its container terminated
        with ``exit_code`` (0 / 1 by default)."""
        pod = self.pod(name, namespace)
        status = pod["status"]
        status["phase"] = phase
        status.pop("reason", None)
        status.pop("message", None)
        container = pod["spec"]["containers"][0]
        base = {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "ready": phase == "Running",
            "restartCount": 0,
        }
        if phase == "Running":
            base["state"] = {"running": {"startedAt": _now()}}
        elif phase in ("Succeeded", "Failed"):
            code = exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1)
            terminated: Dict[str, Any] = {
                "exitCode": code,
                "reason": reason or ("Completed" if code == 0 else "Error"),
                "finishedAt": _now(),
            }
            if message:
                terminated["message"] = message
            base["state"] = {"terminated": terminated}
        else:
            if reason:
                status["reason"] = reason
            if message:
                status["message"] = message
            base["state"] = {"waiting": {"reason": "ContainerCreating"}}
        status["containerStatuses"] = [base]
        pod["metadata"]["resourceVersion"] = str(next(self._version))

    def set_waiting(
        self, name: str, reason: str, message: str = "", namespace: str = "default"
    ) -> None:
        """The pod's container waits (Pending) for ``reason`` (``ImagePullBackOff``...)."""
        pod = self.pod(name, namespace)
        container = pod["spec"]["containers"][0]
        pod["status"]["phase"] = "Pending"
        pod["status"]["containerStatuses"] = [
            {
                "name": container["name"],
                "image": container["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ]

    def set_log(self, name: str, text: str, namespace: str = "default") -> None:
        """What ``kubectl logs`` of the pod says."""
        self.logs[(namespace, name)] = text

    def remove_pod(self, name: str, namespace: str = "default") -> None:
        """The pod is gone for good (its deletion finished)."""
        self.pods.pop((namespace, name), None)

    # -- HTTP ---------------------------------------------------------------------------------

    def render(self, request: Request) -> Any:
        method = request.method.decode("ascii")
        path = request.path.decode("utf-8")
        query = {k.decode(): [x.decode() for x in v] for k, v in (request.args or {}).items()}
        self.requests.append((method, request.uri.decode("utf-8")))
        for fault in self._faults:
            if fault.matches(method, path):
                fault.times -= 1
                if fault.stall:
                    self.stalled.append(request)
                    return NOT_DONE_YET
                return self._answer(
                    request,
                    fault.code,
                    _status(
                        fault.code,
                        fault.message or f"stub: injected {fault.code}",
                        _REASONS.get(fault.code, "Unknown"),
                    ),
                )
        if request.getHeader("authorization") != f"Bearer {self.token}":
            return self._answer(request, 401, _status(401, "Unauthorized", "Unauthorized"))
        try:
            raw = request.content.read() if request.content is not None else b""
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            return self._answer(request, 400, _status(400, "the body is not JSON", "BadRequest"))
        try:
            code, answer = self._route(method, path, query, body)
        except ApiError as e:
            return self._answer(request, e.code, _status(e.code, e.message, e.reason))
        if isinstance(answer, str):
            request.setResponseCode(code)
            request.setHeader("content-type", "text/plain")
            return answer.encode("utf-8")
        return self._answer(request, code, answer)

    def _answer(self, request: Request, code: int, data: Any) -> bytes:
        request.setResponseCode(code, _PHRASES.get(code))
        request.setHeader("content-type", "application/json")
        return json.dumps(data).encode("utf-8")

    def _route(
        self, method: str, path: str, query: Dict[str, List[str]], body: Any
    ) -> Tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts[:3] != ["api", "v1", "namespaces"] or len(parts) < 5:
            raise ApiError(404, f"the server could not find the requested resource ({path})")
        namespace, kind, rest = parts[3], parts[4], parts[5:]
        if namespace not in self.namespaces:
            raise ApiError(404, f'namespaces "{namespace}" not found')
        if kind == "pods":
            return self._pods(method, namespace, rest, query, body)
        if kind == "secrets":
            return self._secrets(method, namespace, rest, body)
        raise ApiError(404, f"the server could not find the requested resource ({kind})")

    def _pods(
        self, method: str, ns: str, rest: List[str], query: Dict[str, List[str]], body: Any
    ) -> Tuple[int, Any]:
        if not rest and method == "GET":
            wanted = _selector(query.get("labelSelector", [""])[0])
            items = [
                pod
                for (pns, _), pod in sorted(self.pods.items())
                if pns == ns
                and all(pod["metadata"].get("labels", {}).get(k) == v for k, v in wanted)
            ]
            return 200, {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(next(self._version))},
                "items": items,
            }
        if not rest and method == "POST":
            if not isinstance(body, dict):
                raise ApiError(400, "a pod body is required")
            name = _check_pod(body)
            if (ns, name) in self.pods:
                raise ApiError(409, f'pods "{name}" already exists')
            self.created.append(json.loads(json.dumps(body)))
            pod = json.loads(json.dumps(body))
            meta = pod.setdefault("metadata", {})
            meta.update(
                namespace=ns,
                uid=f"uid-{next(self._uids)}",
                resourceVersion=str(next(self._version)),
                creationTimestamp=_now(),
            )
            pod.update(apiVersion="v1", kind="Pod")
            pod["status"] = {"phase": "Pending", "qosClass": "Burstable"}
            self.pods[(ns, name)] = pod
            if self.on_pod_created is not None:
                self.on_pod_created(pod)
            return 201, pod
        name, pod = _named(self.pods, "pods", method, ns, rest)
        sub = rest[1] if len(rest) > 1 else None
        if method == "GET" and sub in (None, "status"):
            return 200, pod
        if method == "GET" and sub == "log":
            text = self.logs.get((ns, name), "")
            tail = query.get("tailLines")
            if tail:
                text = "".join(text.splitlines(keepends=True)[-int(tail[0]) :])
            return 200, text
        if method == "DELETE" and sub is None:
            self.deleted.append(name)
            if self.graceful_delete:
                pod["metadata"].setdefault("deletionTimestamp", _now())
            else:
                del self.pods[(ns, name)]
            if self.on_pod_deleted is not None:
                self.on_pod_deleted(pod)
            return 200, pod
        raise ApiError(405, f"method {method} not allowed on pods/{sub or ''}")

    def _secrets(self, method: str, ns: str, rest: List[str], body: Any) -> Tuple[int, Any]:
        if not rest and method == "POST":
            if not isinstance(body, dict):
                raise ApiError(400, "a secret body is required")
            name = _check_name("Secret", (body.get("metadata") or {}).get("name"))
            _check_labels("Secret", name, (body.get("metadata") or {}).get("labels"))
            _check_secret_data(name, body)
            if (ns, name) in self.secrets:
                raise ApiError(409, f'secrets "{name}" already exists')
            stored = dict(body, apiVersion="v1", kind="Secret")
            stored["metadata"] = dict(body["metadata"], namespace=ns, uid=f"uid-{next(self._uids)}")
            self.secrets[(ns, name)] = stored
            return 201, stored
        name, secret = _named(self.secrets, "secrets", method, ns, rest)
        if method == "GET":
            return 200, secret
        if method == "PUT":
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != name:
                raise ApiError(400, "the name of the body must match the URL")
            _check_secret_data(name, body)
            stored = dict(body, apiVersion="v1", kind="Secret")
            stored["metadata"] = dict(body["metadata"], namespace=ns)
            self.secrets[(ns, name)] = stored
            return 200, stored
        if method == "DELETE":
            del self.secrets[(ns, name)]
            return 200, _status(200, "", "")
        raise ApiError(405, f"method {method} not allowed on secrets")


def _named(
    store: Dict[Tuple[str, str], Any], kind: str, method: str, ns: str, rest: List[str]
) -> Tuple[str, Any]:
    """The name in the path (``rest[0]``) and the stored object of ``kind``
    (``pods``, ``secrets``) by that name in namespace ``ns``: 405 if the path
    names none, 404 if there is none."""
    if not rest:
        raise ApiError(405, f"method {method} not allowed")
    name = rest[0]
    found = store.get((ns, name))
    if found is None:
        raise ApiError(404, f'{kind} "{name}" not found')
    return name, found


def _check_secret_data(name: str, body: Dict[str, Any]) -> None:
    for key, value in (body.get("data") or {}).items():
        try:
            base64.b64decode(value, validate=True)
        except (ValueError, TypeError):
            raise ApiError(
                422, f'Secret "{name}" is invalid: data[{key}]: Invalid value: not base64'
            ) from None


def _selector(text: str) -> List[Tuple[str, str]]:
    pairs = []
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ApiError(400, f"unable to parse requirement: {part!r} (stub: equality only)")
        pairs.append((key.strip(), value.lstrip("=").strip()))
    return pairs


class _TrackingSite(Site):
    """A site that knows its open connections (to close them when the test ends)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections: Dict[Any, Any] = {}  # protocol: its transport

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        made, lost = protocol.makeConnection, protocol.connectionLost

        def make_connection(transport: Any) -> None:
            self.connections[protocol] = transport
            made(transport)

        def connection_lost(reason: Any) -> None:
            self.connections.pop(protocol, None)
            lost(reason)

        protocol.makeConnection = make_connection
        protocol.connectionLost = connection_lost
        return protocol


@attr.s(auto_attribs=True)
class StubServer:
    """A listening stub: its port, URL and the CA certificate (PEM) it is signed by.

    :meth:`stop` closes the port and the connections clients keep open.
    """

    stub: KubeApiStub
    port: IListeningPort
    url: str
    ca_pem: Optional[bytes]
    factory: _TrackingSite
    reactor: Any

    async def _stop(self) -> None:
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped
        self.stub.release()
        for transport in list(self.factory.connections.values()):
            transport.abortConnection()
        for _ in range(500):
            if not self.factory.connections:
                return
            await deferLater(self.reactor, 0.01, lambda: None)

    def stop(self) -> Deferred[None]:
        """Stop listening and drop every connection; fires once they are gone."""
        return Deferred.fromCoroutine(self._stop())

    def write_kubeconfig(self, path: str, namespace: str = "default") -> str:
        """Write a kubeconfig for this server (see :func:`write_kubeconfig`)."""
        return write_kubeconfig(path, self.url, self.stub.token, self.ca_pem, namespace)


def serve(reactor: Any, stub: KubeApiStub, tls: bool = True) -> StubServer:
    """Listen for the stub on 127.0.0.1 (a free port): HTTPS with a new CA, or HTTP."""
    factory = _TrackingSite(stub)
    factory.displayTracebacks = False
    if not tls:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}"
        return StubServer(stub, port, url, None, factory, reactor)
    from twisted.internet.ssl import PrivateCertificate

    from funcx_endpoint.tls import make_ca, make_server_cert

    ca = make_ca("kube-api stub CA")
    cert_pem, key_pem = make_server_cert(ca, ["localhost"], ["127.0.0.1"])
    options = PrivateCertificate.loadPEM(cert_pem + key_pem).options()
    port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
    url = f"https://127.0.0.1:{port.getHost().port}"
    return StubServer(stub, port, url, ca.cert_pem, factory, reactor)


def write_kubeconfig(
    path: str,
    server: str,
    token: str,
    ca_pem: Optional[bytes] = None,
    namespace: str = "default",
) -> str:
    """A kubeconfig (JSON, which is YAML) with one cluster, user (``token``)
    and current context; the CA as ``certificate-authority-data``.  Mode 0600."""
    cluster: Dict[str, Any] = {"server": server}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode("ascii")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stub", "cluster": cluster}],
        "users": [{"name": "stub-user", "user": {"token": token}}],
        "contexts": [
            {
                "name": "stub",
                "context": {"cluster": "stub", "user": "stub-user", "namespace": namespace},
            }
        ],
        "current-context": "stub",
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=1)
    return path
