"""Setting a model up: ``load`` (hub id or local directory, through ``from_pretrained``) and
``wrap`` (a pipeline already built), both giving a warm ``Generator``.

Only the model is required. The tiny decoder is optional: it is looked for beside a local
model (``<model>/tiny_decoder``) and then at ``DISTILL_TINY_DECODER``; when none loads, the
worker logs one line saying how to enable it and runs without it (``Generator.unavailable``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core import models
from core.settings import Settings
from worker.model import compiling
from worker.model.generator import EMBEDDED_FAMILIES, Generator
from worker.model.latents import native_resolution
from worker.model.prompts import PromptCache

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: How to enable the tiny decoder when it cannot be loaded (logged once at start).
TINY_HINT = (
    "put an AutoencoderTiny (a copy of madebyollin/taesdxl) in <model>/tiny_decoder, or set "
    "DISTILL_TINY_DECODER to its hub id or local directory (none: run without it)"
)


class ModelLoadError(RuntimeError):
    """The pipeline could not be loaded (no weights, no network, wrong directory)."""


@dataclass(frozen=True)
class LoadOptions:
    """How a model is set up; every field has the worker's default.

    ``vae_dtype`` (default: float32 when the model runs in float16 and its VAE asks to be
    upcast, as SDXL's does, else the model's dtype) is kept for the VAE for good instead of
    the stock per-call upcast; bfloat16 is the cheaper safe choice. ``tiny_decoder``: where an
    ``AutoencoderTiny`` is looked for, in order (optional). ``channels_last`` (default: on
    CUDA) and ``compile`` (``compiling``) only change speed.
    """

    device: str | None = None
    dtype: str | None = None
    revision: str | None = None
    variant: str | None = None
    resolution: int | None = None
    vae_dtype: str | None = None
    channels_last: bool | None = None
    tiny_decoder: tuple[str, ...] = ()
    compile: str = "off"
    batch_size: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, device: str | None = None) -> LoadOptions:
        """A worker's options (``device``: the GPU it claimed, when not set in settings).
        Compiling is left to the worker, after it picked its batch size."""
        return cls(
            device=device or settings.device,
            dtype=settings.dtype,
            revision=settings.model_revision,
            variant=settings.model_variant,
            resolution=settings.resolution,
            vae_dtype=settings.vae_dtype,
            channels_last=settings.channels_last,
            tiny_decoder=tuple(tiny_decoder_sources(settings)),
        )


@dataclass(frozen=True)
class TinyDecoder:
    """A loaded ``AutoencoderTiny`` and where it came from (hub id or directory)."""

    module: Any
    source: str


def tiny_decoder_sources(settings: Settings) -> list[str]:
    """Where the optional tiny decoder is looked for, in order: a local model's own
    ``<model>/tiny_decoder``, then ``DISTILL_TINY_DECODER`` (default ``madebyollin/taesdxl``);
    only the latter when it is set to anything but its default. Empty when it is ``none``."""
    return optional_sources(settings, "tiny_decoder", models.TINY_DECODER_DIR)


def optional_sources(settings: Settings, field: str, beside: str) -> list[str]:
    """Where the optional part of the setting ``field`` is looked for: ``<model>/<beside>``
    when the model is a local directory holding one, then the setting's value; only the
    value when it is set to anything but its default; none when it is ``none``."""
    chosen: str | None = getattr(settings, field)
    if chosen is None:
        return []
    if chosen != Settings.model_fields[field].default:
        return [chosen]
    local = Path(settings.model) / beside
    return [str(local)] * local.is_dir() + [chosen]


def pick_device(requested: str | None) -> torch.device:
    """``requested`` if given, else CUDA when present, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """``requested`` if given, else float16 on CUDA and float32 elsewhere."""
    if requested:
        return _DTYPES[requested]
    return torch.float16 if device.type == "cuda" else torch.float32


def load(model: str, options: LoadOptions = LoadOptions()) -> Generator:
    """Load ``model`` (hub id or local directory) as ``options`` say. Raises
    ``ModelLoadError`` when the model itself cannot be loaded; never for the tiny decoder."""
    from diffusers import AutoPipelineForText2Image, DiTPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # a worker's output is its JSON log lines
    started = time.perf_counter()
    target = pick_device(options.device)
    torch_dtype = pick_dtype(options.dtype, target)
    known = models.defaults_for(model)
    extra: dict[str, Any] = {"add_watermarker": False} if known.family == "sdxl" else {}
    pipeline = _load(
        DiTPipeline if known.family == "dit" else AutoPipelineForText2Image,
        model,
        what="model",
        dtype=torch_dtype,
        revision=options.revision,
        variant=options.variant,
        **extra,
    )
    tiny, missing = _load_tiny(
        options.tiny_decoder, family=family_of(pipeline), dtype=torch_dtype, device=target
    )
    resolved = replace(options, device=str(target), dtype=str(torch_dtype).removeprefix("torch."))
    generator = wrap(pipeline.to(target), model=model, options=resolved, tiny=tiny)
    generator.fingerprint = fingerprint(Path(model)) if Path(model).is_dir() else None
    if tiny is not None and Path(tiny.source).is_dir():
        generator.tiny_fingerprint = fingerprint(Path(tiny.source))
    if missing:
        generator.unavailable["tiny_decoder"] = missing
    generator.load_seconds = time.perf_counter() - started
    return generator


def wrap(
    pipeline: Any,
    *,
    model: str,
    options: LoadOptions = LoadOptions(),
    tiny: TinyDecoder | None = None,
    defaults: tuple[int, float] | None = None,
) -> Generator:
    """Set up a pipeline already built (and on its device, taken from the pipeline when
    ``options.device`` is unset): VAE dtype, memory format, the prompt cache, compiling.
    ``defaults``: its sampling (steps, guidance); else the catalogue's for ``model``, else the
    family's (``core.models.FAMILY_DEFAULTS``)."""
    pipeline.set_progress_bar_config(disable=True)
    # The watermark would be applied to decoded images; we decode ourselves, and never add one.
    pipeline.watermark = None
    device = pick_device(options.device) if options.device else pipeline.device
    dtype = pick_dtype(options.dtype, device) if options.dtype else pipeline.dtype
    family = family_of(pipeline)
    decode = _decode_dtype(pipeline, family, dtype, options.vae_dtype)
    pipeline.vae.to(dtype=decode)
    use_channels_last = (
        device.type == "cuda" if options.channels_last is None else options.channels_last
    )
    module = tiny.module if tiny is not None else None
    if use_channels_last:
        for part in (pipeline.unet if family != "dit" else None, pipeline.vae, module):
            if part is not None:
                part.to(memory_format=torch.channels_last)
    if defaults is None and model in models.CATALOGUE:
        known = models.defaults_for(model)
        defaults = (known.steps, known.guidance_scale)
    steps, guidance = defaults or models.FAMILY_DEFAULTS[family]
    native = native_resolution(pipeline)
    generator = Generator(
        pipeline=pipeline,
        device=device,
        dtype=dtype,
        model=model,
        revision=options.revision,
        resolution=native if family == "dit" else (options.resolution or native),
        family=family,
        steps=steps,
        guidance_scale=guidance,
        decode_dtype=decode,
        options={"channels_last": use_channels_last, "compile": "off"},
        tiny=module,
        tiny_id=tiny.source if tiny is not None else None,
        prompts=PromptCache(pipeline, family, device) if family in EMBEDDED_FAMILIES else None,
    )
    compiling.enable(generator, options.compile, batch_size=options.batch_size or 1)
    return generator


def _decode_dtype(pipeline: Any, family: str, dtype: torch.dtype, asked: str | None) -> torch.dtype:
    if asked:
        return _DTYPES[asked]
    if family not in EMBEDDED_FAMILIES:
        return dtype  # the pipeline decodes its own latents, in its own dtype
    if dtype == torch.float16 and pipeline.vae.config.get("force_upcast", False):
        return torch.float32
    return dtype


def family_of(pipeline: Any) -> str:
    """The ``core.models`` family of a loaded pipeline, from its class."""
    name = type(pipeline).__name__
    for family, cls in models.PIPELINES.items():
        if name == cls:
            return family
    return "text2image"


def _load(kind: Any, source: str, *, what: str, **options: Any) -> Any:
    """``kind.from_pretrained(source)``, or ``ModelLoadError`` saying why in one line."""
    try:
        return kind.from_pretrained(source, **options)
    except Exception as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        reason = text.split(" Please check out the root cause")[0].rstrip(".")
        raise ModelLoadError(f"cannot load {what} {source!r}: {reason}") from exc


def _load_tiny(
    sources: Sequence[str], *, family: str, dtype: torch.dtype, device: torch.device
) -> tuple[TinyDecoder | None, str | None]:
    """The first ``AutoencoderTiny`` of ``sources`` that loads (and None), or (None, why)
    when none does. Never raises: the tiny decoder is optional."""
    from diffusers import AutoencoderTiny

    if not sources:
        return None, None
    if family != "sdxl":
        log.info("tiny decoder not loaded: it decodes SDXL latents only")
        return None, None
    reasons = []
    for source in sources:
        try:
            tiny = _load(
                AutoencoderTiny, source, what="tiny decoder (AutoencoderTiny)", dtype=dtype
            )
        except ModelLoadError as exc:
            reasons.append(str(exc))
            continue
        return TinyDecoder(tiny.to(device).eval(), source), None
    why = "; ".join(reasons)
    log.warning(
        "running without the tiny decoder (requests for decoder 'tiny' get a 422): %s. "
        "To enable it: %s",
        why,
        TINY_HINT,
        extra={"part": "tiny_decoder"},
    )
    return None, why


def fingerprint(directory: Path, *, chunk: int = 1 << 20) -> str:
    """A cheap identity of a local model directory: sha256 over every file's relative path,
    size, and the hashes of its first and last MiB (weights are gigabytes; configs are whole).
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(chunk)
            handle.seek(max(size - chunk, 0))
            tail = handle.read(chunk)
        rel = path.relative_to(directory).as_posix()
        digest.update(f"{rel}\0{size}\0".encode())
        digest.update(hashlib.sha256(head).digest() + hashlib.sha256(tail).digest())
    return digest.hexdigest()
