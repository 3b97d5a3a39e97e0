"""Shared test helpers: the repo on sys.path, tiny shards, and running the scripts as a user would."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
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
    from shards import write_shard

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


def descendants(pid: int) -> list[int]:
    """Every live process below pid, found through /proc's parent links: torchrun starts its workers in
    sessions of their own, so signalling a process group would miss them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Launch:
    """A process in its own session, stdout read line by line, killed with all its descendants (torchrun's
    workers too) on exit or when its timeout expires."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 180):
        self.err = tempfile.TemporaryFile("w+")  # a file, not a pipe: an unread stderr can never block the child
        env = env or {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.err, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.timed_out = False
        self.watchdog = threading.Timer(timeout, self._expire)
        self.watchdog.daemon = True
        self.watchdog.start()

    def _expire(self) -> None:
        self.timed_out = True
        self.kill()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for pid in [*descendants(self.p.pid), self.p.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait_line(self, pattern: str) -> re.Match:
        """Read stdout up to the first line matching pattern."""
        while line := self.p.stdout.readline():
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"output ended (timed out: {self.timed_out}) before {pattern!r}:\n{self.report()}")

    def finish(self) -> int:
        """Read the rest of stdout and reap the process; the watchdog bounds both."""
        self.lines.append(self.p.stdout.read())
        return self.p.wait()

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    @property
    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def report(self) -> str:
        return f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"

    def __enter__(self) -> "Launch":
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.cancel()
        self.kill()  # leftovers: torchrun workers, or a run a failed assertion left behind
        self.p.wait()
        self.p.stdout.close()
        self.err.close()


def open_failing_after(nbytes: int, err: int):
    """A replacement for builtins.open whose files raise OSError(err) once more than nbytes have been written
    to them: a full disk (ENOSPC) or a file-size limit (EFBIG) in the middle of a write."""
    import builtins

    real_open = builtins.open

    class FailingFile:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > nbytes:
                raise OSError(err, os.strerror(err))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda *args, **kwargs: FailingFile(real_open(*args, **kwargs))


def save_fake_checkpoint(argv: list[str], step: int, world: int = 1) -> Path:
    """The checkpoint `train_gpt.py argv` would save at `step` of a run on `world` processes, made in this process
    in a moment (untrained weights, empty AdamW state): enough for what --resume decides before any training."""
    import torch

    import checkpoint
    import train_gpt

    cfg, _ = train_gpt.parse_args(argv)
    with torch.random.fork_rng(devices=[]):  # the init must not move the global RNG of other tests
        model = train_gpt.GPT(train_gpt.model_config(cfg))
    loader = train_gpt.DataLoaderLite(cfg.batch_size, cfg.seq_len, 0, world, "train", cfg.data_dir)
    state = checkpoint.checkpoint_state(
        position=checkpoint.RunPosition(step, True),
        cfg=cfg,
        model=model,
        optimizers=model.configure_optimizers(cfg.weight_decay, cfg.max_lr, "cpu"),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        train_loader=loader,
    )
    os.makedirs(cfg.log_dir, exist_ok=True)
    return Path(checkpoint.save_checkpoint(cfg.log_dir, step, state, cfg.keep_last))
