"""What completion callbacks cost the queue, against the same queue without them, in one run.

A real orchestrator (temporary data directory, real clock, the real HTTP app on loopback)
whose local node runs one job at a time is given a batch of N jobs (``true``, no GPU) in one
request; the time from the reply until the last of them has completed is one sample. The
set-ups, their rounds interleaved so that a busy neighbour weighs on each alike:

- ``none``: no callbacks (the baseline);
- ``hung``: each job has a notify URL, and so has the server, whose receiver never answers,
  and ``--on-finish`` is ``sleep 600``: the worst a receiver and a hook can do;
- ``posted``: the same two URLs, answered at once (204), no hook;
- ``hook``: a hook that exits at once (``true``), no URL.

The receivers run in a process of their own, so their work is not charged to the server's
event loop (they share its CPUs, as a receiver on the same machine would). Each job's next
one starts only after it has ended, so a callback that held the queue would show as a ratio
far above 1; what ``posted`` and ``hook`` add is the CPU their work takes. Printed: the median
per set-up and its ratio to ``none``, and the hand-off latency (a job's recorded end to the
next one's recorded start, p50/p99), quiet and then with ``--load`` busy processes beside it.

Run from the repository root: ``.venv/bin/python tools/bench_callbacks.py [--jobs 200]
[--rounds 5] [--load 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventq import events as ev
from eventq import gpus
from eventq.callbacks.notifier import CallbackSettings
from eventq.http.app import make_app
from eventq.log import Record
from eventq.server import Orchestrator
from tools.benchkit import busy, load_label, loads, percentile

SERIAL = ev.Limits(max_concurrent=100, user_max_concurrent=100, local_job_max_concurrent=1)
SETUPS = ("none", "hung", "posted", "hook")

#: Two receivers in their own process: one answers at once, one never answers.
RECEIVERS = """
import asyncio, sys
from aiohttp import web

async def answer(_):
    return web.Response(status=204)

async def hang(_):
    await asyncio.Event().wait()

async def serve():
    for handler in (answer, hang):
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(serve())
"""


def settings(setup: str, urls: dict[str, str]) -> CallbackSettings:
    if setup in ("none", "hook"):
        return CallbackSettings(on_finish="true" if setup == "hook" else None)
    return CallbackSettings(notify_url=urls[setup] + "/server", post_timeout=600,
                            on_finish="sleep 600" if setup == "hung" else None)


async def sample(setup: str, jobs: int, urls: dict[str, str]) -> tuple[float, list[float]]:
    """Seconds from the batch's reply until its last job completed, and each hand-off: the
    seconds from one job's recorded end to the next one's recorded start."""
    with tempfile.TemporaryDirectory() as tmp:
        orch = Orchestrator(Path(tmp) / "data", gpus.detect("2xA100-80GB"), limits=SERIAL,
                            grace_seconds=1.0, callbacks=settings(setup, urls))
        await orch.start()
        ends: list[float] = []
        gaps: list[float] = []

        def hand_off(record: Record) -> None:
            if isinstance(record.event, ev.AttemptEnded):
                ends.append(record.time)
            elif ends:
                gaps.append(record.time - ends[-1])

        orch.log.subscribe(hand_off, (ev.AttemptEnded, ev.AttemptStarted))
        runner = web.AppRunner(make_app(orch))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        own = {"notify_url": urls[setup] + "/job"} if setup in urls else {}
        body = {"jobs": [{"command": ["true"], "gpus": 0, **own} for _ in range(jobs)]}
        try:
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{runner.addresses[0][1]}/api/queue/batch", json=body,
                    headers={"Authorization": f"Bearer {orch.admin_token}"}) as resp:
                ids = (await resp.json())["job_ids"]
            started = time.perf_counter()
            while any(orch.state.jobs[j].status != "completed" for j in ids):
                await asyncio.sleep(0.002)
            return time.perf_counter() - started, gaps
        finally:
            await runner.cleanup()
            await orch.stop()


async def main(jobs: int, rounds: int, load: int) -> None:
    receivers = subprocess.Popen([sys.executable, "-c", RECEIVERS], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    assert receivers.stdout is not None and receivers.stdin is not None
    ports = [receivers.stdout.readline().strip() for _ in range(2)]
    urls = {name: f"http://127.0.0.1:{port}/hook"
            for name, port in zip(("posted", "hung"), ports, strict=True)}
    try:
        for count in loads(load):
            with busy(count):
                await measure(jobs, rounds, urls, load_label(count))
    finally:
        receivers.stdin.close()
        receivers.wait(10)
        receivers.stdout.close()


async def measure(jobs: int, rounds: int, urls: dict[str, str], label: str) -> None:
    seconds: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    gaps: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    for _ in range(rounds):
        for setup, samples in seconds.items():
            took, hand_offs = await sample(setup, jobs, urls)
            samples.append(took)
            gaps[setup].extend(hand_offs)
    base = statistics.median(seconds["none"])
    print(f"{label}: {jobs} serial jobs, {rounds} rounds each; median seconds until the last "
          f"completed, and each job's end to the next one's start (recorded times)")
    for setup, samples in seconds.items():
        median = statistics.median(samples)
        print(f"  {setup:<7} {median:7.3f} s  ratio to none {median / base:5.2f}  hand-off "
              f"p50 {percentile(gaps[setup], 50) * 1e3:5.2f} ms p99 "
              f"{percentile(gaps[setup], 99) * 1e3:6.2f} ms  "
              f"(samples {', '.join(f'{s:.3f}' for s in samples)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load", type=int, default=1,
                        help="busy processes beside the server for the loaded figures; 0: "
                             "quiet only (1)")
    args = parser.parse_args()
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet
    asyncio.run(main(args.jobs, args.rounds, args.load))
