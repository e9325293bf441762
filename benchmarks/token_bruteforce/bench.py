"""Brute force against the token endpoint of a real funcx-service, and legitimate
logins meanwhile.

The attackers are processes, each bound to a source address of its own
(127.0.0.2, 127.0.0.3, ...: all loopback on Linux), each with a few keep-alive
HTTPS connections sending ``POST /v2/oauth2/token`` with wrong secrets back to
back, ignoring ``Retry-After``: half of the guesses for the legitimate client's
id, half for random client ids.  Legitimate clients log in from 127.0.0.1 (a
fresh connection per login, as a command does): one client again and again, and
new clients for their first login, by turns, in rounds of a quiet window then
an attack window (the machine's other load drifts; the rounds cancel it).  Every
answer of the attack is counted by status: 401 means a secret check (scrypt)
ran, 429 that the service refused before checking.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import ssl
import statistics
import sys
import time
import uuid
from typing import Any, Dict, List, Tuple
from urllib.parse import urlencode, urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"


def _connection(
    url: str, ca_file: str, source: str, timeout: float = 60
) -> http.client.HTTPSConnection:
    parsed = urlparse(url)
    context = ssl.create_default_context(cafile=ca_file)
    return http.client.HTTPSConnection(
        parsed.hostname or "localhost",
        parsed.port,
        context=context,
        source_address=(source, 0),
        timeout=timeout,
    )


def _token_request(
    conn: http.client.HTTPSConnection, client_id: str, secret: str
) -> Tuple[int, bytes]:
    body = urlencode({"grant_type": "client_credentials", "scope": SCOPE})
    auth = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    conn.request(
        "POST",
        "/v2/oauth2/token",
        body=body,
        headers={
            "Authorization": f"Basic {auth}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    response = conn.getresponse()
    return response.status, response.read()


def _attacker(
    url: str, ca_file: str, source: str, victim: str, attacking: Any, done: Any, out: Any
) -> None:
    """One connection from ``source``: wrong secrets while ``attacking`` is set,
    until ``done`` is; counts of answers by status, errors, and seconds spent."""
    counts: Dict[int, int] = {}
    conn = _connection(url, ca_file, source)
    n = 0
    errors = 0
    while not done.is_set():
        if not attacking.wait(0.1):
            continue
        n += 1
        client_id = victim if n % 2 else str(uuid.uuid4())
        try:
            status, _ = _token_request(conn, client_id, f"guess-{n}")
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = _connection(url, ca_file, source)
            continue
        counts[status] = counts.get(status, 0) + 1
    conn.close()
    out.put((counts, errors))


def _login(url: str, ca_file: str, client_id: str, secret: str) -> Tuple[float, int]:
    started = time.perf_counter()
    conn = _connection(url, ca_file, "127.0.0.1")
    try:
        status, _ = _token_request(conn, client_id, secret)
    finally:
        conn.close()
    return time.perf_counter() - started, status


def _figures(latencies: List[float]) -> Dict[str, float]:
    ordered = sorted(latencies)
    return {
        "logins": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1),
        "mean_ms": round(1000 * statistics.fmean(ordered), 1),
    }


def legit_logins(
    url: str,
    ca_file: str,
    client: Tuple[str, str],
    fresh: List[Tuple[str, str]],
    count: int,
    until: float = 0.0,
) -> Tuple[List[float], List[float], int]:
    """Logins 0.1 s apart, by turns: ``client`` again, and a client of ``fresh`` for
    its first time; ``count`` of each (or until ``until``).  Latencies of each kind,
    and how many failed."""
    again: List[float] = []
    first: List[float] = []
    failures = 0
    while (len(again) < count) if not until else (time.time() < until):
        for kind, credentials in ((again, client), (first, fresh.pop() if fresh else None)):
            if credentials is None:
                continue
            took, status = _login(url, ca_file, *credentials)
            if status == 200:
                kind.append(took)
            else:
                failures += 1
            time.sleep(0.1)
    return again, first, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=4, help="attacking source addresses")
    parser.add_argument("--connections", type=int, default=2, help="connections per source")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    parser.add_argument("--rounds", type=int, default=4, help="quiet/attack window pairs")
    args = parser.parse_args()

    from funcx_endpoint.testing.service import ServiceProcess

    service = ServiceProcess()
    print("starting a service (and a RabbitMQ node) ...", flush=True)
    service.start()
    try:
        url, ca_file = service.root_url, service.ca_file
        client_id, secret = service.create_client("legit")
        wanted = int(2 * args.rounds * args.seconds / 0.2) + 20
        print(f"creating {wanted} clients for first logins ...", flush=True)
        fresh = [service.create_client() for _ in range(wanted)]
        # Warm up (the first login makes this address known for the client).
        legit_logins(url, ca_file, (client_id, secret), [], 5)

        out: Any = multiprocessing.Queue()
        attacking, done = multiprocessing.Event(), multiprocessing.Event()
        procs = [
            multiprocessing.Process(
                target=_attacker,
                args=(url, ca_file, f"127.0.0.{2 + s}", client_id, attacking, done, out),
            )
            for s in range(args.sources)
            for _ in range(args.connections)
        ]
        for proc in procs:
            proc.start()
        print(
            f"{args.rounds} rounds of {args.seconds:g} s quiet then {args.seconds:g} s of "
            f"brute force ({args.sources} sources x {args.connections} connections), "
            f"legitimate logins all along ...",
            flush=True,
        )
        alone, alone_first, attacked, attacked_first = [], [], [], []
        alone_failed = attacked_failed = 0
        for _ in range(args.rounds):
            a, f, failed = legit_logins(
                url, ca_file, (client_id, secret), fresh, 0, until=time.time() + args.seconds
            )
            alone += a
            alone_first += f
            alone_failed += failed
            attacking.set()
            time.sleep(0.5)
            a, f, failed = legit_logins(
                url, ca_file, (client_id, secret), fresh, 0, until=time.time() + args.seconds
            )
            attacking.clear()
            attacked += a
            attacked_first += f
            attacked_failed += failed
        done.set()
        results = [out.get(timeout=300) for _ in procs]
        for proc in procs:
            proc.join()
    finally:
        service.destroy()

    by_status: Dict[int, int] = {}
    errors = 0
    for counts, errs in results:
        errors += errs
        for status, n in counts.items():
            by_status[status] = by_status.get(status, 0) + n
    answered = sum(by_status.values())
    attack_seconds = args.rounds * args.seconds
    normal, under = _figures(alone), _figures(attacked)
    normal_first, under_first = _figures(alone_first), _figures(attacked_first)
    ratio_p50 = under["p50_ms"] / normal["p50_ms"]
    ratio_mean = under["mean_ms"] / normal["mean_ms"]
    ratio_first = under_first["p50_ms"] / normal_first["p50_ms"]
    summary = {
        "attack": {
            "sources": args.sources,
            "connections": args.sources * args.connections,
            "seconds": attack_seconds,
            "answers": answered,
            "answers_per_s": round(answered / attack_seconds, 1),
            "by_status": {str(k): v for k, v in sorted(by_status.items())},
            "secret_checks_per_s": round(by_status.get(401, 0) / attack_seconds, 1),
            "connection_errors": errors,
        },
        "legit_again_alone": normal,
        "legit_again_under_attack": under,
        "legit_first_alone": normal_first,
        "legit_first_under_attack": under_first,
        "failed_logins": {"alone": alone_failed, "under_attack": attacked_failed},
        "slowdown_again_p50": round(ratio_p50, 2),
        "slowdown_again_mean": round(ratio_mean, 2),
        "slowdown_first_p50": round(ratio_first, 2),
    }
    print(json.dumps(summary, indent=2))
    print()
    print(f"token endpoint under brute force ({os.cpu_count()} CPUs, all on one machine):")
    print(
        f"  attack: {answered} answers in {attack_seconds:g} s = "
        f"{summary['attack']['answers_per_s']}/s"
        f" ({', '.join(f'{k}: {v}' for k, v in sorted(by_status.items()))}); "
        f"secret checks run {summary['attack']['secret_checks_per_s']}/s"
    )
    for label, a, u, r in (
        ("client logging in again", normal, under, ratio_p50),
        ("new client's first login", normal_first, under_first, ratio_first),
    ):
        print(
            f"  {label:<25} p50/p95: alone {a['p50_ms']}/{a['p95_ms']} ms, "
            f"under attack {u['p50_ms']}/{u['p95_ms']} ms (x{r:.2f} at p50; target <= 2)"
        )
    print(f"  legitimate logins refused: {alone_failed} alone, {attacked_failed} under attack")
    ok = max(ratio_p50, ratio_first) <= 2.0 and attacked_failed == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
