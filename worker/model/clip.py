"""The CLIP model behind ``select.scorer: clip``: loaded once per worker, optional.

``load(settings, device=...)`` tries ``<model>/clip_scorer`` (a local model's own) and then
``DISTILL_CLIP_SCORER`` (a hub id or a directory holding a ``transformers`` ``CLIPModel``
with its tokenizer and ``preprocessor_config.json``). It never raises: a worker that cannot
load it logs one line saying why and how to enable it, runs without it, and reports it under
``unavailable`` (``/readyz``, ``GET /v1/models``), where admission reads it to answer 422.

``ClipModel.images(uint8 (N, S, S, 3))`` embeds images as CLIP's image processor would for a
square image (bicubic resize to its crop size, its mean and std), in fixed chunks of
``CHUNK``: the same images in the same order give the same numbers (a ``select`` pool is
always one whole class, so its chunks are the same however the job is cut).
``texts(prompts)`` embeds prompts. Both are L2-normalised, float64 on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import models
from core.settings import Settings
from worker.model.loading import fingerprint, optional_sources
from worker.model.pixels import normalised, processor_numbers

log = logging.getLogger("worker")

CLIP_HINT = (
    "set DISTILL_CLIP_SCORER to a local directory holding a transformers CLIPModel with its "
    "tokenizer and preprocessor_config.json (a copy of openai/clip-vit-base-patch32, or "
    "`python -m worker.model.tiny_model DIR --family clip` for a smoke test), or put one in "
    "<model>/clip_scorer"
)
#: CLIP's own normalisation, where a preprocessor config gives none.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: Images per forward pass (fixed, so a pool's chunks never depend on the batch size).
CHUNK = 64


def sources(settings: Settings) -> list[str]:
    """Where the CLIP scorer is looked for, in order: a local model's own
    ``<model>/clip_scorer``, then ``DISTILL_CLIP_SCORER``; only the latter when it is set to
    anything but its default. Empty when it is ``none``."""
    return optional_sources(settings, "clip_scorer", models.CLIP_SCORER_DIR)


@dataclass
class ClipModel:
    """A loaded CLIP model, its tokenizer and its image preprocessing."""

    model: Any
    tokenizer: Any
    source: str
    device: torch.device
    dtype: torch.dtype
    #: The image side CLIP takes, and its per-channel mean and std (0-1 scale).
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str | None = None

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().item())

    @torch.inference_mode()
    def images(self, images: np.ndarray) -> np.ndarray:
        """float64 (N, D) unit image embeddings of uint8 (N, S, S, 3) images."""
        out = []
        for start in range(0, len(images), CHUNK):
            chunk = images[start : start + CHUNK]
            pixels = normalised(chunk, size=self.size, mean=self.mean, std=self.std)
            pixels = pixels.to(self.device, self.dtype)
            embedded = self.model.get_image_features(pixel_values=pixels)
            out.append(_unit(embedded))
        return torch.cat(out).numpy()

    @torch.inference_mode()
    def texts(self, prompts: Sequence[str]) -> np.ndarray:
        """float64 (len(prompts), D) unit text embeddings."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.device)
        embedded = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return _unit(embedded).numpy()

    def describe(self) -> dict[str, Any]:
        """What the manifest says of it."""
        return {
            "model": self.source,
            **({"fingerprint": self.fingerprint} if self.fingerprint else {}),
            "image_size": self.size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def _unit(embedded: Any) -> torch.Tensor:
    # Older transformers return the tensor, newer ones may wrap it in a model output.
    tensor = embedded if isinstance(embedded, torch.Tensor) else embedded.pooler_output
    values: torch.Tensor = tensor.to("cpu", torch.float64)
    unit: torch.Tensor = values / values.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit


def load(
    settings: Settings, *, device: torch.device | str, dtype: torch.dtype
) -> tuple[ClipModel | None, str | None]:
    """The first CLIP model of ``sources(settings)`` that loads (and None), or (None, why).
    Never raises: the CLIP scorer is optional."""
    chosen = sources(settings)
    if not chosen:
        return None, "DISTILL_CLIP_SCORER is none"
    reasons = []
    for source in chosen:
        try:
            clip = _load_one(source, torch.device(device), dtype)
        except Exception as exc:  # noqa: BLE001 - any failure only disables the option
            reasons.append(f"{source}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            continue
        if Path(source).is_dir():
            clip.fingerprint = fingerprint(Path(source))
        return clip, None
    why = "; ".join(reasons)
    log.warning(
        "running without the CLIP scorer (requests for select scorer 'clip' get a 422): %s. "
        "To enable it: %s",
        why,
        CLIP_HINT,
        extra={"part": "clip_scorer"},
    )
    return None, why


def _load_one(source: str, device: torch.device, dtype: torch.dtype) -> ClipModel:
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(source, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    size, mean, std = processor_numbers(source, mean=OPENAI_MEAN, std=OPENAI_STD)
    return ClipModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        device=device,
        dtype=dtype,
        size=size,
        mean=mean,
        std=std,
    )
