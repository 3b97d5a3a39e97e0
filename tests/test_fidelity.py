"""Fidelity to build-nanogpt: with the plain loss, the unfused AdamW and float32 on the CPU, train_gpt.py
gives bit for bit the weights (and the printed losses) of build-nanogpt's training loop.

The reference below restates that loop in the plain style of build-nanogpt's train_gpt2.py: torch seeded
with 1337 right before the model is built, AdamW(betas 0.9/0.95, eps 1e-8) decaying only the tensors of
dim >= 2, micro-batches of B*T consecutive tokens, each loss divided by the accumulation steps before its
backward, the gradient norm clipped to 1.0, the lr of a linear warmup ((step+1)/warmup) then cosine to
min_lr = max_lr * 0.1 set on every group before the step. It takes from train_gpt only GPT, GPTConfig
and the forward's (None, loss), so a restructured trainer is still checked against the same loop.

The shards are small enough that the 16 micro-batches cross from one train shard into the next and then
wrap around to the first: the data order at shard ends is compared too. Both sides run on one thread;
the CPU kernels split their sums differently with more, and then only agree to float rounding.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_script, write_shards

import train_gpt

SEED = 1337
B, T, TOTAL_BATCH = 4, 32, 256  # 2 micro-batches a step
ACCUM = TOTAL_BATCH // (B * T)
MAX_LR = 6e-3  # above build-nanogpt's 6e-4, so 8 steps of a tiny model move the weights well away from init
MIN_LR = MAX_LR * 0.1  # as build-nanogpt computes it: 0.0006000000000000001, passed to the CLI as repr()
WARMUP, MAX_STEPS = 3, 8  # steps 0-2 warm up, 3-7 follow the cosine
N_LAYER, N_HEAD, N_EMBD = 2, 2, 32
TOKENS_PER_SHARD = 1000  # (1000 - 1) // 128 = 7 windows a shard: 14 a pass over the 2 train shards, 16 used
STEP_RE = re.compile(r"^step\s+(\d+) \| loss: (\S+) \|", re.M)


def reference_run(data_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str], list[int]]:
    """build-nanogpt's loop, one process on the CPU in float32: (initial weights, final weights, the printed
    losses, the train shard of each micro-batch)."""
    torch.manual_seed(SEED)
    model = train_gpt.GPT(
        train_gpt.GPTConfig(block_size=1024, vocab_size=50304, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD)
    )
    model.loss_chunk_rows = 0  # the plain full-logits cross-entropy, as build-nanogpt's forward
    init = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=MAX_LR, betas=(0.9, 0.95), eps=1e-8, fused=False)

    # the data: consecutive B*T windows of one shard at a time, in name order, back to the first after the last
    shards = [np.load(p) for p in sorted(data_dir.glob("*_train_*.npy"))]
    rank, world = 0, 1
    state = {"shard": 0, "pos": B * T * rank}
    shard_of_batch = []

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = shards[state["shard"]]
        shard_of_batch.append(state["shard"])
        buf = torch.from_numpy(tokens[state["pos"] : state["pos"] + B * T + 1].astype(np.int64))
        state["pos"] += B * T * world
        if state["pos"] + B * T * world + 1 > len(tokens):  # the next window would not fit: next shard
            state["shard"] = (state["shard"] + 1) % len(shards)
            state["pos"] = B * T * rank
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return MAX_LR * (step + 1) / WARMUP
        ratio = (step - WARMUP) / (MAX_STEPS - WARMUP)
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (MAX_LR - MIN_LR)

    losses = []
    for step in range(MAX_STEPS):
        model.train()
        optimizer.zero_grad()
        loss_accum = 0.0
        for _ in range(ACCUM):
            x, y = next_batch()
            _, loss = model(x, y)
            loss = loss / ACCUM
            loss_accum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.step()
        losses.append(f"{loss_accum.item():.6f}")
    return init, model.state_dict(), losses, shard_of_batch


@pytest.mark.slow
def test_float32_cpu_training_matches_build_nanogpt_bit_for_bit(tmp_path):
    data, log = tmp_path / "data", tmp_path / "log"
    write_shards(data, n_train=2, tokens_per_shard=TOKENS_PER_SHARD)
    r = run_script(
        "train_gpt.py",
        *TINY,
        "--device", "cpu", "--dtype", "float32", "--no-chunked-loss", "--no-fused-adamw", "--seed", str(SEED),
        "--batch-size", str(B), "--seq-len", str(T), "--total-batch-size", str(TOTAL_BATCH),
        "--max-lr", repr(MAX_LR), "--min-lr", repr(MIN_LR), "--warmup-steps", str(WARMUP),
        "--max-steps", str(MAX_STEPS), "--weight-decay", "0.1", "--grad-clip", "1.0",
        "--eval-every", "0", "--sample-every", "0", "--hellaswag-every", "0", "--save-every", str(MAX_STEPS),
        "--data-dir", str(data), "--log-dir", str(log),
        timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    printed = [(int(m.group(1)), m.group(2)) for m in STEP_RE.finditer(r.stdout)]
    assert [s for s, _ in printed] == list(range(MAX_STEPS)), r.stdout
    ckpt_path = log / f"model_{MAX_STEPS:05d}.pt"
    assert ckpt_path.exists(), sorted(p.name for p in log.iterdir())
    trained = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]

    # the reference in this process: one thread (as run_script's OMP_NUM_THREADS=1), the matmul precision
    # both scripts set, and the global RNG and settings of the other tests left as they were
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        torch.set_num_threads(1)
        torch.set_float32_matmul_precision("high")
        with torch.random.fork_rng(devices=[]):
            init, ref, ref_losses, shard_of_batch = reference_run(data)
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)

    # the scenario happened: a shard change mid-run and a wrap to the first shard, and weights that moved
    assert shard_of_batch == [0] * 7 + [1] * 7 + [0] * 2
    assert all(not torch.equal(init[k], ref[k]) for k in ref), "a tensor the reference never updated"
    assert len(set(ref_losses)) > MAX_STEPS // 2, ref_losses

    assert [loss for _, loss in printed] == ref_losses
    assert trained.keys() == ref.keys()
    differing = [k for k in ref if not torch.equal(trained[k], ref[k])]
    diff = max(((trained[k] - ref[k]).abs().max().item() for k in differing), default=0.0)
    assert not differing, (
        f"{len(differing)} of {len(ref)} tensors differ from build-nanogpt's loop (max |diff| {diff:.3g}): {differing}"
    )
