"""The evaluator: ConvNet, DSA, archive and test-set loading, the class-order guard, training.

Everything runs on the CPU in a few seconds; the one training test uses real CIFAR-10
photographs (two easy classes) and is skipped when ../shared/data/cifar10-test is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import CIFAR10_TEST, ROOT
from worker.evaluate import (
    BY_INDEX,
    BY_NAME,
    ClassOrderError,
    EvaluationError,
    check_class_order,
    dsa,
    evaluate,
    load_archive,
    load_testset,
)
from worker.evaluate.data import normalization
from worker.evaluate.network import ConvNet
from worker.outputs import formats
from worker.outputs.archive import ArchiveWriter, class_dir, image_name

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2023, 0.1994, 0.2010]


def write_archive(
    path: Path,
    classes: Sequence[str],
    images: Sequence[Sequence[np.ndarray]],
    *,
    preset: Mapping[str, object] | None = None,
    tensors: bool = False,
) -> Path:
    """An archive in the service's format: train/ tree, metadata.jsonl, manifest.json."""
    flat: list[np.ndarray] = []
    labels: list[int] = []
    with ArchiveWriter(final=path, partial=path.with_name(f".{path.name}.part")) as writer:
        for index, (label, class_images) in enumerate(zip(classes, images, strict=True)):
            for number, image in enumerate(class_images):
                writer.add_image(
                    image_name(index, label, number), image, label=index, label_name=label
                )
                flat.append(image)
                labels.append(index)
        if tensors:
            writer.add_file("tensors.pt", formats.tensors_pt(flat, labels, list(classes)))
        writer.commit(
            {
                "format": "distill-service/archive-v1",
                "request": {"labels": list(classes)},
                "preset": preset,
                "classes": [
                    {
                        "index": i,
                        "label": label,
                        "wnid": None,
                        "folder": f"train/{class_dir(i, label)}",
                        "images": len(images[i]),
                    }
                    for i, label in enumerate(classes)
                ],
            }
        )
    return path


def write_folder(
    root: Path, folders: Sequence[str], images: Sequence[Sequence[np.ndarray]]
) -> Path:
    """An ImageFolder test tree of PNGs."""
    for folder, class_images in zip(folders, images, strict=True):
        (root / folder).mkdir(parents=True)
        for n, image in enumerate(class_images):
            Image.fromarray(image).save(root / folder / f"{n:04d}.png")
    return root


def noise(count: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def cifar(folder: str, start: int, stop: int) -> list[np.ndarray]:
    """Real CIFAR-10 test photographs of one class folder, by sorted file name."""
    directory = CIFAR10_TEST / folder
    if not directory.is_dir():
        pytest.skip(f"{directory} not present")
    files = sorted(directory.iterdir())[start:stop]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


# --- network -------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "depth", "width"), [(32, 3, 128), (64, 3, 128), (64, 4, 16)])
def test_convnet_output_shape_and_structure(size: int, depth: int, width: int) -> None:
    net = ConvNet(10, image_size=size, depth=depth, width=width)
    assert net(torch.zeros(2, 3, size, size)).shape == (2, 10)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == len(norms) == depth
    assert all(c.out_channels == width and c.kernel_size == (3, 3) for c in convs)
    # One group per channel: instance norm with a learned affine.
    assert all(n.num_groups == n.num_channels == width and n.affine for n in norms)
    side = size // 2**depth
    assert net.classifier.in_features == width * side * side


def test_convnet_rejects_sizes_pooling_cannot_halve() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ConvNet(10, image_size=36, depth=3)


# --- DSA -----------------------------------------------------------------------------------


def test_dsa_keeps_shapes_and_repeats_for_a_seed() -> None:
    x = torch.randn(16, 3, 32, 32)
    for name, family in dsa.FAMILIES:
        a = family(x, torch.Generator().manual_seed(1), dsa.DSAParams())
        b = family(x, torch.Generator().manual_seed(1), dsa.DSAParams())
        c = family(x, torch.Generator().manual_seed(2), dsa.DSAParams())
        assert a.shape == x.shape and a.dtype == x.dtype, name
        assert torch.equal(a, b), name
        assert not torch.equal(a, x) and not torch.equal(a, c), name
    first = dsa.augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(first, dsa.augment(x, torch.Generator().manual_seed(7)))


def test_dsa_draws_every_family_and_is_differentiable() -> None:
    generator = torch.Generator().manual_seed(0)
    picked = {int(torch.randint(0, 6, (1,), generator=generator)) for _ in range(200)}
    assert picked == set(range(len(dsa.FAMILIES)))
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    for _, family in dsa.FAMILIES:
        family(x, generator, dsa.DSAParams()).sum().backward()  # type: ignore[no-untyped-call]
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dsa_crop_and_cutout_match_the_reference_geometry() -> None:
    x = torch.ones(64, 1, 32, 32)
    cut = dsa.cutout(x, torch.Generator().manual_seed(0))
    zeros = (cut == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 16 * 16 and zeros.min() >= 8 * 8  # a half-side square, maybe clipped
    moved = dsa.crop(x, torch.Generator().manual_seed(0))
    empty_rows = (moved[:, 0].sum(dim=2) == 0).sum(dim=1)
    assert empty_rows.max() <= 4  # at most 1/8 of 32 pixels shifted in


# --- class order ---------------------------------------------------------------------------


def test_class_order_accepts_matching_names() -> None:
    classes = ["airplane", "aquarium_fish", "Maple Tree"]
    assert check_class_order(classes, ["000_airplane", "001_aquarium_fish", "002_maple_tree"]) == (
        BY_NAME
    )
    assert check_class_order(classes, ["Airplane", "aquarium fish", "maple_tree"]) == BY_NAME
    assert check_class_order(["goldfish"], ["n01443537"], wnids=["n01443537"]) == BY_NAME


def test_class_order_by_index_only_for_numbered_folders() -> None:
    assert check_class_order(["airplane", "frog"], ["00000", "00001"]) == BY_INDEX
    with pytest.raises(ClassOrderError, match="zero-pad"):
        check_class_order(
            [str(i) for i in range(11)], [str(i) for i in sorted(map(str, range(11)))]
        )


def test_class_order_rejects_a_swap_and_names_the_position() -> None:
    with pytest.raises(ClassOrderError) as caught:
        check_class_order(["airplane", "cat", "frog"], ["000_airplane", "001_frog", "002_cat"])
    message = str(caught.value)
    assert "index 1" in message and "'cat'" in message and "'001_frog'" in message
    assert "another order" in message
    with pytest.raises(ClassOrderError, match="2 classes but the test set has 3"):
        check_class_order(["a", "b"], ["a", "b", "c"])


def test_evaluate_refuses_swapped_test_folders_before_training(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "a.zip", ["cat", "dog"], [noise(2, seed=1), noise(2)])
    swapped = write_folder(tmp_path / "test", ["000_dog", "001_cat"], [noise(2), noise(2)])
    with pytest.raises(ClassOrderError, match="index 0"):
        evaluate(archive, swapped, runs=1, epochs=1, device="cpu")


# --- inputs --------------------------------------------------------------------------------


def test_archive_reads_the_same_from_tensors_and_from_pngs(tmp_path: Path) -> None:
    images = [noise(3, seed=1), noise(2, seed=2)]
    with_tensors = load_archive(write_archive(tmp_path / "t.zip", ["a", "b"], images, tensors=True))
    pngs = load_archive(write_archive(tmp_path / "p.zip", ["a", "b"], images))
    assert (with_tensors.source, pngs.source) == ("tensors.pt", "train/")
    assert torch.equal(with_tensors.images, pngs.images)
    assert pngs.labels.tolist() == [0, 0, 0, 1, 1]
    assert pngs.images.shape == (5, 3, 32, 32) and pngs.classes == ("a", "b")


def test_normalization_prefers_given_then_preset_then_computed(tmp_path: Path) -> None:
    preset = {"name": "cifar10", "mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    with_preset = load_archive(write_archive(tmp_path / "p.zip", ["a"], [noise(2)], preset=preset))
    plain = load_archive(
        write_archive(tmp_path / "n.zip", ["a"], [[np.full((8, 8, 3), 51, np.uint8)]])
    )
    assert normalization(with_preset).source == "preset cifar10"
    assert normalization(with_preset).mean == tuple(CIFAR10_MEAN)
    computed = normalization(plain)
    assert computed.source == "computed from the training images"
    assert computed.mean == pytest.approx((0.2, 0.2, 0.2))
    given = normalization(plain, mean=[0.5] * 3, std=[0.25] * 3)
    assert (given.source, given.std) == ("given", (0.25, 0.25, 0.25))
    with pytest.raises(EvaluationError, match="both"):
        normalization(plain, mean=[0.5] * 3)


def test_testset_from_a_zip_matches_the_directory_and_sizes_are_checked(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "test", ["000_a", "001_b"], [noise(2, 40), noise(3, 40)])
    packed = tmp_path / "test.zip"
    with zipfile.ZipFile(packed, "w") as archive:
        for file in sorted(root.rglob("*.png")):
            archive.write(file, f"held-out/{file.relative_to(root)}")
    from_dir, from_zip = load_testset(root), load_testset(packed)
    assert from_zip.folders == from_dir.folders == ("000_a", "001_b")
    assert torch.equal(from_zip.images, from_dir.images)
    assert from_dir.labels.tolist() == [0, 0, 1, 1, 1]

    archive_32 = write_archive(tmp_path / "a.zip", ["a", "b"], [noise(1), noise(1)])
    with pytest.raises(EvaluationError, match="40x40"):
        evaluate(archive_32, root, runs=1, epochs=1, device="cpu")
    resized = load_testset(root, resize_to=(32, 32))
    assert resized.image_size == (32, 32) and resized.resized == 5


# --- training ------------------------------------------------------------------------------


def test_short_training_on_two_real_classes_beats_chance(tmp_path: Path) -> None:
    # airplane (00000) against frog (00006): the first 50 of each train, the next 200 test.
    train = [cifar("00000", 0, 50), cifar("00006", 0, 50)]
    test = [cifar("00000", 50, 250), cifar("00006", 50, 250)]
    archive = write_archive(tmp_path / "a.zip", ["airplane", "frog"], train)
    testset = write_folder(tmp_path / "test", ["airplane", "frog"], test)
    seen: list[tuple[int, int, float | None]] = []
    result = evaluate(
        archive,
        testset,
        runs=1,
        epochs=10,
        device="cpu",
        progress=lambda p: seen.append((p.run, p.epoch, p.accuracy)),
    )
    assert result.mean > 0.7, result.accuracies  # chance is 0.5
    assert result.class_check == BY_NAME and result.device == "cpu"
    assert result.protocol["epochs"] == 10 and result.protocol["runs"] == 1
    assert result.protocol["profile"] == "full"
    assert result.protocol["normalization"]["source"] == "computed from the training images"
    assert result.protocol["train_images"] == 100 and result.protocol["test_images"] == 400
    assert result.seconds_per_epoch > 0 and result.seconds >= result.seconds_per_epoch * 10
    assert [s[1] for s in seen if s[2] is None] == list(range(1, 11))
    assert seen[-1][2] == result.accuracies[0]
    json.dumps(result.to_dict())


# --- command line --------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "worker.evaluate", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    archive = write_archive(
        tmp_path / "a.zip", ["cat", "dog"], [noise(4, seed=1), noise(4, seed=2)], tensors=True
    )
    testset = write_folder(tmp_path / "test", ["00000", "00001"], [noise(5), noise(5, seed=3)])
    out = tmp_path / "result.json"
    done = _cli(str(archive), str(testset), "--epochs", "2", "--runs", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert "2 epochs x 1 runs" in done.stdout and "by index only" in done.stdout
    assert "mean" in done.stdout and "%" in done.stdout
    assert "epoch 2/2" in done.stderr  # the progress bar
    saved = json.loads(out.read_text())
    assert len(saved["accuracies"]) == 1 and saved["protocol"]["epochs"] == 2

    swapped = write_folder(tmp_path / "swapped", ["000_dog", "001_cat"], [noise(1), noise(1)])
    refused = _cli(str(archive), str(swapped), "--epochs", "1")
    assert refused.returncode == 2 and "class order differs at index 0" in refused.stderr
