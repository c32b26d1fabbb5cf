"""Throughput of each model family at its default settings, as a share of the GPU's peak.

On a GPU (full-size architectures with random weights built from the published configs: cost
does not depend on weight values; about 3 minutes on an H200):

  python bench/gpu_families.py ../shared/models/sdxl-turbo-skeleton \
      --json bench/results/families.json

Smoke run on a CPU (tiny random pipelines of each family, seconds, figures meaningless):

  HF_HUB_OFFLINE=1 python bench/gpu_families.py --smoke

Families and what one image costs at their defaults (``core.models.CATALOGUE``):
- sdxl-turbo: SDXL UNet, 1 step, guidance 0, 512 px (configs: the SDXL-Turbo skeleton);
- sd-turbo:   SD 2.1 UNet, 1 step, guidance 0, 512 px (``bench/configs/sd-turbo``);
- dit-xl-2-256: DiT-XL/2, 25 steps, guidance 4 (the conditional and the null-class pass of
  every step run as one batch of two), 256 px (``bench/configs/dit-xl-2-256``).
Each runs through ``worker.generator.Generator.render`` (the worker's own path: prompts
encoded once, VAE decode, resize to 32 px on the device), eager, model dtype float16 on a GPU.

FLOPs per image are counted with torch.utils.flop_counter.FlopCounterMode on the meta device:
the denoiser's forward (x2 with guidance above 1) times the steps, plus one VAE decode; text
encoding is left out (cached: once per class, not per image). MFU = FLOPs x images / seconds
/ the card's dense float16 tensor peak (``bench/gpu_generation.py`` PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from gpu_generation import peak_tflops  # noqa: E402

from core import models  # noqa: E402
from worker.model.generator import Conditioning, Generator  # noqa: E402
from worker.model.latents import vae_scale  # noqa: E402
from worker.model.loading import LoadOptions, load, pick_device, pick_dtype, wrap  # noqa: E402

CONFIGS = ROOT / "bench" / "configs"


def _json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def build_sd(skeleton: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """SD-Turbo's architecture with random weights (tokenizer: SDXL's OpenCLIP one)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = CONFIGS / "sd-turbo"
    scheduler = EulerDiscreteScheduler.from_config(_json(root / "scheduler/scheduler_config.json"))
    with torch.device(device):
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_config(_json(root / "vae/config.json")),
            text_encoder=CLIPTextModel(CLIPTextConfig(**_json(root / "text_encoder/config.json"))),
            tokenizer=CLIPTokenizer.from_pretrained(skeleton / "tokenizer_2"),
            unet=UNet2DConditionModel.from_config(_json(root / "unet/config.json")),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe.to(device, dtype)


def build_dit(device: torch.device, dtype: torch.dtype) -> Any:
    """DiT-XL/2-256's architecture with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    root = CONFIGS / "dit-xl-2-256"
    scheduler = DDIMScheduler.from_config(_json(root / "scheduler/scheduler_config.json"))
    with torch.device(device):
        pipe = DiTPipeline(
            transformer=DiTTransformer2DModel.from_config(_json(root / "transformer/config.json")),
            vae=AutoencoderKL.from_config(_json(root / "vae/config.json")),
            scheduler=scheduler,
        )
    return pipe.to(device, dtype)


def build_sdxl(skeleton: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from generation import build_skeleton

    generator: Generator = build_skeleton(skeleton, str(device))
    return generator.pipeline


def denoiser_flops(gen: Generator, batch_rows: int) -> float:
    """FLOPs of one denoiser forward over ``batch_rows`` latents, on meta copies."""
    from torch.utils.flop_counter import FlopCounterMode

    net = gen.denoiser
    side = gen.resolution // vae_scale(gen.pipeline)
    channels = int(net.config.in_channels)
    with torch.device("meta"):
        meta = type(net).from_config(net.config).to(gen.dtype)
        latents = torch.zeros(batch_rows, channels, side, side, dtype=gen.dtype)
        t = torch.ones(batch_rows, dtype=torch.long)
        if gen.family == "dit":
            call: Callable[[], Any] = lambda: meta(latents, timestep=t, class_labels=t)  # noqa: E731
        else:
            width = int(net.config.cross_attention_dim)
            text = torch.zeros(batch_rows, 77, width, dtype=gen.dtype)
            extra: dict[str, Any] = {}
            if net.config.addition_embed_type == "text_time":
                pooled = int(net.config.projection_class_embeddings_input_dim) - 6 * int(
                    net.config.addition_time_embed_dim
                )
                extra["added_cond_kwargs"] = {
                    "text_embeds": torch.zeros(batch_rows, pooled, dtype=gen.dtype),
                    "time_ids": torch.zeros(batch_rows, 6, dtype=gen.dtype),
                }
            call = lambda: meta(latents, t, encoder_hidden_states=text, **extra)  # noqa: E731
        counter = FlopCounterMode(display=False)
        with counter:
            call()
    return float(counter.get_total_flops())


def decode_flops(gen: Generator) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    vae = gen.pipeline.vae
    side = gen.resolution // vae_scale(gen.pipeline)
    with torch.device("meta"):
        meta = type(vae).from_config(vae.config).to(gen.decode_dtype)
        latents = torch.zeros(
            1, int(vae.config.latent_channels), side, side, dtype=gen.decode_dtype
        )
        counter = FlopCounterMode(display=False)
        with counter:
            meta.decode(latents)
    return float(counter.get_total_flops())


def per_image_flops(gen: Generator) -> float:
    passes = 2 if gen.guidance_scale > 1 else 1
    return denoiser_flops(gen, passes) * gen.steps + decode_flops(gen)


def measure(gen: Generator, *, batch: int, images: int, peak: float | None) -> dict[str, Any]:
    prompts = [f"a photo of a class {n % 10} object" for n in range(batch)]
    ids = [n % 1000 for n in range(batch)] if gen.class_conditional else None

    def one() -> None:
        gen.render(prompts, list(range(batch)), sizes=(32,), extra=Conditioning(class_ids=ids))

    one()  # warm-up (kernels, allocator, prompt cache)
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
        torch.cuda.reset_peak_memory_stats(gen.device)
    calls = max(images // batch, 1)
    started = time.perf_counter()
    for _ in range(calls):
        one()
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    seconds = time.perf_counter() - started
    flops = per_image_flops(gen)
    rate = calls * batch / seconds
    return {
        "family": gen.family,
        "pipeline": type(gen.pipeline).__name__,
        "resolution": gen.resolution,
        "steps": gen.steps,
        "guidance_scale": gen.guidance_scale,
        "batch": batch,
        "images": calls * batch,
        "seconds": round(seconds, 3),
        "images_per_second": round(rate, 2),
        "gflop_per_image": round(flops / 1e9, 1),
        "mfu": round(flops * rate / (peak * 1e12), 4) if peak else None,
        "peak_gpu_gib": (
            round(torch.cuda.max_memory_allocated(gen.device) / 2**30, 2)
            if gen.device.type == "cuda"
            else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_families.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("skeleton", nargs="?", type=Path, help="the SDXL-Turbo config directory")
    parser.add_argument("--smoke", action="store_true", help="tiny pipelines on the CPU")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count FLOPs per image of the full-size models on the meta device; time nothing",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=128, help="images timed per family")
    parser.add_argument("--families", nargs="+", default=["sdxl-turbo", "sd-turbo", "dit-xl-2-256"])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    from worker.model.quiet import quiet_libraries

    quiet_libraries()
    device = pick_device("cpu" if args.smoke else None)
    dtype = pick_dtype(None, device)
    if args.flops_only:
        device, dtype = torch.device("meta"), torch.float16
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    peak = peak_tflops(card) if device.type == "cuda" else None
    defaults = {
        "sdxl-turbo": models.CATALOGUE["stabilityai/sdxl-turbo"],
        "sd-turbo": models.CATALOGUE["stabilityai/sd-turbo"],
        "dit-xl-2-256": models.CATALOGUE["facebook/DiT-XL-2-256"],
    }
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.families:
            known = defaults[name]
            if args.smoke:
                from worker.model.tiny_model import build

                family = {"sdxl-turbo": "sdxl", "sd-turbo": "sd", "dit-xl-2-256": "dit"}[name]
                path = build(Path(scratch) / name, family=family)
                gen = load(str(path), LoadOptions(device="cpu"))
                gen.steps = min(known.steps, 2)
                gen.guidance_scale = known.guidance_scale
            else:
                if args.skeleton is None and name != "dit-xl-2-256":
                    parser.error(f"{name} needs the SDXL-Turbo config directory (or --smoke)")
                if name == "sdxl-turbo":
                    pipe = build_sdxl(args.skeleton, device, dtype)
                elif name == "sd-turbo":
                    pipe = build_sd(args.skeleton, device, dtype)
                else:
                    pipe = build_dit(device, dtype)
                on = LoadOptions(device=str(device), dtype=str(dtype).removeprefix("torch."))
                gen = wrap(
                    pipe, model=name, options=on, defaults=(known.steps, known.guidance_scale)
                )
            if args.flops_only:
                row = {
                    "model": name,
                    "family": gen.family,
                    "resolution": gen.resolution,
                    "steps": gen.steps,
                    "guidance_scale": gen.guidance_scale,
                    "denoiser_gflop_per_pass": round(denoiser_flops(gen, 1) / 1e9, 1),
                    "decode_gflop": round(decode_flops(gen) / 1e9, 1),
                    "gflop_per_image": round(per_image_flops(gen) / 1e9, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            batch = min(args.batch, 4) if args.smoke else args.batch
            images = min(args.images, 8) if args.smoke else args.images
            row = {"model": name, **measure(gen, batch=batch, images=images, peak=peak)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del gen
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.flops_only:
        return 0
    print()
    print(f"card {card} (peak {peak or '-'} TFLOP/s dense fp16), dtype {str(dtype)[6:]}")
    header = ("model", "res", "steps", "cfg", "batch", "img/s", "GFLOP/img", "MFU")
    print("  ".join(f"{h:>12}" for h in header))
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        cells = (
            r["model"], r["resolution"], r["steps"], r["guidance_scale"], r["batch"],
            r["images_per_second"], r["gflop_per_image"], mfu,
        )  # fmt: skip
        print("  ".join(f"{c!s:>12}" for c in cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "card": card,
            "peak_tflops": peak,
            "torch": torch.__version__,
            "smoke": args.smoke,
            "rows": rows,
        }
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
