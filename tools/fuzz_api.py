"""Fuzz a real eventq server with schemathesis, as every kind of caller, and count.

    .venv/bin/python tools/fuzz_api.py [--requests 10000] [--seed S] [--no-streams]

Starts an orchestrator (4 simulated GPUs, a fresh data directory) behind a real aiohttp
server on loopback, then sends requests generated from its own ``/api/openapi.json``
(tools/fuzzkit.py says what is sent and checked) until at least ``--requests`` were made.
Prints the requests made, the 5xx answers, the schema violations (undocumented statuses,
media types or bodies, events of a stream, accepted invalid data, refusals that recorded
something), the statuses seen, and the first problems found. Exits 1 if there was any
5xx or violation, or if a fuzzed job was started on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from eventq import events as ev
from eventq import gpus
from eventq.http.app import make_app
from eventq.http.openapi import OPERATIONS
from eventq.server import Orchestrator
from tools import fuzzkit


def examples_for(requests: int) -> int:
    """Examples per operation and mode, for each caller it is meant for, that make about
    ``requests`` (the others send one valid request each)."""
    per_example = others = 0
    for op in OPERATIONS:
        if op.path in fuzzkit.NOT_FUZZED:
            continue
        meant = len(fuzzkit.MEANT_FOR[op.who])
        modes = 2 if op.body is not None or op.params else 1
        per_example += meant * modes
        others += len(fuzzkit.CALLERS) - meant
    # Small operations run out of distinct examples, and streams are read a few times only:
    # a sixth more examples makes the count in one sweep.
    return max(1, math.ceil(1.15 * (requests - others) / per_example))


async def fuzz(data_dir: Path, requests: int, seed: int, streams: bool) -> int:
    examples = examples_for(requests)
    orch = Orchestrator(data_dir, gpus.detect("4xA100-80GB"))
    await orch.start()
    runner = web.AppRunner(make_app(orch))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        served = {(r.method, r.resource.canonical) for r in runner.app.router.routes()
                  if r.method != "HEAD" and r.resource is not None}
        run = fuzzkit.Fuzz(orch, f"http://127.0.0.1:{port}", served,
                           fuzzkit.user_callers(orch), examples=examples, seed=seed,
                           streams=streams)
        began = time.monotonic()
        tally = await asyncio.to_thread(run.run, requests)
        took = time.monotonic() - began
        here = [r for r in await orch.log.read(limit=10**7)
                if isinstance(r.event, ev.AttemptDispatched) and r.event.node == "local"]
    finally:
        await runner.cleanup()
        await orch.stop()
    print(f"requests made: {tally.requests}")
    print(f"5xx: {len(tally.server_errors)}")
    print(f"schema violations: {len(tally.violations)}")
    print(f"jobs started on this machine: {len(here)}")
    print("statuses: " + " ".join(f"{c}:{n}" for c, n in sorted(tally.statuses.items())))
    print(f"time: {took:.0f} s ({tally.requests / took:.0f} requests/s), "
          f"{examples} examples per operation and mode, seeds {seed} to {run.seed}")
    if tally.server_errors or tally.violations:
        print("\nproblems:\n" + tally.problems(20))
    return 1 if tally.server_errors or tally.violations or here else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000,
                        help="make at least this many requests (sweeps with the next seed "
                             "until there are)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--no-streams", action="store_true",
                        help="leave out the event streams (each quiet one takes a second)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eventq-fuzz-") as tmp:
        return asyncio.run(fuzz(Path(tmp) / "data", args.requests, args.seed,
                                not args.no_streams))


if __name__ == "__main__":
    sys.exit(main())
