"""A web console for meowmx (`meowmx web`, extra `meowmx[web]`): look, don't type.

Server-rendered pages on Starlette, with no asset from elsewhere (it works offline):
streams by category, one stream's events, the log following live, subscriptions with
their lag over the last minutes, dead letters, and the transactions holding the read
horizon back. Every figure comes from a meowmx SQL function, through an AsyncClient.
Read-only unless started with admin=True, which adds the requeue of dead letters.
Bad input (an unknown stream, a bad cursor) gets a page that says so, never a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import anyio.to_thread
import psycopg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from meowmx.client import AsyncClient, RecordedEvent
from meowmx.errors import MeowmxError, SubscriptionNotFound, describe
from meowmx.follower import Follower
from meowmx.output import HORIZON_HEADERS, duration, event_json, horizon_rows

log = logging.getLogger("meowmx.web")

PAGE_SIZE = 50
LAG_WINDOW = 600.0  # seconds of lag history the subscriptions page draws


class Console:
    """The console's state: its client, its mode, and what it has sampled: the lag, and
    the categories the statistics know (for the streams page's choices)."""

    def __init__(self, dsn: str, *, admin: bool = False, sample_every: float = 5.0):
        self.dsn = dsn
        self.admin = admin
        self.sample_every = sample_every
        self.client = AsyncClient(dsn)
        self.lag: dict[str, deque[tuple[float, int]]] = {}  # per subscription: (time, behind)
        self.categories: list[str] = []

    async def sample(self) -> None:
        """Sample meowmx.metrics() every sample_every seconds (one call)."""
        keep = int(LAG_WINDOW / self.sample_every) + 1
        while True:
            try:
                behind: dict[str, int] = {}
                categories = []
                for m in await self.client.metrics():
                    if m.metric == "meowmx_subscription_events_behind":
                        name = m.labels["subscription"]
                        behind[name] = behind.get(name, 0) + int(m.value)
                    elif m.metric == "meowmx_category_events_estimated":
                        categories.append(m.labels["category"])
                self.categories = sorted(categories)
                now = time.time()
                for name, count in behind.items():
                    self.lag.setdefault(name, deque(maxlen=keep)).append((now, count))
                for gone in self.lag.keys() - behind.keys():
                    del self.lag[gone]
            except (psycopg.Error, MeowmxError) as error:
                log.warning("meowmx web: cannot sample the lag: %s", describe(error))
            await asyncio.sleep(self.sample_every)


def app(dsn: str, *, admin: bool = False, sample_every: float = 5.0) -> Starlette:
    """The console's ASGI application, on the database at `dsn`."""
    console = Console(dsn, admin=admin, sample_every=sample_every)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        sampler = asyncio.create_task(console.sample())
        try:
            yield
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await console.client.close()

    def page(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            response: Response = await handler(console, request)
            return response

        return endpoint

    routes = [
        Route("/", page(overview)),
        Route("/streams", page(streams)),
        Route("/streams/{category}/{stream_id:path}", page(stream)),
        Route("/log", page(log_page)),
        Route("/log/live", page(log_live)),
        Route("/subscriptions", page(subscriptions)),
        Route("/subscriptions/{name}", page(subscription)),
        Route("/subscriptions/{name}/requeue", page(requeue), methods=["POST"]),
        Route("/horizon", page(horizon)),
    ]
    handlers: Any = {
        MeowmxError: _meowmx_error,
        psycopg.Error: _database_error,
        HTTPException: _http_error,
        Exception: _internal_error,
    }
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def serve(
    dsn: str,
    *,
    port: int = 8080,
    address: str = "127.0.0.1",
    admin: bool = False,
    sample_every: float = 5.0,
) -> None:
    """Run the console until SIGTERM or Ctrl-C (pages following the log live are cut
    after 5 s: they reconnect to the next console)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Stop, as uvicorn does, but do not raise the signal again after: a stop
            # asked for is a normal end (exit 0), as with the other meowmx commands.
            self.force_exit = self.should_exit
            self.should_exit = True

    config = uvicorn.Config(
        app(dsn, admin=admin, sample_every=sample_every),
        host=address,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    Server(config).run()


# Pages ------------------------------------------------------------------------------


async def overview(console: Console, request: Request) -> Response:
    figures: dict[str, float] = {}
    subscriptions: set[str] = set()
    for m in await console.client.metrics():
        figures[m.metric] = figures.get(m.metric, 0) + m.value
        if "subscription" in m.labels:
            subscriptions.add(m.labels["subscription"])
    rows = [
        ("schema version", int(figures.get("meowmx_schema_version", 0))),
        ("events (table statistics)", int(figures.get("meowmx_events", 0))),
        ("subscriptions", len(subscriptions)),
        (
            "events behind, all subscriptions",
            int(figures.get("meowmx_subscription_events_behind", 0)),
        ),
        ("parked events", int(figures.get("meowmx_subscription_parked", 0))),
        ("transactions holding the horizon back", int(figures.get("meowmx_horizon_blockers", 0))),
    ]
    mode = "admin: dead letters can be requeued" if console.admin else "read-only"
    return _page("Overview", f"<p class=mode>{_e(mode)}</p>" + _table(["", ""], rows))


async def streams(console: Console, request: Request) -> Response:
    category = request.query_params.get("category", "").strip()
    wanted = request.query_params.get("stream_id", "").strip()
    after = request.query_params.get("after") or None
    options = "".join(f"<option value='{_e(c)}'>" for c in console.categories)
    body = (
        "<form method=get action='/streams'>"
        f"<label>category <input name=category list=categories value='{_e(category)}'"
        " required></label> "
        f"<label>stream id <input name=stream_id value='{_e(wanted)}'></label> "
        f"<button>show</button><datalist id=categories>{options}</datalist></form>"
    )
    if not category:
        return _page("Streams", body + "<p>Pick a category.</p>")
    if wanted:
        if await console.client.stream_version(category, wanted):
            return RedirectResponse(_stream_url(category, wanted), status_code=303)
        body += (
            f"<p class=notice>No stream {_e(wanted)} in {_e(category)}; the streams after it:</p>"
        )
        after = wanted
    found = await console.client.list_streams(category, after=after, max_count=PAGE_SIZE)
    rows = [(_link(_stream_url(category, s.stream_id), s.stream_id), s.version) for s in found]
    body += _table(["stream id", "version"], rows, raw=[0]) if rows else "<p>No streams.</p>"
    if len(found) == PAGE_SIZE:
        body += _link(_url("/streams", category=category, after=found[-1].stream_id), "next page")
    return _page(f"Streams of {category}", body)


async def stream(console: Console, request: Request) -> Response:
    category, stream_id = request.path_params["category"], request.path_params["stream_id"]
    start = _positive(request, "from_version", 1)
    events = await console.client.read_stream_page(
        category, stream_id, from_version=start, max_count=PAGE_SIZE
    )
    if not events and start == 1:
        return _page("No such stream", f"<p>No stream {_e(stream_id)} in {_e(category)}.</p>", 404)
    body = _events_table(events)
    if len(events) == PAGE_SIZE:
        body += _link(_url(request.url.path, from_version=events[-1].version + 1), "next page")
    return _page(f"{category} / {stream_id}", body)


async def log_page(console: Console, request: Request) -> Response:
    """The log in commit order from `after` (empty: the beginning; default: now),
    then following live."""
    after = request.query_params.get("after", "end")
    if after == "end":
        after, events = await console.client.end_cursor(), []
    else:
        events = await console.client.read_events_page(after=after or None, max_count=PAGE_SIZE)
        after = events[-1].cursor if events else after
    intro = (
        "<p>Events in commit order, new ones added as they commit. "
        f"{_link('/log?after=', 'From the beginning')} · {_link('/log', 'from now')}</p>"
    )
    script = (
        "<script>const rows=document.getElementById('events');"
        f"const live=new EventSource('/log/live?after='+encodeURIComponent({_js(after)}));"
        "live.onmessage=m=>{const e=JSON.parse(m.data);const r=rows.insertRow(-1);"
        "r.className='new';for(const v of [e.position,e.category+' / '+e.stream_id,e.version,"
        "e.event_type,e.recorded_at,JSON.stringify(e.data)]){r.insertCell(-1).textContent=v;}"
        "document.getElementById('state').textContent='following: '+e.cursor;};"
        "live.onerror=()=>{document.getElementById('state').textContent='reconnecting';};"
        "</script>"
    )
    body = intro + f"<p id=state>following after {_e(after)}</p>" + _events_table(events, "events")
    return _page("Log", body + script)


async def log_live(console: Console, request: Request) -> Response:
    """Server-sent events: each event committed after `after`, as JSON, as it commits.
    Each carries its cursor as its id: a browser that reconnects sends the last one
    (Last-Event-ID) and goes on from there, with nothing twice."""
    after = request.headers.get("last-event-id") or request.query_params.get("after") or None
    await console.client.read_events_page(after=after, max_count=1)  # a bad cursor: 400 now

    async def events() -> AsyncIterator[str]:
        cursor = after
        with Follower(console.dsn, poll_interval=1.0) as follower:
            await anyio.to_thread.run_sync(follower.listen)  # before the first read
            while True:
                page = await console.client.read_events_page(after=cursor, max_count=100)
                for event in page:
                    yield f"id: {event.cursor}\ndata: {event_json(event)}\n\n"
                if page:
                    cursor = page[-1].cursor
                else:
                    await anyio.to_thread.run_sync(follower.wait)

    return StreamingResponse(events(), media_type="text/event-stream")


async def subscriptions(console: Console, request: Request) -> Response:
    status = await console.client.subscription_status()
    rows = [
        (
            _link(f"/subscriptions/{_q(p.subscription)}", p.subscription),
            p.partition,
            p.events_behind,
            p.lease_owner or "",
            p.attempts,
            p.parked,
            p.last_error or "",
        )
        for p in status
    ]
    headers = ["subscription", "partition", "behind", "lease owner", "attempts", "parked", "error"]
    body = (
        "<meta http-equiv=refresh content=5>"
        + _lag_chart(console)
        + (_table(headers, rows, raw=[0]) if rows else "<p>No subscriptions.</p>")
    )
    return _page("Subscriptions", body)


async def subscription(console: Console, request: Request) -> Response:
    name = request.path_params["name"]
    status = await console.client.subscription_status(name)
    parked = await console.client.list_parked(name)
    headers = ["partition", "checkpoint", "behind", "lease owner", "lease expires", "retry at"]
    rows = [
        (
            p.partition,
            p.checkpoint,
            p.events_behind,
            p.lease_owner or "",
            p.lease_expires_at,
            p.retry_at,
        )
        for p in status
    ]
    body = _table(headers, rows) + "<h2>Dead letters</h2>"
    if not parked:
        body += "<p>No parked events.</p>"
    else:
        dead = []
        for d in parked:
            action = (
                f"<form method=post action='/subscriptions/{_q(name)}/requeue'>"
                f"<input type=hidden name=position value={d.position}><button>requeue</button>"
                "</form>"
                if console.admin
                else ""
            )
            where = _link(_stream_url(d.category, d.stream_id), f"{d.category} / {d.stream_id}")
            dead.append(
                (
                    d.position,
                    where,
                    d.version,
                    _e(d.event_type),
                    d.attempts,
                    f"<pre>{_e(d.error or '')}</pre>",
                    _e(str(d.parked_at)),
                    action,
                )
            )
        body += _table(
            ["position", "stream", "version", "type", "attempts", "error", "parked at", ""],
            dead,
            raw=range(8),
        )
    return _page(f"Subscription {name}", body)


async def requeue(console: Console, request: Request) -> Response:
    name = request.path_params["name"]
    if not console.admin:
        return _page(
            "Read-only",
            "<p>This console is read-only: start it with --admin to requeue dead letters.</p>",
            403,
        )
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        # Another site's page posting to this console, through the operator's browser.
        return _page("Refused", "<p>A requeue must come from this console's own page.</p>", 403)
    form = parse_qs((await request.body()).decode())  # (form() would need python-multipart)
    try:
        position = int(form.get("position", [""])[0])
    except ValueError:
        return _page("Bad request", "<p>position must be an event position.</p>", 400)
    await console.client.requeue_parked(name, position)
    return RedirectResponse(f"/subscriptions/{_q(name)}", status_code=303)


async def horizon(console: Console, request: Request) -> Response:
    blockers = await console.client.horizon_blockers()
    intro = (
        "<p>Reads and subscriptions deliver nothing past the oldest transaction still"
        " running in the cluster. These hold it back, oldest first.</p>"
    )
    rows = horizon_rows(blockers)
    return _page("Horizon", intro + (_table(HORIZON_HEADERS, rows) if rows else "<p>None.</p>"))


# Errors -------------------------------------------------------------------------------


async def _meowmx_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, MeowmxError)
    status = 404 if isinstance(error, SubscriptionNotFound) else 400
    detail = f"<p>{_e(error.detail)}</p>" if error.detail else ""
    hint = f"<p class=hint>{_e(error.hint)}</p>" if error.hint else ""
    return _page("Not possible", f"<p>{_e(error.message)}</p>{detail}{hint}", status)


async def _database_error(request: Request, error: Exception) -> Response:
    log.warning("meowmx web: %s", describe(error))
    return _page("Database unavailable", f"<p>{_e(describe(error))}</p>", 503)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return _page(str(error.status_code), f"<p>{_e(error.detail)}</p>", error.status_code)


async def _internal_error(request: Request, error: Exception) -> Response:
    log.exception("meowmx web: %s %s failed", request.method, request.url.path)
    return _page("Internal error", "<p>The console failed on this page; its log says why.</p>", 500)


class _BadInput(HTTPException):
    def __init__(self, message: str):
        super().__init__(400, message)


# HTML -----------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
nav{background:#1d2330;padding:.6em 1.2em}
nav a{color:#e8ebf0;margin-right:1.2em;text-decoration:none}
nav b{color:#f0b429;margin-right:1.6em}main{padding:1em 1.6em}h1{font-size:1.35em}
table{border-collapse:collapse;background:#fff;margin:.6em 0}td,th{padding:.3em .7em;
border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}th{background:#eef0f4}
pre{margin:0;max-width:46em;white-space:pre-wrap;font-size:12px}.new{background:#fff7dc}
.notice,.hint{color:#7a5b00}.mode{color:#5b6473}svg{background:#fff;border:1px solid #e3e6eb}
input{padding:.25em}form{margin:.6em 0}
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    nav = "".join(
        f"<a href='{href}'>{name}</a>"
        for href, name in (
            ("/", "Overview"),
            ("/streams", "Streams"),
            ("/log", "Log"),
            ("/subscriptions", "Subscriptions"),
            ("/horizon", "Horizon"),
        )
    )
    return HTMLResponse(
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)} · meowmx"
        f"</title><style>{_STYLE}</style></head><body><nav><b>meowmx</b>{nav}</nav><main>"
        f"<h1>{_e(title)}</h1>{body}</main></body></html>",
        status_code=status,
    )


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], raw: Iterable[int] = ()) -> str:
    """A table; the cells of columns `raw` are HTML already, the rest are escaped."""
    trusted = set(raw)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{cell if i in trusted else _e('' if cell is None else str(cell))}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _events_table(events: Sequence[RecordedEvent], table_id: str = "stream") -> str:
    rows = [
        (
            e.position,
            _link(_stream_url(e.category, e.stream_id), f"{e.category} / {e.stream_id}"),
            e.version,
            _e(e.event_type),
            _e(str(e.recorded_at)),
            f"<pre>{_e(json.dumps(e.data, indent=1, ensure_ascii=False))}</pre>"
            + (f"<pre>{_e(json.dumps(e.metadata))}</pre>" if e.metadata else ""),
        )
        for e in events
    ]
    headers = ("position", "stream", "version", "type", "recorded at", "data")
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody id={table_id}>{body}</tbody></table>"


def _lag_chart(console: Console) -> str:
    """Events behind per subscription over the minutes sampled so far (at most
    LAG_WINDOW), as an inline SVG: one line each, with a dot per sample."""
    series = {name: list(points) for name, points in console.lag.items() if points}
    if not series:
        return "<p class=mode>The lag chart fills in as the console samples it.</p>"
    width, height, now = 640, 160, time.time()
    oldest = min(points[0][0] for points in series.values())
    span = max(10.0, now - oldest)
    top = max(1, *(count for points in series.values() for _, count in points))
    colours = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#1098ad"]
    marks, legend = [], []
    for n, (name, points) in enumerate(sorted(series.items())):
        colour = colours[n % len(colours)]
        xy = [
            (width - 8 - (width - 16) * (now - t) / span, height - 10 - (height - 20) * c / top)
            for t, c in points
        ]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        marks.append(f"<polyline fill=none stroke='{colour}' stroke-width=2 points='{line}'/>")
        marks.extend(f"<circle cx={x:.1f} cy={y:.1f} r=2.5 fill='{colour}'/>" for x, y in xy)
        legend.append(f"<span style='color:{colour}'>■</span> {_e(name)} ({points[-1][1]})")
    return (
        f"<p>Events behind over the last {duration(span)} (top of the chart: {top})</p>"
        f"<svg width={width} height={height} role=img aria-label='lag chart'>"
        f"<line x1=8 x2={width - 8} y1={height - 10} y2={height - 10} stroke='#c9ced6'/>"
        + "".join(marks)
        + "</svg><p>"
        + " · ".join(legend)
        + "</p>"
    )


def _positive(request: Request, name: str, default: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise _BadInput(f"{name} must be a positive integer, not {text!r}")
    return value


def _js(value: str) -> str:
    """A JavaScript string literal that cannot end the script element it is in."""
    return json.dumps(value).replace("<", "\\u003c")


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _q(text: str) -> str:
    return quote(text, safe="")


def _link(href: str, text: str) -> str:
    return f"<a href='{_e(href)}'>{_e(text)}</a>"


def _url(path: str, **params: Any) -> str:
    return f"{path}?{urlencode(params)}"


def _stream_url(category: str, stream_id: str) -> str:
    return f"/streams/{_q(category)}/{_q(stream_id)}"
