"""The worker process: load the model once, advertise it, then run jobs one at a time.

``python -m worker`` (or ``distill-worker``). One process per GPU.

It is an ``rq.SimpleWorker``: jobs run in this process, next to the warm pipeline (a forking
worker would reload the model per job and cannot use CUDA after fork). SimpleWorker does not
heartbeat while a job runs, so a thread here does: it refreshes the worker's RQ key, the
running job's entry in RQ's started-job registry (with a short TTL, so a killed worker's job
is seen as abandoned within ``DISTILL_HEARTBEAT_TTL`` seconds), and our status hash that
``/readyz`` reads.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.worker import WorkerStatus

from core import logs, maintenance, models, workers
from core.oversample import CLIP_PART, SCORERS
from core.settings import ConfigError, Settings, settings_or_exit
from core.soft_labels import TEACHER_PART_PREFIX
from worker import runtime
from worker.model.quiet import quiet_libraries

if TYPE_CHECKING:
    from worker.gpus import GpuClaim
    from worker.model.classifier import Classifier
    from worker.model.clip import ClipModel
    from worker.model.generator import Generator

log = logging.getLogger("worker")

LOAD_HINT = (
    "set DISTILL_MODEL to a local directory holding a diffusers StableDiffusionXLPipeline "
    "(a copy of stabilityai/sdxl-turbo, or `python -m worker.model.tiny_model DIR` for a smoke "
    "test)"
)

#: The longest an idle worker blocks on Redis before it looks at its stop flag again.
STOP_POLL_SECONDS = 5
#: How long the thread that listens for RQ's worker commands waits between two looks at its
#: own stop flag (RQ's own: 60 s, which a shutdown then waits out).
PUBSUB_POLL_SECONDS = 1.0


class DistillWorker(SimpleWorker):
    """A SimpleWorker whose running jobs expire from RQ's registry unless it keeps beating."""

    heartbeat_ttl: int = 60
    #: Set once RQ registered the worker: a beat before that would create its key, and RQ
    #: would then refuse to start, taking it for another live worker of the same name.
    born: bool = False

    def register_birth(self) -> None:
        super().register_birth()  # type: ignore[no-untyped-call]
        self.born = True

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl

    @property
    def dequeue_timeout(self) -> int:
        return min(super().dequeue_timeout, STOP_POLL_SECONDS)

    def request_stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: the running job stops after its batch and goes back to the queue.

        An idle RQ worker stops by raising ``StopRequested`` from the signal handler, into
        whatever code runs at that moment; code that catches every exception there (a log
        handler's ``emit`` does) swallows it and the worker would go on listening. The flag
        set first outlives that: ``heartbeat``, which RQ calls before every wait on the
        queue (at most ``STOP_POLL_SECONDS`` apart), raises it again.
        """
        runtime.request_stop()
        self._stop_requested = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def subscribe(self) -> None:
        """RQ's ``subscribe`` with a short poll: at shutdown, RQ stops this thread and redis-py
        (8.2 and later) joins it with no time limit, while it waits out its poll, so a worker
        would take up to a minute to exit after "stopping on request"."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=PUBSUB_POLL_SECONDS,
            daemon=True,
            exception_handler=self._pubsub_exception_handler,
        )

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        idle = self.get_state() != WorkerStatus.BUSY
        if self._stop_requested and pipeline is None and idle:
            raise StopRequested()
        super().heartbeat(timeout, pipeline)

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        if runtime.take_interrupted(job.id):
            # It "finished" early for the shutdown: undo that and put it first in line.
            queue.finished_job_registry.remove(job)
            queue.enqueue_job(job, at_front=True)
            self.log.info("job %s put back at the front of the queue", job.id)

    def running_job_id(self) -> str | None:
        """The job this process is running now, from its own executions only.

        RQ's ``get_current_job_id`` falls back to the execution index in Redis when the
        process has none, and keeps the first answer it reads there: read from the beat
        thread in the moment a finished execution is gone from the process but not yet from
        Redis, it would report that job for as long as the worker stays idle.
        """
        running = list(self.executions.values())
        return running[0].job_id if running else None

    def beat_running_jobs(self) -> None:
        """Extend this worker's key and its running executions by one heartbeat TTL."""
        if not self.born:
            return
        ttl = self.heartbeat_ttl
        with self.connection.pipeline() as pipe:
            self.heartbeat(ttl, pipeline=pipe)
            for execution in list(self.executions.values()):
                registry = StartedJobRegistry(name=self.queues[0].name, connection=self.connection)
                execution.heartbeat(registry, ttl, pipe)
            pipe.execute()


class StatusBeacon:
    """Publishes the worker's status in the registry (``core.workers``) every few seconds,
    and runs the maintenance loop (``core.maintenance``) once the worker takes jobs."""

    def __init__(self, redis: Redis, name: str, settings: Settings) -> None:
        self.redis = redis
        self.name = name
        self.settings = settings
        self.fields: dict[str, Any] = {
            "name": name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": workers.LOADING,
            "model": settings.model,
            "started_at": time.time(),
        }
        self.worker: DistillWorker | None = None
        #: Extra live fields (GPU memory, say), read at every beat.
        self.probe: Callable[[], dict[str, Any]] = dict
        self.claim: GpuClaim | None = None
        self.maintenance = maintenance.Loop(redis, settings, scratch=settings.data_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            workers.unregister(self.redis, self.name, queue=self.settings.queue_name)
        except Exception:
            log.debug("could not remove worker status", exc_info=True)

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
        self.publish()

    def publish(self) -> None:
        live = {**self.fields, **self.probe()}
        if self.worker is not None:
            live["current_job"] = self.worker.running_job_id() or ""
        workers.publish(
            self.redis,
            self.name,
            queue=self.settings.queue_name,
            fields=live,
            ttl=self.settings.heartbeat_ttl,
        )

    def _beat(self) -> None:
        try:
            self.publish()
            if self.claim is not None:
                self.claim.refresh()
            if self.worker is not None:
                self.worker.beat_running_jobs()
        except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the thread
            log.warning("heartbeat failed (%s); retrying", exc)

    def _run(self) -> None:
        next_round = time.monotonic()
        while not self._stop.wait(self.settings.heartbeat_interval):
            self._beat()
            if self.worker is not None and time.monotonic() >= next_round:
                self.maintenance.tick()
                next_round = time.monotonic() + maintenance.INTERVAL_S


def _batch_size(generator: Generator, settings: Settings) -> int:
    """``DISTILL_BATCH_SIZE``, or on a GPU (``DISTILL_AUTO_BATCH``) the fastest batch from it
    up that fits in memory."""
    if not settings.auto_batch or generator.device.type != "cuda":
        return settings.batch_size
    from worker.model import compiling

    batch, tried = compiling.tune_batch(generator, settings.batch_size)
    log.info(
        "batch size %d (tried %s)",
        batch,
        ", ".join(f"{b}: {r if r is not None else 'out of memory'} img/s" for b, r in tried),
        extra={"batch": batch},
    )
    return batch


def main(argv: list[str] | None = None) -> int:
    """Run one worker until SIGINT/SIGTERM; exit 2 when the model cannot be loaded."""
    settings = _scoped_settings()
    if settings is None:
        return 2
    logs.configure(settings.log_level)
    _lower_priority(settings.worker_nice)
    quiet_libraries()
    name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(settings.redis_url)
    beacon = StatusBeacon(redis, name, settings)
    beacon.start()
    try:
        device = _device(settings, redis, name, beacon)
        generator = _load(settings, device)
        if generator is None:
            return 2
        clip = _load_clip(settings, generator)
        teachers = _load_teachers(settings, generator)
        batch = _warm(generator, settings, beacon)
        _install_runtime(settings, name, generator, batch, clip=clip, teachers=teachers)
        worker = _make_worker(settings, redis, name, beacon, generator)
        return _serve(worker, settings, beacon, generator, batch)
    finally:
        beacon.stop()
        if beacon.claim is not None:
            beacon.claim.release()


def _lower_priority(nice: int) -> None:
    """Run at niceness ``nice`` at least (``DISTILL_WORKER_NICE``), before any thread or
    process starts, so that every one of them inherits it: where a worker shares its CPUs
    with the API and Redis (``make run``, one host), a status read waits for no batch."""
    if not nice or not hasattr(os, "setpriority"):
        return
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def _scoped_settings() -> Settings | None:
    """The worker's settings scoped to the model it serves; None (said on stderr) when the
    model configuration is wrong."""
    settings = settings_or_exit("distill worker")
    try:
        # The model this worker serves; from here on its queue is that model's (core.models).
        return models.scoped(settings, models.own(settings))
    except ConfigError as exc:
        print(f"distill worker: {exc}", file=sys.stderr, flush=True)
        return None


def _device(settings: Settings, redis: Redis, name: str, beacon: StatusBeacon) -> str | None:
    """``DISTILL_DEVICE``, else a free GPU claimed through Redis (held on ``beacon``, which
    refreshes it at every beat), else None: the loader's default."""
    from worker.gpus import claim_free_gpu

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.device is not None:
        return settings.device
    claim = claim_free_gpu(redis, owner=name, ttl=settings.heartbeat_ttl)
    beacon.claim = claim
    return claim.device if claim else None


def _load(settings: Settings, device: str | None) -> Generator | None:
    """The warm pipeline; None (said on stderr, with the fix) when the model cannot load."""
    from worker.model import loading

    started = time.perf_counter()
    try:
        options = loading.LoadOptions.from_settings(settings, device=device)
        generator = loading.load(settings.model, options)
    except loading.ModelLoadError as exc:
        print(f"distill worker: {exc}. To fix: {LOAD_HINT}.", file=sys.stderr, flush=True)
        return None
    log.info(
        "loaded %s on %s in %.1f s",
        settings.model,
        generator.device,
        time.perf_counter() - started,
    )
    return generator


def _load_clip(settings: Settings, generator: Generator) -> ClipModel | None:
    """The optional CLIP scorer, on the model's device; without it, its reason joins the
    generator's ``unavailable`` parts (published in the worker's status)."""
    from worker.model import clip, loading

    device = generator.device
    loaded, why = clip.load(settings, device=device, dtype=loading.pick_dtype(None, device))
    if loaded is None:
        generator.unavailable[CLIP_PART] = why or "not loaded"
    else:
        log.info("loaded the CLIP scorer %s", loaded.source)
    return loaded


def _load_teachers(settings: Settings, generator: Generator) -> dict[str, Classifier]:
    """The optional pretrained soft-label teachers, on the model's device; each that does not
    load joins the generator's ``unavailable`` parts as ``teacher <name>``."""
    from worker.model import classifier

    loaded, failed = classifier.load_all(settings, device=generator.device)
    for source, why in failed.items():
        generator.unavailable[f"{TEACHER_PART_PREFIX}{source}"] = why
    for source, teacher in loaded.items():
        log.info("loaded the teacher %s (%d classes)", source, len(teacher.labels))
    return loaded


def _warm(generator: Generator, settings: Settings, beacon: StatusBeacon) -> int:
    """Pick the batch size and compile for it (``DISTILL_COMPILE``); returns the batch size."""
    from worker.model import compiling

    batch = _batch_size(generator, settings)
    if settings.compile != "off":
        beacon.update(state="compiling")
        compiling.enable(generator, settings.compile, batch_size=batch)
    return batch


def _install_runtime(
    settings: Settings,
    name: str,
    generator: Generator,
    batch: int,
    *,
    clip: ClipModel | None,
    teachers: dict[str, Classifier],
) -> None:
    """Make the worker's warm state (``worker.runtime``) that every job uses."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Import the job's code and start the post-processing pool now, not in the first job.
    importlib.import_module("worker.tasks")
    from worker.postprocess import make_pool

    pool = make_pool(settings.postprocess_mode, settings.postprocess_pool_size)
    runtime.install(
        runtime.Runtime(
            generator=generator,
            settings=settings,
            worker_name=name,
            pool=pool,
            batch_size=batch,
            clip=clip,
            teachers=teachers,
        )
    )


def _make_worker(
    settings: Settings, redis: Redis, name: str, beacon: StatusBeacon, generator: Generator
) -> DistillWorker:
    """The RQ worker on the model's queue, watched by ``beacon``, its signal handlers set."""
    queue = Queue(settings.queue_name, connection=redis)
    # Maintenance also reaps jobs of dead workers; run it about once per heartbeat TTL.
    worker = DistillWorker(
        [queue],
        connection=redis,
        name=name,
        maintenance_interval=max(settings.heartbeat_ttl, 10),
        default_result_ttl=settings.result_ttl,
    )
    worker.heartbeat_ttl = settings.heartbeat_ttl
    beacon.worker = worker
    beacon.probe = lambda: {
        "gpu_memory_bytes": generator.gpu_memory_bytes(),
        "images_per_second": runtime.last_rate(),
    }
    # Handlers first: a SIGTERM right after "ready" must get the clean shutdown path.
    worker._install_signal_handlers()  # type: ignore[no-untyped-call]
    return worker


def _serve(
    worker: DistillWorker,
    settings: Settings,
    beacon: StatusBeacon,
    generator: Generator,
    batch: int,
) -> int:
    """Say "ready" and take jobs until stopped; 0, or 1 when Redis is gone for good."""
    beacon.update(
        state=workers.READY,
        batch_size=batch,
        postprocess_workers=settings.postprocess_pool_size,
        unavailable=generator.unavailable,
        scorers=",".join(SCORERS if CLIP_PART not in generator.unavailable else ("reference",)),
        teachers={
            source: workers.publish_teacher_labels(worker.connection, teacher.labels)
            for source, teacher in runtime.current().teachers.items()
        },
        **generator.describe(),
    )
    try:
        worker.work(with_scheduler=False, logging_level=settings.log_level)
    except StopRequested:
        # Stopped while RQ was still setting up, outside the loop that catches it (and
        # tears down): take the worker out of RQ's registry as that loop would.
        worker.teardown()  # type: ignore[no-untyped-call]
        log.info("worker stopped before taking jobs")
    except RedisConnectionError as exc:
        # Redis went away for good while shutting down (or never came back).
        log.error("worker stopped: Redis is unreachable (%s)", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
