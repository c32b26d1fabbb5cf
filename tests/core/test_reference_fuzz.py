"""Reference-set ingest fuzzed: valid zips and tars, mutated byte by byte at seeded positions.

Whatever the bytes, ``core.references.ingest`` must end within ``DEADLINE`` seconds with a set
or a ``ReferenceSetError`` (a 4xx), never another exception, and leave no file behind. The
mutations are drawn from one ``random.Random`` per archive (no global random state), so a
failure names a seed and an index that reproduce it.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from core import references
from core.references import ReferenceSetError

LIMITS = {"max_bytes": 4 * 1024 * 1024, "max_images": 20, "max_pixels": 100_000}
#: Seconds one ingest may take, whatever it was given (a tiny archive takes milliseconds).
DEADLINE = 5.0
#: Mutations per base archive (there are six): about 15 s in all on two cores.
MUTATIONS = int(os.environ.get("REFERENCE_FUZZ_MUTATIONS", "500"))


def _image(format: str, seed: int, side: int = 12, **options: object) -> bytes:
    pixels = random.Random(seed).randbytes(3 * side * side)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(out, format=format, **options)
    return out.getvalue()


#: A little of every kind of image parser: PNG chunks, JPEG segments, GIF blocks, BMP rows.
MEMBERS = {
    "train/cat/a.png": _image("PNG", 1),
    "train/cat/b.jpg": _image("JPEG", 2, quality=70),
    "train/dog/c.gif": _image("GIF", 3),
    "train/dog/d.bmp": _image("BMP", 4, side=6),
}


def _zip(method: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as archive:
        for name, data in MEMBERS.items():
            archive.writestr(name, data)
    return out.getvalue()


def _tar(mode: str, format: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode, format=format) as archive:
        for name, data in MEMBERS.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _same(data: bytes) -> bytes:
    return data


#: name: (the archive to mutate, what is uploaded of a mutated one). A mutated gzip mostly
#: fails its checksum, so a gzip tar is also mutated inside, then compressed: the tar parser
#: behind the decompressor meets the damage.
BASES: dict[str, tuple[Callable[[], bytes], Callable[[bytes], bytes]]] = {
    "zip-stored": (lambda: _zip(zipfile.ZIP_STORED), _same),
    "zip-deflated": (lambda: _zip(zipfile.ZIP_DEFLATED), _same),
    "tar": (lambda: _tar("w"), _same),
    "tar-pax": (lambda: _tar("w", tarfile.PAX_FORMAT), _same),
    "tar-gz": (lambda: _tar("w:gz"), _same),
    "tar-inside-gz": (lambda: _tar("w", tarfile.PAX_FORMAT), _gzip),
}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one to three edits at random positions: a flipped bit, an overwritten
    byte (random, 0x00, 0xFF) or run, a truncation, an insertion, a deletion, a copied run."""
    out = bytearray(data)
    # A tar ends in kilobytes of zero blocks that a reader never looks at: aim at the part
    # that holds something half of the time.
    content = len(data.rstrip(b"\x00")) or len(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not out:
            break
        at = rng.randrange(min(content, len(out)) if rng.random() < 0.5 else len(out))
        edit = rng.randrange(7)
        if edit == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif edit == 1:
            out[at] = rng.choice((0x00, 0xFF, rng.randrange(256)))
        elif edit == 2:
            run = rng.randint(2, 16)
            out[at : at + run] = rng.choice((b"\xff", b"\x00", b"9")) * run
        elif edit == 3:
            del out[at:]
        elif edit == 4:
            out[at:at] = rng.randbytes(rng.randint(1, 64))
        elif edit == 5:
            del out[at : at + rng.randint(1, 512)]
        else:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 256)]
    return bytes(out)


def _ingest_within(source: Path, seconds: float) -> tuple[BaseException | None, Path | None]:
    """``ingest`` in a daemon thread (a hung one cannot keep the run from ending); fails
    unless it ends within ``seconds``. Returns (what it raised, the zip it wrote)."""
    outcome: list[tuple[BaseException | None, Path | None]] = []

    def target() -> None:
        try:
            written, _ = references.ingest(source, **LIMITS)
            outcome.append((None, written))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread to judge
            outcome.append((exc, None))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"ingest still running after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("base", list(BASES))
def test_mutated_archives_end_in_a_set_or_a_4xx_and_leave_nothing(
    tmp_path: Path, base: str
) -> None:
    build, wrap = BASES[base]
    original = build()
    _, info = references.ingest(_write(tmp_path / "valid", wrap(original)), **LIMITS)
    assert info.images == len(MEMBERS)  # the base itself is a valid set
    rng = random.Random(f"reference-fuzz-{base}")
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    for index in range(MUTATIONS):
        where = f"{base} mutation {index}"
        directory = tmp_path / f"m{index}"
        source = _write(directory, wrap(mutate(original, rng)))
        raised, written = _ingest_within(source, DEADLINE)
        if raised is not None:
            assert isinstance(raised, ReferenceSetError), f"{where}: {raised!r}"
            assert 400 <= raised.status < 500, where
            outcomes[type(raised).__name__] = outcomes.get(type(raised).__name__, 0) + 1
        else:
            assert written is not None
            with zipfile.ZipFile(written) as normalized:
                assert normalized.testzip() is None, where
                assert references.MANIFEST in normalized.namelist(), where
            written.unlink()
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
        assert sorted(p.name for p in directory.iterdir()) == ["upload"], where
    elapsed = time.monotonic() - started
    print(f"{base}: {MUTATIONS} mutations in {elapsed:.1f} s: {outcomes}")
    # Most mutations must be refused for the reason they break, not all for one.
    assert sum(outcomes.values()) == MUTATIONS and len(outcomes) >= 2


def _write(directory: Path, data: bytes) -> Path:
    directory.mkdir()
    path = directory / "upload"
    path.write_bytes(data)
    return path
