"""The warm model: one diffusers pipeline on one device, sampling many batches.

``worker.model.loading`` makes a ``Generator`` (the setup step, seconds to minutes);
``render`` is the per-batch step. Families (``core.models``): SDXL and SD get cached prompt
embeddings (``PromptCache``) and the service's own decode; any other text-to-image pipeline
is called with its prompts as they are; the class-conditional ``DiTPipeline`` takes
ImageNet-1K class ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from worker.model import latents as latent_space
from worker.model.guidance import per_image as per_image_guidance
from worker.model.prompts import PromptCache

if TYPE_CHECKING:
    from core.spec import DatasetSpec

log = logging.getLogger(__name__)

#: Families whose prompts are encoded once and cached, and whose latents the service decodes.
EMBEDDED_FAMILIES = ("sdxl", "sd")
DECODERS = ("vae", "tiny")


class PartUnavailable(ValueError):
    """A request needs an optional part this worker runs without (the tiny decoder).

    ``error_type`` is the public error type a job failing with it gets (``core.failures``)."""

    error_type = "invalid_request"


@dataclass(frozen=True)
class SamplingParams:
    """How a job samples: side, decoder, steps, guidance and (image-to-image) strength.
    None means the model's own default."""

    resolution: int | None = None
    decoder: str = "vae"
    steps: int | None = None
    guidance_scale: float | None = None
    strength: float = 1.0
    #: ``guidance_scale: [low, high]``: each image's own scale is drawn in it (the pipeline
    #: runs at high; ``Conditioning.guidance`` holds the images' scales).
    guidance_range: tuple[float, float] | None = None

    @classmethod
    def from_spec(cls, spec: DatasetSpec) -> SamplingParams:
        """What ``spec`` asks of the model."""
        return cls(
            resolution=spec.resolution,
            decoder=spec.decoder,
            steps=spec.steps,
            # A [low, high] range: the pipeline runs at high, each image at its own scale
            # (Conditioning.guidance, worker.model.guidance).
            guidance_scale=(
                spec.guidance_range[1]
                if spec.guidance_range is not None
                else cast(float | None, spec.guidance_scale)
            ),
            strength=spec.denoise_strength if spec.method == "prototypes" else 1.0,
            guidance_range=spec.guidance_range,
        )


@dataclass(frozen=True)
class Conditioning:
    """What a batch is conditioned on besides its prompts, one per image: ImageNet-1K class
    ids (class-conditional models), image-to-image starting latents, or guidance scales
    (a request's ``guidance_scale: [low, high]``; the pipeline runs at ``params``')."""

    class_ids: Sequence[int] | None = None
    init_latents: torch.Tensor | None = None
    guidance: Sequence[float] | None = None

    def part(self, start: int, stop: int, pad: int) -> Conditioning:
        """Rows ``start:stop``, padded with ``pad`` copies of the last row."""
        ids = latents = scales = None
        if self.class_ids is not None:
            ids = _padded(self.class_ids, start, stop, pad)
        if self.init_latents is not None:
            latents = self.init_latents[start:stop]
            if pad:
                latents = torch.cat([latents, latents[-1:].repeat(pad, 1, 1, 1)])
        if self.guidance is not None:
            scales = _padded(self.guidance, start, stop, pad)
        return Conditioning(ids, latents, scales)


NONE = Conditioning()


def _padded(values: Sequence[Any], start: int, stop: int, pad: int) -> list[Any]:
    part = list(values[start:stop])
    return part + part[-1:] * pad


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
    #: Text embeddings per distinct prompt; None: the stock path, every image's prompt through
    #: the text encoders (benchmarks).
    prompts: PromptCache | None = None
    _image_to_image: Any | None = field(default=None, repr=False)

    @property
    def class_conditional(self) -> bool:
        """Whether this model takes ImageNet-1K class ids instead of prompts."""
        return self.family == "dit"

    @property
    def denoiser(self) -> Any:
        """The network every step runs: the UNet, or the transformer of DiT-like pipelines."""
        unet = getattr(self.pipeline, "unet", None)
        return unet if unet is not None else self.pipeline.transformer

    @property
    def decoders(self) -> tuple[str, ...]:
        """The decoders this generator can use: ``vae``, and ``tiny`` when one is loaded."""
        return ("vae", "tiny") if self.tiny is not None else ("vae",)

    def stock_prompts(self) -> Generator:
        """This generator without the prompt cache (the stock prompt path, for comparisons)."""
        return replace(self, prompts=None)

    def check_inputs(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        params: SamplingParams,
        extra: Conditioning,
    ) -> None:
        if not prompts:
            raise ValueError("prompts must not be empty")
        if len(prompts) != len(seeds):
            raise ValueError(
                f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}"
            )
        ids = extra.class_ids
        if self.class_conditional and (ids is None or len(ids) != len(seeds)):
            raise ValueError(f"{self.model} is class-conditional: give one class id per seed")
        if extra.guidance is not None and (
            self.family not in EMBEDDED_FAMILIES or len(extra.guidance) != len(seeds)
        ):
            raise ValueError(
                f"per-image guidance takes one scale per seed, on SDXL or SD models "
                f"({self.model} is {self.family})"
            )
        if params.decoder == "tiny" and self.tiny is None:
            why = self.unavailable.get("tiny_decoder", "DISTILL_TINY_DECODER is none")
            raise PartUnavailable(f"decoder: this worker has no tiny decoder ({why}); use 'vae'")
        if params.decoder not in self.decoders:
            raise ValueError(
                f"decoder must be one of {self.decoders} on this worker, got {params.decoder!r}"
            )

    @torch.inference_mode()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        params: SamplingParams = SamplingParams(),
        extra: Conditioning = NONE,
    ) -> torch.Tensor:
        """Sample one image per prompt (or, class-conditional, per class id); returns
        (N, 3, R, R) floats in [0, 1] on the device.

        ``R`` is ``params.resolution`` or the worker's default (DiT: always its native side).
        With ``extra.init_latents`` (one per prompt, as ``encode_latents`` makes them),
        image-to-image: each is re-noised to ``params.strength`` and denoised by the same model
        (``image_to_image_steps``). Each image's noise comes from its own CPU generator seeded
        with its seed, so an image does not depend on the batch it was sampled in or on the
        device.
        """
        self.check_inputs(prompts, seeds, params, extra)
        side = params.resolution or self.resolution
        guidance = self.guidance_scale if params.guidance_scale is None else params.guidance_scale
        common: dict[str, Any] = {
            "num_inference_steps": params.steps or self.steps,
            "guidance_scale": guidance,
            "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        }
        if self.class_conditional:
            assert extra.class_ids is not None
            ids = [int(i) for i in extra.class_ids]
            sampled: torch.Tensor = self.pipeline(
                class_labels=ids, output_type="pt", **common
            ).images
            return sampled.to(self.device)
        if self.family not in EMBEDDED_FAMILIES:
            # Any other text-to-image pipeline: its prompts as they are, its own decode.
            out = self.pipeline(
                prompt=list(prompts), height=side, width=side, output_type="pt", **common
            )
            images: torch.Tensor = out.images
            return images.to(self.device)
        if self.prompts is not None:
            text: dict[str, Any] = self.prompts.encode(prompts, guided=guidance > 1)
        else:
            text = {"prompt": list(prompts)}
        scales = (
            per_image_guidance(self.pipeline.unet, extra.guidance, guidance)
            if extra.guidance is not None
            else nullcontext()
        )
        with scales:
            if extra.init_latents is not None:
                common["num_inference_steps"] = image_to_image_steps(
                    common["num_inference_steps"], params.strength
                )
                out = self.image_to_image(
                    **text,
                    image=extra.init_latents.to(self.device, self.dtype),
                    strength=params.strength,
                    output_type="latent",
                    **common,
                )
            else:
                out = self.pipeline(**text, height=side, width=side, output_type="latent", **common)
        return self.decode(out.images, decoder=params.decoder)

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
        out = []
        for start in range(0, len(images), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
            pixels = chunk.to(self.device).permute(0, 3, 1, 2).to(self.decode_dtype) / 127.5 - 1
            latents = vae.encode(pixels).latent_dist.mode()
            out.append(latent_space.to_denoiser(latents, vae.config).float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, *, decoder: str = "vae") -> torch.Tensor:
        """Latents -> (N, 3, R, R) floats in [0, 1].

        ``vae``: the model's own, in ``decode_dtype`` (see ``loading.load``). ``tiny``: the
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
        unscaled = latent_space.to_vae(latents.to(self.decode_dtype), vae.config)
        image: torch.Tensor = vae.decode(unscaled, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def render(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        sizes: Sequence[int],
        params: SamplingParams = SamplingParams(),
        extra: Conditioning = NONE,
    ) -> dict[int, np.ndarray]:
        """Sample and shrink: ``{size: (N, size, size, 3) uint8}`` for each requested size.

        A batch that runs out of device memory is retried in halves (down to one image), and
        the size that worked is kept for later batches instead of failing the job. With
        compiled graphs every call holds ``fixed_batch`` images (the last batch is padded with
        copies of its last image, dropped afterwards), so nothing recompiles.
        """
        self.check_inputs(prompts, seeds, params, extra)
        parts: list[dict[int, np.ndarray]] = []
        start = 0
        while start < len(prompts):
            step = min(self.max_batch or len(prompts), len(prompts) - start)
            stop = start + step
            pad = max((self.fixed_batch or 0) - step, 0) if self.max_batch is None else 0
            try:
                rendered = self.render_call(
                    _padded(prompts, start, stop, pad),
                    _padded(seeds, start, stop, pad),
                    sizes=sizes,
                    params=params,
                    extra=extra.part(start, stop, pad),
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
            start = stop
        if len(parts) == 1:
            return parts[0]
        return {size: np.concatenate([p[size] for p in parts]) for size in parts[0]}

    @torch.inference_mode()
    def render_call(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        sizes: Sequence[int],
        params: SamplingParams = SamplingParams(),
        extra: Conditioning = NONE,
    ) -> dict[int, np.ndarray]:
        """One pipeline call, no retry; resizing runs on the device before one copy to the
        host."""
        images = self.sample(prompts, seeds, params, extra).float()
        return latent_space.shrink(images, sizes)

    def sync(self) -> None:
        """Wait for the device's queued work (timing)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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

    def provenance(self, params: SamplingParams = SamplingParams()) -> dict[str, Any]:
        """Everything about the model and sampler needed to regenerate a dataset sampled with
        ``params`` (its steps and guidance; default: the model's)."""
        scheduler = self.pipeline.scheduler
        guidance = self.guidance_scale if params.guidance_scale is None else params.guidance_scale
        return {
            **self.describe(),
            "local_fingerprint": self.fingerprint,
            "pipeline": type(self.pipeline).__name__,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": {
                k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")
            },
            "num_inference_steps": params.steps or self.steps,
            "guidance_scale": list(params.guidance_range) if params.guidance_range else guidance,
            **(
                {
                    "guidance_per_image": "low + (high - low) * derive_seed(image seed, "
                    "'guidance') / 2**63, rounded to 4 decimals (each image's metadata line "
                    "has it); the pipeline runs at high and the denoiser's conditional "
                    "prediction is rescaled per image (worker.model.guidance)"
                }
                if params.guidance_range
                else {}
            ),
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


def image_to_image_steps(steps: int, strength: float) -> int:
    """The ``num_inference_steps`` an image-to-image call needs so that ``steps`` of them
    run: diffusers runs ``int(num_inference_steps * strength)`` (0 would skip the model)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    total = max(math.ceil(steps / strength), steps)
    while int(total * strength) < steps:
        total += 1
    return total
