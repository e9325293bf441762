"""End-to-end throughput of a real funcX endpoint, against ProcessPoolExecutor, Celery and Parsl.

One run, one machine, the same three workloads everywhere: no-op tasks,
1 KB echo tasks (a 1,024-character string in and out) and 10 ms sleep
tasks, on 2 workers.

* funcx-endpoint (ours): a private RabbitMQ node; the real funcx-service on
  it; an endpoint configured and started with the real CLI (2 workers);
  once the daemon is registered and its manager and workers are up, the
  service is stopped and this process publishes Task messages straight to
  the endpoint's task queue (AMQPS, persistent, a window of tasks
  unanswered) and reads the results from a durable queue bound to the
  results exchange, checking each one.
* ProcessPoolExecutor(2) in this process: the floor (no network, no broker).
* Celery (prefork worker, --concurrency 2) on the same RabbitMQ node (its
  own virtual host, plain AMQP), result backend rpc://, tuned
  worker_prefetch_multiplier.
* Parsl HighThroughputExecutor, max_workers_per_node=2, LocalProvider.

Celery and Parsl run from their own virtualenv (benchmarks/.venv-compare,
made and filled with pip on first use, reused after), each from a runner
script that prints its figures as JSON.  For each workload: a warm-up,
then tasks/s over the whole batch; for the no-op also single-task round
trips (p50/p90/p99).  For the sleep tasks, the rate as a percentage of the
ideal 2 workers / 10 ms = 200 tasks/s.  One table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional
from urllib.parse import quote

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import measure_system  # noqa: E402
from workloads import LABELS, SLEEP_IDEAL, WORKLOADS  # noqa: E402

COMPARE_VENV = os.path.join(ROOT, "benchmarks", ".venv-compare")
COMPARE_PACKAGES = ["celery", "parsl"]
SYSTEMS = ("ours", "before", "ppe", "celery", "parsl")
#: The code "before" measures: main just before the core was redesigned
#: (issue 9), so that the A/B of the two commits runs in one run.
BASELINE_REV = "1e3b1f1"
AB_DIR = os.path.join(ROOT, "benchmarks", ".ab")
TARGET_RATE = 2500.0
TARGET_P50_MS = 3.0
TARGET_SLEEP_FRACTION = 0.90

_started = time.monotonic()


def say(line: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f} s] {line}", flush=True)


# -- other work on the machine --------------------------------------------------------


class OtherLoad:
    """Samples the CPU used by processes that are not this run's (a shared machine).

    Every ``interval`` seconds, in a thread: the CPU time of every process
    that is neither this process nor a descendant of it (RabbitMQ's helpers
    that call setsid() are still descendants by parent id), nor a process
    whose command line names one of ``marks`` (this run's directories) or a
    descendant of one.  ``mark()``
    returns the share of one core those others used since the last mark.
    """

    def __init__(self, marks: List[str], interval: float = 2.0) -> None:
        import threading

        self.marks = marks
        self.interval = interval
        self._seen: Dict[int, float] = {}
        self._other_cpu = 0.0
        self._last_mark = (time.monotonic(), 0.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        me = os.getpid()
        infos = []
        children: Dict[int, List[int]] = {}
        roots = [me]
        for proc in psutil.process_iter(["pid", "ppid", "cmdline", "cpu_times"]):
            info = proc.info
            if info["cpu_times"] is None:
                continue
            infos.append(info)
            children.setdefault(info["ppid"] or 0, []).append(info["pid"])
            cmdline = " ".join(info["cmdline"] or [])
            # The endpoint daemon (twistd daemonizes) and Parsl's worker pools
            # are not our descendants; they name our directories.
            if any(mark in cmdline for mark in self.marks):
                roots.append(info["pid"])
        ours = set()
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid not in ours:
                ours.add(pid)
                stack.extend(children.get(pid, ()))
        added = 0.0
        seen: Dict[int, float] = {}
        for info in infos:
            times = info["cpu_times"]
            total = times.user + times.system
            seen[info["pid"]] = total
            if info["pid"] in ours or info["pid"] not in self._seen:
                continue
            added += max(0.0, total - self._seen[info["pid"]])
        with self._lock:
            self._seen = seen
            self._other_cpu += added

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:
                pass

    def mark(self) -> float:
        """Cores (0..N) used by other processes since the last mark."""
        now = time.monotonic()
        with self._lock:
            then, cpu_then = self._last_mark
            self._last_mark = (now, self._other_cpu)
            used = self._other_cpu - cpu_then
        return used / max(now - then, 1e-9)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# -- the comparison virtualenv ------------------------------------------------------


def compare_python() -> str:
    return os.path.join(COMPARE_VENV, "bin", "python")


def ensure_compare_venv(upgrade: bool) -> str:
    """benchmarks/.venv-compare with celery and parsl; their versions."""
    python = compare_python()
    probe = [python, "-c", "import celery, parsl; print(celery.__version__, parsl.__version__)"]

    def versions() -> Optional[str]:
        if not os.path.exists(python):
            return None
        found = subprocess.run(probe, capture_output=True, text=True)
        return found.stdout.strip() if found.returncode == 0 else None

    have = versions()
    if have and not upgrade:
        return have
    log = os.path.join(tempfile.gettempdir(), f"endpoint-throughput-pip-{os.getpid()}.log")
    if not os.path.exists(python):
        say(f"creating {os.path.relpath(COMPARE_VENV, ROOT)} (python3 -m venv)")
        subprocess.run(["python3", "-m", "venv", COMPARE_VENV], check=True)
    say(f"pip install --upgrade {' '.join(COMPARE_PACKAGES)} into it (log: {log})")
    with open(log, "w") as out:
        done = subprocess.run(
            [python, "-m", "pip", "install", "--upgrade", *COMPARE_PACKAGES],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    have = versions()
    if done.returncode != 0 or not have:
        raise SystemExit(f"installing {COMPARE_PACKAGES} failed; see {log}")
    return have


def run_compare(script: str, argv: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    """A runner in the comparison venv; its JSON figures (progress lines pass through)."""
    proc = subprocess.Popen(
        [compare_python(), os.path.join(HERE, script), *argv],
        stdout=subprocess.PIPE,
        env=dict(os.environ, **env),
        cwd=HERE,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=900)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        try:  # whatever the runner left in its session
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{out[-3000:]}")
    figures: Dict[str, Any] = json.loads(lines[-1])
    return figures


# -- ProcessPoolExecutor ------------------------------------------------------------------


def measure_ppe(args: argparse.Namespace) -> Dict[str, Any]:
    with ProcessPoolExecutor(2) as pool:

        def batch(name: str, count: int) -> List[Any]:
            fn, fargs, _ = WORKLOADS[name]
            futures = [pool.submit(fn, *fargs) for _ in range(count)]
            return [f.result() for f in futures]

        def one(name: str) -> Any:
            fn, fargs, _ = WORKLOADS[name]
            return pool.submit(fn, *fargs).result()

        figures = measure_system(
            "ProcessPoolExecutor(2)",
            batch,
            one,
            tasks=args.tasks,
            sleep_tasks=args.sleep_tasks,
            warmup=args.warmup,
            latency_samples=args.latency_samples,
            say=lambda line: say(line.strip()),
        )
    return figures


# -- ours ------------------------------------------------------------------------------------


def ensure_baseline(rev: str) -> str:
    """A Python with the project at ``rev`` installed (cached under benchmarks/.ab).

    The tree at ``rev`` is exported with ``git archive`` and installed (not
    editable, no dependencies fetched) into a virtualenv that sees this
    project's virtualenv's site-packages for its dependencies; returns its
    python.
    """
    full = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short=12", rev], capture_output=True, text=True
    )
    if full.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit of this repository ({full.stderr})")
    where = os.path.join(AB_DIR, full.stdout.strip())
    python = os.path.join(where, "venv", "bin", "python")
    stamp = os.path.join(where, "installed")
    if os.path.exists(stamp):
        return python
    shutil.rmtree(where, ignore_errors=True)
    source = os.path.join(where, "src")
    os.makedirs(source)
    say(f"installing the baseline {rev} into {where} (once)")
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", "--format=tar", rev], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", source], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", os.path.join(where, "venv")])
    import sysconfig

    ours_site = sysconfig.get_paths()["purelib"]
    theirs_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Dependencies from our venv; its own .pth files (our editable tree) are
    # not read through this one, so the baseline's package is the only one.
    with open(os.path.join(theirs_site, "zz-dependencies.pth"), "w") as f:
        f.write(ours_site + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-build-isolation", "--no-index", source],
        check=True,
    )  # fmt: skip
    open(stamp, "w").close()
    return python


_REACTOR_THREAD: List[Any] = []


def _reactor_thread() -> Any:
    """The one reactor thread of this run (a reactor cannot be started twice)."""
    import ours

    if not _REACTOR_THREAD:
        _REACTOR_THREAD.append(ours.ReactorThread())
    return _REACTOR_THREAD[0]


def measure_ours(
    args: argparse.Namespace,
    node: Any,
    base: str,
    label: str = "ours",
    python: str = sys.executable,
    root: Optional[str] = ROOT,
) -> Dict[str, Any]:
    import ours

    endpoint = ours.RealEndpoint(
        node,
        os.path.join(base, label),
        workers=2,
        prefetch_capacity=args.prefetch_capacity,
        amqp_prefetch=args.amqp_prefetch,
        # The baseline may predate the setting (its default then applies).
        task_states=args.task_states == "on" or label != "ours",
        progress=say,
        python=python,
        root=root,
    )
    left: List[str] = []
    reactor_thread = _reactor_thread()
    try:
        endpoint.start()
        broker = psutil.Process(node.beam_pid) if node.beam_pid else None
        say(
            f"driving the endpoint: window {args.window}, amqp_prefetch {args.amqp_prefetch}, "
            f"prefetch_capacity {args.prefetch_capacity}"
        )
        figures = ours.measure(
            endpoint,
            reactor_thread,
            tasks=args.tasks,
            sleep_tasks=args.sleep_tasks,
            warmup=args.warmup,
            window=args.window,
            latency_samples=args.latency_samples,
            progress=lambda line: say(line.strip()),
            broker=broker,
        )
        figures["settings"] = {
            "workers": 2,
            "amqp_prefetch": args.amqp_prefetch,
            "prefetch_capacity": args.prefetch_capacity,
            "window": args.window,
        }
        if args.profile:
            figures["profile"] = ours.profile_daemon(
                endpoint, reactor_thread, args.profile, args.window, say
            )
    finally:
        left = endpoint.stop()
    if left:
        say(f"WARNING: endpoint processes left after stop: {left}")
    figures["left_after_stop"] = left
    return figures


# -- the table ---------------------------------------------------------------------------------


def _rate(fig: Dict[str, Any], name: str) -> str:
    entry = fig.get(name)
    return f"{entry['rate']:,.0f}" if entry else "-"


def table(results: Dict[str, Dict[str, Any]]) -> str:
    header = (
        f"{'system':<26} {'no-op/s':>9} {'1KB echo/s':>11} {'10ms sleep/s':>13} "
        f"{'% ideal':>8} {'no-op RTT p50 ms':>17} {'p90':>6} {'p99':>6}"
    )
    lines = [header, "-" * len(header)]
    for key in SYSTEMS:
        fig = results.get(key)
        if not fig:
            continue
        sleep = fig.get("sleep")
        ideal = f"{100 * sleep['rate'] / SLEEP_IDEAL:.0f}%" if sleep else "-"
        latency = fig.get("noop", {}).get("latency", {})
        lines.append(
            f"{fig['system']:<26} {_rate(fig, 'noop'):>9} {_rate(fig, 'echo'):>11} "
            f"{_rate(fig, 'sleep'):>13} "
            f"{ideal:>8} "
            f"{latency.get('p50_ms', float('nan')):>17.2f} "
            f"{latency.get('p90_ms', float('nan')):>6.2f} "
            f"{latency.get('p99_ms', float('nan')):>6.2f}"
        )
    return "\n".join(lines)


def verdicts(results: Dict[str, Dict[str, Any]]) -> List[str]:
    out: List[str] = []
    ours_fig = results.get("ours")
    if not ours_fig:
        return out
    rate = ours_fig["noop"]["rate"]
    for key in ("celery", "parsl", "ppe"):
        other = results.get(key)
        if other:
            out.append(
                f"ours / {other['system']} (no-op): {rate / other['noop']['rate']:.2f}x "
                f"(echo {ours_fig['echo']['rate'] / other['echo']['rate']:.2f}x)"
            )
    p50 = ours_fig["noop"]["latency"]["p50_ms"]
    sleep = ours_fig["sleep"]["rate"] / SLEEP_IDEAL

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out.append(
        f"target no-op >= {TARGET_RATE:,.0f} tasks/s: {rate:,.0f} -> {mark(rate >= TARGET_RATE)}"
    )
    celery = results.get("celery")
    if celery:
        ratio = rate / celery["noop"]["rate"]
        out.append(f"target no-op >= 5x Celery: {ratio:.2f}x -> {mark(ratio >= 5)}")
    out.append(
        f"target no-op p50 < {TARGET_P50_MS:g} ms: {p50:.2f} ms -> {mark(p50 < TARGET_P50_MS)}"
    )
    out.append(
        f"target sleep >= {TARGET_SLEEP_FRACTION:.0%} of {SLEEP_IDEAL:.0f}/s: {sleep:.1%} -> "
        f"{mark(sleep >= TARGET_SLEEP_FRACTION)}"
    )
    return out


def ab_table(results: Dict[str, Dict[str, Any]]) -> List[str]:
    """Ours and the baseline side by side: rates and CPU per task by process."""
    ours_fig, before = results.get("ours"), results.get("before")
    if not ours_fig or not before:
        return []
    out = ["", f"A/B in this run: before = {before['system']}, ours = this tree"]
    header = f"{'':<34} {'before':>9} {'ours':>9} {'change':>9}"
    out += [header, "-" * len(header)]
    for name in ("noop", "echo", "sleep"):
        a, b = before[name]["rate"], ours_fig[name]["rate"]
        out.append(f"{LABELS[name] + ' tasks/s':<34} {a:>9,.0f} {b:>9,.0f} {b / a:>8.2f}x")
    for name in ("noop", "echo"):
        a_cpu, b_cpu = before[name]["cpu_us_per_task"], ours_fig[name]["cpu_us_per_task"]
        for part in ("daemon", "manager", "workers", "broker", "driver"):
            if part in a_cpu and part in b_cpu and a_cpu[part]:
                change = 100.0 * (b_cpu[part] - a_cpu[part]) / a_cpu[part]
                out.append(
                    f"{LABELS[name] + ' CPU us/task, ' + part:<34} "
                    f"{a_cpu[part]:>9.0f} {b_cpu[part]:>9.0f} {change:>+8.0f}%"
                )
    a_lat, b_lat = before["noop"]["latency"], ours_fig["noop"]["latency"]
    out.append(f"{'no-op round trip p50 ms':<34} {a_lat['p50_ms']:>9.2f} {b_lat['p50_ms']:>9.2f}")
    return out


# -- main --------------------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/endpoint_throughput/run",
        description=__doc__.split("\n\n")[0] + "  About 3 to 5 minutes.",
        epilog=(
            "Examples: `run` (everything); `run --only ours`; `run --only ours,ppe --tasks 50000`; "
            "`run --only ours --profile 15` (py-spy on the daemon; needs py-spy on PATH or "
            "/tmp/py-spy/bin/py-spy)."
        ),
    )
    parser.add_argument(
        "--only",
        default=",".join(SYSTEMS),
        help="comma-separated systems to run, of: ours, ppe, celery, parsl (default: all)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=20_000,
        help="no-op and echo tasks per run, ours and ProcessPoolExecutor (default 20000)",
    )
    parser.add_argument(
        "--compare-tasks",
        type=int,
        default=5_000,
        help="no-op and echo tasks per run for Celery and Parsl (slower; default 5000)",
    )
    parser.add_argument(
        "--sleep-tasks",
        type=int,
        default=2_000,
        help="10 ms sleep tasks per run, every system (default 2000, ~10 s at 200/s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1_000,
        help="warm-up tasks per workload (default 1000; sleep: at most 200)",
    )
    parser.add_argument(
        "--latency-samples", type=int, default=500, help="single no-op round trips (default 500)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=2_000,
        help="tasks the driver keeps unanswered on the endpoint's queue (default 2000)",
    )
    parser.add_argument(
        "--amqp-prefetch",
        type=int,
        default=1024,
        help="the endpoint's amqp_prefetch (default 1024; the template's is 512)",
    )
    parser.add_argument(
        "--prefetch-capacity",
        type=int,
        default=64,
        help="the endpoint executor's prefetch_capacity (default 64; the template's is 8)",
    )
    parser.add_argument(
        "--celery-prefetch",
        type=int,
        default=64,
        help="Celery's worker_prefetch_multiplier (default 64)",
    )
    parser.add_argument(
        "--parsl-prefetch",
        type=int,
        default=4,
        help="Parsl HTEX prefetch_capacity (default 4)",
    )
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="pip install --upgrade celery parsl in benchmarks/.venv-compare even if present",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the measurements, py-spy record the daemon for SECONDS under no-op load",
    )
    parser.add_argument(
        "--baseline",
        default=BASELINE_REV,
        help=f"the commit 'before' runs, for the A/B (default {BASELINE_REV}: main before "
        "the core redesign)",
    )
    parser.add_argument(
        "--baseline-first",
        action="store_true",
        help="measure 'before' first (default: ours first), to check order effects",
    )
    parser.add_argument(
        "--task-states",
        choices=("on", "off"),
        default="on",
        help="our endpoint's real-time task states (config task_states) [default: on]",
    )
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SYSTEMS]
    if bad:
        parser.error(f"--only: unknown system(s) {bad}; choose from {', '.join(SYSTEMS)}")
    args.systems = chosen
    return args


def leftovers(base: str, before: set) -> List[str]:
    """Processes of this run still alive (children, or naming our paths)."""
    found = []
    me = psutil.Process()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.pid == me.pid or proc.pid in before:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (
                base in cmdline
                or COMPARE_VENV in cmdline
                or (proc.ppid() == me.pid and "resource_tracker" not in cmdline)
            ):
                found.append(f"{proc.pid} {cmdline[:120]}")
        except psutil.Error:
            continue
    return found


def main() -> int:
    args = parse()
    from funcx_endpoint.testing.rabbitmq import RabbitMQNode
    from funcx_endpoint.testing.service_on_node import make_vhost

    before = {p.pid for p in psutil.process_iter()}
    load = os.getloadavg()
    say(
        f"endpoint_throughput: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"systems: {', '.join(args.systems)}"
    )
    if load[0] > 1.0:
        say(
            "NOTE: load average > 1 at the start (it includes any run just before this "
            "one); the closing 'other processes' line says what others used meanwhile"
        )
    versions = None
    if "celery" in args.systems or "parsl" in args.systems:
        versions = ensure_compare_venv(args.upgrade)
        say(f"comparison venv ready: celery {versions.split()[0]}, parsl {versions.split()[1]}")

    results: Dict[str, Dict[str, Any]] = {}
    base = tempfile.mkdtemp(prefix="funcx-bench-endpoint-")
    node = None
    others = OtherLoad([base, COMPARE_VENV])
    busy: Dict[str, float] = {}

    def phase_done(key: str) -> None:
        busy[key] = others.mark()
        results[key]["other_load_cores"] = busy[key]
        say(f"(other processes on this machine used {busy[key]:.2f} cores meanwhile)")

    try:
        if {"ours", "before", "celery"} & set(args.systems):
            node = RabbitMQNode(os.path.join(base, "rabbitmq"))
            say("starting a private RabbitMQ node (about 10 s)")
            node.start()
            say(f"RabbitMQ node up: AMQPS port {node.amqps_port}, AMQP port {node.amqp_port}")
        baseline = ensure_baseline(args.baseline) if "before" in args.systems else None
        order = ["before", "ours"] if args.baseline_first else ["ours", "before"]
        for key in order:
            if key not in args.systems:
                continue
            if key == "ours":
                say("== funcx-endpoint (ours): real service, real daemon, 2 workers")
                others.mark()
                results["ours"] = measure_ours(args, node, base)
            else:
                assert baseline is not None
                say(f"== funcx-endpoint at {args.baseline} (before): the same, older code")
                others.mark()
                results["before"] = measure_ours(
                    args, node, base, "before", python=baseline, root=None
                )
                results["before"]["system"] = f"before ({args.baseline})"
            phase_done(key)
        if "ppe" in args.systems:
            say("== concurrent.futures.ProcessPoolExecutor(2), in this process")
            others.mark()
            results["ppe"] = measure_ppe(args)
            phase_done("ppe")
        common = [
            "--tasks",
            str(args.compare_tasks),
            "--sleep-tasks",
            str(args.sleep_tasks),
            "--warmup",
            str(min(args.warmup, args.compare_tasks)),
            "--latency-samples",
            str(min(args.latency_samples, 300)),
        ]
        if "celery" in args.systems:
            assert node is not None
            say("== Celery: prefork worker --concurrency 2, RabbitMQ (own vhost), rpc:// results")
            make_vhost(node, "celery-bench")
            user, password = quote(node.admin_user, safe=""), quote(node.admin_password, safe="")
            broker = f"amqp://{user}:{password}@127.0.0.1:{node.amqp_port}/celery-bench"
            others.mark()
            results["celery"] = run_compare(
                "celery_runner.py",
                common + ["--prefetch-multiplier", str(args.celery_prefetch)],
                {"BENCH_CELERY_BROKER": broker, "BENCH_LOG_DIR": base},
            )
            phase_done("celery")
        if "parsl" in args.systems:
            say("== Parsl HighThroughputExecutor, 2 workers, LocalProvider")
            others.mark()
            results["parsl"] = run_compare(
                "parsl_runner.py", common + ["--prefetch-capacity", str(args.parsl_prefetch)], {}
            )
            phase_done("parsl")
    finally:
        others.stop()
        if _REACTOR_THREAD:
            _REACTOR_THREAD.pop().stop()
        if node is not None:
            say("stopping the RabbitMQ node")
            node.destroy()
        left = leftovers(base, before)
        shutil.rmtree(base, ignore_errors=True)
    say("no process left behind" if not left else f"WARNING: processes left behind: {left}")

    load = os.getloadavg()
    print()
    print(
        f"endpoint_throughput: 2 workers per system, {os.cpu_count()} CPUs, "
        f"load average at the end {load[0]:.2f}"
    )
    print(table(results))
    if busy:
        print(
            "other processes on the machine, cores used during each phase: "
            + ", ".join(f"{results[k]['system']} {v:.2f}" for k, v in busy.items())
            + ("  (a busy machine: rerun when quiet)" if max(busy.values()) > 0.15 else "")
        )
    print()
    ours_fig = results.get("ours")
    if ours_fig:
        s = ours_fig["settings"]
        print(
            f"ours: amqp_prefetch={s['amqp_prefetch']}, "
            f"prefetch_capacity={s['prefetch_capacity']}, "
            f"max_workers_per_node=2, driver window {s['window']} tasks, AMQPS, persistent tasks, "
            f"durable results queue, publisher confirms; "
            f"{ours_fig['noop']['tasks']} no-op/echo tasks, "
            f"{ours_fig['sleep']['tasks']} sleep tasks"
        )
        for name in ("noop", "echo", "sleep"):
            entry = ours_fig[name]
            cpu = entry["cpu_us_per_task"]
            reports = entry["status_report_bytes"]
            print(
                f"  {LABELS[name]}: CPU per task (us): "
                + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k != "other")
                + f"; longest pause between results {entry['longest_pause_ms']:.0f} ms"
                + (
                    f"; {len(reports)} status report(s) during the run "
                    f"({', '.join(f'{b / 1e6:.1f} MB' for b in reports)})"
                    if reports
                    else ""
                )
            )
        if ours_fig.get("errors"):
            print(f"  {ours_fig['errors']} WRONG RESULTS; first: {ours_fig['first_error']}")
    for key in ("celery", "parsl"):
        fig = results.get(key)
        if fig:
            print(
                f"{fig['system']}: {json.dumps(fig['settings'])}; "
                f"{fig['noop']['tasks']} no-op/echo tasks, {fig['sleep']['tasks']} sleep tasks"
            )
    for line in verdicts(results):
        print(line)
    for line in ab_table(results):
        print(line)
    bad = sum(fig.get("errors", 0) for fig in results.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "load_average": load}, f, indent=2)
    if bad:
        print(f"{bad} tasks returned a wrong result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
