"""GET /: the status page for people, a small static page that polls GET /status every second.

The page (status.html, next to this module) holds no data and needs no key; the /status
it reads does, and the page asks for one when that answers 401.
"""

from __future__ import annotations

import importlib.resources

from sanic import Blueprint, HTTPResponse, Request

bp = Blueprint("page")

PAGE = importlib.resources.files("allm.gateway").joinpath("status.html").read_bytes()


@bp.get("/")
async def page(request: Request) -> HTTPResponse:
    return HTTPResponse(
        PAGE,
        content_type="text/html; charset=utf-8",
        # The page changes with the server's version; a cached one could poll a /status it no longer reads.
        headers={"Cache-Control": "no-store"},
    )
