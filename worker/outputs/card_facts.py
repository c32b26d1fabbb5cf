"""What the dataset card states of the service and the model: the method's name, the model's
licence as the model states it, and the class names a ``ClassLabel`` carries."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from core.models import KNOWN_LICENSES, License

#: What the card calls the method the service follows.
METHOD = "Generative Dataset Distillation Based on Diffusion Model"
METHOD_NOTE = "Su et al., ECCV 2024 Dataset Distillation Challenge"
SERVICE = "distill-service"


UNKNOWN = License(
    "unknown",
    "unknown",
    note="The model does not state a licence this service knows; the terms of its weights apply.",
)

_HUB_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")


def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML header of a model card, or {} if there is none or it does not parse."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    header = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(header)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def model_license(model: str) -> License:
    """The licence of ``model`` as it states it: a known Hub id, a local directory whose
    README.md says (or that sits in the Hub cache under a known id), else ``UNKNOWN``."""
    known = KNOWN_LICENSES.get(model.strip().lower())
    if known is not None:
        return known
    path = Path(model)
    if not path.is_dir():
        return UNKNOWN
    stated = _front_matter(path / "README.md")
    license_id = stated.get("license")
    if isinstance(license_id, str) and license_id.strip():
        name = stated.get("license_name")
        link = stated.get("license_link")
        return License(
            license_id.strip(),
            str(name) if name else license_id.strip(),
            name=str(name) if name else None,
            link=str(link) if link else None,
        )
    # A snapshot in the Hub cache: .../models--<org>--<name>/snapshots/<commit>.
    for part in path.resolve().parts:
        match = _HUB_CACHE_DIR.match(part)
        if match:
            return KNOWN_LICENSES.get(f"{match[1]}/{match[2]}".lower(), UNKNOWN)
    return UNKNOWN


def class_names(classes: Sequence[dict[str, Any]]) -> list[str]:
    """``ClassLabel`` names in index order: the labels, made unique where a preset repeats
    one (ImageNet's two "crane"s get their WordNet ids: "crane (n02012849)")."""
    repeated = Counter(c["label"] for c in classes)
    names = [
        f"{c['label']} ({c.get('wnid') or c['index']})" if repeated[c["label"]] > 1 else c["label"]
        for c in classes
    ]
    if len(set(names)) != len(names):  # never for the presets; folder names are unique
        names = [str(c["folder"]).removeprefix("train/") for c in classes]
    return names


def title(manifest: dict[str, Any]) -> str:
    """The dataset's name: the preset's, or its first classes."""
    preset = manifest.get("preset")
    if preset:
        return f"Distilled {preset['title']}"
    labels = [c["label"] for c in manifest["classes"]]
    shown = ", ".join(labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
    return f"Distilled dataset: {shown}"
