"""Parquet shards in the Hugging Face Hub's own layout, with the ``datasets`` features inside.

Layout inside the job's zip (what ``Dataset.push_to_hub`` uploads)::

    data/train-00000-of-00002.parquet    about MAX_BYTES each
    data/train-00001-of-00002.parquet

Columns: ``image`` (the ``datasets`` Image feature: a struct of ``bytes``, the PNG the
ImageFolder tree holds, and ``path``, its ``train/`` file name), ``label`` (a ``ClassLabel``
naming the classes in index order), then the ``train/metadata.jsonl`` columns. The schema's
``huggingface`` metadata holds the features as ``datasets`` writes them, so
``load_dataset("parquet", ...)`` gives ``label`` as a ``ClassLabel`` with no card at all.

Rows stream into row groups, flushed to anonymous temporary files as images come (memory
stays at one row group), in the order they are added: class-major for an ipc job, round by
round for a budget job. The writer's options are those of ``datasets``' own ParquetWriter
(``Dataset.to_parquet``, ``push_to_hub``): image leaves PLAIN and uncompressed, the rest
snappy with dictionaries, content-defined chunking, a page index. Nothing in a file depends
on time or place (pyarrow's ``created_by`` names only its version), so the same rows give the
same bytes. pyarrow alone writes them: the worker does not import ``datasets``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

# pyarrow ships no type information (its stubs are a separate package).
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from core.spec import DatasetSpec
from worker.outputs import card_facts
from worker.outputs.archive import class_dir
from worker.outputs.card import (
    COPY_COLUMN,
    GUIDANCE_COLUMN,
    LIST_PREFIX,
    METADATA_COLUMNS,
    SOFT_COLUMNS,
)

#: A shard is closed before a row group would take it past this many bytes: ``datasets``'
#: ``MAX_SHARD_SIZE`` ("500MB"), what ``push_to_hub`` shards by.
MAX_BYTES = 500 * 10**6
#: A row group holds at most this many rows (``datasets``' default batch size) ...
ROW_GROUP_ROWS = 1000
#: ... and at most about this many bytes: what the writer keeps in memory.
ROW_GROUP_BYTES = 64 * 2**20
#: Bytes a row adds beyond its PNG (file name, prompt, metadata, page headers), for estimates.
OVERHEAD_BYTES = 512
#: Zip folder of the shards and the split they hold.
FOLDER = "data"
SPLIT = "train"
#: ``datasets.config.DEFAULT_CDC_OPTIONS``: chunk boundaries by content, so re-uploads of
#: similar files deduplicate on the Hub.
CDC_OPTIONS: dict[str, int] = {
    "min_chunk_size": 256 * 1024,
    "max_chunk_size": 1024 * 1024,
    "norm_level": 0,
}
#: The image struct's leaves: stored as they are (PNG does not compress further).
_IMAGE_LEAVES = ("image.bytes", "image.path")
_ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def shard_name(shard: int, count: int) -> str:
    """Zip member name of the ``shard``-th of ``count`` files."""
    return f"{FOLDER}/{SPLIT}-{shard:05d}-of-{count:05d}.parquet"


def class_names(spec: DatasetSpec) -> list[str]:
    """The ``ClassLabel`` names of ``spec``'s classes: the card's, so both say the same."""
    return card_facts.class_names(
        [
            {
                "index": c.index,
                "label": c.label,
                "wnid": c.wnid,
                "folder": f"train/{class_dir(c.index, c.label)}",
            }
            for c in spec.classes()
        ]
    )


def has_copies(spec: DatasetSpec) -> bool:
    """Whether ``spec`` makes augmented copies, whose rows carry a ``copy`` number."""
    # An ipc job's first sample of a class gets min(copies, ipc - 1) copies.
    return spec.augment.n_copies > 0 and (spec.ipc is None or spec.ipc > 1)


def columns(
    *, with_copy: bool, with_soft: bool = False, with_guidance: bool = False
) -> list[tuple[str, str]]:
    """(name, ``datasets`` dtype) of the metadata columns after ``image`` and ``label``; a
    ``list:`` dtype is a ``List`` of that value type (the soft-label columns)."""
    soft = SOFT_COLUMNS if with_soft else ()
    guided = (GUIDANCE_COLUMN,) if with_guidance else ()
    return [*METADATA_COLUMNS, *((COPY_COLUMN,) if with_copy else ()), *guided, *soft]


def _feature(dtype: str) -> dict[str, Any]:
    if dtype.startswith(LIST_PREFIX):
        return {"feature": _feature(dtype.removeprefix(LIST_PREFIX)), "_type": "List"}
    return {"dtype": dtype, "_type": "Value"}


def _arrow_type(dtype: str) -> pa.DataType:
    if dtype.startswith(LIST_PREFIX):
        return pa.list_(_arrow_type(dtype.removeprefix(LIST_PREFIX)))
    return _ARROW_TYPES[dtype]


def features_json(
    names: Sequence[str], *, with_copy: bool, with_soft: bool = False, with_guidance: bool = False
) -> str:
    """The schema's ``huggingface`` metadata, as ``datasets``' ``Features.arrow_schema`` has it."""
    features: dict[str, Any] = {
        "image": {"_type": "Image"},
        "label": {"names": list(names), "_type": "ClassLabel"},
    }
    for name, dtype in columns(
        with_copy=with_copy, with_soft=with_soft, with_guidance=with_guidance
    ):
        features[name] = _feature(dtype)
    return json.dumps({"info": {"features": features}})


def schema(
    names: Sequence[str], *, with_copy: bool, with_soft: bool = False, with_guidance: bool = False
) -> pa.Schema:
    """The shards' Arrow schema, features included."""
    flags = {"with_copy": with_copy, "with_soft": with_soft, "with_guidance": with_guidance}
    fields = [pa.field("image", _IMAGE_TYPE), pa.field("label", pa.int64())]
    fields += [pa.field(n, _arrow_type(t)) for n, t in columns(**flags)]
    metadata = {"huggingface": features_json(names, **flags)}
    return pa.schema(fields, metadata=metadata)


class ShardWriter:
    """Stream rows into Parquet shards of at most about ``max_bytes``, row groups of at most
    ``row_group_rows`` rows or about ``row_group_bytes`` bytes.

    Each shard is an anonymous ``TemporaryFile`` in ``directory`` (the system's temporary
    directory if None). ``shards()`` hands out the finished files in order; ``close()`` drops
    them.
    """

    def __init__(
        self,
        *,
        names: Sequence[str],
        with_copy: bool,
        with_soft: bool = False,
        with_guidance: bool = False,
        directory: Path | None = None,
        max_bytes: int = MAX_BYTES,
        row_group_rows: int = ROW_GROUP_ROWS,
        row_group_bytes: int = ROW_GROUP_BYTES,
    ) -> None:
        if max_bytes < 1 or row_group_rows < 1 or row_group_bytes < 1:
            raise ValueError("shards and row groups must be allowed at least one row and byte")
        self.names = list(names)
        self.flags = {
            "with_copy": with_copy,
            "with_soft": with_soft,
            "with_guidance": with_guidance,
        }
        self.schema = schema(self.names, **self.flags)
        self.directory = directory
        self.max_bytes = max_bytes
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes
        self._columns = [n for n, _ in columns(**self.flags)]
        self._files: list[IO[bytes]] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_bytes = 0
        self._rows: list[tuple[bytes, str, int, list[Any]]] = []
        self._pending_bytes = 0
        self.rows = 0

    @classmethod
    def for_spec(
        cls, spec: DatasetSpec, *, directory: Path | None = None, with_soft: bool = False
    ) -> ShardWriter:
        """A writer for ``spec``'s classes and columns (the soft-label ones ``with_soft``),
        with the default limits."""
        return cls(
            names=class_names(spec),
            with_copy=has_copies(spec),
            with_soft=with_soft,
            with_guidance=spec.guidance_range is not None,
            directory=directory,
        )

    def add(self, file_name: str, png: bytes, row: dict[str, Any]) -> None:
        """Append one image: its PNG, ``train/`` file name and metadata line's values
        (``label`` and the metadata columns; a missing one is null)."""
        label = int(row["label"])
        if not 0 <= label < len(self.names):
            raise ValueError(f"label {label} is not a class index (0..{len(self.names) - 1})")
        values = [row.get(name) for name in self._columns]
        self._rows.append((png, file_name, label, values))
        # The estimate decides row groups and shards: it must depend on the rows alone.
        self._pending_bytes += len(png) + len(file_name.encode()) + 8
        self._pending_bytes += sum(len(str(v).encode()) for v in values if v is not None)
        self.rows += 1
        if len(self._rows) >= self.row_group_rows or self._pending_bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None or self._shard_bytes + self._pending_bytes > self.max_bytes:
            self._next_shard()
        assert self._writer is not None
        pngs, paths, labels, values = zip(*self._rows, strict=True)
        arrays: list[pa.Array] = [
            pa.StructArray.from_arrays(
                [pa.array(pngs, pa.binary()), pa.array(paths, pa.string())],
                fields=list(_IMAGE_TYPE),
            ),
            pa.array(labels, pa.int64()),
        ]
        for index, field in enumerate(self.schema.remove(0).remove(0)):
            arrays.append(pa.array([v[index] for v in values], field.type))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self._shard_bytes += self._pending_bytes
        self._rows.clear()
        self._pending_bytes = 0

    def _next_shard(self) -> None:
        self._finish_shard()
        handle = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115 - closed in shards/close
        self._files.append(handle)
        listed = columns(**self.flags)
        # A list column's values are its leaf ``<name>.list.element``.
        leaves = [*_IMAGE_LEAVES, "label"]
        leaves += [f"{n}.list.element" if t.startswith(LIST_PREFIX) else n for n, t in listed]
        self._writer = pq.ParquetWriter(
            handle,
            self.schema,
            compression={leaf: "none" if leaf in _IMAGE_LEAVES else "snappy" for leaf in leaves},
            use_dictionary=[leaf for leaf in leaves if leaf not in _IMAGE_LEAVES],
            column_encoding=dict.fromkeys(_IMAGE_LEAVES, "PLAIN"),
            use_content_defined_chunking=CDC_OPTIONS,
            write_page_index=True,
        )
        self._writer.add_key_value_metadata({"content_defined_chunking": json.dumps(CDC_OPTIONS)})
        self._shard_bytes = 0

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()  # the footer; the file itself stays open
            self._writer = None

    def finish(self) -> None:
        """Flush the last row group and close the last shard."""
        self._flush()
        self._finish_shard()

    @property
    def shard_names(self) -> list[str]:
        """Zip member names of the shards (final once ``finish`` has run)."""
        count = len(self._files)
        return [shard_name(i, count) for i in range(count)]

    def shards(self) -> Iterator[tuple[str, int, IO[bytes]]]:
        """Finish; yield (zip member name, size, file at offset 0) per shard, closing (so
        dropping) each file once the caller has moved on to the next."""
        self.finish()
        for name, handle in zip(self.shard_names, self._files, strict=True):
            size = handle.seek(0, io.SEEK_END)
            handle.seek(0)
            yield name, size, handle
            handle.close()

    def write_to(self, directory: Path) -> list[Path]:
        """Finish and copy every shard into ``directory`` under its zip member name; returns
        the paths (for tests and local use; the archive writer uses ``shards``)."""
        paths = []
        for name, _, handle in self.shards():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as out:
                shutil.copyfileobj(handle, out, 1 << 20)
            paths.append(path)
        return paths

    def close(self) -> None:
        """Drop every shard not yet handed out (an abort on a full disk must not fail here)."""
        with contextlib.suppress(OSError, pa.ArrowException):
            if self._writer is not None:
                self._writer.close()
        self._writer = None
        self._rows.clear()
        for handle in self._files:
            handle.close()
        self._files.clear()

    def description(self) -> dict[str, Any]:
        """The manifest's entry for these shards (after ``finish``: it names them all)."""
        return {
            "shards": self.shard_names,
            "rows": self.rows,
            "columns": [field.name for field in self.schema],
            "image": "datasets Image feature: struct of bytes (the PNG the ImageFolder tree "
            "holds, RGB uint8) and path (its train/ file name)",
            "label": "datasets ClassLabel: the class index, named by the classes in index order",
            "order": "class-major for an ipc job, round by round for a budget job",
            "limits": {
                "shard_bytes": self.max_bytes,
                "row_group_rows": self.row_group_rows,
                "row_group_bytes": self.row_group_bytes,
            },
            "load": 'datasets.load_dataset("parquet", data_files="data/train-*.parquet"); '
            'pyarrow.parquet.read_table("data")',
        }
