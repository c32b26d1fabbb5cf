"""Generation throughput as a share of the GPU's peak: the paper's loop, a peer's compiled
pipeline and our engine, on one card in one process, with FLOPs counted per image.

On a GPU (full-size SDXL-Turbo architecture, random weights built from its configs; planned
for about 6 minutes on an H200 within a 450 s budget (--budget), --worker included; --quick
trims to about 5):

  python bench/gpu_generation.py ../shared/models/sdxl-turbo-skeleton --json bench/results/gpu.json
  python bench/gpu_generation.py ../shared/models/sdxl-turbo-skeleton --quick
  python bench/gpu_generation.py ../shared/models/sdxl-turbo-skeleton --worker  # + the service

Smoke run on a CPU (tiny random model built in a temporary directory unless MODEL is given;
seconds, every mode end to end, figures meaningless):

  HF_HUB_OFFLINE=1 python bench/gpu_generation.py --smoke [MODEL] [--worker] [--json OUT]

MODEL is a pipeline directory with weights (``python -m worker.model.tiny_model DIR`` writes one) or
a weightless config directory (``sdxl-turbo-skeleton``: built with random weights on the
device by ``bench/generation.py``'s ``build_skeleton``; cost does not depend on weight values).
The tiny decoder is ``DIR/tiny_decoder`` when present, else diffusers' ``AutoencoderTiny()``
default config (TAESDXL's layout) with random weights, on the device in the model dtype.

Modes (one row each per configuration):
- paper:  the paper's loop: stock ``StableDiffusionXLPipeline`` call, one prompt per call, model
          dtype (float16 on a GPU), output_type="pil" (the stock VAE upcast to float32 and back
          on every call), PIL bicubic resize to 32 px.
- peer:   the stock pipeline at batch 4 (--peer-batch), set up as diffusers' speed guide does:
          channels_last, fused QKV projections, inductor conv_1x1_as_mm /
          coordinate_descent_tuning / epilogue_fusion=False, torch.compile(unet,
          mode="max-autotune", fullgraph=True) and vae.decode compiled the same way. The
          fp16-fix VAE is not available offline, so the VAE stays in float32 and decodes the
          pipeline's latents itself (output_type="latent", then vae.decode, postprocess to PIL,
          PIL resize to 32 px). --peer-compile default|off for a cheaper compile.
- engine: worker.model.generator.Generator.render (prompts encoded once, batched, resized to 32 and
          40 px on the device, one copy to the host), decoder vae in float32 and in bfloat16
          and decoder tiny, at each --resolutions and --batches, eager; then compiled (--compile
          regional by default, full optional) once per (resolution, --compile-batch).
- worker: (--worker) the whole service: an embedded Redis, a real ``python -m worker`` and the
          API in-process (fastapi TestClient); one job with 4 augmented copies per sampled
          image at the engine's settings, to its archive; skipped when rq/redis/fastapi or a
          redis-server binary are missing.

FLOPs per image are counted with torch.utils.flop_counter.FlopCounterMode on the meta device
(one image per (resolution, decoder); the counts are linear in the batch): UNet forward +
decoder forward + both text encoders for each prompt actually encoded (every image on the
stock path; once per distinct prompt in the engine). MFU = FLOPs x images / seconds / the
card's dense float16/bfloat16 tensor peak (PEAK_TFLOPS), also for rows decoding in float32;
"-" on a CPU or an unknown card. Compile time is reported per compiled row (compile_s), never
counted in images/s. Figures are measurements, never pass/fail.

Order and time: build, paper, the eager engine grid, the first compiled group (the paper's
resolution), peer, the other compiled groups, worker (150 s kept for it out of --budget).
What would not fit the budget is skipped and listed; the peer's max-autotune (guessed at
240 s; a compile cannot be interrupted) falls back to mode default, then off, and says so.
--quick: batch 32 only, 64 images a row, compiled at the first resolution only, 300 s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402 - after the environment is set

#: Dense (no sparsity) float16/bfloat16 tensor-core peak in TFLOP/s, by a substring of
#: ``torch.cuda.get_device_name()`` (case-insensitive); the first match wins, so longer names
#: come before their prefixes (H100 PCIe before H100, A100 before A10, L40S before L4).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (reported as "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)

#: Engine decoders: (row name, Generator decoder, VAE dtype or None).
DECODERS: dict[str, tuple[str, torch.dtype | None]] = {
    "vae-fp32": ("vae", torch.float32),
    "vae-bf16": ("vae", torch.bfloat16),
    "tiny": ("tiny", None),
}
#: Output sizes the engine renders (the job's 32 px and the 1.25x source its crops cut from).
ENGINE_SIZES = (32, 40)
#: Prompts cycle over this many classes, as a 10-class job's do.
CLASSES = 10
#: Prior guesses (seconds on a GPU) for what has not been measured yet, for the budget.
PEER_COMPILE_GUESS = {"max-autotune": 240.0, "default": 90.0, "off": 0.0}
GROUP_COMPILE_GUESS = 120.0
WORKER_RESERVE_S = 150.0


def peak_tflops(card: str) -> float | None:
    """The card's dense half-precision peak, or None when it is not in ``PEAK_TFLOPS``."""
    lowered = card.lower()
    for name, value in PEAK_TFLOPS:
        if name.lower() in lowered:
            return value
    return None


@dataclass
class Row:
    """One measured configuration."""

    mode: str
    resolution: int
    decoder: str
    batch: int
    compile: str
    images: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    gflop_per_image: float = 0.0
    mfu: float | None = None
    peak_gpu_gib: float | None = None
    compile_seconds: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Budget:
    """Wall-clock seconds left for the run (from the script's start)."""

    total: float
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.total - self.elapsed()

    def fits(self, estimate: float) -> bool:
        return estimate <= self.left()


# ---- FLOPs ------------------------------------------------------------------------------


class Flops:
    """FLOPs per image of each part, counted once on meta-device copies of the modules."""

    def __init__(self, pipeline: Any, tiny: Any | None) -> None:
        from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

        with torch.device("meta"):
            self.unet = UNet2DConditionModel.from_config(pipeline.unet.config)
            self.vae = AutoencoderKL.from_config(pipeline.vae.config)
            self.tiny = AutoencoderTiny.from_config(tiny.config) if tiny is not None else None
            self.text_encoders = [
                type(encoder)(encoder.config)
                for encoder in (pipeline.text_encoder, pipeline.text_encoder_2)
                if encoder is not None
            ]
        self.tokens = int(pipeline.tokenizer.model_max_length)
        config = self.unet.config
        self.latent_channels = int(config.in_channels)
        self.scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.cross = int(config.cross_attention_dim)
        time_ids = 6
        self.pooled = int(config.projection_class_embeddings_input_dim) - time_ids * int(
            config.addition_time_embed_dim
        )
        self.time_ids = time_ids
        self._cache: dict[tuple[str, int], float] = {}

    @staticmethod
    def _count(fn: Callable[[], object]) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return float(counter.get_total_flops())

    def _latents(self, resolution: int) -> torch.Tensor:
        side = resolution // self.scale
        return torch.empty(1, self.latent_channels, side, side, device="meta")

    def part(self, name: str, resolution: int = 0) -> float:
        """FLOPs of one image through ``name`` (unet, vae, tiny, text) at ``resolution``."""
        key = (name, resolution)
        if key in self._cache:
            return self._cache[key]
        if name == "unet":
            latents = self._latents(resolution)
            embeds = torch.empty(1, self.tokens, self.cross, device="meta")
            cond = {
                "text_embeds": torch.empty(1, self.pooled, device="meta"),
                "time_ids": torch.empty(1, self.time_ids, device="meta"),
            }
            t = torch.empty(1, device="meta")
            flops = self._count(
                lambda: self.unet(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=cond)
            )
        elif name == "vae":
            latents = self._latents(resolution)
            flops = self._count(lambda: self.vae.decode(latents))
        elif name == "tiny":
            if self.tiny is None:
                raise ValueError("no tiny decoder")
            tiny, latents = self.tiny, self._latents(resolution)
            flops = self._count(lambda: tiny.decode(latents))
        elif name == "text":
            ids = torch.zeros(1, self.tokens, dtype=torch.long, device="meta")
            flops = 0.0
            for encoder in self.text_encoders:
                flops += self._count(partial(encoder, ids, output_hidden_states=True))
        else:
            raise ValueError(name)
        self._cache[key] = flops
        return flops

    def per_image(self, resolution: int, decoder: str, prompts_per_image: float) -> float:
        """UNet + decoder (``vae`` or ``tiny``) + text encoders x prompts encoded per image."""
        return (
            self.part("unet", resolution)
            + self.part(decoder, resolution)
            + prompts_per_image * self.part("text")
        )


# ---- measuring ------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured(device: torch.device, into: dict[str, float | None]) -> Iterator[None]:
    """Time the block (synchronized) and record the device's peak memory in it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    yield
    sync(device)
    into["seconds"] = time.perf_counter() - started
    into["peak_gpu_gib"] = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    )


def prompts_for(count: int) -> list[str]:
    return [f"a photo of a class {i % CLASSES}" for i in range(count)]


def finish(row: Row, figures: dict[str, float | None], flops: float, peak: float | None) -> Row:
    seconds = figures["seconds"] or 1e-9
    row.seconds = round(seconds, 3)
    row.images_per_second = round(row.images / seconds, 3)
    row.gflop_per_image = flops / 1e9
    row.mfu = flops * row.images / seconds / (peak * 1e12) if peak else None
    gib = figures["peak_gpu_gib"]
    row.peak_gpu_gib = round(gib, 2) if gib is not None else None
    print_row(row, live=True)
    return row


def clone_pipeline(pipe: Any) -> Any:
    """A pipeline with its own copies of the UNet, VAE and scheduler (what compiling and
    fusing change); text encoders and tokenizers are shared."""
    from diffusers import StableDiffusionXLPipeline

    clone = StableDiffusionXLPipeline(
        vae=copy.deepcopy(pipe.vae),
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        unet=copy.deepcopy(pipe.unet),
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        add_watermarker=False,
    )
    clone.set_progress_bar_config(disable=True)
    return clone


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the model --------------------------------------------------------------------------


def has_weights(model: Path) -> bool:
    return any((model / "unet").glob("diffusion_pytorch_model*"))


def load_base(model: Path, device: str) -> tuple[Any, Any, torch.dtype, torch.device, str]:
    """(stock pipeline, tiny decoder, model dtype, device, what was loaded)."""
    from diffusers import AutoencoderTiny

    from worker.model.loading import LoadOptions, load

    if has_weights(model):
        tiny_dir = model / "tiny_decoder"
        options = LoadOptions(
            device=device,
            channels_last=False,
            tiny_decoder=(str(tiny_dir),) if tiny_dir.is_dir() else (),
        )
        gen = load(str(model), options)
        what = f"{model} (weights)"
        tiny = gen.tiny
    else:
        build_skeleton: Callable[[Path, str | None], Any] = importlib.import_module(
            "generation"
        ).build_skeleton
        gen = build_skeleton(model, device)
        what = f"{model} (full-size architecture, random weights)"
        tiny = None
    if tiny is None:
        with torch.device(gen.device):
            tiny = AutoencoderTiny()  # TAESDXL's layout, random weights
        tiny = tiny.to(dtype=gen.dtype).eval()
        what += "; tiny decoder AutoencoderTiny() random (TAESDXL layout)"
    pipe = gen.pipeline
    pipe.set_progress_bar_config(disable=True)
    return pipe, tiny, gen.dtype, gen.device, what


# ---- modes ------------------------------------------------------------------------------


def run_paper(
    pipe: Any,
    dtype: torch.dtype,
    device: torch.device,
    resolution: int,
    count: int,
    flops: Flops,
    peak: float | None,
) -> Row:
    from PIL import Image

    # The stock VAE in the model dtype: in float16 the pipeline upcasts it on every call.
    pipe.vae.to(dtype=dtype)
    prompts = prompts_for(count)

    def one(i: int) -> None:
        image = pipe(
            prompt=prompts[i],
            num_inference_steps=1,
            guidance_scale=0.0,
            height=resolution,
            width=resolution,
            generator=torch.Generator("cpu").manual_seed(i),
        ).images[0]
        image.resize((32, 32), Image.Resampling.BICUBIC)

    one(0)  # warm-up
    figures: dict[str, float | None] = {}
    with measured(device, figures):
        for i in range(count):
            one(i)
    row = Row(
        "paper",
        resolution,
        f"vae-{'upcast' if dtype == torch.float16 else str(dtype).removeprefix('torch.')}",
        1,
        "off",
        images=count,
        note="stock pipeline, output_type=pil, PIL resize",
    )
    return finish(row, figures, flops.per_image(resolution, "vae", 1.0), peak)


def inductor_as_guide(device: torch.device) -> None:
    """Inductor flags as diffusers' speed guide sets them for SDXL."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = device.type == "cuda"
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = device.type == "cuda"


def run_peer(
    base: Any,
    device: torch.device,
    resolution: int,
    batch: int,
    count: int,
    mode: str,
    flops: Flops,
    peak: float | None,
) -> Row:
    from PIL import Image

    from worker.model.latents import to_vae

    pipe = clone_pipeline(base)
    pipe.vae.to(dtype=torch.float32)  # no fp16-fix VAE offline: decode in float32
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()
    vae = pipe.vae
    if mode != "off":
        inductor_as_guide(device)
        options: dict[str, Any] = {"fullgraph": True}
        if mode != "default":
            options["mode"] = mode
        pipe.unet = torch.compile(pipe.unet, **options)
        vae.decode = torch.compile(vae.decode, **options)
    prompts = prompts_for(count)
    config = vae.config

    def call(start: int) -> None:
        chunk = prompts[start : start + batch]
        latents = pipe(
            prompt=chunk,
            num_inference_steps=1,
            guidance_scale=0.0,
            height=resolution,
            width=resolution,
            generator=[torch.Generator("cpu").manual_seed(start + n) for n in range(len(chunk))],
            output_type="latent",
        ).images
        with torch.inference_mode():
            latents = to_vae(latents.to(torch.float32), config)
            image = vae.decode(latents, return_dict=False)[0]
            images = pipe.image_processor.postprocess(image, output_type="pil")
        for picture in images:
            picture.resize((32, 32), Image.Resampling.BICUBIC)

    warm: dict[str, float | None] = {}
    with measured(device, warm):
        # Compiling, then (max-autotune) recording and replaying the CUDA graphs.
        for _ in range(3 if mode == "max-autotune" else 2 if mode != "off" else 1):
            call(0)
    figures: dict[str, float | None] = {}
    with measured(device, figures):
        for start in range(0, count, batch):
            call(start)
    row = Row(
        "peer",
        resolution,
        "vae-fp32",
        batch,
        mode,
        images=count,
        compile_seconds=round(warm["seconds"] or 0.0, 1) if mode != "off" else None,
        note="diffusers speed guide; VAE float32 (no fp16-fix VAE offline), PIL resize",
    )
    return finish(row, figures, flops.per_image(resolution, "vae", 1.0), peak)


def run_engine_row(
    gen: Any,
    resolution: int,
    decoder: str,
    batch: int,
    count: int,
    flops: Flops,
    peak: float | None,
    *,
    compile_seconds: float | None = None,
) -> Row:
    """One engine configuration: a warm-up batch (compiles what is new), then ``count``."""
    from worker.model.generator import SamplingParams

    kind, vae_dtype = DECODERS[decoder]
    if vae_dtype is not None and gen.decode_dtype != vae_dtype:
        gen.pipeline.vae.to(dtype=vae_dtype)
        gen.decode_dtype = vae_dtype
    if gen.compile != "off":
        gen.fixed_batch = batch
    gen.max_batch = None
    count = max(count, 2 * batch)
    count -= count % batch
    prompts, seeds = prompts_for(count), list(range(count))

    def render(start: int) -> None:
        gen.render(
            prompts[start : start + batch],
            seeds[start : start + batch],
            sizes=ENGINE_SIZES,
            params=SamplingParams(resolution=resolution, decoder=kind),
        )

    warm: dict[str, float | None] = {}
    with measured(gen.device, warm):
        render(0)
    encoded = gen.prompts.stats["encoded"]
    figures: dict[str, float | None] = {}
    with measured(gen.device, figures):
        for start in range(0, count, batch):
            render(start)
    per_prompt = (gen.prompts.stats["encoded"] - encoded) / count
    row = Row(
        "engine",
        resolution,
        decoder,
        batch,
        gen.compile,
        images=count,
        note="Generator.render, sizes 32+40 on the device",
    )
    if gen.max_batch is not None:
        row.note += f"; out of memory: ran at batch {gen.max_batch}"
        row.extra["effective_batch"] = gen.max_batch
        gen.max_batch = None
    row = finish(row, figures, flops.per_image(resolution, kind, per_prompt), peak)
    if gen.compile != "off":
        if compile_seconds is not None:
            row.note += "; compile_s: wrap's compile of the UNet blocks and decoders"
        else:
            row.note += "; compile_s: what its first batch compiled"
        steady = (figures["seconds"] or 0.0) * batch / count
        first = compile_seconds if compile_seconds is not None else 0.0
        row.compile_seconds = round(first + max((warm["seconds"] or 0.0) - steady, 0.0), 1)
    return row


def engine_grid(
    gen: Any,
    resolutions: Sequence[int],
    batches: Sequence[int],
    count: int,
    flops: Flops,
    peak: float | None,
    budget: Budget,
    skipped: list[str],
) -> list[Row]:
    rows = []
    for resolution in resolutions:
        for batch in batches:
            for decoder in DECODERS:
                label = f"engine {resolution} {decoder} b{batch} eager"
                if budget.left() < 10:
                    skipped.append(f"{label} (time budget)")
                    continue
                rows.append(run_engine_row(gen, resolution, decoder, batch, count, flops, peak))
    return rows


def engine_compiled(
    base: Any,
    tiny: Any,
    dtype: torch.dtype,
    device: torch.device,
    model: str,
    args: argparse.Namespace,
    flops: Flops,
    peak: float | None,
    budget: Budget,
    skipped: list[str],
    resolutions: Sequence[int],
) -> list[Row]:
    """Compiled engine rows: one Generator per (resolution, batch), compiled and warmed up by
    ``worker.model.loading.wrap`` (UNet blocks, VAE decode and tiny decode); the other VAE dtype
    recompiles the VAE decode on its first batch."""
    from worker.model.loading import LoadOptions, TinyDecoder, wrap

    rows: list[Row] = []
    guess = args.group_guess
    for resolution in resolutions:
        batch = args.compile_batch
        decoders = list(args.compile_decoders)
        label = f"engine {resolution} b{batch} {args.compile}"
        if not budget.fits(guess + 10):
            skipped.extend(f"{label} {d} (time budget)" for d in decoders)
            continue
        first_vae = next((DECODERS[d][1] for d in decoders if DECODERS[d][1] is not None), None)
        started = time.perf_counter()
        options = LoadOptions(
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            resolution=resolution,
            vae_dtype=str(first_vae or torch.float32).removeprefix("torch."),
            channels_last=args.channels_last,
            compile=args.compile,
            batch_size=batch,
        )
        tiny_copy = TinyDecoder(copy.deepcopy(tiny), "tiny")
        gen = wrap(clone_pipeline(base), model=model, options=options, tiny=tiny_copy)
        compile_s = gen.compile_seconds
        guess = args.group_guess = time.perf_counter() - started
        unreported: float | None = compile_s
        for decoder in decoders:
            vae_dtype = DECODERS[decoder][1]
            recompiles = vae_dtype is not None and vae_dtype != gen.decode_dtype
            if not budget.fits((0.5 * guess if recompiles else 0.0) + 10):
                skipped.append(f"{label} {decoder} (time budget)")
                continue
            rows.append(
                run_engine_row(
                    gen,
                    resolution,
                    decoder,
                    batch,
                    args.images,
                    flops,
                    peak,
                    compile_seconds=unreported,
                )
            )
            unreported = None
        del gen
        release(device)
    return rows


def save_for_worker(pipe: Any, tiny: Any, directory: Path) -> tuple[Path, Path]:
    """Write the (random-weight) pipeline and tiny decoder where ``from_pretrained`` loads."""
    for module in (pipe.unet, pipe.vae, tiny):
        module.to(memory_format=torch.contiguous_format)
    pipe.save_pretrained(str(directory / "model"), safe_serialization=True)
    tiny.save_pretrained(str(directory / "tiny"), safe_serialization=True)
    return directory / "model", directory / "tiny"


def worker_missing() -> str | None:
    """Why the worker mode cannot run here, or None."""
    try:
        for module in ("rq", "redis", "fastapi", "httpx", "core.settings", "service.app"):
            importlib.import_module(module)
        from service.redis_server import find_binary

        find_binary()
    except (ImportError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_worker(
    model_dir: Path,
    tiny_dir: Path,
    device: torch.device,
    args: argparse.Namespace,
    batch: int,
    resolution: int,
    work: Path,
    flops: Flops,
    peak: float | None,
) -> Row:
    """One job through the API, Redis and a real worker process, to its archive."""
    from fastapi.testclient import TestClient

    from core.settings import Settings
    from service.app import create_app
    from service.redis_server import EmbeddedRedis
    from service.stack import Stack, wait_for_worker

    redis = EmbeddedRedis(work / "redis", persist=False).start()
    settings = Settings(
        redis_url=redis.url,
        data_dir=work / "data",
        model=str(model_dir),
        tiny_decoder=str(tiny_dir),
        device=str(device),
        batch_size=batch,
        auto_batch=False,
        vae_dtype="float32",
        compile="off",
        shard_images=100_000,
        log_level="WARNING",
    )
    stack = Stack(settings, logs=work / "logs", env={"HF_HUB_OFFLINE": "1"})
    try:
        started = time.perf_counter()
        proc = stack.start_worker(wait=False)
        wait_for_worker(proc, settings, log=work / "logs" / "worker-1.log", timeout=300)
        start_s = time.perf_counter() - started
        body = {
            "labels": [f"class {i}" for i in range(args.worker_classes)],
            "ipc": args.worker_ipc,
            "image_size": 32,
            "seed": 0,
            "augment": {"policy": "paper", "copies": 4},
        }
        with TestClient(create_app(settings)) as client:
            started = time.perf_counter()
            response = client.post("/v1/jobs", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs: {response.status_code} {response.text}")
            job: dict[str, Any] = response.json()
            while job["state"] not in ("succeeded", "failed", "canceled"):
                time.sleep(0.1)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            wall = time.perf_counter() - started
            if job["state"] != "succeeded":
                raise RuntimeError(f"job {job['state']}: {job.get('error')}")
            archive = client.get(f"/v1/jobs/{job['id']}/archive")
            archive_bytes = len(archive.content) if archive.status_code == 200 else 0
    finally:
        stack.close()
        redis.stop()
    sampled = int(job["progress"]["generated"])
    written = int(job["progress"]["written"])
    row = Row(
        "worker",
        resolution,
        "vae-fp32",
        batch,
        "off",
        images=sampled,
        note=f"{written} images (4 copies each) to a {archive_bytes} B archive; "
        "images/s = sampled / (POST to succeeded)",
        extra={
            "written": written,
            "written_per_second": round(written / wall, 2),
            "worker_start_seconds": round(start_s, 1),
            "timings": job.get("timings"),
            "archive_bytes": archive_bytes,
        },
    )
    return finish(
        row, {"seconds": wall, "peak_gpu_gib": None}, flops.per_image(resolution, "vae", 0.0), peak
    )


# ---- report -----------------------------------------------------------------------------

COLUMNS = (
    ("mode", 7, "<"),
    ("res", 5, ">"),
    ("decoder", 12, "<"),
    ("batch", 6, ">"),
    ("compile", 13, "<"),
    ("images", 7, ">"),
    ("seconds", 9, ">"),
    ("img/s", 10, ">"),
    ("GFLOP/img", 11, ">"),
    ("MFU", 7, ">"),
    ("peak_GiB", 9, ">"),
    ("compile_s", 10, ">"),
)


def _cells(row: Row) -> list[str]:
    def opt(value: float | None, fmt: str) -> str:
        return "None" if value is None else format(value, fmt)

    return [
        row.mode,
        str(row.resolution),
        row.decoder,
        str(row.batch),
        row.compile,
        str(row.images),
        f"{row.seconds:.2f}",
        f"{row.images_per_second:.2f}",
        f"{row.gflop_per_image:.4g}",
        "-" if row.mfu is None else f"{100 * row.mfu:.1f}%",
        opt(row.peak_gpu_gib, ".2f"),
        "-" if row.compile_seconds is None else f"{row.compile_seconds:.1f}",
    ]


def _line(cells: Sequence[str]) -> str:
    return " ".join(
        f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS, strict=True)
    )


def print_row(row: Row, *, live: bool = False) -> None:
    print(("  .. " if live else "") + _line(_cells(row)), flush=True)


def ratios(rows: Sequence[Row]) -> dict[str, float]:
    def best(mode: str, pick: Callable[[Row], bool] = lambda r: True) -> Row | None:
        found = [r for r in rows if r.mode == mode and pick(r)]
        return max(found, key=lambda r: r.images_per_second) if found else None

    out: dict[str, float] = {}
    paper, peer, worker = best("paper"), best("peer"), best("worker")

    def add(name: str, top: Row | None, bottom: Row | None) -> None:
        if top is not None and bottom is not None and bottom.images_per_second > 0:
            out[name] = round(top.images_per_second / bottom.images_per_second, 4)

    if paper is not None:
        same = paper.resolution
        add(
            "engine/paper (vae-fp32)",
            best("engine", lambda r: r.decoder == "vae-fp32" and r.resolution == same),
            paper,
        )
        add(
            "engine/paper (vae, best dtype)",
            best("engine", lambda r: r.decoder.startswith("vae") and r.resolution == same),
            paper,
        )
        add(
            "engine/paper (best, any decoder)",
            best("engine", lambda r: r.resolution == same),
            paper,
        )
    if peer is not None:
        same = peer.resolution
        add(
            "engine/peer (vae-fp32)",
            best("engine", lambda r: r.decoder == "vae-fp32" and r.resolution == same),
            peer,
        )
        add("engine/peer (best, any decoder)", best("engine", lambda r: r.resolution == same), peer)
        add("peer/paper", peer, paper)
    if worker is not None:
        add(
            "worker/engine (same settings)",
            worker,
            best(
                "engine",
                lambda r: (
                    r.decoder == "vae-fp32"
                    and r.compile == "off"
                    and r.resolution == worker.resolution
                    and r.batch == worker.batch
                ),
            ),
        )
    return out


def report(summary: dict[str, Any], rows: Sequence[Row]) -> None:
    print()
    print(
        f"card {summary['card']} (peak {summary['peak_tflops'] or '-'} TFLOP/s dense fp16/bf16), "
        f"torch {summary['torch']}, diffusers {summary['diffusers']}, {summary['date']}"
    )
    print(f"model: {summary['model']}")
    print(_line([name for name, _, _ in COLUMNS]))
    for row in rows:
        print_row(row)
    print()
    for row in rows:
        if row.note:
            print(
                f"{row.mode} {row.resolution} {row.decoder} b{row.batch} {row.compile}: {row.note}"
            )
    for line in summary["skipped"]:
        print(f"skipped: {line}")
    for line in summary["notes"]:
        print(f"note: {line}")
    print("ratios (images/s):")
    for name, value in summary["ratios"].items():
        print(f"  {name}: {value:.3g}")
    print(f"total {summary['total_seconds']:.0f} s", flush=True)


# ---- main -------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generation throughput as a share of the GPU's peak (modes: module docstring)."
    )
    parser.add_argument("model", type=Path, nargs="?", help="config dir (skeleton) or pipeline")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, everything small")
    parser.add_argument("--quick", action="store_true", help="fewer rows (about half the time)")
    parser.add_argument("--device", help="default cuda when present (cpu with --smoke)")
    parser.add_argument("--resolutions", type=int, nargs="+", help="default 512 256 (smoke 64)")
    parser.add_argument("--batches", type=int, nargs="+", help="default 16 32 64 (quick 32)")
    parser.add_argument("--images", type=int, help="images per engine row (default 128)")
    parser.add_argument("--paper-images", type=int, help="default 24")
    parser.add_argument("--peer-images", type=int, help="default 32")
    parser.add_argument("--peer-batch", type=int, default=4)
    parser.add_argument(
        "--peer-compile",
        choices=("max-autotune", "default", "off"),
        help="torch.compile mode for the peer (default max-autotune, as the guide; smoke off)",
    )
    parser.add_argument("--compile", choices=("off", "regional", "full"), default="regional")
    parser.add_argument("--compile-batch", type=int, help="compiled engine batch (default 32)")
    parser.add_argument("--compile-resolutions", type=int, nargs="+")
    parser.add_argument("--compile-decoders", nargs="+", choices=tuple(DECODERS))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--worker", action="store_true", help="also the whole service")
    parser.add_argument("--worker-classes", type=int)
    parser.add_argument("--worker-ipc", type=int, help="per class, 4 copies per sampled image")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 450)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.model is None and not args.smoke:
        parser.error("MODEL is required without --smoke")
    smoke, quick = args.smoke, args.quick

    def default(name: str, smoke_value: Any, quick_value: Any, full_value: Any) -> None:
        if getattr(args, name) is None:
            setattr(args, name, smoke_value if smoke else quick_value if quick else full_value)

    default("device", "cpu", None, None)
    default("batches", [4], [32], [16, 32, 64])
    default("images", 8, 64, 128)
    default("paper_images", 4, 12, 24)
    default("peer_images", 8, 16, 32)
    default("peer_compile", "off", "max-autotune", "max-autotune")
    default("compile_batch", 4, 32, 32)
    default("compile_decoders", ["vae-fp32", "tiny"], ["vae-fp32", "tiny"], list(DECODERS))
    default("worker_classes", 2, 10, 10)
    default("worker_ipc", 10, 160, 320)
    default("budget", 120.0, 300.0, 450.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    budget = Budget(args.budget)
    reserve = (WORKER_RESERVE_S if args.device != "cpu" else 40.0) if args.worker else 0.0
    main_budget = Budget(args.budget - reserve, budget.started)
    import diffusers
    import diffusers.utils.logging

    from worker.model.tiny_model import build

    # Quiet the per-call "modules that should be kept in float32" notes of dtype changes.
    diffusers.utils.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        work = Path(scratch)
        model = args.model
        if model is None:
            model = build(work / "tiny-model")
        started = time.perf_counter()
        base, tiny, dtype, device, what = load_base(model, args.device)
        build_s = time.perf_counter() - started
        native = int(base.unet.config.sample_size) * int(base.vae_scale_factor)
        if args.resolutions is None:
            args.resolutions = [native] if args.smoke else [native, native // 2]
        if args.compile_resolutions is None:
            args.compile_resolutions = args.resolutions[:1] if args.quick else args.resolutions
        card = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)"
        )
        peak = peak_tflops(card) if device.type == "cuda" else None
        print(f"{card}; {what}; built in {build_s:.1f} s", flush=True)
        flops = Flops(base, tiny)
        rows: list[Row] = []
        skipped: list[str] = []
        notes = [
            "FLOPs counted with FlopCounterMode on the meta device, one image per "
            "(resolution, decoder); MFU against the dense fp16/bf16 peak for every row",
            "peer: the fp16-fix VAE is not available offline; its VAE decodes in float32",
            f"engine: decoders {', '.join(DECODERS)}; compiled rows pad to the compile batch",
        ]
        if device.type == "cuda" and peak is None:
            notes.append(f"{card} is not in PEAK_TFLOPS: MFU not computed")

        rows.append(
            run_paper(base, dtype, device, args.resolutions[0], args.paper_images, flops, peak)
        )
        gen = _engine(base, tiny, dtype, device, str(model), args)
        rows += engine_grid(
            gen, args.resolutions, args.batches, args.images, flops, peak, main_budget, skipped
        )

        # The first compiled group (the paper's and the peer's resolution) before the peer,
        # whose max-autotune compile is the longest and least predictable step; the rest after.
        args.group_guess = GROUP_COMPILE_GUESS if device.type == "cuda" else 30.0
        compiled = args.compile_resolutions if args.compile != "off" else []
        rows += engine_compiled(
            base,
            tiny,
            dtype,
            device,
            str(model),
            args,
            flops,
            peak,
            main_budget,
            skipped,
            compiled[:1],
        )
        chain = list(PEER_COMPILE_GUESS)  # max-autotune, default, off
        chain = chain[chain.index(args.peer_compile) :]
        mode = chain[0]
        for cheaper in chain[1:]:
            if device.type != "cuda" or main_budget.fits(PEER_COMPILE_GUESS[mode] + 20):
                break
            notes.append(f"peer: compile {mode} would not fit the time budget; {cheaper} instead")
            mode = cheaper
        rows.append(
            run_peer(
                base,
                device,
                args.resolutions[0],
                args.peer_batch,
                args.peer_images,
                mode,
                flops,
                peak,
            )
        )
        release(device)  # the peer's copies of the UNet and VAE
        rows += engine_compiled(
            base,
            tiny,
            dtype,
            device,
            str(model),
            args,
            flops,
            peak,
            main_budget,
            skipped,
            compiled[1:],
        )

        if args.worker:
            missing = worker_missing()
            if missing is not None:
                skipped.append(f"worker: needs rq, redis, fastapi and redis-server ({missing})")
            else:
                batch = 16 if 16 in args.batches else args.batches[0]
                if has_weights(model):
                    model_dir = model
                    tiny_dir = model / "tiny_decoder"
                    if not tiny_dir.is_dir():
                        tiny_dir = save_for_worker(base, tiny, work / "saved")[1]
                else:
                    model_dir, tiny_dir = save_for_worker(base, tiny, work / "saved")
                del gen
                release(device)
                try:
                    rows.append(
                        run_worker(
                            model_dir,
                            tiny_dir,
                            device,
                            args,
                            batch,
                            native,
                            work / "svc",
                            flops,
                            peak,
                        )
                    )
                except Exception as exc:  # noqa: BLE001 - reported, the rest still printed
                    skipped.append(f"worker: failed: {type(exc).__name__}: {exc}")

        summary: dict[str, Any] = {
            "card": card,
            "peak_tflops": peak,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model": what,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "build_seconds": round(build_s, 1),
            "flops": {
                f"{name}@{res}" if res else name: value
                for (name, res), value in sorted(flops._cache.items())
            },
            "rows": [asdict(r) for r in rows],
            "ratios": ratios(rows),
            "skipped": skipped,
            "notes": notes,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "total_seconds": round(budget.elapsed(), 1),
        }
        report(summary, rows)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=2))
    return 0


def _engine(
    base: Any,
    tiny: Any,
    dtype: torch.dtype,
    device: torch.device,
    model: str,
    args: argparse.Namespace,
) -> Any:
    """The eager engine on the base pipeline (after the paper's rows: it keeps the VAE in
    float32 and, on CUDA, channels-last)."""
    import torch._dynamo.config as dynamo

    from worker.model.loading import LoadOptions, TinyDecoder, wrap

    # Compiled rows: every (resolution, batch, dtype) gets its own static graph.
    dynamo.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, 64)
    options = LoadOptions(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        vae_dtype="float32",
        channels_last=args.channels_last,
    )
    return wrap(base, model=model, options=options, tiny=TinyDecoder(tiny, "tiny"))


if __name__ == "__main__":
    raise SystemExit(main())
