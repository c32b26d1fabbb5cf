"""Build a tiny random-weight pipeline of each family offline, for tests and smoke runs.

``--family sdxl`` (the default): a real ``StableDiffusionXLPipeline`` directory (two CLIP text
encoders, two CLIP tokenizers, a ``text_time`` UNet, an 8x VAE, an Euler ancestral scheduler
with trailing timestep spacing, as SDXL-Turbo ships), and beside it, in ``DIR/tiny_decoder``,
a tiny random ``AutoencoderTiny`` for ``decoder="tiny"``
(``DISTILL_TINY_DECODER=DIR/tiny_decoder``).
``--family sd``: a ``StableDiffusionPipeline`` (one CLIP text encoder, an Euler scheduler
with trailing spacing, as SD-Turbo ships). ``--family clip``: a ``CLIPModel`` with its
tokenizer and image processor, the ``select`` scorer ``clip``. ``--family dit``: a
``DiTPipeline`` (a class-conditional ``DiTTransformer2DModel`` over the 1000 ImageNet-1K
classes with learned sigma, an 8x VAE, DDIM, and the ImageNet-1K ``id2label`` in its model
index, as facebook/DiT-XL-2-256 ships).

Each is a directory that ``from_pretrained(DIR)`` loads with ``HF_HUB_OFFLINE=1``; the worker
loads it exactly like the real model.

Usage: ``python -m worker.model.tiny_model DIR [--family sdxl|sd|dit]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from core import models, presets

# Byte-level BPE vocabulary: every byte as a token, alone and as a word end. No merges, so
# every character is one token: small, fully offline, and accepted by CLIPTokenizer.
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "bos_token": _SPECIAL[0],
    "eos_token": _SPECIAL[1],
    "unk_token": _SPECIAL[1],
    "pad_token": _SPECIAL[1],
    "errors": "replace",
}


def _byte_alphabet() -> list[str]:
    """The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values."""
    visible = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer(directory: Path) -> int:
    """Write a CLIP tokenizer (vocab.json, merges.txt, config) and return its vocabulary size."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + list(_SPECIAL)
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(_TOKENIZER_CONFIG, indent=2), encoding="utf-8"
    )
    special = {
        k: _TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return len(vocab)


FAMILIES = ("sdxl", "sd", "dit", "clip", "classifier")
#: The UNet both text families share: 8 latents x 8 (VAE) = 64 px images by default.
_TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
#: The SD / SDXL noise schedule with trailing timesteps, as both turbo models ship it.
_TURBO_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}


def build(directory: Path, *, seed: int = 0, family: str = "sdxl") -> Path:
    """Write a tiny pipeline of ``family`` to ``directory`` and return it."""
    if family == "sd":
        return build_sd(directory, seed=seed)
    if family == "dit":
        return build_dit(directory, seed=seed)
    if family == "clip":
        return build_clip(directory, seed=seed)
    if family == "classifier":
        return build_classifier(directory, seed=seed)
    if family != "sdxl":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return build_sdxl(directory, seed=seed)


def _tiny_vae(scaling_factor: float, *, force_upcast: bool) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four blocks give the real 2**3 = 8x spatial scale factor.
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _text_config(vocab_size: int, tokenizer: Any, hidden: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def build_sd(directory: Path, *, seed: int = 0) -> Path:
    """A tiny SD-Turbo-shaped ``StableDiffusionPipeline`` (no safety checker)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    scratch = directory / ".tokenizer-src"
    vocab_size = write_tokenizer(scratch)
    tokenizer = CLIPTokenizer.from_pretrained(str(scratch))
    text_encoder = CLIPTextModel(_text_config(vocab_size, tokenizer, 16))
    unet = UNet2DConditionModel(**_TINY_UNET, cross_attention_dim=16)
    scheduler = EulerDiscreteScheduler(**_TURBO_SCHEDULE)
    pipeline = StableDiffusionPipeline(
        vae=_tiny_vae(0.18215, force_upcast=True),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    _remove(scratch)
    return directory


def build_dit(directory: Path, *, seed: int = 0) -> Path:
    """A tiny DiT-XL/2-shaped ``DiTPipeline``: patch 2, adaLN-zero, 1000 classes (+ the null
    class for guidance), learned sigma (8 output channels for 4 latent ones)."""
    import torch
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    directory = Path(directory)
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,  # 8 latents x 8 (VAE) = 64 px
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        activation_fn="gelu-approximate",
        attention_bias=True,
    )
    scheduler = DDIMScheduler(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="epsilon",
    )
    pipeline = DiTPipeline(
        transformer=transformer, vae=_tiny_vae(0.18215, force_upcast=False), scheduler=scheduler
    )
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    # The published DiT model index carries ImageNet-1K's id2label (DiTPipeline.labels).
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["id2label"] = {
        str(c.index): ", ".join(c.synonyms) for c in presets.get("imagenet1k").classes
    }
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return directory


def _remove(scratch: Path) -> None:
    for path in sorted(scratch.iterdir()):
        path.unlink()
    scratch.rmdir()


def build_sdxl(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline to ``directory`` and return it.

    Architecture as ``StableDiffusionXLPipeline`` expects: the UNet's cross-attention width is
    the two text encoders' hidden sizes together, and its ``text_time`` input is six time ids
    of ``addition_time_embed_dim`` plus the second encoder's pooled projection.
    """
    import torch
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    scratch = directory / ".tokenizer-src"
    vocab_size = write_tokenizer(scratch)
    tokenizer = CLIPTokenizer.from_pretrained(str(scratch))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(scratch))

    text_encoder = CLIPTextModel(_text_config(vocab_size, tokenizer, 16))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, tokenizer, 16))
    time_dim = 8
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=16 + 16,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 16,
    )
    vae = _tiny_vae(0.13025, force_upcast=True)
    scheduler = EulerAncestralDiscreteScheduler(**_TURBO_SCHEDULE)
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    _remove(scratch)
    build_tiny_decoder(directory / TINY_DECODER_DIR, seed=seed)
    return directory


#: Where ``build`` puts the tiny ``AutoencoderTiny``: where a worker serving DIR finds it.
TINY_DECODER_DIR = models.TINY_DECODER_DIR


def build_tiny_decoder(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random ``AutoencoderTiny`` (TAESD's layout at a few channels) that decodes
    the tiny pipeline's 4-channel latents 8x up, as TAESDXL does SDXL's."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed + 1)
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )
    decoder.save_pretrained(str(directory), safe_serialization=True)
    return directory


#: Where a worker serving a local model DIR looks first for its CLIP scorer.
CLIP_SCORER_DIR = models.CLIP_SCORER_DIR


def build_clip(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random ``CLIPModel`` (32 px images, 8 px patches) with a CLIP tokenizer
    and a ``preprocessor_config.json``: what ``select.scorer: clip`` loads
    (``DISTILL_CLIP_SCORER=DIR``, or ``<model>/clip_scorer``)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    text = _text_config(vocab_size, tokenizer, 32).to_dict()
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 16,
        "hidden_act": "gelu",
    }
    torch.manual_seed(seed + 2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(str(directory), safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(directory))
    return directory


def build_classifier(directory: Path, *, seed: int = 0, preset: str = "cifar10") -> Path:
    """Write a tiny random image classifier (a transformers ``ResNetForImageClassification``
    on 32 px, its ``id2label`` the class names of ``preset``, e.g. ``imagenet1k`` for an
    ImageNet-1K one) with a ``preprocessor_config.json``: a soft-label teacher
    (``DISTILL_TEACHERS=DIR``)."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chosen = presets.get(preset)
    classes = chosen.classes
    id2label = {c.index: ", ".join(c.synonyms) if c.synonyms else c.label for c in classes}
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=len(classes),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        architectures=["ResNetForImageClassification"],
    )
    torch.manual_seed(seed + 3)
    ResNetForImageClassification(config).save_pretrained(str(directory), safe_serialization=True)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": 32, "width": 32},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(chosen.mean),
        "image_std": list(chosen.std),
    }
    (directory / "preprocessor_config.json").write_text(
        json.dumps(processor, indent=2) + "\n", encoding="utf-8"
    )
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.model.tiny_model",
        description="Write a tiny random-weight pipeline (SDXL, SD or DiT) to DIR.",
    )
    parser.add_argument("directory", type=Path, help="output directory (created if missing)")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="sdxl",
        help="sdxl (StableDiffusionXLPipeline + a tiny AutoencoderTiny), sd "
        "(StableDiffusionPipeline), dit (DiTPipeline, class-conditional) or clip (a "
        "CLIPModel for select scorer clip) or classifier (a ResNet image classifier on "
        "CIFAR-10's classes, a soft_labels teacher)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    from worker.model.quiet import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    import diffusers  # noqa: F401 - timed apart: importing torch and diffusers dominates
    import transformers  # noqa: F401

    imported = time.perf_counter()
    build(args.directory, seed=args.seed, family=args.family)
    built = time.perf_counter()
    what = {
        "sdxl": f"SDXL pipeline to {args.directory} and a tiny AutoencoderTiny to "
        f"{args.directory / TINY_DECODER_DIR}",
        "sd": f"SD pipeline to {args.directory}",
        "dit": f"DiT pipeline (class-conditional, ImageNet-1K) to {args.directory}",
        "clip": f"CLIPModel (select scorer clip) to {args.directory}",
        "classifier": f"image classifier (a soft_labels teacher) to {args.directory}",
    }[args.family]
    print(
        f"wrote a tiny {what}: built in {built - imported:.2f} s "
        f"(+{imported - started:.2f} s importing torch/diffusers/transformers)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
