"""``eventq server``: run the orchestrator and its HTTP API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from eventq.cli.client import CliError

if TYPE_CHECKING:
    import ssl

    from eventq.server import Orchestrator
    from eventq.slurm import SlurmSettings

# The server's modules (aiohttp, the actors, asyncio, logging) load only when a server
# starts: every other command stays quick to launch.


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("server", parents=[common], help="run the orchestrator")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    s.add_argument("--gpus", help="a simulated inventory, e.g. 4xA100-80GB (default: NVML)")
    s.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping a job")
    s.add_argument("--configs-dir", type=Path,
                   help="where config_name is looked up (default: DATA_DIR/configs)")
    s.add_argument("--log-cap-mb", type=float, default=64.0,
                   help="MiB of each attempt's stdout and stderr kept; older output is dropped")
    s.add_argument("--log-format", choices=["console", "json"], default="console")
    s.add_argument("--tls-cert", type=Path, metavar="FILE",
                   help="serve HTTPS with this certificate chain (PEM), with --tls-key")
    s.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's private key")
    s.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP on a non-loopback --host (behind a TLS proxy, or "
                        "on a network you trust): tokens then cross it in clear text")
    s.add_argument("--advertise-url", metavar="URL",
                   help="how workers on other machines reach this server, e.g. "
                        "https://gpu-orch.example.com:8001 (default: this host's name when "
                        "--host is beyond loopback)")
    add_slurm_flags(s)
    s.set_defaults(run=run_server)


def add_slurm_flags(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group(
        "workers through Slurm", "start `eventq worker` as Slurm array tasks when waiting jobs "
        "fit no connected worker (SPEC 12); this machine needs sbatch, squeue, scancel and "
        "scontrol, and the Slurm nodes must reach the server (--host, --advertise-url)")
    g.add_argument("--slurm-partition", metavar="P", help="the partition to ask for workers")
    g.add_argument("--slurm-max-workers", type=int, default=4, metavar="N",
                   help="workers asked for or running at most (default 4)")
    g.add_argument("--slurm-gres", default="gpu:1", metavar="GRES",
                   help="each worker's GPUs, as sbatch --gres (default gpu:1; gpu:a100:2 also "
                        "labels the workers gpu_type=a100)")
    g.add_argument("--slurm-time", metavar="TIME",
                   help="each worker's time limit, as sbatch --time (default: the "
                        "partition's); workers take only jobs known to end before it")
    g.add_argument("--slurm-account", metavar="A", help="sbatch --account")
    g.add_argument("--slurm-extra", metavar="OPTIONS", default="",
                   help='more sbatch options, given with "=": --slurm-extra="--qos=high '
                        '--mem=32G"')
    g.add_argument("--slurm-idle-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="cancel a worker idle this long (default 60)")
    g.add_argument("--slurm-margin-time", type=float, default=60.0, metavar="SECONDS",
                   help="time kept free at the end of each worker's time limit (default 60)")
    g.add_argument("--slurm-worker-gpus", metavar="SPEC",
                   help="a simulated inventory for the workers, e.g. 1xA100-80GB (GRES GPUs "
                        "without a driver, tests; default: NVML on the node)")
    g.add_argument("--slurm-job-name", default="eventq", metavar="PREFIX",
                   help="prefix of the Slurm job names (default eventq): tells this server's "
                        "requests from others'")


def slurm_settings(args: argparse.Namespace) -> SlurmSettings | None:
    """The ``--slurm-*`` flags, checked; None without ``--slurm-partition``."""
    import shlex

    from eventq.slurm import SlurmSettings, SlurmSettingsError

    if args.slurm_partition is None:
        return None
    try:
        extra = tuple(shlex.split(args.slurm_extra))
        settings = SlurmSettings(
            args.slurm_partition, args.slurm_max_workers, args.slurm_gres, args.slurm_time,
            args.slurm_account, extra, args.slurm_idle_timeout, args.slurm_margin_time,
            args.slurm_worker_gpus, args.slurm_job_name)
        settings.check()
        if settings.worker_gpus:
            from eventq import gpus

            gpus.simulated(settings.worker_gpus)
    except (ValueError, SlurmSettingsError) as exc:
        raise CliError(str(exc)) from None
    return settings


def configure_logging(fmt: str) -> None:
    import logging

    import structlog

    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def run_server(args: argparse.Namespace) -> int:
    import asyncio

    from eventq import gpus, tls
    from eventq.server import CannotStart, Orchestrator, default_data_dir

    try:  # before anything listens or is written
        tls_context = tls.server_context(args.tls_cert, args.tls_key)
        tls.check_exposure(args.host, tls_context is not None, args.insecure)
        tls.advertised_url(args.host, args.port, "https", args.advertise_url)
    except tls.TlsError as exc:
        raise CliError(str(exc)) from None
    configure_logging(args.log_format)
    try:
        inventory = gpus.detect(args.gpus)
    except gpus.InventorySpecError as exc:
        raise CliError(str(exc)) from None
    if args.log_cap_mb <= 0:
        raise CliError("--log-cap-mb must be positive")
    orch = Orchestrator(args.data_dir or default_data_dir(), inventory,
                        grace_seconds=args.grace, configs_dir=args.configs_dir or Path(),
                        log_cap_bytes=int(args.log_cap_mb * 2**20),
                        slurm=slurm_settings(args))
    listen = Listen(args.host, args.port, tls_context, args.advertise_url, args.tls_cert)
    try:
        asyncio.run(_serve(orch, listen))
    except CannotStart as exc:
        raise CliError(str(exc)) from None
    return 0


class Listen(NamedTuple):
    """Where and how the server listens."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    advertise_url: str | None
    cert: Path | None

    def urls(self, bound: int) -> tuple[str, str | None]:
        """The URL for clients on this machine, and the one advertised to other machines."""
        from eventq import tls

        scheme = "https" if self.tls else "http"
        advertised = tls.advertised_url(self.host, bound, scheme, self.advertise_url)
        return tls.local_url(self.host, bound, scheme, advertised), advertised

    def in_clear_beyond_loopback(self) -> bool:
        from eventq import tls

        return self.tls is None and not tls.is_loopback(self.host)


async def _serve(orch: Orchestrator, listen: Listen) -> None:
    import asyncio
    import gc
    import signal

    from aiohttp import web

    from eventq.http.app import make_app

    orch.long_lived = True  # the replayed state lives as long as the server: see gcpause
    await orch.start()
    # Let young objects pile up more before a collection (full collections over a large
    # queue or fleet otherwise stall dispatch for 100 ms and more).
    gc.set_threshold(50_000, 20, 20)
    runner = web.AppRunner(make_app(orch), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, ssl_context=listen.tls)
    try:
        await site.start()
    except OSError as exc:
        from eventq.server import CannotStart

        await runner.cleanup()
        await orch.stop()  # running attempts keep running; the next start adopts them
        raise CannotStart(
            f"cannot listen on {listen.host}:{listen.port} ({exc.strerror or exc})") from None
    _listening(orch, listen, runner.addresses[0][1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # End worker streams first (without "shutdown": workers keep their jobs and reconnect);
    # the HTTP runner waits for open handlers before it lets the orchestrator stop.
    await orch.hub.close_all("the orchestrator is restarting", tell=False)
    await runner.cleanup()
    await orch.stop()


def _listening(orch: Orchestrator, listen: Listen, port: int) -> None:
    """Say where the server listens (``server.json``, stdout), and start what needs it."""
    url, orch.advertise_url = listen.urls(port)
    # The certificate lets a client on this machine (or a worker Slurm starts) trust this
    # very server by itself.
    cert = str(listen.cert.absolute()) if listen.cert else None
    orch.write_server_file(url, advertise_url=orch.advertise_url, cert=cert)
    orch.start_provisioning(orch.advertise_url or url, cert)
    _announce(orch, url, listen)


def _announce(orch: Orchestrator, url: str, listen: Listen) -> None:
    inv = orch.inventory
    gpu_text = f"{len(inv.gpus)} GPUs" + (" (simulated)" if inv.simulated else "") + \
        (f" — {inv.nvml_error}" if inv.nvml_error else "")
    print(f"eventq server on {url}  data: {orch.data_dir}  {gpu_text}", flush=True)
    if orch.advertise_url:
        print(f"workers on other machines connect to {orch.advertise_url}", flush=True)
    if orch.provider is not None:
        s = orch.provider.settings
        print(f"workers through Slurm: partition {s.partition}, --gres {s.gres}, at most "
              f"{s.max_workers}, connecting to {orch.advertise_url or url}", flush=True)
    if listen.in_clear_beyond_loopback():
        print("warning: serving plain HTTP beyond loopback (--insecure): tokens cross the "
              "network in clear text", flush=True)
