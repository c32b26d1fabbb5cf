"""Whether a job's archive fits: an upper estimate of its size by format, checked against the
data volume's free space before anything is sampled."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.errors import InsufficientSpace
from core.spec import DatasetSpec

#: Free space kept on the data volume beyond a job's estimate.
SPACE_MARGIN_BYTES = 16 * 2**20


def estimate_bytes(spec: DatasetSpec, images: int | None = None) -> int:
    """An upper estimate of a fixed-ipc job's archive size (0 for a time-budget job), or of
    ``images`` of its images (one shard's).

    PNG of noisy pixels is about the raw size; zip headers add about 100 bytes a member, tar
    headers and a sample's .cls and .json about 1.5 KiB, a Parquet row's metadata a few
    hundred bytes. WebDataset and Parquet shards are written to temporary files first, so one
    shard's worth more of each is needed while it is copied in.
    """
    # Here, not at the top: the writers (pyarrow) load only when a job is estimated.
    from worker.outputs import parquet, webdataset

    images = spec.total_images if images is None else images
    raw = spec.size * spec.size * 3
    total = 0
    if "imagefolder" in spec.formats:
        total += images * (raw + 300)
    if "tensors" in spec.formats:
        total += images * raw * (5 if spec.preset else 1)
    if "challenge" in spec.formats:
        total += images * raw * 4
    if "webdataset" in spec.formats:
        shards = images * (raw + webdataset.OVERHEAD_BYTES)
        total += shards + min(shards, webdataset.MAX_BYTES)
    if "parquet" in spec.formats:
        rows = images * (raw + parquet.OVERHEAD_BYTES)
        total += rows + min(rows, parquet.MAX_BYTES)
    return total


def check_space(spec: DatasetSpec, directory: Path, *, images: int | None = None) -> None:
    """Fail before sampling when the archive cannot fit (ENOSPC is still caught on write)."""
    directory.mkdir(parents=True, exist_ok=True)
    needed = estimate_bytes(spec, images) + SPACE_MARGIN_BYTES
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise InsufficientSpace(
            f"the archive needs about {needed / 2**20:.1f} MiB but the data volume has "
            f"{free / 2**20:.1f} MiB free"
        )
