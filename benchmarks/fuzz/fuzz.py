"""The long fuzz run: see benchmarks/fuzz/run."""

from __future__ import annotations

import argparse
import sys
import time

from funcx_endpoint.testing.fuzz import SURFACES, RestOverTCP, make_surface, run_surface


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10_000, help="inputs per surface")
    parser.add_argument("--surface", action="append", choices=sorted(SURFACES))
    parser.add_argument(
        "--tcp-timeout",
        type=float,
        default=RestOverTCP.timeout,
        help="seconds without an answer that count as a hang (rest-tcp)",
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    names = args.surface or list(SURFACES)
    bad = 0
    print(f"{args.n} inputs per surface", flush=True)
    for name in names:
        surface = make_surface(name)
        if isinstance(surface, RestOverTCP):
            surface.timeout = args.tcp_timeout
        started = time.monotonic()
        tally = run_surface(surface, args.n, seed=args.seed)
        print(f"{tally.line()}  ({time.monotonic() - started:.0f} s)", flush=True)
        for example in tally.examples:
            print(f"    {example}", flush=True)
        bad += tally.bad()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
