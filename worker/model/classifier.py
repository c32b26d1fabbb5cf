"""Pretrained soft-label teachers (``soft_labels.teacher``): image classifiers loaded once per
worker, all optional.

``load_all(settings, device=...)`` loads each source of ``DISTILL_TEACHERS`` (a hub id or a
directory holding a ``transformers`` image classifier, ``AutoModelForImageClassification``,
with its ``preprocessor_config.json``). It never raises: a teacher that cannot be loaded is
logged in one line saying why and how to enable it, and its reason is reported under
``unavailable`` (``/readyz``, ``GET /v1/models``), where admission reads it to answer 422.

``Classifier.logits(image)`` labels one uint8 (S, S, 3) image as its image processor would
for a square image (bicubic resize to its input side, its mean and std), one image per
forward pass in float32, so an image's logits never depend on the images beside it.
``labels`` are its class names by index (``config.id2label``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.settings import Settings
from worker.model.loading import fingerprint
from worker.model.pixels import normalised, processor_numbers

log = logging.getLogger("worker")

TEACHERS_PART = "teachers"
TEACHER_HINT = (
    "set DISTILL_TEACHERS to hub ids or local directories of transformers image classifiers "
    "(AutoModelForImageClassification with preprocessor_config.json), comma-separated; "
    "`python -m worker.model.tiny_model DIR --family classifier` writes one for a smoke test"
)
#: ImageNet's normalisation, where a preprocessor config gives none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Classifier:
    """A loaded image classifier and its preprocessing."""

    model: Any
    source: str
    device: torch.device
    labels: list[str]
    #: The side it takes, and its per-channel mean and std (0-1 scale).
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str | None = None

    @torch.inference_mode()
    def logits(self, image: np.ndarray) -> np.ndarray:
        """float32 (len(labels),) logits of one uint8 (S, S, 3) image."""
        pixels = normalised(np.asarray(image)[None], size=self.size, mean=self.mean, std=self.std)
        out = self.model(pixel_values=pixels.to(self.device)).logits
        logits: np.ndarray = out[0].to("cpu", torch.float32).numpy()
        return logits

    def describe(self) -> dict[str, Any]:
        """What the manifest says of it."""
        config = self.model.config
        return {
            "teacher": self.source,
            "network": (config.architectures or [type(self.model).__name__])[0],
            **({"fingerprint": self.fingerprint} if self.fingerprint else {}),
            "classes": len(self.labels),
            "image_size": self.size,
            "dtype": "float32",
            "batch": "one image per forward pass",
        }


def load_all(
    settings: Settings, *, device: torch.device | str
) -> tuple[dict[str, Classifier], dict[str, str]]:
    """Every teacher of ``DISTILL_TEACHERS`` that loads (by its name there), and why each
    other one did not. Never raises: teachers are optional."""
    loaded: dict[str, Classifier] = {}
    failed: dict[str, str] = {}
    for source in settings.teacher_sources:
        try:
            loaded[source] = _load_one(source, torch.device(device))
        except Exception as exc:  # noqa: BLE001 - any failure only disables that teacher
            failed[source] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    if failed:
        log.warning(
            "running without the teacher(s) %s (soft_labels requests naming them get a "
            "422): %s. To enable them: %s",
            ", ".join(failed),
            "; ".join(f"{k}: {v}" for k, v in failed.items()),
            TEACHER_HINT,
            extra={"part": TEACHERS_PART},
        )
    return loaded, failed


def _load_one(source: str, device: torch.device) -> Classifier:
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(source, dtype=torch.float32)
    model = model.to(device).eval()
    size, mean, std = processor_numbers(source, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    count = int(model.config.num_labels)
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    return Classifier(
        model=model,
        source=source,
        device=device,
        labels=[id2label.get(i, f"LABEL_{i}") for i in range(count)],
        size=size,
        mean=mean,
        std=std,
        fingerprint=fingerprint(Path(source)) if Path(source).is_dir() else None,
    )
