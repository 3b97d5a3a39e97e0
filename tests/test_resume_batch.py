"""--batch-size may change on --resume (README: "the tokens of each step stay the same"): a resumed run reads,
step by step, exactly the tokens the uninterrupted run would have read, for a halved, doubled or uneven
micro-batch, with and without --shuffle, on one process and on two ranks; and its losses match the
uninterrupted run's to float noise."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_script, write_shards
from test_resume import loss_strings, resumed_from

from shards import write_shard
from train_gpt import DataLoaderLite

T = 8


def steps_of_rows(loaders: list[DataLoaderLite], tokens_per_step: int, n_steps: int) -> list[list[tuple]]:
    """The rows (as tuples of token ids, inputs + last target) each step reads over all ranks, sorted: a
    step's gradient is a sum over its rows, so which rank reads which row does not matter, the set does."""
    B, world = loaders[0].B, len(loaders)
    accum = tokens_per_step // (B * T * world)
    assert accum * B * T * world == tokens_per_step
    out = []
    for _ in range(n_steps):
        rows = []
        for _ in range(accum):
            for loader in loaders:
                x, y = loader.next_batch()
                rows += [tuple(r) + (int(t[-1]),) for r, t in zip(x.tolist(), y.tolist())]
        out.append(sorted(rows))
    return out


@pytest.fixture
def two_shards(tmp_path: Path) -> Path:
    """The issue's case: two train shards of 90 tokens (at B=2, T=8 each has 5 windows of 16 and a 9-token
    tail that the B=2 run never reads: the tail of shard 0 starts at token 80)."""
    rng = np.random.default_rng(0)
    write_shard(str(tmp_path / "t_val_000000.npy"), rng.integers(0, 50257, 90, dtype=np.uint16))
    for i in (1, 2):  # token k of the train split has id k
        write_shard(str(tmp_path / f"t_train_{i:06d}.npy"), np.arange(90 * (i - 1), 90 * i, dtype=np.uint16))
    return tmp_path


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_before, world_after", [(1, 1), (2, 2), (1, 2), (2, 1)])
@pytest.mark.parametrize("b_after", [1, 4, 3])  # halved, doubled, and one that does not divide the window
def test_resumed_micro_batch_reads_the_steps_tokens(two_shards, shuffle, world_before, world_after, b_after):
    tokens_per_step = 24 * T  # 24 rows: a whole number of micro-batches for every B (2, 1, 3, 4) and world (1, 2)

    def loaders(B: int, world: int) -> list[DataLoaderLite]:
        return [DataLoaderLite(B, T, r, world, "train", str(two_shards), shuffle=shuffle, seed=5) for r in range(world)]

    n_before, n_after = 2, 7  # 9 steps of 12 windows, over 10 a shuffled epoch: epochs wrap, mid-step too
    reference = steps_of_rows(loaders(2, world_before), tokens_per_step, n_before + n_after)
    first = loaders(2, world_before)
    assert steps_of_rows(first, tokens_per_step, n_before) == reference[:n_before]
    state = first[0].state_dict()
    resumed = loaders(b_after, world_after)
    for loader in resumed:
        loader.load_state_dict(state)
    assert steps_of_rows(resumed, tokens_per_step, n_after) == reference[n_before:]


def test_the_issue_case_reads_token_90_not_the_tail_of_shard_0(two_shards):
    """B=2, T=8: steps of 16 tokens on one process; resumed at B=1 after 5 steps (shard 0's windows), the next
    window starts at token 90 (the first of shard 1), not at token 80 (shard 0's unread tail)."""
    first = DataLoaderLite(2, T, 0, 1, "train", str(two_shards))
    for _ in range(5):
        first.next_batch()
    resumed = DataLoaderLite(1, T, 0, 1, "train", str(two_shards))
    resumed.load_state_dict(first.state_dict())
    x, _ = resumed.next_batch()
    assert x[0, 0].item() == 90


def test_an_old_checkpoint_without_rows_resumes_on_its_window_grid(two_shards):
    """Checkpoints of earlier versions hold position in windows and window_tokens only."""
    first = DataLoaderLite(2, T, 0, 1, "train", str(two_shards))
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    del state["rows"]
    resumed = DataLoaderLite(1, T, 0, 1, "train", str(two_shards))
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat([resumed.next_batch()[0] for _ in range(2)]), first.next_batch()[0])


# B*T*world*accum = 256 tokens a step; the run's micro-batch is 4, resumed with 2 and 8; evaluation every 3
COMMON = [
    *TINY,
    "--device", "cpu", "--dtype", "float32", "--seq-len", "32", "--total-batch-size", "256",
    "--max-lr", "6e-3", "--min-lr", "6e-4", "--warmup-steps", "2", "--max-steps", "8",
    "--eval-every", "3", "--eval-steps", "2", "--save-every", "3", "--shuffle",
]  # fmt: skip


def val_losses(stdout: str) -> list[float]:
    return [float(line.split()[2]) for line in stdout.splitlines() if line.startswith("validation loss:")]


@pytest.mark.slow
@pytest.mark.parametrize("b_after", ["2", "8"])
def test_resume_with_another_batch_size_reproduces_the_losses(tmp_path, b_after):
    data = tmp_path / "data"
    write_shards(data, n_train=2, tokens_per_shard=6000)
    ref = run_script(
        "train_gpt.py", *COMMON, "--batch-size", "4", "--data-dir", str(data), "--log-dir", str(tmp_path / "ref")
    )
    assert ref.returncode == 0, ref.stderr
    log = tmp_path / "run"
    first = run_script("train_gpt.py", *COMMON, "--batch-size", "4", "--max-steps", "3", "--data-dir", str(data), "--log-dir", str(log))  # fmt: skip
    assert first.returncode == 0, first.stderr
    resumed = run_script("train_gpt.py", "--log-dir", str(log), "--resume", "--max-steps", "8", "--batch-size", b_after)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed_from(resumed.stdout)[1] == 3
    want, got = loss_strings(ref.stdout), loss_strings(resumed.stdout)
    assert sorted(got) == list(range(3, 8))
    for step in got:  # float noise only: the same tokens, summed in another order
        assert abs(float(got[step]) - float(want[step])) <= 1e-5 * abs(float(want[step])), step
    # evaluation at 6 and 8 (the end) reads the run's val batches: the same val loss
    ref_val, got_val = val_losses(ref.stdout)[-2:], val_losses(resumed.stdout)
    assert len(got_val) == 2 and all(abs(a - b) <= 2e-4 for a, b in zip(ref_val, got_val)), (ref_val, got_val)
