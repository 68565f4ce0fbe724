"""The spend dashboard at /dashboard: a static page that reads the admin API from the browser.

The page and its files hold no data, so they are served without a key; every number on the page
comes from `/admin/usage`, `/admin/usage/daily` and `/admin/keys`, called by the page with the
admin key the user typed (kept in the tab's sessionStorage, sent only in the Authorization header).
Everything ships inside the package, uPlot included (`scripts/vendor-uplot`): no CDN, no internet.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.staticfiles import StaticFiles

PAGE_PATHS = ("/dashboard", "/dashboard/")
ASSETS_PREFIX = "/dashboard/static/"

# The page runs only its own files and talks only to its own origin; nothing may frame it.
_PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def add_dashboard_routes(api: FastAPI) -> None:
    package = files("gateway.dashboard")
    page = (package / "index.html").read_bytes()  # outside static/: only ever served with its headers

    @api.get(PAGE_PATHS[0])
    @api.get(PAGE_PATHS[1])
    async def dashboard() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    assets = StaticFiles(directory=str(package / "static"))
    api.mount(ASSETS_PREFIX.rstrip("/"), assets, name="dashboard-static")
