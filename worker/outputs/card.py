"""The archive's dataset card: ``README.md`` at its root, for a person and for Hugging Face.

A YAML header that the ``datasets`` library and the Hub read, then a body a person reads: what
the dataset is, its classes and prompts, the model and its licence, the seed, the counts and
how to load it.

The header's ``configs`` entry points the ``imagefolder`` builder at ``train/**`` and carries
the features, so ``load_dataset(<extracted folder>)`` gives ``label`` as a ``ClassLabel`` whose
names are the classes in index order. (The builder applies a config's ``features``; a bare
``dataset_info.features`` is replaced by what it infers from ``metadata.jsonl``, where ``label``
is a plain integer.) ``load_dataset("imagefolder", ...)`` never reads a card: the body says how
to pass the card's features to it. With Parquet shards (``data/``, the Hub's own layout, whose
schema carries the features) the config points at them instead: ``datasets`` takes one builder
for all of a card's configs, and the Parquet one reads no PNG. The features are the same, so the
card's features still serve the ``imagefolder`` builder on the PNG tree.

The card is made from the manifest alone (plus, for a local model directory, the licence its
own README states), so it is as deterministic as the manifest: the same request gives the same
card, byte for byte.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from core.soft_labels import TOP_K_COLUMN, TOP_P_COLUMN
from worker.outputs.card_body import body
from worker.outputs.card_facts import SERVICE, class_names, model_license, title

#: ``train/metadata.jsonl`` columns besides ``file_name`` and ``label`` (worker/engine.py
#: ``Outputs.add`` and worker/postprocess.py ``finish_item``) and their ``datasets`` types.
#: ``copy`` is only on augmented copies' lines.
METADATA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("label_name", "string"),
    ("prompt", "string"),
    ("seed", "int64"),
    ("kind", "string"),
    ("source", "string"),
)
COPY_COLUMN = ("copy", "int64")
#: Each image's own guidance scale (a copy has its source's), on every line of a job whose
#: ``guidance_scale`` is a ``[low, high]`` range.
GUIDANCE_COLUMN = ("guidance_scale", "float64")
#: A dtype ``list:<value type>`` is a ``datasets`` ``List`` of that type.
LIST_PREFIX = "list:"
#: The soft-label columns (``core.soft_labels``), on every line of a job with ``soft_labels``.
SOFT_COLUMNS: tuple[tuple[str, str], ...] = (
    (TOP_K_COLUMN, f"{LIST_PREFIX}int64"),
    (TOP_P_COLUMN, f"{LIST_PREFIX}float64"),
)


def _columns(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    columns = list(METADATA_COLUMNS)
    if manifest["counts"].get("augmented", 0) > 0:
        columns.append(COPY_COLUMN)
    if isinstance(manifest.get("model", {}).get("guidance_scale"), list):
        columns.append(GUIDANCE_COLUMN)
    if manifest.get("soft_labels"):
        columns += SOFT_COLUMNS
    return columns


def _yaml_feature(name: str, dtype: str) -> dict[str, Any]:
    """One column in ``Features._to_yaml_list``'s form (a list: ``{"name", "list": dtype}``)."""
    if dtype.startswith(LIST_PREFIX):
        return {"name": name, "list": dtype.removeprefix(LIST_PREFIX)}
    return {"name": name, "dtype": dtype}


def features(
    manifest: dict[str, Any], columns: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The imagefolder dataset's features in the card's YAML form (``Features._to_yaml_list``);
    with ``columns`` (the Parquet shards' column names), those columns'."""
    names = class_names(manifest["classes"])
    dtypes = dict((*METADATA_COLUMNS, COPY_COLUMN, GUIDANCE_COLUMN, *SOFT_COLUMNS))
    metadata = _columns(manifest) if columns is None else [(c, dtypes[c]) for c in columns[2:]]
    return [
        {"name": "image", "dtype": "image"},
        {
            "name": "label",
            "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}},
        },
        *(_yaml_feature(name, dtype) for name, dtype in metadata),
    ]


def _config(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The header's one config: the Parquet shards, else the PNG tree, else the tars."""
    formats = manifest.get("formats", {})
    if "parquet" in formats:
        files = [{"split": "train", "path": "data/train-*.parquet"}]
        return {"data_files": files, "features": features(manifest, formats["parquet"]["columns"])}
    if "imagefolder" in formats:
        files = [{"split": "train", "path": "train/**"}]
        return {"data_files": files, "features": features(manifest)}
    if "webdataset" in formats:
        return {"data_files": [{"split": "train", "path": "webdataset/train-*.tar"}]}
    return None


def _size_category(count: int) -> str:
    bounds = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"))
    for bound, name in bounds:
        if count < bound:
            return name
    return "100K<n<1M" if count < 1_000_000 else "1M<n<10M"


def header(manifest: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML header as a dict."""
    model = model_license(str(manifest["model"].get("model", "")))
    data: dict[str, Any] = {"pretty_name": title(manifest), "license": model.id}
    if model.name:
        data["license_name"] = model.name
    if model.link:
        data["license_link"] = model.link
    data |= {
        "task_categories": ["image-classification"],
        "tags": ["synthetic", "dataset-distillation", SERVICE],
        "size_categories": [_size_category(int(manifest["counts"]["images"]))],
    }
    config = _config(manifest)
    if config is None:
        data["viewer"] = False
        return data
    data["configs"] = [{"config_name": "default", **config}]
    if "features" in config:
        data["dataset_info"] = {
            "config_name": "default",
            "features": copy.deepcopy(config["features"]),  # a copy: no YAML anchors in the card
            # num_bytes is the loaded table's size, unknown until loaded; datasets checks only
            # num_examples (and replaces both with what it counted).
            "splits": [
                {"name": "train", "num_bytes": 0, "num_examples": manifest["counts"]["images"]}
            ],
        }
    return data


def render(manifest: dict[str, Any]) -> bytes:
    """``README.md``: the YAML header and the body, UTF-8."""
    yaml_text = yaml.safe_dump(
        header(manifest),
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=1 << 20,  # one line per value: no folded labels
    )
    return f"---\n{yaml_text}---\n\n{body(manifest)}".encode()
