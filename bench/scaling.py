"""Scaling benchmark: the same sharded job on the whole stack with 1 and 2 CPU workers.

    python bench/scaling.py [--workers 1 2] [--classes 100] [--ipc 50] [--size 32]
                            [--shard-images 500] [--batch-size 8] [--repeat K] [--seed 0]
                            [--policy paper] [--model DIR] [--unsharded-baseline]
                            [--json [FILE]]

For each worker count it starts what ``make run`` starts (``python -m service.launcher``:
embedded Redis, ``DISTILL_WORKERS`` workers, the webhook sender, the API) in its own data
directory on a free port, with one torch thread per worker whatever the count, so that the
comparison is per thread. Once ``/readyz`` lists that many ready workers it submits one
fixed-ipc job (``--classes`` x ``--ipc`` output images) ``--repeat`` times, waiting for each,
then stops the launcher with SIGTERM and waits for it before the next worker count.

A fixed-ipc job with more than ``DISTILL_SHARD_IMAGES`` output images is split into shards
that workers run in parallel, then assembled into one archive. Per run it records the wall
time from submit to succeeded (client side), the job's run time on the workers
(``timings.seconds_total``), the archive's SHA-256, the shards with the workers that ran
them and their start and finish times (when the job view lists them), and the share of the
host's CPUs that other processes used meanwhile (a run with a high share is noise). The
table ends with the speedup of each worker count over the first (medians of wall time) and
whether every archive has the same SHA-256: the dataset must not depend on how many workers
made it.

Where the job view has per-shard times, the per-shard overhead is estimated: on one worker,
(job time - sum of shard times) / shards; on more, the time outside the shards' span and the
workers' busy fraction within it. ``--unsharded-baseline`` adds a one-worker run with
sharding off (``DISTILL_SHARD_IMAGES`` at its maximum), whose wall time gives the overhead of
sharding from wall times alone. Without ``--model`` the tiny random model is built first (CPU
figures only). ``--json`` writes the figures as JSON to FILE, or to stdout without FILE (the
table then goes to stderr). Figures are measurements, never pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import Client  # noqa: E402
from core.settings import Settings  # noqa: E402
from service import stack  # noqa: E402
from service.redis_server import free_port  # noqa: E402

UNSHARDED = 100_000  # DISTILL_SHARD_IMAGES's maximum: no fixed-ipc job is split
READY_TIMEOUT = 300.0
STOP_TIMEOUT = 90.0  # the launcher gives its children 30 s, then Redis 10 s


class StackError(RuntimeError):
    """The stack did not start, or a job did not succeed; carries the launcher's log tail."""


class Stack:
    """``python -m service.launcher`` in its own session, data directory and port."""

    def __init__(
        self, args: argparse.Namespace, *, workers: int, shard_images: int, work: Path
    ) -> None:
        self.workers = workers
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "launcher.log"
        # Inherited DISTILL_* variables (a Redis URL, API keys...) would change what is
        # measured: the launcher gets exactly these settings (and starts its own Redis).
        self.settings = Settings(
            workers=workers,
            torch_threads=1,
            model=str(args.model),
            device="cpu",
            shard_images=shard_images,
            batch_size=args.batch_size,
            data_dir=work / "data",
            port=self.port,
            log_level=args.log_level,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        # Its own session: its process group is signalled as one below.
        self.proc = stack.spawn(
            "service.launcher",
            self.settings,
            log=self.log,
            env={"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"},
            new_session=True,
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> list[dict[str, Any]]:
        """Wait until ``/readyz`` lists ``workers`` ready workers; return them."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while True:
            if self.proc.poll() is not None:
                raise StackError(
                    f"launcher exited with status {self.proc.returncode}\n{self.log_tail()}"
                )
            try:
                body = httpx.get(f"{self.url}/readyz", timeout=2).json()
                seen = [w for w in body.get("workers", []) if w.get("state") == "ready"]
                if len(seen) >= self.workers:
                    return seen
            except (httpx.TransportError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise StackError(
                    f"{len(seen)} of {self.workers} workers ready after {timeout:.0f} s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self) -> int | None:
        """SIGTERM to the launcher's process group, then wait; its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            children = _children(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # The launcher's children live in sessions of their own: end them by id.
                for pid in children:
                    _kill(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no launcher log)"

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _processes() -> dict[int, tuple[int, int]]:
    """Every process's parent and CPU time in clock ticks (from /proc; empty elsewhere)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
            table[int(entry.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    return [child for child, (parent, _) in _processes().items() if parent == pid]


def _tree_ticks(roots: list[int]) -> int:
    """CPU ticks used so far by ``roots`` and all their descendants."""
    table = _processes()
    kids: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        kids.setdefault(parent, []).append(pid)
    total, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        todo.extend(kids.get(pid, []))
    return total


def _host_busy_ticks() -> int | None:
    """CPU ticks the whole host has spent busy (all CPUs), or None without /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    return user + nice + system + irq + softirq + steal


class OtherLoad:
    """Share of the host's CPUs used by processes outside the stack and this one, meanwhile."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.host = _host_busy_ticks()
        self.ours = _tree_ticks(roots)
        self.started = time.monotonic()

    def fraction(self) -> float | None:
        host = _host_busy_ticks()
        if host is None or self.host is None:
            return None
        other = (host - self.host) - (_tree_ticks(self.roots) - self.ours)
        ticks = os.sysconf("SC_CLK_TCK") * (time.monotonic() - self.started)
        return max(other, 0) / (ticks * (os.cpu_count() or 1))


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _when(value: Any) -> float | None:
    """A time from the job view (ISO 8601 text or Unix seconds) as Unix seconds."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.timestamp()
    return None


def _short(worker: Any) -> str:
    """A worker's name without its host (``host.pid.suffix`` -> ``pid.suffix``)."""
    text = str(worker)
    parts = text.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 3 else text


def shard_figures(job: dict[str, Any]) -> dict[str, Any] | None:
    """The shards as the job view lists them, with durations where it gives times."""
    shards = job.get("shards")
    if not isinstance(shards, list):
        return None
    rows = []
    for index, shard in enumerate(shards):
        shard = shard if isinstance(shard, dict) else {}
        started, finished = _when(shard.get("started_at")), _when(shard.get("finished_at"))
        timings = shard.get("timings")
        timings = timings if isinstance(timings, dict) else {}
        seconds = finished - started if started is not None and finished is not None else None
        if seconds is None and timings.get("seconds_total") is not None:
            seconds = float(timings["seconds_total"])
        rows.append(
            {
                "index": shard.get("index", index),
                "state": shard.get("state"),
                "worker": shard.get("worker"),
                "started_at": started,
                "finished_at": finished,
                "seconds": seconds,
            }
        )
    workers = sorted({str(r["worker"]) for r in rows if r["worker"]})
    timed = [r for r in rows if r["seconds"] is not None]
    out: dict[str, Any] = {"count": len(rows), "workers": workers, "shards": rows}
    if rows and len(timed) == len(rows):
        out["seconds_sum"] = sum(r["seconds"] for r in timed)
        out["seconds_max"] = max(r["seconds"] for r in timed)
    starts = [r["started_at"] for r in rows if r["started_at"] is not None]
    ends = [r["finished_at"] for r in rows if r["finished_at"] is not None]
    if rows and len(starts) == len(ends) == len(rows):
        out["first_started_at"] = min(starts)
        out["last_finished_at"] = max(ends)
        out["span_seconds"] = max(ends) - min(starts)
    return out


def assembly_seconds(
    job: dict[str, Any], shards: dict[str, Any] | None
) -> tuple[float | None, str]:
    """The assembly step's time: from ``timings`` when exposed, else job end - last shard end."""
    timings = job.get("timings") or {}
    for key, value in timings.items():
        if "assembl" in key and isinstance(value, int | float):
            return float(value), f"timings.{key}"
    finished = _when(job.get("finished_at"))
    if shards and shards.get("last_finished_at") is not None and finished is not None:
        return finished - shards["last_finished_at"], "job finished_at - last shard finished_at"
    return None, ""


def job_seconds(job: dict[str, Any]) -> float | None:
    """The job's own run time: ``timings.seconds_total``, else started-to-finished."""
    timings = job.get("timings") or {}
    if isinstance(timings.get("seconds_total"), int | float):
        return float(timings["seconds_total"])
    started, finished = _when(job.get("started_at")), _when(job.get("finished_at"))
    if started is not None and finished is not None:
        return finished - started
    return None


def run_job(
    client: Client, args: argparse.Namespace, labels: list[str], *, roots: list[int]
) -> dict[str, Any]:
    """Submit the job, wait until it ends; its figures (nothing is downloaded).

    ``roots``: the stack's and this process's ids, so that CPU used by anything else on the
    host while the job runs can be told apart.
    """
    other = OtherLoad(roots)
    started = time.perf_counter()
    # The server holds the answer until the job ends (up to 60 s, checked every 20 ms): finer
    # than polling and nearly free; longer jobs are then polled.
    job: dict[str, Any] = dict(
        client.submit(
            labels=labels,
            ipc=args.ipc,
            image_size=args.size,
            seed=args.seed,
            policy=args.policy,
            wait=60,
        )
    )
    if job["state"] not in ("succeeded", "failed", "canceled"):
        job = dict(client.wait(job["id"], timeout=args.job_timeout, poll_interval=args.poll))
    wall = time.perf_counter() - started
    if job["state"] != "succeeded":
        raise StackError(f"job {job['id']} ended {job['state']}: {job.get('error')}")
    # A view can say succeeded a moment before the archive, counts and times are on it: the
    # wall time stands, the figures come from the complete view.
    other_cpu = other.fraction()
    incomplete = not job.get("archive")
    deadline = time.monotonic() + 10
    while not job.get("archive") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = dict(client.get(job["id"]))
    created, finished = _when(job.get("created_at")), _when(job.get("finished_at"))
    shards = shard_figures(job)
    assembly, assembly_source = assembly_seconds(job, shards)
    images = int(job["progress"]["written"])
    return {
        "job_id": job["id"],
        "wall_seconds": wall,
        "server_seconds": finished - created if created and finished else None,
        "job_seconds": job_seconds(job),
        "images": images,
        "images_per_second": images / wall,
        "sha256": (job.get("archive") or {}).get("sha256"),
        "size_bytes": (job.get("archive") or {}).get("size_bytes"),
        "worker": job.get("worker"),
        "timings": job.get("timings"),
        "shards": shards,
        "assembly_seconds": assembly,
        "assembly_source": assembly_source,
        "job_fields": sorted(job),
        "incomplete_success_view": incomplete,
        "other_cpu": None if other_cpu is None else round(other_cpu, 3),
    }


def run_config(
    args: argparse.Namespace,
    labels: list[str],
    *,
    workers: int,
    shard_images: int,
    work: Path,
    say: TextIO,
) -> dict[str, Any]:
    """Start the stack with ``workers`` workers, run the job ``repeat`` times, stop it."""
    stack = Stack(args, workers=workers, shard_images=shard_images, work=work)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with stack:
        ready = stack.wait_ready()
        ready_seconds = time.perf_counter() - started
        print(
            f"{workers} worker(s), shard images {shard_images}: "
            f"{len(ready)} ready in {ready_seconds:.1f} s on {stack.url}",
            file=say,
            flush=True,
        )
        roots = [os.getpid(), *([stack.proc.pid] if stack.proc else [])]
        with Client(stack.url, timeout=30) as client:
            for k in range(args.repeat):
                try:
                    run = run_job(client, args, labels, roots=roots)
                except StackError as exc:
                    raise StackError(f"{exc}\n{stack.log_tail()}") from None
                runs.append(run)
                shards = run["shards"]
                print(
                    f"  run {k + 1}/{args.repeat}: {run['wall_seconds']:.2f} s, "
                    f"{run['images_per_second']:.0f} img/s, "
                    f"shards {shards['count'] if shards else '-'}, "
                    f"sha256 {str(run['sha256'])[:12]}",
                    file=say,
                    flush=True,
                )
    status = stack.proc.returncode if stack.proc else None
    walls = [r["wall_seconds"] for r in runs]
    return {
        "workers": workers,
        "shard_images": shard_images,
        "ready_seconds": round(ready_seconds, 2),
        "ready_workers": [w.get("name") for w in ready],
        "launcher_exit": status,
        "runs": runs,
        "median_wall_seconds": statistics.median(walls),
        "median_images_per_second": statistics.median(r["images_per_second"] for r in runs),
    }


def overhead(config: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
    """Lines estimating what sharding costs, from one configuration's median run."""
    runs = sorted(config["runs"], key=lambda r: r["wall_seconds"])
    run = runs[len(runs) // 2]
    lines: list[str] = []
    shards = run["shards"]
    total = run["job_seconds"]
    head = f"{config['workers']} worker(s)"
    if shards and shards.get("seconds_sum") is not None and total:
        n = shards["count"]
        lines.append(
            f"{head}: {n} shards, sum {shards['seconds_sum']:.2f} s, "
            f"longest {shards['seconds_max']:.2f} s, job {total:.2f} s"
        )
        if "span_seconds" in shards:
            span = shards["span_seconds"]
            busy = shards["seconds_sum"] / (config["workers"] * span) if span > 0 else None
            lines.append(
                f"  shards' span {span:.2f} s; outside it {total - span:.2f} s"
                + (f"; workers busy {busy:.0%} of the span" if busy is not None else "")
            )
        if config["workers"] == 1 and n:
            outside = total - shards["seconds_sum"]
            lines.append(
                f"  per-shard overhead (job - sum of shards) / shards: {outside / n:.3f} s"
            )
            if "span_seconds" in shards and n > 1:
                gaps = shards["span_seconds"] - shards["seconds_sum"]
                lines.append(
                    f"  between shards (span - sum): {gaps:.2f} s, "
                    f"{gaps / (n - 1):.3f} s per hand-off"
                )
    elif shards:
        lines.append(f"{head}: {shards['count']} shards, but no per-shard times in the job view")
    else:
        lines.append(f"{head}: the job view has no shard list (ran as one piece)")
    if run["assembly_seconds"] is not None:
        lines.append(f"  assembly {run['assembly_seconds']:.2f} s ({run['assembly_source']})")
    known = ("seconds_total", "seconds_sampling")
    extra = {k: v for k, v in (run["timings"] or {}).items() if k not in known and v is not None}
    if extra:
        lines.append("  timings: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    if baseline is not None and config["workers"] == 1 and shards and shards["count"] > 1:
        delta = config["median_wall_seconds"] - baseline["median_wall_seconds"]
        lines.append(
            f"  vs unsharded one-piece run: {delta:+.2f} s wall, "
            f"{delta / shards['count']:+.3f} s per shard"
        )
    return lines


def report(result: dict[str, Any], out: TextIO) -> None:
    args = result["args"]
    configs: list[dict[str, Any]] = result["configs"]
    baseline: dict[str, Any] | None = result.get("baseline")
    print(
        f"\n{args['classes']} classes x IPC {args['ipc']} = {args['classes'] * args['ipc']} "
        f"images at {args['size']} px, policy {args['policy']}, seed {args['seed']}, "
        f"batch {args['batch_size']}, shard images {args['shard_images']}, "
        f"1 torch thread per worker, {result['cpus']} cpus ({result['cpu']}), "
        f"model {args['model']}",
        file=out,
    )
    header = (
        f"{'workers':>7} {'run':>4} {'wall s':>8} {'job s':>7} {'out img/s':>10} "
        f"{'shards':>6}  {'workers that ran shards':<30} {'sha256':<12} {'other':>5}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = [*configs, *([baseline] if baseline else [])]
    for config in rows:
        label = f"{config['workers']}" + ("*" if config is baseline else "")
        for k, run in enumerate(config["runs"], 1):
            shards = run["shards"]
            if shards:
                ran = shards["workers"]
                who = f"{len(ran)}: " + ", ".join(_short(w) for w in ran)
                count = str(shards["count"])
            else:
                who = f"- (whole job: {_short(run['worker'])})"
                count = "-"
            job_s = f"{run['job_seconds']:.2f}" if run["job_seconds"] is not None else "-"
            other = f"{run['other_cpu']:.0%}" if run["other_cpu"] is not None else "-"
            print(
                f"{label:>7} {k:>4} {run['wall_seconds']:>8.2f} {job_s:>7} "
                f"{run['images_per_second']:>10.1f} {count:>6}  {who[:30]:<30} "
                f"{str(run['sha256'])[:12]:<12} {other:>5}"
                + (" !" if run["incomplete_success_view"] else ""),
                file=out,
            )
        if len(config["runs"]) > 1:
            print(
                f"{label:>7} {'med':>4} {config['median_wall_seconds']:>8.2f} {'':>7} "
                f"{config['median_images_per_second']:>10.1f}",
                file=out,
            )
    if baseline:
        print("* one worker with sharding off (unsharded baseline)", file=out)
    print(
        "other: CPU share used by other processes on the host during the job (noise)",
        file=out,
    )
    if any(r["incomplete_success_view"] for c in rows for r in c["runs"]):
        print("! the first succeeded view had no archive yet (figures from a later view)", file=out)
    print(file=out)
    for name, value in result["speedups"].items():
        print(f"speedup {name}: {value:.2f}x (median wall)", file=out)
    shas = result["sha256"]
    verdict = "equal" if result["sha256_equal"] else "DIFFERENT"
    print(
        f"archive sha256 across worker counts: {verdict} "
        f"({', '.join(s[:12] for s in shas) or 'none'})",
        file=out,
    )
    if baseline:
        same = {r["sha256"] for r in baseline["runs"]} == set(shas)
        print(f"unsharded baseline archive: {'same' if same else 'different'}", file=out)
    print("\nper-shard overhead:", file=out)
    for config in configs:
        for line in overhead(config, baseline):
            print(line, file=out)
    missing = result["missing"]
    if missing:
        print("not in the job view: " + "; ".join(missing), file=out)


def missing_fields(configs: list[dict[str, Any]], images: int) -> list[str]:
    """What the overhead estimate would use but the job views of a job that should have been
    sharded (more ``images`` than ``DISTILL_SHARD_IMAGES``) did not carry."""
    runs = [r for c in configs if images > c["shard_images"] for r in c["runs"]]
    missing: list[str] = []
    if not runs:
        return missing
    if not any(r["shards"] for r in runs):
        missing.append("shards")
    else:
        rows = [s for r in runs if r["shards"] for s in r["shards"]["shards"]]
        for key in ("worker", "started_at", "finished_at"):
            if any(s[key] is None for s in rows):
                missing.append(f"shards[].{key}")
    if not any(r["assembly_source"].startswith("timings.") for r in runs):
        missing.append("timings.*assembly*")
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--size", type=int, default=32, help="output image side in px")
    parser.add_argument("--policy", default="paper", help="augmentation policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="jobs per configuration")
    parser.add_argument(
        "--unsharded-baseline",
        action="store_true",
        help="also run one worker with sharding off",
    )
    parser.add_argument("--model", type=Path, help="pipeline directory (default: tiny model)")
    parser.add_argument("--poll", type=float, default=0.25, help="poll interval after 60 s")
    parser.add_argument("--job-timeout", type=float, default=3600.0)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="write JSON (no FILE: stdout)"
    )
    args = parser.parse_args()
    if args.repeat < 1 or any(n < 1 for n in args.workers):
        parser.error("--repeat and --workers must be >= 1")
    say = sys.stderr if args.json == "-" else sys.stdout

    labels = [f"class_{i:03d}" for i in range(args.classes)]
    with tempfile.TemporaryDirectory(prefix="distill-scaling-") as scratch:
        work = Path(scratch)
        if args.model is None:
            args.model = work / "tiny-model"
            built = subprocess.run(
                [sys.executable, "-m", "worker.model.tiny_model", str(args.model)],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                capture_output=True,
                text=True,
            )
            if built.returncode != 0:
                print(f"scaling: building the tiny model failed\n{built.stderr}", file=sys.stderr)
                return 1
        else:
            args.model = args.model.resolve()
        configs = []
        baseline = None
        try:
            for n in args.workers:
                configs.append(
                    run_config(
                        args,
                        labels,
                        workers=n,
                        shard_images=args.shard_images,
                        work=work / f"workers-{n}",
                        say=say,
                    )
                )
            if args.unsharded_baseline:
                baseline = run_config(
                    args,
                    labels,
                    workers=1,
                    shard_images=UNSHARDED,
                    work=work / "unsharded",
                    say=say,
                )
        except StackError as exc:
            print(f"scaling: {exc}", file=sys.stderr)
            return 1

    first = configs[0]
    speedups = {
        f"{c['workers']}/{first['workers']} workers": first["median_wall_seconds"]
        / c["median_wall_seconds"]
        for c in configs[1:]
    }
    runs = [r for c in configs for r in c["runs"]]
    shas = sorted({r["sha256"] for r in runs if r["sha256"]})
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "configs": configs,
        "baseline": baseline,
        "speedups": speedups,
        "sha256": shas,
        "sha256_equal": len(shas) == 1 and all(r["sha256"] for r in runs),
        "missing": missing_fields(configs, args.classes * args.ipc),
    }
    report(result, say)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        print()
    elif args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
