"""``eventq server``: run the orchestrator and its HTTP API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from eventq.cli.client import CliError

#: Connections the kernel queues while the server is busy: after a restart every worker
#: reconnects within a few seconds, and a short queue (aiohttp's default is 128) drops
#: the rest, which then wait out TCP's SYN retries (1 s, 3 s, 7 s...) and their backoff.
LISTEN_BACKLOG = 4096

if TYPE_CHECKING:
    import ssl

    from aiohttp.web import Application, AppRunner

    from eventq.callbacks.notifier import CallbackSettings
    from eventq.server import Orchestrator
    from eventq.slurm import SlurmSettings

# The server's modules (aiohttp, the actors, asyncio, logging) load only when a server
# starts: every other command stays quick to launch.


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("server", parents=[common], help="run the orchestrator")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    s.add_argument("--gpus", help="0 for no local GPUs (CPU jobs only), or a simulated "
                                  "inventory, e.g. 4xA100-80GB (default: NVML)")
    s.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping a job")
    s.add_argument("--configs-dir", type=Path,
                   help="where config_name is looked up (default: DATA_DIR/configs)")
    s.add_argument("--log-cap-mb", type=float, default=64.0,
                   help="MiB of each attempt's stdout and stderr kept; older output is dropped")
    s.add_argument("--log-format", choices=["console", "json"], default="console",
                   help="json: one JSON object a line, the announcement on stdout too "
                        "(for journald, Loki, jq)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default="info", help="info writes a line for every action (submit, "
                                        "dispatch, exit, cancel, worker connected or lost, "
                                        "refused token); warning only what went wrong")
    s.add_argument("--metrics-listen", metavar="HOST:PORT", type=listen_address,
                   help="also serve GET /metrics, and nothing else, without a token on this "
                        "address (for Prometheus on a network you trust)")
    s.add_argument("--metrics-public", action="store_true",
                   help="answer GET /metrics on the main address without a token (anyone "
                        "who reaches it sees user names and the queue)")
    _network_arguments(s)
    s.add_argument("--notify-url", metavar="URL",
                   help="POST every job's end (status, exit code, times) to this http(s) URL "
                        "as JSON, retried with backoff; recorded in the log")
    s.add_argument("--on-finish", metavar="CMD",
                   help="run CMD (with sh -c) when a job ends, with EVENTQ_JOB_ID, "
                        "EVENTQ_STATUS, EVENTQ_EXIT_CODE, … in its environment")
    s.add_argument("--on-finish-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="stop an --on-finish command still running after this (default 60)")
    add_slurm_flags(s)
    s.set_defaults(run=run_server)


def _network_arguments(s: argparse.ArgumentParser) -> None:
    """How the server is reached: TLS, and the address it gives workers."""
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


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9101`` for IPv6) for ``--metrics-listen``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9101, 0.0.0.0:9101 or [::1]:9101)")
    return host, port


def run_server(args: argparse.Namespace) -> int:
    import asyncio

    from eventq import gpus, serverlog, tls
    from eventq.server import CannotStart, Orchestrator, default_data_dir

    try:  # before anything listens or is written
        tls_context = tls.server_context(args.tls_cert, args.tls_key)
        tls.check_exposure(args.host, tls_context is not None, args.insecure)
        tls.advertised_url(args.host, args.port, "https", args.advertise_url)
    except tls.TlsError as exc:
        raise CliError(str(exc)) from None
    serverlog.keep_writing()  # lines lost, never the queue (serverlog.Outlet)
    serverlog.configure(args.log_format, args.log_level)
    try:
        inventory = gpus.detect(args.gpus)
    except gpus.InventorySpecError as exc:
        raise CliError(str(exc)) from None
    if args.log_cap_mb <= 0:
        raise CliError("--log-cap-mb must be positive")
    orch = Orchestrator(args.data_dir or default_data_dir(), inventory,
                        grace_seconds=args.grace, configs_dir=args.configs_dir or Path(),
                        log_cap_bytes=int(args.log_cap_mb * 2**20),
                        callbacks=callback_settings(args), log_actions=True,
                        slurm=slurm_settings(args))
    listen = Listen(args.host, args.port, tls_context, args.advertise_url, args.tls_cert,
                    args.metrics_listen, args.metrics_public)
    try:
        asyncio.run(_serve(orch, listen, args.log_format))
    except CannotStart as exc:
        raise CliError(str(exc)) from None
    return 0


def callback_settings(args: argparse.Namespace) -> CallbackSettings:
    """``--notify-url``, ``--on-finish``: checked before anything starts."""
    from eventq.callbacks.notifier import CallbackSettings
    from eventq.callbacks.urls import url_problem

    if args.notify_url is not None and (why := url_problem(args.notify_url)):
        raise CliError(f"--notify-url {why}")
    if args.on_finish is not None and not args.on_finish.strip():
        raise CliError("--on-finish is empty: give the command to run when a job ends")
    if not args.on_finish_timeout > 0:
        raise CliError("--on-finish-timeout must be positive")
    return CallbackSettings(notify_url=args.notify_url, on_finish=args.on_finish,
                            on_finish_timeout=args.on_finish_timeout)


class Listen(NamedTuple):
    """Where and how the server listens."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    advertise_url: str | None
    cert: Path | None
    #: A second address that serves only /metrics, without a token.
    metrics: tuple[str, int] | None = None
    #: /metrics on the main address without a token.
    metrics_public: bool = False

    def urls(self, bound: int) -> tuple[str, str | None]:
        """The URL for clients on this machine, and the one advertised to other machines."""
        from eventq import tls

        scheme = "https" if self.tls else "http"
        advertised = tls.advertised_url(self.host, bound, scheme, self.advertise_url)
        return tls.local_url(self.host, bound, scheme, advertised), advertised

    def in_clear_beyond_loopback(self) -> bool:
        from eventq import tls

        return self.tls is None and not tls.is_loopback(self.host)


async def _serve(orch: Orchestrator, listen: Listen, log_format: str) -> None:
    import gc

    from eventq import tls
    from eventq.http import metrics
    from eventq.http.app import make_app
    from eventq.server import CannotStart

    orch.long_lived = True  # the replayed state lives as long as the server: see gcpause
    await orch.start()
    # Let young objects pile up more before a collection (full collections over a large
    # queue or fleet otherwise stall dispatch for 100 ms and more).
    gc.set_threshold(50_000, 20, 20)
    app = make_app(orch, metrics_public=listen.metrics_public)
    runners: list[AppRunner] = []
    metrics_url = None
    try:
        port = await _listen(runners, app, listen.host, listen.port, listen.tls)
        if listen.metrics is not None:
            host, wanted = listen.metrics
            bound = await _listen(runners, metrics.only(app), host, wanted, None)
            metrics_url = tls.local_url(host, bound, "http", None) + "/metrics"
    except CannotStart:
        await _close(runners)
        await orch.stop()  # running attempts keep running; the next start adopts them
        raise
    url, orch.advertise_url = listen.urls(port)
    # The certificate lets a client on this machine trust this very server by itself.
    # The certificate lets a worker Slurm starts trust this very server by itself too.
    cert = str(listen.cert.absolute()) if listen.cert else None
    orch.write_server_file(url, advertise_url=orch.advertise_url, metrics_url=metrics_url,
                           cert=cert)
    orch.start_provisioning(orch.advertise_url or url, cert)
    _announce(orch, url, listen, metrics_url, log_format)
    await _until_stopped()
    # End worker streams first (without "shutdown": workers keep their jobs and reconnect);
    # the HTTP runners wait for open handlers before they let the orchestrator stop.
    await orch.hub.close_all("the orchestrator is restarting", tell=False)
    await _close(runners)
    await orch.stop()


async def _listen(runners: list[AppRunner], app: Application, host: str, port: int,
                  tls_context: ssl.SSLContext | None) -> int:
    """Serve ``app`` on ``host:port``; the port bound (``port`` 0 picks one)."""
    from aiohttp import web

    from eventq.server import CannotStart

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runners.append(runner)
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls_context,
                          backlog=LISTEN_BACKLOG).start()
    except OSError as exc:
        raise CannotStart(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    bound: int = runner.addresses[0][1]
    return bound


async def _close(runners: list[AppRunner]) -> None:
    """The metrics listener first: it reads what the main application holds."""
    for runner in reversed(runners):
        await runner.cleanup()


async def _until_stopped() -> None:
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _announce(orch: Orchestrator, url: str, listen: Listen, metrics_url: str | None,
              log_format: str) -> None:
    """Where the server is, on stdout: a line of text, or of JSON with --log-format json."""
    if log_format == "json":
        _announce_json(orch, url, listen, metrics_url)
        return
    inv = orch.inventory
    gpu_text = f"{len(inv.gpus)} GPUs" + (" (simulated)" if inv.simulated else "") + \
        (f" — {inv.nvml_error}" if inv.nvml_error else "")
    print(f"eventq server on {url}  data: {orch.data_dir}  {gpu_text}", flush=True)
    if orch.advertise_url:
        print(f"workers on other machines connect to {orch.advertise_url}", flush=True)
    if metrics_url:
        print(f"metrics without a token on {metrics_url}", flush=True)
    if listen.metrics_public:
        print(f"{url}/metrics answers without a token (--metrics-public)", flush=True)
    if orch.provider is not None:
        s = orch.provider.settings
        print(f"workers through Slurm: partition {s.partition}, --gres {s.gres}, at most "
              f"{s.max_workers}, connecting to {orch.advertise_url or url}", flush=True)
    if listen.in_clear_beyond_loopback():
        print("warning: serving plain HTTP beyond loopback (--insecure): tokens cross the "
              "network in clear text", flush=True)


def _announce_json(orch: Orchestrator, url: str, listen: Listen,
                   metrics_url: str | None) -> None:
    import os

    from eventq import __version__, serverlog

    inv, out = orch.inventory, serverlog.to(sys.stdout, "json")
    out.info("listening", url=url, advertise_url=orch.advertise_url, metrics_url=metrics_url,
             metrics_public=listen.metrics_public, data_dir=str(orch.data_dir),
             gpus=len(inv.gpus), simulated=inv.simulated, nvml_error=inv.nvml_error,
             pid=os.getpid(), version=__version__)
    if listen.in_clear_beyond_loopback():
        out.warning("plain_http_beyond_loopback", detail="--insecure: tokens cross the "
                    "network in clear text")
