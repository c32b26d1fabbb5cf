"""What ``select`` costs: a job's images/s with each oversample vs none, by a real worker.

    python bench/select_cost.py MODEL_DIR [--oversample 2 4] [--ipc 20] [--classes 5]

A private Redis, ``python -m worker`` on MODEL_DIR (a tiny model from
``python -m worker.model.tiny_model``) and the API in process, as ``bench/archive_digest.py``.
A reference set of tinted noise images (16 per class) is uploaded; each request runs twice
and the second run is reported, so the scorer (trained once per reference, classes, size and
seed, then kept by the worker) is not counted: its training is printed apart. Prints, per
oversample: kept images/s and candidates/s from the job's ``seconds_total``, and the ratio to
the plain job. Also prints the scorer's GFLOP per candidate (FlopCounterMode), so the work per
kept image of a full-size model is ``oversample x (its GFLOP / image + this)``.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import Settings
from service.app import create_app
from service.redis_server import EmbeddedRedis


def reference(classes: list[str], per_class: int = 16, side: int = 32) -> bytes:
    rng = np.random.default_rng(0)
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as archive:
        for n, label in enumerate(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
                pixels[..., n % 3] += 127
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, format="PNG")
                archive.writestr(f"train/{n:03d}_{label}/{i}.png", out.getvalue())
    return body.getvalue()


def scorer_gflop(side: int, classes: int) -> float:
    """GFLOP of one ConvNet-3 forward pass (the reference scorer) on one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from worker.evaluate.network import ConvNet

    model = ConvNet(classes, image_size=side)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, side, side))
    return counter.get_total_flops() / 1e9


def run_job(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    job = client.post("/v1/jobs", json=body).json()
    while job["state"] not in ("succeeded", "failed", "canceled"):
        time.sleep(0.1)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['state']}: {job.get('error')}")
    return job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--oversample", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--ipc", type=int, default=20)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    model = args.model.absolute()
    labels = [f"class_{i}" for i in range(args.classes)]
    work = Path(tempfile.mkdtemp(prefix="select-cost-"))
    redis = EmbeddedRedis(work / "redis", persist=False).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(
        {
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "HF_HUB_OFFLINE": "1",
            "DISTILL_REDIS_URL": redis.url,
            "DISTILL_DATA_DIR": str(work / "data"),
            "DISTILL_MODEL": str(model),
            "DISTILL_TINY_DECODER": "none",
            "DISTILL_DEVICE": "cpu",
            "DISTILL_BATCH_SIZE": "16",
            "DISTILL_LOG_LEVEL": "WARNING",
        }
    )
    worker = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stderr=subprocess.DEVNULL)
    settings = Settings(redis_url=redis.url, data_dir=work / "data", batch_size=16)
    try:
        with TestClient(create_app(settings)) as client:
            deadline = time.time() + 120
            while client.get("/readyz").status_code != 200:
                if time.time() > deadline:
                    raise RuntimeError("no worker became ready")
                time.sleep(0.2)
            made = client.post(
                "/v1/references",
                content=reference(labels),
                headers={"content-type": "application/zip"},
            )
            ref = made.json()["id"]
            base = {
                "labels": labels,
                "ipc": args.ipc,
                "image_size": args.size,
                "augment": {"policy": "paper", "copies": 1},
            }
            rows = []
            for oversample in [0, *args.oversample]:
                body = dict(base)
                if oversample:
                    body.update(reference=ref, select={"oversample": oversample})
                first = run_job(client, body)
                job = run_job(client, body)  # warm: the scorer is the worker's already
                seconds = job["timings"]["seconds_total"]
                sampled = job["progress"]["generated"]
                kept = sampled // max(oversample, 1)
                rows.append((oversample, seconds, job["progress"]["written"], kept, sampled))
                if oversample == args.oversample[0]:
                    cold = first["timings"]["seconds_total"]
                    print(
                        f"first select job (trains the scorer): {cold:.2f} s vs {seconds:.2f} s "
                        "warm",
                        file=sys.stderr,
                    )
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        redis.stop()
    print(
        f"{args.classes} classes x ipc {args.ipc} at {args.size} px, 1 copy per kept image; "
        f"scorer ConvNet-3: {scorer_gflop(args.size, args.classes):.4f} GFLOP / candidate"
    )
    print(f"{'oversample':>10} {'seconds':>8} {'written':>7} {'kept':>5} {'sampled':>7} "
          f"{'written/s':>9} {'kept/s':>7} {'sampled/s':>9} {'vs none':>7}")  # fmt: skip
    plain = rows[0][1]
    for oversample, seconds, written, kept, sampled in rows:
        print(
            f"{oversample or 'none':>10} {seconds:>8.2f} {written:>7} {kept:>5} {sampled:>7} "
            f"{written / seconds:>9.1f} {kept / seconds:>7.1f} {sampled / seconds:>9.1f} "
            f"{plain / seconds:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
