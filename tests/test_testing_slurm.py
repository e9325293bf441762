"""Tests of the private Slurm cluster harness (funcx_endpoint.testing.slurm).

A cluster leaves nothing behind (jobs, daemons, namespaces, veths, bridge, files)
when it is stopped, and when its owner dies of ``kill -9`` (its watchdog cleans
up); a cluster whose watchdog died too is reaped by the next one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

import psutil
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.testing import slurm
from funcx_endpoint.testing.slurm import (
    MARKER_ENV,
    SlurmCluster,
    reap_stale_clusters,
    unavailable_reason,
)
from tests.support import child_env, wait_for


def _need_slurm() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise SkipTest(reason)


def _netns() -> List[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> List[str]:
    return os.listdir("/sys/class/net")


def _marked(cluster_id: str) -> List[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER_ENV) == cluster_id:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _leftovers(state: Dict[str, Any]) -> List[str]:
    """What is left of a cluster described by ``state`` (empty: nothing)."""
    left = []
    left += [f"netns {ns}" for ns in state["netns"] if ns in _netns()]
    left += [f"link {link}" for link in state["links"] if link in _links()]
    left += [f"process {p.pid} {p.name()}" for p in _marked(state["id"]) if p.is_running()]
    for pid in state["job_pids"]:
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            left.append(f"job process {pid}")
    if os.path.exists(state["base_dir"]):
        left.append(f"directory {state['base_dir']}")
    return left


# Run in a child process: start a one-node cluster, start a job, say what was
# made, then wait to be killed.
_OWNER = r"""
import json, sys, time
from funcx_endpoint.testing.slurm import SlurmCluster
cluster = SlurmCluster(nodes=1)
cluster.start()
job = cluster.command("sbatch", "--parsable", "-N1", "--wrap", "sleep 600").stdout.strip()
while not [j for j in cluster.jobs() if j["state"] == "RUNNING"]:
    time.sleep(0.05)
pids = []
while not pids:
    pids = [p.pid for p in cluster.node_processes() if p.name() == "sleep"]
    time.sleep(0.05)
state = dict(id=cluster.cluster_id, base_dir=cluster.base_dir, job_pids=pids,
             netns=[n.netns for n in cluster.nodes],
             links=[n.veth for n in cluster.nodes] + [cluster.bridge])
print(json.dumps(state), flush=True)
time.sleep(600)
"""


class ClusterTests(SynchronousTestCase):
    def test_stop_leaves_nothing(self) -> None:
        _need_slurm()
        cluster = SlurmCluster(nodes=1)
        cluster.start()
        self.addCleanup(cluster.stop)
        self.assertEqual(cluster.node_names, ["node0"])
        self.assertIn("node0", cluster.command("sinfo", "-h", "-N", "-o", "%N %t").stdout)
        # A job that runs when the cluster stops: cancelled first.
        cluster.command("sbatch", "--parsable", "-N1", "--wrap", "sleep 600")
        self.assertTrue(
            wait_for(lambda: [j for j in cluster.jobs() if j["state"] == "RUNNING"], 30)
        )
        self.assertTrue(
            wait_for(lambda: [p for p in cluster.node_processes() if p.name() == "sleep"], 30)
        )
        state = dict(
            id=cluster.cluster_id,
            base_dir=cluster.base_dir,
            job_pids=[p.pid for p in cluster.node_processes() if p.name() == "sleep"],
            netns=[n.netns for n in cluster.nodes],
            links=[n.veth for n in cluster.nodes] + [cluster.bridge],
        )
        # Nothing of it listens on the machine's own interfaces: slurmctld on the
        # bridge address only (slurmdbd and MariaDB are in a namespace of their own).
        listening = {
            (p.name(), c.laddr.ip)
            for p in _marked(cluster.cluster_id)
            for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
        self.assertEqual(listening, {("slurmctld", cluster.address)})
        kinds = {item.split()[0] for item in _leftovers(state)}
        self.assertEqual(kinds, {"netns", "link", "process", "job", "directory"})
        cluster.stop()
        self.assertEqual(_leftovers(state), [])
        self.assertFalse(cluster.running)
        cluster.stop()  # again: nothing to do

    def test_owner_killed(self) -> None:
        """kill -9 of the process that started a cluster: its watchdog cleans up."""
        _need_slurm()
        owner = subprocess.Popen(
            [sys.executable, "-c", _OWNER],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=child_env(),
        )
        try:
            assert owner.stdout is not None
            line = owner.stdout.readline()
            self.assertTrue(line, "the owner did not start its cluster")
            state = json.loads(line)
            self.assertNotEqual(_leftovers(state), [])
        finally:
            owner.send_signal(signal.SIGKILL)
            owner.wait()
        self.assertTrue(wait_for(lambda: not _leftovers(state), 60), _leftovers(state))

    def test_reap_stale_cluster(self) -> None:
        """A cluster whose owner and watchdog are both gone is reaped by the next one."""
        _need_slurm()
        registry = tempfile.mkdtemp(prefix="funcx-slurm-registry-")
        self.addCleanup(os.rmdir, registry)
        base = tempfile.mkdtemp(prefix="funcx-slurm-stale-")
        bridge = f"fxsbtest{os.getpid() % 1000}"
        subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
        self.addCleanup(subprocess.run, ["ip", "link", "delete", bridge], capture_output=True)
        dead = subprocess.Popen(["true"])
        dead.wait()
        spec = {
            "conf": os.path.join(base, "etc", "slurm.conf"),  # no such file: no jobs
            "marker": f"{MARKER_ENV}=stale",
            "netns": [],
            "links": [bridge],
            "remove": [base, os.path.join(registry, "stale.json")],
        }
        with open(os.path.join(registry, "stale.json"), "w") as f:
            json.dump({"id": "stale", "owner_pid": dead.pid, "spec": spec}, f)
        self.assertEqual(reap_stale_clusters(registry), ["stale"])
        self.assertNotIn(bridge, _links())
        self.assertFalse(os.path.exists(base))
        self.assertEqual(os.listdir(registry), [])

    def test_unavailable_reason_names_what_is_missing(self) -> None:
        saved = os.environ.get("PATH", "")
        os.environ["PATH"] = "/nonexistent"
        try:
            reason = slurm._find_unavailable_reason()
        finally:
            os.environ["PATH"] = saved
        assert reason is not None
        if os.geteuid() == 0:
            self.assertIn("Slurm is not installed here (slurmctld, slurmd", reason)
            self.assertIn("scripts/bootstrap-system.sh slurm", reason)
        else:
            self.assertIn("needs root", reason)
