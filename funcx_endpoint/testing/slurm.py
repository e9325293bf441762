"""A private Slurm cluster for tests: a controller and compute nodes on one machine.

:class:`SlurmCluster` runs Debian's Slurm 22.05 as children of this process, with
everything (configuration, state, spool, logs, the accounting database) in one
temporary directory:

- a *bridge* (``fxsb<id>``) with an address of a free private /24 (``10.x.y.1``): the
  controller's address, which is also where an endpoint's interchange listens so that
  managers on the nodes can reach it (:attr:`SlurmCluster.address`);
- per compute node a *network namespace* (``funcx-slurm-<id>-nodeN``) joined to the
  bridge by a veth pair, with an address of its own (``10.x.y.10+N``), and a ``slurmd``
  in it, started through ``unshare --uts --mount`` so that it has its own host name
  (``node0``, ``node1``...: what ``socket.gethostname()`` says in a task) and its own
  ``/etc/hosts`` naming the cluster's machines (a bind mount, in its mount namespace
  only; the machine's ``/etc`` is not touched);
- on the host, in the same kind of UTS and mount namespace (host name ``slurmctl``):
  ``slurmctld``, bound to the bridge address (``CommunicationParameters=NoInAddrAny,
  NoCtldInAddrAny``);
- in one more namespace on the bridge (``funcx-slurm-<id>-db``, ``10.x.y.2``, host
  name ``slurmdb``), the accounting that ``sacct`` reads (Parsl's ``SlurmProvider``
  asks ``sacct`` for job states; without accounting storage it answers nothing):
  ``slurmdbd`` and a private MariaDB server on that namespace's own loopback.
  ``slurmdbd`` cannot be told to listen on one address only; in its namespace it
  can be reached only over the bridge, so nothing of the cluster listens on the
  machine's own interfaces;
- authentication ``auth/none`` and ``cred/none`` (no munge), free ports, and
  scheduling without delays (``batch_sched_delay=0,sched_min_interval=0``): the
  cluster is up in about 3 s and a job starts in about 1 s.

Processes in a node's namespace see the same file system, so this checkout's
virtualenv and a test's temporary directories work there unchanged.

Nothing outlives the test process: :meth:`SlurmCluster.stop` (and an ``atexit`` hook
for :func:`shared_cluster`) cancels every job first (``slurmstepd`` and the job's
processes survive their ``slurmd`` otherwise), then stops the daemons, kills whatever
is left in the namespaces, deletes the namespaces, veths and bridge and removes the
directory. A watchdog process (:class:`~funcx_endpoint.testing.watchdog.Watchdog`)
does the same if the owner dies without cleaning up (``kill -9``), and the next
cluster started on the machine reaps clusters whose owner is dead, from a registry
directory of one JSON file per cluster. Every daemon carries
``FUNCX_SLURM_CLUSTER=<id>`` in its environment; processes in the nodes' namespaces
are found with ``ip netns pids``.

The cluster needs root (namespaces, bridges, Slurm's daemons) and the packages
``slurmctld slurmd slurmdbd slurm-client mariadb-server-core mariadb-client-core
iproute2`` (``scripts/bootstrap-system.sh slurm``, which ``make test`` runs).
:func:`unavailable_reason` says why a cluster cannot run here; tests skip with it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import attr
import psutil
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from funcx_endpoint.testing.owners import OwnerRegistry, progress, registry_dir, remove_entry
from funcx_endpoint.testing.shared import SharedInstance
from funcx_endpoint.testing.watchdog import CLEANUP_HELPERS, Watchdog

__all__ = [
    "INSTALL_HINT",
    "MARKER_ENV",
    "SlurmCluster",
    "SlurmError",
    "SlurmNode",
    "SlurmUnavailable",
    "reap_stale_clusters",
    "shared_cluster",
    "shared_cluster_async",
    "stop_shared_cluster",
    "unavailable_reason",
]

#: Every daemon of a cluster carries ``FUNCX_SLURM_CLUSTER=<cluster id>``.
MARKER_ENV = "FUNCX_SLURM_CLUSTER"
#: The programs a cluster runs.
PROGRAMS = (
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "sbatch",
    "srun",
    "squeue",
    "sinfo",
    "scancel",
    "scontrol",
    "sacct",
    "mariadbd",
    "mariadb-install-db",
    "mariadb",
    "ip",
    "unshare",
    "nsenter",
)
INSTALL_HINT = (
    "run `make system-test` or `scripts/bootstrap-system.sh slurm` (as root: apt-get "
    "install slurmctld slurmd slurmdbd slurm-client mariadb-server-core "
    "mariadb-client-core iproute2)"
)
CONTROLLER_NAME = "slurmctl"
DATABASE_NAME = "slurmdb"

# Run a program with its own host name and its own /etc/hosts (both only in its
# own UTS and mount namespaces): sh -c SCRIPT sh HOSTS NAME PROGRAM ARGS...
_IN_OWN_NAMESPACES = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'

# What cleans a cluster up: run by its watchdog once the owner is gone, by
# SlurmCluster.stop, and by the reaper.  Standard library only (the watchdog
# runs it in an isolated interpreter).  argv[1] is the JSON spec.
_CLEANUP = r"""
import json, subprocess
spec = json.loads(sys.argv[1])
env = dict(os.environ, SLURM_CONF=spec["conf"])
env.pop(spec["marker"].split("=")[0], None)

def run(argv, timeout=10.0):
    try:
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None

def jobs():
    done = run(["squeue", "-h", "-o", "%A"], 5.0)
    return done.stdout.split() if done is not None and done.returncode == 0 else []

# Jobs first: slurmstepd and the jobs' processes outlive a killed slurmd.
if os.path.exists(spec["conf"]):
    ids = jobs()
    if ids:
        run(["scancel"] + ids)
        deadline = time.monotonic() + spec.get("cancel_wait", 10.0)
        while ids and time.monotonic() < deadline:
            time.sleep(0.2)
            ids = jobs()

marker = spec["marker"].encode()

def ours():
    pids = set()
    for ns in spec["netns"]:
        done = run(["ip", "netns", "pids", ns], 5.0)
        if done is not None and done.returncode == 0:
            pids.update(int(p) for p in done.stdout.split() if p.isdigit())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.add(int(entry))
        except OSError:
            pass
    pids.discard(os.getpid())
    return pids

def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

left = ours()
signal_all(left, signal.SIGTERM)
deadline = time.monotonic() + spec.get("grace", 5.0)
while time.monotonic() < deadline and any(alive(p) for p in left):
    time.sleep(0.05)
for _ in range(20):
    left = [p for p in ours() if alive(p)]
    if not left:
        break
    signal_all(left, signal.SIGKILL)
    time.sleep(0.1)
for ns in spec["netns"]:
    run(["ip", "netns", "delete", ns])
for link in spec["links"]:
    if os.path.exists("/sys/class/net/" + link):
        run(["ip", "link", "delete", link])
remove_paths(spec["remove"])
"""


class SlurmError(Exception):
    """The cluster could not start, or a Slurm command failed."""


class SlurmUnavailable(SlurmError):
    """This machine cannot run the cluster (not root, no namespaces, Slurm missing)."""


def _progress(message: str) -> None:
    progress("slurm", message)


def _run(
    argv: Sequence[str],
    timeout: float = 30.0,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def _checked(argv: Sequence[str], timeout: float = 30.0) -> str:
    done = _run(argv, timeout)
    if done.returncode != 0:
        raise SlurmError(f"`{shlex.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


_reason_lock = threading.Lock()
_reason: Optional[List[Optional[str]]] = None


def unavailable_reason() -> Optional[str]:
    """Why no cluster can run on this machine, or None if one can (checked once)."""
    global _reason
    with _reason_lock:
        if _reason is None:
            _reason = [_find_unavailable_reason()]
        return _reason[0]


def _find_unavailable_reason() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "a private Slurm cluster needs Linux (network namespaces)"
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (network namespaces, bridges, slurmd)"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"Slurm is not installed here ({', '.join(missing)} missing); {INSTALL_HINT}"
    probe_ns = f"funcx-slurm-probe-{os.getpid()}"
    probe_link = f"fxsprobe{os.getpid() % 100000}"
    try:
        for create, delete in (
            (["ip", "netns", "add", probe_ns], ["ip", "netns", "delete", probe_ns]),
            (
                ["ip", "link", "add", probe_link, "type", "bridge"],
                ["ip", "link", "delete", probe_link],
            ),
        ):
            done = _run(create, 10)
            if done.returncode != 0:
                return (
                    f"this system cannot make network namespaces and bridges "
                    f"(`{shlex.join(create)}`: {done.stderr.strip()})"
                )
            _run(delete, 10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"this system cannot make network namespaces and bridges: {e}"
    return None


def _registry_dir() -> str:
    return registry_dir("slurm")


def _cleanup(spec: Dict[str, Any], timeout: float = 60.0) -> None:
    """Run the cleanup script for ``spec`` now and wait for it."""
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import os, shutil, signal, sys, time\n" + CLEANUP_HELPERS + _CLEANUP,
            json.dumps(spec),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        timeout=timeout,
        check=False,
    )


def reap_stale_clusters(registry: Optional[str] = None) -> List[str]:
    """Clean up clusters started by this module in processes that have died.

    Returns the ids of the clusters reaped; those of live owners are left alone.
    """
    reaped = []
    for path, entry in OwnerRegistry(registry or _registry_dir()).orphans():
        spec = entry.get("spec")
        if isinstance(spec, dict):
            _progress(
                f"Reaping Slurm cluster {entry.get('id')} of dead process {entry.get('owner_pid')}"
            )
            _cleanup(spec)
        remove_entry(path)
        reaped.append(str(entry.get("id")))
    return reaped


def _free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _taken_networks() -> List[ipaddress.IPv4Network]:
    taken = []
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        try:
            out = _run(argv, 10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for word in out.split():
            if word[:1].isdigit() and "." in word:
                try:
                    taken.append(ipaddress.ip_network(word, strict=False))
                except ValueError:
                    pass
    return [n for n in taken if isinstance(n, ipaddress.IPv4Network)]


def _free_subnet() -> ipaddress.IPv4Network:
    taken = _taken_networks()
    rng = random.SystemRandom()
    for _ in range(200):
        candidate = ipaddress.IPv4Network(f"10.{rng.randint(200, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(candidate.overlaps(n) for n in taken if n.prefixlen > 0):
            return candidate
    raise SlurmError("no free private /24 network for the cluster's bridge")


@attr.s(auto_attribs=True, frozen=True)
class SlurmNode:
    """One compute node: its name (also its host name), address and namespace."""

    name: str
    address: str
    netns: str
    veth: str  # the host's end, on the bridge


@attr.s(auto_attribs=True, frozen=True)
class _Ports:
    controller: int
    slurmd: int
    dbd: int
    database: int


class SlurmCluster:
    """A private Slurm cluster of ``nodes`` compute nodes (see the module docstring).

    ``cpus_per_node`` is what each node declares (jobs that do not ask for
    ``--exclusive`` share nodes by cores); ``partition`` is the one partition, the
    default.  Nothing happens until :meth:`start`; :meth:`stop` removes everything.
    """

    def __init__(
        self,
        nodes: int = 2,
        *,
        cpus_per_node: int = 2,
        partition: str = "debug",
        start_timeout: float = 60.0,
        registry_dir: Optional[str] = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.node_count = nodes
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.start_timeout = start_timeout
        self._registry = OwnerRegistry(registry_dir or _registry_dir())
        self._lock = threading.RLock()
        self.cluster_id = secrets.token_hex(3)
        self.base_dir: Optional[str] = None
        self.bridge = f"fxsb{self.cluster_id}"
        self.address = ""
        self.nodes: List[SlurmNode] = []
        self.database: Optional[SlurmNode] = None  # the namespace of slurmdbd and MariaDB
        self._ports: Optional[_Ports] = None
        self._processes: Dict[str, subprocess.Popen[bytes]] = {}
        self._watchdog: Optional[Watchdog] = None
        self._running = False
        self.started_in: Optional[float] = None

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<SlurmCluster {self.cluster_id} {state} {self.address or '-'}>"

    # -- what tests use ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    @property
    def conf_path(self) -> str:
        """The ``slurm.conf``: ``SLURM_CONF`` for every Slurm command of this cluster."""
        return os.path.join(self._need_dir(), "etc", "slurm.conf")

    @property
    def env(self) -> Dict[str, str]:
        """What the environment of a process that uses this cluster needs."""
        return {"SLURM_CONF": self.conf_path}

    @property
    def node_names(self) -> List[str]:
        return [n.name for n in self.nodes]

    @property
    def log_dir(self) -> str:
        return os.path.join(self._need_dir(), "log")

    def _need_dir(self) -> str:
        if self.base_dir is None:
            raise SlurmError("the cluster has not been started")
        return self.base_dir

    def command(
        self, *argv: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command (``squeue``, ``scancel``...) against this cluster, in
        its directory (where the output of a job it submits goes by default)."""
        env = dict(os.environ, **self.env)
        env.pop(MARKER_ENV, None)
        done = _run(argv, timeout, env, cwd=self._need_dir())
        if check and done.returncode != 0:
            raise SlurmError(
                f"`{shlex.join(argv)}` failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return done

    def jobs(self) -> List[Dict[str, str]]:
        """The jobs ``squeue`` knows: ``id``, ``name``, ``state``, ``nodes`` (node list)."""
        out = self.command("squeue", "-h", "-o", "%A|%j|%T|%N").stdout
        jobs = []
        for line in out.splitlines():
            if line.strip():
                job_id, name, state, nodes = line.split("|", 3)
                jobs.append(dict(id=job_id, name=name, state=state, nodes=nodes))
        return jobs

    def scancel(self, *job_ids: str) -> None:
        """Cancel these jobs (``scancel``), as an administrator would."""
        if job_ids:
            self.command("scancel", *job_ids)

    def cancel_all(self, wait: float = 15.0) -> None:
        """Cancel every job and wait (up to ``wait`` seconds) until none is left."""
        ids = [j["id"] for j in self.jobs()]
        self.scancel(*ids)
        deadline = time.monotonic() + wait
        while self.jobs():
            if time.monotonic() > deadline:
                raise SlurmError(f"jobs still there {wait:.0f}s after scancel: {self.jobs()}")
            time.sleep(0.1)

    def node_processes(self, node: Optional[SlurmNode] = None) -> List[psutil.Process]:
        """The processes running on a node (every node by default): those in its
        network namespace (``slurmd``, ``slurmstepd``, the jobs' processes)."""
        found = []
        for each in [node] if node is not None else self.nodes:
            done = _run(["ip", "netns", "pids", each.netns], 10)
            for pid in done.stdout.split():
                try:
                    found.append(psutil.Process(int(pid)))
                except (ValueError, psutil.Error):
                    pass
        return found

    def in_thread(self, reactor: Any, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """``f(*args, **kwargs)`` (a blocking method of this object) in ``reactor``'s pool."""
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

    # -- start ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the cluster; return once every node is idle (about 3 s).

        Raises :class:`SlurmUnavailable` if this machine cannot run it, and
        :class:`SlurmError` (with the daemons' log tails) if it does not come up;
        then nothing of it is left.
        """
        with self._lock:
            if self._running:
                return
            reason = unavailable_reason()
            if reason is not None:
                raise SlurmUnavailable(reason)
            reap_stale_clusters(self._registry.path)
            started = time.monotonic()
            _progress(f"Starting Slurm cluster {self.cluster_id} ({self.node_count} nodes)")
            try:
                self._prepare()
                self._register()
                self._watchdog = Watchdog(
                    _CLEANUP,
                    [json.dumps(self._spec())],
                    env={k: v for k, v in os.environ.items() if k != MARKER_ENV},
                )
                self._make_network()
                self._start_database()
                self._start_controller()
                self._start_nodes()
            except BaseException:
                self._teardown()
                raise
            self._running = True
            self.started_in = time.monotonic() - started
            _progress(
                f"Slurm cluster {self.cluster_id} up in {self.started_in:.1f} s: controller "
                f"{self.address} on {self.bridge}, nodes "
                + ", ".join(f"{n.name}={n.address}" for n in self.nodes)
            )

    def _prepare(self) -> None:
        base = tempfile.mkdtemp(prefix=f"funcx-slurm-{self.cluster_id}-")
        os.chmod(base, 0o755)  # jobs (root too) read it from every node
        self.base_dir = base
        for sub in ("etc", "state", "log", "spool", "db"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        subnet = _free_subnet()
        hosts = list(subnet.hosts())
        self.address = str(hosts[0])
        self.database = SlurmNode(
            name=DATABASE_NAME,
            address=str(hosts[1]),
            netns=f"funcx-slurm-{self.cluster_id}-db",
            veth=f"fxsv{self.cluster_id}d",
        )
        self.nodes = [
            SlurmNode(
                name=f"node{i}",
                address=str(hosts[9 + i]),
                netns=f"funcx-slurm-{self.cluster_id}-node{i}",
                veth=f"fxsv{self.cluster_id}{i}",
            )
            for i in range(self.node_count)
        ]
        for node in self.nodes:
            os.makedirs(os.path.join(base, "spool", node.name), exist_ok=True)
        self._ports = _Ports(
            controller=_free_port(),
            slurmd=_free_port(),
            dbd=_free_port(),
            database=3306,  # on the database namespace's own loopback
        )
        self._db_password = secrets.token_urlsafe(16)
        self._write_files(subnet)

    def _write_files(self, subnet: ipaddress.IPv4Network) -> None:
        base = self._need_dir()
        ports = self._ports
        assert ports is not None
        assert self.database is not None
        lines = [
            "127.0.0.1 localhost",
            f"{self.address} {CONTROLLER_NAME}",
            f"{self.database.address} {DATABASE_NAME}",
        ]
        lines += [f"{n.address} {n.name}" for n in self.nodes]
        with open(os.path.join(base, "etc", "hosts"), "w") as f:
            f.write("\n".join(lines) + "\n")
        conf = [
            f"ClusterName=fx{self.cluster_id}",
            f"SlurmctldHost={CONTROLLER_NAME}({self.address})",
            f"SlurmctldPort={ports.controller}",
            f"SlurmdPort={ports.slurmd}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "SlurmUser=root",
            "SlurmdUser=root",
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            f"StateSaveLocation={base}/state",
            f"SlurmdSpoolDir={base}/spool/%n",
            f"SlurmctldPidFile={base}/state/slurmctld.pid",
            f"SlurmdPidFile={base}/spool/%n/slurmd.pid",
            f"SlurmctldLogFile={base}/log/slurmctld.log",
            f"SlurmdLogFile={base}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/slurmdbd",
            f"AccountingStorageHost={self.database.address}",
            f"AccountingStoragePort={ports.dbd}",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "KillWait=2",
            "InactiveLimit=0",
            "MinJobAge=60",
            "MailProg=/bin/true",
        ]
        conf += [
            f"NodeName={n.name} NodeAddr={n.address} CPUs={self.cpus_per_node} State=UNKNOWN"
            for n in self.nodes
        ]
        conf.append(
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
        )
        with open(os.path.join(base, "etc", "slurm.conf"), "w") as f:
            f.write("\n".join(conf) + "\n")
        dbd = [
            "AuthType=auth/none",
            f"DbdHost={DATABASE_NAME}",
            f"DbdAddr={self.database.address}",
            f"DbdPort={ports.dbd}",
            "SlurmUser=root",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={ports.database}",
            "StorageUser=slurm",
            f"StoragePass={self._db_password}",
            "StorageLoc=slurm_acct_db",
            f"PidFile={base}/state/slurmdbd.pid",
            f"LogFile={base}/log/slurmdbd.log",
        ]
        path = os.path.join(base, "etc", "slurmdbd.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(dbd) + "\n")

    def _spec(self) -> Dict[str, Any]:
        base = self._need_dir()
        return {
            "conf": os.path.join(base, "etc", "slurm.conf"),
            "marker": f"{MARKER_ENV}={self.cluster_id}",
            "netns": [n.netns for n in self._namespaces()],
            "links": [n.veth for n in self._namespaces()] + [self.bridge],
            "remove": [base, self._registry_path()],
        }

    def _namespaces(self) -> List[SlurmNode]:
        """The machines in network namespaces: the database's and the nodes."""
        return ([self.database] if self.database is not None else []) + self.nodes

    def _registry_path(self) -> str:
        return self._registry.entry_path(self.cluster_id)

    def _register(self) -> None:
        self._registry.register(self.cluster_id, {"id": self.cluster_id, "spec": self._spec()})

    def _make_network(self) -> None:
        net = ipaddress.IPv4Network(f"{self.address}/24", strict=False)
        prefix = net.prefixlen
        _checked(["ip", "link", "add", self.bridge, "type", "bridge"])
        _checked(["ip", "addr", "add", f"{self.address}/{prefix}", "dev", self.bridge])
        _checked(["ip", "link", "set", self.bridge, "up"])
        for node in self._namespaces():
            peer = "fxsp" + node.veth[4:]
            _checked(["ip", "netns", "add", node.netns])
            _checked(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", peer])
            _checked(["ip", "link", "set", peer, "netns", node.netns])
            _checked(["ip", "link", "set", node.veth, "master", self.bridge])
            _checked(["ip", "link", "set", node.veth, "up"])
            inside = ["ip", "-n", node.netns]
            _checked(inside + ["link", "set", peer, "name", "eth0"])
            _checked(inside + ["addr", "add", f"{node.address}/{prefix}", "dev", "eth0"])
            _checked(inside + ["link", "set", "eth0", "up"])
            _checked(inside + ["link", "set", "lo", "up"])

    def _daemon_env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env.update(self.env)
        env[MARKER_ENV] = self.cluster_id
        return env

    def _spawn(self, name: str, argv: List[str]) -> subprocess.Popen[bytes]:
        with open(os.path.join(self.log_dir, f"{name}.out"), "ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._need_dir(),
                env=self._daemon_env(),
                start_new_session=True,
            )
        self._processes[name] = process
        return process

    def _as_host(self, host_name: str, argv: List[str]) -> List[str]:
        hosts = os.path.join(self._need_dir(), "etc", "hosts")
        return [
            "unshare", "--uts", "--mount", "--propagation", "private",
            "sh", "-c", _IN_OWN_NAMESPACES, "sh", hosts, host_name, *argv,
        ]  # fmt: skip

    def _wait(self, what: str, ready: Any, deadline: float, logs: Sequence[str] = ()) -> None:
        while True:
            if ready():
                return
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise SlurmError(
                        f"{name} exited with {process.returncode} while waiting for {what}"
                        + self._log_tails()
                    )
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out waiting for {what}" + self._log_tails())
            time.sleep(0.05)

    def _log_tails(self) -> str:
        parts = []
        for name in sorted(os.listdir(self.log_dir)):
            path = os.path.join(self.log_dir, name)
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 1500))
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            parts.append(f"\n--- {name} ---\n{text}")
        return "".join(parts)

    def _deadline(self) -> float:
        return time.monotonic() + self.start_timeout

    def _in_netns(self, machine: SlurmNode, argv: List[str]) -> List[str]:
        """``argv`` run in ``machine``'s network namespace, with its host name."""
        return ["nsenter", f"--net=/run/netns/{machine.netns}", *self._as_host(machine.name, argv)]

    def _start_database(self) -> None:
        base = self._need_dir()
        ports = self._ports
        assert ports is not None and self.database is not None
        data = os.path.join(base, "db", "data")
        socket_path = os.path.join(base, "db", "mysqld.sock")
        tuning = ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M"]
        done = _run(
            [
                "mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                "--auth-root-authentication-method=normal", "--skip-test-db",
                "--skip-name-resolve", *tuning,
            ],
            self.start_timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise SlurmError(f"mariadb-install-db failed: {done.stdout[-1500:]}{done.stderr}")
        self._spawn(
            "mariadbd",
            self._in_netns(self.database, [
                "mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
                "--bind-address=127.0.0.1", f"--port={ports.database}",
                f"--socket={socket_path}", f"--pid-file={base}/db/mysqld.pid",
                "--skip-name-resolve", f"--log-error={base}/log/mariadbd.log", *tuning,
            ]),
        )  # fmt: skip
        client = ["mariadb", "--no-defaults", "-S", socket_path, "-uroot"]

        def answers() -> bool:
            return (
                os.path.exists(socket_path)
                and _run(client + ["-e", "SELECT 1"], 10).returncode == 0
            )

        self._wait("the accounting database", answers, self._deadline())
        grant = (
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        _checked(client + ["-e", grant])

    def _start_controller(self) -> None:
        ports = self._ports
        assert ports is not None and self.database is not None
        database = self.database
        self._spawn("slurmdbd", self._in_netns(database, ["slurmdbd", "-D"]))

        def dbd_listens() -> bool:
            try:
                with socket.create_connection((database.address, ports.dbd), timeout=0.5):
                    return True
            except OSError:
                return False

        self._wait("slurmdbd", dbd_listens, self._deadline())
        self._spawn(
            "slurmctld",
            self._as_host(CONTROLLER_NAME, ["slurmctld", "-D", "-i", "-f", self.conf_path]),
        )
        self._wait(
            "slurmctld",
            lambda: self.command("sinfo", "-h", check=False, timeout=10).returncode == 0,
            self._deadline(),
        )

    def _start_nodes(self) -> None:
        for node in self.nodes:
            argv = ["slurmd", "-D", "-f", self.conf_path, "-N", node.name]
            self._spawn(f"slurmd-{node.name}", self._in_netns(node, argv))

        def all_idle() -> bool:
            done = self.command("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
            states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
            return len(states) == len(self.nodes) and all(s == "idle" for s in states.values())

        self._wait("every node to be idle", all_idle, self._deadline())

    # -- stop ----------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, stop the daemons, remove namespaces, bridge and files."""
        with self._lock:
            if self.base_dir is None:
                return
            _progress(f"Stopping Slurm cluster {self.cluster_id}")
            started = time.monotonic()
            self._teardown()
            _progress(f"Slurm cluster stopped in {time.monotonic() - started:.1f} s")

    def _teardown(self) -> None:
        self._running = False
        if self.base_dir is not None:
            try:
                _cleanup(self._spec())
            except subprocess.TimeoutExpired:
                _progress(f"Cleaning up Slurm cluster {self.cluster_id} timed out")
        for process in self._processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()
        self._processes.clear()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.release(timeout=5)
        self._registry.unregister(self.cluster_id)
        self.base_dir = None

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- one cluster per test process ----------------------------------------------------

_SHARED: SharedInstance[SlurmCluster] = SharedInstance(
    SlurmCluster, SlurmCluster.start, SlurmCluster.stop
)


def shared_cluster() -> SlurmCluster:
    """The process-wide two-node cluster, started on first use (blocking, about 3 s)
    and stopped when the process exits.  Raises :class:`SlurmUnavailable` (tests
    skip with its message) where no cluster can run."""
    reason = unavailable_reason()
    if reason is not None:
        raise SlurmUnavailable(reason)
    return _SHARED.get()


def shared_cluster_async(reactor: Any) -> Deferred[SlurmCluster]:
    """:func:`shared_cluster` from a running reactor: started in a thread."""
    return deferToThreadPool(reactor, reactor.getThreadPool(), shared_cluster)


def stop_shared_cluster() -> None:
    """Stop the shared cluster now (the next use starts a new one)."""
    _SHARED.stop()
