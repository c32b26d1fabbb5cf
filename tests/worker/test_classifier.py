"""Pretrained soft-label teachers (``worker.model.classifier``): every teacher of
DISTILL_TEACHERS that loads is kept, each that does not is a reason (never an error), and an
image's logits are the model's own for that image alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.settings import Settings
from worker.model import classifier
from worker.model.tiny_model import build_classifier


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("models") / "teacher")


def test_teachers_that_load_are_kept_and_the_others_are_reasons(
    tmp_path: Path, teacher: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    listed = f" {teacher} ,{broken},{teacher}"  # spaces and a repeat are ignored
    settings = Settings(teachers=listed)
    assert settings.teacher_sources == [str(teacher), str(broken)]
    loaded, failed = classifier.load_all(settings, device="cpu")
    assert list(loaded) == [str(teacher)] and list(failed) == [str(broken)]
    assert failed[str(broken)]  # why, in one line
    model = loaded[str(teacher)]
    assert model.labels[:3] == ["airplane", "automobile", "bird"] and len(model.labels) == 10
    assert model.size == 32 and model.describe()["fingerprint"]
    assert classifier.load_all(Settings(teachers="none"), device="cpu") == ({}, {})


def test_logits_are_the_models_for_one_image_preprocessed_as_its_config_says(
    teacher: Path,
) -> None:
    loaded, _ = classifier.load_all(Settings(teachers=str(teacher)), device="cpu")
    model = loaded[str(teacher)]
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    config = json.loads((teacher / "preprocessor_config.json").read_text())
    # A batch of one, as the model is called (the layout decides the last bits of a conv).
    pixels = torch.from_numpy(image[None].copy()).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(config["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["image_std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = model.model(pixel_values=(pixels - mean) / std).logits[0].numpy()
    assert np.array_equal(model.logits(image), expected)
    # Another size is resized to the model's side first (bicubic, antialiased, as CLIP's).
    small = image[::2, ::2]
    scaled = torch.from_numpy(small[None].copy()).permute(0, 3, 1, 2).float() / 255.0
    scaled = torch.nn.functional.interpolate(
        scaled, size=(32, 32), mode="bicubic", antialias=True
    ).clamp(0.0, 1.0)
    with torch.inference_mode():
        resized = model.model(pixel_values=(scaled - mean) / std).logits[0].numpy()
    # (to float32 rounding: the resized tensor's memory layout picks the conv's kernel)
    assert np.allclose(model.logits(small), resized, atol=1e-5)
