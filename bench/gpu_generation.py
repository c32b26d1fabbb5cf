"""GPU figures for the generation path on the full-size SDXL-Turbo architecture (random weights).

    python bench/gpu_generation.py SKELETON_DIR [--batch 16] [--images 64] [--json OUT]

Imports torch, diffusers and transformers only (and worker.generator), so it runs on a bare
GPU box. Modes, one process, one card:
- reference: the paper's loop, one prompt per call at 512 px, float16, stock pipeline output
  (PIL, VAE upcast to float32 on every call), PIL bicubic resize to 32 px.
- engine:    worker.generator.Generator.render, batched, VAE kept in float32 (the default) and
             in bfloat16, resized to 32 and 40 px on the GPU, one copy to the host.
- bare:      the batched forward passes alone: pipeline to latents + VAE decode, no resize.
The CPU side (augmentation, PNG, zip) is measured by bench/generation.py on any machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    import torch
    from generation import build_skeleton  # type: ignore[import-not-found]
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("skeleton", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--reference-images", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    started = time.perf_counter()
    gen = build_skeleton(args.skeleton, "cuda")
    build_s = time.perf_counter() - started
    device = gen.device
    results: dict[str, dict[str, float]] = {}

    def timed(name: str, count: int, fn: object) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        results[name] = {
            "images": count,
            "seconds": round(seconds, 3),
            "images_per_second": round(count / seconds, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        print(name, results[name], flush=True)

    prompts = [f"a photo of a class {i % 10}" for i in range(args.images)]
    seeds = list(range(args.images))

    # Stock pipeline: VAE back in float16 with force_upcast, as the paper's script runs it.
    stock_vae_dtype = torch.float16
    gen.pipeline.vae.to(dtype=stock_vae_dtype)

    def reference() -> None:
        for i in range(args.reference_images):
            image = gen.pipeline(
                prompt=prompts[i],
                num_inference_steps=1,
                guidance_scale=0.0,
                height=512,
                width=512,
                generator=torch.Generator("cpu").manual_seed(i),
            ).images[0]
            image.resize((32, 32), Image.BICUBIC)

    reference_warm = gen.pipeline(prompt="warm", num_inference_steps=1, guidance_scale=0.0)
    del reference_warm
    timed("reference", args.reference_images, reference)

    def engine_run() -> None:
        for start in range(0, args.images, args.batch):
            gen.render(
                prompts[start : start + args.batch],
                seeds[start : start + args.batch],
                sizes=(32, 40),
            )

    for decode in (torch.float32, torch.bfloat16):
        gen.pipeline.vae.to(dtype=decode)
        gen.decode_dtype = decode
        gen.render(prompts[: args.batch], seeds[: args.batch], sizes=(32, 40))  # warm-up
        timed(f"engine ({str(decode).removeprefix('torch.')} decode)", args.images, engine_run)

    gen.pipeline.vae.to(dtype=torch.float32)
    gen.decode_dtype = torch.float32

    def bare() -> None:
        with torch.inference_mode():
            for start in range(0, args.images, args.batch):
                out = gen.pipeline(
                    prompt=prompts[start : start + args.batch],
                    num_inference_steps=1,
                    guidance_scale=0.0,
                    height=512,
                    width=512,
                    output_type="latent",
                )
                gen.decode(out.images)

    timed("bare (float32 decode)", args.images, bare)
    summary = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "batch": args.batch,
        "build_seconds": round(build_s, 1),
        "results": results,
        "engine/reference": round(
            results["engine (float32 decode)"]["images_per_second"]
            / results["reference"]["images_per_second"],
            2,
        ),
        "engine/bare": round(
            results["engine (float32 decode)"]["images_per_second"]
            / results["bare (float32 decode)"]["images_per_second"],
            3,
        ),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
