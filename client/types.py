"""The shapes the API answers with, as ``TypedDict``s: plain JSON dicts, typed for editors.

They follow ``openapi/openapi.json``. The dicts are what the server sent, unchanged, so fields
a newer server adds are there too (read them with ``.get``); ``json.dumps(job)`` works as is.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

JobState = Literal["queued", "running", "succeeded", "failed", "canceled"]

#: States a job never leaves.
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


class Progress(TypedDict):
    """Images sampled and written so far, the total, the rate and an estimate of the rest."""

    generated: int
    written: int
    total: int | None
    images_per_second: float | None
    eta_seconds: float | None
    ipc_reached: NotRequired[int | None]


class Archive(TypedDict):
    """Where a succeeded job's zip is, its size and its SHA-256 (also its ``ETag``)."""

    url: str
    size_bytes: int
    sha256: str


class JobError(TypedDict):
    """Why a job failed: ``worker_lost``, ``timeout``, ``disk_full``, ``invalid_request``..."""

    type: str
    detail: str


class Timings(TypedDict):
    """Seconds a succeeded job took on its worker."""

    seconds_total: float
    seconds_sampling: float
    seconds_assembling: NotRequired[float | None]


class Shard(TypedDict):
    """One piece of a large job, made by one worker (``Job["shards"]``)."""

    index: int
    state: str
    first_class: int
    last_class: int
    images: int
    generated: int
    written: int
    worker: NotRequired[str | None]
    attempts: NotRequired[int]
    started_at: NotRequired[str | None]
    finished_at: NotRequired[str | None]
    last_interruption: NotRequired[str | None]
    error: NotRequired[str | None]


class Job(TypedDict):
    """A job as ``GET /v1/jobs/{id}`` returns it."""

    id: str
    state: JobState
    created_at: str
    request: dict[str, Any]
    progress: Progress
    started_at: NotRequired[str | None]
    finished_at: NotRequired[str | None]
    queue_position: NotRequired[int | None]
    archive: NotRequired[Archive | None]
    error: NotRequired[JobError | None]
    timings: NotRequired[Timings | None]
    worker: NotRequired[str | None]
    attempts: NotRequired[int]
    cancel_requested: NotRequired[bool]
    last_interruption: NotRequired[str | None]
    shards: NotRequired[list[Shard] | None]


class Preset(TypedDict):
    """A standard class list usable as ``preset`` (``GET /v1/presets``)."""

    name: str
    title: str
    num_classes: int
    image_size: int
    mean: list[float]
    std: list[float]
    first_class: str
    last_class: str
