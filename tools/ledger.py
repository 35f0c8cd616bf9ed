"""The ledger: what really ran, as the jobs' own processes recorded it, kept outside eventq.

Guards the checks of "no job runs twice, no GPU is held twice" in the fault tests: a test
submits :func:`job_command` as the job's command; every attempt appends a ``start`` line
when its process starts and an ``end`` line when it ends (also when it is stopped with
SIGTERM, SIGINT or SIGHUP). A line is::

    <job id> <attempt> start|end <unix ns> <node> <GPUs, comma separated, or ->

The node is the ``node`` argument, else the ``LEDGER_NODE`` variable of the environment
the attempt runs in (a test sets it on each agent it starts), else ``local``. GPUs are
keyed by node: GPU 0 of one node and GPU 0 of another are different GPUs.

Attempts on several hosts may append to one shared file or to one file each; the reader
takes any number of files. Overlaps are judged on the stamps, so hosts writing separate
files need clocks that agree to well within a job's run time.

A run with no ``end`` line (its process was SIGKILLed, or still runs) counts as alive to
the end of time: the checks stay on the side of reporting an overlap.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

NODE_VARIABLE = "LEDGER_NODE"
FOREVER = 2**63

#: ``sleep`` runs in the background so a trapped signal is handled at once, not after it.
#: A job that lingers goes on for ``linger`` seconds after SIGTERM (as a training run that
#: saves a checkpoint does) and records its end only then: a SIGKILL meanwhile leaves its
#: run without an end, alive forever as far as the checks go.
JOB_SCRIPT = """\
node={node}
line() {{ echo "$EVENTQ_JOB_ID $EVENTQ_ATTEMPT $1 $(date +%s%N) $node \
${{CUDA_VISIBLE_DEVICES:--}}" >> {ledger}; }}
line start
trap 'trap "" TERM INT HUP; kill $pid 2>/dev/null; sleep {linger}; line end; exit 143' \
TERM INT HUP
case $EVENTQ_ATTEMPT in 1) s={first};; *) s={sleep};; esac
sleep $s & pid=$!
wait $pid
line end
"""


def job_command(ledger: Path, sleep: float, node: str | None = None, linger: float = 0.0,
                first: float | None = None) -> list[str]:
    """A job's command that records its start and end in ``ledger`` and sleeps between
    (``first`` seconds in its first attempt, if given)."""
    where = shlex.quote(node) if node is not None else f'"${{{NODE_VARIABLE}:-local}}"'
    script = JOB_SCRIPT.format(node=where, ledger=shlex.quote(str(ledger)),
                               sleep=f"{sleep:.3f}", linger=f"{linger:.3f}",
                               first=f"{sleep if first is None else first:.3f}")
    return ["sh", "-c", script]


@dataclass
class Run:
    """One attempt as its own process recorded it."""

    job_id: str
    attempt: int
    node: str
    gpus: tuple[int, ...]
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    @property
    def span(self) -> tuple[int, int]:
        """From its first start to its last end (or forever, if it never ended)."""
        return min(self.starts), max(self.ends) if self.ends else FOREVER

    @property
    def name(self) -> str:
        return f"{self.job_id}#{self.attempt}"


Runs = dict[tuple[str, int], Run]


def read_ledger(*paths: Path) -> Runs:
    """Every run recorded in these files (missing files hold none), by (job id, attempt)."""
    runs: Runs = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 6 or parts[2] not in ("start", "end"):
                continue  # a line cut short by a crash of the writer
            job_id, attempt, what, stamp, node, gpus = parts
            devices = () if gpus == "-" else tuple(int(g) for g in gpus.split(","))
            run = runs.setdefault((job_id, int(attempt)),
                                  Run(job_id, int(attempt), node, devices))
            (run.starts if what == "start" else run.ends).append(int(stamp))
    return {key: run for key, run in runs.items() if run.starts}


def started_twice(runs: Runs) -> list[str]:
    """Attempts whose process started more than once."""
    return [f"{run.name} started {len(run.starts)} times"
            for run in runs.values() if len(run.starts) > 1]


def unfinished(runs: Runs) -> list[str]:
    return [f"{run.name} started and never ended" for run in runs.values() if not run.ends]


def overlapping_attempts(runs: Runs) -> list[str]:
    """Two attempts of one job alive at the same time (on any nodes)."""
    by_job: dict[str, list[Run]] = defaultdict(list)
    for run in runs.values():
        by_job[run.job_id].append(run)
    return [f"{one.job_id}: attempts {one.attempt} (on {one.node}) and {other.attempt} "
            f"(on {other.node}) were alive at the same time"
            for job_runs in by_job.values() for one, other in _overlapping(job_runs)]


def overlapping_gpus(runs: Runs) -> list[str]:
    """One GPU (node, index) used by two attempts at the same time."""
    per_gpu: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs.values():
        for gpu in run.gpus:
            per_gpu[(run.node, gpu)].append(run)
    return [f"GPU {gpu} of {node} used by {one.name} and {other.name} at the same time"
            for (node, gpu), held in sorted(per_gpu.items())
            for one, other in _overlapping(held)]


def _overlapping(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Each run that starts while an earlier one is alive, with the longest-lived of those."""
    found: list[tuple[Run, Run]] = []
    alive: Run | None = None
    for run in sorted(runs, key=lambda r: r.span):
        if alive is not None and run.span[0] < alive.span[1]:
            found.append((alive, run))
        if alive is None or run.span[1] > alive.span[1]:
            alive = run
    return found


def overlaps(runs: Runs) -> list[str]:
    """Every way the ledger shows a job or a GPU in two attempts at once; empty if none."""
    return started_twice(runs) + overlapping_attempts(runs) + overlapping_gpus(runs)


def assert_no_overlaps(*paths: Path) -> Runs:
    """Fail unless no job had two attempts alive at once and no GPU was in two at once.

    Returns the runs, for the test's own further checks.
    """
    runs = read_ledger(*paths)
    problems = overlaps(runs)
    assert not problems, "the ledger shows:\n" + "\n".join(problems)
    return runs
