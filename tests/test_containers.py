"""Both images built from the Dockerfile and run: one job through an API container and a worker
container (CPU torch, the tiny model mounted) to a downloaded archive.

Podman with runc builds them on a Python base made from Debian packages with mmdebstrap, so no
registry is needed (``PYTHON_IMAGE``). The worker gets a CPU torch wheel from the local wheel
directory pip is configured with (``WHEELS``). Skipped, with the reason, where this machine
cannot build or run containers (no podman or mmdebstrap, not root, no package index reachable
from a build); a build that fails otherwise, or a job that does not succeed, fails the test.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.redis_server import EmbeddedRedis, free_port
from tests.conftest import ROOT, TERMINAL

BASE = "localhost/distill-python:3.11"
API = "localhost/distill-api:test"
WORKER = "localhost/distill-worker:test"
#: Build failures that say the machine cannot build here, not that the Dockerfile is wrong.
_ENVIRONMENT = re.compile(
    r"NewConnectionError|CERTIFICATE_VERIFY_FAILED|Temporary failure in name resolution|"
    r"Name or service not known|error setting rlimit|Network is unreachable|"
    r"Temporary failure resolving|Could not resolve|Failed to fetch"
)

pytestmark = pytest.mark.slow


def _limits() -> list[str]:
    """Explicit limits within this process's own (podman's defaults can exceed them)."""
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    return [
        "--runtime",
        "runc",  # crun refuses hybrid cgroup machines
        "--ulimit",
        f"nofile={nofile}:{nofile}",
        "--ulimit",
        "nproc=4096:4096",
    ]


def _wheel_dir() -> Path | None:
    """The local directory pip finds the CPU torch wheel in (pip's find-links), if any."""
    found = os.environ.get("PIP_FIND_LINKS", "")
    config = subprocess.run(
        ["python3", "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    found += " " + " ".join(re.findall(r"find-links='([^']+)'", config))
    for candidate in found.split():
        path = Path(candidate.removeprefix("file://"))
        if path.is_dir() and any(path.glob("torch-*+cpu-*.whl")):
            return path
    return None


def _run(command: list[str], *, timeout: float, what: str, environment: bool = False) -> None:
    """Run a build step; a failure is a skip when it is the machine's (``environment``: any
    failure of this step is), else a test failure."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        text = done.stdout[-4000:] + done.stderr[-4000:]
        if environment:
            pytest.skip(f"{what}: this machine cannot do it: {text.strip()[-300:]}")
        if _ENVIRONMENT.search(text):
            pytest.skip(f"{what}: this machine cannot build here: {_ENVIRONMENT.search(text)[0]}")
        pytest.fail(f"{what} failed:\n{text}")


@pytest.fixture(scope="module")
def images() -> None:
    if shutil.which("podman") is None or shutil.which("mmdebstrap") is None:
        pytest.skip("podman or mmdebstrap is not installed (.ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("building images with mmdebstrap and podman here needs root")
    wheels = _wheel_dir()
    if wheels is None:
        pytest.skip("no local CPU torch wheel to build a CPU worker image with")
    if subprocess.run(["podman", "image", "exists", BASE]).returncode != 0:
        # Debian's python3.11, pip allowed to install, this machine's trusted certificates.
        script = (
            "mmdebstrap --quiet --variant=apt "
            "--include=python3,python3-pip,python-is-python3,passwd,ca-certificates "
            "--customize-hook='rm -f $1/usr/lib/python3.11/EXTERNALLY-MANAGED' "
            "--customize-hook='cp /etc/ssl/certs/ca-certificates.crt "
            "$1/etc/ssl/certs/ca-certificates.crt' "
            f"bookworm - | podman import - {BASE}"
        )
        _run(
            ["bash", "-o", "pipefail", "-c", script],
            timeout=600,
            what="base image from Debian packages",
            environment=True,
        )
    # Can this machine run a container at all (namespaces, cgroups, limits)?
    _run(
        ["podman", "run", "--rm", *_limits(), BASE, "python", "-c", "print(1)"],
        timeout=120,
        what="running a container",
        environment=True,
    )
    build = ["podman", "build", *_limits(), "--build-arg", f"PYTHON_IMAGE={BASE}"]
    started = time.monotonic()
    _run([*build, "--target", "api", "-t", API, str(ROOT)], timeout=900, what="api image")
    api_s = time.monotonic() - started
    _run(
        [
            *build,
            "-v",
            f"{wheels}:/wheels:ro",
            "--build-arg",
            "WHEELS=/wheels",
            "--target",
            "worker",
            "-t",
            WORKER,
            str(ROOT),
        ],
        timeout=1200,
        what="worker image",
    )
    sizes = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"],
        capture_output=True,
        text=True,
    ).stdout
    print(f"api built in {api_s:.0f} s, worker in {time.monotonic() - started - api_s:.0f} s")
    print(sizes)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    yield server.url
    server.stop()


def test_a_job_through_an_api_container_and_a_worker_container(
    images: None, tiny_model: Path, tmp_path: Path, redis_url: str
) -> None:
    # The containers run as an unprivileged user: readable model, writable shared data.
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    port = free_port()
    tag = tmp_path.name[-12:]
    common = [
        *_limits(),
        "--network",
        "host",
        "-v",
        f"{data}:/data",
        "-e",
        f"DISTILL_REDIS_URL={redis_url}",
    ]
    names = [f"distill-api-{tag}", f"distill-worker-{tag}"]
    run = ["podman", "run", "-d", "--rm"]
    try:
        subprocess.run(
            [*run, *common, "-e", f"DISTILL_PORT={port}", "--name", names[0], API], check=True
        )
        subprocess.run(
            [
                *run,
                *common,
                "-v",
                f"{model}:/models/tiny:ro",
                "-e",
                "DISTILL_MODEL=/models/tiny",
                "-e",
                "DISTILL_TINY_DECODER=/models/tiny/tiny_decoder",
                "-e",
                "DISTILL_DEVICE=cpu",
                "-e",
                "HF_HUB_OFFLINE=1",
                "--name",
                names[1],
                WORKER,
            ],
            check=True,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, _logs(names)
            time.sleep(0.5)
        job = httpx.post(f"{base}/v1/jobs", json={"labels": ["cat", "dog"], "ipc": 5}).json()
        while job["state"] not in TERMINAL:
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
            job = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
        assert job["state"] == "succeeded", (job, _logs(names))
        archive = httpx.get(f"{base}/v1/jobs/{job['id']}/archive", timeout=30)
        assert archive.status_code == 200
        assert archive.headers["etag"] == f'"{hashlib.sha256(archive.content).hexdigest()}"'
        assert archive.headers["etag"].strip('"') == job["archive"]["sha256"]
    finally:
        subprocess.run(["podman", "rm", "-f", *names], capture_output=True)


def _logs(names: list[str]) -> str:
    return "\n".join(
        subprocess.run(["podman", "logs", n], capture_output=True, text=True).stdout[-3000:]
        for n in names
    )
