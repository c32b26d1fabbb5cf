"""Classes to folders: a job's classes ``(label, wnid)`` onto a set's class folders, by wnid,
else by name (case, spaces, punctuation and a leading ``NNN_`` index never matter)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence

_WNID = re.compile(r"^(n\d{8})(?:[_\-\s.](.*))?$", re.IGNORECASE)
_INDEX_PREFIX = re.compile(r"^\d+[_\-\s.](?=.)")


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")


def folder_keys(folder: str) -> tuple[str | None, set[str]]:
    """(wnid, name keys) of a folder: ``n01440764_tench`` -> ("n01440764", {"tench"});
    ``000_airplane`` -> (None, {"000_airplane", "airplane"}); case, spaces and punctuation
    never matter."""
    text = folder.strip()
    found = _WNID.match(text)
    if found:
        rest = found[2] or ""
        return found[1].lower(), {_slug(rest)} - {""}
    names = {_slug(text), _slug(_INDEX_PREFIX.sub("", text))}
    return None, names - {""}


def match(
    classes: Sequence[tuple[str, str | None]],
    folders: Sequence[str] | Mapping[str, int],
) -> list[str]:
    """The folder of each class ``(label, wnid)``, in the classes' order.

    A class's folder is the one whose wnid is the class's wnid, else the one whose name is
    the label (after dropping a leading ``NNN_`` index or wnid). With ``folders`` as a
    ``{folder: image count}`` mapping, a folder without images counts as missing.
    ValueError lists every class that has no folder (or only an empty one), every class two
    folders claim, and every folder two classes claim.
    """
    counts = dict(folders) if isinstance(folders, Mapping) else None
    by_wnid: dict[str, list[str]] = {}
    by_name: dict[str, list[str]] = {}
    for folder in folders:
        wnid, names = folder_keys(folder)
        if wnid:
            by_wnid.setdefault(wnid, []).append(folder)
        for name in names:
            by_name.setdefault(name, []).append(folder)
    chosen: list[str] = []
    missing: list[str] = []
    empty: list[str] = []
    ambiguous: list[str] = []
    for label, wnid in classes:
        candidates = by_wnid.get(wnid.lower(), []) if wnid else []
        if not candidates:
            candidates = by_name.get(_slug(label), [])
        unique = sorted(set(candidates))
        if not unique:
            missing.append(label if not wnid else f"{label} ({wnid})")
        elif len(unique) > 1:
            ambiguous.append(f"{label}: {', '.join(unique)}")
        elif counts is not None and counts.get(unique[0], 0) < 1:
            empty.append(f"{label} ({unique[0]})")
        else:
            chosen.append(unique[0])
            continue
        chosen.append("")
    problems = []
    if missing:
        problems.append(f"no folder for {len(missing)} class(es): {', '.join(missing)}")
    if empty:
        problems.append(f"no images for {len(empty)} class(es): {', '.join(empty)}")
    if ambiguous:
        problems.append(f"several folders match: {'; '.join(ambiguous)}")
    taken: dict[str, list[str]] = {}
    for (label, _), folder in zip(classes, chosen, strict=True):
        if folder:
            taken.setdefault(folder, []).append(label)
    shared = [f"{f}: {', '.join(labels)}" for f, labels in taken.items() if len(labels) > 1]
    if shared:
        problems.append(f"one folder for several classes: {'; '.join(shared)}")
    if problems:
        raise ValueError("; ".join(problems))
    return chosen
