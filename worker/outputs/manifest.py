"""What an archive says of itself: ``manifest.json`` (request, classes, model, counts, versions).

A fixed-ipc job's manifest holds no times or ids, so the same request on the same model,
device and batch size gives the same archive, byte for byte.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

from core import presets
from core.prompts import DEFAULT_STRATEGY
from core.spec import DatasetSpec
from worker.outputs.archive import class_dir
from worker.outputs.sink import Outputs, RunResult

_VERSIONED = (
    "distill-service",
    "torch",
    "diffusers",
    "transformers",
    "albumentations",
    "opencv-python-headless",
    "numpy",
    "pillow",
    # Parquet shards name the pyarrow that wrote them (created_by).
    "pyarrow",
)
#: The manifest of a shard's part archive (never served; assembly reads it).
PART_FORMAT = "distill-service/part-v1"


@dataclass(frozen=True)
class ModelFacts:
    """What the manifest says of the model that made a dataset (the caller reads them off
    its generator): provenance, decoder, sampling side, seeds, load time."""

    #: Everything about the model and sampler needed to make the dataset again.
    provenance: dict[str, Any]
    decoder: dict[str, Any]
    resolution: int
    class_conditional: bool
    #: How every image's and copy's seed is derived.
    seed_scheme: str
    batch_size: int
    load_seconds: float = 0.0


@cache
def library_versions() -> dict[str, str]:
    """Versions of what made the archive; looked up once per worker process."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat()


def build(
    spec: DatasetSpec,
    *,
    facts: ModelFacts,
    outputs: Outputs,
    tensors: dict[str, Any],
    run: RunResult,
    selection: dict[str, Any] | None = None,
    soft_labels: dict[str, Any] | None = None,
    select: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the archive holds and everything needed to make it again.

    A fixed-ipc job's manifest holds no times or ids, so the same request on the same model,
    device and batch size gives the same archive, byte for byte. A time-budget job records its
    budget and times: they decided how many images it holds.
    """
    preset = presets.get(spec.preset) if spec.preset else None
    manifest: dict[str, Any] = {
        "format": "distill-service/archive-v1",
        # The default prompt strategy, absent soft labels and absent selection are left out,
        # so that a request that names none keeps the bytes its archive had before them.
        "request": spec.model_dump(
            mode="json",
            exclude={"callback_url"}
            | ({"prompt_strategy"} if spec.prompt_strategy == DEFAULT_STRATEGY else set())
            | ({"soft_labels"} if spec.soft_labels is None else set())
            | ({"select"} if spec.select is None else set()),
        ),
        "preset": (
            {"name": preset.name, "title": preset.title, "mean": preset.mean, "std": preset.std}
            if preset
            else None
        ),
        "classes": _classes(spec, outputs, _prompts(spec, facts)),
        # Keyed like torchvision's ImageFolder: by folder name (labels can repeat in ImageNet).
        "class_to_idx": {class_dir(c.index, c.label): c.index for c in spec.classes()},
        "model": {
            "alias": spec.model,
            **facts.provenance,
        },
        "decoder": facts.decoder,
        "sampling": _sampling(spec, facts, run),
        "counts": _counts(spec, outputs, run),
        "formats": _formats(spec, outputs, tensors),
        "versions": dict(library_versions()),
    }
    if selection is not None:
        # Which reference images were taken (real methods) or clustered (prototypes).
        manifest["reference"] = selection
    if spec.budget_seconds is not None:
        manifest["budget"] = _budget(spec.budget_seconds, facts, outputs, run)
    if soft_labels is not None:
        manifest["soft_labels"] = soft_labels
    if select is not None:
        # Each class's pool, scores, what was dropped and kept, and the scorer.
        manifest["select"] = select
    return manifest


def _prompts(spec: DatasetSpec, facts: ModelFacts) -> dict[presets.ClassInfo, list[str]]:
    """Each class's prompts: none for real images, the class's id prompt for a
    class-conditional model, else every prompt its images may get (its override, every
    template's, or every one its prompt strategy picks from), sorted."""
    if spec.real:
        return {c: [] for c in spec.classes()}
    if facts.class_conditional:
        ids = presets.imagenet_ids(spec.classes())
        return {c: [presets.class_prompt(c, i)] for c, i in zip(spec.classes(), ids, strict=True)}
    return {c: sorted(set(spec.prompt_variants(c))) for c in spec.classes()}


def _classes(
    spec: DatasetSpec, outputs: Outputs, prompts: dict[presets.ClassInfo, list[str]]
) -> list[dict[str, Any]]:
    return [
        {
            "index": c.index,
            "label": c.label,
            "wnid": c.wnid,
            "folder": f"train/{class_dir(c.index, c.label)}",
            "prompts": prompts[c],
            "images": outputs.per_class.get(c.index, 0),
        }
        for c in spec.classes()
    ]


def _sampling(spec: DatasetSpec, facts: ModelFacts, run: RunResult) -> dict[str, Any]:
    return {
        "batch_size": facts.batch_size,
        "output_size": spec.size,
        "resolution": spec.resolution or facts.resolution,
        "copy_source_size": run.source_size,
        "resize": "bicubic with antialiasing, on the model's device, from the sampled image",
        "augment_steps": [step.model_dump(mode="json") for step in spec.augment.steps()],
        "seeds": facts.seed_scheme,
    }


def _counts(spec: DatasetSpec, outputs: Outputs, run: RunResult) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "classes": len(spec.classes()),
        "images_per_class": min(outputs.per_class.values(), default=0),
        "images": outputs.count,
        "generated": run.generated,
        "augmented": outputs.count - run.generated,
    }
    if spec.select is not None:
        # generated counts every candidate sampled; only the kept ones are in the archive.
        kept = sum(len(c["kept"]) for c in run.selected)
        counts.update(kept=kept, augmented=outputs.count - kept)
    return counts


def _formats(spec: DatasetSpec, outputs: Outputs, tensors: dict[str, Any]) -> dict[str, Any]:
    return {
        **(
            {
                "imagefolder": "train/<index>_<name>/<index>_<n>.png, RGB uint8 PNG; "
                "train/metadata.jsonl for the Hugging Face imagefolder loader"
            }
            if "imagefolder" in spec.formats
            else {}
        ),
        **outputs.webdataset_entry(),
        **outputs.parquet_entry(),
        **tensors,
    }


def _budget(seconds: float, facts: ModelFacts, outputs: Outputs, run: RunResult) -> dict[str, Any]:
    """A time-budget job's budget and times: they decided how many images it holds."""
    return {
        "seconds": seconds,
        "seconds_used": round(run.seconds_generating, 3),
        "seconds_sampling": round(run.seconds_sampling, 3),
        "model_load_seconds": round(facts.load_seconds, 3),
        "model_load_counted": False,
        "ipc_reached": min(outputs.per_class.values(), default=0),
        "finished_at": _iso(time.time()),
    }
