"""Real-image baselines on CIFAR-10: random real, herding and k-center coresets, evaluated.

    python bench/baselines.py [--ipc 10 50] [--methods random_real herding kcenter]
                              [--epochs 1000] [--runs 3] [--no-dsa] [--feature-epochs 10]

The split is ``bench/eval_calibration.py``'s: in ../shared/data/cifar10-test, each class's
files sorted by name, the first 500 are the reference pool and the other 500 the test half.
ConvNet-3 is trained on the whole pool for ``--feature-epochs`` (seed ``--seed``); its
penultimate features drive herding and k-center (``worker.coreset``). Each selection is
written as an archive in the service's format and scored by the built-in evaluator exactly
as the calibration does. Published ConvNet-3 CIFAR-10 figures (Zhao et al., "Dataset
Condensation with Gradient Matching", ICLR 2021, Table 1; DC's evaluation: 300 epochs, no
augmentation): random IPC 10 26.0, IPC 50 43.4; herding IPC 10 31.6, IPC 50 40.4.
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_calibration import POOL, ROOT, split, write_selection, write_test_zip

from worker.evaluate import evaluate
from worker.selection.coreset import METHODS, embed_classes, select

#: Published ConvNet-3 CIFAR-10 accuracy (percent) by (method, IPC), DC paper Table 1.
PUBLISHED = {
    ("random_real", 10): 26.0,
    ("random_real", 50): 43.4,
    ("herding", 10): 31.6,
    ("herding", 50): 40.4,
}


def pool_images(parts: list[tuple[list[Path], list[Path]]]) -> list[np.ndarray]:
    """Each class's pool as uint8 (500, 32, 32, 3), in the split's (file name) order."""
    return [
        np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8) for f in pool])
        for pool, _ in parts
    ]


def row_text(row: dict[str, Any]) -> str:
    accs = " ".join(f"{a * 100:.2f}" for a in row["accuracies"])
    mean, std = row["mean"] * 100, row["std"] * 100
    published = PUBLISHED.get((row["method"], row["ipc"]))
    pub = f"{published:.1f}" if published is not None else "-"
    dsa_on = "off" if row["protocol"]["augmentation"] == "none" else "on"
    return (
        f"{row['method']:<12} {row['ipc']:>4} {row['protocol']['epochs']:>6} "
        f"{row['protocol']['runs']:>4} {dsa_on:>4}  {accs:<22} "
        f"{f'{mean:.2f}+-{std:.2f}':>12}  {pub:>9}  {row['wall_seconds']:>7.1f}"
    )


HEADER = (
    f"{'method':<12} {'IPC':>4} {'epochs':>6} {'runs':>4} {'DSA':>4}  {'accuracy %':<22} "
    f"{'mean+-std':>12}  {'published':>9}  {'wall s':>7}"
)


def main() -> int:
    """Select, write, evaluate; print one row per (IPC, method) as it finishes, then a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-test")
    parser.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-dsa", action="store_true", help="train without DSA")
    parser.add_argument("--feature-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="selection, features, first run")
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--json", type=Path, help="write the results here too (after each row)")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"{args.data} not found: no reference pool to select from", file=sys.stderr)
        return 2

    parts = split(args.data)
    pool = pool_images(parts)
    features = None
    if any(m != "random_real" for m in args.methods):
        started = time.perf_counter()
        features = embed_classes(
            pool, seed=args.seed, epochs=args.feature_epochs, device=args.device
        )
        print(
            f"features: ConvNet-3 on {sum(len(p) for p in pool)} pool images, "
            f"{args.feature_epochs} epochs, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="baselines-") as tmp:
        work = Path(tmp)
        test_zip = work / "test-half.zip"
        write_test_zip(parts, test_zip)
        for ipc in args.ipc:
            for method in args.methods:
                chosen = select(method, pool, k=ipc, seed=args.seed, features=features)
                archive = work / f"{method}-ipc{ipc}.zip"
                write_selection(
                    parts,
                    [sorted(c) for c in chosen],
                    archive,
                    request={
                        "preset": "cifar10",
                        "ipc": ipc,
                        "image_size": 32,
                        "seed": args.seed,
                        "source": f"{method} over CIFAR-10 test images (first {POOL} per class)",
                    },
                )
                started = time.perf_counter()
                result = evaluate(
                    archive,
                    test_zip,
                    runs=args.runs,
                    epochs=args.epochs,
                    device=args.device,
                    seed=args.seed,
                    use_dsa=not args.no_dsa,
                )
                row = {
                    "method": method,
                    "ipc": ipc,
                    "feature_epochs": args.feature_epochs if method != "random_real" else None,
                    "wall_seconds": round(time.perf_counter() - started, 1),
                    **result.to_dict(),
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
