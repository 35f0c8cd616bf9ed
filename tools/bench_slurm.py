"""Workers through Slurm against Slurm alone, side by side in the same run.

(a) Submit-to-start of a job that needs a new worker: an ``eventq server --slurm-partition``
with no worker gets one job (``date +%s%N``, a list command); the clock starts just before
the submission and stops at the time the job's own process read (the same clock). This
counts the provider's reaction, Slurm's scheduling of the array task, the worker's start and
registration, and the dispatch; the tool waits until that worker has idled out and left
Slurm before the next sample, so each one starts from no worker. The log gives each part.
Beside it, ``sbatch --wrap 'date +%s%N'`` of the same command straight to Slurm.

(b) Throughput: N one-GPU ``true`` jobs drained on 2 slots. eventq: one batch of N jobs into
a server whose provider may start 2 one-GPU workers (``--slurm-max-workers 2``), timed from
the submission to the last completion, the workers' start included. Slurm alone: N
``sbatch --gres=gpu:1 --wrap true``, one after another as a script submits them, timed from
the first until Slurm lists none of them (slurm-local.sh's own benchmark does the same).
``--rounds R`` runs both sides R times in turn and reads the goal on the median ratio: on a
shared machine one round can land beside a neighbour's burst, and Slurm alone slows as its
finished jobs pile up (it keeps them for ``MinJobAge``), so that a single round's ratio
depends on when it ran. ``--settle S`` waits S idle seconds before each side of each round:
on an ext4 without a journal (the tool says so when its temporary directory is on one) a
file created within a minute of many deletions costs a scan past each freed inode, and
every side deletes what it made (the workers' attempt directories, Slurm's spool), so that
back-to-back rounds slow the ones after them, eventq's most (~7 files a job).

(c) ``--only cpu`` (no Slurm needed): the CPU a job costs on eventq's side, which the machine's
load does not change as it changes (b)'s seconds. A local ``eventq server`` and two
``eventq worker --gpus 1xA100-80GB`` processes drain N ``true`` jobs; each worker's CPU is
read from ``wait4`` when it has stopped (its own and every process it reaped: wrappers, jobs,
watchdogs), the server's from ``/proc`` over the drain.

(d) ``--only start`` (no Slurm needed): a worker's own start, as a Slurm task starts it
(``python -m eventq.cli.main worker``): seconds from its exec until the local server lists
it idle, and the CPU it spent until then (stopped at once), one new worker at a time.

``--load N`` runs N busy processes beside both sides (as ``bench_http.py`` does) for a
second, loaded figure after the quiet one.

Every Slurm job carries a name of this run's own; at the end they are cancelled, the
server stopped and the temporary directories removed. Slurm must be up (slurm-local.sh
install); others using it at the same time slow both sides alike.

Run from the repository root: ``.venv/bin/python tools/bench_slurm.py``.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import functools
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventq import events as ev
from tools.bench_dag import byte_compile_eventq
from tools.bench_dispatch import DEFAULT_SLURM_SCRIPT, slurm_daemons
from tools.benchkit import (
    Api,
    busy,
    journal_less_ext4,
    print_goals,
    read_stamp,
    stop_server,
    wait_for,
)

PARTITION = "debug"
JOB = ["date", "+%s%N"]
GOAL_RATIO = 5.0


def ours(name: str) -> list[str]:
    """Slurm jobs (pending, running, completing) whose name starts with ``name``."""
    out = subprocess.run(["squeue", "--noheader", "--format=%j"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [line for line in out.split() if line.startswith(name)]


def cancel(name: str) -> None:
    ids = subprocess.run(["squeue", "--noheader", "--format=%j %A"], capture_output=True,
                         text=True, timeout=30, check=False).stdout.splitlines()
    mine = [line.split()[1] for line in ids if line.startswith(name)]
    if mine:
        subprocess.run(["scancel", *mine], capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def eventq_server(root: Path, name: str, *flags: str) -> Iterator[tuple[Api, Path]]:
    """An ``eventq server`` whose provider asks Slurm for workers; its API and data dir."""
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "server.log", "wb") as log, \
            _server(data, "--slurm-partition", PARTITION, "--slurm-worker-gpus", "1xA100-80GB",
                    "--slurm-job-name", name, *flags, log=log) as (api, _):
        try:
            yield api, data
        finally:
            cancel(name)


@contextlib.contextmanager
def _server(data: Path, *flags: str, log: IO[bytes] | int = subprocess.DEVNULL
            ) -> Iterator[tuple[Api, str]]:
    """An ``eventq server`` on ``data`` with ``flags``, its limits out of the way; its API
    and URL."""
    exe = str(Path(sys.executable).with_name("eventq"))
    proc = subprocess.Popen([exe, "server", "--data-dir", str(data), "--port", "0", "--grace",
                             "1", "--log-format", "json", *flags], stdout=log,
                            stderr=subprocess.STDOUT, env=_env(), stdin=subprocess.DEVNULL,
                            start_new_session=True)
    api = None
    try:
        wait_for(lambda: proc.poll() is not None or (data / "server.json").exists(), 60,
                 "the server's start", step=0.02)
        if proc.poll() is not None:
            raise RuntimeError(f"eventq server exited ({proc.returncode}); see its log beside "
                               f"{data}")
        url = json.loads((data / "server.json").read_text())["url"]
        api = Api(url, (data / "admin.token").read_text().strip())
        api.call("POST", "/api/queue/concurrency", {"max_concurrent": 1000,
                                                    "user_max_concurrent": 1000})
        yield api, url
    finally:
        if api is not None:
            api.close()
        stop_server(proc)


def event_times(data: Path, job_id: str) -> dict[str, float]:
    """When the log saw each step of one job's start through a new worker."""
    with contextlib.closing(sqlite3.connect(f"file:{data / 'events.db'}?mode=ro",
                                            uri=True)) as db:
        rows = db.execute("SELECT time, body, v FROM events ORDER BY seq").fetchall()
    out: dict[str, float] = {}
    for t, body, v in rows:
        e = ev.decode(body, v)
        if isinstance(e, ev.JobSubmitted) and e.job.job_id == job_id:
            out["submitted"] = t
        elif isinstance(e, ev.WorkersRequested) and job_id in e.for_jobs:
            out["requested"], out["worker"] = t, e.workers[0]  # type: ignore[assignment]
        elif isinstance(e, ev.WorkerConnected) and e.worker_id == out.get("worker"):
            out.setdefault("connected", t)
        elif isinstance(e, ev.AttemptDispatched) and e.job_id == job_id:
            out["dispatched"] = t
    return out


def latency(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    name = f"eventq-bench-slurm-{os.getpid()}-a"
    rng = random.Random(1)
    eventq: list[float] = []
    parts: dict[str, list[float]] = {"provider": [], "slurm_and_worker": [], "dispatch": [],
                                     "process": []}
    with eventq_server(root / "a", name, "--slurm-idle-timeout", "0.5") as (api, data):
        for i in range(args.samples):
            wait_for(lambda: not ours(name), 60, "the last worker to leave Slurm", step=0.05)
            time.sleep(args.gap + rng.random())
            t0 = time.time_ns()
            job_id = api.call("POST", "/api/queue/submit",
                              {"command": JOB, "gpus": 1, "target": "worker"})["job_id"]
            out_file = data / "jobs" / job_id / "1" / "stdout.log"
            stamp = wait_for(lambda f=out_file: read_stamp(f), 120, f"eventq sample {i + 1}",
                             step=0.005)
            eventq.append((stamp - t0) / 1e9)
            seen = event_times(data, job_id)
            parts["provider"].append(seen["requested"] - seen["submitted"])
            parts["slurm_and_worker"].append(seen["connected"] - seen["requested"])
            parts["dispatch"].append(seen["dispatched"] - seen["connected"])
            parts["process"].append(stamp / 1e9 - seen["dispatched"])
    slurm = slurm_latency(args, root, rng)
    return {"eventq_s": eventq, "slurm_s": slurm,
            "eventq_parts_median_s": {k: statistics.median(v) for k, v in parts.items()}}


def slurm_latency(args: argparse.Namespace, root: Path, rng: random.Random) -> list[float]:
    name = f"eventq-bench-slurm-{os.getpid()}-s"
    tmp = root / "s"
    tmp.mkdir()
    out: list[float] = []
    try:
        for i in range(args.samples):
            time.sleep(args.gap + rng.random())
            stamp_file = tmp / f"start.{i}"
            t0 = time.time_ns()
            subprocess.run(["sbatch", "-Q", "-J", name, "-D", str(tmp), "-o", str(stamp_file),
                            "--gres=gpu:1", "--wrap", " ".join(JOB)], check=True,
                           capture_output=True, timeout=30)
            stamp = wait_for(lambda f=stamp_file: read_stamp(f), 120, f"Slurm sample {i + 1}",
                             step=0.002)
            out.append((stamp - t0) / 1e9)
            wait_for(lambda: not ours(name), 60, f"Slurm sample {i + 1} to end", step=0.02)
    finally:
        cancel(name)
    return out


def throughput(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    name = f"eventq-bench-slurm-{os.getpid()}-b"
    time.sleep(args.settle)
    with eventq_server(root / "b", name, "--slurm-max-workers", "2", "--slurm-gres", "gpu:1",
                       "--slurm-idle-timeout", "5") as (api, data):
        body = {"jobs": [{"command": ["true"], "gpus": 1, "target": "worker"}
                         for _ in range(args.jobs)]}
        t0, wall0 = time.monotonic(), time.time()
        api.call("POST", "/api/queue/batch", body)
        wait_for(lambda: api.call("GET", "/api/queue/stats")["by_status"].get("completed", 0)
                 >= args.jobs, 600, "eventq's jobs to drain", step=0.05)
        eventq_s = time.monotonic() - t0
        steps = drain_timeline(data, wall0)
        sync_ms = sync_latency(data)
    tmp = root / "bs"
    tmp.mkdir()
    sname = f"eventq-bench-slurm-{os.getpid()}-t"
    time.sleep(args.settle)
    try:
        t0 = time.monotonic()
        for _ in range(args.jobs):
            subprocess.run(["sbatch", "-Q", "-J", sname, "-D", str(tmp), "-o", "/dev/null",
                            "--gres=gpu:1", "--wrap", "true"], check=True, capture_output=True,
                           timeout=30)
        wait_for(lambda: not ours(sname), 600, "Slurm's jobs to drain", step=0.05)
        slurm_s = time.monotonic() - t0
    finally:
        cancel(sname)
    return {"eventq_s": eventq_s, "slurm_s": slurm_s, "timeline": steps, "sync_ms": sync_ms,
            "eventq_jobs_per_s": args.jobs / eventq_s, "slurm_jobs_per_s": args.jobs / slurm_s}


def sync_latency(directory: Path, count: int = 50) -> float:
    """Median milliseconds of one ``fdatasync`` of a 4 KiB write where the server's log is,
    right after the drain: each job's end and the next dispatch wait for one (the ``run``
    is sent once its ``AttemptDispatched`` is durable), so other work's writes on the same
    disk slow the drain."""
    times = []
    fd = os.open(directory / "sync-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"\0" * 4096)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        (directory / "sync-probe").unlink()
    return statistics.median(times) * 1e3


def drain_timeline(data: Path, t0: float) -> list[tuple[float, str]]:
    """(seconds after the submission, what) for each step of the drain: the server's log,
    Slurm's own log of the array (where it can be read) and each worker's first line."""
    with contextlib.closing(sqlite3.connect(f"file:{data / 'events.db'}?mode=ro",
                                            uri=True)) as db:
        rows = db.execute("SELECT time, body, v FROM events ORDER BY seq").fetchall()
    steps: list[tuple[float, str]] = []
    first: dict[str, str] = {}
    batches: list[str] = []
    last_end = 0.0
    for t, body, v in rows:
        e = ev.decode(body, v)
        said = _timeline_step(e, first, batches)
        if said:
            steps.append((t - t0, said))
        if isinstance(e, ev.AttemptEnded):
            last_end = t
    steps.append((last_end - t0, "last attempt ended"))
    steps += _slurm_steps(batches, t0) + _worker_steps(data / "slurm", t0)
    return sorted(steps)


def _timeline_step(e: ev.Event, first: dict[str, str], batches: list[str]) -> str | None:
    if isinstance(e, ev.JobSubmitted) and "submitted" not in first:
        first["submitted"] = e.job.job_id
        return "first job submitted (server)"
    if isinstance(e, ev.WorkersRequested):
        return f"WorkersRequested {e.request_id}: {len(e.workers)} worker(s)"
    if isinstance(e, ev.WorkersRequestSubmitted):
        batches.append(e.batch_id)
        return f"sbatch answered {e.batch_id}"
    if isinstance(e, ev.RequestedWorkerChanged):
        return f"squeue: task {e.task} {e.state} {e.detail}".rstrip()
    if isinstance(e, ev.WorkerConnected):
        return f"worker {e.worker_id} connected"
    if isinstance(e, ev.AttemptDispatched) and e.node not in first:
        first[e.node] = e.job_id
        return f"first dispatch to {e.node}"
    return None


def _slurm_steps(batches: list[str], t0: float) -> list[tuple[float, str]]:
    """Slurm's own lines about the arrays: slurmctld's (submitted, allocated) and slurmd's
    (each task's batch step launched), from their logs where this user may read them."""
    try:
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                              timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    files = {key: line.split("=", 1)[1].strip() for line in conf.splitlines()
             for key in ("SlurmctldLogFile", "SlurmdLogFile") if line.startswith(key)}
    ours = _log_lines(files.get("SlurmctldLogFile"),
                      lambda line: any(f"JobId={b}" in line for b in batches))
    # A task's own job id, as slurmd names it: "JobId=123_4(125)".
    tasks = {m[2]: f"{m[0]}_{m[1]}" for _, said in ours
             for m in re.findall(r"JobId=(\d+)_(\d+)\((\d+)\)", said)}
    launched = _log_lines(files.get("SlurmdLogFile"), lambda line: any(
        f"Launching batch job {t} " in line for t in tasks))
    return [(when - t0, f"slurmctld: {said[:90]}") for when, said in ours] + [
        (when - t0, f"slurmd: task {tasks.get(said.split()[3], '?')}: {said[:60]}")
        for when, said in launched]


def _log_lines(path: str | None, wanted: Callable[[str], bool]) -> list[tuple[float, str]]:
    """(epoch seconds, text) of a Slurm log's latest lines that ``wanted`` keeps."""
    if not path:
        return []
    try:
        lines = Path(path).read_text(errors="replace").splitlines()[-20000:]
    except OSError:
        return []
    out = []
    for line in lines:
        if not line.startswith("[") or not wanted(line):
            continue
        stamp, _, said = line[1:].partition("] ")
        with contextlib.suppress(ValueError):
            when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) \
                + float("0" + stamp[19:23])
            out.append((when, said))
    return out


def _worker_steps(output_dir: Path, t0: float) -> list[tuple[float, str]]:
    """Each worker's first line (its agent loaded and connecting), from its task's output."""
    out = []
    for path in sorted(output_dir.glob("*.out")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            line = path.read_text(errors="replace").splitlines()[0]
            stamp = line.split()[0].rstrip("Z")
            when = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) \
                + float("0" + stamp[19:26])
            out.append((when - t0, f"task {path.stem}: {' '.join(line.split()[1:4])}"))
    return out


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def local_server(data: Path) -> contextlib.AbstractContextManager[tuple[Api, str]]:
    """A local ``eventq server`` (no provider), its limits out of the way; its API and URL."""
    return _server(data)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}


def start_worker(data: Path, url: str, name: str, workdir: Path) -> subprocess.Popen[bytes]:
    """``eventq worker`` (one simulated GPU) of a new worker ``name`` of the server at
    ``data``, as Slurm's tasks start it (``python -m eventq.cli.main worker``)."""
    exe = str(Path(sys.executable).with_name("eventq"))
    added = subprocess.run([exe, "workers", "add", name, "--data-dir", str(data), "--format",
                            "json"], capture_output=True, text=True, env=_env(), check=True,
                           timeout=60).stdout
    return subprocess.Popen(
        [sys.executable, "-m", "eventq.cli.main", "worker", "--url", url, "--token",
         json.loads(added)["token"], "--gpus", "1xA100-80GB", "--data-dir", str(workdir),
         "--persistent", "--grace", "1", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        env=_env(), start_new_session=True)


def is_idle(api: Api, name: str) -> bool:
    return name in idle_workers(api)


def idle_workers(api: Api) -> set[str]:
    return {w["name"] for w in api.call("GET", "/api/admin/workers")["workers"]
            if w["status"] == "idle"}


def cpu_per_job(args: argparse.Namespace, root: Path) -> dict[str, float]:
    """(c): CPU seconds per job of the workers (with what they reaped) and of the server."""
    data = root / "c"
    workers: list[subprocess.Popen[bytes]] = []
    with local_server(data) as (api, url):
        try:
            workers += [start_worker(data, url, f"w{i}", root / f"w{i}") for i in range(2)]
            wait_for(lambda: len(idle_workers(api)) >= 2, 60, "the workers", step=0.05)
            server_pid = json.loads((data / "server.json").read_text())["pid"]
            before = proc_cpu(server_pid)
            api.call("POST", "/api/queue/batch", {"jobs": [
                {"command": ["true"], "gpus": 1, "target": "worker"}
                for _ in range(args.jobs)]})
            wait_for(lambda: api.call("GET", "/api/queue/stats")["by_status"].get(
                "completed", 0) >= args.jobs, 600, "the jobs to drain", step=0.05)
            server_s = proc_cpu(server_pid) - before
            worker_s = sum(_stopped_cpu(w) for w in workers)
        finally:
            for w in workers:
                if w.returncode is None:
                    w.kill()
                    w.wait()
    return {"workers_ms": worker_s / args.jobs * 1e3, "server_ms": server_s / args.jobs * 1e3}


def worker_start(args: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    """(d): seconds from a worker's exec to its registration, and the CPU it spent until
    then (stopped at once), one new worker at a time."""
    data = root / "d"
    out: dict[str, list[float]] = {"wall_s": [], "cpu_s": []}
    with local_server(data) as (api, url):
        for i in range(args.samples):
            time.sleep(args.gap)
            started = time.monotonic()
            worker = start_worker(data, url, f"s{i}", root / f"s{i}")
            try:
                wait_for(functools.partial(is_idle, api, f"s{i}"), 60, "the worker",
                         step=0.003)
                out["wall_s"].append(time.monotonic() - started)
                out["cpu_s"].append(_stopped_cpu(worker))
            finally:
                if worker.returncode is None:
                    worker.kill()
                    worker.wait()
    return out


def _stopped_cpu(worker: subprocess.Popen[bytes]) -> float:
    """Stop a worker; its CPU and that of every process it reaped."""
    worker.send_signal(signal.SIGINT)
    _, status, usage = os.wait4(worker.pid, 0)
    worker.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Goal: (b) eventq >= {GOAL_RATIO:g}x Slurm's jobs/s.")
    p.add_argument("--samples", type=int, default=7, help="latency samples each (default 7)")
    p.add_argument("--gap", type=float, default=0.5,
                   help="idle seconds before each sample, plus a random fraction (default 0.5)")
    p.add_argument("--jobs", type=int, default=500, help="jobs drained in (b) (default 500)")
    p.add_argument("--rounds", type=int, default=1,
                   help="(b) this many times, eventq and Slurm alone in turn; the goal is read "
                        "on the median ratio (default 1)")
    p.add_argument("--only", choices=["latency", "throughput", "cpu", "start"],
                   help="run one part only")
    p.add_argument("--load", type=int, default=0,
                   help="busy processes beside both sides for a second, loaded run")
    p.add_argument("--settle", type=float, default=0.0,
                   help="(b) idle seconds before each side of each round, so that what the "
                        "side before deleted no longer slows it on an ext4 without a journal "
                        "(65 covers it) (default 0)")
    p.add_argument("--slurm-script", type=Path, default=DEFAULT_SLURM_SCRIPT,
                   help=f"slurm-local.sh, to start Slurm if it is down ({DEFAULT_SLURM_SCRIPT})")
    args = p.parse_args(argv)
    byte_compile_eventq()  # the workers Slurm starts load eventq as an installed copy does
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
          f"load={os.getloadavg()[0]:.2f}", flush=True)
    device = journal_less_ext4(Path(tempfile.gettempdir()))
    if device is not None and args.only in (None, "throughput", "cpu"):
        print(f"note: {tempfile.gettempdir()} is on ext4 without a journal ({device}): a file "
              f"created within a minute of many deletions costs more, so back-to-back rounds "
              f"slow those that follow (--settle 65 waits that out; now {args.settle:g} s)",
              flush=True)
    with slurm_daemons(args.slurm_script, "auto") as why_not:
        if why_not is not None:
            print(f"cannot run: {why_not}")
            return 2
        for load in sorted({0, args.load}):
            root = Path(tempfile.mkdtemp(prefix="eventq-bench-slurm-"))
            try:
                with busy(load):
                    print(f"-- {'quiet' if not load else f'{load} busy processes'} "
                          f"(load {os.getloadavg()[0]:.2f})", flush=True)
                    report(args, root)
            finally:
                shutil.rmtree(root, ignore_errors=True)
        return 0


def throughput_report(args: argparse.Namespace, root: Path) -> tuple[str, bool, str]:
    """(b) ``--rounds`` times, eventq then Slurm alone in each: every round's figures, the
    timeline of the round of the median ratio, and the goal on that median (the two sides
    of a round share the minutes they ran in; rounds on a shared machine differ)."""
    rounds = []
    for number in range(args.rounds):
        thr = throughput(args, root / f"round{number}")
        ratio = thr["eventq_jobs_per_s"] / thr["slurm_jobs_per_s"]
        rounds.append((ratio, thr))
        print(f"(b) {args.jobs} one-GPU `true` jobs on 2 slots: eventq {thr['eventq_s']:.2f} s "
              f"({thr['eventq_jobs_per_s']:.1f} jobs/s, the workers' start included); Slurm "
              f"alone {thr['slurm_s']:.2f} s ({thr['slurm_jobs_per_s']:.1f} jobs/s); "
              f"ratio {ratio:.2f}; fdatasync where the log is, right after: median "
              f"{thr['sync_ms']:.2f} ms", flush=True)
    ratio, thr = sorted(rounds, key=lambda r: r[0])[(len(rounds) - 1) // 2]  # lower middle if even
    which = "" if args.rounds == 1 else f" (the median round, ratio {ratio:.2f})"
    print(f"    eventq's timeline{which}, seconds after the submission:")
    for at, what in thr["timeline"]:
        print(f"    {at:8.3f}  {what}")
    said = f"{ratio:.2f}x" + ("" if args.rounds == 1 else
                              f", median of {args.rounds} rounds: "
                              + ", ".join(f"{r:.2f}" for r, _ in rounds))
    return (f"(b) eventq >= {GOAL_RATIO:g}x Slurm's jobs/s", ratio >= GOAL_RATIO, said)


def report(args: argparse.Namespace, root: Path) -> int:
    goals: list[tuple[str, bool, str]] = []
    if args.only in (None, "latency"):
        lat = latency(args, root)
        e, s = statistics.median(lat["eventq_s"]), statistics.median(lat["slurm_s"])
        print(f"(a) submit-to-start, median of {args.samples}: eventq through a new Slurm "
              f"worker {e:.3f} s (min {min(lat['eventq_s']):.3f}, max "
              f"{max(lat['eventq_s']):.3f}); sbatch straight to Slurm {s:.3f} s (min "
              f"{min(lat['slurm_s']):.3f}, max {max(lat['slurm_s']):.3f}); ratio {e / s:.2f}")
        print("    eventq's parts (medians): " + ", ".join(
            f"{k} {v:.3f} s" for k, v in lat["eventq_parts_median_s"].items()))
    if args.only in (None, "throughput"):
        goals.append(throughput_report(args, root))
    if args.only == "cpu":
        cpu = cpu_per_job(args, root)
        print(f"(c) CPU per `true` job, {args.jobs} jobs on 2 local workers: workers and what "
              f"they reaped {cpu['workers_ms']:.2f} ms, server {cpu['server_ms']:.2f} ms")
    if args.only == "start":
        start = worker_start(args, root)
        wall, spent = start["wall_s"], start["cpu_s"]
        print(f"(d) a worker's start, exec to registered, median of {args.samples}: "
              f"{statistics.median(wall):.3f} s (min {min(wall):.3f}, max {max(wall):.3f}); "
              f"its CPU until then {statistics.median(spent):.3f} s")
    if goals:
        print_goals(goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
