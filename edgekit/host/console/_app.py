"""The console's Starlette application: pages, JSON for them, the live stream, actions.

Pages are small HTML shells; ``static/console.js`` fetches ``/api/...`` and renders them,
and fetches again when ``/api/stream`` (server-sent events) says a topic moved. Reading
needs no login; ``POST /actions/...`` needs a logged-in operator session and its CSRF token
(see :mod:`edgekit.host.console._auth`).
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edgekit.errors import EdgekitError
from edgekit.host.console import _data
from edgekit.host.console._actions import Submitter, build_request, parse_action
from edgekit.host.console._auth import COOKIE, Session, Sessions, verify_password
from edgekit.host.console._live import ChangeFeed
from edgekit.host.db import Store

__all__ = ["ConsoleContext", "create_app"]

log = logging.getLogger("edgekit.console")

STATIC = Path(__file__).parent / "static"
_HEARTBEAT_S = 15.0
_STREAM_TICK_S = 0.2
_FAILED_LOGIN_DELAY_S = 1.0
_MAX_FORM_BYTES = 16 * 1024
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'"
                               " 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none';"
                               " form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_PAGES = {"fleet": "Fleet", "device": "Device", "rollouts": "Rollouts", "models": "Models",
          "events": "Events", "login": "Operator login"}


@dataclass
class ConsoleContext:
    """What the application reads and acts through."""

    store: Store
    feed: ChangeFeed
    password_hash: str | None = None  # None: no login, read-only
    submitter: Submitter | None = None  # None: no broker, no actions
    sessions: Sessions = field(default_factory=Sessions)
    closing: threading.Event = field(default_factory=threading.Event)


def _session(ctx: ConsoleContext, request: Request) -> tuple[str, Session, bool]:
    sid = request.cookies.get(COOKIE)
    found = ctx.sessions.get(sid)
    if found is not None and sid is not None:
        return sid, found, False
    sid, session = ctx.sessions.new()
    return sid, session, True


def _with_cookie(response: Response, sid: str) -> Response:
    response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/")
    return response


def _same_origin(request: Request) -> bool:
    """A browser names the page's origin on a POST; it must be this server."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


async def _form(request: Request) -> dict[str, str]:
    """A small URL-encoded form body as a dict (the first value of each field); anything
    else, or a body over the cap, reads as an empty form (the checks then refuse it)."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return {}
    fields: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                             keep_blank_values=True):
        fields.setdefault(key, value)
    return fields


def _shell(page: str, attrs: dict[str, str] | None = None) -> str:
    data = "".join(f' data-{k}="{html.escape(v, quote=True)}"' for k, v in (attrs or {}).items())
    nav = "".join(f'<a href="{href}" data-nav="{name}">{label}</a>' for name, href, label in (
        ("fleet", "/", "Fleet"), ("rollouts", "/rollouts", "Rollouts"),
        ("models", "/models", "Models"), ("events", "/events", "Events")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgekit · {_PAGES[page]}</title>
<link rel="stylesheet" href="/static/vendor/uplot/uPlot.min.css">
<link rel="stylesheet" href="/static/console.css">
</head><body>
<header><span class="brand">edgekit</span><nav>{nav}</nav>
<span id="live" class="live" title="live updates">connecting</span>
<span id="who" class="who"></span></header>
<main id="app" data-page="{page}"{data}><p class="muted">loading…</p></main>
<script src="/static/vendor/uplot/uPlot.iife.min.js"></script>
<script src="/static/console.js"></script>
</body></html>"""


def create_app(ctx: ConsoleContext) -> Starlette:
    """The ASGI application over ``ctx``."""

    def page(name: str, attrs: Callable[[Request], dict[str, str]] | None = None
             ) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            sid, _session_, new = _session(ctx, request)
            response = HTMLResponse(_shell(name, attrs(request) if attrs else None),
                                    headers=_HEADERS)
            return _with_cookie(response, sid) if new else response
        return endpoint

    def api(build: Callable[[Request], Any]) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            try:
                body = build(request)
            except ValueError:
                return JSONResponse({"error": "bad query"}, status_code=400, headers=_HEADERS)
            if body is None:
                return JSONResponse({"error": "not found"}, status_code=404, headers=_HEADERS)
            return JSONResponse(body, headers=_HEADERS)
        return endpoint

    def session_info(request: Request) -> Response:
        sid, session, new = _session(ctx, request)
        response = JSONResponse({"operator": session.operator, "csrf": session.csrf,
                                 "login": ctx.password_hash is not None,
                                 "actions": ctx.submitter is not None}, headers=_HEADERS)
        return _with_cookie(response, sid) if new else response

    def events(request: Request) -> Any:
        q = request.query_params
        rollout = q.get("rollout")
        return _data.events_view(ctx.store, after=int(q.get("after") or 0),
                                 kind=q.get("kind") or None, device=q.get("device") or None,
                                 fleet=q.get("fleet") or None,
                                 rollout=int(rollout) if rollout else None,
                                 limit=int(q.get("limit") or 200))

    async def stream(request: Request) -> Response:
        async def changes() -> AsyncIterator[str]:
            seen, _ = ctx.feed.moved_since(0)
            yield f"event: hello\ndata: {json.dumps({'version': seen})}\n\n"
            quiet = 0.0
            while not ctx.closing.is_set() and not ctx.feed.stopped:
                version, moved = ctx.feed.moved_since(seen)
                if moved:
                    seen = version
                    quiet = 0.0
                    yield f"event: change\ndata: {json.dumps({'topics': moved})}\n\n"
                elif quiet >= _HEARTBEAT_S:
                    quiet = 0.0
                    yield ": heartbeat\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(_STREAM_TICK_S)
                quiet += _STREAM_TICK_S

        return StreamingResponse(changes(), media_type="text/event-stream",
                                 headers={**_HEADERS, "X-Accel-Buffering": "no"})

    async def login(request: Request) -> Response:
        sid, session, _new = _session(ctx, request)
        form = await _form(request)
        if not _same_origin(request) or not session.check_csrf(str(form.get("csrf_token", ""))):
            return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403,
                                headers=_HEADERS)
        password = str(form.get("password", ""))
        if ctx.password_hash is None or not verify_password(ctx.password_hash, password):
            await asyncio.sleep(_FAILED_LOGIN_DELAY_S)  # slows down guessing
            log.warning("console: a login failed")
            return RedirectResponse("/login?failed=1", status_code=303, headers=_HEADERS)
        new_sid, _ = ctx.sessions.login(sid)
        log.info("console: an operator logged in")
        return _with_cookie(RedirectResponse("/", status_code=303, headers=_HEADERS), new_sid)

    async def logout(request: Request) -> Response:
        sid, session, _new = _session(ctx, request)
        form = await _form(request)
        if not _same_origin(request) or not session.check_csrf(str(form.get("csrf_token", ""))):
            return JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403,
                                headers=_HEADERS)
        ctx.sessions.drop(sid)
        return RedirectResponse("/", status_code=303, headers=_HEADERS)

    async def action(request: Request) -> Response:
        kind = request.path_params["kind"]
        session = ctx.sessions.get(request.cookies.get(COOKIE))
        form = await _form(request)
        token = request.headers.get("x-csrf-token") or str(form.get("csrf_token", ""))
        if session is None or not session.operator:
            return JSONResponse({"ok": False, "error": "log in as the operator first"},
                                status_code=403, headers=_HEADERS)
        if not _same_origin(request) or not session.check_csrf(token):
            return JSONResponse({"ok": False, "error": "missing or wrong CSRF token"},
                                status_code=403, headers=_HEADERS)
        if ctx.submitter is None:
            return JSONResponse({"ok": False, "error": "this console has no broker to reach"
                                 " the controller"}, status_code=503, headers=_HEADERS)
        try:
            parsed = parse_action(kind, form)
            request_doc = build_request(parsed)
            submitter = ctx.submitter
            rollout = await asyncio.to_thread(submitter.submit, parsed.fleet, request_doc)
        except EdgekitError as exc:
            return JSONResponse({"ok": False, "error": exc.message, "hint": exc.hint},
                                status_code=400 if exc.exit_code == 2 else 409,
                                headers=_HEADERS)
        log.info("console: operator action %s on fleet %s: rollout %s", kind, parsed.fleet,
                 rollout.get("id"))
        return JSONResponse({"ok": True, "rollout": rollout}, headers=_HEADERS)

    routes = [
        Route("/", page("fleet")),
        Route("/device/{fleet}/{device}", page("device", lambda r: {
            "fleet": r.path_params["fleet"], "device": r.path_params["device"]})),
        Route("/rollouts", page("rollouts")),
        Route("/models", page("models")),
        Route("/events", page("events")),
        Route("/login", page("login")),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/actions/{kind}", action, methods=["POST"]),
        Route("/api/session", session_info),
        Route("/api/fleet", api(lambda r: _data.fleet_view(ctx.store))),
        Route("/api/device/{fleet}/{device}", api(lambda r: _data.device_view(
            ctx.store, r.path_params["fleet"], r.path_params["device"],
            window_s=float(r.query_params.get("window") or 1800)))),
        Route("/api/rollouts", api(lambda r: _data.rollouts_view(ctx.store))),
        Route("/api/models", api(lambda r: _data.models_view(ctx.store))),
        Route("/api/events", api(events)),
        Route("/api/stream", stream),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)
