"""Settings for every process (API, worker, launcher), read from ``DISTILL_*`` variables.

One ``Settings`` class so the API and the workers cannot disagree about a key name, a queue
or a directory. Nothing is read at import time: call ``get_settings()``; tests override it.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Typed configuration; each field is ``DISTILL_<NAME>`` in the environment."""

    # Empty variables mean "use the default" (compose passes unset ones as empty strings).
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore", env_ignore_empty=True)

    # Where things live.
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding queue and jobs.")
    data_dir: Path = Field(Path("data"), description="Archives; shared by API and workers.")
    queue_name: str = Field("distill", description="RQ queue the API fills and workers drain.")
    storage: str | None = Field(
        None,
        description="Where archives live: a directory, or s3://bucket/prefix; default data_dir.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, R2, ...); unset: AWS."
    )
    s3_region: str | None = Field(None, description="S3 region (e.g. us-east-1).")
    s3_access_key_id: SecretStr | None = Field(None, description="S3 access key id.")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")
    presign: bool = Field(
        False, description="With S3: archive downloads redirect to a presigned URL."
    )
    presign_seconds: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Lifetime of a presigned download URL."
    )
    shard_images: int = Field(
        5000,
        ge=1,
        le=100_000,
        description="Fixed-ipc jobs with more images are split into shards of about this many.",
    )

    # API.
    host: str = Field("127.0.0.1", description="API bind address.")
    port: int = Field(8000, ge=1, le=65535, description="API port.")
    max_queued_jobs: int = Field(1000, ge=1, description="Above this, POST answers 503.")
    max_job_images: int = Field(
        100_000, ge=1, le=100_000, description="Most images one fixed-ipc job may ask for."
    )
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Larger request bodies: 413.")
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated bearer keys; unset: no authentication."
    )

    testsets_dir: Path | None = Field(
        None, description="Named test sets for evaluations (ImageFolder dirs or zips)."
    )
    references_dir: Path | None = Field(
        None, description="Named reference sets of real images (ImageFolder dirs or zips)."
    )
    max_reference_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Most bytes one reference upload may hold (413)."
    )
    max_reference_images: int = Field(
        100_000, ge=1, le=10_000_000, description="Most images one reference upload may hold."
    )
    max_reference_pixels: int = Field(
        50_000_000, ge=64, description="Most pixels one reference image may have (header)."
    )

    # Model and generation.
    model: str = Field(
        "stabilityai/sdxl-turbo",
        description="Hub id or local pipeline dir; with DISTILL_MODELS, a worker's alias.",
    )
    models: str | None = Field(
        None,
        description="Served models as alias=id,alias=id (the first is the default); unset: "
        "DISTILL_MODEL alone.",
    )
    model_revision: str | None = Field(None, description="Hub revision (branch, tag, commit).")
    model_variant: str | None = Field(None, description="Weight variant, e.g. fp16.")
    device: str | None = Field(None, description="torch device; default cuda when present.")
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="Default float16 on CUDA, float32 on CPU."
    )
    resolution: int | None = Field(
        None, ge=64, le=2048, description="Sampling side in px; default the model's own."
    )
    batch_size: int = Field(8, ge=1, le=256, description="Images per pipeline call.")
    vae_dtype: Literal["float16", "bfloat16", "float32"] | None = Field(
        None, description="VAE decode dtype; default float32 for SDXL's float16 VAE."
    )
    channels_last: bool | None = Field(None, description="channels-last memory; default on CUDA.")
    compile: Literal["off", "regional", "full"] = Field(
        "off",
        description="torch.compile the UNet (its repeated blocks, or whole) and the decoders; "
        "warmed up at start.",
    )
    tiny_decoder: str | None = Field(
        "madebyollin/taesdxl",
        description="AutoencoderTiny (hub id or local dir) for decoder=tiny; 'none': no tiny.",
    )
    clip_scorer: str | None = Field(
        "openai/clip-vit-base-patch32",
        description="CLIPModel (hub id or local dir) for select scorer 'clip', looked for "
        "first as <model>/clip_scorer; 'none': no CLIP scorer.",
    )
    teachers: str | None = Field(
        None,
        description="Pretrained classifiers for soft_labels.teacher, comma-separated: hub "
        "ids or local dirs of transformers image classifiers (AutoModelForImageClassification "
        "with a preprocessor_config.json), loaded once per worker; a request names one as "
        "written here. Unset or 'none': only the reference teacher.",
    )
    auto_batch: bool = Field(
        True, description="On a GPU, find the batch size (from BATCH_SIZE up) that is fastest."
    )
    workers: int = Field(1, ge=1, le=64, description="Workers `make run` starts on this machine.")
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch CPU threads per worker (default: torch's own)."
    )
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness a worker runs at (its threads and processes too): on a host "
        "it shares with the API and Redis, they are answered first. 0: the same priority.",
    )
    postprocess_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Augmenting/encoding workers running while the model samples; default: "
        "one per CPU core.",
    )
    postprocess_mode: Literal["threads", "processes"] = Field(
        "threads", description="threads, or processes (past the GIL, for many-core hosts)."
    )

    # Job lifetimes.
    job_timeout: int = Field(6 * 3600, ge=10, description="Seconds one job may run.")
    result_ttl: int = Field(
        7 * 24 * 3600, ge=1, description="Seconds finished jobs and archives are kept."
    )
    sweep_interval: float = Field(
        600.0, gt=0, description="Seconds between sweeps of expired archives (maintenance loop)."
    )
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between worker beats.")
    webhook_secret: SecretStr | None = Field(
        None, description="Signs webhook events (whsec_<base64> or any string); needed for them."
    )
    webhook_queue_name: str = Field(
        "distill-webhooks", description="RQ queue of webhook deliveries (no GPU needed)."
    )
    webhook_allow_private: bool = Field(
        False, description="Allow callback URLs on loopback/private/link-local addresses."
    )
    webhook_retry_seconds: int = Field(
        3600, ge=1, le=7 * 24 * 3600, description="How long failed deliveries are retried."
    )
    max_attempts: int = Field(
        2, ge=1, le=10, description="Runs a job gets when its worker dies (1 = no retry)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level; logs are one JSON object per line."
    )
    heartbeat_ttl: int = Field(
        60, ge=2, description="A worker silent this long is dead; its job fails."
    )

    @field_validator("tiny_decoder", "clip_scorer", "teachers")
    @classmethod
    def _optional_part(cls, value: str | None) -> str | None:
        # An empty variable means "the default"; "none" (or "off") turns the optional part off.
        return None if value is None or value.strip().lower() in ("none", "off") else value

    @property
    def teacher_sources(self) -> list[str]:
        """``DISTILL_TEACHERS`` as a list, in order, without repeats."""
        parts = (part.strip() for part in (self.teachers or "").split(","))
        return list(dict.fromkeys(part for part in parts if part))

    @property
    def postprocess_pool_size(self) -> int:
        """``postprocess_workers``, or the machine's CPU cores (at least 2)."""
        return self.postprocess_workers or max(os.cpu_count() or 2, 2)


class ConfigError(ValueError):
    """A ``DISTILL_*`` variable has a value the service cannot use."""


def describe_errors(exc: ValidationError) -> str:
    """One line naming each bad variable, what it holds and what it accepts."""
    parts = []
    for err in exc.errors():
        name = "DISTILL_" + "_".join(str(p) for p in err["loc"]).upper()
        parts.append(f"{name}={err.get('input')!r}: {err['msg']}")
    return "; ".join(parts)


def api_key_list(settings: Settings) -> list[str]:
    """The configured keys (empty: authentication is off)."""
    if settings.api_keys is None:
        return []
    return [k.strip() for k in settings.api_keys.get_secret_value().split(",") if k.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment.

    Raises ``ConfigError`` with one line naming the bad variable(s).
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_errors(exc)}") from None


def settings_or_exit(program: str) -> Settings:
    """For entry points: the settings, or exit 2 with one line naming the bad variable."""
    try:
        return get_settings()
    except ConfigError as exc:
        print(f"{program}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
