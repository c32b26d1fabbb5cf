"""The README's "From Python" and "From a terminal" blocks, run against a real stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from core.settings import Settings
from tests.conftest import API_KEY, ROOT, live_api

README = (ROOT / "README.md").read_text(encoding="utf-8")


def block(section: str, language: str) -> str:
    """The first ``language`` code block under the README heading ``section``."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", body, re.DOTALL)
    assert match, f"no {language} block under {section!r}"
    return match.group(1)


def test_readme_python_and_terminal_blocks_run(
    stack_settings: Settings,
    tiny_model: Path,
    worker: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    with live_api(stack_settings, tiny_model, tmp_path / "api.log") as base:
        env = {
            **os.environ,
            "DISTILL_URL": base,
            "DISTILL_API_KEY": API_KEY,
            "PYTHONPATH": str(ROOT),
        }
        python = subprocess.run(
            [sys.executable, "-c", block("From Python", "python")],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert python.returncode == 0, python.stderr
        assert "422 ['augment.copies']" in python.stdout
        assert zipfile.ZipFile(tmp_path / "cats-dogs.zip").testzip() is None

        shell = "set -euo pipefail\n"
        shell += f'distill() {{ "{sys.executable}" -m client "$@"; }}\n'
        shell += block("From a terminal", "sh")
        terminal = subprocess.run(
            ["bash", "-c", shell],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert terminal.returncode == 0, terminal.stderr
        for name in ("cats-dogs.zip", "cifar10.zip"):
            assert zipfile.ZipFile(tmp_path / name).testzip() is None
        assert (tmp_path / "jobs.json").read_text().strip().startswith(("[", "{"))
