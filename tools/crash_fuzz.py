"""Kill a real eventq server N times at random moments and check nothing went wrong.

    .venv/bin/python tools/crash_fuzz.py 200 [--seed S] [--segment 25] [--keep]

Each kill point: a burst of concurrent submissions, SIGKILL (mid-burst or while jobs
run and exit), a restart on the same data directory, then quick checks (every job
acknowledged before the kill is known after it; the log's chain and GPU holdings; the
jobs and GPU holders the server shows over HTTP are the state ``eventq.replay.fold``
rebuilds from its log up to the same seq).
Every ``--segment`` points the queue is drained and the full checks run (see
tools/crashkit.py); the next segment starts on a fresh data directory so start-up
time stays that of a realistic log. Prints lost / double-run / double-held counts,
the acknowledged jobs, attempts and restarts, which crash windows were hit, and the
time taken. Exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.crashkit import Findings, Harness, Options


async def fuzz(points: int, seed: int, segment: int, workdir: Path,
               options: Options) -> tuple[Findings, list[float], float]:
    total = Findings()
    durations: list[float] = []
    checking = 0.0
    done, part = 0, 0
    while done < points:
        part += 1
        size = min(segment, points - done)
        async with Harness(workdir / f"segment-{part}", seed=seed + part, options=options) as h:
            await h.start()
            for _ in range(size):
                durations.append(await h.crash_point())
                done += 1
                if done % 10 == 0 or done == points:
                    print(f"  {done}/{points} kill points, last {durations[-1]:.2f}s",
                          flush=True)
            began = time.monotonic()
            total.merge(await h.finish())
            checking += time.monotonic() - began
    return total, durations, checking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("points", type=int, nargs="?", default=30, help="kill points")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--segment", type=int, default=25,
                        help="kill points per data directory (then drain and check all)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the data even if all passed")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eventq-crash-"))
    print(f"crash fuzz: {args.points} kill points, seed {args.seed}, data in {workdir}",
          flush=True)
    began = time.monotonic()
    found, durations, checking = asyncio.run(
        fuzz(args.points, args.seed, args.segment, workdir, Options(clients=args.clients)))
    elapsed = time.monotonic() - began
    problems = found.problems()
    timing = {"total_seconds": round(elapsed, 1),
              "per_kill_point_mean": round(statistics.fmean(durations), 3),
              "per_kill_point_median": round(statistics.median(durations), 3),
              "per_kill_point_max": round(max(durations), 3),
              "drain_and_checks_seconds": round(checking, 1)}
    if args.json:
        print(json.dumps({"seed": args.seed, "counts": found.counts(), "timing": timing,
                          "coverage": dict(found.coverage),
                          "problems": {k: v[:10] for k, v in problems.items()}}, indent=2))
    else:
        print("\ncounts:")
        for name, value in found.counts().items():
            print(f"  {name:<18} {value}")
        print("crash windows hit:")
        for name, value in sorted(found.coverage.items()):
            print(f"  {value:>6}  {name}")
        print("time:")
        for name, seconds in timing.items():
            print(f"  {name:<24} {seconds}")
        for kind, items in problems.items():
            print(f"\n{kind}: {len(items)}")
            for item in items[:10]:
                print(f"  {item}")
    if problems:
        print(f"\nFAIL (seed {args.seed}); data kept in {workdir}")
        return 1
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nOK: nothing lost, nothing run twice, no GPU held twice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
