"""Shared test helpers: the repo on sys.path, tiny shards, and running the scripts as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# the smallest model that still exercises every code path; vocab stays GPT-2's padded 50304
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--hellaswag-every", "0", "--sample-every", "0"]


def write_shards(
    data_dir: Path, n_train: int = 2, tokens_per_shard: int = 5000, seed: int = 0, vocab: int = 50257
) -> list[np.ndarray]:
    """Random-token .npy shards in build-nanogpt's layout (shard 0 val, the rest train)."""
    from fineweb import write_shard

    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for i in range(n_train + 1):
        tokens = rng.integers(0, vocab, tokens_per_shard, dtype=np.uint16)
        split = "val" if i == 0 else "train"
        write_shard(str(data_dir / f"test_{split}_{i:06d}.npy"), tokens)
        shards.append(tokens)
    return shards


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    write_shards(data_dir)
    return data_dir


def run_script(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """python <script> args..., from the repo root, one thread so timings of parallel tests stay sane."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def train_losses(stdout: str) -> dict[int, float]:
    """step -> train loss, parsed from the build-nanogpt format stdout lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("step "):
            parts = line.split("|")
            out[int(parts[0].split()[1])] = float(parts[1].split(":")[1])
    return out
