"""Tests for train_gpt.py's core: the model, the loss, the schedule, sampling, and the CLI end to end.

Unit tests use a tiny model on the CPU; the CLI tests run `python train_gpt.py ...` in a subprocess,
as a user would, on learnable token shards written here (those are marked slow).
"""

import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT, TINY, run_script, train_losses, write_shards

import train_gpt
from sampling import filter_logits, sample_next_token
from shards import write_shard
from train_gpt import (
    GPT,
    IGNORE_INDEX,
    DataLoaderLite,
    GPTConfig,
    TrainConfig,
    cross_entropy,
    evaluate_loss,
    get_lr,
    runtime,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these tensors are too small to gain from threads, and on a shared 2-core machine extra ones only contend
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**config, **overrides}))


# -----------------------------------------------------------------------------
# parameter count and architecture


def unique_params(model: nn.Module) -> int:
    # by identity, not data_ptr: every meta tensor reports data_ptr 0
    seen = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(seen.values())


@pytest.mark.parametrize("vocab_size, expected", [(50257, 124_439_808), (50304, 124_475_904)])
def test_124m_parameter_count(vocab_size, expected):
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=vocab_size, **train_gpt.MODEL_SHAPES["gpt2"]))
    V, C, L, T = vocab_size, 768, 12, 1024
    # wte + wpe + per block (qkv, proj, fc, proj matrices and biases, two layer norms) + ln_f
    assert V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C == expected
    assert unique_params(model) == expected
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - T * C
    # the tie is what keeps lm_head from adding another V*C
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert with_duplicates == expected + V * C
    assert 124_475_904 - 124_439_808 == (50304 - 50257) * 768


def test_wte_tied_to_lm_head():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    # a gradient through the head and one through the embedding land in the same tensor
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_linear_biases_and_tanh_gelu():
    model = tiny_gpt()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 2 * 4 + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer, and lm_head
    for name, m in linears.items():
        assert (m.bias is None) == (name == "lm_head"), name
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 2
    assert all(g.approximate == "tanh" for g in gelus)
    x = torch.linspace(-4, 4, 101)
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(model.transformer.h[0].mlp.gelu(x), tanh_gelu, rtol=0, atol=1e-6)
    # and it is not the exact erf GELU, which differs by up to ~1e-3 on this range
    assert (F.gelu(x) - tanh_gelu).abs().max() > 1e-4


def test_init_std():
    n_layer = 4
    model = tiny_gpt(seed=1, n_layer=n_layer, n_embd=256, n_head=4, vocab_size=512)
    residual = 0.02 / math.sqrt(2 * n_layer)
    expected = {"transformer.wte.weight": 0.02, "transformer.wpe.weight": 0.02}
    for i in range(n_layer):
        expected |= {
            f"transformer.h.{i}.attn.c_attn.weight": 0.02,
            f"transformer.h.{i}.attn.c_proj.weight": residual,
            f"transformer.h.{i}.mlp.c_fc.weight": 0.02,
            f"transformer.h.{i}.mlp.c_proj.weight": residual,
        }
    params = dict(model.named_parameters())
    for name, std in expected.items():
        p = params[name].detach()
        # >= 65k samples each: the empirical std is within ~0.5% of the true one
        assert abs(p.std().item() - std) < 0.03 * std, name
        assert abs(p.mean().item()) < 0.05 * std, name
    for name, p in params.items():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.all(p == 1), name
        else:
            assert name in expected or name == "lm_head.weight", name


# -----------------------------------------------------------------------------
# the loss


def reference_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log_softmax(logits)[target] over the positions that are not ignored, in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1).reshape(-1, logits.size(-1))
    t = targets.reshape(-1)
    keep = t != IGNORE_INDEX
    return -logp[keep, t[keep]].mean()


@pytest.mark.parametrize("chunk", [0, 1, 7, None])
def test_model_loss_matches_log_softmax(chunk):
    model = tiny_gpt()
    if chunk is not None:
        model.loss_chunk_rows = chunk
    else:  # the default: chunks of the device's size, 512 rows on the CPU (one chunk for these 48 rows)
        assert model.loss_chunk_rows is None
        assert train_gpt.default_loss_chunk_rows("cpu") == 512 and train_gpt.default_loss_chunk_rows("cuda") == 8192
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (3, 16), generator=g)
    targets = torch.randint(0, 64, (3, 16), generator=g)
    targets[torch.rand(3, 16, generator=g) < 0.25] = IGNORE_INDEX
    targets[1, :] = IGNORE_INDEX  # a whole row of padding
    assert (targets != IGNORE_INDEX).sum() > 10
    logits, none = model(idx)
    assert none is None and logits.shape == (3, 16, 64)
    none, loss = model(idx, targets)
    assert none is None and loss.dim() == 0
    assert abs(loss.item() - reference_loss(logits, targets).item()) < 1e-5


@pytest.mark.parametrize(
    "chunk",
    [0, 1, 7, 1024],
)
def test_all_ignored_loss_is_zero_not_nan(chunk):
    model = tiny_gpt()
    model.loss_chunk_rows = chunk
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, torch.full((2, 8), IGNORE_INDEX))
    loss.backward()
    for name, p in model.named_parameters():
        assert torch.all(p.grad == 0), name  # nothing to learn from, and above all no nan
    assert loss.item() == 0.0


def ce_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(150, 16, generator=g, dtype=dtype).requires_grad_()
    w = (0.5 * torch.randn(100, 16, generator=g, dtype=dtype)).requires_grad_()
    t = torch.randint(0, 100, (150,), generator=g)
    t[::7] = IGNORE_INDEX
    return x, w, t


def loss_and_grads(x, w, t, chunk):
    loss = cross_entropy(x, w, t, chunk)
    return (loss, *torch.autograd.grad(loss, (x, w)))


# float32 agrees to ~3e-6 on the loss (~6) and ~3e-8 on the gradients; float64 inputs keep the
# softmax in float64, so there the two paths agree to rounding
@pytest.mark.parametrize("dtype, loss_tol, grad_tol", [(torch.float32, 1e-5, 1e-7), (torch.float64, 1e-12, 1e-14)])
@pytest.mark.parametrize("chunk", [1, 5, 64, 1024])
def test_chunked_loss_equals_plain(chunk, dtype, loss_tol, grad_tol):
    x, w, t = ce_inputs(dtype)
    ref_loss, ref_gx, ref_gw = loss_and_grads(x, w, t, 0)
    loss, gx, gw = loss_and_grads(x, w, t, chunk)
    assert loss.dtype == ref_loss.dtype == dtype
    assert gx.dtype == gw.dtype == dtype
    assert abs(loss.item() - ref_loss.item()) < loss_tol
    assert (gx - ref_gx).abs().max() < grad_tol
    assert (gw - ref_gw).abs().max() < grad_tol
    # and the plain path itself is the textbook value
    keep = t != IGNORE_INDEX
    textbook = -torch.log_softmax(x.detach().double() @ w.detach().double().t(), -1)[keep, t[keep]].mean()
    assert abs(ref_loss.item() - textbook.item()) < 1e-5


@pytest.mark.parametrize("chunk", [1, 5, 64, 1024])
def test_chunked_loss_equals_plain_under_bf16_autocast(chunk):
    x, w, t = ce_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_gx, ref_gw = loss_and_grads(x, w, t, 0)
        loss, gx, gw = loss_and_grads(x, w, t, chunk)
    assert gx.dtype == gw.dtype == torch.float32
    # the plain bf16 loss to float32 rounding (measured <= 1.5e-6; the two float32 paths differ by 5e-7)
    assert abs(loss.item() - ref_loss.item()) < 2e-5
    # relative to the largest entry: both multiply bf16 roundings of the same numbers, rounded at other points
    assert (gx - ref_gx).abs().max() < 1e-2 * ref_gx.abs().max()
    assert (gw - ref_gw).abs().max() < 1e-2 * ref_gw.abs().max()
    # and bf16 really computed it: the float32 loss and gradients are 3.6e-4 and ~0.5% away (measured), far more
    # than float32 rounding, so a chunked loss that ignored autocast would fail the first check above
    f32_loss, f32_gx, f32_gw = loss_and_grads(x, w, t, 0)
    assert 1e-4 < abs(loss.item() - f32_loss.item()) < 1e-2 * loss.item()
    assert (gx - f32_gx).abs().max() > 1e-3 * f32_gx.abs().max()
    assert (gw - f32_gw).abs().max() > 1e-3 * f32_gw.abs().max()


@pytest.mark.parametrize("chunk", [0, 1, 5, 64, 1024])
def test_loss_without_grad_equals_loss_with_grad(chunk):
    x, w, t = ce_inputs(torch.float32)
    with_grad = cross_entropy(x, w, t, chunk)
    with torch.no_grad():
        without = cross_entropy(x, w, t, chunk)
    assert not without.requires_grad
    assert abs(without.item() - with_grad.item()) < 1e-5
    # and so do inputs that need no gradient, in grad mode
    assert abs(cross_entropy(x.detach(), w.detach(), t, chunk).item() - with_grad.item()) < 1e-5


# -----------------------------------------------------------------------------
# learning rate schedule and gradient accumulation


def test_lr_schedule():
    # the defaults are build-nanogpt's schedule, min_lr computed as it does (one ulp above 6e-5)
    cfg = TrainConfig()
    min_lr = 6e-4 * 0.1
    assert (cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == (6e-4, min_lr, 715, 19073)
    lr = lambda step: get_lr(step, cfg)  # noqa: E731
    assert lr(0) == pytest.approx(6e-4 / 715, rel=1e-12)
    assert lr(1) == pytest.approx(2 * 6e-4 / 715, rel=1e-12)
    assert lr(714) == pytest.approx(6e-4, rel=1e-12)
    assert lr(715) == pytest.approx(6e-4, rel=1e-12)  # the cosine starts at the peak
    assert (715 + 19073) % 2 == 0
    assert lr((715 + 19073) // 2) == pytest.approx((6e-4 + min_lr) / 2, rel=1e-12)
    assert lr(19072) > min_lr
    assert lr(19073) == pytest.approx(min_lr, rel=1e-12)
    assert lr(19074) == lr(100_000) == min_lr
    # and every field of the schedule comes from the config
    other = replace(cfg, max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert get_lr(4, other) == pytest.approx(5e-4, rel=1e-12)
    assert get_lr(60, other) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)
    assert get_lr(110, other) == 1e-4
    # rising through the warmup, falling from the peak; min_lr + (max_lr - min_lr) at 715 rounds one ulp
    # below max_lr with build-nanogpt's min_lr, as in its own schedule, so the two ranges meet at the peak
    warmup = [lr(s) for s in range(0, 715)]
    decay = [lr(s) for s in range(715, 19080, 7)]
    assert warmup == sorted(warmup)
    assert decay == sorted(decay, reverse=True)


@pytest.mark.parametrize("chunk", [0, 7, 1024])
def test_accumulated_micro_batches_equal_one_big_batch(chunk):
    k, B, T = 4, 2, 16
    model = tiny_gpt()
    model.loss_chunk_rows = chunk
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (k * B, T), generator=g)
    y = torch.randint(0, 64, (k * B, T), generator=g)
    _, loss = model(x, y)
    loss.backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for i in range(k):
        _, loss = model(x[i * B : (i + 1) * B], y[i * B : (i + 1) * B])
        (loss / k).backward()
    for name, p in model.named_parameters():
        assert (p.grad - big[name]).abs().max() < 1e-5, name
    assert max(g.abs().max() for g in big.values()) > 1e-3  # the comparison is not between zeros


# -----------------------------------------------------------------------------
# filtering and generation


def test_filter_top_k():
    out = filter_logits(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), top_k=2)
    assert out.tolist() == [[-math.inf, -math.inf, 3.0, 4.0]]
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    assert torch.equal(filter_logits(logits, top_k=3), logits)
    assert torch.equal(filter_logits(logits, top_k=50), logits)
    assert torch.equal(filter_logits(logits), logits)


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.3, 1),  # the most likely token always stays, even when it alone exceeds top_p
        (0.45, 1),
        (0.7, 2),
        (0.8, 2),
        (0.81, 3),
        (0.9, 3),
        (0.96, 4),
        (1.0, 4),
    ],
)
def test_filter_top_p(top_p, kept):
    # A token is dropped when the mass ranked strictly above it is already >= top_p: the kept set is
    # the smallest prefix whose mass reaches top_p. At top_p=0.8 the first two (0.5 + 0.3) reach it
    # exactly, so the third goes; float32 puts that sum at 0.8000000119 >= 0.8 here, not below it.
    probs = [0.5, 0.3, 0.15, 0.05]
    order = [2, 0, 3, 1]  # shuffled, so the mask has to be scattered back to the original positions
    logits = torch.tensor([[math.log(probs[r]) for r in order]])
    out = filter_logits(logits, top_p=top_p)
    expect_kept = [r < kept for r in order]
    assert torch.isfinite(out).tolist() == [expect_kept]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.74, 2), (0.75, 2), (0.76, 3), (0.875, 3), (0.9, 4)])
def test_filter_top_p_exact_boundaries(top_p, kept):
    # powers of two survive log, softmax and cumsum exactly, so "reaches top_p" is tested on the dot:
    # at 0.75 the first two hold exactly 0.75 and the third is dropped
    logits = torch.tensor([[math.log(p) for p in (0.5, 0.25, 0.125, 0.125)]])
    assert torch.softmax(logits, -1).cumsum(-1).tolist() == [[0.5, 0.75, 0.875, 1.0]]
    assert torch.isfinite(filter_logits(logits, top_p=top_p)).tolist() == [[i < kept for i in range(4)]]


def test_filter_top_k_then_top_p():
    logits = torch.tensor([[math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]])
    # top-k 3 renormalises to 4/9, 3/9, 2/9: 4/9 < 0.5, so top-p 0.5 keeps two
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.5)).tolist() == [[True, True, False, False]]


def test_sample_temperature_zero_is_argmax():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, temperature=0, top_k=3, top_p=0.1), logits.argmax(-1))
    # top-k 1 leaves one token with probability 1 at any temperature
    assert torch.equal(sample_next_token(logits, temperature=2.0, top_k=1), logits.argmax(-1))


def sharp_gpt(seed: int = 0) -> GPT:
    """A tiny model with large weights: varied continuations, and logits far enough apart that
    greedy choices never hinge on rounding (the cache and the plain loop sum in different orders)."""
    model = tiny_gpt(seed, block_size=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def greedy_reference(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The plain loop: the whole (cropped) context through forward every step, no cache."""
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size :])
            idx = torch.cat((idx, logits[:, -1, :].argmax(-1, keepdim=True)), dim=1)
    return idx


def test_generate_with_cache_equals_plain_greedy_loop():
    model = sharp_gpt()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, 40, temperature=0)
    assert out.shape == (2, 45)  # well past block_size 16
    assert torch.equal(out[:, :5], prompt)
    assert out.tolist() == greedy_reference(model, prompt, 40).tolist()
    assert len(set(out[0, 5:].tolist())) > 1  # not a degenerate constant continuation


def test_generate_sampling_is_reproducible_with_a_generator():
    model = tiny_gpt(block_size=16).eval()  # a fresh init's flat logits make the samples truly random
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))

    def sample(seed: int, **kw) -> list:
        return model.generate(prompt, 30, top_k=20, generator=torch.Generator().manual_seed(seed), **kw).tolist()

    assert sample(123) == sample(123)
    assert sample(123) != sample(124)
    assert sample(7, top_p=0.9) == sample(7, top_p=0.9)
    assert sample(123) != model.generate(prompt, 30, temperature=0).tolist()


def test_generate_stops_at_eos():
    model = sharp_gpt()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(prompt, 40, temperature=0)
    row0 = greedy[0, 5:].tolist()
    # an eos that row 0 emits a few tokens in
    eos = next(tok for i, tok in enumerate(row0) if i >= 2 and tok not in row0[:i])
    first = [r.index(eos) if eos in r else None for r in greedy[:, 5:].tolist()]
    out = model.generate(prompt, 40, temperature=0, eos=eos)
    if None in first:  # a row that never emits eos keeps the batch going to the end
        stop = 40
    else:
        stop = max(first) + 1
    expected = greedy[:, : 5 + stop].clone()
    for r, f in enumerate(first):
        if f is not None:
            expected[r, 5 + f :] = eos  # a finished row is padded with eos
    assert out.tolist() == expected.tolist()
    # one row alone stops right after its eos
    alone = model.generate(prompt[:1], 40, temperature=0, eos=eos)
    assert alone.tolist() == greedy[:1, : 5 + first[0] + 1].tolist()


# -----------------------------------------------------------------------------
# the CLI: a short run, its logs and checkpoint

B, T, ACCUM, STEPS, EVAL_EVERY, EVAL_STEPS, MAX_LR, WARMUP = 4, 32, 2, 16, 8, 2, 3e-3, 2
RUN_FLAGS = [
    *TINY,
    *("--batch-size", str(B), "--seq-len", str(T), "--total-batch-size", str(B * T * ACCUM)),
    *("--max-steps", str(STEPS), "--warmup-steps", str(WARMUP), "--max-lr", str(MAX_LR)),
    *("--eval-every", str(EVAL_EVERY), "--eval-steps", str(EVAL_STEPS), "--save-every", "1000"),
    *("--device", "cpu", "--dtype", "float32"),
]
STEP_RE = re.compile(
    r"step ([ \d]{4}\d) \| loss: (\d+\.\d{6}) \| lr (\d\.\d{4}e[+-]\d\d) \| norm: (\d+\.\d{4}) \| "
    r"dt: (\d+\.\d{2})ms \| tok/sec: (\d+\.\d{2})"
)
VAL_RE = re.compile(r"validation loss: (\d+\.\d{4}) \| ppl: (\d+\.\d{2})")
# log.txt: build-nanogpt's `{step} {stream} {value}` lines; each step writes train, lr, norm and toks (tokens/s)
LOG_LINE_RE = re.compile(r"\d+ (train \d+\.\d{6}|val \d+\.\d{4}|lr \d\.\d{6}e[+-]\d\d|norm \d+\.\d{4}|toks \d+)")
STEP_STREAMS = ("train", "lr", "norm", "toks")


def write_pattern_shards(data_dir: Path, splits=("val", "train", "train"), n: int = 5000) -> np.ndarray:
    """Shards repeating one 24-token cycle of distinct GPT-2 ids: every next token is predictable."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cycle = np.random.default_rng(0).choice(50257, 24, replace=False).astype(np.uint16)
    for i, split in enumerate(splits):
        write_shard(data_dir / f"pattern_{split}_{i:06d}.npy", np.tile(cycle, n // 24 + 1)[:n])
    return cycle


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_pattern_shards(root / "data")
    log_dir = root / "log"
    proc = run_script("train_gpt.py", *RUN_FLAGS, "--data-dir", str(root / "data"), "--log-dir", str(log_dir))
    assert proc.returncode == 0, proc.stderr
    return root, log_dir, proc


def read_log(log_dir: Path) -> list[tuple[int, str, float]]:
    return [
        (int(s), kind, float(v))
        for s, kind, v in (line.split() for line in (log_dir / "log.txt").read_text().splitlines())
    ]


@pytest.mark.slow
def test_short_run_loss_falls(trained):
    _, log_dir, proc = trained
    log = read_log(log_dir)
    vals = {s: v for s, kind, v in log if kind == "val"}
    assert sorted(vals) == [0, EVAL_EVERY, STEPS]
    # a fresh model predicts close to uniformly over the padded vocab
    assert abs(vals[0] - math.log(50304)) < 0.3
    assert vals[EVAL_EVERY] < vals[0] - 0.5
    assert vals[STEPS] < vals[EVAL_EVERY]
    assert vals[STEPS] < vals[0] - 1.0
    losses = train_losses(proc.stdout)
    assert losses[STEPS - 1] < losses[0] - 1.0
    # step 0 trains the model just evaluated, on data of the same cycle: the printed train loss is the
    # mean over the micro-batches (not their sum), so it matches the val loss
    assert abs(losses[0] - vals[0]) < 0.05


@pytest.mark.slow
def test_short_run_log_and_stdout_format(trained):
    _, log_dir, proc = trained
    lines = (log_dir / "log.txt").read_text().splitlines()
    expected_kinds = []
    for s in range(STEPS + 1):
        if s % EVAL_EVERY == 0 or s == STEPS:
            expected_kinds.append((s, "val"))
        if s < STEPS:
            expected_kinds += [(s, stream) for stream in STEP_STREAMS]
    assert [(int(line.split()[0]), line.split()[1]) for line in lines] == expected_kinds
    for line in lines:
        assert LOG_LINE_RE.fullmatch(line), line

    step_lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(step_lines) == STEPS
    logged = {(s, kind): v for s, kind, v in read_log(log_dir)}
    # the run's schedule: the flags it was given, the defaults for the rest
    schedule = replace(TrainConfig(), max_lr=MAX_LR, warmup_steps=WARMUP, max_steps=STEPS)
    for step, line in enumerate(step_lines):
        m = STEP_RE.fullmatch(line)
        assert m, line
        assert int(m[1]) == step
        assert float(m[2]) == logged[step, "train"]
        assert m[3] == f"{get_lr(step, schedule):.4e}"
        assert logged[step, "lr"] == float(f"{get_lr(step, schedule):.6e}")
        assert float(m[4]) == logged[step, "norm"]
        # tok/sec is this step's tokens over its time: B*T*accumulation
        dt_ms, tok_s = float(m[5]), float(m[6])
        # (both printed to 2 decimals: the bound is what that rounding allows)
        assert abs(tok_s * dt_ms / 1000 - B * T * ACCUM) <= B * T * ACCUM * 0.0051 / dt_ms + 0.0051 * dt_ms / 1000
        assert abs(logged[step, "toks"] - tok_s) <= 0.51  # the same rate, to the token
    val_lines = [VAL_RE.fullmatch(line) for line in proc.stdout.splitlines() if line.startswith("validation")]
    log_vals = [v for _, kind, v in read_log(log_dir) if kind == "val"]
    assert all(val_lines) and len(val_lines) == len(log_vals) == 3
    for m, v in zip(val_lines, log_vals):
        assert float(m[1]) == v
        # ppl comes from the unrounded loss: exp of the 4-decimal loss is off by a factor up to e^5e-5
        assert abs(float(m[2]) - math.exp(v)) <= math.exp(v) * 5.1e-5 + 0.005


@pytest.mark.slow
def test_final_checkpoint_round_trip(trained):
    root, log_dir, _ = trained
    path = log_dir / f"model_{STEPS:05d}.pt"
    assert sorted(p.name for p in log_dir.glob("model_*.pt")) == [path.name]
    assert not [p.name for p in log_dir.iterdir() if ".tmp" in p.name]
    ckpt = torch.load(path, weights_only=True)
    assert {"model", "config", "step", "val_loss", "optimizer", "args", "train_loader", "rng"} <= set(ckpt)
    assert not [k for k in ckpt["model"] if k.startswith(("_orig_mod.", "module."))]
    assert ckpt["config"] == dict(block_size=1024, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    assert ckpt["step"] == STEPS
    assert ckpt["args"]["max_steps"] == STEPS and ckpt["args"]["max_lr"] == MAX_LR
    last_val = [v for _, kind, v in read_log(log_dir) if kind == "val"][-1]
    assert round(ckpt["val_loss"], 4) == last_val
    # every micro-batch of every step consumed one window
    assert ckpt["train_loader"]["position"] == STEPS * ACCUM
    assert ckpt["train_loader"]["window_tokens"] == B * T
    assert all(int(s["step"]) == STEPS for s in ckpt["optimizer"]["state"].values())

    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(ckpt["model"]["lm_head.weight"], ckpt["model"]["transformer.wte.weight"])
    pretrained = GPT.from_pretrained(str(path))
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], pretrained(idx)[0])
    # the weights are the trained ones: they reproduce the run's final validation loss
    val = DataLoaderLite(B, T, 0, 1, "val", data_dir=str(root / "data"))
    rt = runtime("cpu", "float32")
    assert (rt.device, rt.dtype) == ("cpu", torch.float32)
    assert abs(evaluate_loss(model, val, EVAL_STEPS, rt) - ckpt["val_loss"]) < 1e-5


# -----------------------------------------------------------------------------
# bad input: one `error:` line, exit 1, no traceback, and no training


def expected_errors(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (extra flags, the exact stderr line)."""
    return {
        "missing data dir": (
            ["--data-dir", str(tmp / "nope")],
            f"error: --data-dir {tmp / 'nope'}: no such directory; make shards with `python fineweb.py`",
        ),
        "no val split": (
            ["--data-dir", str(tmp / "train_only")],
            f"error: --data-dir {tmp / 'train_only'}: no 'val' shards (*_val_*.npy or .bin); run fineweb.py",
        ),
        "indivisible total batch": (
            ["--total-batch-size", "1000"],
            "error: --total-batch-size 1000 is not divisible by batch-size * seq-len * world-size = "
            "4 * 32 * 1 = 128; use a multiple of 128 such as 896 or 1024, or change --batch-size",
        ),
        "seq-len over block_size": (
            ["--seq-len", "2048", "--total-batch-size", str(4 * 2048)],
            "error: --seq-len 2048 exceeds the model's block_size 1024; use at most 1024",
        ),
        "unknown model": (  # argparse's own words, which Python versions quote differently: a prefix
            ["--model", "gpt5"],
            "error: argument --model: invalid choice: 'gpt5' (choose from ...",
        ),
        "width not divisible by heads": (
            ["--n-embd", "30", "--n-head", "4"],
            "error: --n-embd 30 is not divisible by --n-head 4; pick a head count that divides the width",
        ),
    }


@pytest.fixture
def bad_input_dir(tmp_path):
    write_shards(tmp_path / "data")
    write_shards(tmp_path / "train_only", n_train=1)
    (tmp_path / "train_only" / "test_val_000000.npy").unlink()
    return tmp_path


def bad_input_args(tmp: Path, extra: list[str]) -> list[str]:
    # a valid run but for the one problem; max-steps bounds the damage if a check ever comes too late
    base = [*TINY, "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "128", "--max-steps", "3"]
    return [*base, "--device", "cpu", "--data-dir", str(tmp / "data"), "--log-dir", str(tmp / "log"), *extra]


@pytest.mark.parametrize("case", list(expected_errors(Path("/x"))))
def test_bad_input_fails_with_one_error_line(bad_input_dir, case, capsys):
    # in-process main(), the very function the script runs, to skip a torch start-up per case;
    # train() seeds torch and sets the matmul precision, which must not leak into other tests
    extra, expected = expected_errors(bad_input_dir)[case]
    rng, precision = torch.get_rng_state(), torch.get_float32_matmul_precision()
    try:
        with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback
            train_gpt.main(bad_input_args(bad_input_dir, extra))
    finally:
        torch.set_rng_state(rng)
        torch.set_float32_matmul_precision(precision)
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    if expected.endswith("..."):
        assert len(lines) == 1 and lines[0].startswith(expected.removesuffix("...")), lines
        assert lines[0].endswith(" (see --help)") and all(name in lines[0] for name in train_gpt.MODEL_SHAPES)
    else:
        assert lines == [expected]
    assert not [line for line in out.splitlines() if line.startswith(("step ", "validation"))]
    assert not (bad_input_dir / "log" / "log.txt").exists()


@pytest.mark.slow
def test_bad_input_from_the_command_line(bad_input_dir):
    extra, expected = expected_errors(bad_input_dir)["no val split"]
    proc = run_script("train_gpt.py", *bad_input_args(bad_input_dir, extra))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [expected]
    assert not (bad_input_dir / "log" / "log.txt").exists()


@pytest.mark.slow
def test_benchmark_mode_times_synthetic_steps_and_writes_nothing(tmp_path):
    # run from an empty folder without --data-dir (synthetic tokens: no data needed) and nothing appears there
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_gpt.py"), *TINY]
        + ["--device", "cpu", "--dtype", "float32", "--batch-size", "2", "--seq-len", "32", "--total-batch-size", "64"]
        + ["--benchmark-steps", "2", "--benchmark-warmup", "1"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # the run is exactly warmup + timed steps long, with nothing periodic (no eval, samples or checkpoints)
    assert [int(m[1]) for m in map(STEP_RE.match, lines) if m] == [0, 1, 2]
    assert not [line for line in lines if line.startswith(("validation", "hellaswag", "rank 0 sample"))]
    assert re.fullmatch(
        r"benchmark: 2 steps after 1 warmup \| dtype float32 \| [\d,]+ tok/s \| \d+\.\d ms/step \| "
        r"peak memory \d+\.\d\d GiB max RSS \| \d+\.\d GFLOP/s achieved, MFU \d+\.\d% of \d+ GFLOP/s, "
        r"a measured float32 matmul peak of this CPU \| start-up \d+\.\d s",
        lines[-1],
    ), lines[-1]
    assert os.listdir(tmp_path) == []
