"""Server RSS per queued job, with what ``eventq jobs submit`` sends by default.

A real ``eventq server`` process (one simulated GPU, held by a first job that sleeps, so
every job after it waits in the queue) is sent ``--jobs`` submissions over HTTP, each the
exact body the CLI builds (``eventq.cli.jobs.submit_body``, fed by the CLI's own
parser): the command of a sweep, and by default the submitter's whole environment and
directory. The environment is a login shell's (~60 variables, ``LS_COLORS`` and a conda
``PATH`` among them) with two that differ per job, as a sweep's seed and run id do.

The figure is the server process's RSS growth per job (``VmRSS`` of
``/proc/PID/status`` before and after, each read once the server has settled: its CPU
time still for a second), after a warm-up of ``--warm`` jobs. The same with
``--no-export-env``, in the same run on a fresh server, is the baseline. Prints both,
their ratio, and the ratio to the 2 KB goal.

Run from the repository root: ``.venv/bin/python tools/bench_memory.py`` (~5 min quiet,
~15 at load average 8; ``--jobs 20000`` for a quick run; ``--load N``: N busy processes
beside the server while it is sent the jobs, a second pair of figures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventq.cli import jobs as cli_jobs
from eventq.cli import main as cli_main
from tools.bench_http import free_port
from tools.benchkit import busy, print_goals, stop_server, wait_for

GOAL_BYTES = 2048
USERS_HOME = "/home/alice"
#: The file extensions of a stock ``LS_COLORS`` (the longest variable of most shells).
COLOURED = ("tar tgz arc arj taz lha lz4 lzh lzma tlz txz tzo t7z zip z dz gz lrz lz lzo xz "
            "zst tzst bz2 bz tbz tbz2 tz deb rpm jar war ear sar rar alz ace zoo cpio 7z rz "
            "cab wim swm dwm esd jpg jpeg mjpg mjpeg gif bmp pbm pgm ppm tga xbm xpm tif "
            "tiff png svg svgz mng pcx mov mpg mpeg m2v mkv webm webp ogm mp4 m4v mp4v vob "
            "qt nuv wmv asf rm rmvb flc avi fli flv gl dl xcf xwd yuv cgm emf ogv ogx aac "
            "au flac m4a mid midi mka mp3 mpc ogg ra wav oga opus spx xspf")


def login_shell() -> dict[str, str]:
    """The environment of a developer's login shell on a GPU box: ~60 variables, ~3 KB."""
    conda = "/opt/conda/envs/train"
    env = {
        "SHELL": "/bin/bash", "HOME": USERS_HOME, "USER": "alice", "LOGNAME": "alice",
        "LANG": "en_US.UTF-8", "LANGUAGE": "en_US:en", "TERM": "xterm-256color",
        "COLORTERM": "truecolor", "PWD": f"{USERS_HOME}/src/train", "OLDPWD": USERS_HOME,
        "SHLVL": "2", "_": "/usr/bin/eventq", "HOSTNAME": "gpu-node-07", "EDITOR": "vim",
        "PAGER": "less", "LESS": "-R", "MAIL": "/var/mail/alice", "TZ": "Europe/Berlin",
        "PATH": f"{conda}/bin:/opt/conda/condabin:{USERS_HOME}/.local/bin:/usr/local/cuda/bin:"
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LD_LIBRARY_PATH": "/usr/local/cuda/lib64:/usr/local/nvidia/lib:/usr/local/nvidia/lib64",
        "CUDA_HOME": "/usr/local/cuda", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "8",
        "CONDA_EXE": "/opt/conda/bin/conda", "CONDA_PREFIX": conda,
        "CONDA_DEFAULT_ENV": "train", "CONDA_PROMPT_MODIFIER": "(train) ",
        "CONDA_SHLVL": "1", "CONDA_PYTHON_EXE": "/opt/conda/bin/python",
        "PYTHONPATH": f"{USERS_HOME}/src/train:{USERS_HOME}/src/common",
        "PYTHONUNBUFFERED": "1", "VIRTUAL_ENV_DISABLE_PROMPT": "1",
        "HF_HOME": "/data/cache/huggingface", "TRANSFORMERS_CACHE": "/data/cache/hf/models",
        "TORCH_HOME": "/data/cache/torch", "WANDB_PROJECT": "diffusion-sweeps",
        "WANDB_ENTITY": "vision-team", "WANDB_DIR": "/data/wandb",
        "SSH_CONNECTION": "10.0.4.21 52144 10.0.7.7 22", "SSH_CLIENT": "10.0.4.21 52144 22",
        "SSH_TTY": "/dev/pts/3", "SSH_AUTH_SOCK": "/tmp/ssh-XXXXq1w2/agent.52144",
        "XDG_SESSION_ID": "4821", "XDG_RUNTIME_DIR": "/run/user/1001",
        "XDG_SESSION_TYPE": "tty", "XDG_SESSION_CLASS": "user",
        "XDG_DATA_DIRS": "/usr/local/share:/usr/share:/var/lib/snapd/desktop",
        "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1001/bus",
        "MOTD_SHOWN": "pam", "HISTSIZE": "100000", "HISTCONTROL": "ignoreboth",
        "GIT_EDITOR": "vim", "EVENTQ_URL": "http://gpu-head:8765",
        "MANPATH": "/opt/conda/share/man:/usr/local/share/man:/usr/share/man",
        "INFOPATH": "/usr/local/share/info", "LC_ALL": "en_US.UTF-8",
        "LC_CTYPE": "en_US.UTF-8", "DISPLAY": "localhost:10.0",
        "PS1": r"(train) \u@\h:\w\$ ",
        "LS_COLORS": ":".join(f"*.{ext}=01;3{i % 8}"
                              for i, ext in enumerate(COLOURED.split())),
    }
    return env


def per_job(env: dict[str, str], i: int) -> None:
    """What differs between two jobs of one sweep, in the shell that submits them."""
    env["SWEEP_SEED"] = str(i % 1000)
    env["WANDB_RUN_ID"] = f"sweep-{i:08x}"


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` is ``env`` for the block: the CLI reads the submitter's from it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Bodies:
    """The request bodies ``eventq jobs submit`` would send, one per job, encoded."""

    def __init__(self, export_env: bool, workdir: Path) -> None:
        words = ["jobs", "submit", "--", "python", "train.py", "--config", "sweep.yaml"]
        if not export_env:
            words.insert(2, "--no-export-env")
        self.args: Any = cli_main.parser("jobs", "submit").parse_args(words)
        self.command = list(self.args.command)
        self.env = login_shell()
        self.workdir = workdir
        self.encoder = msgspec.json.Encoder()

    def body(self, i: int) -> bytes:
        per_job(self.env, i)
        self.args.command = [*self.command, "--seed", str(i % 1000)]
        cwd = os.getcwd()
        os.chdir(self.workdir)  # the exported directory must exist on the server's machine
        try:
            with environment(self.env):
                body: bytes = self.encoder.encode(cli_jobs.submit_body(self.args))
                return body
        finally:
            os.chdir(cwd)


def start_server(data: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "eventq.cli.main", "server", "--data-dir",
                             str(data), "--port", str(port), "--gpus", "1xA100-80GB"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def settled_rss(pid: int) -> int:
    """The server's RSS in bytes once it has been idle (no CPU time) for a whole second."""
    seen = [cpu_ticks(pid)]

    def idle() -> bool:
        time.sleep(1.0)
        seen.append(cpu_ticks(pid))
        return seen[-1] == seen[-2]

    wait_for(idle, 120, "the server settling", step=0)
    return status_kb(pid, "VmRSS") * 1024


#: The job that holds the GPU while the measured ones wait.
BLOCKER = {"command": ["sleep", "1800"], "gpus": 1, "target": "local"}


async def hold_the_gpu(base: str, token: str) -> str:
    """The id of the job that now holds the GPU."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http, \
            http.post(base + "/api/queue/submit", json=BLOCKER) as resp:
        reply = await resp.json()
        if reply.get("status") != "running":
            raise RuntimeError(f"the job that holds the GPU did not start: {reply}")
        job_id: str = reply["job_id"]
        return job_id


async def cancel(base: str, token: str, job_id: str) -> None:
    """A stopped server leaves its jobs running: the one that held the GPU goes first."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http, \
            http.post(f"{base}/api/queue/{job_id}/cancel") as resp:
        await resp.read()


async def submit_all(url: str, token: str, bodies: Bodies, first: int, count: int,
                     clients: int) -> None:
    """``count`` submissions, ``clients`` at a time, each acknowledged (HTTP 200)."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    todo = iter(range(first, first + count))
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def client() -> None:
            for i in todo:
                async with http.post(url, data=bodies.body(i)) as resp:
                    payload = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"submission {i}: HTTP {resp.status}: "
                                           f"{payload[:300]!r}")

        await asyncio.gather(*(client() for _ in range(clients)))


def measure(export_env: bool, work: Path, args: argparse.Namespace, load: int) -> float:
    """Bytes of server RSS per queued job, on a fresh server."""
    data = work / f"data-{'env' if export_env else 'bare'}-{load}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(data, port)
    holder = None
    try:
        token_file = data / "admin.token"
        wait_for(lambda: proc.poll() is not None or token_file.exists(), 60,
                 "the server's token", step=0.05)
        if proc.poll() is not None:
            raise RuntimeError(f"eventq server exited with {proc.returncode}")
        token = token_file.read_text().strip()
        url = base + "/api/queue/submit"
        bodies = Bodies(export_env, work)
        wait_for(lambda: _answers(port), 60, "the server's first answer", step=0.05)
        holder = asyncio.run(hold_the_gpu(base, token))
        asyncio.run(submit_all(url, token, bodies, 0, args.warm, args.clients))
        before = settled_rss(proc.pid)
        t0 = time.perf_counter()
        with busy(load):
            asyncio.run(submit_all(url, token, bodies, args.warm, args.jobs, args.clients))
        took = time.perf_counter() - t0
        after = settled_rss(proc.pid)
        growth: float = (after - before) / args.jobs
        label = "CLI defaults (environment and directory)" if export_env else \
            "no environment (--no-export-env)"
        print(f"  {label:42s} RSS {before / 2**20:6.0f} -> "
              f"{after / 2**20:6.0f} MiB: {growth:6.0f} B per job  "
              f"({args.jobs / took:,.0f} submissions/s; body {len(bodies.body(0)):,} B)")
        return growth
    finally:
        if holder is not None and proc.poll() is None:
            asyncio.run(cancel(base, token, holder))
        stop_server(proc)


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--jobs", type=int, default=100_000, help="jobs measured (100,000)")
    p.add_argument("--warm", type=int, default=2_000, help="jobs before the first reading")
    p.add_argument("--clients", type=int, default=16, help="concurrent connections (16)")
    p.add_argument("--load", type=int, default=0,
                   help="busy processes beside the server for a second, loaded pair")
    args = p.parse_args()
    print(f"machine: nproc={os.cpu_count()} python={platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f}; {args.jobs:,} jobs after {args.warm:,}")
    work = Path(tempfile.mkdtemp(prefix="eventq-bench-memory-"))
    goals: list[tuple[str, bool, str]] = []
    try:
        for load in sorted({0, args.load}):
            print("quiet:" if not load else f"{load} busy processes:")
            bare = measure(False, work, args, load)
            kept = measure(True, work, args, load)
            print(f"  with the CLI's defaults / without: {kept / bare:.2f}; "
                  f"against the 2 KB goal: {kept / GOAL_BYTES:.2f}")
            goals.append((f"server RSS per queued job with the CLI's defaults <= 2 KB"
                          f"{' (loaded)' if load else ''}", kept <= GOAL_BYTES,
                          f"{kept:.0f} B ({kept / GOAL_BYTES:.2f} of the goal)"))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        print_goals(goals)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
