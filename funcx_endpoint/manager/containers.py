"""Container engines: the command that runs a worker in a container, and what its end means.

A worker in a container is the same ``funcx-worker`` speaking the same frames
(:mod:`funcx_endpoint.wire.frames`) over the same two pipes; only the command
that starts it differs.  The manager runs the engine's command line with
``reactor.spawnProcess`` (never blocking), and the engine runs the worker
(``python3 -m funcx_endpoint.worker``, so an image needs ``python3`` with
funcx-endpoint installed) in a container of the image:

=============  =====================================================================
worker_mode    command line (``OPTIONS``: ``container_cmd_options``, split as a shell
               would)
=============  =====================================================================
podman         ``podman run --rm --name N --preserve-fds=2 --pull=never
               --network=none --env=NAME... OPTIONS IMAGE python3 -m
               funcx_endpoint.worker ...``: the task and result pipes are passed
               into the container as its fds 3 and 4
docker         ``docker run --rm -i --name N --pull=never --network=none
               --env=NAME... OPTIONS IMAGE python3 -m funcx_endpoint.worker
               --task-fd 0 --result-fd 1 ...``: Docker cannot pass file
               descriptors, so the task pipe is the CLI's stdin and the result
               pipe its stdout, which ``docker run -i`` connects to the
               worker's; the worker moves its stdout aside so that what the
               user's code prints goes to stderr, never into the frames
singularity    ``singularity exec OPTIONS IMAGE python3 -m funcx_endpoint.worker
               ...``: the process inherits fds 3 and 4 (Singularity runs it
               directly, without a daemon)
apptainer      ``apptainer exec OPTIONS IMAGE ...``, as singularity
shifter        ``shifter --image=docker:IMAGE OPTIONS -- python3 -m
               funcx_endpoint.worker ...``, fds inherited as with singularity
=============  =====================================================================

``--pull=never`` and ``--network=none`` are left out when the options choose
their own (``--pull=...``, ``--network``/``--net``): images are pulled on the
nodes beforehand (a pull in a worker's start would hold a slot for minutes),
and the pipes carry everything a worker needs.  Environment variables (the
worker's id, accelerators, ``worker_environment``) are passed by name
(``--env=NAME``; ``SINGULARITYENV_NAME`` and ``APPTAINERENV_NAME`` for those
engines), their values in the engine command's environment, so no value
appears on a command line.

Singularity, Apptainer and Shifter cannot run on the machine this project is
tested on: their command lines are built and unit-tested against the
engines' documented syntax but have not been run.

How a containerized worker ended: the engine's own failures have their own
exit codes (Docker and Podman: 125 the engine could not run the container,
for example a missing image; 126 the command could not be invoked; 127 no
such command; Singularity and Apptainer: 255), and a worker that dies before
it says hello is taken for an image that cannot start a worker
(:meth:`ContainerEngine.start_failure`).  Later, a container killed from
outside (``podman kill``, the kernel's OOM killer) ends with 128 + the
signal's number, which :func:`describe_container_exit` spells out.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import uuid
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import attr

from funcx_endpoint.manager.workers_env import ACCELERATOR_VARIABLES
from funcx_endpoint.wire import frames
from funcx_endpoint.wire.containers import Container
from funcx_endpoint.wire.info import ManagerSettings

__all__ = [
    "ENGINES",
    "NO_CONTAINER",
    "RAW",
    "WORKER_MODES",
    "ContainerEngine",
    "ImageUnavailable",
    "Launch",
    "WorkerImage",
    "describe_container_exit",
    "find_engine",
    "forwarded_names",
    "image_for_task",
    "missing_engine_message",
]

#: The worker mode that runs workers directly, without a container.
NO_CONTAINER = "no_container"
#: The command a container runs: the image's own Python and funcx-endpoint.
CONTAINER_WORKER = ("python3", "-m", "funcx_endpoint.worker")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class WorkerImage:
    """What a worker runs in: an engine and an image, or no container at all.

    ``engine`` is a worker mode (:data:`WORKER_MODES`); ``location`` is the
    image as that engine names it (None for ``no_container``).
    """

    engine: str
    location: Optional[str] = None

    @property
    def contained(self) -> bool:
        """Whether this is a container (not a worker run directly)."""
        return self.engine != NO_CONTAINER

    def describe(self) -> str:
        """``image 'python:3.11' (podman)``, or ``no container``, for messages."""
        if not self.contained:
            return "no container"
        return f"image {self.location!r} ({self.engine})"


#: Workers run directly on the node.
RAW = WorkerImage(NO_CONTAINER)


@attr.s(auto_attribs=True, frozen=True)
class Launch:
    """How to start one worker: the command, its environment, and where its pipes go.

    ``pipes`` is ``"fds"`` (task and result pipes on fds 3 and 4, stdout and
    stderr to the log files) or ``"stdio"`` (task pipe on stdin, result pipe
    on stdout, stderr to the log file).  ``name`` is the container's name,
    and ``kill`` the command that kills it (None: signal the process).
    """

    argv: List[str]
    env: Dict[str, str]
    pipes: str = "fds"
    name: Optional[str] = None
    kill: Optional[List[str]] = None

    @property
    def task_fd(self) -> int:
        """The worker's fd (as spawned) that reads tasks."""
        return 0 if self.pipes == "stdio" else frames.TASK_FD

    @property
    def result_fd(self) -> int:
        """The worker's fd (as spawned) that writes results."""
        return 1 if self.pipes == "stdio" else frames.RESULT_FD


def forwarded_names(env: Mapping[str, str], worker_environment: Mapping[str, str]) -> List[str]:
    """The variables a container gets from the worker's environment ``env``: its id,
    unbuffered output, its accelerator, and the configured ``worker_environment``
    (the host's own variables, PATH and the rest, stay outside)."""
    names = ["FUNCX_WORKER_ID", "PYTHONUNBUFFERED"]
    names += [name for name in ACCELERATOR_VARIABLES if name in env]
    names += [name for name in worker_environment if name not in names]
    return names


@attr.s(auto_attribs=True, frozen=True)
class ContainerRun:
    """What an engine's command line runs: the engine's command (a path), the
    image's location, the worker's whole command, the names of the variables
    the worker gets inside, and ``container_cmd_options`` (split)."""

    executable: str
    location: str
    worker: Sequence[str]
    names: Sequence[str]
    options: Sequence[str]


def _chooses(options: Sequence[str], *flags: str) -> bool:
    """Whether ``options`` set one of ``flags`` (``--flag value`` or ``--flag=value``)."""
    return any(
        option == flag or option.startswith(flag + "=") for option in options for flag in flags
    )


def describe_container_exit(code: Optional[int]) -> str:
    """What a container's exit status says, for people: ``137`` is SIGKILL's."""
    if code is None:
        return "its container ended"
    text = f"its container exited with status {code}"
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            return text
        text += f" (128 + {code - 128}: the worker was killed by {name}"
        if code - 128 == signal.SIGKILL:
            text += (
                ", from outside the container (e.g. a kill command) or by the out-of-memory killer"
            )
        text += ")"
    return text


class ContainerEngine:
    """One container engine: its command (``binary``), the image types it runs, and
    how its command line is built (:meth:`launch`).  Subclasses are the engines."""

    name: ClassVar[str] = ""
    #: The command that drives it (found on PATH).
    binary: ClassVar[str] = ""
    #: The ``image_type`` values of a task's container images this engine runs, in
    #: order of preference.
    image_types: ClassVar[Tuple[str, ...]] = ()
    #: Exit codes of the engine's command for its own failures, and what each means.
    engine_codes: ClassVar[Dict[int, str]] = {}
    #: Whether this engine was run by this project's tests.
    tested: ClassVar[bool] = False

    #: Where the worker's pipes are (:attr:`Launch.pipes`), and the worker's own
    #: arguments that say so.
    pipes: ClassVar[str] = "fds"
    worker_pipes: ClassVar[Tuple[str, ...]] = ()

    def launch(
        self,
        executable: str,
        location: str,
        worker_args: Sequence[str],
        env: Mapping[str, str],
        names: Sequence[str],
        options: str = "",
    ) -> Launch:
        """The launch of a worker (``worker_args``: its options) in ``location``.

        ``executable`` is the engine's command (a path), ``env`` the
        environment of that command (with the worker's variables), ``names``
        the variables the worker gets inside, ``options`` the configured
        ``container_cmd_options``.
        """
        worker = [*CONTAINER_WORKER, *self.worker_pipes, *worker_args]
        run = ContainerRun(executable, location, worker, names, shlex.split(options or ""))
        argv, name = self.command(run)
        kill = [executable, "kill", name] if name is not None else None
        return Launch(argv, self.environment(env, names), self.pipes, name, kill)

    def command(self, run: ContainerRun) -> Tuple[List[str], Optional[str]]:
        """The engine's command line for ``run``, and the container's name (None:
        it has none)."""
        raise NotImplementedError

    def environment(self, env: Mapping[str, str], names: Sequence[str]) -> Dict[str, str]:
        """The engine command's environment that gives the worker ``names`` of ``env``."""
        return dict(env)

    def start_failure(self, code: Optional[int]) -> str:
        """What a worker's end before its hello means, given the command's exit code."""
        meaning = self.engine_codes.get(code) if code is not None else None
        if meaning is not None:
            return f"{meaning} (exit status {code})"
        if code is None:
            return f"{self.name} or the worker in the container was killed before it was ready"
        return f"the worker in the container exited with status {code} before it was ready"


def container_name() -> str:
    """A unique name for a worker's container (engines that name containers)."""
    return f"funcx-worker-{uuid.uuid4().hex[:16]}"


class _OCIEngine(ContainerEngine):
    """Docker and Podman: ``run --rm`` a named container, killed by name."""

    engine_codes: ClassVar[Dict[int, str]] = {
        125: "the container engine could not run the container",
        126: "the container's command could not be invoked",
        127: "the container has no such command (the image needs python3 with "
        "funcx-endpoint installed)",
    }

    #: The ``run`` options that bring the worker's pipes into the container.
    pipe_options: ClassVar[Tuple[str, ...]] = ()

    def command(self, run: ContainerRun) -> Tuple[List[str], Optional[str]]:
        name = container_name()
        argv = [run.executable, "run", "--rm", *self.pipe_options, f"--name={name}"]
        if not _chooses(run.options, "--pull"):
            argv.append("--pull=never")
        if not _chooses(run.options, "--network", "--net"):
            argv.append("--network=none")
        argv += [f"--env={n}" for n in run.names]
        return [*argv, *run.options, run.location, *run.worker], name


class Podman(_OCIEngine):
    """Podman: the pipes are passed into the container (``--preserve-fds=2``)."""

    name: ClassVar[str] = "podman"
    binary: ClassVar[str] = "podman"
    image_types: ClassVar[Tuple[str, ...]] = ("docker", "podman")
    tested: ClassVar[bool] = True
    pipe_options: ClassVar[Tuple[str, ...]] = ("--preserve-fds=2",)
    worker_pipes: ClassVar[Tuple[str, ...]] = ()
    pipes: ClassVar[str] = "fds"


class Docker(_OCIEngine):
    """Docker: the pipes are the CLI's stdin and stdout (``docker run -i``)."""

    name: ClassVar[str] = "docker"
    binary: ClassVar[str] = "docker"
    image_types: ClassVar[Tuple[str, ...]] = ("docker",)
    tested: ClassVar[bool] = True
    pipe_options: ClassVar[Tuple[str, ...]] = ("-i",)
    worker_pipes: ClassVar[Tuple[str, ...]] = ("--task-fd", "0", "--result-fd", "1")
    pipes: ClassVar[str] = "stdio"


class Singularity(ContainerEngine):
    """Singularity: ``exec`` runs the worker directly; it inherits the pipes and the
    environment (``SINGULARITYENV_NAME`` sets NAME inside)."""

    name: ClassVar[str] = "singularity"
    binary: ClassVar[str] = "singularity"
    image_types: ClassVar[Tuple[str, ...]] = ("singularity", "apptainer")
    engine_codes: ClassVar[Dict[int, str]] = {
        255: "the container engine could not run the container",
    }
    #: The prefix of the variables the engine sets inside the container.
    env_prefix: ClassVar[str] = "SINGULARITYENV_"

    def command(self, run: ContainerRun) -> Tuple[List[str], Optional[str]]:
        return [run.executable, "exec", *run.options, run.location, *run.worker], None

    def environment(self, env: Mapping[str, str], names: Sequence[str]) -> Dict[str, str]:
        outer = dict(env)
        for name in names:
            if name in env:
                outer[self.env_prefix + name] = env[name]
        return outer


class Apptainer(Singularity):
    """Apptainer (Singularity's successor): the same, with ``APPTAINERENV_``."""

    name: ClassVar[str] = "apptainer"
    binary: ClassVar[str] = "apptainer"
    image_types: ClassVar[Tuple[str, ...]] = ("apptainer", "singularity")
    env_prefix: ClassVar[str] = "APPTAINERENV_"


class Shifter(ContainerEngine):
    """Shifter (NERSC): ``shifter --image=docker:IMAGE -- command``; the process
    inherits the pipes and the environment."""

    name: ClassVar[str] = "shifter"
    binary: ClassVar[str] = "shifter"
    image_types: ClassVar[Tuple[str, ...]] = ("shifter", "docker")
    #: Image locations that already say their type.
    typed_prefixes: ClassVar[Tuple[str, ...]] = ("docker:", "custom:", "id:")

    def command(self, run: ContainerRun) -> Tuple[List[str], Optional[str]]:
        location = run.location
        image = location if location.startswith(self.typed_prefixes) else f"docker:{location}"
        return [run.executable, f"--image={image}", *run.options, "--", *run.worker], None


#: The container engines, by worker mode.
ENGINES: Dict[str, ContainerEngine] = {
    engine.name: engine for engine in (Podman(), Docker(), Singularity(), Apptainer(), Shifter())
}
#: Every worker mode.
WORKER_MODES: Tuple[str, ...] = (NO_CONTAINER, *ENGINES)


def find_engine(name: str, path: Optional[str] = None) -> Optional[str]:
    """The path of engine ``name``'s command on ``path`` (default: PATH), or None."""
    return shutil.which(
        ENGINES[name].binary, path=path if path is not None else os.environ.get("PATH")
    )


def missing_engine_message(name: str, where: str = "") -> str:
    """What to tell the person whose ``worker_mode`` names an engine that is not installed."""
    binary = ENGINES[name].binary
    on = f" on {where}" if where else ""
    return (
        f"worker_mode={name!r} runs workers with the {binary} command, which is not "
        f"installed{on} (not found on PATH): install {binary}, or set worker_mode "
        f"(e.g. 'no_container', or another of {', '.join(ENGINES)})"
    )


class ImageUnavailable(Exception):
    """A task's container that this manager's engine cannot run, and why."""


def image_for_task(settings: ManagerSettings, container: Optional[Container]) -> WorkerImage:
    """What a task runs in, given its container (None: it names none).

    ``no_container`` runs every task directly; the endpoint-wide form
    (``container_uri``) runs every task in that image; otherwise a task
    without a container runs directly and one with a container runs in its
    image of the first type the engine takes (``container_image_types``, or
    the engine's own).  ImageUnavailable if it has no such image.
    """
    mode = settings.worker_mode
    if mode == NO_CONTAINER:
        return RAW
    if settings.container_uri:
        return WorkerImage(mode, settings.container_uri)
    if container is None:
        return RAW
    types = settings.container_image_types or ENGINES[mode].image_types
    for image_type in types:
        image = container.image_for(image_type)
        if image is not None:
            return WorkerImage(mode, image.location)
    label = f"container {container.container_id}"
    if container.name:
        label = f"container {container.name!r} ({container.container_id})"
    if not container.images:
        raise ImageUnavailable(
            f"the task's {label} came without its images (the web service sent only its "
            f"id), so worker_mode={mode!r} has no image to run it in"
        )
    have = ", ".join(sorted({image.image_type for image in container.images}))
    raise ImageUnavailable(
        f"the task's {label} has no image of type {' or '.join(map(repr, types))}, which "
        f"worker_mode={mode!r} runs (it has images of type {have})"
    )
