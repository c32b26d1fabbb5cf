"""The committed contract matches the app; regenerate with `make openapi`."""

from __future__ import annotations

import json
from typing import Any

from service.openapi import render
from tests.conftest import ROOT

CONTRACT = ROOT / "openapi" / "openapi.json"


def test_committed_openapi_matches_the_app() -> None:
    assert CONTRACT.read_text(encoding="utf-8") == render(), (
        "openapi/openapi.json is out of date: run `make openapi` and commit it"
    )


def test_operations_have_stable_ids_and_problem_responses() -> None:
    doc: dict[str, Any] = json.loads(CONTRACT.read_text(encoding="utf-8"))
    ops = {op["operationId"]: op for path in doc["paths"].values() for op in path.values()}
    assert set(ops) == {
        "createJob",
        "listJobs",
        "getJob",
        "cancelJob",
        "downloadArchive",
        "health",
        "readiness",
        "metrics",
        "listModels",
        "listPresets",
        "getPreset",
        "getPreview",
        "createEvaluation",
        "listEvaluations",
        "getEvaluation",
        "createReference",
        "listReferences",
        "getReference",
        "deleteReference",
    }
    assert "application/problem+json" in ops["createJob"]["responses"]["422"]["content"]
    assert "application/problem+json" in ops["getJob"]["responses"]["404"]["content"]
    assert "application/problem+json" in ops["downloadArchive"]["responses"]["409"]["content"]
    examples = doc["components"]["schemas"]["DatasetSpec"]["examples"]
    assert examples[0]["labels"] == ["cat", "dog"]
