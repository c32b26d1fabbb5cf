"""The RQ entry points (names in ``core.keys``): a job in one piece, one shard, an assembly.

prompts -> model (batched, one seed per image) -> resize -> augmented copies -> archive.
A job in one piece and a shard are one *piece* of work (``core.records.Piece``) and run
through the same steps (``_run_piece``): mark running, sample into an archive, stop between
batches on cancel or shutdown, publish. A whole job publishes the dataset's archive; a shard
publishes a part, and the assembly joins the parts into the same archive (``_publish``).
Failures of any of them go to the one failure callback, ``core.failures.on_failure``.

Two ways to size a job: ``ipc`` (a fixed count per class, sampled class by class) or
``budget_seconds`` (rounds of one image per class until the budget would be overrun, so every
class ends within one sampled image of the others).
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job

from core import keys, records, shards
from core.presets import ClassInfo
from core.records import JobRecord, Piece, ShardRecord
from core.spec import DatasetSpec
from core.states import JobState
from core.storage import Storage, open_storage
from worker import engine, runtime
from worker.augment import source_size
from worker.model.generator import SamplingParams
from worker.outputs import card, manifest, sink
from worker.outputs.archive import ArchiveInfo, ArchiveWriter, decode_png
from worker.outputs.space import check_space
from worker.selection import oversample, sources, teachers

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a running job waits for Redis to come back before it gives up.
REDIS_PATIENCE_S = 120.0


def patiently(call: Callable[[], T]) -> T:
    """Run a Redis call, retrying through a Redis restart for up to ``REDIS_PATIENCE_S``."""
    deadline = time.monotonic() + REDIS_PATIENCE_S
    delay = 0.2
    while True:
        try:
            return call()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("redis unavailable (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class RedisHooks:
    """Progress into the piece's record; the job's cancel flag or end and the worker's
    shutdown are checked between batches."""

    def __init__(self, redis: Redis, piece: Piece) -> None:
        self.redis = redis
        self.piece = piece

    def should_cancel(self) -> bool:
        # A shard also stops when another shard's failure ended the job.
        return patiently(lambda: records.ending(self.redis, self.piece.job_id))

    def should_stop(self) -> bool:
        return runtime.stopping()

    def on_batch(self, *, generated: int, written: int, added: tuple[int, int]) -> None:
        patiently(
            lambda: records.save_progress(
                self.redis, self.piece, generated=generated, written=written, added=added
            )
        )


def _current_job() -> Any:
    job = get_current_job()
    if job is None:
        raise RuntimeError("this runs as an RQ job, inside `python -m worker`")
    return job


def _as_job(body: Callable[[Any], dict[str, Any]], piece: Piece | None) -> dict[str, Any]:
    """Run ``body(job)`` for the current RQ job with the shared fault rules.

    A worker shutdown (``Interrupted``) records the re-queue of ``piece`` and has the worker
    put the entry back at the front. Any other error fails it at once: the error would repeat
    on another worker, so only a lost worker (the registry cleanup) uses the retries.
    """
    job = _current_job()
    try:
        return body(job)
    except engine.Interrupted:
        if piece is not None:
            reason = f"worker {runtime.current().worker_name} shut down"
            patiently(lambda: records.mark_requeued(job.connection, piece, reason=reason))
        runtime.mark_interrupted(job.id)
        return {"interrupted": True}
    except Exception:
        job.retries_left = 0
        raise


def distill(payload: dict[str, Any]) -> dict[str, Any]:
    """Generate the dataset ``payload`` describes; returns the archive's key, size and digest."""
    job = _current_job()
    piece = Piece(job.id)
    return _as_job(lambda job: _run_piece(job, piece, DatasetSpec.model_validate(payload)), piece)


def distill_shard(job_id: str, index: int) -> dict[str, Any]:
    """Make one shard of a sharded job into a part archive in the store."""
    piece = Piece(job_id, index)
    return _as_job(lambda job: _run_piece(job, piece, None), piece)


def assemble(job_id: str) -> dict[str, Any]:
    """Copy every shard's part, in shard order, into the job's archive; publish it."""
    # Assembly does not check for shutdown: it finishes, then the worker stops.
    return _as_job(lambda job: _assemble(job, job_id), None)


def discard_parts(job_id: str) -> int:
    """Remove a sharded job's part archives from the store; returns how many."""
    store = open_storage(runtime.current().settings)
    removed = patiently(lambda: store.delete_prefix(keys.parts_prefix(job_id)))
    shards.forget(_current_job().connection, job_id)
    return removed


def _model_facts(rt: runtime.Runtime, spec: DatasetSpec) -> manifest.ModelFacts:
    generator = rt.generator
    return manifest.ModelFacts(
        provenance=generator.provenance(SamplingParams.from_spec(spec)),
        decoder=generator.decoder_provenance(spec.decoder),
        resolution=generator.resolution,
        class_conditional=generator.class_conditional,
        seed_scheme=engine.SEED_SCHEME,
        batch_size=rt.batch_size,
        load_seconds=generator.load_seconds,
    )


def _targets(store: Storage, key: str, scratch: Path) -> tuple[Path, Path]:
    """(final, partial) local files for an archive stored under ``key``.

    A directory store gets both beside the key's own path (one rename publishes it); an object
    store gets them in the worker's scratch directory, uploaded once complete.
    """
    local = store.local_path(key)
    if local is not None:
        return local, local.with_name(f".{local.name}.part")
    stem = key.replace("/", "-")
    return scratch / f".{stem}.upload", scratch / f".{stem}.part"


@dataclass(frozen=True)
class _Work:
    """What one piece makes: the spec it samples with, its items, and where it goes."""

    spec: DatasetSpec
    sample_spec: DatasetSpec
    items: Sequence[engine.Item] | None
    key: str
    images: int | None


def _work(spec: DatasetSpec, piece: Piece, shard: ShardRecord | None) -> _Work:
    if shard is None:
        return _Work(spec, spec, None, keys.archive(piece.job_id), None)
    # A part always holds PNGs (lossless): assembly decodes them for tensor formats.
    part_spec = spec.model_copy(update={"formats": ["imagefolder"]})
    items = engine.fixed_plan(spec)[shard.start : shard.stop]
    return _Work(spec, part_spec, items, keys.part(piece.job_id, shard.index), shard.images)


def _run_piece(job: Any, piece: Piece, spec: DatasetSpec | None) -> dict[str, Any]:
    """Sample one piece (a whole job, or a shard) into its archive and publish it."""
    rt = runtime.current()
    settings = rt.settings
    redis: Redis = job.connection
    shard: ShardRecord | None = None
    if piece.index is not None:
        record = patiently(lambda: records.read(redis, piece.job_id))
        shard = next(
            (
                s
                for s in patiently(lambda: records.read_shards(redis, piece.job_id))
                if s.index == piece.index
            ),
            None,
        )
        if record is None or shard is None or record.ending:
            return _stopped(redis, piece, written=0)
        spec = DatasetSpec.model_validate_json(record.request)
    assert spec is not None
    work = _work(spec, piece, shard)
    store = open_storage(settings)
    final, partial = _targets(store, work.key, settings.data_dir)
    patiently(
        lambda: records.mark_running(redis, piece, worker=rt.worker_name, partial=str(partial))
    )
    check_space(spec, partial.parent, images=work.images)
    started = time.time()
    # A job that starts from a reference set: its picked images or prototypes, prepared once
    # per worker (worker.selection).
    source = sources.prepare(
        spec,
        settings,
        rt.generator,
        source_side=source_size(spec.augment, image_size=spec.size),
    )
    hooks = RedisHooks(redis, piece)
    # A shard's part is labelled by its assembly, which sees every image in order.
    teacher = teachers.for_job(spec, settings) if shard is None else None
    selector = oversample.for_job(spec, settings)
    with ArchiveWriter(final=final, partial=partial) as writer:
        outputs = sink.Outputs(
            spec=work.sample_spec,
            writer=writer,
            teacher=teacher.logits if teacher is not None else None,
        )
        run = engine.run(
            work.sample_spec,
            rt.generator,
            outputs,
            batch_size=rt.batch_size,
            pool=rt.pool,
            workers=settings.postprocess_pool_size,
            hooks=hooks,
            items=work.items,
            source=source,
            selector=selector,
        )
        if run is None or hooks.should_cancel():
            writer.abort()  # gone before anyone can see the job ended
            return _stopped(redis, piece, written=outputs.count)
        # This worker's own sampling rate (advertised in its status); assembly is not sampling.
        runtime.record_rate(outputs.count / max(time.time() - started, 1e-6))
        if shard is None:
            return _publish(
                redis, store, piece.job_id, writer, outputs, run, started=started, teacher=teacher
            )
        info = writer.commit(
            {
                "format": manifest.PART_FORMAT,
                "job_id": piece.job_id,
                "shard": shard.index,
                "samples": [shard.start, shard.stop],
                "images": outputs.count,
                **({"select": list(run.selected)} if selector is not None else {}),
            }
        )
    return _publish_part(redis, store, piece, info, outputs, run)


def _stopped(redis: Redis, piece: Piece, *, written: int) -> dict[str, Any]:
    """The piece stopped for a cancel (or, for a shard, the end of its job)."""
    if piece.index is None:
        done = {"written": written}
        patiently(
            lambda: records.finish(redis, piece.job_id, outcome=JobState.canceled, fields=done)
        )
    else:
        patiently(
            lambda: shards.mark_stopped(redis, piece.job_id, piece.index, state=JobState.canceled)  # type: ignore[arg-type]
        )
        _settle(redis, piece.job_id)
    return {"canceled": True}


def _settle(redis: Redis, job_id: str) -> None:
    """A canceled (or failed) sharded job whose shards have all stopped: record the end and
    remove its parts."""
    if patiently(lambda: shards.end_if_stopped(redis, job_id)):
        discard_parts(job_id)


def _publish(
    redis: Redis,
    store: Storage,
    job_id: str,
    writer: ArchiveWriter,
    outputs: sink.Outputs,
    run: sink.RunResult,
    *,
    started: float,
    teacher: teachers.SoftTeacher | None = None,
    **extra: str | int | float,
) -> dict[str, Any]:
    """Finish the dataset's archive (tensors, contact sheet, manifest), put it in the store
    and record the job's success. A whole job and an assembly both end here."""
    rt = runtime.current()
    spec = outputs.spec
    tensors = outputs.write_tensors()
    soft = outputs.write_soft_labels(teacher.provenance) if teacher is not None else None
    sheet = outputs.preview.render(spec.size)
    writer.add_file("preview.png", sheet)
    finished = time.time()
    source = sources.prepare(spec, rt.settings, rt.generator, source_side=run.source_size)
    selector = oversample.for_job(spec, rt.settings)
    described = manifest.build(
        spec,
        facts=_model_facts(rt, spec),
        outputs=outputs,
        tensors=tensors,
        run=run,
        selection=source.provenance() if source is not None else None,
        soft_labels=soft,
        select=selector.provenance(list(run.selected)) if selector is not None else None,
    )
    writer.add_file("README.md", card.render(described), compress=True)
    info = writer.commit(described)
    key = keys.archive(job_id)
    patiently(lambda: store.put(key, info.path))
    patiently(lambda: store.put_bytes(keys.preview(job_id), sheet))
    fields: dict[str, str | int | float] = {
        "archive_key": key,
        "archive_size": info.size_bytes,
        "archive_sha256": info.sha256,
        "written": outputs.count,
        "generated": run.generated,
        "ipc_reached": min(outputs.per_class.get(c.index, 0) for c in spec.classes()),
        "seconds_sampling": round(run.seconds_sampling, 3),
        "seconds_total": round(finished - started, 3),
        **extra,
    }
    patiently(lambda: records.finish(redis, job_id, outcome=JobState.succeeded, fields=fields))
    return {"key": key, "size_bytes": info.size_bytes, "sha256": info.sha256}


def _publish_part(
    redis: Redis,
    store: Storage,
    piece: Piece,
    info: ArchiveInfo,
    outputs: sink.Outputs,
    run: sink.RunResult,
) -> dict[str, Any]:
    """Put a shard's part in the store; then top up the job's window and, after the last
    shard, enqueue the assembly."""
    assert piece.index is not None
    settings = runtime.current().settings
    job_id, index = piece.job_id, piece.index
    key = keys.part(job_id, index)
    size = patiently(lambda: store.put(key, info.path))
    done = {
        "written": outputs.count,
        "generated": run.generated,
        "seconds_sampling": round(run.seconds_sampling, 3),
        "part_size": size,
    }
    patiently(lambda: shards.mark_done(redis, job_id, index, fields=done))
    if patiently(lambda: records.ending(redis, job_id)):
        _settle(redis, job_id)
        return {"canceled": True}
    patiently(lambda: shards.top_up(redis, settings, job_id))
    patiently(lambda: shards.maybe_assemble(redis, settings, job_id))
    return {"key": key, "size_bytes": size, "images": outputs.count}


def _assemble(job: Any, job_id: str) -> dict[str, Any]:
    rt = runtime.current()
    settings = rt.settings
    redis: Redis = job.connection
    record: JobRecord | None = patiently(lambda: records.read(redis, job_id))
    if record is None or record.outcome is not None:
        return {"skipped": True}
    spec = DatasetSpec.model_validate_json(record.request)
    store = open_storage(settings)
    final, partial = _targets(store, keys.archive(job_id), settings.data_dir)
    patiently(
        lambda: shards.mark_assembly(
            redis, job_id, JobState.running, worker=rt.worker_name, partial=str(partial)
        )
    )
    check_space(spec, partial.parent)
    started = time.perf_counter()
    rows = patiently(lambda: records.read_shards(redis, job_id))
    teacher = teachers.for_job(spec, settings)
    selected: list[dict[str, Any]] = []
    with ArchiveWriter(final=final, partial=partial) as writer:
        outputs = sink.Outputs(
            spec=spec, writer=writer, teacher=teacher.logits if teacher is not None else None
        )
        for shard in rows:
            if patiently(lambda: records.ending(redis, job_id)):
                writer.abort()
                patiently(lambda: shards.mark_assembly(redis, job_id, JobState.canceled))
                _settle(redis, job_id)
                return {"canceled": True}
            with store.local_copy(keys.part(job_id, shard.index)) as path:
                selected += _copy_part(path, outputs, spec.classes())
        run = sink.RunResult(
            generated=sum(r.generated for r in rows),
            seconds_sampling=sum(r.seconds_sampling for r in rows),
            seconds_generating=0.0,
            source_size=source_size(spec.augment, image_size=spec.size),
            selected=tuple(selected),
        )
        first_start = min(r.started_at for r in rows if r.started_at is not None)
        result = _publish(
            redis,
            store,
            job_id,
            writer,
            outputs,
            run,
            started=first_start,
            teacher=teacher,
            seconds_assembling=round(time.perf_counter() - started, 3),
            assembly=JobState.succeeded.value,
        )
    discard_parts(job_id)
    return result


def _copy_part(
    path: Path, outputs: sink.Outputs, classes: Sequence[ClassInfo]
) -> list[dict[str, Any]]:
    """Append one part's images, in their order, to the archive being assembled; returns its
    classes' selection records (``select``).

    PNG bytes and metadata lines are copied as they are; pixels are decoded only where the
    tensor files or the contact sheet need them.
    """
    with zipfile.ZipFile(path) as part:
        selected: list[dict[str, Any]] = json.loads(part.read("manifest.json")).get("select", [])
        lines = part.read("train/metadata.jsonl").decode("utf-8").splitlines()
        for line in lines:
            row = json.loads(line)
            name = row.pop("file_name")
            cls = classes[int(row.pop("label"))]
            row.pop("label_name")
            number = int(name.rsplit("_", 1)[1].removesuffix(".png"))
            png = part.read(f"train/{name}")
            image = decode_png(png) if outputs.wants_pixels(cls.index, number) else None
            keep_png = png if outputs.wants_png else None
            outputs.add(sink.Finished(cls, number, image, keep_png, row))
    return selected
