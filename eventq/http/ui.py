"""The web page: ``GET /`` (index.html) and ``GET /ui/{path}`` (its modules, styles, images).

Both are public: the page holds no data and asks for a sign-in itself. Only files of the
package's ``eventq/web`` folder are served: a path is resolved and must stay inside it, so
``..`` or a symbolic link cannot reach anything else, and a name outside the known types is
a 404 like a missing one.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from eventq.http.common import ApiError

routes = web.RouteTableDef()

WEB = Path(__file__).resolve().parent.parent / "web"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
         ".svg": "image/svg+xml", ".png": "image/png", ".txt": "text/plain",
         ".json": "application/json"}
#: The page's own files change with the package: a browser asks again each time (a 304
#: when nothing changed), so an upgrade never runs old modules against a new server.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                      "style-src 'self'; frame-ancestors 'none'",
           "Referrer-Policy": "no-referrer"}


def asset(name: str) -> Path:
    """The file ``name`` names inside the web folder; 404 for anything else."""
    try:
        path = (WEB / name).resolve()
        if path.is_relative_to(WEB) and path.suffix in TYPES and path.is_file():
            return path
    except (OSError, ValueError):  # a NUL, a name too long for the file system
        pass
    raise ApiError(404, "no such page file", "path")


def _file(path: Path) -> web.FileResponse:
    return web.FileResponse(path, headers={**HEADERS, "Content-Type": TYPES[path.suffix]})


@routes.get("/")
async def index(request: web.Request) -> web.FileResponse:
    return _file(asset("index.html"))


@routes.get("/ui/{path:.+}")
async def static(request: web.Request) -> web.FileResponse:
    return _file(asset(request.match_info["path"]))
