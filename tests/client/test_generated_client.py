"""A client that openapi-python-client generates from openapi/openapi.json, run against a real
stack: submit, wait, download (bytes match the ETag's SHA-256), evaluations, presets."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, ROOT


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tool = Path(sys.executable).with_name("openapi-python-client")
    if not tool.exists():
        pytest.skip("openapi-python-client is not installed (a dev dependency)")
    # No config file: users run the generator on the contract as it is.
    work = tmp_path_factory.mktemp("generated")
    env = {**os.environ, "PATH": f"{tool.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [
            str(tool),
            "generate",
            "--path",
            str(ROOT / "openapi" / "openapi.json"),
            "--meta",
            "none",
            "--output-path",
            str(work / "distill_generated"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Nothing of the contract may be dropped: every schema and response is generated, and the
    # generator's formatter (ruff, beside this interpreter) ran.
    said = done.stdout + done.stderr
    assert "Warning" not in said and "not in PATH" not in said, said
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module("distill_generated")
    finally:
        sys.path.remove(str(work))


def test_every_operation_is_tagged_by_resource(generated: Any) -> None:
    groups = sorted(p.name for p in Path(generated.__file__).parent.joinpath("api").iterdir())
    assert [g for g in groups if not g.startswith("_")] == [
        "evaluations",
        "health",
        "jobs",
        "models",
        "presets",
        "references",
    ]


def test_submit_wait_download_and_evaluations_through_the_generated_client(
    generated: Any, api: str
) -> None:
    from distill_generated.api.evaluations import create_evaluation, list_evaluations
    from distill_generated.api.jobs import create_job, download_archive, get_job, get_preview
    from distill_generated.api.presets import get_preset
    from distill_generated.models import DatasetSpec, EvaluationList, EvaluationRequest, JobState

    client = generated.AuthenticatedClient(base_url=api, token=API_KEY)
    spec = DatasetSpec.from_dict({"labels": ["cat", "dog"], "ipc": 2, "image_size": 16})
    job = create_job.sync(client=client, body=spec)
    deadline = time.monotonic() + 120
    while job.state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = get_job.sync(job.id, client=client)
    assert job.state == JobState.SUCCEEDED, job
    response = download_archive.sync_detailed(job.id, client=client)
    assert response.status_code == 200
    etag = response.headers["etag"].strip('"')
    assert hashlib.sha256(response.content).hexdigest() == etag == job.archive.sha256
    assert response.parsed.payload.read() == response.content  # a File with the bytes
    sheet = get_preview.sync(job.id, client=client)
    assert sheet.payload.read().startswith(b"\x89PNG\r\n\x1a\n")

    request = EvaluationRequest.from_dict({"testset": "not-on-any-worker", "profile": "fast"})
    evaluation = create_evaluation.sync(job.id, client=client, body=request)
    assert evaluation.job_id == job.id and evaluation.request.testset == "not-on-any-worker"
    listed = list_evaluations.sync(job.id, client=client)
    assert isinstance(listed, EvaluationList)
    assert [e.id for e in listed.evaluations] == [evaluation.id]
    preset = get_preset.sync("cifar10", client=client)
    assert preset.num_classes == 10 and preset.classes[0].label == "airplane"
