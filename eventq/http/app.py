"""Builds the aiohttp application around a started Orchestrator."""

from __future__ import annotations

from aiohttp import web

from eventq.http import (
    actions,
    admin,
    admin_workers,
    history,
    imports,
    jobs,
    listing,
    logs,
    metrics,
    openapi,
    queue,
    session,
    stream,
    system,
    ui,
    workers,
)
from eventq.http.common import OPEN_PATHS, ORCH, PUBLIC, guard
from eventq.server import Orchestrator


def make_app(orchestrator: Orchestrator, metrics_public: bool = False) -> web.Application:
    """The API around ``orchestrator``; ``metrics_public``: GET /metrics without a token."""
    # Large enough for a 100,000-row batch import; every body is still validated whole.
    app = web.Application(middlewares=[guard], client_max_size=64 * 2**20)
    app[ORCH] = orchestrator
    app[OPEN_PATHS] = PUBLIC | {"/metrics"} if metrics_public else PUBLIC
    app.add_routes(actions.routes)
    app.add_routes(queue.routes)
    app.add_routes(imports.routes)
    app.add_routes(jobs.routes)
    app.add_routes(system.routes)
    app.add_routes(admin.routes)
    app.add_routes(openapi.routes)
    metrics.install(app)
    app.add_routes(logs.routes)
    stream.setup(app)
    app.add_routes(workers.routes)
    app.add_routes(admin_workers.routes)
    session.setup(app)
    app.add_routes(history.routes)
    app.add_routes(listing.routes)
    app.add_routes(ui.routes)
    app[workers.PENDING] = {}
    return app
