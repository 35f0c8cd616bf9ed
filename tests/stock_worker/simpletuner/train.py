"""A stand-in trainer: ``python -m simpletuner.train`` as SimpleTuner's stock worker runs it.

It reads the JSON config at ``CONFIG_PATH`` (written by the worker from the job's
``config``) and does what the test wrote there:

- ``--eventq_record``: a file to which one JSON line ``{"pid", "config"}`` is appended
  when this trainer starts, so a test can count how often a job really ran;
- ``--eventq_release``: a path to wait for before finishing (at most
  ``--eventq_max_wait`` seconds, default 120), printing a line every 50 ms meanwhile:
  the stock worker reads its trainer's output line by line and would otherwise block;
- ``--eventq_exit_code``: the exit code to finish with (default 0).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    config = json.loads(Path(os.environ["CONFIG_PATH"]).read_text())
    record = config.get("--eventq_record")
    if record:
        with open(record, "a", encoding="utf-8") as out:
            out.write(json.dumps({"pid": os.getpid(), "config": config}) + "\n")
    release = config.get("--eventq_release")
    deadline = time.monotonic() + float(config.get("--eventq_max_wait", 120))
    step = 0
    while release and not Path(release).exists() and time.monotonic() < deadline:
        step += 1
        print(f"step {step}", flush=True)
        time.sleep(0.05)
    print("done", flush=True)
    return int(config.get("--eventq_exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
