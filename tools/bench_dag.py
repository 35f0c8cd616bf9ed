"""CSV import of a wide DAG, and the hand-off from a dependency to its dependant.

(a) Import. A job-scheduler-v2 CSV of ``--rows`` jobs (default 10,000) with a wide
DAG: ``--roots`` roots (default 100), each with the same number of dependants
(99 by default), three parameter columns and an estimate. It is imported

- with ``eventq import`` (a process, as a user runs it: reading the file, one
  ``POST /api/queue/import`` where the server checks every row, until the reply), into a
  fresh ``eventq server``;
- through ``POST /api/queue/import`` alone: the request the command sends, built by
  its own code in this process and encoded before the clock starts, POSTed and timed
  to the reply (another fresh server); and, for comparison, the same jobs as
  ``POST /api/queue/batch`` submissions (a third server).

The baseline is job-scheduler-v2's own kind of import, measured in the same run: the
same rows (every cell, plus a status) into a ``jobs`` table and every dependency edge
into a ``job_dependencies`` table, with plain ``sqlite3``, in one transaction, in WAL
mode with ``synchronous=FULL`` (the durability eventq's log has: nothing is answered
before it is on disk). It runs as a process (``python -c``, reading the CSV, like
``db_util import``) against ``eventq import``, and in this process against the routes.
Ratio = eventq's rows/s / sqlite3's rows/s; goal >= 0.2 for ``eventq import``, the import
as a user runs it. The routes' ratios are context: where the time goes.

(b) Hand-off. A chain of ``--chain`` jobs (default 200), each depending on the one
before, imported with ``eventq import`` with limits raised. Every job is ``date
+%s%N`` (``CLOCK_REALTIME`` in ns, into its ``stdout.log``): that stamp is both when
the job started and when it ended (date exits right after printing). The gap of a
link is its job's stamp minus its dependency's stamp: the dependency's exit, the
end report, ``job_completed``, the gate opening, dispatch, the durable commit, and
the spawn of the next wrapper and ``date``. Goal: p99 <= 25 ms, quiet and with
``--load`` busy processes beside the server.

Each part runs its own server in a temporary directory, removed at the end.
Run from the repository root: ``.venv/bin/python tools/bench_dag.py`` (< 1 minute).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventq import jobscheduler as jsv2
from eventq.cli import bulk
from tools.bench_dispatch import server_argv
from tools.benchkit import (
    Api,
    busy,
    load_label,
    loads,
    percentile,
    print_goals,
    stop_server,
    wait_for,
)

EVENTQ = Path(sys.executable).with_name("eventq")
HEADER = ["JOBSCHEDULER_JOB_ID", "model", "lr", "seed", "JOBSCHEDULER_ESTIMATE_TIME",
          "JOBSCHEDULER_DEPENDS_ON"]
RAISED = {"max_concurrent": 100, "user_max_concurrent": 100, "local_job_max_concurrent": 100}
#: While imports are timed, the imported jobs (``true``) run one at a time beside them.
ONE_AT_A_TIME = {"max_concurrent": 1, "user_max_concurrent": 1, "local_job_max_concurrent": 1}

BASELINE = """
import csv, sqlite3, sys

def load(csv_path, db_path):
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    columns = ", ".join(f'"{c}" TEXT' for c in header)
    conn.execute(f"CREATE TABLE jobs ({columns}, JOBSCHEDULER_STATUS TEXT)")
    conn.execute("CREATE TABLE job_dependencies (job_id TEXT NOT NULL, depends_on TEXT "
                 "NOT NULL, PRIMARY KEY (job_id, depends_on))")
    job, deps = header.index("JOBSCHEDULER_JOB_ID"), header.index("JOBSCHEDULER_DEPENDS_ON")
    marks = ", ".join("?" * (len(header) + 1))
    with conn:
        conn.executemany(f"INSERT INTO jobs VALUES ({marks})",
                         [(*row, "pending") for row in rows])
        conn.executemany("INSERT INTO job_dependencies VALUES (?, ?)",
                         [(row[job], d) for row in rows for d in row[deps].split()])
    count = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    conn.close()
    return count

if __name__ == "__main__":
    print(load(sys.argv[1], sys.argv[2]))
"""


def write_dag(path: Path, rows: int, roots: int) -> None:
    """``roots`` roots, each with an equal share of the other rows depending on it."""
    per_root = rows // roots
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(HEADER)
        for r in range(roots):
            out.writerow([f"prep{r}", f"model{r}", "", "", "0.1", ""])
            for c in range(per_root - 1):
                out.writerow([f"train{r}_{c}", f"model{r}", f"{1e-5 * (c + 1):.5f}", str(c),
                              "0.5", f"prep{r}"])


def write_chain(path: Path, length: int) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["JOBSCHEDULER_JOB_ID", "JOBSCHEDULER_DEPENDS_ON"])
        for i in range(length):
            out.writerow([f"link{i}", f"link{i - 1}" if i else ""])


def eventq_cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
    done = subprocess.run([str(EVENTQ), *args, "--data-dir", str(data)], capture_output=True,
                          text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"eventq {' '.join(args)} failed: {done.stderr}")
    return done


def read_url(data: Path) -> str | None:
    """The server's address once ``server.json`` is complete (it is not written atomically)."""
    try:
        return str(json.loads((data / "server.json").read_text())["url"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def server(tmp: Path, name: str, limits: dict[str, int]) -> Iterator[tuple[Path, Api]]:
    """A fresh server with these limits; it is stopped, and every process its jobs left is
    ended, afterwards."""
    data = tmp / name / "data"
    data.mkdir(parents=True)
    log = open(tmp / name / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(server_argv(data), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def ready() -> str | None:
            if proc.poll() is not None:
                raise RuntimeError(f"eventq server exited with {proc.returncode}: "
                                   f"{(tmp / name / 'server.log').read_text()[-500:]}")
            return read_url(data) if (data / "admin.token").exists() else None

        url = wait_for(ready, 30, "eventq server start", step=0.02)
        api = Api(url, (data / "admin.token").read_text().strip())
        try:
            api.call("POST", "/api/queue/concurrency", limits)
            yield data, api
        finally:
            api.close()
    finally:
        stop_server(proc)
        log.close()
        for pid_file in data.glob("jobs/*/*/pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def import_request(csv_path: Path, command: str) -> dict[str, Any]:
    """The request ``eventq import FILE --command COMMAND`` sends, built by its own code."""
    args = SimpleNamespace(max_runtime=None, max_attempts=None, retry_on_failure=False,
                           no_export_env=False, export_env=False)
    return {"csv": csv_path.read_text(), "command": bulk._template(command),
            "file": csv_path.name, "named_args": False, "append": False, "target": "auto",
            **bulk._shared_fields(args)}  # type: ignore[arg-type]


def batch_bodies(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The same jobs as ``POST /api/queue/batch`` bodies (what the server makes of them)."""
    problems = jsv2.Problems()
    shared: dict[str, Any] = {k: request[k] for k in ("target", "cwd") if k in request}
    options = jsv2.Options(request["command"], file=request["file"], shared=shared)
    rows = jsv2.prepare(request["csv"], options, lambda names, ids: jsv2.Existing({}, {}),
                        problems)
    assert not problems.items, problems.lines()[:5]
    return jsv2.row_bodies(rows, options)


def byte_compile_eventq() -> None:
    """eventq's modules compiled, as ``pip install`` and any first run leave them. Where
    PYTHONDONTWRITEBYTECODE is set (as on the machines of docs/performance.md) nothing
    else writes them, and every ``eventq`` command would compile its modules again
    (~15 ms): a cost no installed copy has, and not the import's."""
    package = Path(bulk.__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True,
                   capture_output=True, timeout=120)
    print(f"  eventq byte-compiled ({package}/**/__pycache__, as an installed copy has it)")


def part_import(tmp: Path, rows: int, roots: int) -> dict[str, float]:
    csv_path = tmp / "sweep.csv"
    write_dag(csv_path, rows, roots)
    count = len(csv_path.read_text().splitlines()) - 1
    print(f"(a) import: {count} rows, {roots} roots with {count // roots - 1} dependants "
          f"each ({csv_path.stat().st_size / 2**20:.1f} MiB of CSV)", flush=True)

    byte_compile_eventq()
    baseline = tmp / "baseline.py"
    baseline.write_text(BASELINE)
    t0 = time.perf_counter()
    loaded = subprocess.run([sys.executable, str(baseline), str(csv_path), str(tmp / "p.db")],
                            capture_output=True, text=True, timeout=120, check=True)
    sqlite_process = time.perf_counter() - t0
    assert int(loaded.stdout) == count
    namespace: dict[str, Any] = {}
    exec(compile(BASELINE, "baseline", "exec"), namespace)
    t0 = time.perf_counter()
    assert namespace["load"](str(csv_path), str(tmp / "i.db")) == count
    sqlite_inproc = time.perf_counter() - t0

    with server(tmp, "cli", ONE_AT_A_TIME) as (data, _):
        t0 = time.perf_counter()
        reply = json.loads(eventq_cli(data, "import", str(csv_path), "--command", "true",
                                      "--format", "json").stdout)
        cli = time.perf_counter() - t0
        assert reply["count"] == count
    # The routes' figures are the server's: each body is encoded before the clock starts.
    request = import_request(csv_path, "true")
    routes = {}
    for path, body in (("/api/queue/import", request),
                       ("/api/queue/batch", {"jobs": batch_bodies(request)})):
        payload = json.dumps(body).encode()
        with server(tmp, path.rsplit("/", 1)[1], ONE_AT_A_TIME) as (_, api):
            t0 = time.perf_counter()
            answer = api.send("POST", path, payload)
            routes[path] = time.perf_counter() - t0
            assert answer["count"] == count
    route, batch = routes["/api/queue/import"], routes["/api/queue/batch"]

    def rate(seconds: float) -> float:
        return count / seconds

    print(f"  sqlite3, a process (python -c, CSV read, 1 transaction): {sqlite_process:.3f} s"
          f"  {rate(sqlite_process):>9,.0f} rows/s")
    print(f"  sqlite3, in this process:                              {sqlite_inproc:.3f} s"
          f"  {rate(sqlite_inproc):>9,.0f} rows/s")
    print(f"  eventq import (the command, to its reply):              {cli:.3f} s"
          f"  {rate(cli):>9,.0f} rows/s")
    print(f"  POST /api/queue/import (its request, to the reply):     {route:.3f} s"
          f"  {rate(route):>9,.0f} rows/s")
    print(f"  POST /api/queue/batch (the same jobs as JSON bodies):   {batch:.3f} s"
          f"  {rate(batch):>9,.0f} rows/s")
    return {"rows": count, "sqlite_process_s": sqlite_process, "sqlite_inproc_s": sqlite_inproc,
            "eventq_import_s": cli, "import_route_s": route, "batch_route_s": batch,
            "cli_ratio": sqlite_process / cli, "route_ratio": sqlite_inproc / route,
            "batch_ratio": sqlite_inproc / batch}


def stamp_of(data: Path, job_id: str) -> int | None:
    try:
        text = (data / "jobs" / job_id / "1" / "stdout.log").read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None


def part_chain(tmp: Path, length: int, warmup: int, load: int) -> dict[str, float]:
    """The hand-off, quiet and then with ``load`` busy processes beside the server."""
    figures: dict[str, float] = {}
    for count in loads(load):
        with busy(count):
            found = chain_gaps(tmp / f"load{count}", length, warmup, load_label(count))
        figures.update({(key if not count else f"loaded_{key}"): value
                        for key, value in found.items()})
    return figures


def chain_gaps(tmp: Path, length: int, warmup: int, label: str) -> dict[str, float]:
    tmp.mkdir()
    csv_path = tmp / "chain.csv"
    write_chain(csv_path, length)
    print(f"(b) hand-off, {label}: a chain of {length} jobs `date +%s%N`, limits raised; the "
          f"first {warmup} links are warm-up", flush=True)
    with server(tmp, "chain", RAISED) as (data, api):
        reply = json.loads(eventq_cli(data, "import", str(csv_path), "--command", "date +%s%N",
                                      "--gpus", "0", "--format", "json").stdout)
        ids = [job["job_id"] for job in reply["jobs"]]
        wait_for(lambda: api.call("GET", f"/api/jobs/{ids[-1]}")["status"] == "completed",
                 max(30.0, length * 0.5), "the end of the chain", step=0.05)
        failed = [j for j in ids if api.call("GET", f"/api/jobs/{j}")["status"] != "completed"]
        if failed:
            raise RuntimeError(f"{len(failed)} links did not complete")
        stamps = [stamp_of(data, j) for j in ids]
    if any(s is None for s in stamps):
        raise RuntimeError("a link left no stamp")
    gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(stamps)  # type: ignore[operator]
            ][warmup:]
    p50, p99 = percentile(gaps, 50), percentile(gaps, 99)
    print(f"  dependency's exit -> dependant's start: p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
          f"min {min(gaps):.2f} ms  max {max(gaps):.2f} ms  n={len(gaps)}")
    return {"gap_p50_ms": p50, "gap_p99_ms": p99, "gap_max_ms": max(gaps), "links": len(gaps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Goals: eventq import >= 0.2 x sqlite3's rows/s; "
                                       "hand-off p99 <= 25 ms.")
    p.add_argument("--rows", type=int, default=10_000, help="rows of the DAG (default 10000)")
    p.add_argument("--roots", type=int, default=100, help="roots of the DAG (default 100)")
    p.add_argument("--chain", type=int, default=200, help="links of the chain (default 200)")
    p.add_argument("--warmup", type=int, default=5, help="links not measured (default 5)")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.add_argument("--load", type=int, default=1,
                   help="busy processes beside the server for (b)'s loaded hand-off; 0: quiet "
                        "only (1)")
    p.add_argument("--only", choices=["import", "chain"], help="run only one part")
    args = p.parse_args(argv)
    if args.roots < 1 or args.rows < 2 * args.roots:
        p.error("--rows must be at least twice --roots")
    if args.chain < args.warmup + 2:
        p.error("--chain must be longer than --warmup + 1")
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()} "
          f"{platform.machine()} sqlite {sqlite3.sqlite_version}")
    tmp = Path(tempfile.mkdtemp(prefix="eventq-bench-dag-"))
    try:
        figures = part_import(tmp, args.rows, args.roots) if args.only != "chain" else {}
        if args.only != "import":
            figures.update(part_chain(tmp, args.chain, args.warmup, args.load))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    goals = []
    if "cli_ratio" in figures:
        print("ratios (eventq rows/s / sqlite3 rows/s):")
        print(f"  eventq import / sqlite3 process = {figures['cli_ratio']:.3f}")
        print("  (context, the server's part alone:)")
        print(f"  import route / sqlite3 in-process = {figures['route_ratio']:.3f}")
        print(f"  batch route / sqlite3 in-process = {figures['batch_ratio']:.3f}")
        goals.append(("eventq import >= 0.2 x sqlite3 (processes)", figures["cli_ratio"] >= 0.2,
                      f"{figures['cli_ratio']:.3f}"))
    for prefix, label in (("", "quiet"), ("loaded_", "loaded")):
        if f"{prefix}gap_p99_ms" in figures:
            p99 = figures[f"{prefix}gap_p99_ms"]
            goals.append((f"hand-off p99 <= 25 ms ({label})", p99 <= 25, f"p99 {p99:.2f} ms"))
    print_goals(goals)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
