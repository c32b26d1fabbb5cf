"""Soft labels on real images: random real and herding at each IPC, hard vs soft labels.

    python bench/soft_labels.py [--ipc 10 50] [--methods random_real herding]
                                [--epochs 300] [--runs 3] [--no-dsa] [--teacher-epochs 10]
                                [--temperature 4]

The split and the selections are ``bench/baselines.py``'s (../shared/data/cifar10-test, the
first 500 images of each class are the reference pool, the other 500 the test half). The
teacher is the service's ``reference`` teacher (``worker.selection.teachers.fit``): ConvNet-3
trained on the whole pool for ``--teacher-epochs`` with the seed; its penultimate features
also drive herding (the network ``embed_classes`` trains is the same one). Each selection is
written as an archive in the service's format with the teacher's ``soft_labels.pt``
(``worker.outputs.soft_labels.Collector``, one image per forward pass) and scored by the
built-in evaluator with ``labels="soft"``, which runs the same seeds on hard labels too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import pool_images
from eval_calibration import POOL, ROOT, split, write_selection, write_test_zip

from core import presets
from worker.evaluate import evaluate
from worker.outputs.soft_labels import Collector
from worker.selection.coreset import select
from worker.selection.teachers import Teacher, fit

HEADER = (
    f"{'method':<12} {'ipc':>4} {'epochs':>6} {'T':>4} {'hard %':>14} {'soft %':>14} {'gain':>6}"
)


def row_text(row: dict[str, Any]) -> str:
    hard, soft = row["hard"], row["soft"]
    return (
        f"{row['method']:<12} {row['ipc']:>4} {row['epochs']:>6} {row['temperature']:>4g} "
        f"{hard['mean'] * 100:>7.2f} ± {hard['std'] * 100:<4.2f} "
        f"{soft['mean'] * 100:>7.2f} ± {soft['std'] * 100:<4.2f} "
        f"{(soft['mean'] - hard['mean']) * 100:>+6.2f}"
    )


def teacher_accuracy(teacher: Teacher, parts: list[tuple[list[Path], list[Path]]]) -> float:
    """The teacher's top-1 accuracy on the test half."""
    tests = pool_images([(test, []) for _, test in parts])
    correct = total = 0
    with torch.inference_mode():
        for label, images in enumerate(tests):
            for start in range(0, len(images), 500):
                out = teacher.fitted.model(teacher.fitted.inputs(images[start : start + 500]))
                correct += int((out.argmax(dim=1) == label).sum())
                total += len(images[start : start + 500])
    return correct / total


def main() -> int:
    """Teacher, selections, archives with soft labels, evaluations; one row per (IPC, method)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-test")
    parser.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("random_real", "herding"),
        default=["random_real", "herding"],
    )
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-dsa", action="store_true", help="train without DSA")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0, help="teacher, selection, first run")
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--json", type=Path, help="write the results here too (after each row)")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"{args.data} not found: no reference pool to select from", file=sys.stderr)
        return 2

    parts = split(args.data)
    pool = pool_images(parts)
    started = time.perf_counter()
    fitted = fit(pool, seed=args.seed, epochs=args.teacher_epochs, device=args.device)
    teacher = Teacher(fitted, {"teacher": "reference"})
    accuracy = teacher_accuracy(teacher, parts)
    print(
        f"teacher: ConvNet-3 on {fitted.images} pool images, {args.teacher_epochs} epochs, "
        f"{time.perf_counter() - started:.0f} s; train {fitted.train_accuracy * 100:.2f} %, "
        f"test half {accuracy * 100:.2f} %",
        file=sys.stderr,
        flush=True,
    )
    features = None
    if "herding" in args.methods:
        with torch.inference_mode():
            features = [
                fitted.model.embed(fitted.inputs(images)).to("cpu", torch.float64).numpy()
                for images in pool
            ]
    classes = [c.label for c in presets.get("cifar10").classes]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="soft-labels-") as tmp:
        work = Path(tmp)
        test_zip = work / "test-half.zip"
        write_test_zip(parts, test_zip)
        for ipc in args.ipc:
            for method in args.methods:
                chosen = [
                    sorted(c)
                    for c in select(method, pool, k=ipc, seed=args.seed, features=features)
                ]
                archive = work / f"{method}-ipc{ipc}.zip"
                write_selection(
                    parts,
                    chosen,
                    archive,
                    request={
                        "preset": "cifar10",
                        "ipc": ipc,
                        "image_size": 32,
                        "seed": args.seed,
                        "source": f"{method} over CIFAR-10 test images (first {POOL} per class)",
                    },
                )
                collector = Collector(
                    classes, temperature=args.temperature, top_k=5, teacher=teacher.logits
                )
                for label, picks in enumerate(chosen):
                    for number, index in enumerate(picks):
                        collector.add(label, number, pool[label][index])
                with zipfile.ZipFile(archive, "a") as zf:
                    zf.writestr("soft_labels.pt", collector.file_bytes("reference"))
                began = time.perf_counter()
                result = evaluate(
                    archive,
                    test_zip,
                    runs=args.runs,
                    epochs=args.epochs,
                    device=args.device,
                    seed=args.seed,
                    use_dsa=not args.no_dsa,
                    labels="soft",
                ).to_dict()
                row = {
                    "method": method,
                    "ipc": ipc,
                    "epochs": args.epochs,
                    "runs": args.runs,
                    "temperature": args.temperature,
                    "dsa": not args.no_dsa,
                    "teacher": {
                        "epochs": args.teacher_epochs,
                        "train_accuracy": fitted.train_accuracy,
                        "test_half_accuracy": accuracy,
                    },
                    "hard": result["hard"],
                    "soft": {k: result[k] for k in ("accuracies", "mean", "std")},
                    "wall_seconds": round(time.perf_counter() - began, 1),
                }
                results.append(row)
                print(row_text(row), file=sys.stderr, flush=True)
                if args.json is not None:
                    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print()
    print(HEADER)
    for row in results:
        print(row_text(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
