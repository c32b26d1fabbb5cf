"""Images: what they are (the content decides, not the extension), where they end (a file
must end where its format's structure ends: ``_image_end``), and whether they decode (as every
job reads them: first frame, to RGB). Pillow is imported only when an image is looked at."""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib

from core.references.archives import why
from core.references.names import looks_like_archive
from core.references.schema import ReferenceSetError, ReferenceTooLarge

#: Pillow formats accepted (PostScript and the like are excluded: decoding them runs programs).
FORMATS: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpg",
    "MPO": "jpg",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tif",
    "PPM": "ppm",
}
#: What Pillow is asked to try (an MPO file opens through the JPEG plugin).
_OPENERS = [f for f in FORMATS if f != "MPO"]


#: What Pillow raises on a file it cannot decode: its plugins parse hostile bytes and fail
#: in many ways, none of which means anything but "not a usable image".
_UNDECODABLE: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    LookupError,
    ArithmeticError,
    TypeError,
    NotImplementedError,
    RuntimeError,
)


def identify(data: bytes, member: str, *, max_pixels: int) -> str:
    """The file extension for an image's bytes, from its content; ReferenceSetError naming
    ``member`` for anything else. The header decides the format and the size (within
    ``max_pixels``); the file must end where the format's structure ends (``_image_end``);
    then the image is decoded the way jobs read it (first frame, to RGB)."""
    extension = inspect_image(data, member, max_pixels=max_pixels)
    decode_image(data, member)
    return extension


def inspect_image(data: bytes, member: str, *, max_pixels: int) -> str:
    """``identify`` up to the decoding: format, size and end, no pixel data decompressed."""
    if looks_like_archive(member, data[:512]):
        raise ReferenceSetError("nested archives are refused", member=member)
    # Imported here: the API process loads Pillow only when an upload arrives.
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_OPENERS) as image:
                width, height = image.size
                kind = str(image.format)
                frames = int(getattr(image, "n_frames", 1)) if kind == "MPO" else 1
                # Chunk checksums and structure, still without decompressing pixel data.
                image.verify()
    except Image.DecompressionBombError as exc:
        raise ReferenceTooLarge(f"too many pixels ({exc})", member=member) from None
    except _UNDECODABLE as exc:  # UnidentifiedImageError is an OSError
        allowed = ", ".join(sorted(FORMATS))
        raise ReferenceSetError(f"not an image ({allowed}): {exc}", member=member) from None
    if width * height > max_pixels:
        raise ReferenceTooLarge(
            f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            member=member,
        )
    if width < 1 or height < 1 or kind not in FORMATS:
        raise ReferenceSetError(f"not a usable {kind} image ({width}x{height})", member=member)
    _check_end(data, kind, frames, member)
    return FORMATS[kind]


def decode_image(data: bytes, member: str) -> None:
    """Decode the image as every job will (its first frame, to RGB): truncated or corrupt
    pixel data is refused now rather than failing each job that picks the image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=_OPENERS) as image:
            image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ReferenceTooLarge(f"too many pixels ({exc})", member=member) from None
    except _UNDECODABLE as exc:
        raise ReferenceSetError(f"the image does not decode ({why(exc)})", member=member) from None


#: Zero bytes allowed after an image's end: writers align files (Pillow pads each page of a
#: multi-page TIFF to 16 bytes, cameras pad to a block); zeros carry nothing.
_PADDING = 4096
#: What ends each format (see ``_image_end``).
_ENDS = {
    "PNG": "IEND chunk",
    "JPEG": "end-of-image marker",
    "MPO": "last image's end-of-image marker",
    "GIF": "trailer",
    "WEBP": "RIFF chunk",
    "BMP": "pixel rows (or colour profile)",
    "TIFF": "furthest IFD, tag value, strip or tile",
    "PPM": "raster",
}


class _Malformed(ValueError):
    """An image whose structure does not hold together; the message says where."""


def _check_end(data: bytes, kind: str, frames: int, member: str) -> None:
    """Refuse an image whose file goes on after the image ends (a PNG followed by a zip) or
    stops before (a truncated structure)."""
    try:
        end = _image_end(data, kind, frames=frames)
    except (ValueError, IndexError, struct.error) as exc:  # _Malformed is a ValueError
        raise ReferenceSetError(f"not a well-formed {kind} image: {exc}", member=member) from None
    if end > len(data):
        raise ReferenceSetError(
            f"the {kind} image is cut short: its structure needs {end} bytes, the file has "
            f"{len(data)}",
            member=member,
        )
    extra = data[end:]
    if len(extra) > _PADDING or extra.strip(b"\x00"):
        raise ReferenceSetError(
            f"{len(extra)} bytes after the end of the {kind} image (its {_ENDS[kind]} must "
            "end the file) are refused",
            member=member,
        )


def _image_end(data: bytes, kind: str, *, frames: int = 1) -> int:
    """Where the image in ``data`` ends, by its format's own structure:

    - PNG: just after the IEND chunk, walking chunk lengths from the signature.
    - JPEG: just after the EOI marker, walking marker segments and scan data; MPO: after the
      EOI of the last of its ``frames`` JPEG streams, which follow one another.
    - GIF: just after the trailer (0x3B), walking blocks and sub-blocks.
    - WEBP: the end of the RIFF chunk (8 + its size), its chunks filling it exactly.
    - BMP: the end of the pixel rows (offset + padded rows, or offset + the declared size when
      compressed), or of an embedded colour profile placed after them.
    - TIFF (classic, not BigTIFF): the furthest byte any IFD reaches, with its tag values,
      strips, tiles and the IFDs it points to (next, sub-IFDs, EXIF, GPS).
    - PPM (netpbm P1-P6): the end of the raster (binary), or of the last sample (plain).
    """
    if kind in ("JPEG", "MPO"):
        pos = 0
        for _ in range(frames):
            pos = _jpeg_end(data, pos)
        return pos
    walkers = {
        "PNG": _png_end,
        "GIF": _gif_end,
        "WEBP": _webp_end,
        "BMP": _bmp_end,
        "TIFF": _tiff_end,
        "PPM": _ppm_end,
    }
    return walkers[kind](data)


def _png_end(data: bytes) -> int:
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos
    raise _Malformed("no IEND chunk ends it")


#: In JPEG scan data a 0xFF is a marker unless followed by 0x00 (stuffing) or RST0-7.
_SCAN_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
#: Scans one JPEG may have: decoding time grows with scans x pixels, and encoders write one
#: (baseline) or about ten (progressive).
MAX_JPEG_SCANS = 100


def _jpeg_end(data: bytes, pos: int) -> int:
    """Just after the EOI marker of the JPEG stream that starts at ``pos``."""
    if data[pos : pos + 2] != b"\xff\xd8":
        raise _Malformed(f"no JPEG start-of-image marker at byte {pos}")
    pos += 2
    size = len(data)
    scans = 0
    while True:
        if pos >= size:
            raise _Malformed("it ends before its end-of-image marker")
        if data[pos] != 0xFF:
            raise _Malformed(f"no JPEG marker at byte {pos}")
        while pos < size and data[pos] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos >= size:
            raise _Malformed("it ends before its end-of-image marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # markers without a length
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise _Malformed(f"a JPEG segment of length {length} at byte {pos}")
        pos += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise _Malformed(f"more than {MAX_JPEG_SCANS} scans")
            found = _SCAN_MARKER.search(data, pos)
            if found is None:
                raise _Malformed("it ends inside its scan data")
            pos = found.start()


def _gif_end(data: bytes) -> int:
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while True:
        if pos >= len(data):
            raise _Malformed("it ends before its trailer")
        block = data[pos]
        if block == 0x3B:
            return pos + 1
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _gif_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image: descriptor, local colour table, LZW code size, data
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = _gif_sub_blocks(data, pos + 1)
        else:
            raise _Malformed(f"an unknown GIF block 0x{block:02x} at byte {pos}")


def _gif_sub_blocks(data: bytes, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise _Malformed("it ends inside a block")
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos


def _webp_end(data: bytes) -> int:
    end = 8 + int.from_bytes(data[4:8], "little")
    pos = 12
    while pos + 8 <= end:
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + length + (length & 1)
    if end > len(data):
        return end  # cut short
    # The last chunk's padding byte may be counted in the RIFF size or left out.
    if pos not in (end, end + 1):
        raise _Malformed("its chunks do not fill its RIFF chunk")
    return end


def _bmp_end(data: bytes) -> int:
    offset, header = struct.unpack_from("<II", data, 10)
    if header == 12:  # OS/2 1.x: 16-bit sizes, never compressed
        width, height, _, bits = struct.unpack_from("<HHHH", data, 18)
        compression = size = 0
    else:
        width, height, _, bits, compression, size = struct.unpack_from("<iiHHII", data, 18)
    if width < 1 or bits not in (1, 2, 4, 8, 16, 24, 32):
        raise _Malformed(f"{width} pixels wide at {bits} bits per pixel")
    if compression in (1, 2, 4, 5):  # RLE8, RLE4, JPEG, PNG: the declared size is the data
        if size == 0:
            raise _Malformed("compressed pixel data of undeclared size")
        end = offset + size
    else:
        end = offset + (width * bits + 31) // 32 * 4 * abs(height)
    if header >= 124 and struct.unpack_from("<I", data, 14 + 56)[0] == 0x4D424544:  # 'MBED'
        profile, length = struct.unpack_from("<II", data, 14 + 112)
        end = max(end, 14 + profile + length)
    return int(end)


_TIFF_TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
}
#: Tags whose values are offsets of more IFDs: sub-IFDs, EXIF, GPS, interoperability.
_TIFF_IFD_TAGS = frozenset({330, 34665, 34853, 40965})
#: (offsets, byte counts) tag pairs: strips, tiles, a JPEG thumbnail, free space.
_TIFF_EXTENTS = ((273, 279), (324, 325), (513, 514), (288, 289))
_TIFF_WANTED = _TIFF_IFD_TAGS | {tag for pair in _TIFF_EXTENTS for tag in pair}


def _tiff_end(data: bytes) -> int:
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    magic = struct.unpack_from(f"{order or '<'}H", data, 2)[0]
    if order is None or magic != 42:
        raise _Malformed("not a classic TIFF header (BigTIFF is not accepted)")
    end = 8
    todo = [struct.unpack_from(f"{order}I", data, 4)[0]]
    seen: set[int] = set()
    while todo:
        at = todo.pop()
        if at == 0 or at in seen:
            continue
        if len(seen) >= 1024:
            raise _Malformed("more than 1024 IFDs")
        seen.add(at)
        values, reach, following = _tiff_ifd(data, order, at)
        end = max(end, reach)
        for offsets, counts in _TIFF_EXTENTS:
            for start, length in zip(values.get(offsets, ()), values.get(counts, ()), strict=False):
                end = max(end, start + length)
        for tag in _TIFF_IFD_TAGS & values.keys():
            todo.extend(values[tag])
        todo.extend(following)
    return end


def _tiff_ifd(
    data: bytes, order: str, at: int
) -> tuple[dict[int, tuple[int, ...]], int, list[int]]:
    """One IFD: the values of the tags ``_tiff_end`` follows, the furthest byte the IFD and
    its tag values reach, and the IFDs it points to (the next one, IFD-typed tags)."""
    (count,) = struct.unpack_from(f"{order}H", data, at)
    reach = at + 2 + 12 * count + 4
    following = [struct.unpack_from(f"{order}I", data, reach - 4)[0]]
    values: dict[int, tuple[int, ...]] = {}
    for n in range(count):
        field = at + 2 + 12 * n
        tag, kind, number = struct.unpack_from(f"{order}HHI", data, field)
        size = _TIFF_TYPE_SIZES.get(kind, 1) * number
        start = struct.unpack_from(f"{order}I", data, field + 8)[0] if size > 4 else field + 8
        if start + size > len(data):
            raise _Malformed(f"tag {tag} points past the end of the file")
        reach = max(reach, start + size)
        if kind in (3, 4, 13) and (tag in _TIFF_WANTED or kind == 13):
            if number > 1 << 20:
                raise _Malformed(f"tag {tag} holds {number} offsets or counts")
            unpacked = struct.unpack_from(
                f"{order}{number}{'H' if kind == 3 else 'I'}", data, start
            )
            if kind == 13:
                following.extend(unpacked)
            else:
                values[tag] = unpacked
    return values, reach, following


_NETPBM_SPACE = b" \t\r\n\x0b\x0c"
_DIGITS = re.compile(rb"[0-9]+")


def _netpbm_skip(data: bytes, pos: int) -> int:
    """Past the whitespace and comments (``#`` to the end of the line) at ``pos``."""
    while pos < len(data):
        if data[pos] == 0x23:
            newline = data.find(b"\n", pos)
            pos = len(data) if newline < 0 else newline + 1
        elif data[pos] in _NETPBM_SPACE:
            pos += 1
        else:
            break
    return pos


def _ppm_end(data: bytes) -> int:
    kind = data[1] - 48 if data[:1] == b"P" and len(data) > 2 else 0
    if not 1 <= kind <= 6:
        raise _Malformed("only netpbm P1-P6 is accepted")
    fields: list[int] = []
    pos = 2
    while len(fields) < (2 if kind in (1, 4) else 3):
        pos = _netpbm_skip(data, pos)
        found = _DIGITS.match(data, pos)
        if found is None:
            raise _Malformed(f"its header holds no number at byte {pos}")
        if len(found[0]) > 9:
            raise _Malformed(f"a header number of {len(found[0])} digits")
        fields.append(int(found[0]))
        pos = found.end()
    width, height = fields[0], fields[1]
    maxval = fields[2] if len(fields) == 3 else 1
    samples = width * height * (3 if kind in (3, 6) else 1)
    if kind >= 4:  # binary: one whitespace byte, then the raster
        if pos >= len(data) or data[pos] not in _NETPBM_SPACE:
            raise _Malformed("no whitespace after its header")
        depth = 1 if maxval < 256 else 2
        row = (width + 7) // 8 if kind == 4 else width * depth * (3 if kind == 6 else 1)
        return pos + 1 + row * height
    if samples > len(data):
        raise _Malformed(f"{samples} samples cannot fit in {len(data)} bytes")
    # Plain: the samples as numbers (P1: digits 0 and 1) between whitespace. Possessive
    # quantifiers: a failed match never backtracks into the runs of digits.
    sample = rb"\s*+[01]" if kind == 1 else rb"\s*+[0-9]++"
    found = re.compile(rb"(?:%s){%d}\s*+" % (sample, samples)).match(data, pos)
    if found is None:
        raise _Malformed(f"it does not hold {samples} samples")
    return found.end()
