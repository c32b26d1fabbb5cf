"""A classifier-free guidance scale per image in one batch (``guidance_scale: [low, high]``).

Diffusers' text-to-image pipelines take one scale per call: at each step they run the
denoiser on ``[unconditional; conditional]`` and combine ``u + g * (c - u)``. Called with
``g`` = the batch's largest scale ``top``, a forward hook on the denoiser replaces each
image's conditional prediction ``c_i`` by ``u_i + (g_i / top) * (c_i - u_i)``, so the
pipeline's own combination gives ``u_i + g_i * (c_i - u_i)``: each image's own guidance,
exactly, with the batch kept whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def per_image(denoiser: Any, scales: Sequence[float], top: float) -> Iterator[None]:
    """While open, ``denoiser``'s guided calls (batch ``2 * len(scales)``) give image ``i``
    the scale ``scales[i]`` when the pipeline is called with ``guidance_scale=top``."""
    if top <= 1.0:
        raise ValueError(f"per-image guidance needs the batch's top scale above 1, got {top}")
    ratios = torch.tensor([float(s) / top for s in scales], dtype=torch.float32)

    def hook(module: Any, args: Any, output: Any) -> Any:
        pred = output[0] if isinstance(output, tuple) else output.sample
        if pred.shape[0] != 2 * len(ratios):
            raise ValueError(
                f"per-image guidance expects a guided batch of {2 * len(ratios)}, "
                f"got {pred.shape[0]}"
            )
        uncond, cond = pred.chunk(2)
        ratio = ratios.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
        mixed = torch.cat([uncond, uncond + ratio * (cond - uncond)])
        if isinstance(output, tuple):
            return (mixed, *output[1:])
        output.sample = mixed
        return output

    handle = denoiser.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
