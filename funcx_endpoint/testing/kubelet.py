"""A stand-in kubelet: runs the pods of a :class:`~funcx_endpoint.testing.kubeapi.KubeApiStub`
as local processes, so that a task can run end to end through the Kubernetes path.

For each pod created it does what a kubelet does with the pod's (first)
container, without a container: writes the data of each Secret volume into
the volume's ``mountPath`` (files named by key, mode ``defaultMode``), starts
``command + args`` with the container's ``env`` (``valueFrom`` a
``metadata.name`` field too) on top of ``env``, and reports the pod Running,
then Succeeded or Failed with the exit code; the output becomes the pod's
log.  Deleting the pod sends TERM to the container's first process and,
after the pod's ``terminationGracePeriodSeconds``, KILL to all it started.
A missing Secret leaves the pod Pending with ``CreateContainerConfigError``,
as on a node.  The image is not used: the local Python environment stands
for it (put the interpreter the image would have first on ``env``'s PATH).

Mount paths are local paths, so a test gives the provider a writable
``info_dir``.
"""

from __future__ import annotations

import base64
import os
import signal
import sys
from typing import Any, Dict, List, Mapping, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from funcx_endpoint.lifecycle import cancel_call
from funcx_endpoint.testing.kubeapi import KubeApiStub

__all__ = ["LocalKubelet"]

# The container's first process leads a process group of its own, so that
# KILL reaches everything it started (as tearing down a container does).
_SETSID = "import os, sys; os.setsid(); os.execvpe(sys.argv[1], sys.argv[1:], os.environ)"


class _Container(ProcessProtocol):
    def __init__(self, kubelet: LocalKubelet, namespace: str, name: str) -> None:
        self.kubelet = kubelet
        self.namespace = namespace
        self.name = name
        self.output: List[bytes] = []
        self.ended: Deferred[None] = Deferred()
        self.exit_code: Optional[int] = None
        self.kill_call: Any = None
        self.pid: Optional[int] = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            self.exit_code = 0
        else:
            code = getattr(value, "exitCode", None)
            sig = getattr(value, "signal", None)
            self.exit_code = code if code is not None else 128 + int(sig or 9)
        cancel_call(self.kill_call)
        self.kubelet._ended(self)
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return b"".join(self.output).decode("utf-8", "replace")


class LocalKubelet:
    """Runs ``stub``'s pods on this machine (see the module's docstring).

    ``reactor`` spawns processes and keeps time; ``env`` is the environment
    every container starts from.  :meth:`stop` ends whatever still runs.
    """

    def __init__(
        self,
        reactor: Any,
        stub: KubeApiStub,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> None:
        self.reactor = reactor
        self.stub = stub
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.running: Dict[str, _Container] = {}
        self.started: List[str] = []
        stub.graceful_delete = True
        stub.on_pod_created = self._created
        stub.on_pod_deleted = self._deleted

    def _created(self, pod: Dict[str, Any]) -> None:
        # A moment later, as a node would: the API answers the create first.
        self.reactor.callLater(0, self._start, pod)

    def _start(self, pod: Dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if (ns, name) not in self.stub.pods or meta.get("deletionTimestamp"):
            return
        spec = pod["spec"]
        container = spec["containers"][0]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            secret = volumes.get(mount["name"], {}).get("secret")
            if secret is None:
                continue  # persistent volumes are not simulated
            stored = self.stub.secrets.get((ns, secret["secretName"]))
            if stored is None:
                self.stub.set_waiting(
                    name,
                    "CreateContainerConfigError",
                    f'secret "{secret["secretName"]}" not found',
                    ns,
                )
                return
            os.makedirs(mount["mountPath"], exist_ok=True)
            for key, value in (stored.get("data") or {}).items():
                path = os.path.join(mount["mountPath"], key)
                with open(path, "wb") as f:
                    f.write(base64.b64decode(value))
                os.chmod(path, int(secret.get("defaultMode", 0o644)))
        env = dict(self.env)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
            elif (var.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == (
                "metadata.name"
            ):
                env[var["name"]] = name
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        proto = _Container(self, ns, name)
        self.reactor.spawnProcess(
            proto,
            sys.executable,
            [sys.executable, "-S", "-c", _SETSID, *argv],
            env=env,
            path=self.cwd,
        )
        self.running[name] = proto
        self.started.append(name)
        self.stub.set_phase(name, "Running", ns)

    def _ended(self, proto: _Container) -> None:
        self.running.pop(proto.name, None)
        # The container's first process is gone: so is everything it started.
        self._signal(proto, signal.SIGKILL)
        key = (proto.namespace, proto.name)
        self.stub.set_log(proto.name, proto.text, proto.namespace)
        pod = self.stub.pods.get(key)
        if pod is None:
            return
        if pod["metadata"].get("deletionTimestamp"):
            self.stub.remove_pod(proto.name, proto.namespace)
            return
        code = proto.exit_code or 0
        self.stub.set_phase(
            proto.name, "Succeeded" if code == 0 else "Failed", proto.namespace, exit_code=code
        )

    def _deleted(self, pod: Dict[str, Any]) -> None:
        meta = pod["metadata"]
        proto = self.running.get(meta["name"])
        if proto is None:
            self.stub.remove_pod(meta["name"], meta["namespace"])
            return
        grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        self._signal(proto, signal.SIGTERM, group=False)
        proto.kill_call = self.reactor.callLater(grace, self._signal, proto, signal.SIGKILL)

    def _signal(self, proto: _Container, sig: int, group: bool = True) -> None:
        pid = proto.pid
        if pid is None:
            return
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except OSError:
            pass

    def stop(self, grace: float = 5.0) -> Deferred[None]:
        """TERM every container still running, KILL after ``grace``; fires once all exited."""
        waits = []
        for proto in list(self.running.values()):
            self._signal(proto, signal.SIGTERM, group=False)
            cancel_call(proto.kill_call)
            proto.kill_call = self.reactor.callLater(grace, self._signal, proto, signal.SIGKILL)
            waits.append(proto.ended)
        if not waits:
            return succeed(None)
        return gatherResults(waits).addCallback(lambda _: None)
