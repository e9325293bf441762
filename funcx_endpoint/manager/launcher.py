"""How a manager starts a worker of an image, and kills a container.

:class:`WorkerLauncher` joins the pool to the container engines
(:mod:`funcx_endpoint.manager.containers`): it finds the engine's command
once, gives the pool the :class:`~funcx_endpoint.manager.containers.Launch`
of a worker of any image (directly, or in a container), and runs the
engine's kill command for a container whose worker must die now (signalling
``podman run`` or ``docker run`` would leave the container running).
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Mapping, Optional, Sequence

from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from funcx_endpoint.manager.containers import (
    ENGINES,
    NO_CONTAINER,
    Launch,
    WorkerImage,
    find_engine,
    forwarded_names,
    missing_engine_message,
)
from funcx_endpoint.manager.workers_env import worker_environment
from funcx_endpoint.wire.info import ManagerSettings

__all__ = ["WorkerLauncher"]

#: Bytes of an engine command's output kept for the log.
_OUTPUT_LIMIT = 4096


class _EngineCommand(ProcessProtocol):
    """A short engine command (``podman kill``): its output, logged if it fails."""

    log = Logger()

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.output = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if len(self.output) < _OUTPUT_LIMIT:
            self.output += data[: _OUTPUT_LIMIT - len(self.output)]

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        if code:
            # Usually harmless: the container was gone already.
            self.log.debug(
                "{command} exited with status {code}: {output}",
                command=" ".join(self.argv),
                code=code,
                output=self.output.decode("utf-8", "replace").strip(),
            )


class WorkerLauncher:
    """Launches for the workers of a manager whose settings are ``settings``.

    ``worker_command`` runs a worker directly (default: this Python's
    ``-m funcx_endpoint.worker``); ``environment`` is where the engine's
    command is looked up (its PATH) and the base of every worker's
    environment.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: ManagerSettings,
        worker_command: Optional[Sequence[str]] = None,
        environment: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._reactor = reactor
        self.settings = settings
        self.worker_command = list(
            worker_command or [sys.executable, "-m", "funcx_endpoint.worker"]
        )
        self.environment = dict(os.environ if environment is None else environment)
        mode = settings.worker_mode
        self.engine = ENGINES.get(mode)
        self.executable: Optional[str] = None
        if self.engine is not None:
            self.executable = find_engine(mode, self.environment.get("PATH", os.defpath))

    def problem(self, hostname: str = "") -> Optional[str]:
        """Why no worker can start here (an unknown mode, an engine not installed), or None."""
        mode = self.settings.worker_mode
        if mode != NO_CONTAINER and self.engine is None:
            return f"unknown worker_mode {mode!r} (known: no_container, {', '.join(ENGINES)})"
        if self.engine is not None and self.executable is None:
            return missing_engine_message(mode, hostname)
        return None

    def worker_args(self, index: int) -> List[str]:
        """The options of worker ``index``."""
        args = ["--worker-id", str(index)]
        args += ["--result-size-limit", str(self.settings.result_size_limit)]
        if self.settings.worker_debug:
            args.append("--debug")
        return args

    def launch(self, image: WorkerImage, index: int) -> Launch:
        """How to start worker ``index`` in ``image``."""
        worker_args = self.worker_args(index)
        env = worker_environment(self.environment, self.settings, index)
        if not image.contained:
            return Launch(self.worker_command + list(worker_args), dict(env))
        engine = ENGINES[image.engine]
        executable = self.executable if engine is self.engine else None
        if executable is None:
            executable = find_engine(image.engine, env.get("PATH", os.defpath)) or engine.binary
        assert image.location is not None
        return engine.launch(
            executable,
            image.location,
            worker_args,
            env,
            forwarded_names(env, self.settings.worker_environment),
            self.settings.container_cmd_options,
        )

    def kill(self, launch: Launch) -> None:
        """Run ``launch``'s kill command, if it has one (not waiting for it)."""
        if launch.kill is None:
            return
        argv: List[str] = launch.kill
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            self._reactor.spawnProcess(
                _EngineCommand(argv),
                argv[0],
                argv,
                env=launch.env,
                childFDs={0: null, 1: "r", 2: "r"},
            )
        except OSError as exc:
            self.log.warn("Could not run {command}: {error}", command=" ".join(argv), error=exc)
        finally:
            os.close(null)
