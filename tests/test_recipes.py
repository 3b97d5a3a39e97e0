"""The training recipes beyond build-nanogpt's: the WSD schedule, Muon, dropout, the lr/norm/toks log streams
and Weights & Biases logging (offline).

Every run uses the tiny model on random-token shards, float32 on one CPU thread, so that a resumed run must
reproduce an uninterrupted one bit for bit (compared as the printed 6-decimal strings) and 2 torchrun ranks
must match one process with twice the gradient accumulation to float rounding. The expected numbers come
from hand computation (the schedule), from runs that do not use the feature (dropout 0), or from the other
side of the same scenario (a run against its kill -9 and resume; W&B's records against log.txt).

Subprocess tests are marked slow; the in-process ones (schedule values, optimizer split, dropout semantics)
take a few seconds in all.
"""

import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, Launch, write_shards
from test_resume import restored_flags, resumed_from

import checkpoint
import plots
import tokenizer
import train_gpt

TIMEOUT = 180  # per process; generous because the machine is shared, a hang still fails instead of blocking

# 4*32*2 = 256 tokens a step on one process: 2 micro-batches; 16 steps use 32 of the 78 train windows
COMMON = [
    *TINY,
    "--device", "cpu", "--dtype", "float32",
    "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "256",
    "--max-lr", "6e-3", "--min-lr", "6e-4", "--warmup-steps", "4",
    "--eval-every", "4", "--eval-steps", "2", "--save-every", "4",
]  # fmt: skip
# cooldown 0.25: 3 steps of a 12-step run (from step 9), 4 of a 16-step run (from step 12); no rounding ties
WSD = ["--lr-schedule", "wsd", "--cooldown-frac", "0.25"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEP_RE = re.compile(r"^step\s+(\d+) \| loss: (\S+) \| lr (\S+) \| norm: (\S+) \| dt: (\S+)ms \| tok/sec: (\S+)", re.M)
STOPPED_RE = re.compile(r"^stopped at step (\d+): checkpoint written to (\S+); continue with --resume$", re.M)
# log.txt's precision of each stream, restated here rather than read from train_gpt
LOG_FORMATS = {"train": ".6f", "lr": ".6e", "toks": ".0f", "skip": ".0f", "val": ".4f", "norm": ".4f", "hella": ".4f"}


def cli(data: Path, log: Path, *extra: str) -> list[str]:
    """train_gpt.py arguments; later flags override the COMMON ones (argparse keeps the last)."""
    return ["train_gpt.py", *COMMON, "--data-dir", str(data), "--log-dir", str(log), *extra]


def loss_strings(stdout: str) -> dict[int, str]:
    """step -> the loss exactly as printed, for bit-for-bit comparisons."""
    return {int(m.group(1)): m.group(2) for m in STEP_RE.finditer(stdout)}


def step_fields(stdout: str) -> dict[int, dict[str, str]]:
    """step -> the printed loss, lr, norm, dt and tok/sec of its stdout line."""
    names = ("loss", "lr", "norm", "dt", "toks")
    return {int(m.group(1)): dict(zip(names, m.groups()[1:])) for m in STEP_RE.finditer(stdout)}


def log_lines(log: Path, timing: bool = False) -> list[str]:
    """log.txt's lines; without the toks stream (a wall-clock measure) unless timing."""
    lines = (log / "log.txt").read_text().splitlines()
    return lines if timing else [line for line in lines if line.split()[1] != "toks"]


def ckpt(log: Path, step: int) -> dict:
    return checkpoint.load_checkpoint(str(log / f"model_{step:05d}.pt"), checkpoint.RESUME_KEYS)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def optimizer_state(c: dict) -> tuple[dict[str, dict], list[dict]]:
    """(parameter name -> optimizer state, the param groups with parameter names) of a checkpoint: its one
    full optimizer state dict keyed by name, or (the format of an earlier version) a list of the optimizers'
    own state dicts keyed by position, named here through the optimizers of a model of the same shape."""
    saved = c["optimizer"]
    if isinstance(saved, dict) and isinstance(saved["param_groups"][0]["params"][0], str):
        return saved["state"], saved["param_groups"]
    with torch.random.fork_rng(devices=[]):
        model = train_gpt.GPT(train_gpt.GPTConfig(**c["config"]))
    opts = model.configure_optimizers(0.1, 1e-3, "cpu", optimizer=c["args"].get("optimizer", "adamw"))
    names = {id(p): n for n, p in model.named_parameters()}
    state, groups = {}, []
    for opt, sd in zip(opts, [saved] if isinstance(saved, dict) else saved, strict=True):
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        state.update({order[i]: s for i, s in sd["state"].items()})
        groups += [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return state, groups


def run_ok(*args: str, env: dict | None = None) -> str:
    """python args... to the end, exit 0; its stdout."""
    with Launch([sys.executable, *args], env) as run:
        assert run.finish() == 0, run.report()
        return run.stdout


@dataclass
class Run:
    log: Path
    stdout: str
    losses: dict[int, str]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_shards(d)
    return d


@pytest.fixture(scope="module")
def wsd16(data, tmp_path_factory) -> Run:
    """A fresh 16-step WSD run (checkpoints at 4, 8, 12, 16), without any --dropout flag."""
    log = tmp_path_factory.mktemp("wsd16")
    out = run_ok(*cli(data, log, *WSD, "--max-steps", "16"))
    losses = loss_strings(out)
    assert sorted(losses) == list(range(16))
    assert len(set(losses.values())) > 8, "the losses barely move; the comparisons would prove little"
    return Run(log, out, losses)


@pytest.fixture(scope="module")
def wsd12(data, tmp_path_factory) -> Run:
    """The same recipe planned for 12 steps, with an explicit --dropout 0.0."""
    log = tmp_path_factory.mktemp("wsd12")
    out = run_ok(*cli(data, log, *WSD, "--max-steps", "12", "--dropout", "0.0"))
    assert sorted(loss_strings(out)) == list(range(12))
    return Run(log, out, loss_strings(out))


@pytest.fixture(scope="module")
def muon12(data, tmp_path_factory) -> Run:
    """An uninterrupted 12-step Muon + AdamW run on the cosine schedule (checkpoints at 4, 8, 12)."""
    log = tmp_path_factory.mktemp("muon12")
    out = run_ok(*cli(data, log, "--optimizer", "muon", "--max-steps", "12"))
    assert sorted(loss_strings(out)) == list(range(12))
    return Run(log, out, loss_strings(out))


# -----------------------------------------------------------------------------
# the WSD schedule


def lr_at(step: int, **kw) -> float:
    return train_gpt.get_lr(step, replace(train_gpt.TrainConfig(), **kw))


WSD_100 = dict(lr_schedule="wsd", max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, cooldown_frac=0.2)


@pytest.mark.parametrize(
    "step, expected",
    [
        # warmup: max_lr * (step + 1) / 10
        (0, 1e-4), (4, 5e-4), (9, 1e-3),
        # plateau: exactly max_lr
        (10, 1e-3), (50, 1e-3), (79, 1e-3),
        # cooldown: the last 0.2 * 100 = 20 steps, from max_lr at 80 linearly to min_lr at 100
        (80, 1e-3), (85, 1e-3 - 0.25 * 9e-4), (90, 5.5e-4), (99, 1e-3 - 0.95 * 9e-4), (100, 1e-4),
        # after the end
        (150, 1e-4),
    ],
)  # fmt: skip
def test_wsd_schedule_values(step, expected):
    assert lr_at(step, **WSD_100) == pytest.approx(expected, rel=1e-12, abs=0)
    if 10 <= step <= 80:
        assert lr_at(step, **WSD_100) == 1e-3  # the plateau is max_lr itself, not a rounding of it


def test_wsd_is_monotone_and_does_not_move_before_the_cooldown_when_max_steps_grows():
    lrs = [lr_at(s, **WSD_100) for s in range(101)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # up during warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then never up
    # a 100-step plan grown to 160 steps: identical up to the old cooldown's start (step 80), then apart
    longer = dict(WSD_100, max_steps=160)
    assert [lr_at(s, **longer) for s in range(81)] == lrs[:81]
    assert lr_at(90, **longer) == 1e-3 != lrs[90]
    assert lr_at(128, **longer) == 1e-3 and lr_at(144, **longer) == pytest.approx(5.5e-4, rel=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-4), (9, 1e-3),  # the same warmup
        (10, 1e-3),  # cosine starts at max_lr
        (55, 5.5e-4),  # half way: min + (max - min) / 2
        (100, 1e-4), (150, 1e-4),
    ],
)  # fmt: skip
def test_cosine_is_the_default_and_unchanged(step, expected):
    assert train_gpt.TrainConfig().lr_schedule == "cosine"
    cos = {k: v for k, v in WSD_100.items() if k != "lr_schedule"}
    assert lr_at(step, **cos) == pytest.approx(expected, rel=1e-12)
    # build-nanogpt's formula, written out again
    if 10 <= step <= 100:
        ratio = (step - 10) / 90
        assert lr_at(step, **cos) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * 9e-4)
    # the cooldown fraction is a WSD setting only
    assert lr_at(step, **{**cos, "cooldown_frac": 0.7}) == lr_at(step, **cos)


def hand_lr(step: int, max_steps: int) -> float:
    """The lr of COMMON + WSD: warmup 4 to 6e-3; cooldown 3 steps (from 9) of 12, or 4 (from 12) of 16."""
    if step < 4:
        return 6e-3 * (step + 1) / 4
    cooldown = {12: 3, 16: 4}[max_steps]
    start = max_steps - cooldown
    return 6e-3 - max(0, step - start) / cooldown * (6e-3 - 6e-4)


@pytest.mark.slow
def test_wsd_resume_with_more_steps_from_the_plateau_equals_the_longer_run(wsd12, wsd16, tmp_path):
    # the two plans share the lr up to the 12-step cooldown: the same losses up to step 10, then apart
    fields12, fields16 = step_fields(wsd12.stdout), step_fields(wsd16.stdout)
    for s in range(12):
        assert fields12[s]["lr"] == f"{hand_lr(s, 12):.4e}"
    for s in range(16):
        assert fields16[s]["lr"] == f"{hand_lr(s, 16):.4e}"
    assert [fields16[s]["lr"] for s in (12, 13, 14, 15)] == ["6.0000e-03", "4.6500e-03", "3.3000e-03", "1.9500e-03"]
    assert [fields12[s]["lr"] for s in (9, 10, 11)] == ["6.0000e-03", "4.2000e-03", "2.4000e-03"]
    assert {s: wsd12.losses[s] for s in range(11)} == {s: wsd16.losses[s] for s in range(11)}
    assert wsd12.losses[11] != wsd16.losses[11], "the 12-step cooldown changed nothing; the test would prove little"

    # the 12-step run as a kill right after its step-4 checkpoint (in the plateau) leaves it
    log = tmp_path / "log"
    shutil.copytree(wsd12.log, log)
    for step in (8, 12):
        (log / f"model_{step:05d}.pt").unlink()
    assert ckpt(log, 4)["args"]["max_steps"] == 12
    out = run_ok("train_gpt.py", "--log-dir", str(log), "--resume", "--max-steps", "16")
    assert resumed_from(out) == (str(log / "model_00004.pt"), 4)
    restored = restored_flags(out)
    assert restored["lr_schedule"] == "wsd" and restored["cooldown_frac"] == "0.25" and "max_steps" not in restored
    assert "moves the LR" not in out, "a plateau checkpoint's lr does not depend on --max-steps under WSD"
    assert loss_strings(out) == {s: wsd16.losses[s] for s in range(4, 16)}
    assert {s: f["lr"] for s, f in step_fields(out).items()} == {s: fields16[s]["lr"] for s in range(4, 16)}
    assert log_lines(log) == log_lines(wsd16.log)
    resumed, fresh = ckpt(log, 16), ckpt(wsd16.log, 16)
    assert same_tensors(resumed["model"], fresh["model"])
    assert resumed["args"]["max_steps"] == 16 and resumed["train_loader"] == fresh["train_loader"]


# -----------------------------------------------------------------------------
# the lr / norm / toks streams of log.txt, and the plot


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


@pytest.mark.slow
def test_log_has_lr_norm_toks_for_every_step_and_curves_png(wsd16):
    lines = log_lines(wsd16.log, timing=True)
    parsed = [line.split(" ") for line in lines]
    assert all(len(p) == 3 and p[0].isdigit() for p in parsed), lines
    by = {}
    for step, stream, value in parsed:
        assert (int(step), stream) not in by, f"{step} {stream} twice"
        by[int(step), stream] = value
    fields = step_fields(wsd16.stdout)
    for s in range(16):
        assert by[s, "train"] == wsd16.losses[s]
        assert re.fullmatch(r"\d\.\d{6}e-0\d", by[s, "lr"]) and by[s, "lr"] == f"{hand_lr(s, 16):.6e}"
        assert re.fullmatch(r"\d+\.\d{4}", by[s, "norm"]) and by[s, "norm"] == fields[s]["norm"]
        assert re.fullmatch(r"\d+", by[s, "toks"])
        assert abs(int(by[s, "toks"]) - float(fields[s]["toks"])) <= 0.51  # stdout has 2 decimals
        assert float(by[s, "toks"]) == pytest.approx(256 / (float(fields[s]["dt"]) / 1000), rel=1e-3, abs=1)
    assert {s for s, _ in by} == set(range(17)) and {k for k in by if k[0] == 16} == {(16, "val")}
    assert sorted(stream for s, stream in by if s == 0) == ["lr", "norm", "toks", "train", "val"]
    assert sorted(stream for s, stream in by if s == 5) == ["lr", "norm", "toks", "train"]

    streams = plots.read_log(str(wsd16.log / "log.txt"))
    assert set(streams) == {"train", "val", "lr", "norm", "toks"}
    for name in ("train", "lr", "norm", "toks"):
        assert streams[name] == (list(range(16)), [float(by[s, name]) for s in range(16)])
    assert streams["val"][0] == [0, 4, 8, 12, 16]
    assert streams["lr"][1][12:] == pytest.approx([6e-3, 4.65e-3, 3.3e-3, 1.95e-3], rel=1e-6)

    # curves.png: loss, val perplexity and the lr panel side by side (5 x 4 inches each, 100 dpi)
    assert png_size(wsd16.log / "curves.png") == (1500, 400)


# -----------------------------------------------------------------------------
# dropout


def tiny_model(dropout: float = 0.0, seed: int = 0) -> train_gpt.GPT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = train_gpt.GPT(train_gpt.GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32))
    model.config.dropout = dropout
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (3, 24), generator=g), torch.randint(0, 512, (3, 24), generator=g)


def loss_and_grads(model: train_gpt.GPT, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def spy_dropout(monkeypatch, apply: bool = True) -> list[tuple]:
    """Record each F.dropout (p, training) and each attention's dropout_p; with apply=False, as the code was
    before dropout existed: F.dropout returns its input and attention gets no dropout_p."""
    calls: list[tuple] = []
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def spy(t, p=0.5, training=True, inplace=False):
        calls.append(("dropout", p, training))
        return dropout(t, p, training, inplace) if apply else t

    def spy_sdpa(*args, dropout_p=0.0, **kw):
        calls.append(("sdpa", dropout_p))
        return sdpa(*args, dropout_p=dropout_p, **kw) if apply else sdpa(*args, **kw)

    monkeypatch.setattr(F, "dropout", spy)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    return calls


def test_dropout_zero_in_training_mode_is_eval_mode_and_the_code_before_it(monkeypatch):
    model, (x, y) = tiny_model(0.0), batch()
    model.train()
    rng = torch.get_rng_state()
    train_loss, train_grads = loss_and_grads(model, x, y)
    assert torch.equal(torch.get_rng_state(), rng), "dropout 0 drew random numbers"
    model.eval()
    eval_loss, eval_grads = loss_and_grads(model, x, y)
    assert torch.equal(train_loss, eval_loss) and same_tensors(train_grads, eval_grads)

    # the forward as it was before dropout existed: no F.dropout, attention without dropout_p
    calls = spy_dropout(monkeypatch, apply=False)
    model.train()
    before_loss, before_grads = loss_and_grads(model, x, y)
    assert torch.equal(before_loss, train_loss) and same_tensors(before_grads, train_grads)
    # the patch was in the path: embeddings + (attention, MLP) per layer, and 2 attentions
    assert sorted(calls) == sorted([("dropout", 0.0, True)] * 5 + [("sdpa", 0.0)] * 2)


def test_dropout_positive_changes_training_outputs_not_eval_ones(monkeypatch):
    x, y = batch()
    plain, dropped = tiny_model(0.0), tiny_model(0.3)
    assert same_tensors(plain.state_dict(), dropped.state_dict())
    plain.eval()
    ref_loss, ref_grads = loss_and_grads(plain, x, y)
    ref_logits = plain(x)[0]

    # eval mode: deterministic, no random numbers, and exactly the dropout-0 model
    dropped.eval()
    rng = torch.get_rng_state()
    for _ in range(2):
        loss, grads = loss_and_grads(dropped, x, y)
        assert torch.equal(loss, ref_loss) and same_tensors(grads, ref_grads)
        assert torch.equal(dropped(x)[0], ref_logits)
    assert torch.equal(torch.get_rng_state(), rng)

    # training mode: other outputs, drawn from the global RNG (so the same seed gives the same ones)
    dropped.train()
    torch.manual_seed(5)
    a = dropped(x)[0]
    torch.manual_seed(5)
    b = dropped(x)[0]
    c = dropped(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, ref_logits)
    plain.train()
    assert torch.equal(plain(x)[0], ref_logits)  # dropout 0 in training mode: the eval outputs

    # where it applies: embeddings, each attention output and MLP output, inside attention in training only
    calls = spy_dropout(monkeypatch)
    dropped(x)
    assert sorted(calls, key=str) == sorted([("dropout", 0.3, True)] * 5 + [("sdpa", 0.3)] * 2, key=str)
    calls.clear()
    dropped.eval()
    dropped(x)
    assert sorted(calls, key=str) == sorted([("dropout", 0.3, False)] * 5 + [("sdpa", 0.0)] * 2, key=str)


def test_dropout_flag_reaches_every_layer(tmp_path):
    """--dropout is set on the model after it is built (a training choice, not part of the weights); the
    blocks read it from the config they share. (The resumed model's dropout: the subprocess test below.)"""
    cfg, _ = train_gpt.parse_args([*TINY, "--dropout", "0.2", "--log-dir", str(tmp_path)])
    with torch.random.fork_rng(devices=[]):
        model = train_gpt.build_model(cfg, None)
    assert model.config.dropout == 0.2
    for block in model.transformer.h:
        assert block.attn.config.dropout == block.mlp.config.dropout == 0.2


def test_samples_during_training_are_drawn_in_eval_mode(capsys):
    """The training loop samples from the model it trains (in training mode): dropout must not apply there,
    nor draw from the RNG that the training steps use. With the real GPT-2 tokenizer (it loads offline) and
    a model of GPT-2's vocabulary, as in training."""
    rt = train_gpt.Runtime("cpu", torch.float32)
    enc = tokenizer.get_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = train_gpt.GPT(train_gpt.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    model.train()
    train_gpt.print_samples(model, enc, rt, n=2, max_tokens=12)
    expected = capsys.readouterr().out
    prompt = "Hello, I'm a language model,"
    assert len(enc.encode_ordinary(prompt)) == 8  # and 4 sampled tokens each
    lines = expected.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"rank 0 sample {i}: {prompt}") for i, line in enumerate(lines))
    assert all(len(line) > len(f"rank 0 sample 0: {prompt}") for line in lines)
    model.config.dropout = 0.5
    rng = torch.get_rng_state()
    train_gpt.print_samples(model, enc, rt, n=2, max_tokens=12)
    assert capsys.readouterr().out == expected, "samples taken with dropout on"
    assert torch.equal(torch.get_rng_state(), rng), "sampling drew from the training RNG"
    assert model.training, "sampling left the model in eval mode"


@pytest.mark.slow
def test_dropout_zero_flag_gives_the_weights_of_a_run_without_it(wsd12, wsd16):
    # wsd12 passed --dropout 0.0, wsd16 no flag; both plans have the same lr up to step 8
    with_flag, without = ckpt(wsd12.log, 8), ckpt(wsd16.log, 8)
    assert with_flag["args"]["dropout"] == without["args"]["dropout"] == 0.0
    assert "--dropout" not in " ".join(cli(Path(), Path(), *WSD, "--max-steps", "16"))
    assert same_tensors(with_flag["model"], without["model"])
    (state_a, _), (state_b, _) = optimizer_state(with_flag), optimizer_state(without)
    assert state_a.keys() == state_b.keys() and all(same_tensors(state_a[k], state_b[k]) for k in state_a)
    # and the training drew no random numbers at all: the RNG is where the seeded init left it
    assert torch.equal(with_flag["rng"]["torch"], without["rng"]["torch"])
    assert torch.equal(with_flag["rng"]["torch"], rng_after_init(with_flag))


def rng_after_init(c: dict) -> torch.Tensor:
    """The torch RNG state right after the run's seeded model init (torch.manual_seed(seed), then GPT())."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c["args"]["seed"])
        train_gpt.GPT(train_gpt.GPTConfig(**{**c["config"], "dropout": 0.0}))
        return torch.get_rng_state()


@pytest.mark.slow
def test_dropout_run_trains_differently_but_evaluates_the_same_weights_alike(data, wsd16, tmp_path):
    log = tmp_path / "log"
    out = run_ok(*cli(data, log, *WSD, "--max-steps", "6", "--dropout", "0.1", "--save-every", "2"))
    losses = loss_strings(out)
    assert sorted(losses) == list(range(6))
    vals, ref_vals = ([line for line in log_lines(d) if " val " in line] for d in (log, wsd16.log))
    # step 0: the same seeded init as wsd16's, evaluated in eval mode: the same val loss; after 4 steps, not
    assert vals[0] == ref_vals[0] == f"0 val {float(ref_vals[0].split()[2]):.4f}"
    assert vals[1].startswith("4 val ") and ref_vals[1].startswith("4 val ") and vals[1] != ref_vals[1]
    assert losses[0] != wsd16.losses[0], "dropout did not touch the training loss"
    c = ckpt(log, 2)
    assert c["config"]["dropout"] == c["args"]["dropout"] == 0.1
    assert not torch.equal(c["rng"]["torch"], rng_after_init(c)), "the masks drew no random numbers"
    # the masks come from the checkpointed RNG: a resume from step 2 retraces the run exactly
    resumed_log = tmp_path / "resumed"
    resumed_log.mkdir()
    shutil.copy(log / "model_00002.pt", resumed_log)
    again = run_ok("train_gpt.py", "--log-dir", str(resumed_log), "--resume")
    assert resumed_from(again) == (str(resumed_log / "model_00002.pt"), 2)
    assert restored_flags(again)["dropout"] == "0.1"
    # (a resumed model without its dropout would print other losses from the first resumed step on)
    assert loss_strings(again) == {s: losses[s] for s in range(2, 6)}
    assert same_tensors(ckpt(resumed_log, 6)["model"], ckpt(log, 6)["model"])


# -----------------------------------------------------------------------------
# Muon for the blocks' matrices, AdamW for the rest


def test_muon_takes_exactly_the_blocks_matrices():
    model = tiny_model()
    adamw, muon = model.configure_optimizers(0.1, 1e-3, "cpu", optimizer="muon")
    assert type(adamw) is torch.optim.AdamW and type(muon) is torch.optim.Muon
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    expected = [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert sorted(muon_names) == sorted(expected)
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in adamw.param_groups)
    assert sorted(decay) == ["transformer.wpe.weight", "transformer.wte.weight"]  # lm_head is wte, tied
    assert all(model.get_parameter(n).dim() == 1 for n in no_decay) and len(no_decay) == 18
    assert sorted(muon_names + decay + no_decay) == sorted(names.values())  # each parameter in one place
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0] and muon.param_groups[0]["weight_decay"] == 0.1
    assert [o for o in model.configure_optimizers(0.1, 1e-3, "cpu") if type(o) is torch.optim.Muon] == []


@pytest.mark.slow
def test_muon_kill9_then_resume_reproduces_the_uninterrupted_run(muon12, wsd16, data, tmp_path):
    assert "| Muon: 8 (24,576 params)" in muon12.stdout  # 2 x (96x32 + 32x32 + 128x32 + 32x128)
    # the same warmup lr as the AdamW-only wsd16 run: the same first loss, then Muon's own updates
    assert muon12.losses[0] == wsd16.losses[0] and muon12.losses[1] != wsd16.losses[1]
    state, groups = optimizer_state(ckpt(muon12.log, 8))
    matrices = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip
    muon = {n: s for n, s in state.items() if "momentum_buffer" in s}
    adamw = {n: s for n, s in state.items() if "exp_avg" in s}
    assert sorted(muon) == sorted(matrices) and len(adamw) == 20 and len(state) == 28
    assert [tuple(muon[n]["momentum_buffer"].shape) for n in matrices] == [(96, 32), (32, 32), (128, 32), (32, 128)] * 2
    assert all(s["step"] == 8 for s in adamw.values())
    # every group, Muon's too, got the lr of the last step (7 of the cosine schedule)
    (muon_group,) = [g for g in groups if "ns_steps" in g]
    assert sorted(muon_group["params"]) == sorted(matrices)
    lr7 = lr_at(7, max_lr=6e-3, min_lr=6e-4, warmup_steps=4, max_steps=12)
    assert [g["lr"] for g in groups] == [lr7] * len(groups) and len(groups) == 3

    log = tmp_path / "log"
    with Launch([sys.executable, *cli(data, log, "--optimizer", "muon", "--max-steps", "12")]) as run:
        run.wait_line(r"^step\s+6 \|")
        run.kill()
        assert run.finish() == -signal.SIGKILL
    killed = loss_strings(run.stdout)
    assert killed == {s: muon12.losses[s] for s in killed} and 6 in killed
    assert (log / "model_00004.pt").exists() and not (log / "model_00012.pt").exists(), "the run was not cut short"

    out = run_ok("train_gpt.py", "--log-dir", str(log), "--resume")
    path, start = resumed_from(out)
    assert start in (4, 8) and path == str(log / f"model_{start:05d}.pt")
    assert restored_flags(out)["optimizer"] == "muon"
    assert loss_strings(out) == {s: muon12.losses[s] for s in range(start, 12)}
    assert log_lines(log) == log_lines(muon12.log)
    final, ref = ckpt(log, 12), ckpt(muon12.log, 12)
    assert same_tensors(final["model"], ref["model"])
    (mine, _), (theirs, _) = optimizer_state(final), optimizer_state(ref)
    assert mine.keys() == theirs.keys() and all(same_tensors(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_muon_on_two_torchrun_ranks_matches_one_process(muon12, data, tmp_path):
    log = tmp_path / "log"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    flags = cli(data, log, "--optimizer", "muon", "--max-steps", "4", "--eval-steps", "1")
    with Launch([*args, *flags]) as run:
        assert run.finish() == 0, run.report()
    assert "world 2 | total batch 256 = 4 x 32 x 2 x 1 accumulation steps" in run.stdout
    assert "world 1 | total batch 256 = 4 x 32 x 1 x 2 accumulation steps" in muon12.stdout
    assert run.stdout.count("| Muon: 8 (24,576 params)") == 1  # rank 0 alone prints
    losses = {s: float(v) for s, v in loss_strings(run.stdout).items()}
    assert sorted(losses) == [0, 1, 2, 3]
    loss_diff = max(abs(losses[s] - float(muon12.losses[s])) for s in range(4))
    assert loss_diff < 1e-5, (losses, muon12.losses)
    mine, ref = ckpt(log, 4), ckpt(muon12.log, 4)
    assert mine["train_loader"]["position"] == ref["train_loader"]["position"] == 8
    weight_diff = max_diff(mine["model"], ref["model"])
    assert weight_diff < 1e-5
    momentum = [
        {n: s["momentum_buffer"] for n, s in optimizer_state(c)[0].items() if "momentum_buffer" in s}
        for c in (mine, ref)
    ]
    assert len(momentum[0]) == 8
    muon_diff = max_diff(*momentum)
    assert muon_diff < 1e-5
    # --eval-steps counts per rank: 1 on 2 ranks reads the reference's 2 windows
    vals = [float(line.split()[2]) for line in log_lines(log) if " val " in line]
    ref_vals = [float(line.split()[2]) for line in log_lines(muon12.log) if " val " in line][:2]
    assert vals == pytest.approx(ref_vals, abs=1.01e-4)
    print(f"Muon, 2 ranks vs 1: max |loss diff| {loss_diff:.3g}, weights {weight_diff:.3g}, momentum {muon_diff:.3g}")


# -----------------------------------------------------------------------------
# Weights & Biases, offline


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (run-<id>.wandb), parsed with W&B's own protobuf, wandb_internal_pb2.Record.

    The file is W&B's transaction log, LevelDB's log format: a 7-byte header (":W&B", magic 0xBEE1 as a
    little-endian uint16, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of the
    type byte and the payload, the payload length as uint16, the type: 1 full, 2 first, 3 middle, 4 last); a
    block's tail shorter than a header is zero padding. The installed wandb has no Python reader of it (its Go
    core writes and reads it), so the format is read here, each chunk's checksum checked."""
    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), raw[:7]
    pos, parts, records = 7, [], []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            assert raw[pos : pos + left] == bytes(left)
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        payload = raw[pos + 7 : pos + 7 + length]
        assert len(payload) == length and zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {pos}"
        pos += 7 + length
        parts.append(payload)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        else:
            assert kind in (2, 3), kind
    assert pos == len(raw) and not parts, "a cut-off record"
    return records


@dataclass
class WandbRun:
    run_id: str
    project: str
    name: str
    config: dict
    history: dict[tuple[int, str], float]  # (step, key) -> value, W&B's own keys (_step, _runtime, ...) left out


def read_wandb_run(run_dir: Path) -> WandbRun:
    (path,) = run_dir.glob("run-*.wandb")
    run, history = None, {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            assert run is None
            run = r.run
        elif kind == "history":
            step = r.history.step.num
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    assert (step, key) not in history
                    history[step, key] = json.loads(item.value_json)
    assert run is not None, "no run record"
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    return WandbRun(run.run_id, run.project, run.display_name, config, history)


@pytest.mark.slow
def test_wandb_offline_records_what_log_txt_has_and_a_resume_continues_the_same_run(data, tmp_path):
    env = {
        **ENV,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **{f"WANDB_{k}_DIR": str(tmp_path / f"wandb_{k.lower()}") for k in ("CACHE", "CONFIG", "DATA")},
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
    }
    log = tmp_path / "log"
    argv = cli(data, log, "--max-steps", "10", "--eval-every", "3", "--save-every", "3")
    argv += ["--wandb", "testproj", "--wandb-run-name", "recipes-test"]
    with Launch([sys.executable, *argv], env) as run:
        run.wait_line(r"^step\s+4 \|")
        os.kill(run.p.pid, signal.SIGTERM)  # the trainer alone: W&B's own service must see a clean finish
        assert run.finish() == 0, run.report()
    m = STOPPED_RE.search(run.stdout)
    assert m, run.report()
    stop = int(m.group(1))
    assert 4 < stop < 10, "the run ended before the signal arrived"
    assert sorted(loss_strings(run.stdout)) == list(range(stop))

    (first_dir,) = (log / "wandb").glob("offline-run-*")
    first = read_wandb_run(first_dir)
    assert first_dir.name.endswith(f"-{first.run_id}") and re.fullmatch(r"[a-z0-9]{8}", first.run_id)
    assert (first.project, first.name) == ("testproj", "recipes-test")
    # the config is the run's flags, all of them
    cfg, _ = train_gpt.parse_args(argv[1:])
    assert first.config == json.loads(json.dumps(asdict(cfg)))
    assert first.config["max_lr"] == 6e-3 and first.config["max_steps"] == 10 and first.config["wandb"] == "testproj"
    # every checkpoint names the W&B run
    assert sorted(p.name for p in log.glob("model_*.pt")) == sorted({"model_00003.pt", f"model_{stop:05d}.pt"} | ({"model_00006.pt"} if stop > 6 else set()))  # fmt: skip
    assert {ckpt(log, s)["wandb_id"] for s in {3, stop}} == {first.run_id}

    out = run_ok("train_gpt.py", "--log-dir", str(log), "--resume", env=env)
    assert resumed_from(out) == (str(log / f"model_{stop:05d}.pt"), stop)
    assert restored_flags(out)["wandb"] == "testproj"
    assert sorted(loss_strings(out)) == list(range(stop, 10))
    dirs = sorted((log / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and first_dir in dirs
    (second_dir,) = [d for d in dirs if d != first_dir]
    second = read_wandb_run(second_dir)
    assert second.run_id == first.run_id and second_dir.name.endswith(f"-{first.run_id}")
    assert (second.project, second.name) == ("testproj", "recipes-test")
    assert second.config["resume"] is True and second.config["max_lr"] == 6e-3
    assert ckpt(log, 10)["wandb_id"] == first.run_id

    # W&B's history, both parts of the run, is log.txt (which the resume rewound to the stop) line for line
    assert not first.history.keys() & second.history.keys()
    assert {s for s, _ in first.history} == set(range(stop)) and {s for s, _ in second.history} == set(range(stop, 11))
    recorded = {**first.history, **second.history}
    as_logged = [f"{s} {k} {v:{LOG_FORMATS[k]}}" for (s, k), v in recorded.items()]
    logged = log_lines(log, timing=True)
    assert sorted(as_logged) == sorted(logged)
    streams = {k for _, k in recorded}
    assert streams == {"train", "lr", "norm", "toks", "val"}
    assert [s for s, k in sorted(recorded) if k == "val"] == [0, 3, 6, 9, 10]
    # and at full precision where it can be checked: the lr is the schedule's
    for s in range(10):
        assert recorded[s, "lr"] == lr_at(s, max_lr=6e-3, min_lr=6e-4, warmup_steps=4, max_steps=10)
