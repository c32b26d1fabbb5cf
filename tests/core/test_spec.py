from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.augmentation import PAPER_POLICY, AugmentSpec, TransformStep
from core.spec import DatasetSpec, derive_seed


def test_generated_per_class_is_ceil_of_ipc_over_copies_plus_one() -> None:
    assert DatasetSpec(labels=["a"], ipc=10).generated_per_class == 2
    assert DatasetSpec(labels=["a"], ipc=7).generated_per_class == 2
    assert DatasetSpec(labels=["a"], ipc=1).generated_per_class == 1
    none = DatasetSpec(labels=["a", "b"], ipc=7, augment=AugmentSpec(policy="none"))
    assert none.generated_per_class == 7 and none.total_generated == 14
    assert DatasetSpec(labels=["a"], ipc=20, augment={"copies": 0}).generated_per_class == 20  # type: ignore[arg-type]


def test_labels_keep_the_callers_order_and_prompts_read_underscores_as_spaces() -> None:
    spec = DatasetSpec(labels=["zebra", "apple", "aquarium_fish"], ipc=1)
    assert spec.labels == ["zebra", "apple", "aquarium_fish"]
    classes = spec.classes()
    assert [(c.index, c.label) for c in classes] == [
        (0, "zebra"),
        (1, "apple"),
        (2, "aquarium_fish"),
    ]
    assert spec.prompt(classes[2]) == "a photo of a aquarium fish"


def test_paper_policy_is_the_papers_six_transforms() -> None:
    assert [(s.name, s.params.get("p")) for s in PAPER_POLICY] == [
        ("RandomCrop", None),
        ("HorizontalFlip", 0.8),
        ("VerticalFlip", 0.8),
        ("RandomBrightnessContrast", 0.5),
        ("Rotate", 0.8),
        ("RandomGamma", 0.5),
    ]
    rotate = PAPER_POLICY[4].params
    assert rotate["limit"] == 60 and rotate["border_mode"] == "reflect_101"
    assert AugmentSpec().steps() == PAPER_POLICY


def test_transform_params_are_validated_and_defaults_filled() -> None:
    step = TransformStep(name="Rotate", params={"limit": 15})
    assert step.params == {"limit": 15.0, "border_mode": "reflect_101", "p": 0.5}
    with pytest.raises(ValidationError, match=r"params\.angle"):
        TransformStep(name="Rotate", params={"angle": 15})
    with pytest.raises(ValidationError, match=r"params\.border_mode"):
        TransformStep(name="Rotate", params={"border_mode": "black"})
    with pytest.raises(ValidationError):
        TransformStep(name="RandomCrop", params={"height": 10})


def test_spec_round_trips_through_json() -> None:
    spec = DatasetSpec(
        labels=["cat"],
        ipc=3,
        augment={"policy": [{"name": "ColorJitter", "params": {"hue": 0.1}}], "copies": 2},  # type: ignore[arg-type]
    )
    again = DatasetSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, "cat", 0) == derive_seed(0, "cat", 0)
    seeds = {
        derive_seed(s, label, n) for s in (0, 1) for label in ("cat", "dog") for n in range(50)
    }
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
    # Pinned: a change here changes every dataset ever generated.
    assert derive_seed(0, "cat", 0) == 6482189425193563015
