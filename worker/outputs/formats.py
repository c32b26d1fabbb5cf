"""Tensor outputs: ``tensors.pt`` (uint8 images), ``normalized.pt`` (normalized, with labels)
and ``<preset>.pt`` (the ECCV 2024 Dataset Distillation Challenge's file: one bare tensor).

Both are class-major (all of class 0, then class 1, ...) and load with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch


def _stack(images: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) uint8 arrays -> (N, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _save(obj: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def tensors_pt(images: Sequence[np.ndarray], labels: Sequence[int], classes: list[str]) -> bytes:
    """``{"images": uint8 (N,3,H,W) in [0,255], "labels": int64 (N,), "classes": [str]}``."""
    return _save(
        {
            "images": _stack(images),
            "labels": torch.tensor(list(labels), dtype=torch.int64),
            "classes": list(classes),
        }
    )


def _normalized(
    images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(x/255 - mean)/std as float32 (N, 3, H, W)."""
    pixels = _stack(images).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - m) / s


def normalized_pt(
    images: Sequence[np.ndarray],
    labels: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
) -> bytes:
    """``{"images": float32 (N,3,H,W) = (x/255 - mean)/std, "labels": int64, "mean", "std"}``."""
    return _save(
        {
            "images": _normalized(images, mean, std),
            "labels": torch.tensor(list(labels), dtype=torch.int64),
            "mean": torch.tensor(mean, dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32),
        }
    )


def challenge_pt(
    images: Sequence[np.ndarray], *, mean: Sequence[float], std: Sequence[float]
) -> bytes:
    """One float32 tensor (N, 3, H, W) = (x/255 - mean)/std, class-major, nothing else: what
    the challenge's ``evaluate.py`` loads with ``torch.load`` (labels are implied by order)."""
    buffer = io.BytesIO()
    torch.save(_normalized(images, mean, std).contiguous(), buffer)
    return buffer.getvalue()
