"""Load test: many concurrent clients submit and poll jobs against a real stack, on loopback.

    python bench/loadtest.py [--clients 50] [--seconds 60] [--model DIR] [--json out.json]

Starts a private Redis, one worker on the tiny model (built on the fly unless --model is
given) and the API (`python -m service`) on a free port. Each client loops: POST a one-class
job with an Idempotency-Key, poll it until it ends, sometimes list jobs. After the run it waits
for every accepted job, then counts jobs lost (accepted but never finished, or unknown) and
duplicated (more jobs in the listing than accepted submissions). Prints requests per second
and p50/p99 latency per route. Bounded in time; never leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.settings import Settings  # noqa: E402
from service.redis_server import EmbeddedRedis, free_port  # noqa: E402
from service.stack import Stack  # noqa: E402

TERMINAL = {"succeeded", "failed", "canceled"}


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        #: What the service says it spent (Server-Timing ``app``), seconds, per route.
        self.app: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.accepted: dict[str, str] = {}  # idempotency key -> job id
        self.errors: list[str] = []

    def call(
        self, client: httpx.Client, route: str, method: str, url: str, **kw: object
    ) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = client.request(method, url, **kw)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            with self.lock:
                self.errors.append(f"{route}: {exc!r}")
            return None
        elapsed = time.perf_counter() - started
        app = _app_seconds(response.headers.get("server-timing", ""))
        with self.lock:
            self.latency[route].append(elapsed)
            if app is not None:
                self.app[route].append(app)
            self.status[route][response.status_code] += 1
        return response


def _app_seconds(header: str) -> float | None:
    """The ``app`` duration of a Server-Timing header, in seconds."""
    for metric in header.split(","):
        name, _, params = metric.strip().partition(";")
        if name == "app" and params.startswith("dur="):
            return float(params.removeprefix("dur=")) / 1000
    return None


def client_loop(base: str, rec: Recorder, stop_at: float, seed: int, poll: float = 0.1) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.monotonic() < stop_at:
            key = uuid.uuid4().hex
            body = {
                "labels": [f"class {rng.randrange(10_000)}"],
                "ipc": rng.choice([1, 2, 5]),
                "image_size": 8,
                "augment": {"policy": "paper", "copies": 4},
            }
            response = rec.call(
                client,
                "POST /v1/jobs",
                "POST",
                "/v1/jobs",
                json=body,
                headers={"Idempotency-Key": key},
            )
            if response is None or response.status_code != 202:
                time.sleep(0.2)
                continue
            job_id = response.json()["id"]
            with rec.lock:
                rec.accepted[key] = job_id
            while time.monotonic() < stop_at:
                polled = rec.call(client, "GET /v1/jobs/{id}", "GET", f"/v1/jobs/{job_id}")
                if (
                    polled is not None
                    and polled.status_code == 200
                    and polled.json()["state"] in TERMINAL
                ):
                    break
                time.sleep(poll)
            if rng.random() < 0.1:
                rec.call(client, "GET /v1/jobs", "GET", "/v1/jobs", params={"limit": 20})


def start_stack(
    model: Path, work: Path, *, worker_nice: int | None = None
) -> tuple[EmbeddedRedis, Stack, str]:
    """Redis, one worker (at ``DISTILL_WORKER_NICE`` ``worker_nice``, else the default) and
    the API (``service.stack``), on the tiny model."""
    redis = EmbeddedRedis(work / "redis", persist=False).start()
    settings = Settings(
        redis_url=redis.url,
        data_dir=work / "data",
        model=str(model),
        device="cpu",
        port=free_port(),
        log_level="WARNING",
        max_queued_jobs=100_000,
        **({"worker_nice": worker_nice} if worker_nice is not None else {}),
    )
    stack = Stack(settings, logs=work / "logs", env={"HF_HUB_OFFLINE": "1"})
    stack.start_worker()
    base = stack.start_api()
    return redis, stack, base


def all_job_ids(base: str) -> list[str]:
    ids: list[str] = []
    cursor = None
    with httpx.Client(base_url=base, timeout=30) as client:
        while True:
            params: dict[str, str | int] = {"limit": 200}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/v1/jobs", params=params).json()
            ids += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if not cursor:
                return ids


def _ms(values: list[float], q: float) -> float | None:
    return round(percentile(values, q) * 1000, 2) if values else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--model", type=Path, help="pipeline dir (default: a fresh tiny model)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.1,
        help="seconds a client waits between two polls of its job (0: as fast as answered)",
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        help="the worker's DISTILL_WORKER_NICE (default: the setting's default; 0: the "
        "API's and the clients' CPU priority)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = args.model
        if model is None:
            from worker.model.tiny_model import build

            model = build(work / "tiny-model")
        redis, stack, base = start_stack(model, work, worker_nice=args.worker_nice)
        rec = Recorder()
        try:
            started = time.monotonic()
            stop_at = started + args.seconds
            threads = [
                threading.Thread(
                    target=client_loop,
                    args=(base, rec, stop_at, i, args.poll_interval),
                    daemon=True,
                )
                for i in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started

            # Every accepted job must end; then count what the service holds.
            states: dict[str, str] = {}
            deadline = time.monotonic() + 300
            with httpx.Client(base_url=base, timeout=30) as client:
                pending = set(rec.accepted.values())
                while pending and time.monotonic() < deadline:
                    for job_id in list(pending):
                        response = client.get(f"/v1/jobs/{job_id}")
                        state = (
                            response.json().get("state")
                            if response.status_code == 200
                            else "missing"
                        )
                        states[job_id] = state or "missing"
                        if state in TERMINAL or response.status_code == 404:
                            pending.discard(job_id)
                    time.sleep(0.5)
            listed = all_job_ids(base)
        finally:
            stack.close()
            redis.stop()

    accepted = set(rec.accepted.values())
    lost = sorted(j for j in accepted if states.get(j) not in TERMINAL)
    duplicated = len(listed) - len(set(listed)) + len(set(listed) - accepted)
    total_requests = sum(len(v) for v in rec.latency.values())
    figures = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": total_requests,
        "requests_per_second": round(total_requests / elapsed, 1),
        "transport_errors": len(rec.errors),
        "jobs_accepted": len(accepted),
        "jobs_succeeded": sum(1 for j in accepted if states.get(j) == "succeeded"),
        "jobs_lost": len(lost),
        "jobs_duplicated": duplicated,
        "routes": {
            route: {
                "count": len(values),
                "p50_ms": round(percentile(values, 0.5) * 1000, 1),
                "p99_ms": round(percentile(values, 0.99) * 1000, 1),
                "mean_ms": round(statistics.fmean(values) * 1000, 1),
                # Inside the application; the rest of a request's time is the network, the
                # server's accept queue and event loop, and the client.
                "app_p50_ms": _ms(rec.app[route], 0.5),
                "app_p99_ms": _ms(rec.app[route], 0.99),
                "status": dict(rec.status[route]),
            }
            for route, values in sorted(rec.latency.items())
        },
    }
    print(
        f"{args.clients} clients for {figures['seconds']} s: {total_requests} requests, "
        f"{figures['requests_per_second']} req/s, {len(rec.errors)} transport errors"
    )
    print(
        f"{'route':<22}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}{'app p50':>10}{'app p99':>10}"
        "  statuses"
    )
    for route, row in figures["routes"].items():  # type: ignore[union-attr]
        print(
            f"{route:<22}{row['count']:>8}{row['p50_ms']:>10}{row['p99_ms']:>10}"
            f"{row['app_p50_ms']!s:>10}{row['app_p99_ms']!s:>10}  {row['status']}"
        )
    print(
        f"jobs accepted {figures['jobs_accepted']}, succeeded {figures['jobs_succeeded']}, "
        f"lost {figures['jobs_lost']}, duplicated {figures['jobs_duplicated']}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if not lost and not duplicated else 1


if __name__ == "__main__":
    raise SystemExit(main())
