"""The MPI launch prefix of a task: which nodes of the block, which launcher, how many ranks.

A worker that runs a task with a resource specification (see
:mod:`funcx_endpoint.wire.resources`) sets, for the time of that task, the
variables Globus Compute's (and Parsl's) MPI mode sets, so that an
``MPIFunction`` (or any command of the user's) can start its ranks::

    PARSL_MPI_PREFIX      e.g. ``srun --overlap --nodes 2 --ntasks 4 ...``
    PARSL_NUM_NODES, PARSL_RANKS_PER_NODE, PARSL_NUM_RANKS
    PARSL_MPI_NODELIST    the nodes chosen, comma-separated

The launcher is the executor's ``mpi_launcher`` (the manager gives it to its
workers as ``FUNCX_MPI_LAUNCHER``); ``auto`` (the default) is ``srun`` inside
a Slurm job and ``mpiexec`` elsewhere.  The block's nodes come from the batch
scheduler's variables, which the managers of a block inherit from their job:
``FUNCX_BLOCK_NODES`` if set (comma-separated), else Slurm's
``SLURM_JOB_NODELIST``, PBS/Torque's ``PBS_NODEFILE``, LSF's
``LSB_MCPU_HOSTS``/``LSB_HOSTS``, Cobalt's ``COBALT_NODEFILE``; else this
host alone.  A specification that asks for more nodes than the block has
is refused (:class:`~funcx_endpoint.wire.resources.ResourceSpecificationError`)
before anything starts.

Plain Python, no Twisted: the worker imports it.
"""

from __future__ import annotations

import re
import shlex
import socket
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from funcx_endpoint.wire.resources import ResourceSpecificationError

__all__ = [
    "LAUNCHERS",
    "LAUNCHER_VARIABLE",
    "MPI_VARIABLES",
    "block_nodes",
    "choose_launcher",
    "expand_slurm_nodelist",
    "mpi_environment",
    "mpi_prefix",
]

#: The variable a manager gives its workers the executor's ``mpi_launcher`` in.
LAUNCHER_VARIABLE = "FUNCX_MPI_LAUNCHER"
#: The variables set for a task with a resource specification.
MPI_VARIABLES = (
    "PARSL_MPI_PREFIX",
    "PARSL_NUM_NODES",
    "PARSL_RANKS_PER_NODE",
    "PARSL_NUM_RANKS",
    "PARSL_MPI_NODELIST",
)


def _counts(
    spec: Mapping[str, int], nodes: Sequence[str], ranks: str, per_node: str, hosts: str
) -> List[str]:
    """The ranks, the ranks per node and the comma-separated nodes, each after
    the launcher's flag for it."""
    return [
        ranks,
        str(spec["num_ranks"]),
        per_node,
        str(spec["ranks_per_node"]),
        hosts,
        ",".join(nodes),
    ]


def _srun(spec: Mapping[str, int], nodes: Sequence[str]) -> List[str]:
    # --overlap: the managers' own job step (srun of SrunLauncher) holds the
    # nodes' CPUs; without it the step would wait for them forever.  The
    # counts are all explicit: the managers' step leaves SLURM_NTASKS and
    # friends in the environment, which srun would otherwise take.
    return ["srun", "--overlap", "--nodes", str(spec["num_nodes"])] + _counts(
        spec, nodes, "--ntasks", "--ntasks-per-node", "--nodelist"
    )


def _mpiexec(spec: Mapping[str, int], nodes: Sequence[str]) -> List[str]:
    # MPICH's and Intel MPI's Hydra (inside a Slurm job it starts its
    # proxies with srun: see SLURM_OVERLAP in mpi_environment).
    return ["mpiexec"] + _counts(spec, nodes, "-n", "-ppn", "-hosts")


def _mpirun(spec: Mapping[str, int], nodes: Sequence[str]) -> List[str]:
    # Open MPI's mpirun: host:slots limits each node to ranks_per_node.
    ranks = spec["ranks_per_node"]
    return [
        "mpirun",
        "-np",
        str(spec["num_ranks"]),
        "--map-by",
        f"ppr:{ranks}:node",
        "--host",
        ",".join(f"{node}:{ranks}" for node in nodes),
    ]


def _aprun(spec: Mapping[str, int], nodes: Sequence[str]) -> List[str]:
    # Cray ALPS: -N ranks per node, -L the node list.
    return ["aprun"] + _counts(spec, nodes, "-n", "-N", "-L")


#: The launchers ``mpi_launcher`` may name, and how each builds its prefix.
LAUNCHERS: Dict[str, Callable[[Mapping[str, int], Sequence[str]], List[str]]] = {
    "srun": _srun,
    "mpiexec": _mpiexec,
    "mpirun": _mpirun,
    "aprun": _aprun,
}


def choose_launcher(configured: Optional[str], environ: Mapping[str, str]) -> str:
    """The launcher to use: ``configured``, or for ``auto``/none ``srun`` in a
    Slurm job and ``mpiexec`` elsewhere."""
    if configured and configured != "auto":
        if configured not in LAUNCHERS:
            raise ResourceSpecificationError(
                f"unknown mpi_launcher {configured!r}; known: {sorted(LAUNCHERS)} or 'auto'"
            )
        return configured
    return "srun" if environ.get("SLURM_JOB_ID") else "mpiexec"


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def expand_slurm_nodelist(text: str) -> List[str]:
    """Slurm's compact host list (``node[0-2,5],gpu07``) as host names, in order."""
    names: List[str] = []
    depth = 0
    start = 0
    parts: List[str] = []
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    for part in (p.strip() for p in parts):
        if not part:
            continue
        names.extend(_expand_one(part))
    return names


def _expand_one(pattern: str) -> List[str]:
    opening = pattern.find("[")
    if opening < 0:
        return [pattern]
    closing = pattern.find("]", opening)
    if closing < 0:
        raise ValueError(f"unbalanced brackets in the Slurm node list {pattern!r}")
    head, body, tail = pattern[:opening], pattern[opening + 1 : closing], pattern[closing + 1 :]
    found: List[str] = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if match:
            low, high = match.groups()
            width = len(low)
            found += [f"{head}{n:0{width}d}" for n in range(int(low), int(high) + 1)]
        else:
            found.append(head + item.strip())
    return [name + rest for name in found for rest in _expand_one(tail)]


def _unique(names: Sequence[str]) -> List[str]:
    seen: Dict[str, None] = {}
    for name in names:
        if name:
            seen.setdefault(name, None)
    return list(seen)


def _read_lines(path: str) -> List[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f]
    except OSError:
        return []


def block_nodes(environ: Mapping[str, str], hostname: Optional[str] = None) -> List[str]:
    """The nodes of the block this process runs in (see the module docstring),
    this host's first when it is one of them."""
    here = hostname if hostname is not None else socket.gethostname()
    nodes: List[str] = []
    if environ.get("FUNCX_BLOCK_NODES"):
        nodes = [n.strip() for n in environ["FUNCX_BLOCK_NODES"].split(",")]
    elif environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST"):
        nodes = expand_slurm_nodelist(
            environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
        )
    elif environ.get("PBS_NODEFILE"):
        nodes = _read_lines(environ["PBS_NODEFILE"])
    elif environ.get("LSB_MCPU_HOSTS"):
        nodes = environ["LSB_MCPU_HOSTS"].split()[::2]  # "host1 4 host2 4"
    elif environ.get("LSB_HOSTS"):
        nodes = environ["LSB_HOSTS"].split()
    elif environ.get("COBALT_NODEFILE"):
        nodes = _read_lines(environ["COBALT_NODEFILE"])
    nodes = _unique(nodes) or [here]
    short = here.split(".")[0]
    for index, node in enumerate(nodes):
        if node in (here, short) or node.split(".")[0] == short:
            return [node] + nodes[:index] + nodes[index + 1 :]
    return nodes


def mpi_prefix(launcher: str, spec: Mapping[str, int], nodes: Sequence[str]) -> str:
    """The command prefix that starts ``spec``'s ranks with ``launcher`` on the
    first ``num_nodes`` of ``nodes``; ResourceSpecificationError if there are fewer."""
    wanted = spec["num_nodes"]
    if wanted > len(nodes):
        raise ResourceSpecificationError(
            f"the task asks for num_nodes={wanted} but its block has {len(nodes)} "
            f"node{'s' if len(nodes) != 1 else ''} ({', '.join(nodes)}); give the "
            f"executor's provider nodes_per_block >= {wanted}"
        )
    build = LAUNCHERS.get(launcher)
    if build is None:
        raise ResourceSpecificationError(
            f"unknown mpi_launcher {launcher!r}; known: {sorted(LAUNCHERS)}"
        )
    return shlex.join(build(spec, list(nodes[:wanted])))


def mpi_environment(
    spec: Mapping[str, int], environ: Mapping[str, str], hostname: Optional[str] = None
) -> Dict[str, Optional[str]]:
    """The variables to set (None: to remove) for a task with the (checked)
    specification ``spec`` in a worker whose environment is ``environ``."""
    launcher = choose_launcher(environ.get(LAUNCHER_VARIABLE), environ)
    nodes = block_nodes(environ, hostname)
    prefix = mpi_prefix(launcher, spec, nodes)
    chosen = nodes[: spec["num_nodes"]]
    env: Dict[str, Optional[str]] = {
        "PARSL_MPI_PREFIX": prefix,
        "PARSL_NUM_NODES": str(spec["num_nodes"]),
        "PARSL_RANKS_PER_NODE": str(spec["ranks_per_node"]),
        "PARSL_NUM_RANKS": str(spec["num_ranks"]),
        "PARSL_MPI_NODELIST": ",".join(chosen),
    }
    if environ.get("SLURM_JOB_ID"):
        # Inside a Slurm job, Hydra's and Open MPI's srun (and srun itself) must
        # share the CPUs the managers' job step holds.
        env["SLURM_OVERLAP"] = "1"
        # SrunLauncher's ``srun -l`` leaves this to the managers: the ranks'
        # output would be labelled "0: ..." as the managers' is.
        env["SLURM_LABELIO"] = None
    return env
