"""The dataset card's body, the part a person reads: what the dataset is, how it was made, its
licence, counts, classes and files, and how to load it (``card_loading``). Made from the
manifest alone, so the same request gives the same text."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from core.models import License
from worker.outputs.card_facts import (
    METHOD,
    METHOD_NOTE,
    SERVICE,
    class_names,
    model_license,
    title,
)
from worker.outputs.card_loading import loading

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#])")


def _md(text: object) -> str:
    """Text safe inside a Markdown table cell or line (labels and prompts are the caller's)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def _rows(cells: Iterable[Sequence[object]]) -> list[str]:
    return ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]


def _code(text: object) -> str:
    """``text`` as an inline code span (one longer than any backtick run inside)."""
    value = str(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", value)), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _model_ref(model: str) -> str:
    """A model id as code, linked to its Hub page when it reads as a Hub id (not a path)."""
    if _HUB_ID.match(model) and not Path(model).exists():
        return f"[{_code(model)}](https://huggingface.co/{model})"
    return _code(model)


def _license_line(lic: License) -> str:
    if lic.id == "unknown":
        return "unknown"
    words = lic.title
    if lic.link:
        words = f"[{words}]({lic.link})"
    tag = f"`license: {lic.id}`" + (f", `license_name: {lic.name}`" if lic.name else "")
    return f"{words} ({tag})"


def _summary(manifest: dict[str, Any], ipc: str, model_id: str) -> str:
    """The card's first paragraph: what the images are and how they were made."""
    request = manifest["request"]
    model = manifest["model"]
    counts = manifest["counts"]
    side = manifest.get("sampling", {}).get("output_size", request.get("image_size"))
    method = request.get("method", "generate")
    head = f"{counts['images']} "
    tail = f"images in {counts['classes']} classes ({ipc} per class), {side} px RGB, "
    if method in ("random_real", "herding", "kcenter"):
        how = {
            "random_real": "drawn at random (seeded)",
            "herding": "picked by herding on ConvNet-3 features",
            "kcenter": "picked by greedy k-center on ConvNet-3 features",
        }[method]
        return (
            head + "real " + tail + f"made by {SERVICE}: each class's images were {how} from "
            f"the reference set {_md(str(request.get('reference')))!s}, resized to the output "
            "size, and post-generation augmentation adds copies of them (a real-image baseline)."
        )
    if model.get("conditioning") == "ImageNet-1K class id":
        start = "each class's ImageNet-1K class id conditions the model, which samples an image "
    elif method == "prototypes":
        start = (
            "each class's reference images are encoded by the model's VAE and clustered with "
            "k-means; each cluster centre is re-noised to strength "
            f"{request.get('strength') or 0.7} and denoised with the class prompt, an image "
        )
    else:
        start = "each class name becomes a text prompt, the model samples an image "
    return (
        head + "synthetic " + tail + f"distilled by {SERVICE} with {_model_ref(model_id)} "
        f'following "{METHOD}" ({METHOD_NOTE}): ' + start + "per seed in "
        f"{model.get('num_inference_steps', '?')} step(s) with guidance scale "
        f"{model.get('guidance_scale', '?')}, the image is resized to the output size, and "
        "post-generation augmentation adds copies of it."
    )


def _origin(manifest: dict[str, Any]) -> str:
    method = manifest["request"].get("method", "generate")
    if method in ("random_real", "herding", "kcenter"):
        return (
            "Every image is a real image of the reference set (or an augmented copy of one); "
            "`manifest.json` lists each picked image by its SHA-256. Their terms are the "
            "reference set's."
        )
    if method == "prototypes":
        return (
            "Every image was generated, starting from prototypes of real reference images "
            "(k-means centres of their latents; `manifest.json` records the clusters)."
        )
    conditioned = manifest["model"].get("conditioning") == "ImageNet-1K class id"
    return "No image comes from a real dataset: every one was generated from its class's " + (
        "class id." if conditioned else "prompt."
    )


def body(manifest: dict[str, Any]) -> str:
    """The Markdown a person reads."""
    names = class_names(manifest["classes"])
    model_id = str(manifest["model"].get("model", ""))
    lic = model_license(model_id)
    out: list[str] = [f"# {_md(title(manifest))}", ""]
    out += [_summary(manifest, _ipc(manifest), model_id), "", _origin(manifest)]
    sections = (
        _licence_section(manifest, model_id, lic),
        _made_section(manifest, model_id, lic),
        _counts_section(manifest["counts"]),
        _classes_section(manifest["classes"], names),
        ["## Files", "", *_files(manifest)],
        ["## Loading", "", *loading(manifest, names)],
    )
    for section in sections:
        out += ["", *section]
    out.append("")
    return "\n".join(out)


def _ipc(manifest: dict[str, Any]) -> str:
    """Images per class as the summary says it: one number, or a range when classes differ."""
    per_class = [int(c["images"]) for c in manifest["classes"]]
    if min(per_class, default=0) == max(per_class, default=0):
        return str(manifest["counts"]["images_per_class"])
    return f"{min(per_class)} to {max(per_class)}"


def _licence_section(manifest: dict[str, Any], model_id: str, lic: License) -> list[str]:
    """The model's licence, and the tiny decoder's when one decoded the latents."""
    lines = [
        "## Licence",
        "",
        f"The images were generated by {_model_ref(model_id)}, whose licence is "
        f"{_license_line(lic)}." + (f" {lic.note}" if lic.note else ""),
        "Whatever you do with this dataset is bound by the model's terms.",
    ]
    decoder = manifest.get("decoder") or {}
    decoder_id = decoder.get("id")
    if decoder.get("decoder") == "tiny" and decoder_id:
        lines += [
            "",
            f"Latents were decoded by {_model_ref(str(decoder_id))}, licence "
            f"{_license_line(model_license(str(decoder_id)))}.",
        ]
    return lines


def _made_section(manifest: dict[str, Any], model_id: str, lic: License) -> list[str]:
    """How it was made: a table of the model, sampler, sizes, seed and augmentation."""
    request = manifest["request"]
    model = manifest["model"]
    decoder = manifest.get("decoder") or {}
    decoder_id = decoder.get("id")
    sampling = manifest.get("sampling", {})
    revision = model.get("revision")
    made = [
        ("model", _model_ref(model_id)),
        ("revision", _code(revision) if revision else "not pinned (the default branch at load)"),
        ("licence", _license_line(lic)),
        ("pipeline", f"{_md(model.get('pipeline', '?'))}, {_md(model.get('scheduler', '?'))}"),
        ("steps, guidance", f"{model.get('num_inference_steps')}, {model.get('guidance_scale')}"),
        (
            "decoder",
            f"{_md(decoder.get('decoder', '?'))} ({_md(decoder.get('class', '?'))}"
            + (f", {_code(decoder_id)}" if decoder_id else "")
            + ")",
        ),
        ("sampling resolution", f"{sampling.get('resolution')} px"),
        ("output size", f"{sampling.get('output_size')} px"),
        ("seed", request.get("seed")),
        (
            "augmentation",
            f"policy {_code(_policy(request.get('augment', {})))}, up to "
            f"{request.get('augment', {}).get('copies', 0)} copies per generated image (within "
            "the images per class)",
        ),
    ]
    strategy = request.get("prompt_strategy")
    if strategy:  # absent: the request's prompt_template, the default
        made.append(("prompts", _prompt_strategy(str(strategy))))
    soft = manifest.get("soft_labels")
    if soft:
        made.append(("soft labels", _soft_labels(soft)))
    select = manifest.get("select")
    if select:
        made.append(("selection", _selection(select)))
    if manifest.get("preset"):
        made.append(("preset", _md(manifest["preset"]["name"])))
    budget = manifest.get("budget")
    if budget:
        made.append(("time budget", f"{budget['seconds']} s (reached {budget['ipc_reached']})"))
    return [
        "## How it was made",
        "",
        *_rows([("", "value"), ("---", "---"), *made]),
        "",
        "Per-image seeds are in `train/metadata.jsonl`; `manifest.json` holds the whole request, "
        "the scheduler's configuration and the library versions. POSTing its `request` to the "
        "service on the same model, device and batch size makes this archive again, byte for "
        "byte.",
    ]


#: What each prompt strategy gives a class's images (core.prompts).
PROMPT_STRATEGIES = {
    "synonyms": "a photo of one of the class's WordNet synonyms",
    "definitions": "a photo of the class with its WordNet definition or hypernym",
    "domains": "an image domain (photo, painting, sketch, cartoon, ...) of the class",
    "backgrounds": "a photo of the class in a background (a forest, a beach, indoors, ...)",
}


def _soft_labels(soft: dict[str, Any]) -> str:
    """The card's line on the soft-label teacher: what it is and how it was made."""
    teacher = soft.get("teacher", {})
    if "train_accuracy" in teacher:  # the reference teacher, trained for the job
        how = f"train accuracy {teacher.get('train_accuracy')}"
    else:  # a pretrained classifier: its columns for the job's classes
        how = f"pretrained, {teacher.get('classes')} classes, the job's classes' columns"
    return (
        f"teacher {_code(teacher.get('teacher', '?'))} ({_md(teacher.get('network', ''))}, "
        f"{how}), temperature {soft.get('temperature')}, top {soft.get('top_k')} in the metadata"
    )


def _prompt_strategy(strategy: str) -> str:
    what = PROMPT_STRATEGIES.get(strategy)
    if what is None:
        return f"strategy {_code(strategy)}"
    return (
        f"strategy {_code(strategy)}: each image's prompt is drawn (seeded per image) from "
        f"{what}; the classes table lists them all"
    )


def _selection(select: dict[str, Any]) -> str:
    """The selection row: pool, scorer, rule and what was dropped."""
    scorer = select.get("scorer", {})
    dropped = sum(len(c.get("dropped", [])) for c in select.get("classes", []))
    pool = int(select.get("pool_per_class", 0))
    what = (
        f"CLIP {_md(str(scorer.get('model', '')))}, zero-shot over the class prompts"
        if scorer.get("scorer") == "clip"
        else f"{_md(scorer.get('network', ''))}, train accuracy {scorer.get('train_accuracy')}"
    )
    return (
        f"{select.get('kept_per_class')} of {pool} candidates per class kept by "
        f"{_code(select.get('keep', '?'))}, scored by {_code(scorer.get('scorer', '?'))} "
        f"({what}); "
        f"{dropped} candidates the scorer put in another class dropped; each class's pool, "
        "scores and kept candidates are in the manifest's select section"
    )


def _counts_section(counts: dict[str, Any]) -> list[str]:
    keys: tuple[str, ...] = ("classes", "images_per_class", "images", "generated", "augmented")
    if "kept" in counts:
        keys = (*keys[:4], "kept", keys[4])
    head = tuple(key.replace("_", " ") for key in keys)
    rows = [head, ("---",) * len(keys), tuple(counts[key] for key in keys)]
    return ["## Counts", "", *_rows(rows)]


def _classes_section(classes: Sequence[dict[str, Any]], names: list[str]) -> list[str]:
    """One row per class in index order; the wnid column only when some class has one."""
    has_wnid = any(c.get("wnid") for c in classes)
    head = ("index", "label", *(("wnid",) if has_wnid else ()), "folder", "images", "prompts")
    lines = [
        "## Classes",
        "",
        *_rows(
            [
                head,
                ("---",) * len(head),
                *(
                    (
                        c["index"],
                        _md(name),
                        *((_md(c.get("wnid") or ""),) if has_wnid else ()),
                        _code(c["folder"]),
                        c["images"],
                        "<br>".join(_md(p) for p in c["prompts"]),
                    )
                    for c, name in zip(classes, names, strict=True)
                ),
            ]
        ),
    ]
    if names != [c["label"] for c in classes]:
        lines += [
            "",
            "A label the class list repeats is made unique in the `ClassLabel` names (with its "
            "WordNet id); `label_name` in `metadata.jsonl` keeps the label as it is.",
        ]
    return lines


def _policy(augment: dict[str, Any]) -> str:
    policy = augment.get("policy", "paper")
    if isinstance(policy, list):
        return ", ".join(str(step.get("name")) for step in policy)
    return str(policy)


def _files(manifest: dict[str, Any]) -> list[str]:
    formats = manifest.get("formats", {})
    lines = []
    if "imagefolder" in formats:
        lines += [
            "- `train/<index>_<name>/<index>_<n>.png`: RGB PNGs, one folder per class; the "
            "3-digit index prefix sorts the folders in class-index order.",
            "- `train/metadata.jsonl`: one line per image: `file_name`, `label` (class index), "
            "`label_name`, `prompt`, `seed`, `kind` (`generated`, `real` or `augmented`), "
            "`source` (the image an augmented copy was made from; for a real image, "
            "`reference:sha256:<digest>`)"
            + (", `copy` (its number)" if manifest["counts"].get("augmented", 0) > 0 else "")
            + ".",
        ]
    if "webdataset" in formats:
        lines.append(
            "- `webdataset/train-NNNNNN.tar`: WebDataset shards of `<key>.png`, `<key>.cls` "
            "(class index) and `<key>.json` (the image's metadata line)."
        )
    if "parquet" in formats:
        lines.append(
            "- `data/train-NNNNN-of-NNNNN.parquet`: Parquet shards in the Hub's layout, one row "
            "per image: `image` (PNG bytes and file name), `label` (a `ClassLabel`), then the "
            "metadata columns; the schema holds the `datasets` features."
        )
    soft = manifest.get("soft_labels")
    if soft:
        lines.append(
            f"- `{soft['file']}`: the teacher's float16 logits, one row per image (class-major, "
            "each class in image order), columns in class-index order, with `labels`, `files`, "
            "`classes` and `temperature`; every metadata line also lists its `soft_top_k` "
            f"classes and their `soft_top_p` probabilities at temperature {soft['temperature']}. "
            "Train on them with a KL loss at that temperature; the challenge's evaluation "
            "trains on hard labels."
        )
    for name, entry in formats.items():
        if name.endswith(".pt") and isinstance(entry, dict):
            what = "; ".join(
                f"`{key}`: {_md(value)}" for key, value in entry.items() if isinstance(value, str)
            )
            lines.append(f"- `{name}`: {what}.")
    lines += [
        "- `manifest.json`: the request, classes, model, sampling, counts and library versions.",
        "- `preview.png`: a contact sheet of the first classes.",
    ]
    return lines
