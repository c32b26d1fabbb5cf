"""``distill``: the service from a terminal (also ``python -m client``).

    distill submit --labels cat,dog --ipc 50 --size 32 --wait -o cats-dogs.zip
    distill status ID          distill wait ID          distill download ID -o FILE
    distill cancel ID          distill ls --state running          distill presets

The server is ``--url`` or ``$DISTILL_URL`` (default http://127.0.0.1:8000); the API key is
``--api-key`` or ``$DISTILL_API_KEY``. ``--json`` prints machine-readable JSON on stdout;
progress and messages always go to stderr. ``submit`` prints the new job's id on stdout.

Exit codes: 0 done (the job succeeded, or the command did what it was asked), 1 the job failed
or was canceled, or the server refused the request (its problem detail is printed on stderr),
2 usage error, 3 server unreachable, 4 ``--timeout`` passed before the job finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from client.api import DEFAULT_URL, Client
from client.errors import (
    ApiError,
    DistillError,
    ServerUnreachable,
    WaitTimeout,
)
from client.types import Job

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4

PROG = "distill"


class UsageError(Exception):
    """A bad argument found after parsing (exit 2)."""


# -- formatting ------------------------------------------------------------------------------


def _duration(value: float) -> str:
    if value < 10:
        return f"{max(0.0, value):.1f}s"
    seconds = round(value)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover - the loop always returns


def _classes(request: dict[str, Any]) -> str:
    if request.get("preset"):
        return str(request["preset"])
    labels = [str(label) for label in request.get("labels") or []]
    text = ",".join(labels[:4])
    return text + (f",+{len(labels) - 4}" if len(labels) > 4 else "")


def _shards(job: Job) -> str | None:
    shards = job.get("shards")
    if not shards:
        return None
    done = sum(1 for s in shards if s["state"] == "succeeded")
    running = sum(1 for s in shards if s["state"] == "running")
    return f"shards {done}/{len(shards)} ({running} running)"


def progress_line(job: Job, *, width: int = 24) -> str:
    """One line about a job: state, a bar, images done/total, images per second, ETA."""
    state = job["state"]
    progress = job.get("progress") or {}
    written = int(progress.get("written") or 0)
    total = progress.get("total")
    parts = [f"{state:<9}"]
    if state == "queued":
        position = job.get("queue_position")
        parts.append("waiting" if position is None else f"position {position} in the queue")
    else:
        if total:
            filled = min(width, int(width * written / total))
            parts.append("[" + "#" * filled + "." * (width - filled) + "]")
            parts.append(f"{written}/{total} images")
        else:
            parts.append(f"{written} images")
        rate = progress.get("images_per_second")
        if rate:
            parts.append(f"{rate:.1f} img/s")
        eta = progress.get("eta_seconds")
        if eta is not None and state == "running":
            parts.append(f"ETA {_duration(eta)}")
    shards = _shards(job)
    if shards:
        parts.append(shards)
    error = job.get("error")
    if error:
        parts.append(f"{error['type']}: {error['detail']}")
    timings = job.get("timings")
    if state == "succeeded" and timings:
        parts.append(f"in {_duration(timings['seconds_total'])}")
    return "  ".join(parts)


class ProgressDisplay:
    """Draws job progress on a stream: redrawn in place on a terminal, else one line per
    change (at most one every ``every`` seconds, besides state changes)."""

    def __init__(self, stream: TextIO, *, every: float = 2.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self._last_state: str | None = None
        self._last_time = 0.0
        self._drawn = 0

    def __call__(self, job: Job) -> None:
        line = progress_line(job)
        now = time.monotonic()
        if self.tty:
            pad = max(0, self._drawn - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._drawn = len(line)
        elif job["state"] != self._last_state or now - self._last_time >= self.every:
            self.stream.write(line + "\n")
            self._last_time = now
        self._last_state = job["state"]
        self.stream.flush()

    def close(self) -> None:
        """End the line drawn on a terminal."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _describe(job: Job) -> None:
    request = job.get("request") or {}
    rows = [
        ("id", job["id"]),
        ("state", progress_line(job)),
        ("classes", _classes(request)),
        (
            "request",
            ", ".join(
                f"{k} {request[k]}"
                for k in ("ipc", "budget_seconds", "image_size", "seed")
                if request.get(k) is not None
            ),
        ),
        ("created", str(job.get("created_at") or "")),
        ("finished", str(job.get("finished_at") or "")),
    ]
    archive = job.get("archive")
    if archive:
        rows.append(("archive", f"{_size(archive['size_bytes'])}, sha256 {archive['sha256']}"))
    for key, value in rows:
        if value:
            print(f"{key:<9} {value}")


def _exit_for(job: Job) -> int:
    return EXIT_FAILED if job["state"] in ("failed", "canceled") else EXIT_OK


# -- commands --------------------------------------------------------------------------------


def _wait(client: Client, job: Job | str, args: argparse.Namespace) -> Job:
    display = ProgressDisplay(sys.stderr)
    try:
        return client.wait(
            job,
            args.timeout,
            on_progress=None if args.quiet else display,
            poll_interval=args.interval,
        )
    finally:
        display.close()


def _finish(client: Client, job: Job, args: argparse.Namespace) -> int:
    """After a wait: download when asked, print the job, return the exit code."""
    output = getattr(args, "output", None)
    if output is not None and job["state"] == "succeeded":
        path = client.download(job, output)
        _say(f"saved {path} ({_size(path.stat().st_size)}, sha256 verified)")
    elif output is not None:
        _say(f"job {job['id']} {job['state']}: no archive to download")
    if args.json:
        _print_json(job)
    return _exit_for(job)


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    """`distill submit`: request a dataset; with --wait or -o, follow it to the end."""
    spec: dict[str, Any] | None = None
    if args.spec is not None:
        text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--spec is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError("--spec must hold a JSON object")
        spec = loaded
    labels = [x.strip() for group in args.labels or [] for x in group.split(",") if x.strip()]
    prompts: dict[str, str] = {}
    for item in args.prompt or []:
        label, sep, prompt = item.partition("=")
        if not sep or not label.strip() or not prompt.strip():
            raise UsageError(f"--prompt wants LABEL=PROMPT, got {item!r}")
        prompts[label.strip()] = prompt.strip()
    templates: list[str] = args.template or []
    job = client.submit(
        spec,
        labels=labels or None,
        preset=args.preset,
        ipc=args.ipc,
        budget_seconds=args.budget,
        image_size=args.size,
        seed=args.seed,
        prompt_template=(templates[0] if len(templates) == 1 else templates) or None,
        prompts=prompts or None,
        policy=args.policy,
        copies=args.copies,
        crop_scale=args.crop_scale,
        formats=args.format,
        idempotency_key=args.idempotency_key,
    )
    if not args.json:
        print(job["id"], flush=True)
        _say(f"submitted job {job['id']} ({job['state']})")
    if not (args.wait or args.output):
        if args.json:
            _print_json(job)
        return EXIT_OK
    job = _wait(client, job, args)
    return _finish(client, job, args)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    """`distill status ID`: the job in words (or JSON); exit 1 if it failed or was canceled."""
    job = client.get(args.job_id)
    if args.json:
        _print_json(job)
    else:
        _describe(job)
    return _exit_for(job)


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    """`distill wait ID`: progress on stderr until the job ends; exit by its outcome."""
    job = _wait(client, args.job_id, args)
    if not args.json:
        print(progress_line(job))
    return _finish(client, job, args)


def cmd_download(client: Client, args: argparse.Namespace) -> int:
    """`distill download ID -o FILE`: the archive, resumed and verified; prints the path."""
    path = client.download(args.job_id, args.output)
    if args.json:
        _print_json({"id": args.job_id, "path": str(path), "size_bytes": path.stat().st_size})
    else:
        print(path)
        _say(f"saved {path} ({_size(path.stat().st_size)}, sha256 verified)")
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    """`distill cancel ID`: cancel a queued or running job (a finished one is a 409)."""
    job = client.cancel(args.job_id)
    if args.json:
        _print_json(job)
    else:
        note = " (stops after the current batch)" if job["state"] == "running" else ""
        print(f"{job['id']} {job['state']}{note}")
    return EXIT_OK


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    """`distill ls`: your newest jobs, following pages up to --limit."""
    jobs = list(client.iter_jobs(args.state, limit=args.limit, page_size=min(args.limit, 200)))
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    rows = []
    for job in jobs:
        progress = job.get("progress") or {}
        total = progress.get("total")
        written = progress.get("written") or 0
        rows.append(
            [
                job["id"],
                job["state"],
                str(job.get("created_at") or "")[:19].replace("T", " "),
                _classes(job.get("request") or {}),
                f"{written}/{total}" if total else str(written),
            ]
        )
    _table(rows, ["ID", "STATE", "CREATED", "CLASSES", "IMAGES"])
    return EXIT_OK


def cmd_presets(client: Client, args: argparse.Namespace) -> int:
    """`distill presets`: the standard class lists usable as --preset."""
    presets = client.presets()
    if args.json:
        _print_json(presets)
        return EXIT_OK
    rows = [[p["name"], str(p["num_classes"]), str(p["image_size"]), p["title"]] for p in presets]
    _table(rows, ["NAME", "CLASSES", "SIZE", "TITLE"])
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def _common(default: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command (``distill --json ls`` = ``ls --json``)."""

    def d(value: Any) -> Any:
        return value if default else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=d(None), help=f"server URL (default $DISTILL_URL or {DEFAULT_URL})"
    )
    common.add_argument("--api-key", default=d(None), help="API key (default $DISTILL_API_KEY)")
    common.add_argument(
        "--json", action="store_true", default=d(False), help="print JSON on stdout"
    )
    common.add_argument(
        "--retries",
        type=int,
        default=d(3),
        help="retries after a connection error or 429/503 (default 3)",
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=d(False), help="no progress on stderr"
    )
    return common


def _add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_non_negative_float,
        default=None,
        metavar="SECONDS",
        help="give up waiting after this long (exit 4); default: no limit",
    )
    parser.add_argument(
        "--interval",
        type=_non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between polls (default 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``distill`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate distilled image datasets with a distill service.",
        parents=[_common(default=True)],
        epilog="exit codes: 0 ok, 1 job failed/canceled or request refused, 2 usage, "
        "3 server unreachable, 4 wait timed out",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common(default=False)

    def command(
        name: str, handler: Callable[[Client, argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = command("submit", cmd_submit, "request a dataset; prints the job id")
    p.add_argument(
        "--labels", action="append", metavar="A,B,...", help="class names, comma-separated"
    )
    p.add_argument("--preset", help="cifar10, cifar100, tinyimagenet or imagenet1k")
    p.add_argument("--ipc", type=_positive_int, help="images per class")
    p.add_argument("--budget", type=float, metavar="SECONDS", help="time budget instead of --ipc")
    p.add_argument("--size", type=_positive_int, metavar="PX", help="output side in pixels")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument(
        "--template",
        action="append",
        metavar="T",
        help="prompt template with {label}; repeat to cycle several",
    )
    p.add_argument("--prompt", action="append", metavar="LABEL=PROMPT", help="a fixed prompt")
    p.add_argument("--policy", choices=["paper", "none"], help="augmentation policy")
    p.add_argument("--copies", type=int, metavar="N", help="augmented copies per image")
    p.add_argument("--crop-scale", type=float, metavar="F", help="crop source scale")
    p.add_argument(
        "--format",
        action="append",
        choices=["imagefolder", "tensors", "challenge", "webdataset", "parquet"],
        help="archive format; repeat for several",
    )
    p.add_argument("--spec", metavar="FILE", help="JSON request body to start from ('-': stdin)")
    p.add_argument("--idempotency-key", metavar="KEY", help="makes re-running this safe")
    p.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="download the archive here (implies --wait)"
    )
    _add_wait_options(p)

    p = command("status", cmd_status, "show a job")
    p.add_argument("job_id", metavar="ID")

    p = command("wait", cmd_wait, "wait for a job, showing progress on stderr")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("-o", "--output", metavar="FILE", help="then download the archive here")
    _add_wait_options(p)

    p = command("download", cmd_download, "download a job's archive (resumable, verified)")
    p.add_argument("job_id", metavar="ID")
    p.add_argument(
        "-o", "--output", default=".", metavar="FILE", help="file or directory (default .)"
    )

    p = command("cancel", cmd_cancel, "cancel a queued or running job")
    p.add_argument("job_id", metavar="ID")

    p = command("ls", cmd_ls, "list your jobs, newest first")
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "canceled"])
    p.add_argument("--limit", type=_positive_int, default=50, help="at most this many (50)")

    command("presets", cmd_presets, "list the standard class lists")
    return parser


def _report(error: ApiError, as_json: bool) -> None:
    _say(f"{PROG}: {error}")
    for field in error.errors:
        _say(f"  {field.field}: {field.message}")
    if as_json:
        _print_json(
            {
                "type": error.type,
                "title": error.title,
                "status": error.status,
                "detail": error.detail,
                "instance": error.instance,
                "errors": [vars(e) for e in error.errors],
            }
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse's usage errors give 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "submit" and not (args.labels or args.preset or args.spec):
            parser.error("submit needs --labels, --preset or --spec")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    url = args.url or os.environ.get("DISTILL_URL") or DEFAULT_URL
    api_key = args.api_key or os.environ.get("DISTILL_API_KEY") or None
    handler: Callable[[Client, argparse.Namespace], int] = args.handler
    try:
        with Client(url, api_key, retries=max(0, args.retries)) as client:
            return handler(client, args)
    except ServerUnreachable as exc:
        _say(f"{PROG}: {exc}")
        return EXIT_UNREACHABLE
    except ApiError as exc:
        _report(exc, args.json)
        return EXIT_FAILED
    except WaitTimeout as exc:
        _say(f"{PROG}: {exc}")
        if args.json:
            _print_json(exc.job)
        return EXIT_TIMEOUT
    except DistillError as exc:
        _say(f"{PROG}: {exc}")
        return EXIT_FAILED
    except (UsageError, OSError) as exc:
        _say(f"{PROG}: error: {exc}")
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        _say(f"{PROG}: interrupted")
        return 130
