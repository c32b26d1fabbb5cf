"""Coreset selection (random real, herding, k-center) and loading reference sets as arrays."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import keys, references
from core.storage import LocalStorage
from tests.conftest import make_settings
from worker.selection import coreset
from worker.selection import references as loader


def blobs(centers: int = 4, per: int = 50, dim: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 20, size=(centers, dim))
    return np.concatenate([m + rng.normal(0, 1, size=(per, dim)) for m in means])


def mean_error(x: np.ndarray, picks: list[int]) -> list[float]:
    """Distance of the running mean of the first j picks to the mean of all rows, per j."""
    mu = x.mean(axis=0)
    return [float(np.linalg.norm(x[picks[:j]].mean(axis=0) - mu)) for j in range(1, len(picks) + 1)]


def test_herding_running_mean_approaches_the_class_mean_faster_than_random() -> None:
    x = blobs()
    picks = coreset.herding(x, 20)
    assert len(set(picks)) == 20
    herded = mean_error(x, picks)
    rng = np.random.default_rng(1)
    drawn = np.array(
        [mean_error(x, rng.choice(len(x), 20, replace=False).tolist()) for _ in range(200)]
    )
    # From a handful of picks on, herding beats (nearly) every random draw of the same size.
    for j in (4, 10, 20):
        assert herded[j - 1] < np.quantile(drawn[:, j - 1], 0.05), j
    assert herded[-1] < 0.2 * float(np.median(drawn[:, -1]))
    # Greedy: the first j picks are the pick for j.
    assert coreset.herding(x, 7) == picks[:7]


def test_kcenter_starts_at_the_mean_and_spreads_out() -> None:
    x = blobs(centers=4, per=50)
    picks = coreset.kcenter(x, 4)
    centroid = int(np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    assert picks[0] == centroid
    # Four well-separated blobs of 50: the 2nd..4th picks land in the blobs not yet covered.
    assert len({p // 50 for p in picks[1:]} | {centroid // 50}) == 4

    # The covering radius shrinks as centres are added, and beats random centres.
    def radius(chosen: list[int]) -> float:
        d = ((x[:, None, :] - x[None, chosen, :]) ** 2).sum(axis=2)
        return float(np.sqrt(d.min(axis=1).max()))

    ten = coreset.kcenter(x, 10)
    assert ten[:4] == picks
    rng = np.random.default_rng(0)
    random_radius = [radius(rng.choice(len(x), 10, replace=False).tolist()) for _ in range(50)]
    assert radius(ten) < float(np.median(random_radius))
    # Farthest-first: every centre is at least the final covering radius from the others.
    gaps = np.sqrt(((x[ten][:, None, :] - x[ten][None, :, :]) ** 2).sum(axis=2))
    assert gaps[~np.eye(10, dtype=bool)].min() >= radius(ten) - 1e-9


def test_random_real_is_seeded_per_class() -> None:
    classes = [np.zeros((30, 8, 8, 3), np.uint8), np.zeros((12, 8, 8, 3), np.uint8)]
    first = coreset.select("random_real", classes, k=5, seed=3)
    assert first == coreset.select("random_real", classes, k=5, seed=3)
    assert first != coreset.select("random_real", classes, k=5, seed=4)
    assert all(len(set(c)) == 5 for c in first)
    assert max(first[1]) < 12
    # A class's draw does not depend on the classes after it.
    assert coreset.select("random_real", classes[:1], k=5, seed=3) == first[:1]


def test_select_refuses_what_it_cannot_do() -> None:
    classes = [np.zeros((6, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8)]
    with pytest.raises(ValueError, match="class 1 has 2"):
        coreset.select("herding", classes, k=3, seed=0)
    with pytest.raises(ValueError, match="unknown selection method 'best'"):
        coreset.select("best", classes, k=1, seed=0)
    with pytest.raises(ValueError, match="feature rows"):
        coreset.select(
            "kcenter", classes, k=1, seed=0, features=[np.zeros((6, 2)), np.zeros((3, 2))]
        )


def tiny_classes(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = [np.array([200, 30, 30]), np.array([30, 30, 200])]
    return [
        np.clip(b + rng.normal(0, 40, size=(16, 8, 8, 3)), 0, 255).astype(np.uint8) for b in base
    ]


@pytest.mark.parametrize("method", ["herding", "kcenter"])
def test_selection_on_convnet_features_is_deterministic(method: str) -> None:
    classes = tiny_classes()
    first = coreset.select(method, classes, k=4, seed=0, feature_epochs=2, device="cpu")
    again = coreset.select(method, classes, k=4, seed=0, feature_epochs=2, device="cpu")
    assert first == again
    assert all(len(set(c)) == 4 and max(c) < 16 for c in first)
    features = coreset.embed_classes(classes, seed=0, epochs=2, device="cpu")
    assert [f.shape for f in features] == [(16, 128), (16, 128)]  # ConvNet-3 on 8 px: 128x1x1
    assert coreset.select(method, classes, k=4, seed=0, features=features) == first


# --- loading sets ------------------------------------------------------------------------------


def png(color: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> bytes:
    image = Image.new("RGB", size, (0, 0, 0))
    # A coloured centre square and black side bands: a centre crop keeps only the colour.
    width, height = size
    side = min(size)
    image.paste(
        color,
        ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2),
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


IMAGES = {
    "n01440764_tench": [png((250, 0, 0)), png((240, 0, 0))],
    "goldfish": [png((0, 250, 0)), png((0, 250, 0)), png((0, 240, 0))],  # one repeated file
}


def test_a_named_directory_and_the_stored_zip_load_the_same(tmp_path: Path) -> None:
    named = tmp_path / "refs" / "fish"
    upload = tmp_path / "upload.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for folder, files in IMAGES.items():
            for number, data in enumerate(files):
                (named / "train" / folder).mkdir(parents=True, exist_ok=True)
                (named / "train" / folder / f"{number}.png").write_bytes(data)
                archive.writestr(f"{folder}/other-name-{number}.png", data)
    settings = make_settings(
        "redis://127.0.0.1:1/0", tmp_path / "data", references_dir=tmp_path / "refs"
    )
    normalized, info = references.ingest(
        upload, max_bytes=1 << 20, max_images=10, max_pixels=10_000
    )
    LocalStorage(tmp_path / "data").put(keys.reference_archive(info.id), normalized)

    classes = [("goldfish", "n01443537"), ("tench", "n01440764")]
    with loader.source(settings, name="fish") as path:
        from_dir = loader.load_for_classes(path, classes, size=4)
    with loader.source(settings, reference_id=info.id) as path:
        from_zip = loader.load_for_classes(path, classes, size=4)
    assert [c.folder for c in from_dir] == ["goldfish", "n01440764_tench"]
    for a, b in zip(from_dir, from_zip, strict=True):
        assert a.digests == b.digests and np.array_equal(a.images, b.images)
    goldfish = from_dir[0]
    assert goldfish.images.shape == (2, 4, 4, 3) and goldfish.images.dtype == np.uint8
    assert list(goldfish.digests) == sorted(
        hashlib.sha256(d).hexdigest() for d in set(IMAGES["goldfish"])
    )
    # Centre-cropped, not stretched: no black band survives.
    assert goldfish.images[..., 1].min() > 200 and goldfish.images[..., 0].max() < 10

    with (
        pytest.raises(ValueError, match="no folder for 1 class"),
        loader.source(settings, name="fish") as path,
    ):
        loader.load_for_classes(path, [("shark", None), ("goldfish", None)], size=4)
    with (
        pytest.raises(ValueError, match="no reference set named 'sharks'"),
        loader.source(settings, name="sharks"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="not in the store"),
        loader.source(settings, reference_id="0" * 32),
    ):
        pass
