"""The whole API fuzzed from the committed contract (openapi/openapi.json) over real HTTP.

Bounded (``FUZZ_EXAMPLES`` per operation) so it runs in CI. Every response must be documented
(status, content type, schema) and no input may produce a 5xx.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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

from core.settings import Settings
from tests.conftest import ROOT, start_worker, stop_worker
from tests.conftest import live_api as client_live_api

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
schema = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")
# Valid and invalid inputs both: invalid ones must be refused with a documented 4xx.
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def live_api(
    stack_settings: Settings,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """`python -m service` on a real port, without API keys, with a worker of its own on its
    own queue (so /readyz is 200); jobs are capped at 20 images so fuzzed ones stay cheap."""
    logs = tmp_path_factory.mktemp("fuzz")
    settings = stack_settings.model_copy(update={"queue_name": "fuzz"})
    worker = start_worker(settings, tiny_model, logs / "worker.log")
    try:
        with client_live_api(
            settings, tiny_model, logs / "api.log", api_keys=None, max_job_images=20
        ) as base:
            yield base
    finally:
        stop_worker(worker)


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
