"""Reference sets: real images a caller uploads (or an operator names) for real-image baselines.

An upload is a zip or a tar (plain, gz, bz2, xz) of an ImageFolder tree: class folders of
images, optionally under one top-level folder (``train/cat/1.png`` or ``cat/1.png``).
``ingest`` reads it without ever extracting by member name and writes a new, normalized zip::

    <class>/<sha256>.<ext>        the image's original bytes; ext from its content (png, jpg...)
    reference.json                classes, each image's digest, size and original member name

so nothing is ever written outside the set's own storage key. It refuses, naming the member:
absolute names, ``..``, backslashes or NUL in names (a zip name is judged as stored, before
Python cuts it at a NUL); symlinks, hardlinks, devices, FIFOs, sparse files; one name twice
with different content (``a/b.png`` and ``a//b.png``, NFC and NFD spellings, count as one
name); nested archives (by name or content); anything Pillow does not identify as an image of
an allowed format (``FORMATS``: content decides, not the extension); images over
``max_pixels`` (from the header, before any pixel is decoded); images whose file goes on after
the image ends (a PNG followed by a zip; ``images._image_end`` gives each format's rule; up
to ``images._PADDING`` zero bytes of alignment may follow) or stops before; JPEGs of more than
``MAX_JPEG_SCANS`` scans (each one another decoding pass); images that do not decode
(each is decoded once, its first frame to RGB as jobs read it, a few at a time in a pool the
process shares); members over ``MAX_IMAGE_BYTES``; members the archive cannot give back
(corrupt deflate, LZMA or bzip2 data, a bad local header). As a whole, naming "the archive"
or the class folders: an archive too damaged to list (a bad central directory, an end record
pointing past the file, a name that is not UTF-8 under the UTF-8 flag, an unparseable tar or
pax header); more than ``max_bytes`` uncompressed (summed from the headers before any member
is read, and counted again while reading, so a lying header gains nothing; a tar header is
checked before the next one is looked for, so one declaring 10**15 bytes ends the upload at
once); more than ``max_images`` images, more than ``MAX_CLASSES`` classes, no image at all;
two class folders a job could not tell apart (``Cat`` and ``cat``, NFC and NFD ``crème``, one
wnid twice). Hidden entries (any path part starting with ``.``, ``__MACOSX``, ``Thumbs.db``,
``desktop.ini``) and directories are skipped, not refused: archivers add them unasked. An
image that appears twice in one class (same bytes) is kept once.

Records (``core.keys``)::

    distill:reference:<id>        hash   the set: name, owner, created_at, classes, counts, digest
    distill:references:<owner>    zset   one owner's set ids by creation time (listing)

and the normalized zip in the store at ``references/<id>.zip``. Both are kept ``ttl``
(``DISTILL_RESULT_TTL``) seconds, like archives; ``sweep`` removes stored sets whose record
expired.

Named sets are operator files in ``DISTILL_REFERENCES_DIR``, found by name exactly as test
sets are (``core.evaluations.testset_path``): an ImageFolder directory or a zip of one,
laid out by the same rule as uploads (``layout``). A request never gives a path.

``match`` maps a job's classes onto a set's folders (by wnid, else by name).

The package, one module per part, each importing only those above it::

    schema      ReferenceInfo, ReferenceClass, Limits, the errors (and their HTTP statuses)
    names       member names refused or skipped; ``layout``: which folder is the class
    archives    reading an upload: zip or tar, member headers, totals, bounded reads
    images      what an image is, where it ends, whether it decodes (``identify``)
    matching    a job's classes onto a set's folders (``match``, ``folder_keys``)
    writing     ``ingest``: the upload in, the normalized zip and its info out
    stored      the Redis record and the stored zip: store, read, list_for, delete, sweep
    named       operator sets by name; members and folder counts of any set

The names below are the package's public ones, re-exported here for its callers.
"""

from __future__ import annotations

from core.references.archives import MAX_IMAGE_BYTES
from core.references.images import FORMATS, MAX_JPEG_SCANS, identify
from core.references.matching import folder_keys, match
from core.references.named import NAME, folder_counts, members, named_path, named_sets
from core.references.names import check_member_name, layout
from core.references.schema import (
    MANIFEST,
    MAX_CLASSES,
    Limits,
    ReferenceClass,
    ReferenceInfo,
    ReferenceSetError,
    ReferenceTooLarge,
    UnsupportedArchive,
)
from core.references.stored import delete, list_for, read, store, sweep
from core.references.writing import DECODE_THREADS, ingest, set_digest

__all__ = [
    "DECODE_THREADS",
    "FORMATS",
    "MANIFEST",
    "MAX_CLASSES",
    "MAX_IMAGE_BYTES",
    "MAX_JPEG_SCANS",
    "NAME",
    "Limits",
    "ReferenceClass",
    "ReferenceInfo",
    "ReferenceSetError",
    "ReferenceTooLarge",
    "UnsupportedArchive",
    "check_member_name",
    "delete",
    "folder_counts",
    "folder_keys",
    "identify",
    "ingest",
    "layout",
    "list_for",
    "match",
    "members",
    "named_path",
    "named_sets",
    "read",
    "set_digest",
    "store",
    "sweep",
]
