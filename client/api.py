"""``Client``: the service's HTTP API as Python calls (httpx and the standard library only).

    with Client("http://127.0.0.1:8000") as distill:
        job = distill.submit(labels=["cat", "dog"], ipc=10, image_size=32)
        job = distill.wait(job, on_progress=lambda j: print(j["progress"]))
        distill.download(job, "dataset.zip")      # resumable, SHA-256 verified

Retries: connection failures and 429/503 answers are retried ``retries`` times with exponential
backoff (a ``Retry-After`` header sets the delay). A ``POST /v1/jobs`` is always sent with an
``Idempotency-Key`` (the same one on every retry of that call), so a retry after a lost answer
returns the job the first try made instead of making a second one. Other POSTs are only
retried when the request never reached the server.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack, cast
from urllib.parse import quote

import httpx

from client.errors import (
    ApiError,
    ChecksumMismatch,
    DownloadError,
    ServerUnreachable,
    WaitTimeout,
    parse_retry_after,
)
from client.types import TERMINAL_STATES, Job, Preset

__all__ = ["DEFAULT_URL", "Client", "JobPage", "build_spec"]

DEFAULT_URL = "http://127.0.0.1:8000"
VERSION = "0.1.0"
RETRY_STATUSES = frozenset({429, 503})
# Errors raised before a request left this machine: retrying any method is safe.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class JobPage:
    """One page of ``GET /v1/jobs``: jobs newest first, and the cursor of the next page."""

    jobs: list[Job]
    next_cursor: str | None


def _job_id(job: Job | Mapping[str, Any] | str) -> str:
    if isinstance(job, str):
        return job
    return str(job["id"])


def _job_path(job_id: str, suffix: str = "") -> str:
    if not job_id:
        raise ValueError("job id is empty")
    return f"/v1/jobs/{quote(job_id, safe='')}{suffix}"


def _etag_digest(value: str | None) -> str | None:
    if not value:
        return None
    return value.removeprefix("W/").strip().strip('"') or None


def _sha256_of(path: Path) -> hashlib._Hash:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return hasher


def _receive(
    response: httpx.Response,
    part: Path,
    offset: int,
    size: int | None,
    on_progress: Callable[[int, int | None], None] | None,
) -> tuple[hashlib._Hash, str | None] | None:
    """Write a 200 (from zero) or 206 (appended at ``offset``) body into ``part``.

    Returns the SHA-256 of the whole file and the response's ETag digest, or None when a 206
    does not start at ``offset`` (the ``.part`` is then removed)."""
    etag = _etag_digest(response.headers.get("etag"))
    if response.status_code == 206:
        if not response.headers.get("content-range", "").startswith(f"bytes {offset}-"):
            part.unlink(missing_ok=True)
            return None
        hasher = _sha256_of(part)
        mode = "ab"
    else:
        hasher = hashlib.sha256()
        mode = "wb"
        offset = 0
    total = size
    if total is None and response.status_code == 200:
        length = response.headers.get("content-length")
        total = int(length) if length and length.isdigit() else None
    done = offset
    with part.open(mode) as out:
        # As the bytes arrive (no re-chunking): what came before a cut is kept for the resume.
        for chunk in response.iter_bytes():
            out.write(chunk)
            hasher.update(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return hasher, etag


class SpecFields(TypedDict, total=False):
    """The request's fields as keyword arguments (``Client.submit`` and ``build_spec``)."""

    labels: Sequence[str] | None
    preset: str | None
    ipc: int | None
    budget_seconds: float | None
    image_size: int | None
    resolution: int | None
    decoder: str | None
    seed: int | None
    prompt_template: str | Sequence[str] | None
    prompts: Mapping[str, str] | Sequence[Mapping[str, str]] | None
    prompt_strategy: str | None
    augment: Mapping[str, Any] | None
    policy: str | Sequence[Mapping[str, Any]] | None
    copies: int | None
    crop_scale: float | None
    formats: Sequence[str] | None
    callback_url: str | None
    model: str | None
    steps: int | None
    guidance_scale: float | None
    method: str | None
    reference: str | None
    strength: float | None
    soft_labels: Mapping[str, Any] | None
    select: Mapping[str, Any] | None


def build_spec(
    spec: Mapping[str, Any] | None = None, **fields: Unpack[SpecFields]
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/jobs``: ``spec`` (if any) with the given fields on top.

    Arguments left as None are not sent, so the server's defaults apply. ``prompts`` may be a
    ``{label: prompt}`` mapping. ``policy``, ``copies`` and ``crop_scale`` are merged into
    ``augment``. Nothing is validated here: the server answers 422 naming the field.
    """
    labels = fields.get("labels")
    formats = fields.get("formats")
    prompt_template = fields.get("prompt_template")
    prompts = fields.get("prompts")
    policy = fields.get("policy")
    body: dict[str, Any] = dict(spec or {})
    if isinstance(labels, str):
        raise TypeError("labels must be a list of class names, not one string")
    if isinstance(formats, str):
        raise TypeError("formats must be a list, e.g. ['imagefolder', 'tensors']")
    plain: dict[str, Any] = {
        name: fields.get(name)
        for name in (
            "preset", "ipc", "budget_seconds", "image_size", "resolution", "decoder", "seed",
            "callback_url", "model", "steps", "guidance_scale", "method", "reference", "strength",
            "prompt_strategy",
        )
    }  # fmt: skip
    plain["labels"] = None if labels is None else builtins.list(labels)
    plain["prompt_template"] = (
        prompt_template
        if prompt_template is None or isinstance(prompt_template, str)
        else builtins.list(prompt_template)
    )
    plain["formats"] = None if formats is None else builtins.list(formats)
    body.update({k: v for k, v in plain.items() if v is not None})
    nested = {"soft_labels": fields.get("soft_labels"), "select": fields.get("select")}
    body.update({name: dict(value) for name, value in nested.items() if value is not None})
    if prompts is not None:
        if isinstance(prompts, Mapping):
            body["prompts"] = [{"label": k, "prompt": v} for k, v in prompts.items()]
        else:
            body["prompts"] = [dict(p) for p in prompts]
    aug: dict[str, Any] = dict(body.get("augment") or {})
    aug.update(fields.get("augment") or {})
    extra = {
        "policy": policy,
        "copies": fields.get("copies"),
        "crop_scale": fields.get("crop_scale"),
    }
    if not isinstance(policy, str | None):
        extra["policy"] = [dict(step) for step in policy]
    aug.update({k: v for k, v in extra.items() if v is not None})
    if aug:
        body["augment"] = aug
    return body


class Client:
    """A client for one distill service.

    ``url`` is the service's base URL; ``api_key`` is sent as ``Authorization: Bearer``;
    ``timeout`` bounds each request (connect, read, write) in seconds; ``retries`` is how many
    times a request is repeated after a connection failure or a 429/503 (0: never), with
    exponential backoff from ``backoff`` seconds up to ``max_backoff``. ``transport`` replaces
    httpx's (for proxies, tests). Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"User-Agent": f"distill-client/{VERSION}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_env(cls, **kwargs: Any) -> Client:
        """A client for ``$DISTILL_URL`` (default http://127.0.0.1:8000) with
        ``$DISTILL_API_KEY``; keyword arguments are passed on."""
        return cls(
            os.environ.get("DISTILL_URL") or DEFAULT_URL,
            os.environ.get("DISTILL_API_KEY") or None,
            **kwargs,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- transport ---------------------------------------------------------------------------

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        base = min(self.max_backoff, self.backoff * 2.0**attempt)
        return base * (0.5 + random.random() / 2)

    def _send(
        self,
        method: str,
        path: str,
        *,
        replay_safe: bool,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send with retries; return a 1xx-3xx response or raise the typed error.

        ``replay_safe``: the request may be repeated after it reached the server (GET, or a
        POST with an Idempotency-Key); otherwise only failures to connect are retried.
        """
        attempt = 0
        while True:
            request = self._http.build_request(
                method,
                path,
                params={k: v for k, v in (params or {}).items() if v is not None},
                json=json_body,
                content=content,
                headers=dict(headers or {}),
                timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.retries or not (replay_safe or isinstance(exc, _NOT_SENT)):
                    raise ServerUnreachable(self.url, exc) from exc
                time.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                response.close()
                time.sleep(self._delay(attempt, retry_after))
                attempt += 1
                continue
            if response.status_code >= 400:
                try:
                    response.read()
                except httpx.TransportError:
                    pass
                finally:
                    response.close()
                raise ApiError.from_response(response)
            return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return response.json()

    # -- jobs --------------------------------------------------------------------------------

    def submit(
        self,
        spec: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        wait: int | None = None,
        **fields: Unpack[SpecFields],
    ) -> Job:
        """Request a dataset (``POST /v1/jobs``) and return the job as accepted.

        Give the request as keyword arguments (``labels`` or ``preset``; ``ipc`` or
        ``budget_seconds``; ...), as a ``spec`` dict with the JSON body (e.g. an earlier
        manifest's ``request``), or both: keywords override the dict's fields. ``policy``,
        ``copies`` and ``crop_scale`` go into ``augment``.

        ``idempotency_key`` defaults to a fresh UUID, reused by this call's own retries, so a
        retry never makes a second job; pass your own to make retries across processes safe.
        ``wait`` asks the server to hold the answer up to that many seconds for the job to
        finish (``Prefer: wait=N``); a server that does not wait answers at once, so check
        ``job["state"]`` either way, or call ``wait()``.
        """
        body = build_spec(spec, **fields)
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        timeout = None
        if wait is not None and wait > 0:
            headers["Prefer"] = f"wait={int(wait)}"
            timeout = max(self.timeout, wait + 10.0)
        job: Job = self._json(
            "POST",
            "/v1/jobs",
            replay_safe=True,
            json_body=body,
            headers=headers,
            timeout=timeout,
        )
        return job

    def get(self, job_id: str) -> Job:
        """The job's current state, progress and result (``GET /v1/jobs/{id}``)."""
        job: Job = self._json("GET", _job_path(job_id), replay_safe=True)
        return job

    def wait(
        self,
        job: Job | str,
        timeout: float | None = None,
        *,
        on_progress: Callable[[Job], None] | None = None,
        poll_interval: float = 1.0,
    ) -> Job:
        """Poll the job until it is ``succeeded``, ``failed`` or ``canceled``; return it.

        ``on_progress(job)`` is called with the first state seen and then whenever the job
        changes. Raises ``WaitTimeout`` (carrying the last state) after ``timeout`` seconds;
        None waits as long as it takes. A failed or canceled job is returned, not raised:
        check ``job["state"]``.
        """
        job_id = _job_id(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Job | None = None
        while True:
            current = self.get(job_id)
            if on_progress is not None and current != last:
                on_progress(current)
            last = current
            if current["state"] in TERMINAL_STATES:
                return current
            delay = poll_interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(current, cast(float, timeout))
                delay = min(delay, remaining)
            time.sleep(delay)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued (at once) or running (between batches) job; ``Conflict`` (409) when
        it has already finished."""
        job: Job = self._json("POST", _job_path(job_id, "/cancel"), replay_safe=False)
        return job

    def list(
        self, state: str | None = None, limit: int = 50, *, cursor: str | None = None
    ) -> JobPage:
        """One page of your jobs, newest first (``GET /v1/jobs``); pass the page's
        ``next_cursor`` as ``cursor`` for the next one. ``iter_jobs`` follows them for you."""
        data = self._json(
            "GET",
            "/v1/jobs",
            replay_safe=True,
            params={"state": state, "limit": limit, "cursor": cursor},
        )
        return JobPage(jobs=data.get("jobs", []), next_cursor=data.get("next_cursor"))

    def iter_jobs(
        self, state: str | None = None, *, limit: int | None = None, page_size: int = 50
    ) -> Iterator[Job]:
        """Every job (or the newest ``limit``), newest first, fetched a page at a time."""
        cursor: str | None = None
        count = 0
        while True:
            size = page_size if limit is None else max(1, min(page_size, limit - count))
            page = self.list(state, size, cursor=cursor)
            for job in page.jobs:
                if limit is not None and count >= limit:
                    return
                yield job
                count += 1
            cursor = page.next_cursor
            if not cursor or (limit is not None and count >= limit):
                return

    def presets(self) -> builtins.list[Preset]:
        """The standard class lists usable as ``preset`` (``GET /v1/presets``)."""
        data = self._json("GET", "/v1/presets", replay_safe=True)
        presets: builtins.list[Preset] = data["presets"]
        return presets

    def preset(self, name: str) -> dict[str, Any]:
        """One preset with every class in class-index order (``GET /v1/presets/{name}``)."""
        data: dict[str, Any] = self._json(
            "GET", f"/v1/presets/{quote(name, safe='')}", replay_safe=True
        )
        return data

    def models(self) -> builtins.list[dict[str, Any]]:
        """The models this service serves, usable as ``model`` (``GET /v1/models``)."""
        data = self._json("GET", "/v1/models", replay_safe=True)
        models: builtins.list[dict[str, Any]] = data["models"]
        return models

    # -- reference sets ----------------------------------------------------------------------

    def upload_reference(
        self, archive: str | os.PathLike[str] | bytes, *, name: str | None = None
    ) -> dict[str, Any]:
        """Upload a zip or tar of an ImageFolder tree as a reference set
        (``POST /v1/references``); returns the set (its ``id`` is a job's ``reference``)."""
        data = archive if isinstance(archive, bytes) else Path(archive).read_bytes()
        media = "application/zip" if data[:4] == b"PK\x03\x04" else "application/x-tar"
        if data[:2] == b"\x1f\x8b":
            media = "application/gzip"
        made: dict[str, Any] = self._json(
            "POST",
            "/v1/references",
            replay_safe=False,
            params={"name": name},
            content=data,
            headers={"content-type": media},
            timeout=max(self.timeout, 300.0),
        )
        return made

    def references(self) -> builtins.list[dict[str, Any]]:
        """Your reference sets, newest first (``GET /v1/references``)."""
        data = self._json("GET", "/v1/references", replay_safe=True)
        found: builtins.list[dict[str, Any]] = data["references"]
        return found

    def reference(self, reference_id: str) -> dict[str, Any]:
        """One reference set: classes, image counts, digests (``GET /v1/references/{id}``)."""
        found: dict[str, Any] = self._json(
            "GET", f"/v1/references/{quote(reference_id, safe='')}", replay_safe=True
        )
        return found

    def delete_reference(self, reference_id: str) -> None:
        """Remove a reference set and its stored images (``DELETE /v1/references/{id}``)."""
        self._send(
            "DELETE", f"/v1/references/{quote(reference_id, safe='')}", replay_safe=True
        ).close()

    # -- archives ----------------------------------------------------------------------------

    def download(
        self,
        job: Job | str,
        path: str | os.PathLike[str],
        *,
        on_progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Download a succeeded job's archive to ``path``; return the final path.

        ``path`` may be a directory (the file is then ``distill-<id>.zip`` in it). Bytes go
        to ``<path>.part``; an existing ``.part`` (an earlier interrupted download) is resumed
        with ``Range`` and ``If-Range`` (a changed archive restarts from zero), and a
        connection lost mid-way is resumed up to ``retries`` times. The file is checked
        against the job's SHA-256 (its ``ETag``) and renamed to ``path`` only then, so
        ``path`` never holds a partial or corrupt file. On a mismatch the ``.part`` is removed
        and ``ChecksumMismatch`` raised: calling again downloads afresh. A job with no archive
        yet raises ``Conflict`` (409). ``on_progress(bytes_done, bytes_total)`` follows the
        transfer.
        """
        job_id = _job_id(job)
        archive = job.get("archive") if isinstance(job, Mapping) else None
        if archive is None:
            archive = self.get(job_id).get("archive")
        expected = archive["sha256"] if archive else None
        size = archive["size_bytes"] if archive else None

        target = Path(path)
        if target.is_dir():
            target = target / f"distill-{job_id}.zip"
        part = target.with_name(target.name + ".part")
        route = _job_path(job_id, "/archive")

        attempt = 0
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if offset and (expected is None or (size is not None and offset > size)):
                part.unlink()  # cannot be resumed safely: start over
                offset = 0
            if size is not None and offset == size and offset > 0:
                hasher = _sha256_of(part)  # complete already: only the check is left
                break
            headers: dict[str, str] = {"Accept": "application/zip, application/problem+json"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                headers["If-Range"] = f'"{expected}"'
            try:
                response = self._send("GET", route, replay_safe=True, headers=headers, stream=True)
            except ApiError as exc:
                if exc.status == 416 and offset:
                    part.unlink()
                    continue
                raise
            try:
                received = _receive(response, part, offset, size, on_progress)
            except httpx.TransportError as exc:  # lost mid-way: resume from what arrived
                if attempt >= self.retries:
                    raise ServerUnreachable(self.url, exc) from exc
                time.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            finally:
                response.close()
            if received is None:
                continue  # the server did not continue where we asked: start over
            hasher, etag = received
            expected = expected or etag
            break

        actual = hasher.hexdigest()
        if expected is None:
            part.unlink(missing_ok=True)
            raise DownloadError(f"job {job_id}: the server gave no SHA-256 to check against")
        if actual != expected:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(expected, actual)
        os.replace(part, target)
        return target
