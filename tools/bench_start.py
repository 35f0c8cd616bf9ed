"""An attempt's start from the server's call to the job's first instruction: a wrapper
spawned for it (``runner.spawn``) against one started ahead and handed it
(``runner.Standby``), the two paths of ``LocalNode``.

The job is ``date +%s%N``, whose own process writes the time it starts (``CLOCK_REALTIME``,
the clock of ``time.time_ns()``). Each sample takes the clock just before the call and
reads the stamp from the attempt's ``stdout.log``; the next standby is started after the
sample, off the clock, as the node starts it 10 ms after a start. The two paths alternate
sample by sample in the same temporary directory, so both see the same machine and the same
file system. ``--load N`` runs it all again beside N busy processes (``benchkit.busy``).
Printed: p50 and p99 of each path, and p50 handed / p50 spawned (below 1: the standby is
faster).

Run from the repository root: ``.venv/bin/python tools/bench_start.py --load 2``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventq import events as ev
from eventq import runner
from tools.benchkit import busy, load_label, percentile, read_stamp, wait_for

JOB = ev.JobSpec(job_id="j", user="bench", priority=30, command=["date", "+%s%N"])


def started(directory: Path, pid: int) -> int:
    """The job's start stamp (ns), once its wrapper has ended."""
    stamp = wait_for(lambda: read_stamp(directory / "stdout.log"), 10, "the job's stamp")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the attempt in {directory} failed: {status}")
    return int(stamp)


def phase(root: Path, samples: int, gap: float) -> tuple[list[float], list[float]]:
    """Milliseconds to the job's start: (spawned, handed), interleaved."""
    spawned: list[float] = []
    handed: list[float] = []
    standby = runner.Standby()
    for i in range(samples):
        directory = root / f"s{i}"
        t0 = time.time_ns()
        pid = runner.spawn(JOB, 1, [0], directory, ())
        spawned.append((started(directory, pid) - t0) / 1e6)
        time.sleep(gap)
        directory = root / f"h{i}"
        t0 = time.time_ns()
        if not standby.hand(JOB, 1, [0], directory, ()):
            raise RuntimeError("the standby did not take the attempt")
        handed.append((started(directory, standby.pid) - t0) / 1e6)
        standby = runner.Standby()
        time.sleep(gap)
    standby.retire()
    os.waitpid(standby.pid, 0)
    return spawned, handed


def report(label: str, spawned: list[float], handed: list[float]) -> None:
    for name, values in (("spawned", spawned), ("handed to a standby", handed)):
        head = f"  {label}, {name}:"
        print(f"{head:<52} p50 {statistics.median(values):6.2f} ms  "
              f"p99 {percentile(values, 99):6.2f} ms  n={len(values)}")
    ratio = statistics.median(handed) / statistics.median(spawned)
    print(f"  {label}: p50 handed / p50 spawned = {ratio:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100, help="samples of each path (100)")
    p.add_argument("--gap", type=float, default=0.02, help="seconds between samples (0.02)")
    p.add_argument("--load", type=int, default=0,
                   help="also run beside N busy processes (default 0: quiet only)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="eventq-bench-start-"))
    try:
        for load in ([0, args.load] if args.load else [0]):
            with busy(load):
                spawned, handed = phase(root / f"load{load}", args.samples, args.gap)
            report(load_label(load), spawned, handed)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
