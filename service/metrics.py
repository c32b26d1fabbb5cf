"""``GET /metrics``: Prometheus text built on each scrape from what Redis holds.

Workers write their numbers to Redis (``core.stats`` counters and histograms, their status
hashes), so one scrape of the API covers every worker on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

from core import keys, models, stats, workers
from core.settings import Settings
from core.states import OUTCOMES

_OUTCOMES = tuple(state.value for state in OUTCOMES)


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class DistillCollector(Collector):
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        counters = _decode(self.redis.hgetall(stats.COUNTERS))  # type: ignore[arg-type]

        def count(name: str) -> float:
            return float(counters.get(name, 0))

        served = models.catalogue(self.settings)
        depth = GaugeMetricFamily(
            "distill_model_queue_depth", "Entries waiting in one model's queue", labels=["model"]
        )
        waiting = running = 0
        for alias, entry in served.items():
            queue = Queue(entry.queue, connection=self.redis)
            entries = queue.count
            depth.add_metric([alias], entries)
            waiting += entries
            running += StartedJobRegistry(queue=queue).count
        jobs = GaugeMetricFamily("distill_jobs", "Jobs now queued or running", labels=["state"])
        jobs.add_metric(["queued"], waiting)
        jobs.add_metric(["running"], running)
        yield jobs
        yield GaugeMetricFamily(
            "distill_queue_depth", "Jobs waiting in the queue (all models)", value=waiting
        )
        yield depth

        submitted = CounterMetricFamily("distill_jobs_submitted", "Jobs accepted by the API")
        submitted.add_metric([], count("jobs_submitted"))
        yield submitted
        finished = CounterMetricFamily(
            "distill_jobs_finished", "Jobs that reached a terminal state", labels=["state"]
        )
        for outcome in _OUTCOMES:
            finished.add_metric([outcome], count(f"jobs_{outcome}"))
        yield finished
        for name, text in (
            ("images_generated", "Images sampled from the model"),
            ("images_written", "Images (generated and augmented) written to archives"),
        ):
            family = CounterMetricFamily(f"distill_{name}", text)
            family.add_metric([], count(name))
            yield family

        for name, text in (
            ("job_duration", "Seconds from a job's start to its end"),
            ("queue_wait", "Seconds a job waited in the queue"),
        ):
            yield self._histogram(name, text)

        last = _decode(self.redis.hgetall(stats.LAST_JOB))  # type: ignore[arg-type]
        if last:
            yield GaugeMetricFamily(
                "distill_last_job_images_per_second",
                "Images written per second by the most recently finished job",
                value=float(last["images_per_second"]),
            )
        yield from self._workers()

    def _histogram(self, name: str, text: str) -> HistogramMetricFamily:
        raw = _decode(self.redis.hgetall(keys.histogram(name)))  # type: ignore[arg-type]
        bounds = stats.BUCKETS[name]
        buckets: list[tuple[str, float]] = []
        running_total = 0.0
        for index, bound in enumerate((*bounds, float("inf"))):
            running_total += float(raw.get(f"b{index}", 0))
            label = "+Inf" if bound == float("inf") else repr(float(bound))
            buckets.append((label, running_total))
        family = HistogramMetricFamily(f"distill_{name}_seconds", text)
        family.add_metric([], buckets, sum_value=float(raw.get("sum", 0.0)))
        return family

    def _workers(self) -> Iterator[Metric]:
        alive = ready = 0
        memory = GaugeMetricFamily(
            "distill_worker_gpu_memory_bytes",
            "GPU memory allocated by a worker's tensors",
            labels=["worker", "device"],
        )
        throughput = GaugeMetricFamily(
            "distill_worker_images_per_second",
            "Output images per second of a worker's last job or shard",
            labels=["worker", "device"],
        )
        per_model = GaugeMetricFamily(
            "distill_model_workers_ready", "Workers with one model loaded", labels=["model"]
        )
        beating = []
        for alias, entry in models.catalogue(self.settings).items():
            live = workers.live(self.redis, entry.queue, heartbeat_ttl=self.settings.heartbeat_ttl)
            per_model.add_metric([alias], sum(w.ready for w in live))
            beating += live
        for worker in beating:
            alive += 1
            ready += worker.ready
            labels = [worker.name, worker.device or ""]
            if worker.gpu_memory_bytes:
                memory.add_metric(labels, float(worker.gpu_memory_bytes))
            if worker.images_per_second is not None:
                throughput.add_metric(labels, worker.images_per_second)
        yield GaugeMetricFamily("distill_workers_alive", "Workers beating", value=alive)
        yield GaugeMetricFamily(
            "distill_workers_ready", "Workers with their model loaded", value=ready
        )
        yield per_model
        yield memory
        yield throughput


def registry_for(redis: Redis, settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DistillCollector(redis, settings))
    return registry
