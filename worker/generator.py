"""The warm text-to-image model: load a diffusers SDXL pipeline once, then sample many batches.

``Generator.load()`` is the setup step (seconds to minutes), ``render()`` the per-batch step.
A hub id and a local directory go through the same ``from_pretrained`` call.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: SDXL-Turbo's sampling settings: one step, no classifier-free guidance.
NUM_INFERENCE_STEPS = 1
GUIDANCE_SCALE = 0.0


class ModelLoadError(RuntimeError):
    """The pipeline could not be loaded (no weights, no network, wrong directory)."""


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
    fingerprint: str | None = None
    load_seconds: float = 0.0
    #: Largest batch known to fit in device memory (None: no limit met yet).
    max_batch: int | None = None
    #: The dtype the VAE decodes in (float32 where float16 would overflow).
    decode_dtype: torch.dtype = torch.float32
    options: dict[str, Any] | None = None

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
        compile_unet: bool = False,
    ) -> Generator:
        """Load ``model`` (hub id or local directory) onto ``device``.

        ``vae_dtype`` (default: float32 when the model runs in float16 and its VAE asks to be
        upcast, as SDXL's does, else the model's dtype) is kept for the VAE for good instead of
        the stock per-call upcast; bfloat16 is the cheaper safe choice. ``channels_last``
        (default: on CUDA) and ``compile_unet`` (torch.compile, warmed up here, once per
        worker) only change speed. Raises ``ModelLoadError`` when it cannot be loaded.
        """
        from diffusers import StableDiffusionXLPipeline

        started = time.perf_counter()
        target = pick_device(device)
        torch_dtype = pick_dtype(dtype, target)
        try:
            pipeline = StableDiffusionXLPipeline.from_pretrained(
                model, dtype=torch_dtype, revision=revision, variant=variant
            )
        except Exception as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            reason = text.split(" Please check out the root cause")[0].rstrip(".")
            raise ModelLoadError(f"cannot load model {model!r}: {reason}") from exc
        generator = cls.wrap(
            pipeline.to(target),
            device=target,
            dtype=torch_dtype,
            model=model,
            revision=revision,
            resolution=resolution,
            vae_dtype=vae_dtype,
            channels_last=channels_last,
            compile_unet=compile_unet,
        )
        generator.fingerprint = fingerprint(Path(model)) if Path(model).is_dir() else None
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
        compile_unet: bool = False,
    ) -> Generator:
        """Set up a pipeline already on ``device`` (see ``load`` for the options)."""
        pipeline.set_progress_bar_config(disable=True)
        if vae_dtype:
            decode = _DTYPES[vae_dtype]
        elif dtype == torch.float16 and pipeline.vae.config.get("force_upcast", False):
            decode = torch.float32
        else:
            decode = dtype
        pipeline.vae.to(dtype=decode)
        use_channels_last = device.type == "cuda" if channels_last is None else channels_last
        if use_channels_last:
            pipeline.unet.to(memory_format=torch.channels_last)
            pipeline.vae.to(memory_format=torch.channels_last)
        if compile_unet:
            pipeline.unet = torch.compile(pipeline.unet, mode="max-autotune-no-cudagraphs")
        native = int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)
        generator = cls(
            pipeline=pipeline,
            device=device,
            dtype=dtype,
            model=model,
            revision=revision,
            resolution=resolution or native,
            decode_dtype=decode,
            options={"channels_last": use_channels_last, "compile_unet": compile_unet},
        )
        if compile_unet:
            generator.sample(["warm-up"], [0])  # pay compilation now, not in the first job
        return generator

    def check_inputs(self, prompts: Sequence[str], seeds: Sequence[int]) -> None:
        if not prompts:
            raise ValueError("prompts must not be empty")
        if len(prompts) != len(seeds):
            raise ValueError(
                f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}"
            )

    @torch.inference_mode()
    def sample(
        self, prompts: Sequence[str], seeds: Sequence[int], *, resolution: int | None = None
    ) -> torch.Tensor:
        """Sample one image per prompt; returns (N, 3, R, R) floats in [0, 1] on the device.

        ``R`` is ``resolution`` or the worker's default. Each image's starting noise comes from
        its own CPU generator seeded with its seed, so an image does not depend on the batch
        it was sampled in or on the device.
        """
        self.check_inputs(prompts, seeds)
        side = resolution or self.resolution
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipeline(
            prompt=list(prompts),
            num_inference_steps=NUM_INFERENCE_STEPS,
            guidance_scale=GUIDANCE_SCALE,
            height=side,
            width=side,
            generator=generators,
            output_type="latent",
        )
        return self.decode(out.images)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (N, 3, R, R) floats in [0, 1], in ``decode_dtype`` (see ``load``)."""
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
    ) -> dict[int, np.ndarray]:
        """Sample and shrink: ``{size: (N, size, size, 3) uint8}`` for each requested size.

        A batch that runs out of device memory is retried in halves (down to one image), and
        the size that worked is kept for later batches instead of failing the job.
        """
        self.check_inputs(prompts, seeds)
        parts: list[dict[int, np.ndarray]] = []
        start = 0
        while start < len(prompts):
            step = min(self.max_batch or len(prompts), len(prompts) - start)
            try:
                parts.append(
                    self._render(
                        prompts[start : start + step],
                        seeds[start : start + step],
                        sizes,
                        resolution,
                    )
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
    ) -> dict[int, np.ndarray]:
        """One pipeline call; resizing runs on the device before one copy to the host."""
        images = self.sample(prompts, seeds, resolution=resolution).float()
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

    def gpu_memory_bytes(self) -> int | None:
        """Bytes of GPU memory held by tensors on this generator's device; None off-GPU."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))

    def describe(self) -> dict[str, str | int]:
        """Facts about the loaded model for worker status."""
        return {
            "model": self.model,
            "revision": self.revision or "",
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "resolution": self.resolution,
            "max_batch": self.max_batch or 0,
            "decode_dtype": str(self.decode_dtype).removeprefix("torch."),
        }

    def provenance(self) -> dict[str, Any]:
        """Everything about the model and sampler needed to regenerate a dataset."""
        scheduler = self.pipeline.scheduler
        return {
            **self.describe(),
            "local_fingerprint": self.fingerprint,
            "pipeline": type(self.pipeline).__name__,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": {
                k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")
            },
            "num_inference_steps": NUM_INFERENCE_STEPS,
            "guidance_scale": GUIDANCE_SCALE,
            "noise": "per image: torch.Generator('cpu').manual_seed(seed)",
            "speed_options": self.options or {},
        }


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
