from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.failures import describe_failure
from core.models import TINY_DECODER_DIR
from core.settings import Settings
from core.states import ErrorType
from service.redis_server import EmbeddedRedis
from tests.conftest import ROOT
from worker.model import compiling
from worker.model.generator import Generator, PartUnavailable, SamplingParams
from worker.model.loading import LoadOptions, ModelLoadError, load, tiny_decoder_sources
from worker.model.prompts import PromptCache


def _load(model: str, *, tiny_decoder: str | list[str] | None = None, **options: Any) -> Generator:
    """``load(model)`` with ``LoadOptions(**options)``; ``tiny_decoder``: one place or several."""
    sources = [tiny_decoder] if isinstance(tiny_decoder, str) else tiny_decoder or []
    return load(model, LoadOptions(tiny_decoder=tuple(sources), **options))


@pytest.fixture(scope="module")
def generator(tiny_model: Path) -> Generator:
    return _load(str(tiny_model), device="cpu")


def test_tiny_model_is_a_real_sdxl_pipeline(tiny_model: Path, generator: Generator) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = generator.pipeline
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert (tiny_model / "tokenizer" / "tokenizer_config.json").is_file()
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert generator.resolution == 64 and generator.dtype.is_floating_point


def test_render_gives_uint8_images_at_each_size(generator: Generator) -> None:
    out = generator.render(["a photo of a cat"] * 3, [1, 2, 3], sizes=(32, 40))
    assert out[32].shape == (3, 32, 32, 3) and out[32].dtype == np.uint8
    assert out[40].shape == (3, 40, 40, 3)
    assert out[32].std() > 0


def test_same_seed_same_image_whatever_the_batch(generator: Generator) -> None:
    alone = generator.render(["a photo of a dog"], [42], sizes=(16,))[16][0]
    again = generator.render(["a photo of a dog"], [42], sizes=(16,))[16][0]
    in_batch = generator.render(["a photo of a cat", "a photo of a dog"], [7, 42], sizes=(16,))
    assert np.array_equal(alone, again)
    assert np.abs(alone.astype(int) - in_batch[16][1].astype(int)).max() <= 1
    assert not np.array_equal(in_batch[16][0], in_batch[16][1])


def test_check_inputs_names_the_problem(generator: Generator) -> None:
    with pytest.raises(ValueError, match="same length"):
        generator.render(["a"], [1, 2], sizes=(8,))
    with pytest.raises(ValueError, match="must not be empty"):
        generator.render([], [], sizes=(8,))


def test_missing_model_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load model"):
        _load(str(tmp_path / "nothing-here"), device="cpu")


def test_worker_without_a_model_exits_with_one_clear_line(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    env = {
        **os.environ,
        "DISTILL_MODEL": str(tmp_path / "no-such-model"),
        "DISTILL_REDIS_URL": redis_server.url,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distill worker:")]
    assert len(lines) == 1
    assert "cannot load model" in lines[0] and "DISTILL_MODEL" in lines[0]
    assert "Traceback" not in proc.stderr


def test_tiny_model_cli_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.model.tiny_model", str(tmp_path / "m")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote a tiny SDXL pipeline" in proc.stderr
    assert _load(str(tmp_path / "m"), device="cpu").resolution == 64


class MemoryLimitedPipeline:
    """The real tiny pipeline behind a device-memory limit: more than ``limit`` images in one
    call raises torch's own OutOfMemoryError, as a GPU would. (A real GPU run is in the
    ``gpu``-marked test below.)"""

    def __init__(self, pipeline: object, limit: int) -> None:
        self._pipeline = pipeline
        self.limit = limit
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._pipeline, name)

    def __call__(self, **kwargs: object) -> object:
        count = len(kwargs["prompt_embeds"])  # type: ignore[arg-type]
        self.calls.append(count)
        if count > self.limit:
            raise torch.OutOfMemoryError(f"cannot fit {count} images")
        return self._pipeline(**kwargs)  # type: ignore[operator]


def test_out_of_memory_halves_the_batch_and_remembers_it(generator: Generator) -> None:
    limited = MemoryLimitedPipeline(generator.pipeline, limit=3)
    small = dataclasses.replace(generator, pipeline=limited, max_batch=None)
    prompts = [f"a photo of a cat {i}" for i in range(8)]
    seeds = list(range(8))
    out = small.render(prompts, seeds, sizes=(16,))[16]
    assert out.shape == (8, 16, 16, 3)
    assert small.max_batch == 2
    assert limited.calls == [8, 4, 2, 2, 2, 2]
    reference = generator.render(prompts, seeds, sizes=(16,))[16]
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1
    limited.calls.clear()
    small.render(prompts[:4], seeds[:4], sizes=(16,))
    assert limited.calls == [2, 2]  # the size that worked is kept


def test_out_of_memory_at_one_image_is_an_error(generator: Generator) -> None:
    small = dataclasses.replace(
        generator, pipeline=MemoryLimitedPipeline(generator.pipeline, limit=0), max_batch=None
    )
    with pytest.raises(torch.OutOfMemoryError):
        small.render(["a"], [1], sizes=(8,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_out_of_memory_is_survived(tiny_model: Path) -> None:
    cuda = _load(str(tiny_model), device="cuda", resolution=2048)
    out = cuda.render(["a photo of a cat"] * 512, list(range(512)), sizes=(8,))
    assert out[8].shape[0] == 512


def test_own_decode_matches_the_stock_pipeline_output(generator: Generator) -> None:
    seeds = [5, 6]
    ours = generator.sample(["a photo of a cat"] * 2, seeds)
    stock = generator.pipeline(
        prompt=["a photo of a cat"] * 2,
        num_inference_steps=1,
        guidance_scale=0.0,
        height=generator.resolution,
        width=generator.resolution,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pt",
    ).images
    assert torch.allclose(ours.float(), stock.float(), atol=1e-5)


def test_bfloat16_decoding_is_close_to_float32(tiny_model: Path, generator: Generator) -> None:
    bf16 = _load(str(tiny_model), device="cpu", vae_dtype="bfloat16")
    assert bf16.decode_dtype == torch.bfloat16
    assert bf16.provenance()["decode_dtype"] == "bfloat16"
    a = generator.render(["a photo of a dog"], [3], sizes=(16,))[16].astype(int)
    b = bf16.render(["a photo of a dog"], [3], sizes=(16,))[16].astype(int)
    assert np.abs(a - b).mean() < 3


def _stock_uint8(generator: Generator, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """The stock pipeline's own prompt encoding (every prompt, every call), then our decode,
    as uint8 at the sampling size."""
    with torch.inference_mode():
        latents = generator.pipeline(
            prompt=prompts,
            num_inference_steps=1,
            guidance_scale=0.0,
            height=generator.resolution,
            width=generator.resolution,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="latent",
        ).images
        images = generator.decode(latents)
    as_bytes = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return as_bytes.permute(0, 2, 3, 1).numpy()


def test_prompts_are_encoded_once_and_give_the_uncached_images(tiny_model: Path) -> None:
    fresh = _load(str(tiny_model), device="cpu")
    prompts = [f"a photo of a {c}" for c in ("cat", "dog", "ship", "frog") for _ in range(3)]
    seeds = list(range(12))
    side = fresh.resolution
    first = fresh.render(prompts, seeds, sizes=(side,))[side]
    assert fresh.prompts.stats == {"encoded": 4, "cached": 8}
    again = fresh.render(prompts, seeds, sizes=(side,))[side]
    assert fresh.prompts.stats == {"encoded": 4, "cached": 20}
    assert np.array_equal(first, again)
    # The stock path encodes the batch's 12 prompts together, the cache each prompt alone:
    # the pooled embeddings differ in their last bits, so a pixel may round one level apart.
    for stock in (
        _stock_uint8(fresh, prompts, seeds),
        fresh.stock_prompts().render(prompts, seeds, sizes=(side,))[side],
    ):
        apart = np.abs(first.astype(int) - stock.astype(int))
        assert apart.max() <= 1 and np.count_nonzero(apart) <= first.size // 1000


def test_a_prompt_s_embedding_does_not_depend_on_what_was_encoded_before(
    generator: Generator,
) -> None:
    def cache() -> PromptCache:
        return PromptCache(generator.pipeline, generator.family, generator.device)

    cat, dog, ship = (f"a photo of a {c}" for c in ("cat", "dog", "ship"))
    alone = cache().encode([cat])
    warm = cache()
    warm.encode([dog])
    # Missing together with another prompt, or after others were cached: the same bits.
    for embeds, row in ((cache().encode([ship, cat, cat]), 1), (warm.encode([dog, cat]), 1)):
        assert set(embeds) == set(alone)
        for name, value in alone.items():
            assert torch.equal(embeds[name][row], value[0]), name


def test_the_prompt_cache_is_bounded(tiny_model: Path) -> None:
    small = dataclasses.replace(_load(str(tiny_model), device="cpu"))
    small.prompts.size = 2
    for label in ("cat", "dog", "ship", "frog"):
        small.render([f"a photo of a {label}"] * 2, [1, 2], sizes=(8,))
    assert [prompt for prompt, _ in small.prompts.rows] == [
        "a photo of a ship",
        "a photo of a frog",
    ]
    # A batch with more distinct prompts than the cache holds still gets all of them.
    prompts = [f"a photo of a {c}" for c in ("cat", "dog", "bird")]
    out = small.render(prompts, [1, 2, 3], sizes=(8,))[8]
    assert out.shape[0] == 3 and len(small.prompts.rows) <= 3


def test_no_watermark_and_the_vae_keeps_its_decode_dtype(generator: Generator) -> None:
    assert generator.pipeline.watermark is None
    before = next(generator.pipeline.vae.parameters()).dtype
    generator.render(["a photo of a cat"], [1], sizes=(8,))
    assert next(generator.pipeline.vae.parameters()).dtype == before == generator.decode_dtype


def test_the_tiny_decoder_uses_its_own_conventions(tiny_model: Path) -> None:
    from diffusers import AutoencoderTiny

    both = _load(str(tiny_model), device="cpu", tiny_decoder=str(tiny_model / "tiny_decoder"))
    assert both.decoders == ("vae", "tiny") and isinstance(both.tiny, AutoencoderTiny)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = both.decode(latents, decoder="tiny")
        # Scaling factor 1 (the UNet's latents as they are), output in [-1, 1].
        expected = (both.tiny.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    assert both.tiny.config.scaling_factor == 1.0
    assert torch.equal(ours, expected) and ours.shape == (2, 3, 64, 64)
    out = both.render(
        ["a photo of a cat"] * 2, [1, 2], sizes=(16,), params=SamplingParams(decoder="tiny")
    )[16]
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    assert both.decoder_provenance("tiny")["class"] == "AutoencoderTiny"
    assert both.decoder_provenance("tiny")["local_fingerprint"]
    with pytest.raises(PartUnavailable, match="DISTILL_TINY_DECODER"):
        _load(str(tiny_model), device="cpu").render(
            ["a"], [1], sizes=(8,), params=SamplingParams(decoder="tiny")
        )


def test_a_tiny_decoder_that_cannot_be_loaded_is_optional_and_says_why(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "none-here")
    with caplog.at_level(logging.WARNING, logger="worker.model.loading"):
        generator = _load(str(tiny_model), device="cpu", tiny_decoder=missing)
    assert generator.decoders == ("vae",) and generator.tiny is None
    assert missing in generator.unavailable["tiny_decoder"]
    said = [r.getMessage() for r in caplog.records if "tiny decoder" in r.getMessage()]
    assert len(said) == 1 and missing in said[0] and "To enable it" in said[0], said
    with pytest.raises(PartUnavailable, match="none-here") as refused:
        generator.render(["a"], [1], sizes=(8,), params=SamplingParams(decoder="tiny"))
    # A job that reaches such a worker fails with a public type and the reason, not internal.
    kind, detail = describe_failure(PartUnavailable, refused.value)
    assert kind == ErrorType.invalid_request and "none-here" in detail
    # The model itself is still required.
    with pytest.raises(ModelLoadError, match="model"):
        _load(str(tmp_path / "no-model"), device="cpu")


def test_the_first_tiny_decoder_that_loads_is_used(tiny_model: Path, tmp_path: Path) -> None:
    beside = str(tiny_model / TINY_DECODER_DIR)
    generator = _load(
        str(tiny_model), device="cpu", tiny_decoder=[str(tmp_path / "none-here"), beside]
    )
    assert generator.decoders == ("vae", "tiny") and generator.tiny_id == beside
    assert generator.unavailable == {} and generator.tiny_fingerprint


def test_the_worker_looks_for_the_tiny_decoder_beside_a_local_model_first(
    tiny_model: Path, tmp_path: Path
) -> None:
    default = Settings.model_fields["tiny_decoder"].default
    plain = Settings(model=str(tiny_model))
    assert tiny_decoder_sources(plain) == [str(tiny_model / TINY_DECODER_DIR), default]
    assert tiny_decoder_sources(Settings(model=str(tmp_path))) == [default]
    assert tiny_decoder_sources(Settings(model="stabilityai/sdxl-turbo")) == [default]
    # The default written out (as docker-compose does) is still the default.
    spelled = Settings(model=str(tiny_model), tiny_decoder=default)
    assert tiny_decoder_sources(spelled) == [str(tiny_model / TINY_DECODER_DIR), default]
    # Set explicitly, it is the only place looked at; "none" turns it off.
    chosen = Settings(model=str(tiny_model), tiny_decoder=str(tmp_path / "mine"))
    assert tiny_decoder_sources(chosen) == [str(tmp_path / "mine")]
    assert tiny_decoder_sources(Settings(model=str(tiny_model), tiny_decoder="none")) == []


def test_a_short_last_batch_is_padded_to_the_fixed_batch(tiny_model: Path) -> None:
    eager = _load(str(tiny_model), device="cpu")
    padded = dataclasses.replace(eager, fixed_batch=4)
    prompts, seeds = ["a photo of a cat", "a photo of a dog", "a photo of a cat"], [1, 2, 3]
    calls: list[int] = []
    original = padded.render_call

    def counting(p: list[str], *args: object, **options: object) -> dict[int, np.ndarray]:
        calls.append(len(p))
        return original(p, *args, **options)  # type: ignore[arg-type]

    padded.render_call = counting  # type: ignore[method-assign]
    out = padded.render(prompts, seeds, sizes=(16,))[16]
    assert calls == [4] and out.shape[0] == 3
    assert np.array_equal(out, eager.render(prompts, seeds, sizes=(16,))[16])


def test_batch_tuning_measures_doubling_batches(generator: Generator) -> None:
    best, tried = compiling.tune_batch(generator, 1, limit=4, gain=1.0)
    assert [b for b, _ in tried][:1] == [1] and best in (1, 2, 4)
    assert all(rate is not None and rate > 0 for _, rate in tried)


@pytest.mark.slow
def test_a_compiled_generator_gives_the_eager_images(tiny_model: Path) -> None:
    """torch.compile (regional: the UNet's repeated blocks, and both decoders) on this CPU."""
    tiny = str(tiny_model / "tiny_decoder")
    eager = _load(str(tiny_model), device="cpu", tiny_decoder=tiny)
    compiled = _load(
        str(tiny_model), device="cpu", tiny_decoder=tiny, compile="regional", batch_size=4
    )
    assert compiled.compile_seconds > 0 and compiled.describe()["compile"] == "regional"
    prompts, seeds = ["a photo of a cat", "a photo of a dog", "a photo of a cat"], [4, 5, 6]
    for decoder in ("vae", "tiny"):
        a = eager.render(prompts, seeds, sizes=(16,), params=SamplingParams(decoder=decoder))[
            16
        ].astype(int)
        b = compiled.render(prompts, seeds, sizes=(16,), params=SamplingParams(decoder=decoder))[
            16
        ].astype(int)
        assert np.abs(a - b).max() <= 1, decoder  # equal up to rounding


def test_per_image_guidance_gives_each_image_what_it_would_get_alone(
    generator: Generator,
) -> None:
    """A batch sampled at the top scale with per-image scales (guidance_scale: [low, high])
    gives each image what a call at its own single scale gives it."""
    from worker.model.generator import Conditioning

    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a ship"]
    seeds = [5, 6, 7]
    scales = [1.5, 4.0, 7.25]
    params = SamplingParams(guidance_scale=max(scales), guidance_range=(1.0, 8.0))
    batch = generator.sample(prompts, seeds, params, Conditioning(guidance=scales))
    for i, scale in enumerate(scales):
        alone = generator.sample(
            prompts[i : i + 1], seeds[i : i + 1], SamplingParams(guidance_scale=scale)
        )
        assert torch.allclose(batch[i : i + 1].float(), alone.float(), atol=1e-4), scale
    # The scales matter: the same batch at one scale differs.
    flat = generator.sample(prompts, seeds, SamplingParams(guidance_scale=max(scales)))
    assert not torch.allclose(flat[0].float(), batch[0].float(), atol=1e-3)
    with pytest.raises(ValueError, match="one scale per seed"):
        generator.sample(prompts, seeds, params, Conditioning(guidance=scales[:2]))
