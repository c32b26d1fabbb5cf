"""Size of the API's installed dependencies (no torch) and the API's start time.

    python bench/api_footprint.py [--keep DIR]

Installs the API requirements from pyproject.toml into an empty virtual environment, prints
their size on disk, then starts `python -m service` from that environment three times and
prints the seconds from process start to the first 200 on /healthz.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_time(python: Path) -> float:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DISTILL_PORT": str(port)}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(python), "-m", "service"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the environment here and keep it")
    args = parser.parse_args()
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    with tempfile.TemporaryDirectory() as scratch:
        env_dir = args.keep or Path(scratch) / "api-venv"
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        python = env_dir / "bin" / "python"
        site = next((env_dir / "lib").glob("python*/site-packages"))
        bare = dir_size(site)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *requirements],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        installed = dir_size(site) - bare
        listed = subprocess.run(
            [str(python), "-m", "pip", "list", "--format=freeze"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        has_torch = any(p.lower().startswith("torch==") for p in listed)
        print(
            f"API dependencies: {installed / 2**20:.1f} MiB in {len(listed) - 1} packages "
            f"(pip itself excluded), torch installed: {has_torch}"
        )
        times = [start_time(python) for _ in range(3)]
        print("API start to first /healthz 200: " + ", ".join(f"{t:.2f} s" for t in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
