"""Scaling past one GPU's memory: --fsdp (FSDP2), --activation-checkpointing, header-only data start-up.

The subprocess runs are 2-rank torchrun jobs on CPU (gloo), float32, of the tiny model: 20 steps of 512 tokens,
so 2 micro-batches a rank (the no-sync path of gradient accumulation runs too), evaluation, HellaSwag (4 rows
written here) at steps 0/10/20, sampling at steps 5/10/15/20, a checkpoint every 5 steps. Rank 0 samples alone
and, at steps 5 and 15, with no evaluation beside it: left to itself FSDP2 plans the next backward's all-gathers
from the forward calls it has just seen, and before shard_model() stated them outright these runs aborted at step 5
with a gloo "collective mismatch". Each run goes through a probe script
that wraps train_gpt.shard_model, DDP, gathered and the activation-checkpoint call and prints what really
happened on each rank (parameters sharded and the elements each rank holds, DDP wrapping, weights gathered for
evaluation, blocks recomputed), then calls train_gpt.main as `python train_gpt.py` would. The probe also
records each worker's pid: torchrun starts its workers in sessions of their own, so a kill -9 of torchrun's
process group alone would leave them training.

What the runs are compared with, and how closely:
- FSDP against DDP, two ranks each: the losses as printed, the evaluation lines, the samples and the final
  weights and AdamW state (read back with torch.load). With two ranks a sum of two gradients is the same in
  any order, so on this CPU they agree bit for bit; the tests hold them to the brief's 1e-5 and print the
  actual differences. The default --grad-clip 1.0 never scales (every norm here is below 1, asserted): with
  clipping engaged the float32 total norm of sharded gradients is summed in another order (about 1e-4 relative),
  the clip factor differs by that much and AdamW turns it into ~1e-4 weight differences, so no 1e-5 claim
  could hold for the weights then.
- kill -9 then --resume under FSDP, and a checkpoint changing parallelism (DDP -> FSDP, FSDP -> DDP, two ranks
  each): exactly the uninterrupted run's printed losses. FSDP -> one plain process (4 micro-batches instead of
  2 x 2) sums in another order: within 1e-5.
- activation checkpointing: torch.equal losses and gradients in process (dropout too), and a 1-process run
  with the flag prints exactly the losses of the run without.
"""

import copy
import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, Launch, descendants, run_script, save_fake_checkpoint, write_shards
from test_data import too_large_message
from test_resume import STOPPED_RE, loss_strings, read_log, resumed_from, step_loss

import train_gpt
from shards import write_shard

TIMEOUT = 240  # per launch; a hang fails instead of blocking
MAX_STEPS, STEPS_PER_SAVE = 20, 5
# the 4 micro-batches of 4 x 32 tokens a step come from 2 ranks x 2 accumulation steps (or 1 x 4)
FLAGS = [
    *TINY,
    "--device", "cpu", "--dtype", "float32",
    "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "512",
    "--max-lr", "6e-3", "--min-lr", "6e-4", "--warmup-steps", "4", "--max-steps", str(MAX_STEPS),
    "--eval-every", "10", "--eval-steps", "1", "--save-every", str(STEPS_PER_SAVE),
    "--hellaswag-every", "10", "--sample-every", "5",
]  # fmt: skip
HELLASWAG_ROWS = [
    {"ctx": "The man picks up the guitar and", "endings": ["plays a song.", "eats it.", "flies away.", "is a cat."]},
    {"ctx": "She opens the oven door and", "endings": ["sings.", "takes out the bread.", "runs.", "sleeps."]},
    {"ctx": "A dog runs across the field", "endings": ["to fetch the ball.", "and reads.", "quietly.", "with a hat."]},
    {"ctx": "The children line up and", "endings": ["melt.", "board the bus.", "turn blue.", "are a tree."]},
]
N_PARAMS = 1_667_968  # the tiny model's parameters, the tied wte/lm_head counted once (28 tensors)
N_TENSORS = 28
PROBE_NAME = "fsdp_probe.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}

PROBE = """
import atexit, io, os, sys
from contextlib import contextmanager

sys.path.insert(0, {root!r})
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import train_gpt

rank = os.environ.get("RANK", "-")
# both ranks share torchrun's stdout: one write() a line (print() makes two), so lines of two ranks never mix
sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), line_buffering=True)


def say(text):
    print(f"probe: rank {{rank}} {{text}}", flush=True)


shard_model = train_gpt.parallelize.shard_model


def probed_shard_model(model, *args):
    shard_model(model, *args)
    params = list(model.parameters())
    sharded = [p for p in params if isinstance(p, DTensor)]
    held = sum(p.to_local().numel() for p in sharded)
    say(f"sharded {{len(sharded)}} of {{len(params)}} parameters, {{held}} of {{sum(p.numel() for p in params)}} elements held")


class ProbedDDP(train_gpt.DDP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        say("ddp")


gathered = train_gpt.parallelize.gathered


@contextmanager
def probed_gathered(model, enabled=True):
    with gathered(model, enabled):
        if enabled and any(isinstance(m, FSDPModule) for m in model.modules()):
            params = list(model.parameters())
            whole = sum(not isinstance(p, DTensor) for p in params)
            say(f"gathered {{whole}} of {{len(params)}} parameters whole")
        yield


recompute = train_gpt.recompute_in_backward
recomputed = [0]


def probed_recompute(*args, **kwargs):
    recomputed[0] += 1
    return recompute(*args, **kwargs)


train_gpt.parallelize.shard_model = probed_shard_model
train_gpt.DDP = ProbedDDP
train_gpt.parallelize.gathered = probed_gathered
train_gpt.recompute_in_backward = probed_recompute
atexit.register(lambda: say(f"checkpointed {{recomputed[0]}} block calls"))
train_gpt.main(sys.argv[1:])
"""

SHARDED_RE = re.compile(r"^probe: rank (\d) sharded (\d+) of (\d+) parameters, (\d+) of (\d+) elements held$", re.M)
DDP_RE = re.compile(r"^probe: rank (\d) ddp$", re.M)
GATHERED_RE = re.compile(r"^probe: rank (\d) gathered (\d+) of (\d+) parameters whole$", re.M)
CHECKPOINTED_RE = re.compile(r"^probe: rank (\S+) checkpointed (\d+) block calls$", re.M)
NORM_RE = re.compile(r"^step\s+(\d+) \|.*\| norm: (\S+) \|", re.M)
VAL_RE = re.compile(r"^validation loss: (\S+) \| ppl: \S+$", re.M)
HELLA_RE = re.compile(r"^hellaswag: acc_norm=\S+ acc=\S+ n=4$", re.M)
SAMPLE_RE = re.compile(r"^rank 0 sample \d: .*$", re.M)


@dataclass
class Setup:
    data: Path
    hellaswag: Path
    probe: Path


@dataclass
class Run:
    log: Path
    stdout: str
    stderr: str
    losses: dict[int, str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    base = tmp_path_factory.mktemp("fsdp")
    write_shards(base / "data", tokens_per_shard=10000)  # 156 train windows of 128 tokens: 20 steps use 80
    hella = base / "hellaswag"
    hella.mkdir()
    rows = [dict(row, label=i % 4) for i, row in enumerate(HELLASWAG_ROWS)]
    (hella / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    probe = base / PROBE_NAME
    probe.write_text(PROBE.format(root=str(ROOT)))
    return Setup(base / "data", hella, probe)


def flags(setup: Setup, log: Path, *extra: str) -> list[str]:
    paths = ["--hellaswag-dir", str(setup.hellaswag), "--data-dir", str(setup.data), "--log-dir", str(log)]
    return [*FLAGS, *paths, *extra]


def torchrun(setup: Setup, *args: str) -> list[str]:
    """2 ranks on this machine; --standalone picks a free rendezvous port for each job."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return [sys.executable, *launcher, str(setup.probe), *args]


def plain(setup: Setup, *args: str) -> list[str]:
    return [sys.executable, str(setup.probe), *args]


def launch_ok(cmd: list[str], log: Path) -> Run:
    with Launch(cmd, ENV, TIMEOUT) as run:
        code = run.finish()
        stdout, stderr = run.stdout, run.stderr
        assert code == 0, run.report()
    return Run(log, stdout, stderr, loss_strings(stdout))


def load(log: Path, step: int = MAX_STEPS) -> dict:
    return torch.load(log / f"model_{step:05d}.pt", map_location="cpu", weights_only=True)


def checkpoints(log: Path) -> list[str]:
    return sorted(p.name for p in log.iterdir() if p.name.startswith("model_"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def optimizer_tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, s in ckpt["optimizer"]["state"].items() for k, v in s.items()}


def assert_sharded(stdout: str) -> None:
    """Both ranks sharded every parameter and each holds half of the elements; no DDP anywhere."""
    found = {int(r): (int(n), int(of), int(held), int(total)) for r, n, of, held, total in SHARDED_RE.findall(stdout)}
    assert len(SHARDED_RE.findall(stdout)) == 2 and sorted(found) == [0, 1], stdout
    assert all(v == (N_TENSORS, N_TENSORS, N_PARAMS // 2, N_PARAMS) for v in found.values()), found
    assert not DDP_RE.search(stdout)


def assert_ddp(stdout: str) -> None:
    assert sorted(DDP_RE.findall(stdout)) == ["0", "1"], stdout
    assert not SHARDED_RE.search(stdout) and not GATHERED_RE.search(stdout)


def assert_all_steps(run: Run, steps: range) -> None:
    assert sorted(run.losses) == list(steps), run.stdout


def copy_until(src: Path, dest: Path, step: int) -> Path:
    """A run's log dir as a kill after its checkpoint at `step` leaves it (later lines are rewound on resume)."""
    shutil.copytree(src, dest)
    for name in checkpoints(dest):
        if int(name[6:11]) > step:
            (dest / name).unlink()
    return dest


# -----------------------------------------------------------------------------
# the two uninterrupted references


@pytest.fixture(scope="module")
def ddp_ref(setup, tmp_path_factory) -> Run:
    log = tmp_path_factory.mktemp("ddp_ref")
    run = launch_ok(torchrun(setup, *flags(setup, log)), log)
    assert_ddp(run.stdout)
    assert_all_steps(run, range(MAX_STEPS))
    assert len(set(run.losses.values())) > 15, "the losses barely move; the comparisons would prove little"
    assert "world 2 | total batch 512 = 4 x 32 x 2 x 2 accumulation steps" in run.stdout
    return run


@pytest.fixture(scope="module")
def fsdp_ref(setup, tmp_path_factory) -> Run:
    log = tmp_path_factory.mktemp("fsdp_ref")
    run = launch_ok(torchrun(setup, *flags(setup, log, "--fsdp")), log)
    assert_sharded(run.stdout)
    assert_all_steps(run, range(MAX_STEPS))
    assert "world 2 | total batch 512 = 4 x 32 x 2 x 2 accumulation steps" in run.stdout
    return run


# -----------------------------------------------------------------------------
# 1. FSDP trains as DDP does, evaluation, HellaSwag and sampling included


@pytest.mark.slow
def test_fsdp_matches_ddp_losses_evaluations_samples_and_final_weights(fsdp_ref, ddp_ref):
    fsdp, ddp = fsdp_ref.stdout, ddp_ref.stdout
    # per-step losses, within 1e-5 relative
    rel = max(abs(float(fsdp_ref.losses[s]) / float(ddp_ref.losses[s]) - 1) for s in range(MAX_STEPS))
    assert rel <= 1e-5, (fsdp_ref.losses, ddp_ref.losses)
    # the gradient norm is the whole model's on both (one shard's would be ~1/sqrt(2) of it), and clipping at
    # the default 1.0 never scaled a gradient: see the module docstring
    norms = {p: {int(s): float(n) for s, n in NORM_RE.findall(out)} for p, out in (("fsdp", fsdp), ("ddp", ddp))}
    assert norms["fsdp"].keys() == norms["ddp"].keys() == set(range(MAX_STEPS))
    assert max(abs(norms["fsdp"][s] - norms["ddp"][s]) for s in range(MAX_STEPS)) <= 2e-4, norms
    assert max(norms["ddp"].values()) < 1.0

    # evaluation, HellaSwag and sampling ran under FSDP, on the weights gathered on both ranks, and say what DDP's do
    gathers = GATHERED_RE.findall(fsdp)
    assert sorted(r for r, _, _ in gathers) == ["0"] * 5 + ["1"] * 5  # steps 0, 5, 10, 15 and 20
    assert all((n, of) == (str(N_TENSORS), str(N_TENSORS)) for _, n, of in gathers)
    vals = [[float(v) for v in VAL_RE.findall(out)] for out in (fsdp, ddp)]
    assert len(vals[0]) == len(vals[1]) == 3
    assert max(abs(a - b) for a, b in zip(*vals)) <= 1.01e-4, vals
    hella = [HELLA_RE.findall(out) for out in (fsdp, ddp)]
    assert len(hella[0]) == 3 and hella[0] == hella[1]
    samples = [SAMPLE_RE.findall(out) for out in (fsdp, ddp)]
    assert len(samples[0]) == 16 and samples[0] == samples[1]  # 4 at each of steps 5, 10, 15, 20, rank 0 alone
    assert all(s.startswith("rank 0 sample ") and ", I'm a language model," in s for s in samples[0])
    lines = {out: read_log(run.log) for out, run in (("fsdp", fsdp_ref), ("ddp", ddp_ref))}
    assert [line.split()[:2] for line in lines["fsdp"]] == [line.split()[:2] for line in lines["ddp"]]
    assert sum(line.split()[1] == "hella" for line in lines["fsdp"]) == 3

    # the checkpoints: the one-process format (full tensors, optimizer state keyed by name), gathered by rank 0
    assert checkpoints(fsdp_ref.log) == checkpoints(ddp_ref.log) == [f"model_{s:05d}.pt" for s in (5, 10, 15, 20)]
    a, b = load(fsdp_ref.log), load(ddp_ref.log)
    assert a.keys() == b.keys() and a["step"] == b["step"] == MAX_STEPS
    assert a["args"]["fsdp"] is True and b["args"]["fsdp"] is False
    fresh = train_gpt.GPT(train_gpt.GPTConfig(**a["config"])).state_dict()
    assert a["model"].keys() == fresh.keys()
    assert all(type(t) is torch.Tensor and t.shape == fresh[k].shape for k, t in a["model"].items())
    assert torch.equal(a["model"]["lm_head.weight"], a["model"]["transformer.wte.weight"])
    assert set(a["optimizer"]["state"]) == set(b["optimizer"]["state"]) == {n for n in fresh if n != "lm_head.weight"}
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert all(type(t) is torch.Tensor for t in optimizer_tensors(a).values())
    assert a["train_loader"] == b["train_loader"]
    weight_diff, state_diff = max_diff(a["model"], b["model"]), max_diff(optimizer_tensors(a), optimizer_tensors(b))
    assert weight_diff <= 1e-5 and state_diff <= 1e-5
    # and the weights did train: they moved well beyond that tolerance since step 5
    assert max_diff(a["model"], load(fsdp_ref.log, 5)["model"]) > 1e-3
    exact = fsdp_ref.losses == ddp_ref.losses and weight_diff == state_diff == 0
    print(
        f"FSDP vs DDP, 20 steps: max relative loss diff {rel:.3g}, max |weight diff| {weight_diff:.3g}, "
        f"max |AdamW state diff| {state_diff:.3g}; bit-exact: {exact}"
    )


# -----------------------------------------------------------------------------
# 2. kill -9 under FSDP, then --resume


@pytest.mark.slow
def test_fsdp_kill9_then_resume_reproduces_the_uninterrupted_run(setup, fsdp_ref, tmp_path):
    log = tmp_path / "log"
    with Launch(torchrun(setup, *flags(setup, log, "--fsdp")), ENV, TIMEOUT) as run:
        run.wait_line(r"^step\s+12 \|")
        workers = [pid for pid in descendants(run.p.pid) if PROBE_NAME in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
        run.kill()  # the whole job at once, as when its machine goes down
        assert run.finish() == -signal.SIGKILL, run.report()
        assert descendants(run.p.pid) == []
        killed = loss_strings(run.stdout)
    assert set(range(13)) <= set(killed) and killed == {s: fsdp_ref.losses[s] for s in killed}
    assert "model_00010.pt" in checkpoints(log) and "model_00020.pt" not in checkpoints(log), "not cut short"

    # --resume alone: --fsdp comes back from the checkpoint's flags, as every other flag
    resume = flags(setup, log, "--resume")
    assert "--fsdp" not in resume
    r = launch_ok(torchrun(setup, *resume), log)
    assert_sharded(r.stdout)
    path, start = resumed_from(r.stdout)
    assert start in (10, 15) and path == str(log / f"model_{start:05d}.pt")
    assert "fsdp=True" in r.stdout
    assert_all_steps(r, range(start, MAX_STEPS))
    assert r.losses == {s: fsdp_ref.losses[s] for s in range(start, MAX_STEPS)}  # as printed, bit for bit
    assert read_log(log) == read_log(fsdp_ref.log)  # the killed run's later lines are gone, none doubled
    final, ref = load(log), load(fsdp_ref.log)
    assert all(torch.equal(final["model"][k], ref["model"][k]) for k in ref["model"])
    assert all(torch.equal(t, optimizer_tensors(ref)[k]) for k, t in optimizer_tensors(final).items())
    print(f"FSDP kill -9 at step 12, resumed at step {start}: losses, log and final weights bit-exact")


@pytest.mark.slow
def test_fsdp_nan_guard_and_sigterm_checkpoint_then_resume_exactly(setup, fsdp_ref, tmp_path):
    """The non-finite guard and SIGTERM checkpointing under FSDP. Step 3 is poisoned on both ranks and skipped;
    SIGTERM goes to torchrun, as a scheduler sends it: torchrun passes it to its workers, which finish the step
    they are in, checkpoint and stop; --resume then prints the uninterrupted run's losses."""
    extra = ["--fsdp", "--inject-nan-steps", "3", "--max-steps", "20"]  # long enough that SIGTERM lands mid-run
    ref = launch_ok(torchrun(setup, *flags(setup, tmp_path / "ref", *extra)), tmp_path / "ref")
    assert_sharded(ref.stdout)
    steps = {int(m.group(1)): m.group(0) for m in re.finditer(r"^step\s+(\d+) \|.*$", ref.stdout, re.M)}
    assert sorted(steps) == list(range(20))
    assert steps[3].endswith(" | skipped: non-finite loss or grad norm (1 in a row)") and "loss: nan" in steps[3]
    assert not any("skipped" in steps[s] for s in steps if s != 3)
    # steps 0-2 are fsdp_ref's (the same flags and schedule)
    assert {s: ref.losses[s] for s in (0, 1, 2)} == {s: fsdp_ref.losses[s] for s in (0, 1, 2)}
    # the skipped step was no AdamW step on either rank's shards: 20 steps, 19 updates
    assert {int(s["step"]) for s in load(ref.log, 20)["optimizer"]["state"].values()} == {19}

    log = tmp_path / "log"
    with Launch(torchrun(setup, *flags(setup, log, *extra)), ENV, TIMEOUT) as run:
        run.wait_line(r"^step\s+5 \|")
        run.p.send_signal(signal.SIGTERM)
        code = run.finish()  # torchrun ends with its own SignalException report once its workers have stopped
        out = run.stdout
    assert code in (0, 1), run.report()
    assert out.count("SIGTERM: finishing this step, then checkpoint and exit (again to abort)") == 1  # rank 0 alone
    m = STOPPED_RE.search(out)
    assert m, run.report()
    stop = int(m.group(1))
    assert 5 < stop < 20 and m.group(2) == str(log / f"model_{stop:05d}.pt")
    assert loss_strings(out) == {s: ref.losses[s] for s in range(stop)}

    r = launch_ok(torchrun(setup, *flags(setup, log, *extra, "--resume")), log)
    assert resumed_from(r.stdout) == (str(log / f"model_{stop:05d}.pt"), stop)
    assert r.losses == {s: ref.losses[s] for s in range(stop, 20)}
    assert read_log(log) == read_log(ref.log)
    final, whole = load(log, 20), load(ref.log, 20)
    assert all(torch.equal(final["model"][k], whole["model"][k]) for k in whole["model"])
    print(f"FSDP: step 3 skipped; SIGTERM after step 5 stopped at step {stop}; resumed bit-exact")


# -----------------------------------------------------------------------------
# 3. one checkpoint format: resume under the other parallelism, or in one plain process


@pytest.mark.slow
@pytest.mark.parametrize("source, switch", [("ddp", "--fsdp"), ("fsdp", "--no-fsdp")])
def test_checkpoint_resumes_under_the_other_parallelism(setup, ddp_ref, fsdp_ref, tmp_path, source, switch):
    src = {"ddp": ddp_ref, "fsdp": fsdp_ref}[source]
    log = copy_until(src.log, tmp_path / "log", 10)
    r = launch_ok(torchrun(setup, *flags(setup, log, "--resume", switch)), log)
    (assert_sharded if switch == "--fsdp" else assert_ddp)(r.stdout)
    assert resumed_from(r.stdout) == (str(log / "model_00010.pt"), 10)
    assert_all_steps(r, range(10, MAX_STEPS))
    # the same losses as both uninterrupted runs, as printed
    assert r.losses == {s: src.losses[s] for s in range(10, MAX_STEPS)}
    assert r.losses == {s: (fsdp_ref if switch == "--fsdp" else ddp_ref).losses[s] for s in range(10, MAX_STEPS)}
    lines = [line for line in read_log(log) if line.split()[1] != "norm"]
    assert lines == [line for line in read_log(src.log) if line.split()[1] != "norm"]
    ckpt, ref = load(log), load(src.log)
    assert ckpt["args"]["fsdp"] is (switch == "--fsdp")
    diff = max_diff(ckpt["model"], ref["model"])
    assert diff <= 1e-5
    print(f"{source} checkpoint resumed with {switch}: losses bit-exact, max |final weight diff| {diff:.3g}")


@pytest.fixture(scope="module")
def one_process(setup, fsdp_ref, tmp_path_factory) -> Run:
    """The 2-rank FSDP run continued from its step-10 checkpoint by one plain process (4 micro-batches a step).
    --eval-steps 2 reads the val windows that 1 step on each of 2 ranks read."""
    log = copy_until(fsdp_ref.log, tmp_path_factory.mktemp("one") / "log", 10)
    r = launch_ok(plain(setup, *flags(setup, log, "--resume", "--no-fsdp", "--eval-steps", "2")), log)
    assert not SHARDED_RE.search(r.stdout) and not DDP_RE.search(r.stdout)
    assert "world 1 | total batch 512 = 4 x 32 x 1 x 4 accumulation steps" in r.stdout
    assert resumed_from(r.stdout) == (str(log / "model_00010.pt"), 10)
    assert_all_steps(r, range(10, MAX_STEPS))
    return r


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_plain_process(one_process, fsdp_ref):
    diff = max(abs(float(one_process.losses[s]) - float(fsdp_ref.losses[s])) for s in range(10, MAX_STEPS))
    assert diff <= 1e-5, (one_process.losses, fsdp_ref.losses)
    vals = [[float(v) for v in VAL_RE.findall(r.stdout)] for r in (one_process, fsdp_ref)]
    assert len(vals[0]) == 1 and abs(vals[0][0] - vals[1][-1]) <= 1.01e-4  # step 20's, on the same windows
    assert HELLA_RE.findall(one_process.stdout) == HELLA_RE.findall(fsdp_ref.stdout)[-1:]
    weight_diff = max_diff(load(one_process.log)["model"], load(fsdp_ref.log)["model"])
    assert weight_diff <= 1e-4
    exact = all(one_process.losses[s] == fsdp_ref.losses[s] for s in range(10, MAX_STEPS))
    print(
        f"FSDP checkpoint in 1 process: max |loss diff| {diff:.3g} (printed strings equal: {exact}), "
        f"max |final weight diff| {weight_diff:.3g}"
    )


def fake_fsdp_run(data: Path, log: Path, step: int = 12) -> Path:
    """The checkpoint a 2-rank --fsdp run of these flags saves at its last step, made in this process."""
    argv = [*TINY, "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--seq-len", "32"]
    argv += ["--total-batch-size", "256", "--max-steps", str(step), "--fsdp", "--data-dir", str(data)]
    return save_fake_checkpoint([*argv, "--log-dir", str(log)], step, world=2)


def test_fsdp_run_resumes_in_one_process_with_resume_alone(shards, tmp_path, monkeypatch, capsys):
    """README: `python train_gpt.py --log-dir log --resume` is enough, and an FSDP checkpoint resumes at any
    world size. A plain process cannot shard, so the restored --fsdp must not stop it; it trains 2 more steps
    (--max-steps may change), exactly as from the same checkpoint saved without --fsdp."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    log, plain_log = tmp_path / "log", tmp_path / "plain"
    path = fake_fsdp_run(shards, log)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["args"]["fsdp"] is True
    (adam_steps,) = {int(s["step"]) for s in saved["optimizer"]["state"].values()}  # as torch's state dict made it
    plain_log.mkdir()
    torch.save({**saved, "args": {**saved["args"], "fsdp": False}}, plain_log / path.name)

    def resume(log: Path) -> str:
        code, handlers = 0, {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        precision = torch.get_float32_matmul_precision()
        with torch.random.fork_rng(devices=[]):
            try:
                train_gpt.main(["--log-dir", str(log), "--resume", "--max-steps", "14"])
            except SystemExit as e:
                code = e.code
            finally:
                for s, handler in handlers.items():  # the run's StopFlag took them
                    signal.signal(s, handler)
                torch.set_float32_matmul_precision(precision)
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    out = resume(log)
    assert f"resume: restored the run's flags from {path}: " in out and "resuming at step 12" in out
    assert "world 1 | total batch 256 = 4 x 32 x 1 x 2 accumulation steps" in out
    losses = loss_strings(out)
    assert sorted(losses) == [12, 13]
    # step 12 is the checkpoint's model on the run's next two micro-batches: the data position came back too
    assert abs(float(losses[12]) - step_loss(saved, shards)) <= 1e-5
    final = load(log, 14)
    assert final["step"] == 14 and {int(s["step"]) for s in final["optimizer"]["state"].values()} == {adam_steps + 2}
    assert all(not torch.equal(final["model"][k], v) for k, v in saved["model"].items())
    # the same as from the checkpoint without --fsdp: the restored flag changed nothing in one process
    assert loss_strings(resume(plain_log)) == losses
    plain = load(plain_log, 14)
    assert all(torch.equal(final["model"][k], v) for k, v in plain["model"].items())
    assert all(torch.equal(t, optimizer_tensors(plain)[k]) for k, t in optimizer_tensors(final).items())


# -----------------------------------------------------------------------------
# 4. activation checkpointing: the same numbers, fewer saved activations


def tiny_gpt(dropout: float) -> train_gpt.GPT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = train_gpt.GPTConfig(block_size=64, vocab_size=512, n_layer=3, n_head=2, n_embd=32, dropout=dropout)
        return train_gpt.GPT(config)


def forward_backward(model: train_gpt.GPT, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    """Loss, gradients, block forward calls (in the forward / in all; pre-hooks, since a recompute stops once it
    has what the backward needs) and the elements of the tensors saved for backward."""
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in model.transformer.h]
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, y)
        in_forward = len(calls)
        loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "calls": (in_forward, len(calls)), "saved": sum(saved)}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_identical_loss_and_gradients(dropout):
    model = tiny_gpt(dropout)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 512, (4, 64), generator=g), torch.randint(0, 512, (4, 64), generator=g)
    results = {}
    for on in (False, True):
        m = copy.deepcopy(model)
        m.activation_checkpointing = on
        results[on] = forward_backward(m, x, y, seed=7)
    off, on = results[False], results[True]
    assert torch.equal(off["loss"], on["loss"])
    assert off["grads"].keys() == on["grads"].keys()
    assert all(g is not None and torch.equal(g, on["grads"][n]) for n, g in off["grads"].items())
    # it really recomputed: each block ran again in the backward pass, and kept far fewer activations
    assert off["calls"] == (3, 3) and on["calls"] == (3, 6)
    assert on["saved"] < off["saved"] / 2, (on["saved"], off["saved"])
    if dropout:
        # the masks matter (another seed gives another loss), so equal losses mean equal masks in the recompute
        assert not torch.equal(forward_backward(copy.deepcopy(model), x, y, seed=8)["loss"], off["loss"])
        without = copy.deepcopy(model)
        without.config.dropout = 0.0
        assert not torch.equal(forward_backward(without, x, y, seed=7)["loss"], off["loss"])


def test_activation_checkpointing_only_in_training(monkeypatch):
    calls = []
    real = train_gpt.recompute_in_backward
    monkeypatch.setattr(train_gpt, "recompute_in_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_gpt(0.0)
    model.activation_checkpointing = True
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    model.train()
    model(x, x)
    assert len(calls) == 3  # one per block
    model.eval()
    with torch.no_grad():
        logits_on, _ = model(x)
        out = model.generate(x[:1, :4], 3, temperature=0)  # the KV cache path
        model.activation_checkpointing = False
        logits_off, _ = model(x)
    assert len(calls) == 3 and torch.equal(logits_on, logits_off) and out.shape == (1, 7)


@pytest.mark.slow
def test_activation_checkpointing_run_prints_the_same_losses(setup, one_process, tmp_path):
    log = copy_until(one_process.log, tmp_path / "log", 10)
    extra = ["--resume", "--no-fsdp", "--eval-steps", "2", "--activation-checkpointing"]
    r = launch_ok(plain(setup, *flags(setup, log, *extra)), log)
    # 2 blocks x 4 micro-batches x 10 steps went through torch.utils.checkpoint; none without the flag
    assert CHECKPOINTED_RE.findall(r.stdout) == [("-", str(2 * 4 * 10))]
    assert CHECKPOINTED_RE.findall(one_process.stdout) == [("-", "0")]
    assert resumed_from(r.stdout) == (str(log / "model_00010.pt"), 10)
    assert_all_steps(r, range(10, MAX_STEPS))
    assert r.losses == one_process.losses
    assert read_log(log) == read_log(one_process.log)
    final, ref = load(log), load(one_process.log)
    assert all(torch.equal(final["model"][k], ref["model"][k]) for k in ref["model"])


# -----------------------------------------------------------------------------
# 5. start-up reads the shards' headers only; token ids are checked on a shard's first use


def test_loader_start_up_reads_headers_only_and_checks_each_shard_on_first_use(tmp_path, monkeypatch):
    B, T = 2, 8
    arrays = [np.arange(40 * i, 40 * (i + 1), dtype=np.uint16) for i in range(3)]  # 2 windows of 16 tokens each
    bad = arrays[2].copy()
    bad[-1] = 60000  # past its shard's last window: no batch would ever hold it
    paths = [tmp_path / f"t_train_{i:06d}.npy" for i in range(3)]
    for path, tokens in zip(paths, [*arrays[:2], bad]):
        write_shard(path, tokens)
    checked = []
    real_check = train_gpt.check_tokens

    def spy(tokens: np.ndarray, path: str, vocab_size: int) -> None:
        checked.append(path)
        real_check(tokens, path, vocab_size)

    monkeypatch.setattr(train_gpt, "check_tokens", spy)
    loader = train_gpt.DataLoaderLite(B, T, 0, 1, "train", data_dir=str(tmp_path))
    assert checked == [] and loader.total == 6  # the corrupt shard was opened, but none of its ids read

    def next_shard() -> int:
        x, y = loader.next_batch()
        first = int(x[0, 0])
        run = np.concatenate([x.flatten().numpy(), y.flatten().numpy()[-1:]])
        assert np.array_equal(run, np.arange(first, first + B * T + 1))
        return first // 40

    assert next_shard() == 0 and checked == [str(paths[0])]
    assert next_shard() == 0 and checked == [str(paths[0])]
    assert next_shard() == 1 and checked == [str(paths[0]), str(paths[1])]
    assert next_shard() == 1 and len(checked) == 2
    # the next window is the corrupt shard's first: refused, with its one-line message, before any token of it
    with pytest.raises(train_gpt.UserError) as e:
        loader.next_batch()
    assert str(e.value) == too_large_message(paths[2]) and "\n" not in str(e.value)
    assert checked == [str(p) for p in paths]
    # a reset (each evaluation does one) does not read a checked shard again
    loader.reset()
    assert next_shard() == 0 and len(checked) == 3


# -----------------------------------------------------------------------------
# 6. refusals


def run_in_process(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train_gpt.main(argv)
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    return err


@pytest.mark.slow
def test_fsdp_without_torchrun_is_a_one_line_error(shards, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    assert "RANK" not in env
    log = tmp_path / "log"
    r = run_script("train_gpt.py", *TINY, "--data-dir", str(shards), "--log-dir", str(log), "--fsdp", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        r.stderr == "error: --fsdp shards over the processes of a torchrun job; launch with torchrun, or drop --fsdp\n"
    )
    assert r.stdout == "" and not log.exists()


def test_fsdp_refusals_in_process(shards, tmp_path, monkeypatch, capsys):
    log = tmp_path / "log"
    args = [*TINY, "--data-dir", str(shards), "--log-dir", str(log), "--fsdp"]
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert run_in_process([*args, "--optimizer", "muon"], capsys) == (
        "error: --fsdp shards over the processes of a torchrun job; launch with torchrun, or drop --fsdp\n"
    )
    # as rank 0 of a torchrun job: Muon is refused before any process group or log dir
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_in_process([*args, "--optimizer", "muon"], capsys) == (
        "error: --optimizer muon needs whole matrices, which --fsdp shards; use DDP (drop --fsdp) or adamw\n"
    )
    assert not torch.distributed.is_initialized() and not log.exists()
