"""The operator page: workers, queue and recent jobs as server-rendered HTML.

No build step, no external assets, works with JavaScript off (a meta refresh keeps it live).
Every caller-supplied text goes through ``html.escape``. With API keys on, the page asks for a
key once and keeps it in an HttpOnly cookie; the JSON API itself never reads that cookie.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import time
import zipfile
from typing import Annotated
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from redis import Redis
from rq import Queue

from core import keys, models, records
from core.settings import Settings, api_key_list
from core.storage import StorageError, open_object, open_storage
from service import health, jobs
from service.auth import owner_for_key
from service.errors import JobExpired, JobNotFound, Unauthorized
from service.schemas import JobPublic

COOKIE = "distill_key"
PAGE_SIZE = 50
router = APIRouter(include_in_schema=False)

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1200px}
h1{font-size:1.3rem;margin:0 0 1rem} h2{font-size:1.05rem;margin:1.5rem 0 .5rem}
table{border-collapse:collapse;width:100%} td,th{padding:.3rem .5rem;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top} th{background:#f4f4f4} code{font-size:12px}
.bar{background:#eee;width:120px;height:10px;display:inline-block}
.bar span{background:#3a7;height:10px;display:block}
.succeeded{color:#176b2c}.failed{color:#b00020}.canceled{color:#777}.running{color:#1a5fb4}
.muted{color:#777} pre{background:#f6f6f6;padding:.6rem;overflow:auto;font-size:12px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, *, refresh: bool = True) -> HTMLResponse:
    meta = '<meta http-equiv="refresh" content="10">' if refresh else ""
    return HTMLResponse(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"{meta}<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


def _ui_owner(request: Request) -> str | None:
    """The owner for the page: public without keys; from the cookie with keys; None: log in."""
    settings: Settings = request.app.state.settings
    if not api_key_list(settings):
        return owner_for_key(settings, None)
    key = request.cookies.get(COOKIE)
    if not key:
        return None
    try:
        return owner_for_key(settings, key)
    except Unauthorized:
        return None


UiOwner = Annotated[str | None, Depends(_ui_owner)]


def _age(ts: dt.datetime | None) -> str:
    if ts is None:
        return ""
    seconds = max(time.time() - ts.timestamp(), 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _job_row(job: JobPublic) -> str:
    total = job.progress.total or 0
    fraction = job.progress.written / total if total else (1.0 if job.state.is_terminal else 0.0)
    rate = job.progress.images_per_second
    links = [f'<a href="/v1/jobs/{_e(job.id)}">json</a>']
    if job.archive is not None:
        links.append(f'<a href="/v1/jobs/{_e(job.id)}/preview.png">preview</a>')
        links.append(f'<a href="/v1/jobs/{_e(job.id)}/archive">archive</a>')
    classes = job.request.preset or ", ".join(job.request.labels or [])
    return (
        f'<tr><td><a href="/jobs/{_e(job.id)}"><code>{_e(job.id[:12])}</code></a></td>'
        f'<td class="{_e(job.state.value)}">{_e(job.state.value)}</td>'
        f"<td>{_e(classes[:80])}</td>"
        f'<td><span class="bar"><span style="width:{fraction * 100:.0f}%"></span></span> '
        f"{job.progress.written}/{total or '?'}</td>"
        f"<td>{_e(f'{rate:.1f}') if rate else ''}</td><td>{_e(_age(job.created_at))}</td>"
        f"<td>{' · '.join(links)}</td></tr>"
    )


def _login(error: str = "") -> HTMLResponse:
    message = f'<p class="failed">{_e(error)}</p>' if error else ""
    body = (
        "<h1>distill-service</h1><p>This service needs an API key.</p>"
        f"{message}<form method=post action=/ui/key><label>API key "
        "<input type=password name=key autocomplete=off required></label> "
        "<button>Open</button></form>"
    )
    return _page("distill-service", body, refresh=False)


@router.get("/", response_class=HTMLResponse)
def dashboard(
    request: Request,
    owner: UiOwner,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    if owner is None:
        return _login()
    settings: Settings = request.app.state.settings
    redis: Redis = request.app.state.redis
    workers = health.workers(redis, settings)
    depth = 0
    oldest = ""
    waited = 0.0
    for name in models.queues(settings):  # every model's queue
        queue = Queue(name, connection=redis)
        depth += queue.count
        first = queue.get_job_ids(0, 0)
        found = records.read(redis, keys.parent_of(first[0])) if first else None
        if found is not None and time.time() - found.created_at > waited:
            waited = time.time() - found.created_at
            oldest = f"{waited:.0f} s"
    page, next_cursor = jobs.list_page(
        redis,
        settings,
        owner=owner,
        state=None,
        limit=PAGE_SIZE,
        cursor=cursor,
        archive_url_for=lambda i: f"/v1/jobs/{i}/archive",
    )
    worker_rows = (
        "".join(
            f"<tr><td><code>{_e(w.name)}</code></td><td>{_e(w.device or '')}</td>"
            f"<td>{_e(w.alias or '')} {_e(w.model)}</td><td>{_e(w.state)}</td>"
            f"<td>{w.seconds_since_heartbeat:.1f} s ago</td></tr>"
            for w in workers
        )
        or '<tr><td colspan=5 class="muted">no worker has sent a heartbeat</td></tr>'
    )
    job_rows = "".join(_job_row(j) for j in page) or (
        '<tr><td colspan=7 class="muted">no jobs yet</td></tr>'
    )
    more = f'<p><a href="/?cursor={quote(next_cursor)}">older jobs →</a></p>' if next_cursor else ""
    body = (
        "<h1>distill-service</h1>"
        f"<p>Queue: <b>{depth}</b> waiting{f', oldest {_e(oldest)}' if oldest else ''}. "
        f'<a href="/metrics">metrics</a> · <a href="/docs">API docs</a></p>'
        "<h2>Workers</h2><table><tr><th>worker</th><th>device</th><th>model</th>"
        f"<th>state</th><th>heartbeat</th></tr>{worker_rows}</table>"
        "<h2>Recent jobs</h2><table><tr><th>job</th><th>state</th><th>classes</th>"
        "<th>progress</th><th>img/s</th><th>age</th><th>links</th></tr>"
        f"{job_rows}</table>{more}"
    )
    return _page("distill-service", body)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, owner: UiOwner) -> Response:
    if owner is None:
        return _login()
    settings: Settings = request.app.state.settings
    redis: Redis = request.app.state.redis
    try:
        job = jobs.fetch(redis, settings, job_id, owner=owner, archive_url="")
    except (JobNotFound, JobExpired) as exc:
        return _page("job", f"<h1>Job</h1><p>{_e(exc.detail)}</p>", refresh=False)
    summary = ""
    if job.archive is not None:
        try:
            # Reads only the zip's directory and the manifest, even from a remote store.
            with (
                open_object(open_storage(settings), keys.archive(job.id)) as handle,
                zipfile.ZipFile(handle) as zf,
            ):
                manifest = json.loads(zf.read("manifest.json"))
            counts = manifest.get("counts", {})
            model = manifest.get("model", {})
            summary = (
                "<h2>Manifest</h2><table>"
                f"<tr><th>images</th><td>{_e(counts.get('images'))} "
                f"({_e(counts.get('generated'))} generated, "
                f"{_e(counts.get('augmented'))} augmented)</td></tr>"
                f"<tr><th>classes</th><td>{_e(counts.get('classes'))}</td></tr>"
                f"<tr><th>model</th><td>{_e(model.get('model'))} on {_e(model.get('device'))} "
                f"({_e(model.get('dtype'))}, {_e(model.get('resolution'))} px)</td></tr>"
                f"<tr><th>sha256</th><td><code>{_e(job.archive.sha256)}</code></td></tr></table>"
                f'<h2>Preview</h2><p><img alt="preview of {_e(job.id)}" '
                f'src="/v1/jobs/{_e(job.id)}/preview.png" style="max-width:100%"></p>'
            )
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, StorageError):
            summary = '<p class="muted">archive not readable here</p>'
    error = (
        f'<p class="failed">{_e(job.error.type)}: {_e(job.error.detail)}</p>' if job.error else ""
    )
    request_json = json.dumps(job.request.model_dump(mode="json"), indent=2, ensure_ascii=False)
    body = (
        f'<p><a href="/">← all jobs</a></p><h1>Job <code>{_e(job.id)}</code></h1>'
        f"<table>{_job_row(job)}</table>{error}"
        f"<p>attempts {job.attempts}; worker <code>{_e(job.worker or '—')}</code>"
        f"{'; ' + _e(job.last_interruption) if job.last_interruption else ''}</p>"
        f"{summary}<h2>Request</h2><pre>{_e(request_json)}</pre>"
        f"{_shard_table(job)}"
    )
    return _page(f"job {job.id}", body, refresh=not job.state.is_terminal)


def _shard_table(job: JobPublic) -> str:
    if not job.shards:
        return "<h2>Shards</h2><p class=muted>This job runs in one piece.</p>"
    rows = "".join(
        f"<tr><td>{s.index}</td><td class={_e(s.state)}>{_e(s.state)}</td>"
        f"<td>{s.first_class}-{s.last_class}</td><td>{s.written}/{s.images}</td>"
        f"<td><code>{_e(s.worker or '—')}</code></td><td>{s.attempts}</td>"
        f"<td>{_e(s.error or s.last_interruption or '')}</td></tr>"
        for s in job.shards
    )
    return (
        f"<h2>Shards ({len(job.shards)})</h2><table><tr><th>#</th><th>state</th><th>classes</th>"
        f"<th>images</th><th>worker</th><th>attempts</th><th>note</th></tr>{rows}</table>"
    )


@router.post("/ui/key")
async def set_key(request: Request) -> Response:
    """The login form: checks the key, then keeps it in an HttpOnly cookie for the page."""
    settings: Settings = request.app.state.settings
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    key = (form.get("key") or [""])[0].strip()
    try:
        owner_for_key(settings, key)
    except Unauthorized:
        return _login("That key is not valid.")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", max_age=7 * 24 * 3600)
    return response
