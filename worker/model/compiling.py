"""Speed without other images: ``torch.compile`` modes, their warm-up, the batch-size search.

``regional`` compiles the UNet's repeated blocks (diffusers' ``compile_repeated_blocks``:
several times faster to compile than the whole graph), ``full`` the whole UNet (max-autotune
with CUDA graphs on a GPU); both also compile the decoders, fuse the attention QKV
projections and set inductor as diffusers' speed guide does. Compiled graphs run at one batch
size (shorter batches are padded) and are warmed up here, so the first job does not pay for
compiling.
"""

from __future__ import annotations

import logging
import time

import torch

from worker.model.generator import Conditioning, Generator, SamplingParams

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "regional", "full")


def enable(generator: Generator, mode: str, *, batch_size: int) -> float:
    """Compile ``generator`` for ``batch_size`` images a call (after ``tune_batch``, say);
    returns the seconds taken."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "off":
        return 0.0
    generator.compile, generator.fixed_batch = mode, batch_size
    if generator.options is not None:
        generator.options["compile"] = mode
    return compile_graphs(generator)


def _warm_ids(generator: Generator, batch: int) -> Conditioning:
    if not generator.class_conditional:
        return Conditioning()
    return Conditioning(class_ids=[n % 1000 for n in range(batch)])


def compile_graphs(generator: Generator) -> float:
    """Compile the UNet and the decoders (``generator.compile``), then warm every graph up at
    the fixed batch size; returns (and keeps) the seconds it took."""
    started = time.perf_counter()
    inductor_settings(generator.device)
    pipeline = generator.pipeline
    if hasattr(pipeline, "fuse_qkv_projections"):
        pipeline.fuse_qkv_projections()
    cuda = generator.device.type == "cuda"
    name = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
    denoiser = generator.denoiser
    if generator.compile == "regional" and getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(fullgraph=True)
    else:
        mode = "max-autotune" if cuda and generator.compile == "full" else None
        setattr(pipeline, name, torch.compile(denoiser, mode=mode, fullgraph=True))
    # Decoders have no repeated blocks to speak of: compile them whole.
    pipeline.vae.decode = torch.compile(pipeline.vae.decode, fullgraph=True)
    if generator.tiny is not None:
        generator.tiny.decode = torch.compile(generator.tiny.decode, fullgraph=True)
    batch = generator.fixed_batch or 1
    for decoder in generator.decoders:
        generator.sample(
            [f"warm-up {n}" for n in range(batch)],
            list(range(batch)),
            SamplingParams(decoder=decoder),
            _warm_ids(generator, batch),
        )
    generator.sync()
    generator.compile_seconds = time.perf_counter() - started
    log.info(
        "compiled (%s) and warmed up in %.1f s",
        generator.compile,
        generator.compile_seconds,
        extra={"compile": generator.compile, "seconds": round(generator.compile_seconds, 1)},
    )
    return generator.compile_seconds


def tune_batch(
    generator: Generator, start: int, *, limit: int = 256, gain: float = 1.05
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
        extra = _warm_ids(generator, batch)
        try:
            generator.render_call(prompts, list(range(batch)), sizes=(32,), extra=extra)  # warm-up
            generator.sync()
            started = time.perf_counter()
            generator.render_call(prompts, list(range(batch)), sizes=(32,), extra=extra)
            generator.sync()
        except torch.OutOfMemoryError:
            tried.append((batch, None))
            if generator.device.type == "cuda":
                torch.cuda.empty_cache()
            break
        rate = batch / max(time.perf_counter() - started, 1e-9)
        tried.append((batch, round(rate, 2)))
        if rate < best_rate * gain:
            break
        best, best_rate = batch, rate
        batch *= 2
    return best, tried


def inductor_settings(device: torch.device) -> None:
    """Inductor as diffusers' speed guide sets it for SDXL (1x1 convolutions as matrix
    multiplies, coordinate-descent tuning of the generated kernels)."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = device.type == "cuda"
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = device.type == "cuda"
