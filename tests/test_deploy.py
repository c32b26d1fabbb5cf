"""What can be checked of the container setup without a Docker engine (CI has none).

The compose file parses and holds the services, volumes, GPU reservation, healthchecks and
settings the README promises; the Dockerfile's targets exist, copy what their entry points
import, and keep torch out of the API image.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import yaml

from core.settings import Settings
from tests.conftest import ROOT


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = [line]
        elif current and line and not line.startswith("#"):
            stages[current].append(line)
    return stages


def test_compose_has_the_services_and_volumes() -> None:
    doc = compose()
    default = {name for name, service in doc["services"].items() if "profiles" not in service}
    assert default == {"redis", "api", "worker", "webhooks"}
    assert doc["services"]["webhooks"]["command"] == ["python", "-m", "service.webhooks"]
    assert "deploy" not in doc["services"]["webhooks"]  # no GPU for webhook delivery
    assert set(doc["volumes"]) == {"redis-data", "data", "hf-cache", "minio-data"}
    redis = doc["services"]["redis"]
    assert redis["image"].startswith("redis:")
    flags = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in flags
    assert "redis-data:/data" in redis["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_minio_is_an_optional_s3_store_with_its_bucket() -> None:
    services = compose()["services"]
    minio, init = services["minio"], services["minio-init"]
    assert minio["profiles"] == init["profiles"] == ["s3"]
    assert minio["image"].startswith("minio/minio") and init["image"].startswith("minio/mc")
    assert minio["command"][:2] == ["server", "/data"] and "minio-data:/data" in minio["volumes"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing local/distill" in " ".join(init["command"])
    # The store is chosen by settings alone; nothing in the default stack needs MinIO.
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["DISTILL_STORAGE"] == "${DISTILL_STORAGE:-}"
        assert "minio" not in services[name].get("depends_on", {})


def test_api_waits_for_redis_and_is_health_checked() -> None:
    api = compose()["services"]["api"]
    assert api["build"]["target"] == "api"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(p.endswith(":8000") for p in api["ports"])
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert "data:/data" in api["volumes"]
    assert api["environment"]["DISTILL_REDIS_URL"] == "redis://redis:6379/0"


def test_worker_reserves_gpus_and_scales_without_edits() -> None:
    worker = compose()["services"]["worker"]
    assert worker["build"]["target"] == "worker"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "count" in device
    # Scaling: no fixed container name, host port or per-replica device in the service.
    assert "container_name" not in worker and "ports" not in worker
    assert "DISTILL_DEVICE" not in worker["environment"]
    assert {"data:/data", "hf-cache:/cache/huggingface"} <= set(worker["volumes"])
    assert worker["environment"]["HF_HOME"] == "/cache/huggingface"
    grace = worker["stop_grace_period"]
    assert re.fullmatch(r"\d+m|\d+s", grace) and (grace.endswith("m") or int(grace[:-1]) >= 60)


def test_every_setting_is_documented_in_env_example_and_readme() -> None:
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        variable = f"DISTILL_{name.upper()}"
        assert re.search(rf"^{variable}=", example, re.MULTILINE), variable
        assert variable in readme, variable
    for line in example.splitlines():
        if line.startswith("DISTILL_") and not line.startswith("DISTILL_PUBLISH_PORT"):
            name = line.split("=", 1)[0].removeprefix("DISTILL_").lower()
            assert name in Settings.model_fields, line


def test_dockerfile_targets_copy_what_their_entry_points_import() -> None:
    stages = dockerfile_stages()
    assert {"base", "api", "worker"} <= set(stages)
    for target, module in (("api", "service"), ("worker", "worker")):
        body = "\n".join(stages[target])
        assert "COPY core ./core" in body
        assert f"COPY {module} ./{module}" in body
        assert f'CMD ["python", "-m", "{module}"]' in body
        assert re.search(r"^USER (?!root)\S+", body, re.MULTILINE), target
    worker = "\n".join(stages["worker"])
    assert "STOPSIGNAL SIGTERM" in worker and "HF_HOME=" in worker
    assert "requirements-worker" in worker
    api = "\n".join(stages["api"])
    assert "requirements-worker" not in api
    # The API image holds no model code: nothing of worker/ (the webhook sender is service's).
    assert "worker" not in api.replace("requirements-worker", "")
    assert "pyproject.toml" in "\n".join(stages["base"])
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", "data/", ".git/"} <= set(ignored)


def test_the_api_imports_no_torch() -> None:
    code = (
        "import sys, service.app, service.main, service.metrics; "
        "heavy = {'torch', 'diffusers', 'transformers', 'albumentations', 'cv2', 'numpy'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"
