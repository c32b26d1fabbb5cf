"""Reference sets: ingesting uploads (and refusing hostile ones), records, named sets, matching."""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from redis import Redis

from core import keys, references
from core.references import ReferenceSetError, ReferenceTooLarge, UnsupportedArchive
from core.storage import LocalStorage
from service.redis_server import EmbeddedRedis

LIMITS = {"max_bytes": 10 * 1024 * 1024, "max_images": 100, "max_pixels": 1_000_000}


def png(color: tuple[int, int, int] = (200, 10, 10), size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def jpeg(color: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="JPEG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a signature, an IHDR chunk claiming ``width`` x ``height`` and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_zip(path: Path, members: dict[str, bytes], *, deflate: bool = False) -> Path:
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


def write_tar(path: Path, members: dict[str, bytes], *, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


SET = {
    "train/cat/a.png": png((1, 2, 3)),
    "train/cat/b.jpg": jpeg(),
    "train/cat/copy-of-a.png": png((1, 2, 3)),
    "train/dog/c.png": png((9, 9, 9)),
    "train/dog/.DS_Store": b"\x00\x00junk",
    "__MACOSX/train/dog/._c.png": b"resource fork",
}


def scratch(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_zip_is_normalized_to_digest_names_with_a_manifest(tmp_path: Path) -> None:
    source = write_zip(tmp_path / "set.zip", SET)
    out, info = references.ingest(source, **LIMITS, name="pets", owner="o1")
    assert [(c.name, c.images) for c in info.classes] == [("cat", 2), ("dog", 1)]
    assert info.images == 3 and info.name == "pets" and info.owner == "o1"
    assert info.bytes == len(SET["train/cat/a.png"]) + len(jpeg()) + len(SET["train/dog/c.png"])
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read(references.MANIFEST))
    # Every image under its class, named by its digest and its real type.
    import hashlib

    a = hashlib.sha256(SET["train/cat/a.png"]).hexdigest()
    b = hashlib.sha256(jpeg()).hexdigest()
    assert f"cat/{a}.png" in names and f"cat/{b}.jpg" in names
    assert len([n for n in names if n != references.MANIFEST]) == 3
    sources = {i["source"] for c in manifest["classes"] for i in c["images"]}
    assert "train/dog/c.png" in sources and not any("DS_Store" in s for s in sources)
    assert len(info.digest) == 64


def test_every_container_gives_the_same_set(tmp_path: Path) -> None:
    clean = {k: v for k, v in SET.items() if not k.startswith("__MACOSX")}
    digests = set()
    for name, mode in [("a.tar", "w"), ("a.tgz", "w:gz"), ("a.tbz", "w:bz2"), ("a.txz", "w:xz")]:
        _, info = references.ingest(write_tar(tmp_path / name, clean, mode=mode), **LIMITS)
        digests.add(info.digest)
    _, info = references.ingest(write_zip(tmp_path / "b.zip", SET, deflate=True), **LIMITS)
    digests.add(info.digest)
    # Without the top-level folder: the same classes, the same digest.
    flat = {k.removeprefix("train/"): v for k, v in clean.items()}
    _, info = references.ingest(write_zip(tmp_path / "c.zip", flat), **LIMITS)
    digests.add(info.digest)
    assert len(digests) == 1


@pytest.mark.parametrize(
    ("members", "member", "status"),
    [
        ({"cat/a.png": png(), "../x.png": png()}, "../x.png", 422),
        ({"cat/a.png": png(), "cat/../../x.png": png()}, "cat/../../x.png", 422),
        ({"cat/a.png": png(), "/etc/x.png": png()}, "/etc/x.png", 422),
        ({"cat/a.png": png(), "C:/x.png": png()}, "C:/x.png", 422),
        ({"cat/a.png": png(), "cat\\b.png": png()}, "cat\\b.png", 422),
        ({"cat/a.png": png(), "cat/inner.zip": b"PK\x03\x04rest"}, "cat/inner.zip", 422),
        ({"cat/a.png": png(), "cat/b.png": b"PK\x03\x04 a zip, named .png"}, "cat/b.png", 422),
        ({"cat/a.png": png(), "cat/b.png": b"\x1f\x8b\x08 gzip bytes"}, "cat/b.png", 422),
        ({"cat/a.png": png(), "cat/notes.png": b"just some text\n"}, "cat/notes.png", 422),
        ({"cat/a.png": png(), "cat/huge.png": png_header(50_000, 50_000)}, "cat/huge.png", 413),
        ({"cat/a.png": png(), "cat/big.png": png(size=(1001, 1000))}, "cat/big.png", 413),
        ({"cat/a.png": png(), "loose.png": png()}, "loose.png", 422),
        ({"cat/a.png": png(), "cat/cut.png": png()[:-20]}, "cat/cut.png", 422),
        ({"cat/a.png": png(), "cat/bad.png": png()[:40] + b"x" + png()[41:]}, "cat/bad.png", 422),
    ],
)
def test_hostile_zip_members_are_refused_by_name(
    tmp_path: Path, members: dict[str, bytes], member: str, status: int
) -> None:
    source = write_zip(tmp_path / "bad.zip", members)
    before = scratch(tmp_path)
    with pytest.raises(ReferenceSetError) as caught:
        references.ingest(source, **LIMITS)
    assert caught.value.member == member, caught.value
    assert repr(member) in str(caught.value)
    assert caught.value.status == status
    assert scratch(tmp_path) == before  # no partial output left


def _tar_with(tmp_path: Path, special: tarfile.TarInfo) -> Path:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as archive:
        good = tarfile.TarInfo("cat/a.png")
        data = png()
        good.size = len(data)
        archive.addfile(good, io.BytesIO(data))
        archive.addfile(special)
    return path


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]
)
def test_links_and_devices_in_a_tar_are_refused(tmp_path: Path, kind: bytes) -> None:
    special = tarfile.TarInfo("cat/b.png")
    special.type = kind
    special.linkname = "/etc/passwd"
    with pytest.raises(ReferenceSetError) as caught:
        references.ingest(_tar_with(tmp_path, special), **LIMITS)
    assert caught.value.member == "cat/b.png" and caught.value.status == 422


def test_symlink_in_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cat/a.png", png())
        info = zipfile.ZipInfo("cat/b.png")
        info.create_system = 3
        info.external_attr = (0o120777) << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(ReferenceSetError) as caught:
        references.ingest(path, **LIMITS)
    assert caught.value.member == "cat/b.png"


def test_a_zip_bomb_is_refused_from_its_headers(tmp_path: Path) -> None:
    zeros = b"\x00" * (50 * 1024 * 1024)
    source = write_zip(
        tmp_path / "bomb.zip", {"cat/a.png": png(), "cat/z.png": zeros}, deflate=True
    )
    assert source.stat().st_size < 1024 * 1024  # small upload, huge content
    with pytest.raises(ReferenceTooLarge) as caught:
        references.ingest(source, **{**LIMITS, "max_bytes": 1024 * 1024})
    assert caught.value.member == "cat/z.png" and caught.value.status == 413
    assert scratch(tmp_path) == ["bomb.zip"]


def test_a_gzip_tar_bomb_stops_while_reading(tmp_path: Path) -> None:
    # A tar whose headers are small but whose data expands: limited as it is decompressed.
    source = write_tar(
        tmp_path / "bomb.tgz", {"cat/a.png": png(), "cat/z.png": b"\x00" * (20 << 20)}, mode="w:gz"
    )
    with pytest.raises(ReferenceTooLarge):
        references.ingest(source, **{**LIMITS, "max_bytes": 1024 * 1024})


def test_too_many_images_classes_or_none(tmp_path: Path) -> None:
    four = {f"cat/{i}.png": png((i, i, i)) for i in range(4)}
    with pytest.raises(ReferenceTooLarge) as caught:
        references.ingest(write_zip(tmp_path / "a.zip", four), **{**LIMITS, "max_images": 3})
    assert caught.value.member == "cat/3.png" and caught.value.status == 413
    classes = {f"c{i}/x.png": png((i, 0, 0)) for i in range(3)}
    with pytest.raises(ReferenceSetError, match="3 class folders"):
        references.ingest(write_zip(tmp_path / "b.zip", classes), **LIMITS, max_classes=2)
    with pytest.raises(ReferenceSetError, match="no images"):
        references.ingest(write_zip(tmp_path / "c.zip", {"cat/.DS_Store": b"x"}), **LIMITS)
    with pytest.raises(UnsupportedArchive) as unsupported:
        (tmp_path / "d.bin").write_bytes(b"hello, not an archive" * 40)
        references.ingest(tmp_path / "d.bin", **LIMITS)
    assert unsupported.value.status == 415


# --- records ---------------------------------------------------------------------------------


@pytest.fixture
def redis(redis_server: EmbeddedRedis) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_store_read_list_delete_per_owner(tmp_path: Path, redis: Redis) -> None:
    storage = LocalStorage(tmp_path / "store")
    owner, other = f"o-{tmp_path.name}", f"p-{tmp_path.name}"
    out, info = references.ingest(write_zip(tmp_path / "s.zip", SET), **LIMITS, owner=owner)
    stored = references.store(redis, storage, out, info, ttl=3600)
    assert not out.exists()  # moved into the store
    key = keys.reference_archive(info.id)
    assert storage.size(key) is not None
    assert 3590 < redis.ttl(keys.reference(info.id)) <= 3600
    assert references.read(redis, info.id, owner=owner) == stored
    assert references.read(redis, info.id, owner=other) is None
    assert [i.id for i in references.list_for(redis, owner)] == [info.id]
    assert references.list_for(redis, other) == []
    assert references.delete(redis, storage, info.id, owner=other) is False
    assert references.delete(redis, storage, info.id, owner=owner) is True
    assert storage.size(key) is None and references.read(redis, info.id) is None
    assert references.list_for(redis, owner) == []


def test_sweep_removes_sets_whose_record_expired(tmp_path: Path, redis: Redis) -> None:
    storage = LocalStorage(tmp_path / "store")
    out, info = references.ingest(write_zip(tmp_path / "s.zip", SET), **LIMITS)
    references.store(redis, storage, out, info, ttl=3600)
    assert references.sweep(redis, storage) == []
    redis.delete(keys.reference(info.id))
    assert references.sweep(redis, storage) == [keys.reference_archive(info.id)]


# --- named sets --------------------------------------------------------------------------------


def test_named_sets_are_found_like_test_sets(tmp_path: Path) -> None:
    root = tmp_path / "refs"
    (root / "pets" / "train" / "cat").mkdir(parents=True)
    (root / "pets" / "train" / "cat" / "1.png").write_bytes(png())
    (root / "pets" / "train" / "dog").mkdir()
    (root / "pets" / "train" / "dog" / "2.png").write_bytes(png((0, 0, 0)))
    write_zip(root / "zipped.zip", {"n01440764_tench/a.png": png(), "n01443537/b.png": png()})
    assert references.named_sets(root) == ["pets", "zipped"]
    assert references.named_path(root, "../refs") is None
    assert references.named_path(None, "pets") is None
    pets = references.named_path(root, "pets")
    assert pets is not None
    assert references.members(pets) == {"cat": ["train/cat/1.png"], "dog": ["train/dog/2.png"]}
    zipped = references.named_path(root, "zipped")
    assert zipped is not None
    assert list(references.members(zipped)) == ["n01440764_tench", "n01443537"]


def test_folder_counts_of_a_stored_or_named_set(tmp_path: Path, redis: Redis) -> None:
    root = tmp_path / "refs"
    root.mkdir()
    write_zip(root / "fish.zip", {"tench/a.png": png(), "tench/b.png": png((0, 0, 0))})
    storage = LocalStorage(tmp_path / "store")
    owner = f"o-{tmp_path.name}"
    out, info = references.ingest(write_zip(tmp_path / "s.zip", SET), **LIMITS, owner=owner)
    references.store(redis, storage, out, info, ttl=60)
    counts = references.folder_counts(redis, root, owner=owner, reference_id=info.id)
    assert counts == {"cat": 2, "dog": 1}
    assert references.folder_counts(redis, root, owner="else", reference_id=info.id) is None
    assert references.folder_counts(redis, root, owner=owner, name="fish") == {"tench": 2}
    assert references.folder_counts(redis, root, owner=owner, name="nope") is None


# --- matching ----------------------------------------------------------------------------------


def test_match_by_name_index_prefix_and_wnid_in_class_order() -> None:
    folders = ["000_airplane", "Automobile", "n01440764", "n01443537_goldfish", "bird"]
    classes = [
        ("goldfish", "n01443537"),
        ("tench", "n01440764"),
        ("automobile", None),
        ("airplane", None),
    ]
    assert references.match(classes, folders) == [
        "n01443537_goldfish",
        "n01440764",
        "automobile".capitalize(),
        "000_airplane",
    ]
    # A wnid class without a wnid folder falls back to its name.
    assert references.match([("bird", "n01530575")], folders) == ["bird"]


def test_match_lists_every_missing_or_empty_class() -> None:
    with pytest.raises(ValueError) as caught:
        references.match(
            [("cat", None), ("dog", None), ("ship", None), ("tench", "n01440764")],
            {"cat": 3, "dog": 0, "n01440764": 2},
        )
    text = str(caught.value)
    assert "ship" in text and "dog (dog)" in text and "cat" not in text.split("ship")[0][:-10]
    with pytest.raises(ValueError, match="several folders"):
        references.match([("cat", None)], ["cat", "001_cat"])
    with pytest.raises(ValueError, match="one folder for several classes"):
        references.match([("crane", None), ("Crane", None)], ["crane"])


def test_a_tar_of_countless_members_stops_early(tmp_path: Path) -> None:
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as archive:
        for i in range(1100):
            folder = tarfile.TarInfo(f"cat/d{i}")
            folder.type = tarfile.DIRTYPE
            archive.addfile(folder)
    with pytest.raises(ReferenceTooLarge, match="more than 1008 members"):
        references.ingest(path, **{**LIMITS, "max_images": 3}, max_classes=1)


def test_a_tar_ending_in_a_zip_is_a_tar_with_a_nested_archive(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("cat/x.png", png())
    source = write_tar(tmp_path / "t.tar", {"cat/a.png": png(), "cat/z.png": inner.getvalue()})
    assert zipfile.is_zipfile(source)  # what a naive check would take it for
    with pytest.raises(ReferenceSetError, match="nested archives") as caught:
        references.ingest(source, **LIMITS)
    assert caught.value.member == "cat/z.png"


# --- damaged archives --------------------------------------------------------------------------


def _set_flag(data: bytes, bit: int) -> bytes:
    """``data`` (a zip) with general-purpose flag ``bit`` set in every local and central header."""
    out = bytearray(data)
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := out.find(signature, start)) >= 0:
            flags = struct.unpack_from("<H", out, start + at)[0]
            struct.pack_into("<H", out, start + at, flags | bit)
            start += 4
    return bytes(out)


def _member_data_offset(data: bytes, name: bytes) -> int:
    """Where the (compressed) data of the zip member called ``name`` starts."""
    header = data.rfind(b"PK\x03\x04", 0, data.find(name))
    name_len, extra_len = struct.unpack_from("<HH", data, header + 26)
    return header + 30 + name_len + extra_len


def _zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return out.getvalue()


def noise_png(side: int = 48, seed: int = 1) -> bytes:
    out = io.BytesIO()
    pixels = random.Random(seed).randbytes(3 * side * side)
    Image.frombytes("RGB", (side, side), pixels).save(out, format="PNG")
    return out.getvalue()


def _bad_central_signature() -> bytes:
    data = _zip_bytes({"cat/a.png": png(), "cat/b.png": png((5, 5, 5))})
    at = data.find(b"PK\x01\x02")
    return data[:at] + b"PK\x01\x09" + data[at + 4 :]


def _end_record_past_the_file(field: int) -> bytes:
    data = bytearray(_zip_bytes({"cat/a.png": png(), "cat/b.png": png((5, 5, 5))}))
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, end + field, len(data) * 1000)
    return bytes(data)


def _invalid_utf8_name() -> bytes:
    data = _zip_bytes({"cat/a.png": png(), "cat/XX.png": png((5, 5, 5))})
    return _set_flag(data.replace(b"cat/XX.png", b"cat/\xff\xfe.png"), 0x800)


def _corrupt_data(method: int, skip: int) -> bytes:
    data = bytearray(_zip_bytes({"cat/a.png": png(), "cat/b.png": noise_png()}, method))
    at = _member_data_offset(bytes(data), b"cat/b.png") + skip
    data[at : at + 16] = b"\xff" * 16
    return bytes(data)


def _garbage_sparse_map() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("cat/a.png")
        data = png()
        info.size = len(data)
        info.pax_headers = {
            "GNU.sparse.map": "garbage,x",
            "GNU.sparse.major": "0",
            "GNU.sparse.minor": "1",
            "GNU.sparse.size": "10",
        }
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


DAMAGED = {
    "central directory signature": (_bad_central_signature, None),
    "end record size past the file": (lambda: _end_record_past_the_file(12), None),
    "end record offset past the file": (lambda: _end_record_past_the_file(16), "cat/a.png"),
    "invalid UTF-8 name": (_invalid_utf8_name, None),
    "corrupt deflate data": (lambda: _corrupt_data(zipfile.ZIP_DEFLATED, 0), "cat/b.png"),
    "corrupt LZMA data": (lambda: _corrupt_data(zipfile.ZIP_LZMA, 9), "cat/b.png"),
    "corrupt bzip2 data": (lambda: _corrupt_data(zipfile.ZIP_BZIP2, 4), "cat/b.png"),
    "garbage GNU.sparse.map": (_garbage_sparse_map, None),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_archive_is_refused_naming_the_member_or_the_archive(
    tmp_path: Path, case: str
) -> None:
    build, member = DAMAGED[case]
    source = tmp_path / "upload.bin"
    source.write_bytes(build())
    with pytest.raises(ReferenceSetError) as caught:
        references.ingest(source, **LIMITS)
    assert 400 <= caught.value.status < 500
    assert caught.value.member == member, caught.value
    if member is None:
        assert "the archive" in str(caught.value)
    assert scratch(tmp_path) == ["upload.bin"]


def _ingest_within(source: Path, seconds: float, **limits: int) -> BaseException | None:
    """Run ``ingest`` in a daemon thread (a hung one cannot block the test run); fail unless it
    ends within ``seconds``. Returns what it raised, None for a success."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            references.ingest(source, **{**LIMITS, **limits})
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread to judge
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"ingest of {source.name} still running after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("mode", ["w", "w:gz"])
@pytest.mark.parametrize("member", ["cat/b.png", "cat/.hidden", "cat/sub/"])
def test_a_tar_header_declaring_a_huge_size_is_refused_at_once(
    tmp_path: Path, mode: str, member: str
) -> None:
    source = tmp_path / "huge.tar"
    with tarfile.open(source, mode, format=tarfile.PAX_FORMAT) as archive:
        first = tarfile.TarInfo("cat/a.png")
        data = png()
        first.size = len(data)
        archive.addfile(first, io.BytesIO(data))
        liar = tarfile.TarInfo(member.rstrip("/"))
        if member.endswith("/"):
            liar.type = tarfile.DIRTYPE
        liar.pax_headers = {"size": str(10**15)}
        archive.addfile(liar, io.BytesIO(b""))
    raised = _ingest_within(source, 5.0)
    assert isinstance(raised, ReferenceTooLarge), raised
    assert raised.member == member.rstrip("/") and str(10**15) in str(raised)
    assert scratch(tmp_path) == ["huge.tar"]


# --- names, folders, duplicates ----------------------------------------------------------------


def test_a_nul_inside_a_zip_name_is_refused(tmp_path: Path) -> None:
    evil = "cat/x.png\x00../../evil"
    data = _zip_bytes({"cat/a.png": png(), evil.replace("\x00", "#"): png((4, 4, 4))})
    source = tmp_path / "nul.zip"
    source.write_bytes(data.replace(b"cat/x.png#", b"cat/x.png\x00"))
    with zipfile.ZipFile(source) as archive:
        assert "cat/x.png" in archive.namelist()  # what Python alone would store
    with pytest.raises(ReferenceSetError, match="NUL") as caught:
        references.ingest(source, **LIMITS)
    assert caught.value.member == evil
    assert scratch(tmp_path) == ["nul.zip"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Cat", "cat"),
        ("DOG", "dog"),
        ("cr\u00e8me", "cre\u0300me"),  # NFC and NFD
        ("n01440764", "N01440764"),
        ("n01440764_tench", "n01440764"),  # one wnid, two folders
    ],
)
def test_folders_a_job_could_not_tell_apart_are_refused(
    tmp_path: Path, first: str, second: str
) -> None:
    source = write_zip(tmp_path / "f.zip", {f"{first}/a.png": png(), f"{second}/b.png": png()})
    with pytest.raises(ReferenceSetError, match="could not tell them apart") as caught:
        references.ingest(source, **LIMITS)
    assert repr(first) in str(caught.value) and repr(second) in str(caught.value)
    assert scratch(tmp_path) == ["f.zip"]


def test_folders_with_one_name_and_two_wnids_are_kept(tmp_path: Path) -> None:
    # ImageNet has two cranes: a job tells them apart by wnid.
    members = {"n02012849_crane/a.png": png(), "n03126707_crane/b.png": png((1, 1, 1))}
    _, info = references.ingest(write_zip(tmp_path / "f.zip", members), **LIMITS)
    assert [c.name for c in info.classes] == ["n02012849_crane", "n03126707_crane"]


def _duplicate_zip(path: Path, first: bytes, second: bytes, name: str = "cat/a.png") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("cat/b.png", png((7, 7, 7)))
            archive.writestr("cat/a.png", first)
            archive.writestr(name, second)
    return path


def test_one_name_twice_with_different_content_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReferenceSetError, match="twice") as caught:
        references.ingest(_duplicate_zip(tmp_path / "d.zip", png(), png((9, 9, 9))), **LIMITS)
    assert caught.value.member == "cat/a.png"
    # The same path spelled another way (NFD, a doubled slash) is the same file once extracted.
    nfd = _duplicate_zip(tmp_path / "e.zip", png(), jpeg(), name="cat//./a.png")
    with pytest.raises(ReferenceSetError, match="twice"):
        references.ingest(nfd, **LIMITS)
    tar = write_tar(tmp_path / "d.tar", {"cat/a.png": png()})
    with tarfile.open(tar, "a") as archive:
        info = tarfile.TarInfo("cat/a.png")
        info.size = len(jpeg())
        archive.addfile(info, io.BytesIO(jpeg()))
    with pytest.raises(ReferenceSetError, match="twice"):
        references.ingest(tar, **LIMITS)
    assert scratch(tmp_path) == ["d.tar", "d.zip", "e.zip"]
    # The same bytes twice under one name: kept once, as before.
    _, info = references.ingest(_duplicate_zip(tmp_path / "s.zip", png(), png()), **LIMITS)
    assert info.images == 2


# --- images: where they end, whether they decode -------------------------------------------------


def _saved(format: str, image: Image.Image | None = None, **options: object) -> bytes:
    out = io.BytesIO()
    (image or Image.new("RGB", (9, 7), (10, 120, 240))).save(out, format=format, **options)
    return out.getvalue()


def _frames(mode: str = "RGB") -> list[Image.Image]:
    return [Image.new(mode, (9, 7), color) for color in ((10, 20, 30), (200, 100, 0))]


def _animated(format: str) -> bytes:
    # Fresh frames each time: saving leaves per-format options on the images it appended.
    frames = _frames()
    return _saved(format, frames[0], save_all=True, append_images=frames[1:])


def _plain_netpbm(magic: bytes, width: int, height: int, samples: list[int]) -> bytes:
    maxval = b"" if magic == b"P1" else b"255\n"
    body = b" ".join(str(s).encode() for s in samples)
    return magic + b"\n# a comment\n" + f"{width} {height}\n".encode() + maxval + body + b"\n"


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "camera"
    exif.get_ifd(0x8769)[0x9003] = "2020:01:01 00:00:00"  # in an EXIF sub-IFD
    return exif


def _valid_images() -> dict[str, bytes]:
    return {
        "png": png(),
        "png-16bit": _saved("PNG", Image.new("I;16", (9, 7), 300)),
        "apng": _animated("PNG"),
        "jpeg": jpeg(),
        "jpeg-progressive": _saved("JPEG", progressive=True, quality=80),
        "mpo": _animated("MPO"),
        "webp-lossy": _saved("WEBP"),
        "webp-lossless": _saved("WEBP", lossless=True),
        "webp-animated": _animated("WEBP"),
        "bmp": _saved("BMP"),
        "bmp-palette": _saved("BMP", Image.new("P", (9, 7), 3)),
        "bmp-1bit": _saved("BMP", Image.new("1", (9, 7), 1)),
        "bmp-rgba": _saved("BMP", Image.new("RGBA", (9, 7), (1, 2, 3, 4))),
        "gif": _saved("GIF"),
        "gif-animated": _animated("GIF"),
        "tiff": _saved("TIFF"),
        "tiff-lzw": _saved("TIFF", compression="tiff_lzw"),
        "tiff-pages": _animated("TIFF"),
        "tiff-exif": _saved("TIFF", exif=_exif()),
        "ppm": _saved("PPM"),
        "pgm": _saved("PPM", Image.new("L", (9, 7), 5)),
        "pbm": _saved("PPM", Image.new("1", (9, 7), 1)),
        "ppm-16bit": b"P6 2 1 65535\n" + b"\x01\x02" * 6,
        "plain-ppm": _plain_netpbm(b"P3", 2, 2, list(range(12))),
        "plain-pgm": _plain_netpbm(b"P2", 3, 1, [0, 128, 255]),
        "plain-pbm": _plain_netpbm(b"P1", 4, 1, [0, 1, 1, 0]),
    }


VALID_IMAGES = _valid_images()


def test_every_format_is_accepted_whole_and_refused_with_data_after_its_end(
    tmp_path: Path,
) -> None:
    empty_zip = b"PK\x05\x06" + b"\x00" * 18
    for kind, data in VALID_IMAGES.items():
        assert references.identify(data, f"cat/{kind}", max_pixels=10_000), kind
        if not kind.startswith("plain-"):  # Pillow reads a plain one's tail as samples
            # Zero bytes of padding (writers align files to 16 bytes or a block) are not data.
            assert references.identify(data + b"\x00" * 16, f"cat/{kind}", max_pixels=10_000)
        for tail in (empty_zip, b"\xff" * 40, png()):
            with pytest.raises(ReferenceSetError, match="after the end") as caught:
                references.identify(data + tail, f"cat/{kind}", max_pixels=10_000)
            assert caught.value.member == f"cat/{kind}", kind
    members = {f"cat/{kind}.img": data for kind, data in VALID_IMAGES.items()}
    _, info = references.ingest(write_zip(tmp_path / "all.zip", members), **LIMITS)
    # Images of one content count once (the 1-bit BMP and PBM may decode alike, not hash alike).
    assert info.images == len(VALID_IMAGES)


def test_a_png_followed_by_a_zip_is_refused(tmp_path: Path) -> None:
    polyglot = png() + _zip_bytes({"evil/run.sh": b"#!/bin/sh\n"})
    source = write_zip(tmp_path / "p.zip", {"cat/a.png": png((1, 1, 1)), "cat/b.png": polyglot})
    with pytest.raises(ReferenceSetError, match="after the end") as caught:
        references.ingest(source, **LIMITS)
    assert caught.value.member == "cat/b.png"
    assert scratch(tmp_path) == ["p.zip"]


def _truncated_pixels(side: int = 64) -> bytes:
    """A PNG whose chunks are all well formed (checksums right) but whose IDAT holds only half
    of the compressed pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = random.Random(3).randbytes(3 * side * side)
    raw = b"".join(b"\x00" + rows[i * 3 * side : (i + 1) * 3 * side] for i in range(side))
    idat = zlib.compress(raw)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", idat[: len(idat) // 2])
        + chunk(b"IEND", b"")
    )


def test_an_image_that_does_not_decode_is_refused(tmp_path: Path) -> None:
    cut = _truncated_pixels()
    with Image.open(io.BytesIO(cut)) as image:
        image.verify()  # what a header check alone accepts
    source = write_zip(tmp_path / "t.zip", {"cat/a.png": png(), "cat/cut.png": cut})
    with pytest.raises(ReferenceSetError, match="does not decode") as caught:
        references.ingest(source, **LIMITS)
    assert caught.value.member == "cat/cut.png"
    assert scratch(tmp_path) == ["t.zip"]


def test_a_jpeg_of_countless_scans_is_refused_before_it_is_decoded() -> None:
    # Decoding time grows with scans x pixels: each repeated scan is another pass.
    progressive = _saved("JPEG", progressive=True)
    last_scan = progressive.rfind(b"\xff\xda")
    scan = progressive[last_scan:-2]  # up to the end-of-image marker
    data = progressive[:-2] + scan * references.MAX_JPEG_SCANS + b"\xff\xd9"
    with pytest.raises(ReferenceSetError, match=f"more than {references.MAX_JPEG_SCANS} scans"):
        references.identify(data, "cat/slow.jpg", max_pixels=10_000)
