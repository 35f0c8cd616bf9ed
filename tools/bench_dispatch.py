"""Idle submit-to-start latency: over HTTP, by the `eventq` command, and by `sbatch`.

A real ``eventq server`` subprocess (temporary data directory, ``--port 0``, simulated
GPUs) receives one job at a time. Each job is waited for until it has completed before
the next is submitted, so every sample is taken on an idle queue. Three paths to the
same job, ``date +%s%N``, whose own process writes the time it starts
(``CLOCK_REALTIME`` in nanoseconds, the same clock as the benchmark's ``time.time_ns()``):

- over HTTP: a keep-alive client sends ``POST /api/queue/submit``; the clock starts just
  before it sends (the server's own path).
- the user's path: ``eventq jobs submit -- date +%s%N`` as a process, with its defaults
  (it sends this directory and environment), as a shell runs it; the clock starts before
  the process is spawned, so its start, imports, request and exit are all in the figure.
  The CPU of each of these processes (user + system, from its rusage) is reported beside
  that of ``python -c pass`` and ``eventq --version`` run in the same phase, as ratios.
- Slurm: ``sbatch --wrap 'date +%s%N'`` as a process, its output in a file, when
  ``sbatch`` is on PATH. If the daemons are not running and ``shared/tools/slurm-local.sh``
  is found, the tool starts them with ``slurm-local.sh install`` and stops them again at
  the end. With its tuned profile an idle submission waits for the next tick of
  slurmctld's scheduling loop.

eventq's attempt wrapper runs a list command directly (no ``sh -c`` in between) and sends
its stdout to the attempt's ``stdout.log``: the stamp is one fork and one exec of a small
C program after the wrapper reaches the command.

``--load N`` runs every figure a second time beside N busy processes (benchkit.busy):
each is printed quiet and loaded, as p50 and p99. Within a phase the samples of the three
paths are interleaved, so all see the same machine over the same minutes.

Run from the repository root: ``.venv/bin/python tools/bench_dispatch.py --load 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.benchkit import (
    Api,
    busy,
    child_cpu,
    percentile,
    print_goals,
    read_stamp,
    stop_server,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLURM_SCRIPT = REPO.parent / "shared" / "tools" / "slurm-local.sh"
EVENTQ = str(Path(sys.executable).with_name("eventq"))
POLL_PERIOD_S = 5.0
JOB = ["date", "+%s%N"]


def server_argv(data_dir: Path) -> list[str]:
    return [EVENTQ, "server", "--data-dir", str(data_dir),
            "--port", "0", "--gpus", "4xA100-80GB", "--grace", "2", "--log-format", "json"]


@contextlib.contextmanager
def eventq_server(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Run ``eventq server`` on a free port; yields (url, admin token); stops it after."""
    argv = server_argv(data_dir)
    log = open(data_dir.parent / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        server_file = data_dir / "server.json"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"eventq server exited with {proc.returncode}; see "
                                   f"{data_dir.parent / 'server.log'}")
            return server_file.exists() and (data_dir / "admin.token").exists()

        wait_for(ready, 30, "eventq server start", step=0.02)
        url = json.loads(server_file.read_text())["url"]
        yield url, (data_dir / "admin.token").read_text().strip()
    finally:
        stop_server(proc)
        log.close()


class Samples:
    """What one phase (quiet, or beside busy processes) measured, in seconds."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.replies: list[float] = []
        #: The user's path: `eventq jobs submit` as a process, to the job's start.
        self.cli_starts: list[float] = []
        #: CPU of each of those processes, and of the baselines beside them.
        self.cli_cpu: list[float] = []
        self.pass_cpu: list[float] = []
        self.version_cpu: list[float] = []
        self.slurm: list[float] = []


class EventqRun:
    """One server and one keep-alive client; ``sample()`` times one idle submission over
    HTTP, ``sample_cli()`` one by the ``eventq`` command as a process."""

    def __init__(self, data_dir: Path, api: Api, gap: float) -> None:
        self.data_dir, self.api, self.gap = data_dir, api, gap
        self.env = {**os.environ, "EVENTQ_HOME": str(data_dir)}
        # A user's Python caches bytecode: without it each command would compile every
        # module of eventq's it imports, each time.
        for name in ("EVENTQ_URL", "EVENTQ_TOKEN", "EVENTQ_CA", "PYTHONDONTWRITEBYTECODE"):
            self.env.pop(name, None)

    def sample(self, into: Samples | None) -> None:
        time.sleep(self.gap)
        t0 = time.time_ns()
        reply = self.api.call("POST", "/api/queue/submit", {"command": JOB, "gpus": 1})
        t_reply = time.time_ns()
        stamp = self._started(reply["job_id"])
        if into is not None:
            into.starts.append((stamp - t0) / 1e9)
            into.replies.append((t_reply - t0) / 1e9)

    def sample_cli(self, into: Samples | None) -> None:
        """As a user types it: the command's defaults (its environment and directory sent),
        its own process start, import and exit all in the figure."""
        time.sleep(self.gap)
        t0 = time.time_ns()
        out, cpu = child_cpu([EVENTQ, "jobs", "submit", "--", *JOB], self.env)
        stamp = self._started(out.split()[0].decode())
        if into is not None:
            into.cli_starts.append((stamp - t0) / 1e9)
            into.cli_cpu.append(cpu)

    def sample_baselines(self, into: Samples) -> None:
        """The CPU of a bare interpreter and of ``eventq --version``, beside the submits."""
        into.pass_cpu.append(child_cpu([sys.executable, "-c", "pass"], self.env)[1])
        into.version_cpu.append(child_cpu([EVENTQ, "--version"], self.env)[1])

    def _started(self, job_id: str) -> int:
        """The job's own start stamp, once it has completed (the next sample is idle)."""
        out = self.data_dir / "jobs" / job_id / "1" / "stdout.log"
        # The job's own stamp is the measurement: how fast this loop notices it
        # only paces the run.
        stamp: int = wait_for(lambda: read_stamp(out), 30, f"start of job {job_id}",
                              step=0.001)
        wait_for(lambda: self.api.call("GET", f"/api/jobs/{job_id}")["status"] == "completed",
                 30, f"completion of job {job_id}", step=0.002)
        return stamp


@contextlib.contextmanager
def eventq_run(gap: float, warmup: int) -> Iterator[EventqRun]:
    """A server in a temporary directory, limits raised, warmed up; removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="eventq-bench-dispatch-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    try:
        with eventq_server(data_dir) as (url, token):
            api = Api(url, token)
            try:
                # Only the GPUs hold local jobs back (a log may keep a local job limit).
                api.call("POST", "/api/queue/concurrency", {
                    "max_concurrent": 100, "user_max_concurrent": 100,
                    "local_job_max_concurrent": 100})
                run = EventqRun(data_dir, api, gap)
                for _ in range(warmup):
                    run.sample(None)
                    run.sample_cli(None)
                yield run
            finally:
                api.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- Slurm -----------------------------------------------------------------------------


def slurm_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in out.stdout


@contextlib.contextmanager
def slurm_daemons(script: Path, mode: str) -> Iterator[str | None]:
    """Yields None when Slurm can be used, else why not. Stops daemons it started."""
    if mode == "off":
        yield "disabled with --slurm off"
        return
    started = False
    if shutil.which("sbatch") is None and mode == "auto":
        yield "sbatch is not on PATH"
        return
    if not slurm_up():
        if not script.exists():
            yield f"Slurm is not running and {script} is missing"
            return
        print(f"starting Slurm with {script} install ...", flush=True)
        proc = subprocess.run(["bash", str(script), "install"], capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0 or not slurm_up():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            yield f"slurm-local.sh install failed: {' | '.join(tail)}"
            return
        started = True
    try:
        yield None
    finally:
        if started:
            subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=120)
            print("stopped the Slurm daemons this run started", flush=True)


class SlurmRun:
    """``sample()`` times ``sbatch --wrap 'date +%s%N'`` on an idle cluster.

    The idle time before each sample is ``gap`` plus a uniformly random fraction of
    a second: whatever the origin of slurmctld's 1 s scheduling tick, each
    submission then falls at a uniformly random phase of it, so the samples are
    not biased by the rhythm of the benchmark's own loop.
    """

    def __init__(self, tmp: Path, gap: float, seed: int = 1) -> None:
        self.tmp, self.gap = tmp, gap
        self.rng = random.Random(seed)
        self.name = f"eventq-bench-{os.getpid()}"
        self.count = 0

    def sample(self, into: Samples) -> None:
        self.count += 1
        i = self.count
        time.sleep(self.gap + self.rng.random())
        stamp_file = self.tmp / f"start.{i}"
        t0 = time.time_ns()
        subprocess.run(["sbatch", "-Q", "-J", self.name, "-D", str(self.tmp), "-o",
                        str(stamp_file), "--wrap", " ".join(JOB)], check=True,
                       capture_output=True, timeout=30)
        stamp = wait_for(lambda: read_stamp(stamp_file), 30, f"start of Slurm job {i}",
                         step=0.002)
        into.slurm.append((stamp - t0) / 1e9)
        wait_for(lambda: not subprocess.run(
            ["squeue", "-h", "-n", self.name, "-o", "%i"], capture_output=True, text=True,
            timeout=10).stdout.strip(), 30, f"end of Slurm job {i}", step=0.02)


@contextlib.contextmanager
def slurm_run(gap: float) -> Iterator[SlurmRun]:
    tmp = Path(tempfile.mkdtemp(prefix="eventq-bench-slurm-"))
    run = SlurmRun(tmp, gap)
    try:
        yield run
    finally:
        with contextlib.suppress(OSError):  # no Slurm: nothing to cancel
            subprocess.run(["scancel", "-n", run.name], capture_output=True, timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


# --- main ------------------------------------------------------------------------------


def run_phase(eq: EventqRun, sl: SlurmRun | None, args: argparse.Namespace) -> Samples:
    """Every figure once. Interleaved: a slice of the eventq samples (HTTP, the command,
    the CPU baselines), then one Slurm sample, and again, so all see the same machine over
    the same minutes."""
    into = Samples()
    rounds = args.slurm_samples if sl is not None else 1
    for k in range(rounds):
        for _ in range(args.jobs * (k + 1) // rounds - len(into.starts)):
            eq.sample(into)
        for _ in range(args.cli_jobs * (k + 1) // rounds - len(into.cli_starts)):
            eq.sample_cli(into)
        for _ in range(args.cpu_samples * (k + 1) // rounds - len(into.pass_cpu)):
            eq.sample_baselines(into)
        if sl is not None:
            sl.sample(into)
    return into


def spread(values: list[float]) -> str:
    return (f"p50 {percentile(values, 50) * 1e3:.2f} ms  p99 {percentile(values, 99) * 1e3:.2f} "
            f"ms  min {min(values) * 1e3:.2f} ms  max {max(values) * 1e3:.2f} ms  "
            f"n={len(values)}")


def report(title: str, got: Samples) -> dict[str, float]:
    """One phase's figures, printed; returned for the goals and --json."""
    print(f"{title} (load average {os.getloadavg()[0]:.2f} at its end):")
    print(f"  HTTP client, submit to start:             {spread(got.starts)}")
    print(f"  HTTP client, submit to reply:             {spread(got.replies)}")
    print(f"  `eventq jobs submit` process, to start:   {spread(got.cli_starts)}")
    fig = {"http_p50_s": percentile(got.starts, 50), "http_p99_s": percentile(got.starts, 99),
           "http_reply_p50_s": percentile(got.replies, 50),
           "cli_p50_s": percentile(got.cli_starts, 50),
           "cli_p99_s": percentile(got.cli_starts, 99),
           "cli_cpu_s": statistics.median(got.cli_cpu),
           "pass_cpu_s": statistics.median(got.pass_cpu),
           "version_cpu_s": statistics.median(got.version_cpu)}
    if got.slurm:
        print(f"  `sbatch` process, to start:               {spread(got.slurm)}")
        fig.update(slurm_p50_s=percentile(got.slurm, 50), slurm_p99_s=percentile(got.slurm, 99))
        fig["slurm_over_cli_p50"] = fig["slurm_p50_s"] / fig["cli_p50_s"]
        fig["slurm_over_http_p50"] = fig["slurm_p50_s"] / fig["http_p50_s"]
        print(f"  Slurm p50 / eventq p50: {fig['slurm_over_cli_p50']:.1f}x the command, "
              f"{fig['slurm_over_http_p50']:.1f}x the HTTP client")
    print(f"  CPU per process (median, user+system): `eventq jobs submit` "
          f"{fig['cli_cpu_s'] * 1e3:.1f} ms, `eventq --version` "
          f"{fig['version_cpu_s'] * 1e3:.1f} ms, `python -c pass` "
          f"{fig['pass_cpu_s'] * 1e3:.1f} ms; submit / pass = "
          f"{fig['cli_cpu_s'] / fig['pass_cpu_s']:.2f}, submit / --version = "
          f"{fig['cli_cpu_s'] / fig['version_cpu_s']:.2f}")
    return fig


def goals(name: str, fig: dict[str, float]) -> list[tuple[str, bool, str]]:
    ms = {k: v * 1e3 for k, v in fig.items() if k.endswith("_s")}
    found = [(f"{name}: HTTP p50 <= 5 ms", ms["http_p50_s"] <= 5, f"{ms['http_p50_s']:.2f} ms"),
             (f"{name}: HTTP p99 <= 25 ms", ms["http_p99_s"] <= 25,
              f"{ms['http_p99_s']:.2f} ms"),
             (f"{name}: command p50 <= 30 ms", ms["cli_p50_s"] <= 30,
              f"{ms['cli_p50_s']:.2f} ms"),
             (f"{name}: CPU per submit process <= 40 ms", ms["cli_cpu_s"] <= 40,
              f"{ms['cli_cpu_s']:.1f} ms")]
    if "slurm_over_cli_p50" in fig:
        found.append((f"{name}: command >= 10x faster than sbatch (p50)",
                      fig["slurm_over_cli_p50"] >= 10, f"{fig['slurm_over_cli_p50']:.1f}x"))
    return found


def options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Goals: over HTTP p50 <= 5 ms, p99 <= 25 ms; the command "
                                       "p50 <= 30 ms and >= 10x faster than sbatch; <= 40 ms "
                                       "of CPU per `eventq jobs submit`.")
    p.add_argument("--jobs", type=int, default=200,
                   help="measured jobs over HTTP per phase (default 200)")
    p.add_argument("--cli-jobs", type=int, default=100,
                   help="measured `eventq jobs submit` processes per phase (default 100)")
    p.add_argument("--cpu-samples", type=int, default=31,
                   help="`python -c pass` and `eventq --version` runs per phase (default 31)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured jobs first (default 5)")
    p.add_argument("--gap", type=float, default=0.01,
                   help="idle seconds before each eventq submission (default 0.01)")
    p.add_argument("--load", type=int, default=0,
                   help="busy processes beside the server for a second, loaded phase")
    p.add_argument("--slurm", choices=["auto", "on", "off"], default="auto",
                   help="auto: use Slurm if sbatch is on PATH, starting its daemons with "
                        "slurm-local.sh if they are down; on: also install it with "
                        "slurm-local.sh if sbatch is missing; off: skip (default auto)")
    p.add_argument("--slurm-samples", type=int, default=31,
                   help="Slurm samples per phase (default 31)")
    p.add_argument("--slurm-gap", type=float, default=0.3,
                   help="idle seconds before each Slurm sample, plus a fraction (default 0.3)")
    p.add_argument("--slurm-script", type=Path, default=DEFAULT_SLURM_SCRIPT,
                   help=f"slurm-local.sh (default {DEFAULT_SLURM_SCRIPT})")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = p.parse_args(argv)
    if min(args.jobs, args.cli_jobs, args.cpu_samples, args.slurm_samples) < 1:
        p.error("--jobs, --cli-jobs, --cpu-samples and --slurm-samples must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
          f"{platform.machine()}")
    figures: dict[str, dict[str, float]] = {}
    with slurm_daemons(args.slurm_script, args.slurm) as why_not, \
            eventq_run(args.gap, args.warmup) as eq, slurm_run(args.slurm_gap) as sl:
        if why_not is not None:
            print(f"Slurm baseline unavailable: {why_not}")
        print(f"per phase: {args.jobs} jobs {JOB} over HTTP, {args.cli_jobs} by `eventq jobs "
              f"submit -- {' '.join(JOB)}`, {args.cpu_samples} CPU baselines"
              + (f", {args.slurm_samples} sbatch" if why_not is None else "")
              + ", one at a time, interleaved", flush=True)
        for load in sorted({0, args.load}):
            name = "quiet" if not load else f"{load} busy processes"
            with busy(load):
                got = run_phase(eq, sl if why_not is None else None, args)
            figures[name] = report(name, got)
    print(f"{POLL_PERIOD_S:.0f} s polling loop: expected wait {POLL_PERIOD_S / 2:.2f} s")
    print_goals([goal for name, fig in figures.items() for goal in goals(name, fig)])
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
