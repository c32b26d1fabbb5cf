"""Presets are the datasets' standard class-index order; pinned here so a reorder fails loudly."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from core.presets import PRESETS, NotImageNet, from_labels, get, imagenet_ids
from core.spec import DatasetSpec

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize(
    ("name", "count", "first", "last", "size"),
    [
        ("cifar10", 10, "airplane", "truck", 32),
        ("cifar100", 100, "apple", "worm", 32),
        ("tinyimagenet", 200, ("n01443537", "goldfish"), ("n12267677", "acorn"), 64),
        ("imagenet1k", 1000, ("n01440764", "tench"), ("n15075141", "toilet tissue"), 224),
    ],
)
def test_preset_counts_first_and_last(
    name: str, count: int, first: object, last: object, size: int
) -> None:
    preset = get(name)
    classes = preset.classes
    assert len(classes) == count
    assert [c.index for c in classes] == list(range(count))
    for cls, expected in ((classes[0], first), (classes[-1], last)):
        if isinstance(expected, tuple):
            assert (cls.wnid, cls.label) == expected
        else:
            assert cls.label == expected and cls.wnid is None
    assert preset.image_size == size
    assert len(preset.mean) == len(preset.std) == 3


def test_cifar_orders_are_the_official_ones() -> None:
    assert [c.label for c in get("cifar10").classes] == CIFAR10
    cifar100 = [c.label for c in get("cifar100").classes]
    assert cifar100 == sorted(cifar100)
    assert cifar100[:5] == ["apple", "aquarium_fish", "baby", "bear", "beaver"]
    assert "orange" in cifar100 and "sweet_pepper" in cifar100


def test_wordnet_presets_are_sorted_wnids_with_readable_names() -> None:
    for name in ("tinyimagenet", "imagenet1k"):
        wnids = [c.wnid or "" for c in get(name).classes]
        assert wnids == sorted(wnids) and len(set(wnids)) == len(wnids)
        assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    tiny = {c.wnid for c in get("tinyimagenet").classes}
    assert tiny <= {c.wnid for c in get("imagenet1k").classes}
    goldfish = get("tinyimagenet").classes[0]
    assert goldfish.synonyms == ("goldfish", "Carassius auratus")
    assert goldfish.prompt_name == "goldfish"


def test_preset_spec_defaults_and_prompts() -> None:
    spec = DatasetSpec(preset="cifar100", ipc=1)
    assert spec.image_size == 32 and spec.labels is None
    assert spec.prompt(spec.classes()[1]) == "a photo of a aquarium fish"
    assert DatasetSpec(preset="tinyimagenet", ipc=1).image_size == 64
    assert DatasetSpec(preset="imagenet1k", ipc=1, image_size=64).image_size == 64


def test_duplicate_imagenet_names_get_distinct_seeds_by_wnid() -> None:
    cranes = [c for c in get("imagenet1k").classes if c.label == "crane"]
    assert len(cranes) == 2 and cranes[0].key != cranes[1].key


def test_exactly_one_of_labels_or_preset_and_ipc_or_budget() -> None:
    with pytest.raises(ValidationError, match="exactly one of labels or preset"):
        DatasetSpec(labels=["a"], preset="cifar10", ipc=1)
    with pytest.raises(ValidationError, match="exactly one of labels or preset"):
        DatasetSpec(ipc=1)
    with pytest.raises(ValidationError, match="exactly one of ipc or budget_seconds"):
        DatasetSpec(preset="cifar10", ipc=1, budget_seconds=60)
    with pytest.raises(ValidationError, match="exactly one of ipc or budget_seconds"):
        DatasetSpec(preset="cifar10")
    with pytest.raises(ValidationError):
        DatasetSpec(preset="mnist", ipc=1)  # type: ignore[arg-type]
    assert set(PRESETS) == {
        "cifar10",
        "cifar100",
        "tinyimagenet",
        "imagenet1k",
        "imagenette",
        "imagewoof",
    }


def test_imagenette_and_imagewoof_are_pinned_in_their_standard_order() -> None:
    # fast.ai's folders (github.com/fastai/imagenette) sorted, as torchvision's ImageFolder
    # numbers them; ids are ImageNet-1K class indices (what DiT is conditioned on).
    nette = get("imagenette")
    assert [c.wnid for c in nette.classes] == [
        "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
        "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
    ]  # fmt: skip
    assert [c.label for c in nette.classes][-1] == "parachute"
    assert imagenet_ids(nette.classes) == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    woof = get("imagewoof")
    assert [c.wnid for c in woof.classes] == [
        "n02086240", "n02087394", "n02088364", "n02089973", "n02093754",
        "n02096294", "n02099601", "n02105641", "n02111889", "n02115641",
    ]  # fmt: skip
    assert imagenet_ids(woof.classes) == [155, 159, 162, 167, 182, 193, 207, 229, 258, 273]
    assert nette.image_size == woof.image_size == 256


def test_imagenet_ids_match_wnids_and_names_and_refuse_the_rest() -> None:
    labels = ["n01440764", "Golden Retriever", "golden_retriever", "tabby cat"]
    assert imagenet_ids(from_labels(labels)) == [0, 207, 207, 281]
    assert len(imagenet_ids(get("tinyimagenet").classes)) == 200
    with pytest.raises(NotImageNet) as raised:
        imagenet_ids(from_labels(["tench", "crane", "warp drive"]))
    assert [p[0] for p in raised.value.problems] == [1, 2]
    assert "n02012849, n03126707" in str(raised.value)
    assert "labels[2] 'warp drive'" in str(raised.value)


def test_templates_cycle_and_overrides_win() -> None:
    spec = DatasetSpec(
        preset="cifar100",
        ipc=3,
        prompt_template=["a photo of a {label}", "a drawing of a {label}"],
        prompts=[{"label": "orange", "prompt": "a photo of an orange, the fruit"}],  # type: ignore[list-item]
    )
    apple = spec.classes()[0]
    orange = next(c for c in spec.classes() if c.label == "orange")
    assert [spec.prompt(apple, n) for n in range(3)] == [
        "a photo of a apple",
        "a drawing of a apple",
        "a photo of a apple",
    ]
    assert spec.prompt(orange, 1) == "a photo of an orange, the fruit"
    with pytest.raises(ValidationError, match="not a class of this job"):
        DatasetSpec(preset="cifar10", ipc=1, prompts=[{"label": "orange", "prompt": "x"}])  # type: ignore[list-item]
    with pytest.raises(ValidationError, match=r"\[1\] must contain \{label\}"):
        DatasetSpec(labels=["a"], ipc=1, prompt_template=["{label}", "no field"])


def test_the_challenge_constants_are_its_evaluators() -> None:
    from core.presets import CHALLENGE

    assert sorted(CHALLENGE) == ["cifar100", "tinyimagenet"]
    cifar, tiny = CHALLENGE["cifar100"], CHALLENGE["tinyimagenet"]
    assert (cifar.side, cifar.ipc, tiny.side, tiny.ipc) == (32, 10, 64, 10)
    assert cifar.mean == (0.5071, 0.4866, 0.4409) and cifar.std == (0.2673, 0.2564, 0.2762)
    assert tiny.mean == (0.485, 0.456, 0.406) and tiny.std == (0.229, 0.224, 0.225)
