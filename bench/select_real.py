"""Oversample and select on real images: each ``keep`` over a random pool vs random real.

    python bench/select_real.py [--ipc 10] [--oversample 5] [--epochs 300] [--runs 3]
                                [--no-dsa] [--teacher-epochs 10]

A stand-in for generated pools, on ``bench/baselines.py``'s split (../shared/data/cifar10-test:
the first 500 images of each class are the reference pool, the other 500 the test half). The
scorer is the service's ``reference`` scorer (``worker.selection.teachers.fit``): ConvNet-3
trained on the whole pool for ``--teacher-epochs`` with the seed. Each class's candidates are
``oversample x ipc`` pool images drawn with ``[seed, class]``; ``worker.selection.oversample.
choose`` keeps ``ipc`` of them by each rule (difficulty matches the pool's own p(class)). Each
selection is written in the service's format and scored by the built-in evaluator on hard
labels, beside ``random_real`` (``ipc`` drawn from the whole pool) at the same ipc.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import pool_images
from eval_calibration import ROOT, split, write_selection, write_test_zip

from core.oversample import KEEPS
from worker.evaluate import evaluate
from worker.selection.coreset import select
from worker.selection.oversample import choose
from worker.selection.teachers import Teacher, fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-test")
    parser.add_argument("--ipc", type=int, nargs="+", default=[10])
    parser.add_argument("--oversample", type=int, default=5)
    parser.add_argument("--keeps", nargs="+", choices=KEEPS, default=list(KEEPS))
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-dsa", action="store_true", help="train without DSA")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
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
    scorer = Teacher(fitted, {})
    scored = [scorer.score(images) for images in pool]
    print(
        f"scorer: ConvNet-3, {args.teacher_epochs} epochs on {fitted.images} pool images, "
        f"{time.perf_counter() - started:.0f} s, train {fitted.train_accuracy * 100:.2f} %",
        file=sys.stderr,
        flush=True,
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="select-real-") as tmp:
        work = Path(tmp)
        test_zip = work / "test-half.zip"
        write_test_zip(parts, test_zip)
        for ipc in args.ipc:
            selections: dict[str, list[list[int]]] = {
                "random_real": select("random_real", pool, k=ipc, seed=args.seed)
            }
            for keep in args.keeps:
                chosen = []
                for c, (probs, feats) in enumerate(scored):
                    rng = np.random.default_rng([args.seed, c])
                    candidates = np.sort(
                        rng.choice(len(probs), ipc * args.oversample, replace=False)
                    )
                    picked = choose(
                        keep,
                        probs[candidates],
                        feats[candidates],
                        own=c,
                        k=ipc,
                        reference_confidence=probs[:, c],
                    )
                    chosen.append([int(candidates[j]) for j in picked.kept])
                selections[f"{keep} x{args.oversample}"] = chosen
            for name, chosen in selections.items():
                archive = work / f"{name.replace(' ', '_')}-ipc{ipc}.zip"
                write_selection(
                    parts,
                    [sorted(c) for c in chosen],
                    archive,
                    request={"preset": "cifar10", "ipc": ipc, "image_size": 32, "source": name},
                )
                began = time.perf_counter()
                result = evaluate(
                    archive,
                    test_zip,
                    runs=args.runs,
                    epochs=args.epochs,
                    device=args.device,
                    seed=args.seed,
                    use_dsa=not args.no_dsa,
                ).to_dict()
                row = {
                    "selection": name,
                    "ipc": ipc,
                    "epochs": args.epochs,
                    "runs": args.runs,
                    "dsa": not args.no_dsa,
                    "scorer_epochs": args.teacher_epochs,
                    "accuracies": result["accuracies"],
                    "mean": result["mean"],
                    "std": result["std"],
                    "wall_seconds": round(time.perf_counter() - began, 1),
                }
                results.append(row)
                print(
                    f"{name:<16} ipc {ipc:>3}: {row['mean'] * 100:6.2f} ± {row['std'] * 100:.2f}"
                    f" ({row['wall_seconds']} s)",
                    flush=True,
                )
                if args.json is not None:
                    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
