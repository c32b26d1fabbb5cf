"""The warm model: load a diffusers pipeline once, then sample many batches.

``Generator.load()`` is the setup step (seconds to minutes), ``render()`` the per-batch step.
A hub id and a local directory go through the same ``from_pretrained`` call. Families
(``core.models``): text-to-image pipelines through ``AutoPipelineForText2Image`` (SDXL and SD
get cached prompt embeddings and the service's own decode; any other text-to-image pipeline
is called with its prompts as they are), and the class-conditional ``DiTPipeline``, which
takes ImageNet-1K class ids.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: Families whose prompts are encoded once and cached, and whose latents the service decodes.
EMBEDDED_FAMILIES = ("sdxl", "sd")
#: Prompts a worker keeps encoded (two embeddings of a few hundred KiB each in float16).
PROMPT_CACHE_SIZE = 4096
DECODERS = ("vae", "tiny")
COMPILE_MODES = ("off", "regional", "full")


class ModelLoadError(RuntimeError):
    """The pipeline could not be loaded (no weights, no network, wrong directory)."""


class PartUnavailable(ValueError):
    """A request needs an optional part this worker runs without (the tiny decoder).

    ``error_type`` is the public error type a job failing with it gets (``core.failures``)."""

    error_type = "invalid_request"


#: How to enable the tiny decoder when it cannot be loaded (logged once at start).
TINY_HINT = (
    "put an AutoencoderTiny (a copy of madebyollin/taesdxl) in <model>/tiny_decoder, or set "
    "DISTILL_TINY_DECODER to its hub id or local directory (none: run without it)"
)


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


@dataclass
class Generator:
    """A loaded pipeline on one device."""

    pipeline: Any
    device: torch.device
    dtype: torch.dtype
    model: str
    revision: str | None
    resolution: int
    #: ``sdxl``, ``sd``, ``dit`` or ``text2image`` (core.models), from the loaded class.
    family: str = "sdxl"
    #: Sampling defaults: a request's ``steps`` / ``guidance_scale`` override them.
    steps: int = 1
    guidance_scale: float = 0.0
    fingerprint: str | None = None
    load_seconds: float = 0.0
    #: Largest batch known to fit in device memory (None: no limit met yet).
    max_batch: int | None = None
    #: The dtype the VAE decodes in (float32 where float16 would overflow).
    decode_dtype: torch.dtype = torch.float32
    options: dict[str, Any] | None = None
    #: ``AutoencoderTiny`` beside the VAE (``decoder="tiny"``), its id and fingerprint.
    tiny: Any | None = None
    tiny_id: str | None = None
    tiny_fingerprint: str | None = None
    #: Optional parts asked for that could not be loaded, with why (``/readyz``).
    unavailable: dict[str, str] = field(default_factory=dict)
    #: ``off``, ``regional`` (the UNet's repeated blocks) or ``full`` (whole graphs).
    compile: str = "off"
    #: Seconds the start-up warm-up took to compile (0 when nothing is compiled).
    compile_seconds: float = 0.0
    #: Compiled graphs run at this batch size only: shorter batches are padded to it.
    fixed_batch: int | None = None
    #: Distinct prompts whose text embeddings are kept (per worker, least recently used out).
    prompt_cache_size: int = PROMPT_CACHE_SIZE
    #: False: the stock path, every image's prompt through the text encoders (benchmarks).
    cache_prompts: bool = True
    _embeddings: OrderedDict[tuple[str, bool], dict[str, torch.Tensor]] = field(
        default_factory=OrderedDict, repr=False
    )
    _image_to_image: Any | None = field(default=None, repr=False)
    #: Text-encoder passes run and served from the cache (for the benchmarks and status).
    prompt_stats: dict[str, int] = field(default_factory=lambda: {"encoded": 0, "cached": 0})

    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        resolution: int | None = None,
        vae_dtype: str | None = None,
        channels_last: bool | None = None,
        tiny_decoder: str | Sequence[str] | None = None,
        compile: str = "off",
        batch_size: int | None = None,
    ) -> Generator:
        """Load ``model`` (hub id or local directory) onto ``device``.

        ``vae_dtype`` (default: float32 when the model runs in float16 and its VAE asks to be
        upcast, as SDXL's does, else the model's dtype) is kept for the VAE for good instead of
        the stock per-call upcast; bfloat16 is the cheaper safe choice. ``tiny_decoder`` (hub
        id or directory of an ``AutoencoderTiny``) is loaded beside the VAE for
        ``decoder="tiny"``. ``channels_last`` (default: on CUDA) and ``compile`` (see ``wrap``)
        only change speed. Raises ``ModelLoadError`` when something cannot be loaded.
        """
        from diffusers import AutoPipelineForText2Image, DiTPipeline
        from diffusers.utils import logging as diffusers_logging

        from core import models

        diffusers_logging.disable_progress_bar()  # a worker's output is its JSON log lines
        started = time.perf_counter()
        target = pick_device(device)
        torch_dtype = pick_dtype(dtype, target)
        known = models.defaults_for(model)
        extra: dict[str, Any] = {"add_watermarker": False} if known.family == "sdxl" else {}
        pipeline = _load(
            DiTPipeline if known.family == "dit" else AutoPipelineForText2Image,
            model,
            what="model",
            dtype=torch_dtype,
            revision=revision,
            variant=variant,
            **extra,
        )
        sources = [tiny_decoder] if isinstance(tiny_decoder, str) else list(tiny_decoder or [])
        tiny, tiny_id, missing = _load_tiny(
            sources, family=family_of(pipeline), dtype=torch_dtype, device=target
        )
        generator = cls.wrap(
            pipeline.to(target),
            device=target,
            dtype=torch_dtype,
            model=model,
            revision=revision,
            resolution=resolution,
            vae_dtype=vae_dtype,
            channels_last=channels_last,
            tiny=tiny,
            tiny_id=tiny_id,
            compile=compile,
            batch_size=batch_size,
            steps=known.steps if model in models.CATALOGUE else None,
            guidance_scale=known.guidance_scale if model in models.CATALOGUE else None,
        )
        generator.fingerprint = fingerprint(Path(model)) if Path(model).is_dir() else None
        if tiny_id and Path(tiny_id).is_dir():
            generator.tiny_fingerprint = fingerprint(Path(tiny_id))
        if missing:
            generator.unavailable["tiny_decoder"] = missing
        generator.load_seconds = time.perf_counter() - started
        return generator

    @classmethod
    def wrap(
        cls,
        pipeline: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        model: str,
        revision: str | None = None,
        resolution: int | None = None,
        vae_dtype: str | None = None,
        channels_last: bool | None = None,
        tiny: Any | None = None,
        tiny_id: str | None = None,
        compile: str = "off",
        batch_size: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Generator:
        """Set up a pipeline already on ``device`` (see ``load`` for the options).

        ``steps`` and ``guidance_scale`` are the sampling defaults (default: the family's,
        ``core.models.FAMILY_DEFAULTS``).

        ``compile``: ``regional`` compiles the UNet's repeated blocks (diffusers'
        ``compile_repeated_blocks``: several times faster to compile than the whole graph),
        ``full`` the whole UNet (max-autotune with CUDA graphs on a GPU); both also compile
        the decoders, fuse the attention QKV projections and set inductor as diffusers' speed
        guide does. Compiled graphs run at one batch size (``batch_size``, shorter batches are
        padded) and are warmed up here, so the first job does not pay for compiling.
        """
        from core import models

        pipeline.set_progress_bar_config(disable=True)
        # The watermark would be applied to decoded images; we decode ourselves, and never add one.
        pipeline.watermark = None
        family = family_of(pipeline)
        if vae_dtype:
            decode = _DTYPES[vae_dtype]
        elif family not in EMBEDDED_FAMILIES:
            decode = dtype  # the pipeline decodes its own latents, in its own dtype
        elif dtype == torch.float16 and pipeline.vae.config.get("force_upcast", False):
            decode = torch.float32
        else:
            decode = dtype
        pipeline.vae.to(dtype=decode)
        use_channels_last = device.type == "cuda" if channels_last is None else channels_last
        if use_channels_last:
            for module in (pipeline.unet if family != "dit" else None, pipeline.vae, tiny):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        native = native_resolution(pipeline)
        default_steps, default_guidance = models.FAMILY_DEFAULTS[family]
        generator = cls(
            pipeline=pipeline,
            device=device,
            dtype=dtype,
            model=model,
            revision=revision,
            resolution=native if family == "dit" else (resolution or native),
            family=family,
            steps=steps or default_steps,
            guidance_scale=default_guidance if guidance_scale is None else guidance_scale,
            decode_dtype=decode,
            options={"channels_last": use_channels_last, "compile": "off"},
            tiny=tiny,
            tiny_id=tiny_id,
        )
        generator.enable_compile(compile, batch_size=batch_size or 1)
        return generator

    def enable_compile(self, mode: str, *, batch_size: int) -> float:
        """Compile for ``batch_size`` images a call (after ``tune_batch``, say); seconds taken."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
        if mode == "off":
            return 0.0
        self.compile, self.fixed_batch = mode, batch_size
        if self.options is not None:
            self.options["compile"] = mode
        return self.compile_graphs()

    def tune_batch(
        self, start: int, *, limit: int = 256, gain: float = 1.05
    ) -> tuple[int, list[tuple[int, float | None]]]:
        """The batch size with the best images/s, trying ``start``, 2x, 4x, ... up to ``limit``
        until one runs out of memory or is less than ``gain`` times faster than the last.

        Returns it and what was measured ((batch, images/s), None where memory ran out).
        """
        tried: list[tuple[int, float | None]] = []
        best, best_rate = start, 0.0
        batch = start
        while batch <= limit:
            prompts = [f"a photo of class {n % 10}" for n in range(batch)]
            ids = self._warm_ids(batch)
            try:
                self._render(prompts, list(range(batch)), (32,), None, class_ids=ids)  # warm-up
                self._sync()
                started = time.perf_counter()
                self._render(prompts, list(range(batch)), (32,), None, class_ids=ids)
                self._sync()
            except torch.OutOfMemoryError:
                tried.append((batch, None))
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                break
            rate = batch / max(time.perf_counter() - started, 1e-9)
            tried.append((batch, round(rate, 2)))
            if rate < best_rate * gain:
                break
            best, best_rate = batch, rate
            batch *= 2
        return best, tried

    @property
    def class_conditional(self) -> bool:
        """Whether this model takes ImageNet-1K class ids instead of prompts."""
        return self.family == "dit"

    @property
    def denoiser(self) -> Any:
        """The network every step runs: the UNet, or the transformer of DiT-like pipelines."""
        unet = getattr(self.pipeline, "unet", None)
        return unet if unet is not None else self.pipeline.transformer

    def _warm_ids(self, batch: int) -> list[int] | None:
        return [n % 1000 for n in range(batch)] if self.class_conditional else None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compile_graphs(self) -> float:
        """Compile the UNet and the decoders (``self.compile``), then warm every graph up at
        the fixed batch size; returns (and keeps) the seconds it took."""
        started = time.perf_counter()
        _inductor_settings(self.device)
        pipeline = self.pipeline
        if hasattr(pipeline, "fuse_qkv_projections"):
            pipeline.fuse_qkv_projections()
        cuda = self.device.type == "cuda"
        name = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
        if self.compile == "regional" and getattr(self.denoiser, "_repeated_blocks", None):
            self.denoiser.compile_repeated_blocks(fullgraph=True)
        else:
            mode = "max-autotune" if cuda and self.compile == "full" else None
            setattr(pipeline, name, torch.compile(self.denoiser, mode=mode, fullgraph=True))
        # Decoders have no repeated blocks to speak of: compile them whole.
        pipeline.vae.decode = torch.compile(pipeline.vae.decode, fullgraph=True)
        if self.tiny is not None:
            self.tiny.decode = torch.compile(self.tiny.decode, fullgraph=True)
        batch = self.fixed_batch or 1
        for decoder in self.decoders:
            self.sample(
                [f"warm-up {n}" for n in range(batch)],
                list(range(batch)),
                decoder=decoder,
                class_ids=self._warm_ids(batch),
            )
        if cuda:
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - started
        log.info(
            "compiled (%s) and warmed up in %.1f s",
            self.compile,
            self.compile_seconds,
            extra={"compile": self.compile, "seconds": round(self.compile_seconds, 1)},
        )
        return self.compile_seconds

    @property
    def decoders(self) -> tuple[str, ...]:
        """The decoders this generator can use: ``vae``, and ``tiny`` when one is loaded."""
        return ("vae", "tiny") if self.tiny is not None else ("vae",)

    def check_inputs(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        decoder: str = "vae",
        class_ids: Sequence[int] | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("prompts must not be empty")
        if len(prompts) != len(seeds):
            raise ValueError(
                f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}"
            )
        if self.class_conditional and (class_ids is None or len(class_ids) != len(seeds)):
            raise ValueError(f"{self.model} is class-conditional: give one class id per seed")
        if decoder == "tiny" and self.tiny is None:
            why = self.unavailable.get("tiny_decoder", "DISTILL_TINY_DECODER is none")
            raise PartUnavailable(f"decoder: this worker has no tiny decoder ({why}); use 'vae'")
        if decoder not in self.decoders:
            raise ValueError(
                f"decoder must be one of {self.decoders} on this worker, got {decoder!r}"
            )

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], *, guided: bool = False) -> dict[str, torch.Tensor]:
        """The pipeline's embedding arguments for ``prompts``, in order: ``prompt_embeds``
        (and SDXL's ``pooled_prompt_embeds``), with their ``negative_*`` twins when
        ``guided`` (classifier-free guidance against the empty prompt).

        Each distinct prompt goes through the text encoders once per worker (a least recently
        used cache of ``prompt_cache_size``); a batch of one class repeats one prompt.
        """
        cache = self._embeddings
        missing = [p for p in dict.fromkeys(prompts) if (p, guided) not in cache]
        if missing:
            for prompt, row in zip(missing, self._encode(missing, guided), strict=True):
                cache[(prompt, guided)] = row
            self.prompt_stats["encoded"] += len(missing)
        self.prompt_stats["cached"] += len(prompts) - len(missing)
        for prompt in prompts:
            cache.move_to_end((prompt, guided))
        found = [cache[(p, guided)] for p in prompts]
        while len(cache) > max(self.prompt_cache_size, len(set(prompts))):
            cache.popitem(last=False)
        return {name: torch.stack([row[name] for row in found]) for name in found[0]}

    def _encode(self, prompts: list[str], guided: bool) -> list[dict[str, torch.Tensor]]:
        """One text-encoder pass over ``prompts``: a dict of embedding rows per prompt."""
        common = {
            "device": self.device,
            "num_images_per_prompt": 1,
            "do_classifier_free_guidance": guided,
        }
        columns: dict[str, torch.Tensor | None]
        if self.family == "sdxl":
            embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
                prompt=prompts, **common
            )
            columns = {
                "prompt_embeds": embeds,
                "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": negative,
                "negative_pooled_prompt_embeds": negative_pooled,
            }
        else:
            embeds, negative = self.pipeline.encode_prompt(prompt=prompts, **common)
            columns = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
        kept = {
            name: value
            for name, value in columns.items()
            if value is not None and (guided or not name.startswith("negative_"))
        }
        return [{name: value[n] for name, value in kept.items()} for n in range(len(prompts))]

    @torch.inference_mode()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        resolution: int | None = None,
        decoder: str = "vae",
        class_ids: Sequence[int] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Sample one image per prompt (or, class-conditional, per class id); returns
        (N, 3, R, R) floats in [0, 1] on the device.

        ``R`` is ``resolution`` or the worker's default (DiT: always its native side).
        ``steps`` and ``guidance_scale`` default to the model's. With ``init_latents`` (one
        per prompt, as ``encode_latents`` makes them), image-to-image: each is re-noised to
        ``strength`` and denoised by the same model (``image_to_image_steps``). Each image's noise
        comes from its own CPU generator seeded with its seed, so an image does not depend on
        the batch it was sampled in or on the device.
        """
        self.check_inputs(prompts, seeds, decoder, class_ids)
        side = resolution or self.resolution
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        common: dict[str, Any] = {
            "num_inference_steps": steps or self.steps,
            "guidance_scale": guidance,
            "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        }
        if self.class_conditional:
            assert class_ids is not None
            out = self.pipeline(
                class_labels=[int(i) for i in class_ids], output_type="pt", **common
            )
            sampled: torch.Tensor = out.images
            return sampled.to(self.device)
        if self.family not in EMBEDDED_FAMILIES:
            # Any other text-to-image pipeline: its prompts as they are, its own decode.
            out = self.pipeline(
                prompt=list(prompts), height=side, width=side, output_type="pt", **common
            )
            images: torch.Tensor = out.images
            return images.to(self.device)
        if self.cache_prompts:
            text: dict[str, Any] = self.encode(prompts, guided=guidance > 1)
        else:
            text = {"prompt": list(prompts)}
        if init_latents is not None:
            common["num_inference_steps"] = image_to_image_steps(
                common["num_inference_steps"], strength
            )
            out = self.image_to_image(
                **text,
                image=init_latents.to(self.device, self.dtype),
                strength=strength,
                output_type="latent",
                **common,
            )
            return self.decode(out.images, decoder=decoder)
        out = self.pipeline(**text, height=side, width=side, output_type="latent", **common)
        return self.decode(out.images, decoder=decoder)

    @property
    def image_to_image(self) -> Any:
        """The model's image-to-image pipeline, sharing every component (no copy)."""
        if self._image_to_image is None:
            from diffusers import AutoPipelineForImage2Image

            pipe = AutoPipelineForImage2Image.from_pipe(self.pipeline)
            pipe.set_progress_bar_config(disable=True)
            pipe.watermark = None
            self._image_to_image = pipe
        return self._image_to_image

    @torch.inference_mode()
    def encode_latents(self, images: np.ndarray, *, batch: int = 16) -> torch.Tensor:
        """uint8 (N, R, R, 3) images -> the VAE's latents as the denoiser sees them (the
        posterior's mean, scaled as ``decode`` unscales it), float32 on the CPU."""
        if self.family not in EMBEDDED_FAMILIES:
            raise ValueError(f"{self.model} ({self.family}) has no image-to-image path")
        vae = self.pipeline.vae
        config = vae.config
        out = []
        for start in range(0, len(images), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
            pixels = chunk.to(self.device).permute(0, 3, 1, 2).to(self.decode_dtype) / 127.5 - 1
            latents = vae.encode(pixels).latent_dist.mode()
            if config.get("latents_mean") is not None and config.get("latents_std") is not None:
                mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents)
                std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents)
                latents = (latents - mean) * config.scaling_factor / std
            else:
                latents = latents * config.scaling_factor
            out.append(latents.float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, *, decoder: str = "vae") -> torch.Tensor:
        """Latents -> (N, 3, R, R) floats in [0, 1].

        ``vae``: the model's own, in ``decode_dtype`` (see ``load``). ``tiny``: the
        ``AutoencoderTiny``, with its own conventions (scaling factor 1: the UNet's latents as
        they are; its output is already in [-1, 1]).
        """
        if decoder == "tiny":
            if self.tiny is None:
                raise PartUnavailable("no tiny decoder is loaded (DISTILL_TINY_DECODER)")
            tiny_image: torch.Tensor = self.tiny.decode(
                latents.to(self.tiny.dtype), return_dict=False
            )[0]
            return (tiny_image / 2 + 0.5).clamp(0, 1)
        vae = self.pipeline.vae
        latents = latents.to(self.decode_dtype)
        config = vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image: torch.Tensor = vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def render(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        sizes: Sequence[int],
        resolution: int | None = None,
        decoder: str = "vae",
        class_ids: Sequence[int] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> dict[int, np.ndarray]:
        """Sample and shrink: ``{size: (N, size, size, 3) uint8}`` for each requested size.

        A batch that runs out of device memory is retried in halves (down to one image), and
        the size that worked is kept for later batches instead of failing the job. With
        compiled graphs every call holds ``fixed_batch`` images (the last batch is padded with
        copies of its last image, dropped afterwards), so nothing recompiles.
        """
        self.check_inputs(prompts, seeds, decoder, class_ids)
        parts: list[dict[int, np.ndarray]] = []
        start = 0
        while start < len(prompts):
            step = min(self.max_batch or len(prompts), len(prompts) - start)
            chunk_prompts = list(prompts[start : start + step])
            chunk_seeds = list(seeds[start : start + step])
            pad = max((self.fixed_batch or 0) - step, 0) if self.max_batch is None else 0
            chunk_ids = None
            if class_ids is not None:
                chunk_ids = list(class_ids[start : start + step])
                chunk_ids += chunk_ids[-1:] * pad
            chunk_latents = None
            if init_latents is not None:
                chunk_latents = init_latents[start : start + step]
                if pad:
                    chunk_latents = torch.cat(
                        [chunk_latents, chunk_latents[-1:].repeat(pad, 1, 1, 1)]
                    )
            try:
                rendered = self._render(
                    chunk_prompts + chunk_prompts[-1:] * pad,
                    chunk_seeds + chunk_seeds[-1:] * pad,
                    sizes,
                    resolution,
                    decoder,
                    class_ids=chunk_ids,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    init_latents=chunk_latents,
                    strength=strength,
                )
            except torch.OutOfMemoryError:
                if step == 1:
                    raise
                self.max_batch = step // 2
                log.warning(
                    "out of memory at batch %d; retrying at %d",
                    step,
                    self.max_batch,
                    extra={"batch": step, "max_batch": self.max_batch},
                )
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            parts.append({size: images[:step] for size, images in rendered.items()})
            start += step
        if len(parts) == 1:
            return parts[0]
        return {size: np.concatenate([p[size] for p in parts]) for size in parts[0]}

    @torch.inference_mode()
    def _render(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sizes: Sequence[int],
        resolution: int | None,
        decoder: str = "vae",
        *,
        class_ids: Sequence[int] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> dict[int, np.ndarray]:
        """One pipeline call; resizing runs on the device before one copy to the host."""
        images = self.sample(
            prompts,
            seeds,
            resolution=resolution,
            decoder=decoder,
            class_ids=class_ids,
            steps=steps,
            guidance_scale=guidance_scale,
            init_latents=init_latents,
            strength=strength,
        ).float()
        return shrink(images, sizes)

    def gpu_memory_bytes(self) -> int | None:
        """Bytes of GPU memory held by tensors on this generator's device; None off-GPU."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))

    def describe(self) -> dict[str, str | int | float]:
        """Facts about the loaded model for worker status."""
        return {
            "model": self.model,
            "family": self.family,
            "revision": self.revision or "",
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "resolution": self.resolution,
            "max_batch": self.max_batch or 0,
            "decode_dtype": str(self.decode_dtype).removeprefix("torch."),
            "decoders": ",".join(self.decoders),
            "compile": self.compile,
            "compile_seconds": round(self.compile_seconds, 1),
        }

    def provenance(
        self, *, steps: int | None = None, guidance_scale: float | None = None
    ) -> dict[str, Any]:
        """Everything about the model and sampler needed to regenerate a dataset sampled with
        ``steps`` and ``guidance_scale`` (default: the model's)."""
        scheduler = self.pipeline.scheduler
        return {
            **self.describe(),
            "local_fingerprint": self.fingerprint,
            "pipeline": type(self.pipeline).__name__,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": {
                k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")
            },
            "num_inference_steps": steps or self.steps,
            "guidance_scale": self.guidance_scale if guidance_scale is None else guidance_scale,
            "conditioning": "ImageNet-1K class id" if self.class_conditional else "text prompt",
            "noise": "per image: torch.Generator('cpu').manual_seed(seed)",
            "speed_options": self.options or {},
        }

    def decoder_provenance(self, decoder: str) -> dict[str, Any]:
        """Which decoder made a dataset's pixels: its kind, id and local fingerprint."""
        if decoder == "tiny":
            return {
                "decoder": "tiny",
                "class": type(self.tiny).__name__,
                "id": self.tiny_id,
                "local_fingerprint": self.tiny_fingerprint,
                "dtype": str(self.tiny.dtype).removeprefix("torch.") if self.tiny else None,
            }
        return {
            "decoder": "vae",
            "class": type(self.pipeline.vae).__name__,
            "id": f"{self.model} (vae)",
            "local_fingerprint": self.fingerprint,
            "dtype": str(self.decode_dtype).removeprefix("torch."),
        }


def family_of(pipeline: Any) -> str:
    """The ``core.models`` family of a loaded pipeline, from its class."""
    from core import models

    name = type(pipeline).__name__
    for family, cls in models.PIPELINES.items():
        if name == cls:
            return family
    return "text2image"


def image_to_image_steps(steps: int, strength: float) -> int:
    """The ``num_inference_steps`` an image-to-image call needs so that ``steps`` of them
    run: diffusers runs ``int(num_inference_steps * strength)`` (0 would skip the model)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    total = max(math.ceil(steps / strength), steps)
    while int(total * strength) < steps:
        total += 1
    return total


def vae_scale(pipeline: Any) -> int:
    """Pixels per latent along a side (8 for every family here; DiT does not say it)."""
    scale = getattr(pipeline, "vae_scale_factor", None)
    if scale is None:
        scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return int(scale)


def native_resolution(pipeline: Any) -> int:
    """The side in px the pipeline's denoiser was built for (latent side x VAE scale)."""
    unet = getattr(pipeline, "unet", None)
    denoiser = unet if unet is not None else pipeline.transformer
    return int(denoiser.config.sample_size) * vae_scale(pipeline)


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
) -> tuple[Any | None, str | None, str | None]:
    """The first ``AutoencoderTiny`` of ``sources`` that loads: (module, its source, None);
    (None, None, why) when none does. Never raises: the tiny decoder is optional."""
    from diffusers import AutoencoderTiny

    if not sources:
        return None, None, None
    if family != "sdxl":
        log.info("tiny decoder not loaded: it decodes SDXL latents only")
        return None, None, None
    reasons = []
    for source in sources:
        try:
            tiny = _load(
                AutoencoderTiny, source, what="tiny decoder (AutoencoderTiny)", dtype=dtype
            )
        except ModelLoadError as exc:
            reasons.append(str(exc))
            continue
        return tiny.to(device).eval(), source, None
    why = "; ".join(reasons)
    log.warning(
        "running without the tiny decoder (requests for decoder 'tiny' get a 422): %s. "
        "To enable it: %s",
        why,
        TINY_HINT,
        extra={"part": "tiny_decoder"},
    )
    return None, None, why


def _inductor_settings(device: torch.device) -> None:
    """Inductor as diffusers' speed guide sets it for SDXL (1x1 convolutions as matrix
    multiplies, coordinate-descent tuning of the generated kernels)."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = device.type == "cuda"
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = device.type == "cuda"


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


def shrink(images: torch.Tensor, sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """(N, 3, R, R) floats in [0, 1] -> ``{size: (N, size, size, 3) uint8}``: bicubic with
    antialiasing where the size changes, then one copy to the host per size."""
    result: dict[int, np.ndarray] = {}
    for size in sorted(set(sizes)):
        resized = images
        if size != images.shape[-1]:
            resized = F.interpolate(
                images, size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )
        as_bytes = (resized.clamp(0, 1) * 255).round().to(torch.uint8)
        result[size] = as_bytes.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return result
