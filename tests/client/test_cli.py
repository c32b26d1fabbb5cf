"""The ``distill`` command line as a user runs it: ``python -m client`` in a subprocess, against
the API as a subprocess and the session's real worker."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from client import Job
from client.cli import ProgressDisplay, main, progress_line
from tests.conftest import API_KEY, ROOT

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def distill(api: str, workdir: Path) -> Run:
    """Runs ``distill ARGS...`` with ``$DISTILL_URL`` and ``$DISTILL_API_KEY`` set."""

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environment = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DISTILL_URL": api,
            "DISTILL_API_KEY": API_KEY,
            **env,
        }
        return subprocess.run(
            [sys.executable, "-m", "client", *args],
            cwd=workdir,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


@pytest.fixture(scope="module")
def submitted(distill: Run, workdir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = workdir / "cats-dogs.zip"
    done = distill(
        "submit",
        "--labels",
        "cat,dog",
        "--ipc",
        "2",
        "--size",
        "16",
        "--wait",
        "--interval",
        "0.1",
        "-o",
        str(out),
    )
    return done, out


def _job_id(submitted: tuple[subprocess.CompletedProcess[str], Path]) -> str:
    return submitted[0].stdout.split()[0]


def test_submit_wait_download(
    submitted: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, out = submitted
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"[0-9a-f]{32}", done.stdout.strip()), done.stdout
    assert "succeeded" in done.stderr and "images" in done.stderr
    assert f"saved {out}" in done.stderr and "sha256 verified" in done.stderr
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        request = json.loads(zf.read("manifest.json"))["request"]
    assert request["labels"] == ["cat", "dog"] and request["ipc"] == 2
    assert request["image_size"] == 16
    assert sum(n.startswith("train/") and n.endswith(".png") for n in names) == 4
    assert not out.with_name(out.name + ".part").exists()


def test_status_ls_wait_and_download_of_the_finished_job(
    distill: Run, submitted: tuple[subprocess.CompletedProcess[str], Path], workdir: Path
) -> None:
    job_id = _job_id(submitted)
    status = distill("status", job_id)
    assert status.returncode == 0, status.stderr
    assert job_id in status.stdout and "succeeded" in status.stdout
    assert "sha256" in status.stdout

    for args in (["status", job_id, "--json"], ["--json", "status", job_id]):
        as_json = distill(*args)
        assert as_json.returncode == 0
        assert json.loads(as_json.stdout)["state"] == "succeeded"

    listed = distill("ls", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs: list[dict[str, Any]] = json.loads(listed.stdout)
    assert job_id in [j["id"] for j in jobs]
    one = distill("ls", "--limit", "1", "--state", "succeeded", "--json")
    assert len(json.loads(one.stdout)) == 1
    table = distill("ls")
    assert table.stdout.startswith("ID") and job_id in table.stdout

    waited = distill("wait", job_id, "--json")
    assert waited.returncode == 0
    assert json.loads(waited.stdout)["id"] == job_id

    again = workdir / "again.zip"
    fetched = distill("download", job_id, "-o", str(again))
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == str(again)
    assert again.read_bytes() == submitted[1].read_bytes()


def test_cancel_of_a_finished_job_is_exit_1_with_the_problem(
    distill: Run, submitted: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    done = distill("cancel", _job_id(submitted))
    assert done.returncode == 1
    assert "409" in done.stderr and "nothing to cancel" in done.stderr
    assert done.stdout == ""


def test_wait_timeout_then_cancel_then_canceled_is_exit_1(distill: Run) -> None:
    done = distill("submit", "--labels", "ant,bee,cow", "--ipc", "100", "--policy", "none")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    timed_out = distill("wait", job_id, "--timeout", "0.2", "--interval", "0.05")
    assert timed_out.returncode == 4
    assert "still" in timed_out.stderr
    canceled = distill("cancel", job_id)
    assert canceled.returncode == 0, canceled.stderr
    waited = distill("wait", job_id, "--interval", "0.1")
    assert waited.returncode == 1
    assert waited.stdout.startswith("canceled")


def test_presets(distill: Run) -> None:
    table = distill("presets")
    assert table.returncode == 0
    assert re.search(r"^cifar10\s+10\s+32\s", table.stdout, re.MULTILINE)
    listed = distill("presets", "--json")
    assert {p["name"] for p in json.loads(listed.stdout)} >= {"cifar10", "imagenet1k"}


def test_api_errors_are_exit_1_with_the_detail_on_stderr(distill: Run) -> None:
    unknown = distill("status", "no-such-job")
    assert unknown.returncode == 1
    assert "404 Job not found" in unknown.stderr

    invalid = distill("submit", "--labels", "cat", "--ipc", "1", "--copies", "99", "--json")
    assert invalid.returncode == 1
    assert "augment.copies" in invalid.stderr
    problem = json.loads(invalid.stdout)
    assert problem["status"] == 422 and problem["errors"][0]["field"] == "augment.copies"

    wrong_key = distill("ls", "--api-key", "not-a-key")
    assert wrong_key.returncode == 1
    assert "401" in wrong_key.stderr


def test_unreachable_server_is_exit_3(distill: Run) -> None:
    flag = distill("--url", "http://127.0.0.1:1", "--retries", "1", "presets")
    assert flag.returncode == 3
    assert "cannot reach http://127.0.0.1:1" in flag.stderr
    from_env = distill("status", "abc", DISTILL_URL="http://127.0.0.1:1")
    assert from_env.returncode == 3


def test_usage_errors_are_exit_2(distill: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert distill().returncode == 2  # no command
    for argv in (
        ["submit"],  # neither --labels nor --preset nor --spec
        ["submit", "--labels", "cat", "--ipc", "many"],
        ["submit", "--labels", "cat", "--policy", "wild"],
        ["submit", "--labels", "cat", "--prompt", "no-equals-sign"],
        ["frobnicate"],
        ["ls", "--state", "bogus"],
        ["status"],
    ):
        assert main(argv) == 2, argv
    assert "usage: distill" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_progress_line_shows_rate_eta_and_shards() -> None:
    job: dict[str, Any] = {
        "id": "x",
        "state": "running",
        "progress": {
            "generated": 40,
            "written": 120,
            "total": 400,
            "images_per_second": 35.24,
            "eta_seconds": 125,
        },
        "shards": [{"state": "succeeded"}, {"state": "running"}],
    }
    line = progress_line(cast(Job, job))
    assert "120/400 images" in line and "35.2 img/s" in line
    assert "ETA 2m05s" in line and "shards 1/2 (1 running)" in line
    assert "[#######" in line
    queued = progress_line(cast(Job, {**job, "state": "queued", "queue_position": 2}))
    assert "position 2" in queued

    stream = io.StringIO()
    display = ProgressDisplay(stream, every=3600)
    for state in ("queued", "running", "running", "succeeded"):
        display(cast(Job, {**job, "state": state, "queue_position": 0}))
    display.close()
    assert [line.split()[0] for line in stream.getvalue().splitlines()] == [
        "queued",
        "running",
        "succeeded",
    ]
