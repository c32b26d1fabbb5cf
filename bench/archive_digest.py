"""The SHA-256 of one fixed request's archive, made in one piece and sharded, by a real worker.

    cd CHECKOUT && python /path/to/bench/archive_digest.py MODEL_DIR

Runs the checkout in the current directory (so two versions can be compared on one model:
the same request must give the same bytes): a private Redis, ``python -m worker`` on
MODEL_DIR (a tiny model from ``python -m worker.model.tiny_model``; its ``tiny_decoder`` folder is
used when present), and the API in process. Works with checkouts from before and after the
settings moved to ``core/``. Prints one line per run: state, layout, bytes, digest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis

try:
    from core.settings import Settings
except ImportError:  # a checkout from before core/
    from service.config import Settings  # type: ignore[no-redef]

REQUEST = {
    "labels": ["cat", "dog", "aquarium_fish"],
    "ipc": 10,
    "seed": 7,
    "image_size": 16,
    "formats": ["imagefolder", "tensors"],
}


def run(model: Path, shard_images: int) -> str:
    work = Path(tempfile.mkdtemp())
    redis = EmbeddedRedis(work / "redis", persist=False).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(
        {
            "PYTHONPATH": os.getcwd(),
            "HF_HUB_OFFLINE": "1",
            "DISTILL_REDIS_URL": redis.url,
            "DISTILL_DATA_DIR": str(work / "data"),
            "DISTILL_MODEL": str(model),
            "DISTILL_TINY_DECODER": str(model / "tiny_decoder")
            if (model / "tiny_decoder").is_dir()
            else "none",
            "DISTILL_DEVICE": "cpu",
            "DISTILL_BATCH_SIZE": "4",
            "DISTILL_SHARD_IMAGES": str(shard_images),
            "DISTILL_LOG_LEVEL": "WARNING",
        }
    )
    worker = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stderr=subprocess.DEVNULL)
    settings = Settings(
        redis_url=redis.url, data_dir=work / "data", batch_size=4, shard_images=shard_images
    )
    try:
        with TestClient(create_app(settings)) as client:
            deadline = time.time() + 120
            while client.get("/readyz").status_code != 200:
                if time.time() > deadline:
                    raise RuntimeError("no worker became ready")
                time.sleep(0.2)
            job = client.post("/v1/jobs", json=REQUEST).json()
            while job["state"] not in ("succeeded", "failed", "canceled"):
                time.sleep(0.2)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            data = client.get(f"/v1/jobs/{job['id']}/archive").content
            layout = "sharded" if job.get("shards") else "one piece"
            return f"{job['state']} {layout} {len(data)} {hashlib.sha256(data).hexdigest()}"
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=120)  # a loaded machine can take a while to stop it
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        redis.stop()


def main() -> int:
    model = Path(sys.argv[1]).absolute()
    print(run(model, 100_000))
    print(run(model, 20))  # 30 images in shards of about 20
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
