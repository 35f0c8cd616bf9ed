"""What keeping environments out of the log costs a submission: ratios in one run.

One ``eventq server`` process on loopback. (a) Durable submissions/s of a CPU job as
``eventq jobs submit`` sends it from a shell (its ~3 KB environment and directory, each
written to its own fsynced 0600 file) against the same job without them (nothing but the
log's group commit). (b) A batch of ``--rows`` such jobs (one environment file for the
whole batch) against the same batch without it. Jobs begin in a year, so none runs.

Run from the repository root: ``.venv/bin/python tools/bench_env.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.bench_http import free_port, rate, start_eventq, stop, wait_up


def shell_environment() -> dict[str, str]:
    """An environment of the size a developer's shell has (~3 KB, ~40 variables)."""
    env = dict(os.environ)
    for i in range(max(0, 40 - len(env))):
        env[f"VAR_{i}"] = "x" * 40
    return env


async def batch_seconds(url: str, headers: dict[str, str], body: object, tries: int) -> float:
    """The fastest of ``tries`` batch submissions, in seconds."""
    best = float("inf")
    async with aiohttp.ClientSession(headers=headers) as http:
        for _ in range(tries):
            start = time.perf_counter()
            async with http.post(url, json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"batch: HTTP {resp.status}")
            best = min(best, time.perf_counter() - start)
    return best


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="eventq-bench-env-"))
    port = free_port()
    server = start_eventq(work / "data", port)
    try:
        while not (work / "data" / "admin.token").exists():
            await asyncio.sleep(0.05)
        token = (work / "data" / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{port}"
        await wait_up(base + "/api/queue/stats", headers)
        plain = {"command": ["python", "train.py"], "gpus": 0, "begin_at": time.time() + 3e7}
        shell = {**plain, "exported_env": shell_environment(), "exported_cwd": os.getcwd()}
        print(f"{os.cpu_count()} cores; {args.clients} clients, {args.seconds:.0f} s per phase; "
              f"environment {len(str(shell['exported_env']))} B")
        bare = await rate("POST", base + "/api/queue/submit", plain, headers, args.clients,
                          args.seconds)
        kept = await rate("POST", base + "/api/queue/submit", shell, headers, args.clients,
                          args.seconds)
        print(f"submissions/s: {kept:.0f} with the environment, {bare:.0f} without: "
              f"ratio {kept / bare:.2f}")
        url = base + "/api/queue/batch"
        bare_b = await batch_seconds(url, headers, {"jobs": [plain] * args.rows}, args.tries)
        kept_b = await batch_seconds(url, headers, {"jobs": [shell] * args.rows}, args.tries)
        print(f"batch of {args.rows:,}: {kept_b * 1e3:.0f} ms with the environment, "
              f"{bare_b * 1e3:.0f} ms without: ratio {bare_b / kept_b:.2f} (speed)")
        return 0
    finally:
        stop(server)
        shutil.rmtree(work, ignore_errors=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="per phase")
    p.add_argument("--rows", type=int, default=5_000, help="jobs per batch")
    p.add_argument("--tries", type=int, default=3, help="batches of each kind")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
