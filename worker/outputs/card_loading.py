"""The dataset card's "Loading" section: one recipe per format the archive holds.

Made from the manifest alone, like the rest of the card (worker/outputs/card.py), so the same
request gives the same recipes, byte for byte.
"""

from __future__ import annotations

from typing import Any


def loading(manifest: dict[str, Any], names: list[str]) -> list[str]:
    """The section's lines: how to load each format of the archive; ``names`` are the
    ``ClassLabel`` names in index order."""
    formats = manifest.get("formats", {})
    lines: list[str] = []
    if "imagefolder" in formats:
        lines += _imagefolder(manifest, names)
    if "webdataset" in formats:
        lines += _webdataset()
    if "parquet" in formats:
        lines += _parquet(names)
    tensor_files = [name for name in formats if name.endswith(".pt")]
    if tensor_files:
        lines += _tensors(tensor_files)
    return _squeeze(lines)


def _imagefolder(manifest: dict[str, Any], names: list[str]) -> list[str]:
    """torchvision's ImageFolder, then ``datasets`` through this card and without it."""
    first = next(iter(manifest.get("class_to_idx", {})), "000_...")
    has_parquet = "parquet" in manifest.get("formats", {})
    return [
        "Unzip the archive (to `dataset/` here). With torchvision:",
        "",
        "```python",
        "from torchvision.datasets import ImageFolder",
        "",
        'train = ImageFolder("dataset/train")  # metadata.jsonl beside the folders is skipped',
        f"# train.classes[0] == {first!r}: folder names; the class index is the label",
        "```",
        "",
        "With Hugging Face `datasets`, from the folder: this card makes `label` a "
        f"`ClassLabel` whose names are the {len(names)} classes in index order.",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("dataset", split="train")'
        + ("  # reads data/*.parquet: the same rows" if has_parquet else ""),
        f"# ds.features['label'].names[0] == {names[0]!r}",
        "```",
        "",
        '`load_dataset("imagefolder", ...)` does not read this card: `label` comes as a '
        "plain integer unless you pass the card's features, the same way for the folder "
        "and for the zip itself:",
        "",
        "```python",
        "import zipfile",
        "",
        "from datasets import load_dataset",
        "from datasets.info import DatasetInfosDict",
        "from huggingface_hub import DatasetCard",
        "",
        'with zipfile.ZipFile("dataset.zip") as zf:',
        '    card = DatasetCard(zf.read("README.md").decode("utf-8"))',
        'features = DatasetInfosDict.from_dataset_card_data(card.data)["default"].features',
        'ds = load_dataset("imagefolder", data_files="dataset.zip", split="train", '
        "features=features)",
        '# or: load_dataset("imagefolder", data_dir="dataset/train", split="train", '
        "features=features)",
        "```",
    ]


def _webdataset() -> list[str]:
    return [
        "",
        "WebDataset shards (`webdataset/`, after unzipping):",
        "",
        "```python",
        "import glob",
        "",
        "import webdataset as wds",
        "",
        'urls = sorted(glob.glob("dataset/webdataset/train-*.tar"))',
        'ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")',
        "```",
    ]


def _parquet(names: list[str]) -> list[str]:
    return [
        "",
        "Parquet shards (`data/`): their schema names the classes, so `label` is a "
        f"`ClassLabel` of the {len(names)} classes whether or not this card is read:",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("parquet", data_files="dataset/data/train-*.parquet", split="train")',
        '# the zip itself: data_files="zip://data/train-*.parquet::dataset.zip"',
        '# the folder, through this card: load_dataset("dataset", split="train")',
        f"# ds.features['label'].names[0] == {names[0]!r}",
        "```",
    ]


def _tensors(tensor_files: list[str]) -> list[str]:
    """One ``torch.load`` line per tensor file, in the manifest's order."""
    lines = [
        "",
        "Tensor files load with `torch.load`:",
        "",
        "```python",
        "import torch",
        "",
    ]
    for name in tensor_files:
        if name == "tensors.pt":
            lines.append(
                'data = torch.load("dataset/tensors.pt", weights_only=True)  '
                '# data["images"] uint8 N x 3 x H x W, data["labels"], data["classes"]'
            )
        elif name == "normalized.pt":
            lines.append(
                'normalized = torch.load("dataset/normalized.pt", weights_only=True)  '
                "# float32 images, labels, mean, std"
            )
        else:
            lines.append(
                f'images = torch.load("dataset/{name}", weights_only=True)  '
                "# one float32 tensor, labels implied by order"
            )
    lines.append("```")
    return lines


def _squeeze(lines: list[str]) -> list[str]:
    """Drop a leading blank line and any blank line doubled by a skipped optional line."""
    out: list[str] = []
    for line in lines:
        if line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    return out
