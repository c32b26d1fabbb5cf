"""bench/gpu_generation.py end to end on the CPU: ``--smoke`` on the tiny model prints its
table (paper, peer and engine rows with images/s and FLOPs per image), ratios and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_generation.py"
#: The smoke run takes about 30 s on two cores (cold torch.compile included).
TIMEOUT_S = 120


def _table(stdout: str) -> list[dict[str, str]]:
    """The final table's rows as {column: cell} (cells hold no spaces)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split()[:2] == ["mode", "res"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


@pytest.mark.slow
def test_smoke_run_prints_every_mode_with_rates_and_flops(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", str(tiny_model), "--worker", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    rows = _table(done.stdout)
    modes = {row["mode"] for row in rows}
    assert {"paper", "peer", "engine"} <= modes, done.stdout
    for row in rows:
        assert float(row["img/s"]) > 0, row
        assert float(row["GFLOP/img"]) > 0, row
        assert row["MFU"] == "-" and row["peak_GiB"] == "None", row  # CPU: no peak to share
    engine = [row for row in rows if row["mode"] == "engine"]
    assert {row["decoder"] for row in engine} >= {"vae-fp32", "vae-bf16", "tiny"}
    assert "engine/paper (vae-fp32):" in done.stdout
    assert "engine/peer (vae-fp32):" in done.stdout

    summary = json.loads(out.read_text())
    for key in ("card", "torch", "diffusers", "date", "rows", "ratios", "flops", "skipped"):
        assert key in summary, key
    assert summary["peak_tflops"] is None
    saved = {row["mode"] for row in summary["rows"]}
    assert {"paper", "peer", "engine"} <= saved
    for row in summary["rows"]:
        assert row["images_per_second"] > 0 and row["gflop_per_image"] > 0, row
        assert row["mfu"] is None
    assert summary["ratios"]["engine/paper (vae-fp32)"] > 0
    assert summary["ratios"]["engine/peer (vae-fp32)"] > 0
    # The worker mode ran (the test environment has Redis, rq and fastapi) or says why not.
    if "worker" in saved:
        assert summary["ratios"]["worker/engine (same settings)"] > 0
    else:
        assert any(line.startswith("worker") for line in summary["skipped"]), summary["skipped"]
    print(f"smoke run: {seconds:.1f} s")


FAMILIES = ROOT / "bench" / "gpu_families.py"


def test_family_bench_counts_dit_xl2_as_its_paper_does() -> None:
    """DiT-XL/2 at 256 px: 118.6 GMACs a forward pass (Peebles & Xie, Table 4), i.e. 237 GFLOP;
    with guidance 4 and 25 steps, two passes a step."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(FAMILIES), "--flops-only", "--families", "dit-xl-2-256"],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
        check=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(row["denoiser_gflop_per_pass"] / 2 - 118.6) < 1.0, row
    assert row["steps"] == 25 and row["guidance_scale"] == 4.0 and row["resolution"] == 256
    expected = 2 * 25 * row["denoiser_gflop_per_pass"] + row["decode_gflop"]
    assert abs(row["gflop_per_image"] - expected) < 3.0, row  # each figure rounded to 0.1


@pytest.mark.slow
def test_family_bench_smoke_runs_every_family(tmp_path: Path) -> None:
    out = tmp_path / "families.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run(
        [sys.executable, str(FAMILIES), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
        check=True,
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["family"] for r in rows] == ["sdxl", "sd", "dit"]
    assert [r["pipeline"] for r in rows] == [
        "StableDiffusionXLPipeline",
        "StableDiffusionPipeline",
        "DiTPipeline",
    ]
    assert all(r["images_per_second"] > 0 and r["gflop_per_image"] >= 0 for r in rows)
