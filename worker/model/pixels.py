"""Images as an image classifier's processor would give them (the CLIP scorer, pretrained
teachers): its numbers read from ``preprocessor_config.json`` as they are written, and uint8
square images resized and normalised by them, on the CPU in float32."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: The side a model takes where its preprocessor config names none.
DEFAULT_SIDE = 224


def processor_numbers(
    source: str, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(side, mean, std) of the image processor at ``source`` (a hub id or a directory);
    ``mean`` and ``std`` where it states none."""
    from transformers.image_processing_base import ImageProcessingMixin

    processor, _ = ImageProcessingMixin.get_image_processor_dict(source)
    return (
        _side(processor),
        tuple(float(v) for v in processor.get("image_mean", mean)),
        tuple(float(v) for v in processor.get("image_std", std)),
    )


def _side(processor: dict[str, Any]) -> int:
    """The square side the model takes: its crop size, else its resize size."""
    for key in ("crop_size", "size"):
        value = processor.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            for name in ("height", "shortest_edge", "width"):
                if isinstance(value.get(name), int):
                    return int(value[name])
    return DEFAULT_SIDE


def normalised(
    images: np.ndarray, *, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float32 (N, 3, size, size) on the CPU: on the 0-1 scale, resized
    bicubic (antialiased, clamped) where S is not ``size``, then normalised by mean and std."""
    pixels = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2)
    pixels = pixels.to(torch.float32) / 255.0
    if pixels.shape[-1] != size or pixels.shape[-2] != size:
        pixels = torch.nn.functional.interpolate(
            pixels, size=(size, size), mode="bicubic", antialias=True
        ).clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
