"""A Python client and command line for distill-service.

Only httpx and the standard library are needed: no torch, NumPy or service code.

    from client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as distill:
        job = distill.wait(distill.submit(labels=["cat", "dog"], ipc=10, image_size=32))
        if job["state"] == "succeeded":
            distill.download(job, "dataset.zip")

The command line is ``distill`` (or ``python -m client``); see ``client.cli``.
"""

from __future__ import annotations

from client.api import DEFAULT_URL, VERSION, Client, JobPage, build_spec
from client.errors import (
    ApiError,
    ChecksumMismatch,
    Conflict,
    DistillError,
    DownloadError,
    FieldError,
    Gone,
    InvalidRequest,
    NotFound,
    ServerError,
    ServerUnreachable,
    Unauthorized,
    Unavailable,
    WaitTimeout,
    WebhookVerificationError,
)
from client.types import (
    TERMINAL_STATES,
    Archive,
    Job,
    JobError,
    JobState,
    Preset,
    Progress,
    Shard,
)
from client.webhooks import sign_webhook, verify_webhook

__version__ = VERSION

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_STATES",
    "ApiError",
    "Archive",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "DistillError",
    "DownloadError",
    "FieldError",
    "Gone",
    "InvalidRequest",
    "Job",
    "JobError",
    "JobPage",
    "JobState",
    "NotFound",
    "Preset",
    "Progress",
    "ServerError",
    "ServerUnreachable",
    "Shard",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "WebhookVerificationError",
    "__version__",
    "build_spec",
    "sign_webhook",
    "verify_webhook",
]
