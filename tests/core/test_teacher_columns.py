"""How a job's classes find their columns in a pretrained teacher's logits
(``core.soft_labels.teacher_columns``): by ImageNet-1K id for a 1000-class teacher in the
standard order, by name otherwise, and every class that cannot be matched named."""

from __future__ import annotations

import pytest

from core import presets
from core.soft_labels import UnmatchedTeacher, teacher_columns

IMAGENET = [", ".join(c.synonyms) for c in presets.get("imagenet1k").classes]
CIFAR10 = [c.label for c in presets.get("cifar10").classes]


def test_an_imagenet_teacher_gives_a_preset_its_imagenet_ids() -> None:
    classes = presets.get("imagenette").classes
    assert teacher_columns("t", IMAGENET, classes) == presets.imagenet_ids(classes)


def test_an_imagenet_teacher_in_another_order_is_matched_by_name() -> None:
    reversed_labels = IMAGENET[::-1]
    classes = presets.get("imagenette").classes
    expected = [999 - i for i in presets.imagenet_ids(classes)]
    assert teacher_columns("t", reversed_labels, classes) == expected


def test_names_match_whatever_the_case_underscores_and_synonym_lists() -> None:
    labels = ["Tabby_Cat, house cat", "dog", "airplane, aeroplane"]
    classes = presets.from_labels(["aeroplane", "DOG", "house_cat"])
    assert teacher_columns("t", labels, classes) == [2, 1, 0]


def test_every_class_that_cannot_be_labelled_is_named() -> None:
    classes = presets.from_labels(["cat", "zebra", "cat, dog", "truck", "ship"])
    with pytest.raises(UnmatchedTeacher) as caught:
        teacher_columns("my/teacher", [*CIFAR10[:9], "cat"], classes)
    assert [p[0] for p in caught.value.problems] == [0, 1, 2, 3]
    text = str(caught.value)
    assert text.startswith("soft_labels.teacher: 'my/teacher' cannot label every class")
    assert "labels[0] 'cat' names several of the teacher's classes (3, 9)" in text
    assert "labels[1] 'zebra' is none of the teacher's 10 class names" in text
    assert "labels[3] 'truck' is none" in text


def test_two_classes_on_one_column_are_refused() -> None:
    classes = presets.from_labels(["car", "automobile"])
    with pytest.raises(UnmatchedTeacher) as caught:
        teacher_columns("t", ["automobile, car"], classes)
    assert "labels[1] 'automobile' has the column of labels[0] (0)" in str(caught.value)
