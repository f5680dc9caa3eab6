"""`python -m bench [--quick | --smoke]`: run the suite, write the results, render the docs.

With `--only` a subset of phases runs and the results are printed but not written (a partial
results file would not have every metric the docs promise).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

import trio

from bench.machine import describe
from bench.report import render, validate_results, write_results
from bench.suite import FULL, QUICK, SMOKE, interpret, run_plan
from gateway.limits import raise_nofile

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("micro", "throughput", "hold")


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run, write and render."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller phases (under 3 minutes on 2 cores); sessions_held 2 000")
    size.add_argument("--smoke", action="store_true",
                      help="toy sizes (under a minute) that check the suite works; write the"
                           " results elsewhere (--results, --docs): its figures mean nothing")
    parser.add_argument("--only", nargs="+", choices=PHASES, default=list(PHASES),
                        help="run only these phases (results are then printed, not written)")
    parser.add_argument("--results", type=Path,
                        help="the results file (default bench/results/latest.json; a smoke run's"
                             " goes to a fresh temporary directory)")
    parser.add_argument("--docs", type=Path,
                        help="where benchmarks.md and benchmarks.png are rendered (default docs/;"
                             " a smoke run's go next to its results)")
    args = parser.parse_args(argv)
    if args.smoke:
        # Never over the committed results: a smoke run's figures mean nothing.
        scratch = Path(tempfile.mkdtemp(prefix="agent-gateway-bench-smoke-"))
        args.results = args.results or scratch / "latest.json"
        args.docs = args.docs or scratch
    args.results = args.results or ROOT / "bench" / "results" / "latest.json"
    args.docs = args.docs or ROOT / "docs"
    plan = QUICK if args.quick else SMOKE if args.smoke else FULL
    nofile = raise_nofile()
    started = datetime.datetime.now(datetime.UTC)
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"bench: mode {plan.mode}, phases {' '.join(args.only)}, nofile {nofile}", flush=True)
    results = trio.run(run_plan, plan, nofile, args.only)
    interpret(results, os.cpu_count() or 1, load_before[0])
    elapsed = datetime.datetime.now(datetime.UTC) - started
    doc = {
        "metrics": results.metrics,
        "machine": {**describe(nofile), "load_average_before": load_before},
        "mode": plan.mode,
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(elapsed.total_seconds(), 1),
        "notes": results.notes,
        "details": results.details,
    }
    print(f"bench: done in {elapsed.total_seconds():.0f} s", flush=True)
    if validate_results(doc):
        print("bench: partial results, not written", flush=True)
        return 0 if set(args.only) != set(PHASES) else 1
    write_results(doc, args.results)
    render(doc, args.docs / "benchmarks.md", args.docs / "benchmarks.png")
    page = (args.docs / "benchmarks.md").read_text(encoding="utf-8")
    print("\n".join(line for line in page.splitlines() if line.startswith("|")))
    print(f"bench: results in {args.results}, page in {args.docs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
