"""Latents and pixels: the VAE's scaling both ways, resizing on the device, pipeline geometry.

SDXL's VAE config may carry per-channel ``latents_mean`` / ``latents_std``; otherwise a single
``scaling_factor`` maps the VAE's latents to the denoiser's. Every path (decoding, image-to-image
encoding, the benchmarks' stock loop) uses these two functions, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _moments(config: Mapping[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(config["latents_mean"]).view(1, 4, 1, 1).to(like)
    std = torch.tensor(config["latents_std"]).view(1, 4, 1, 1).to(like)
    return mean, std


def _has_moments(config: Mapping[str, Any]) -> bool:
    return config.get("latents_mean") is not None and config.get("latents_std") is not None


def to_denoiser(latents: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """The VAE encoder's latents as the denoiser sees them."""
    factor = float(config["scaling_factor"])
    if _has_moments(config):
        mean, std = _moments(config, latents)
        return (latents - mean) * factor / std
    return latents * factor


def to_vae(latents: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """The denoiser's latents as the VAE decoder takes them (``to_denoiser`` undone)."""
    factor = float(config["scaling_factor"])
    if _has_moments(config):
        mean, std = _moments(config, latents)
        return latents * std / factor + mean
    return latents / factor


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
