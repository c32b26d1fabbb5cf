"""Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021), as used to evaluate sets.

The strategy ``color_crop_cutout_flip_scale_rotate`` in DSA's single mode: each batch draws ONE
family at random and applies it with independent random parameters per image:

=========  ==================================================================================
color      brightness ``x + (r - 0.5) * 1.0``, then saturation ``(x - gray) * 2r + gray``,
           then contrast ``(x - mean) * (r + 0.5) + mean`` (gray: channel mean per pixel,
           mean: per image); each r ~ U(0, 1), drawn per image
crop       translate by up to 1/8 of the side (integers), empty pixels are 0 ("pad and crop")
cutout     zero a square of half the side, centred anywhere (it may hang off the border)
flip       horizontal flip with probability 0.5
scale      stretch x and y independently by a factor in [1/1.2, 1.2] (bilinear, zero fill)
rotate     rotate by an angle in [-15, 15] degrees (bilinear, zero fill)
=========  ==================================================================================

The operations work on the normalised tensors the network sees (0 is the dataset mean), as in
the reference code. Every random number comes from the ``torch.Generator`` passed in, on the
CPU, so a seed gives the same augmentation on any device and global RNG state is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    """Magnitudes of the reference implementation (``ParamDiffAug``)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def _uniform(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """n draws from U(0, 1) on the CPU generator, shaped (n, 1, 1, 1) on ``like``'s device."""
    return torch.rand(n, generator=generator).view(n, 1, 1, 1).to(like.device, like.dtype)


def color(x: torch.Tensor, g: torch.Generator, p: DSAParams = DSAParams()) -> torch.Tensor:
    """Brightness, saturation and contrast jitter, one draw of each per image."""
    n = x.shape[0]
    x = x + (_uniform(n, g, x) - 0.5) * p.brightness
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * (_uniform(n, g, x) * p.saturation) + gray
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(n, g, x) + p.contrast) + mean


def crop(x: torch.Tensor, g: torch.Generator, p: DSAParams = DSAParams()) -> torch.Tensor:
    """Integer translation with zero fill: padding then cropping back to the original size."""
    n, _, h, w = x.shape
    sy, sx = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    ty = torch.randint(-sy, sy + 1, (n, 1), generator=g).to(x.device)
    tx = torch.randint(-sx, sx + 1, (n, 1), generator=g).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h) + ty  # source row of each output row
    cols = torch.arange(w, device=x.device).view(1, w) + tx
    valid = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(
        n, 1, 1, w
    )
    rows = rows.clamp(0, h - 1).view(n, 1, h, 1).expand(n, x.shape[1], h, w)
    cols = cols.clamp(0, w - 1).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    moved = x.gather(2, rows).gather(3, cols)
    return moved * valid.to(x.dtype)


def cutout(x: torch.Tensor, g: torch.Generator, p: DSAParams = DSAParams()) -> torch.Tensor:
    """Zero one square of ``ratio_cutout`` of the side per image, at a random centre."""
    n, _, h, w = x.shape
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    # Centre ranges as in the reference code (one extra position for even sizes).
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1), generator=g).to(x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1), generator=g).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h) - (cy - ch // 2)
    cols = torch.arange(w, device=x.device).view(1, w) - (cx - cw // 2)
    inside = ((rows >= 0) & (rows < ch)).view(n, 1, h, 1) & ((cols >= 0) & (cols < cw)).view(
        n, 1, 1, w
    )
    return x * (~inside).to(x.dtype)


def flip(x: torch.Tensor, g: torch.Generator, p: DSAParams = DSAParams()) -> torch.Tensor:
    """Mirror left-right with probability ``prob_flip`` per image."""
    chosen = _uniform(x.shape[0], g, x) < p.prob_flip
    return torch.where(chosen, x.flip(3), x)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def scale(x: torch.Tensor, g: torch.Generator, p: DSAParams = DSAParams()) -> torch.Tensor:
    """Independent x and y stretch by a factor in [1/ratio, ratio]."""
    n, r = x.shape[0], p.ratio_scale
    sx = torch.rand(n, generator=g) * (r - 1.0 / r) + 1.0 / r
    sy = torch.rand(n, generator=g) * (r - 1.0 / r) + 1.0 / r
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _warp(x, theta)


def rotate(x: torch.Tensor, g: torch.Generator, p: DSAParams = DSAParams()) -> torch.Tensor:
    """Rotation by an angle in [-ratio_rotate, ratio_rotate] degrees about the centre."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return _warp(x, theta)


Augmentation = Callable[[torch.Tensor, torch.Generator, DSAParams], torch.Tensor]

#: The families of the strategy, in the order of its name (the draw indexes this tuple).
FAMILIES: tuple[tuple[str, Augmentation], ...] = (
    ("color", color),
    ("crop", crop),
    ("cutout", cutout),
    ("flip", flip),
    ("scale", scale),
    ("rotate", rotate),
)


def augment(
    x: torch.Tensor, generator: torch.Generator, params: DSAParams = DSAParams()
) -> torch.Tensor:
    """One DSA draw for a batch: pick a family, apply it with per-image parameters.

    Shapes are kept. The result is differentiable in ``x``; the same generator state gives
    the same output.
    """
    index = int(torch.randint(0, len(FAMILIES), (1,), generator=generator).item())
    return FAMILIES[index][1](x, generator, params).contiguous()
