"""``python -m worker.evaluate ARCHIVE TESTSET``: evaluate a distilled archive, print a table.

Progress goes to stderr (a bar redrawn in place on a terminal, a line every 30 s otherwise);
the result table goes to stdout, and ``--json OUT`` writes the full result. Exit status: 0 on
success, 2 for a usage or input error (unreadable archive, classes in the wrong order, image
sizes that differ without ``--resize-test``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worker.evaluate.data import EvaluationError
from worker.evaluate.progress import TextBar
from worker.evaluate.train import PROFILES, EvaluationResult, evaluate


def table(result: EvaluationResult, archive: Path, testset: Path) -> str:
    """The result as a short, aligned text table."""
    p = result.protocol
    norm = p["normalization"]
    rows = [
        ("archive", f"{archive}  ({p['classes']} classes, {p['train_images']} images, "
         f"{p['image_size']} px, from {p['train_source']})"),
        ("test set", f"{testset}  ({p['test_images']} images, class check: "
         f"{result.class_check})"),
        ("network", f"{p['network']['name']}, width {p['network']['width']}, instance norm"),
        ("training", f"{p['epochs']} epochs x {p['runs']} runs (profile {p['profile']}), "
         f"SGD lr {p['optimizer']['lr']} ({p['optimizer']['lr_schedule']}), "
         f"batch {p['batch_size']}, {p['augmentation']}"),
        ("normalization", f"mean {_fmt(norm['mean'])} std {_fmt(norm['std'])} "
         f"({norm['source']})"),
        ("device", result.device),
    ]  # fmt: skip
    lines = [f"{key:<14}{value}" for key, value in rows]
    lines += ["", f"{'run':<6}{'seed':<8}{'accuracy':>9}"]
    for run, (seed, acc) in enumerate(zip(result.seeds, result.accuracies, strict=True), 1):
        lines.append(f"{run:<6}{seed:<8}{acc * 100:>8.2f}%")
    lines.append(f"{'mean':<14}{result.mean * 100:>8.2f}%  (std {result.std * 100:.2f})")
    if result.hard is not None:
        hard = result.hard
        lines[-1] += f"  soft labels (T {p['soft_labels']['temperature']:g})"
        lines.append(
            f"{'hard labels':<14}{hard['mean'] * 100:>8.2f}%  (std {hard['std'] * 100:.2f}), "
            "the challenge's protocol"
        )
    lines += [
        "",
        f"time          {result.seconds:.1f} s in all, {result.seconds_per_epoch:.3f} s "
        f"per training epoch",
    ]
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m worker.evaluate",
        description="Train ConvNet on a distilled archive and report test accuracy "
        "(dataset-distillation benchmark protocol).",
    )
    p.add_argument("archive", type=Path, help="zip written by this service")
    p.add_argument("testset", type=Path, help="ImageFolder directory, or a zip of one")
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="full",
        help="full: 1000 epochs x 3 runs (the protocol); fast: 50 x 1 (smoke)",
    )
    p.add_argument("--runs", type=int, help="runs with seeds seed, seed+1, ...")
    p.add_argument("--epochs", type=int, help="override the profile's epochs")
    p.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run (default 0)")
    p.add_argument("--no-dsa", action="store_true", help="train without DSA augmentation")
    p.add_argument(
        "--mean",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalisation mean (default: the archive's preset, else its images)",
    )
    p.add_argument(
        "--std",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalisation std (with --mean)",
    )
    p.add_argument(
        "--resize-test",
        action="store_true",
        help="resize test images to the archive's size instead of refusing",
    )
    p.add_argument(
        "--labels",
        choices=("hard", "soft"),
        default="hard",
        help="soft: train on the archive's soft_labels.pt (and also report hard labels)",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        result = evaluate(
            args.archive,
            args.testset,
            runs=args.runs,
            epochs=args.epochs,
            profile=args.profile,
            device=args.device,
            seed=args.seed,
            progress=None if args.quiet else TextBar(),
            use_dsa=not args.no_dsa,
            mean=args.mean,
            std=args.std,
            resize_test=args.resize_test,
            labels=args.labels,
        )
    except EvaluationError as exc:
        print(f"python -m worker.evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(table(result, args.archive, args.testset))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
