"""The CLIP model behind ``select.scorer: clip``: where it is looked for, that it never stops
a worker, and that the same images give the same embeddings."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from core.settings import Settings
from worker.model import clip


def test_it_is_looked_for_beside_the_model_then_at_its_id(tmp_path: Path, tiny_clip: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    default = Settings.model_fields["clip_scorer"].default
    assert clip.sources(Settings(model=str(model))) == [default]
    shutil.copytree(tiny_clip, model / "clip_scorer")
    assert clip.sources(Settings(model=str(model))) == [str(model / "clip_scorer"), default]
    assert clip.sources(Settings(model=str(model), clip_scorer="elsewhere/clip")) == [
        "elsewhere/clip"
    ]
    assert clip.sources(Settings(model=str(model), clip_scorer="none")) == []
    loaded, why = clip.load(Settings(model=str(model)), device="cpu", dtype=torch.float32)
    assert loaded is not None and why is None
    assert loaded.source == str(model / "clip_scorer")


def test_a_clip_model_that_cannot_load_is_a_reason_not_an_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    loaded, why = clip.load(
        Settings(model=str(tmp_path), clip_scorer=str(broken)), device="cpu", dtype=torch.float32
    )
    assert loaded is None and why is not None and str(broken) in why
    off, said = clip.load(Settings(clip_scorer="none"), device="cpu", dtype=torch.float32)
    assert off is None and said == "DISTILL_CLIP_SCORER is none"


def test_embeddings_are_unit_and_repeat_exactly(tiny_clip: Path) -> None:
    loaded, why = clip.load(Settings(clip_scorer=str(tiny_clip)), device="cpu", dtype=torch.float32)
    assert loaded is not None, why
    images = np.random.default_rng(3).integers(0, 256, (clip.CHUNK + 5, 16, 16, 3), np.uint8)
    every = loaded.images(images)
    assert every.shape == (clip.CHUNK + 5, 16)
    assert np.allclose(np.linalg.norm(every, axis=1), 1.0)
    # The same images in the same order: the same numbers, bit for bit; an image in another
    # chunk: the same up to float32 rounding.
    assert np.array_equal(loaded.images(images), every)
    assert np.allclose(loaded.images(images[-1:]), every[-1:], atol=1e-6)
    texts = loaded.texts(["a photo of a cat", "a photo of a dog"])
    assert texts.shape == (2, 16) and not np.allclose(texts[0], texts[1])
