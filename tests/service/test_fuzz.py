"""The whole API fuzzed from the committed contract (openapi/openapi.json) over real HTTP.

Bounded (``FUZZ_EXAMPLES`` per operation) so it runs in CI. Every response must be documented
(status, content type, schema) and no input may produce a 5xx.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from service.redis_server import EmbeddedRedis, free_port
from tests.conftest import ROOT

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
schema = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")
# Valid and invalid inputs both: invalid ones must be refused with a documented 4xx.
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def live_api(
    redis_server: EmbeddedRedis,
    worker: subprocess.Popen[bytes],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """`python -m service` on a real port, on a queue no worker drains (the session's worker
    only makes /readyz answer 200)."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DISTILL_REDIS_URL": redis_server.url,
        "DISTILL_PORT": str(port),
        "DISTILL_QUEUE_NAME": "fuzz",
        "DISTILL_DATA_DIR": str(tmp_path_factory.mktemp("fuzz-data")),
        "DISTILL_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(timeout=10)


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_matches_its_contract(case: schemathesis.Case, live_api: str) -> None:
    case.call_and_validate(
        base_url=live_api,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )
