"""Generation benchmark: the paper's loop vs our engine vs the bare model vs the whole service.

    python bench/generation.py [--classes 10] [--ipc 50] [--size 32] [--batch-size 8]
                               [--model DIR | --skeleton DIR] [--modes reference engine bare
                               service postprocess] [--json FILE]

Modes, each run in its own process so peak memory is its own:
- reference:   the paper's loop: one prompt per pipeline call at the model's resolution, PIL
               output, PIL bicubic resize, then the paper's augmentation on the already-shrunk
               image (its RandomCrop to the same size does nothing), PNG files written to disk.
- engine:      our worker's path (worker.engine.run) for the same classes and IPC, into a zip.
- uncached:    the same, with every image's prompt through the text encoders (the stock
               pipeline's prompt path): what encoding each class prompt once saves.
- bare:        the model's own forward passes only (text encoders + UNet + decoder, batched).
- service:     the same job through the API, Redis, queue and a worker, POST to succeeded.
- postprocess: resize-free CPU side only (paper PDA + PNG + zip) on random images, images/s;
               with --sweep, once per pool kind (threads, processes) and size (1 to 16).

Without --model it builds the tiny random model (CPU smoke figures). With --skeleton it builds
the full-size SDXL-Turbo architecture from a weightless config directory with random weights
(cost does not depend on weight values; needs a GPU to be meaningful). Prints a table; writes
JSON with --json. Figures are measurements, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

MODES = ("reference", "engine", "uncached", "bare", "service", "postprocess")
#: Post-processing pools tried by --sweep: threads and processes, 1 to 16 workers.
SWEEP = [(pool, n) for pool in ("threads", "processes") for n in (1, 2, 4, 8, 16)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(args: argparse.Namespace) -> Any:
    import torch

    from worker.model.loading import LoadOptions
    from worker.model.loading import load as load_model

    if args.skeleton:
        return build_skeleton(Path(args.skeleton), args.device)
    tiny = Path(args.model) / "tiny_decoder"
    options = LoadOptions(
        device=args.device,
        dtype=args.dtype,
        vae_dtype=args.vae_dtype,
        channels_last=args.channels_last,
        tiny_decoder=(str(tiny),) if tiny.is_dir() else (),
        compile=args.compile,
        batch_size=args.batch_size,
    )
    gen = load_model(str(args.model), options)
    if args.child == "uncached":
        gen = gen.stock_prompts()  # the stock path, every image's prompt through the encoders
    if gen.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(gen.device)
    return gen


def build_skeleton(directory: Path, device: str | None) -> Any:
    """Full-size SDXL-Turbo with random weights from its configs (no weight files needed)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from worker.model.loading import LoadOptions, pick_device, pick_dtype, wrap

    target = pick_device(device)
    dtype = pick_dtype(None, target)
    # The scheduler builds numpy arrays: make it outside the device context.
    scheduler = EulerAncestralDiscreteScheduler.from_config(
        EulerAncestralDiscreteScheduler.load_config(directory / "scheduler")
    )
    with torch.device(target):
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(directory / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(directory / "text_encoder")),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(directory / "text_encoder_2")
            ),
            tokenizer=CLIPTokenizer.from_pretrained(directory / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(directory / "tokenizer_2"),
            unet=UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(directory / "unet")
            ),
            scheduler=scheduler,
        )
    # channels-last off: the recorded GPU figures (BENCHMARKS.md) were measured without it.
    return wrap(
        pipe.to(target, dtype), model=str(directory), options=LoadOptions(channels_last=False)
    )


def spec_for(args: argparse.Namespace) -> Any:
    from core.spec import DatasetSpec

    labels = [f"class {i}" for i in range(args.classes)]
    return DatasetSpec(labels=labels, ipc=args.ipc, image_size=args.size, decoder=args.decoder)


def gpu_peak_mb(gen: Any) -> float | None:
    import torch

    if gen.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(gen.device) / 2**20


def sync(gen: Any) -> None:
    import torch

    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)


def run_reference(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import albumentations as A
    import cv2
    import numpy as np
    import torch
    from PIL import Image

    gen = load(args)
    spec = spec_for(args)
    pda = A.Compose(
        [
            A.RandomCrop(height=args.size, width=args.size),
            A.HorizontalFlip(p=0.8),
            A.VerticalFlip(p=0.8),
            A.RandomBrightnessContrast(p=0.5),
            A.Rotate(limit=60, p=0.8, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomGamma(p=0.5),
        ]
    )
    out = work / "reference"
    out.mkdir()
    copies = spec.augment.n_copies
    written = 0
    sync(gen)
    started = time.perf_counter()
    for cls in spec.classes():
        folder = out / cls.label
        folder.mkdir()
        for n in range(spec.generated_per_class):
            image = gen.pipeline(
                prompt=spec.prompt(cls),
                num_inference_steps=1,
                guidance_scale=0.0,
                height=gen.resolution,
                width=gen.resolution,
                generator=torch.Generator("cpu").manual_seed(n),
            ).images[0]
            small = image.resize((args.size, args.size), Image.BICUBIC)
            small.save(folder / f"{n}.png")
            written += 1
            array = np.asarray(small)
            for k in range(copies):
                if n * (copies + 1) + k + 1 >= spec.ipc:
                    break
                Image.fromarray(pda(image=array)["image"]).save(folder / f"{n}_{k}.png")
                written += 1
    sync(gen)
    seconds = time.perf_counter() - started
    return {
        "images": written,
        "sampled": spec.total_generated,
        "seconds": seconds,
        "gpu_peak_mb": gpu_peak_mb(gen),
    }


def run_engine(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from worker import engine
    from worker.outputs import sink
    from worker.outputs.archive import ArchiveWriter
    from worker.postprocess import make_pool

    gen = load(args)
    spec = spec_for(args)
    pool = make_pool(args.pool, args.workers)
    pool.submit(int).result()  # started once per worker process, like the service's
    sync(gen)
    started = time.perf_counter()
    with ArchiveWriter(final=work / "engine.zip", partial=work / "engine.part") as writer:
        outputs = sink.Outputs(spec=spec, writer=writer)
        result = engine.run(
            spec,
            gen,
            outputs,
            batch_size=args.batch_size,
            hooks=engine.NoHooks(),
            pool=pool,
            workers=args.workers,
        )
        assert result is not None
        writer.commit({"bench": True})
    sync(gen)
    seconds = time.perf_counter() - started
    return {
        "images": outputs.count,
        "sampled": result.generated,
        "seconds": seconds,
        "seconds_sampling": result.seconds_sampling,
        "gpu_peak_mb": gpu_peak_mb(gen),
    }


def run_bare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    gen = load(args)
    spec = spec_for(args)
    total = spec.total_generated
    sync(gen)
    started = time.perf_counter()
    done = 0
    with torch.inference_mode():
        while done < total:
            n = min(args.batch_size, total - done)
            gen.pipeline(
                prompt=["a photo of a class"] * n,
                num_inference_steps=1,
                guidance_scale=0.0,
                height=gen.resolution,
                width=gen.resolution,
                output_type="pt",
            )
            done += n
    sync(gen)
    seconds = time.perf_counter() - started
    return {"images": 0, "sampled": total, "seconds": seconds, "gpu_peak_mb": gpu_peak_mb(gen)}


def run_service(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx

    from core.settings import Settings
    from service.redis_server import EmbeddedRedis, free_port
    from service.stack import Stack

    redis = EmbeddedRedis(work / "redis", persist=False).start()
    settings = Settings(
        redis_url=redis.url,
        data_dir=work / "data",
        model=str(args.model),
        port=free_port(),
        batch_size=args.batch_size,
        postprocess_workers=args.workers,
        postprocess_mode=args.pool,
        log_level="WARNING",
        device=args.device,
    )
    stack = Stack(settings, logs=work / "logs")
    try:
        stack.start_worker()
        base = stack.start_api()
        body = spec_for(args).model_dump(mode="json")
        started = time.perf_counter()
        # One blocking request (Prefer: wait) instead of polling, which would compete with
        # the worker for this machine's cores.
        job = httpx.post(
            f"{base}/v1/jobs", json=body, headers={"Prefer": "wait=60"}, timeout=90
        ).json()
        while job["state"] not in ("succeeded", "failed", "canceled"):
            job = httpx.get(f"{base}/v1/jobs/{job['id']}", timeout=30).json()
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        if job["state"] != "succeeded":
            raise RuntimeError(f"service job ended {job['state']}: {job.get('error')}")
        return {
            "images": job["progress"]["written"],
            "sampled": job["progress"]["generated"],
            "seconds": seconds,
            "gpu_peak_mb": None,
            "note": "peak RSS is the client's; the worker's is in its own process",
        }
    finally:
        stack.close()
        redis.stop()


def run_postprocess(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The CPU side alone at the output size: paper PDA + PNG + zip, in the engine's pool."""
    import numpy as np

    from worker import engine, postprocess
    from worker.outputs import sink
    from worker.outputs.archive import ArchiveWriter

    spec = spec_for(args)
    rng = np.random.default_rng(0)
    src = source_size_for(spec)
    small = rng.integers(0, 255, (64, args.size, args.size, 3), dtype=np.uint8)
    large = rng.integers(0, 255, (64, src, src, 3), dtype=np.uint8)
    items = engine.fixed_plan(spec)
    with postprocess.make_pool(args.pool, args.workers) as pool:
        pool.submit(int).result()
        started = time.perf_counter()
        with ArchiveWriter(final=work / "pp.zip", partial=work / "pp.part") as writer:
            outputs = sink.Outputs(spec=spec, writer=writer)
            rows: list[postprocess.Row] = [
                (item.cls, item.sample, i, "p", small[i % 64], large[i % 64])
                for i, item in enumerate(items)
            ]
            chunk = 8  # a batch's share, as the engine submits it
            futures = [
                pool.submit(postprocess.finish_items, spec, rows[s : s + chunk])
                for s in range(0, len(rows), chunk)
            ]
            for future in futures:
                for done in future.result():
                    outputs.add(done)
            writer.commit({})
        seconds = time.perf_counter() - started
    return {"images": outputs.count, "sampled": 0, "seconds": seconds, "gpu_peak_mb": None}


def source_size_for(spec: Any) -> int:
    from worker.augment import source_size

    return int(source_size(spec.augment, image_size=spec.size))


RUNNERS = {
    "reference": run_reference,
    "engine": run_engine,
    "uncached": run_engine,
    "bare": run_bare,
    "service": run_service,
    "postprocess": run_postprocess,
}


def child(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        result = RUNNERS[args.child](args, Path(scratch))
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--workers", type=int, default=max(os.cpu_count() or 2, 2), help="post-processing workers"
    )
    parser.add_argument("--pool", choices=("processes", "threads"), default="threads")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--vae-dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", choices=("off", "regional", "full"), default="off")
    parser.add_argument("--decoder", choices=("vae", "tiny"), default="vae")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="postprocess with threads and processes, 1 to 16 workers (one row each)",
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--skeleton", type=Path)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as scratch:
        if args.model is None and args.skeleton is None:
            from worker.model.tiny_model import build

            args.model = build(Path(scratch) / "tiny-model")
        results: dict[str, dict[str, Any]] = {}
        passthrough = _strip_modes(sys.argv[1:])
        runs: list[tuple[str, str, list[str]]] = []
        for mode in args.modes:
            if mode == "postprocess" and args.sweep:
                runs += [
                    (f"pp {pool[:4]} x{n}", mode, ["--pool", pool, "--workers", str(n)])
                    for pool, n in SWEEP
                ]
            else:
                runs.append((mode, mode, []))
        for label, mode, extra in runs:
            command = [sys.executable, __file__, *passthrough, *extra, "--child", mode]
            if args.model is not None and "--model" not in passthrough:
                command += ["--model", str(args.model)]
            done = subprocess.run(command, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{label}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results[label] = json.loads(line.removeprefix("RESULT "))

    device = args.device or ("cuda" if _cuda() else "cpu")
    cpu = platform.processor() or platform.machine()
    print(
        f"{args.classes} classes x IPC {args.ipc} at {args.size} px, batch {args.batch_size}, "
        f"{args.workers} post-processing {args.pool}, "
        f"device {device} ({cpu}, {os.cpu_count()} cpus)"
    )
    header = ("mode", "seconds", "out img/s", "sampled/s", "peak RSS MB", "GPU MB")
    print(
        f"{header[0]:<12}{header[1]:>9}{header[2]:>11}{header[3]:>11}{header[4]:>13}{header[5]:>9}"
    )
    for mode, r in results.items():
        out_rate = r["images"] / r["seconds"] if r["images"] else 0.0
        sampled_rate = r["sampled"] / r["seconds"] if r["sampled"] else 0.0
        r["images_per_second"] = round(out_rate, 1)
        r["sampled_per_second"] = round(sampled_rate, 2)
        gpu = f"{r['gpu_peak_mb']:.0f}" if r.get("gpu_peak_mb") else "-"
        print(
            f"{mode:<12}{r['seconds']:>9.2f}{out_rate:>11.1f}{sampled_rate:>11.2f}"
            f"{r['peak_rss_mb']:>13.0f}{gpu:>9}"
        )
    ratios = {}
    if "engine" in results and "reference" in results:
        ratios["engine/reference"] = results["engine"]["images_per_second"] / max(
            results["reference"]["images_per_second"], 1e-9
        )
    if "engine" in results and "uncached" in results:
        ratios["engine/uncached (prompts encoded once)"] = results["engine"][
            "images_per_second"
        ] / max(results["uncached"]["images_per_second"], 1e-9)
    if "engine" in results and "bare" in results:
        ratios["engine/bare (sampled)"] = results["engine"]["sampled_per_second"] / max(
            results["bare"]["sampled_per_second"], 1e-9
        )
    if "service" in results and "engine" in results:
        ratios["service/engine"] = results["service"]["images_per_second"] / max(
            results["engine"]["images_per_second"], 1e-9
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "device": device,
                    "args": _plain(vars(args)),
                    "results": results,
                    "ratios": ratios,
                },
                indent=2,
            )
        )
    return 0


def _strip_modes(argv: list[str]) -> list[str]:
    out: list[str] = []
    skipping = False
    for arg in argv:
        if arg == "--modes" or arg == "--json":
            skipping = True
            continue
        if skipping and not arg.startswith("--"):
            continue
        skipping = False
        out.append(arg)
    return out


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
