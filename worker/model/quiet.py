"""Library notices and progress bars kept out of a worker's output (and the model tools')."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Keep library notices and progress bars out of the worker's output: every line it
    prints is one of our JSON log lines or a one-line error. Call before importing them."""
    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("NO_ALBUMENTATIONS_UPDATE", "1"),
    ):
        os.environ.setdefault(name, value)
