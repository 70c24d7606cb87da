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
    submitter: Submitter | None = None  # None: no broker or no operator key, no actions
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


_MAX_WINDOW_S = 7 * 86400.0


def _forbidden(error: str) -> Response:
    return JSONResponse({"ok": False, "error": error}, status_code=403, headers=_HEADERS)


class _Endpoints:
    """The application's endpoints over one :class:`ConsoleContext`."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx

    def page(self, name: str, attrs: Callable[[Request], dict[str, str]] | None = None
             ) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            sid, _session_, new = _session(self.ctx, request)
            response = HTMLResponse(_shell(name, attrs(request) if attrs else None),
                                    headers=_HEADERS)
            return _with_cookie(response, sid) if new else response
        return endpoint

    @staticmethod
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

    def session_info(self, request: Request) -> Response:
        sid, session, new = _session(self.ctx, request)
        response = JSONResponse({"operator": session.operator, "csrf": session.csrf,
                                 "login": self.ctx.password_hash is not None,
                                 "actions": self.ctx.submitter is not None}, headers=_HEADERS)
        return _with_cookie(response, sid) if new else response

    def device(self, request: Request) -> Any:
        window = float(request.query_params.get("window") or 1800)
        if not 60 <= window <= _MAX_WINDOW_S:
            raise ValueError("window out of range")
        return _data.device_view(self.ctx.store, request.path_params["fleet"],
                                 request.path_params["device"], window_s=window)

    def events(self, request: Request) -> Any:
        q = request.query_params
        rollout = q.get("rollout")
        return _data.events_view(self.ctx.store, after=int(q.get("after") or 0),
                                 kind=q.get("kind") or None, device=q.get("device") or None,
                                 fleet=q.get("fleet") or None,
                                 rollout=int(rollout) if rollout else None,
                                 limit=int(q.get("limit") or 200))

    async def stream(self, request: Request) -> Response:
        ctx = self.ctx

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

    async def login(self, request: Request) -> Response:
        sid, session, _new = _session(self.ctx, request)
        form = await _form(request)
        if not _same_origin(request) or not session.check_csrf(form.get("csrf_token")):
            return _forbidden("missing or wrong CSRF token")
        stored = self.ctx.password_hash
        if stored is None or not verify_password(stored, form.get("password", "")):
            await asyncio.sleep(_FAILED_LOGIN_DELAY_S)  # slows down guessing
            log.warning("console: a login failed")
            return RedirectResponse("/login?failed=1", status_code=303, headers=_HEADERS)
        new_sid, _ = self.ctx.sessions.login(sid)
        log.info("console: an operator logged in")
        return _with_cookie(RedirectResponse("/", status_code=303, headers=_HEADERS), new_sid)

    async def logout(self, request: Request) -> Response:
        sid, session, _new = _session(self.ctx, request)
        form = await _form(request)
        if not _same_origin(request) or not session.check_csrf(form.get("csrf_token")):
            return _forbidden("missing or wrong CSRF token")
        self.ctx.sessions.drop(sid)
        return RedirectResponse("/", status_code=303, headers=_HEADERS)

    async def action(self, request: Request) -> Response:
        kind = request.path_params["kind"]
        session = self.ctx.sessions.get(request.cookies.get(COOKIE))
        if session is None or not session.operator:
            return _forbidden("log in as the operator first")
        form = await _form(request)
        token = request.headers.get("x-csrf-token") or form.get("csrf_token")
        if not _same_origin(request) or not session.check_csrf(token):
            return _forbidden("missing or wrong CSRF token")
        submitter = self.ctx.submitter
        if submitter is None:
            return JSONResponse({"ok": False, "error": "this console sends no requests: it"
                                 " needs a broker and [console] operator_key"},
                                status_code=503, headers=_HEADERS)
        try:
            parsed = parse_action(kind, form)
            rollout = await asyncio.to_thread(submitter.submit, build_request(parsed))
        except EdgekitError as exc:
            return JSONResponse({"ok": False, "error": exc.message, "hint": exc.hint},
                                status_code=400 if exc.exit_code == 2 else 409,
                                headers=_HEADERS)
        log.info("console: operator action %s on fleet %s: rollout %s", kind, parsed.fleet,
                 rollout.get("id"))
        return JSONResponse({"ok": True, "rollout": rollout}, headers=_HEADERS)


def create_app(ctx: ConsoleContext) -> Starlette:
    """The ASGI application over ``ctx``."""
    e = _Endpoints(ctx)
    store = ctx.store
    return Starlette(routes=[
        Route("/", e.page("fleet")),
        Route("/device/{fleet}/{device}", e.page("device", lambda r: {
            "fleet": r.path_params["fleet"], "device": r.path_params["device"]})),
        Route("/rollouts", e.page("rollouts")),
        Route("/models", e.page("models")),
        Route("/events", e.page("events")),
        Route("/login", e.page("login")),
        Route("/login", e.login, methods=["POST"]),
        Route("/logout", e.logout, methods=["POST"]),
        Route("/actions/{kind}", e.action, methods=["POST"]),
        Route("/api/session", e.session_info),
        Route("/api/fleet", e.api(lambda r: _data.fleet_view(store))),
        Route("/api/device/{fleet}/{device}", e.api(e.device)),
        Route("/api/rollouts", e.api(lambda r: _data.rollouts_view(store))),
        Route("/api/models", e.api(lambda r: _data.models_view(store))),
        Route("/api/events", e.api(e.events)),
        Route("/api/stream", e.stream),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
