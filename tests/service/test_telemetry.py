"""FastAPI's OpenTelemetry hooks are on only where the environment configures OpenTelemetry."""

from __future__ import annotations

import os

import pytest

from service.app import create_app, telemetry_config


def test_telemetry_is_off_without_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    assert telemetry_config() == dict.fromkeys(
        ("tracing", "metrics", "logs", "operation_spans"), False
    )
    assert create_app()._telemetry["operation_spans"] is False


def test_an_otel_variable_turns_every_hook_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert set(telemetry_config().values()) == {True}
    # What FastAPI was handed (its own record of the telemetry settings).
    assert create_app()._telemetry["tracing"] is True
