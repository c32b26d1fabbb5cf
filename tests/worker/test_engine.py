"""The engine overlaps post-processing with sampling without changing a byte of the output."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.spec import DatasetSpec
from worker import engine
from worker.model.generator import Generator
from worker.model.loading import LoadOptions, load
from worker.outputs import sink
from worker.outputs.archive import ArchiveWriter
from worker.postprocess import make_pool


@pytest.fixture(scope="module")
def generator(tiny_model: Path) -> Generator:
    return load(str(tiny_model), LoadOptions(device="cpu"))


def _archive(
    generator: Generator, spec: DatasetSpec, path: Path, *, mode: str, workers: int
) -> str:
    with (
        make_pool(mode, workers) as pool,  # type: ignore[arg-type]
        ArchiveWriter(final=path, partial=path.with_suffix(".part")) as writer,
    ):
        outputs = sink.Outputs(spec=spec, writer=writer)
        run = engine.run(
            spec,
            generator,
            outputs,
            batch_size=3,
            hooks=engine.NoHooks(),
            pool=pool,
            workers=workers,
        )
        assert run is not None
        return writer.commit({"n": outputs.count}).sha256


def test_pool_kind_and_size_do_not_change_the_archive(generator: Generator, tmp_path: Path) -> None:
    spec = DatasetSpec(labels=["cat", "dog", "ship"], ipc=7, image_size=16)
    digests = {
        _archive(generator, spec, tmp_path / f"{mode}{n}.zip", mode=mode, workers=n)
        for mode, n in (("threads", 1), ("threads", 4), ("processes", 2))
    }
    assert len(digests) == 1


class _Recorder(engine.NoHooks):
    def __init__(self, cancel_after: int | None = None) -> None:
        self.batches: list[tuple[int, int, tuple[int, int]]] = []
        self.cancel_after = cancel_after

    def should_cancel(self) -> bool:
        return self.cancel_after is not None and len(self.batches) >= self.cancel_after

    def on_batch(self, *, generated: int, written: int, added: tuple[int, int]) -> None:
        self.batches.append((generated, written, added))


def test_progress_reports_every_batch_in_order(generator: Generator, tmp_path: Path) -> None:
    spec = DatasetSpec(labels=["cat", "dog"], ipc=10, image_size=16)  # 2 x 2 sampled, 20 out
    hooks = _Recorder()
    with ArchiveWriter(final=tmp_path / "a.zip", partial=tmp_path / "a.part") as writer:
        outputs = sink.Outputs(spec=spec, writer=writer)
        engine.run(spec, generator, outputs, batch_size=3, hooks=hooks)
    assert [b[0] for b in hooks.batches] == [3, 4]
    assert hooks.batches[-1][1] == 20
    assert sum(b[2][0] for b in hooks.batches) == 4 and sum(b[2][1] for b in hooks.batches) == 20


def test_cancel_between_batches_returns_none(generator: Generator, tmp_path: Path) -> None:
    spec = DatasetSpec(labels=[f"c{i}" for i in range(10)], ipc=5, image_size=8)
    with ArchiveWriter(final=tmp_path / "a.zip", partial=tmp_path / "a.part") as writer:
        outputs = sink.Outputs(spec=spec, writer=writer)
        assert engine.run(spec, generator, outputs, batch_size=2, hooks=_Recorder(1)) is None
    assert not (tmp_path / "a.zip").exists() and not (tmp_path / "a.part").exists()
