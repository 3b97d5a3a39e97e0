"""Multi-process training and interrupted runs: torchrun, kill -9, SIGTERM/SIGINT, torn checkpoints, --resume.

Every run uses the tiny model on random-token shards, float32 on CPU, so a resumed run must reproduce the
uninterrupted reference bit for bit (compared as the printed 6-decimal strings), and a 2-process run must
match one process with twice the gradient accumulation to float rounding. Processes start in their own
session so that a watchdog, and the cleanup after every test, can kill a whole torchrun tree.

Every test that needs a training run in a subprocess (all but the refusals at the end, which build their
checkpoint in this process) is marked slow.
"""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import TINY, Launch, run_script, save_fake_checkpoint, train_losses, write_shards

import checkpoint
import train_gpt

TIMEOUT = 180  # per process; generous because the machine is shared, a hang still fails instead of blocking

# B*T*grad_accum = 4*32*2 = 256 tokens a step on one process; 12 steps use 24 of the 78 train windows, no
# epoch wrap. Warmup 4 keeps steps 0..3 on the warmup ramp, which does not depend on --max-steps, so shorter
# runs agree with the 12-step reference on those steps; after it the cosine schedule depends on the step,
# which a resume that got the step wrong would show.
COMMON = [
    *TINY,
    "--device", "cpu", "--dtype", "float32",
    "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "256",
    "--max-lr", "6e-3", "--min-lr", "6e-4", "--warmup-steps", "4", "--max-steps", "12",
    "--eval-every", "4", "--eval-steps", "2", "--save-every", "4",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEP_RE = re.compile(r"^step\s+(\d+) \| loss: (\S+) \| lr (\S+) \|", re.M)
RESTORED_RE = re.compile(r"^resume: restored the run's flags from (\S+\.pt): (.*)$", re.M)
RESUMED_RE = re.compile(r"^resuming at step (\d+)$", re.M)
TMP_RE = re.compile(r"model_(\d{5,})\.pt\.tmp")
STOPPED_RE = re.compile(r"^stopped at step (\d+): checkpoint written to (\S+); continue with --resume$", re.M)


def cli(data: Path, log: Path, *extra: str) -> list[str]:
    """train_gpt.py arguments; later flags override the COMMON ones (argparse keeps the last)."""
    return ["train_gpt.py", *COMMON, "--data-dir", str(data), "--log-dir", str(log), *extra]


def loss_strings(stdout: str) -> dict[int, str]:
    """step -> the loss exactly as printed, for bit-for-bit comparisons."""
    return {int(m.group(1)): m.group(2) for m in STEP_RE.finditer(stdout)}


def resumed_from(stdout: str) -> tuple[str, int]:
    """(checkpoint path, step) of a resumed run: each of its two lines printed exactly once (by rank 0 alone)."""
    restored, resumed = RESTORED_RE.findall(stdout), RESUMED_RE.findall(stdout)
    assert len(restored) == len(resumed) == 1, stdout
    return restored[0][0], int(resumed[0])


def restored_flags(stdout: str) -> dict[str, str]:
    """name -> value of the flags the `resume: restored the run's flags` line lists (empty if all were defaults)."""
    (listed,) = [m.group(2) for m in RESTORED_RE.finditer(stdout)]
    if listed == "all were the defaults":
        return {}
    return dict(item.split("=", 1) for item in listed.split(", "))


TIMING_STREAMS = {"toks"}  # log.txt's tokens/s of each step: wall-clock, never the same in two runs


def read_log(log: Path) -> list[str]:
    """log.txt's `{step} {stream} {value}` lines, less the timing ones."""
    lines = (log / "log.txt").read_text().splitlines()
    return [line for line in lines if line.split()[1] not in TIMING_STREAMS]


def streams(lines: list[str], *names: str) -> list[str]:
    return [line for line in lines if line.split()[1] in names]


def listing(log: Path) -> set[str]:
    """The checkpoints and temp files in a log dir (and log.txt), not the plots or the run's train.lock."""
    return {p.name for p in log.iterdir() if p.name.startswith("model_") or p.name == "log.txt"}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python(*args: str, timeout: float = TIMEOUT) -> Launch:
    return Launch([sys.executable, *args], ENV, timeout)


def run_ok(*args: str) -> subprocess.CompletedProcess:
    r = run_script(*args, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@dataclass
class Reference:
    data: Path
    log: Path
    stdout: str
    losses: dict[int, str]
    log_lines: list[str]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    """The uninterrupted 12-step run every other run is compared against (checkpoints at 4, 8, 12)."""
    data = tmp_path_factory.mktemp("data")
    write_shards(data)
    log = tmp_path_factory.mktemp("ref")
    r = run_ok(*cli(data, log))
    losses = loss_strings(r.stdout)
    assert sorted(losses) == list(range(12))
    assert len(set(losses.values())) > 6, "the losses barely move; the comparisons would prove little"
    assert sorted(n for n in listing(log) if n.startswith("model_")) == [f"model_{s:05d}.pt" for s in (4, 8, 12)]
    assert (log / "train.lock").is_file()  # the run's lock; the OS released it when the process ended
    return Reference(data, log, r.stdout, losses, read_log(log))


def copy_run(ref: Reference, dest: Path) -> Path:
    shutil.copytree(ref.log, dest)
    return dest


def step_loss(ckpt: dict, data: Path) -> float:
    """The loss the training loop reports for the step after ckpt: its two micro-batches, accumulated as there."""
    model = train_gpt.model_from_checkpoint(ckpt, "<checkpoint>")
    loader = train_gpt.DataLoaderLite(4, 32, 0, 1, "train", data_dir=str(data))
    loader.load_state_dict(ckpt["train_loader"])
    total = torch.zeros(())
    with torch.no_grad():
        for _ in range(2):
            x, y = loader.next_batch()
            total += model(x, y)[1] / 2
    return total.item()


# -----------------------------------------------------------------------------
# what a checkpoint holds


@pytest.mark.slow
def test_checkpoint_holds_everything_to_resume(ref):
    ckpt = torch.load(ref.log / "model_00004.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) == {
        "model", "optimizer", "step", "train_loader", "rng", "config", "args", "val_loss", "scaler", "periodic_done",
        "wandb_id",
    }  # fmt: skip
    assert ckpt["wandb_id"] is None  # no --wandb
    assert ckpt["step"] == 4 and ckpt["periodic_done"] is True
    assert ckpt["config"] == {
        "block_size": 1024, "vocab_size": 50304, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0,
    }  # fmt: skip
    cfg, _ = train_gpt.parse_args(cli(ref.data, ref.log)[1:])
    assert ckpt["args"] == asdict(cfg)
    # rank 0's next global window: 4 steps x 2 micro-batches
    assert (ckpt["train_loader"]["position"], ckpt["train_loader"]["window_tokens"]) == (8, 128)
    # and what --resume checks to be sure it continues on the same data: each train shard's name, size, content
    listed = ckpt["train_loader"]["shards"]
    assert [(name, n) for name, n, _ in listed] == [("test_train_000001.npy", 5000), ("test_train_000002.npy", 5000)]
    assert [fp for _, _, fp in listed] == [checkpoint.shard_fingerprint(str(ref.data / name)) for name, _, _ in listed]
    assert listed[0][2] != listed[1][2]
    assert f"4 val {ckpt['val_loss']:.4f}" in ref.log_lines
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and ckpt["rng"]["cuda"] == []
    # a clean state dict (no DDP "module." or compile "_orig_mod." prefixes) and a full AdamW state
    assert ckpt["model"].keys() == train_gpt.GPT(train_gpt.GPTConfig(**ckpt["config"])).state_dict().keys()
    assert len(ckpt["optimizer"]["state"]) == 28 and all(s["step"] == 4 for s in ckpt["optimizer"]["state"].values())
    # the weights are those after 4 updates: they give the loss the run printed for step 4
    assert step_loss(ckpt, ref.data) == pytest.approx(float(ref.losses[4]), abs=2e-6)


# -----------------------------------------------------------------------------
# torchrun: two processes make the same steps as one with twice the accumulation


def check_two_ranks(stdout: str, log: Path, ref: Reference, steps: range) -> None:
    """A 2-rank run's steps (and the val losses and checkpoint at their end) against the 1-process reference."""
    assert "world 2 | total batch 256 = 4 x 32 x 2 x 1 accumulation steps" in stdout
    assert "world 1 | total batch 256 = 4 x 32 x 1 x 2 accumulation steps" in ref.stdout
    losses = train_losses(stdout)
    assert sorted(losses) == list(steps)
    loss_diff = max(abs(losses[s] - float(ref.losses[s])) for s in steps)
    assert loss_diff < 1e-5, (losses, ref.losses)
    # the same log lines; --eval-steps counts per rank, so 1 on 2 ranks reads the reference's 2 windows
    lines, ref_lines = (
        [(int(s), kind, float(v)) for s, kind, v in (line.split() for line in log_lines)]
        for log_lines in (read_log(log), ref.log_lines)
    )
    ref_lines = [x for x in ref_lines if x[0] < steps.stop or (x[0] == steps.stop and x[1] == "val")]
    assert [x[:2] for x in lines] == [x[:2] for x in ref_lines]
    # val and norm are written to 4 decimals, train to 6; the lr is the same schedule's
    tolerance = {"val": 1.01e-4, "norm": 1.01e-4, "train": 1e-5, "lr": 0.0}
    assert all(abs(x[2] - y[2]) <= tolerance[x[1]] for x, y in zip(lines, ref_lines)), (lines, ref_lines)
    # rank 0 alone wrote the checkpoint; its data position counts global windows, as one process's does
    ckpt = checkpoint.load_checkpoint(str(log / f"model_{steps.stop:05d}.pt"))
    ref_ckpt = checkpoint.load_checkpoint(str(ref.log / f"model_{steps.stop:05d}.pt"))
    assert ckpt["train_loader"]["position"] == ref_ckpt["train_loader"]["position"] == 2 * steps.stop
    weight_diff = max((ckpt["model"][k] - ref_ckpt["model"][k]).abs().max().item() for k in ckpt["model"])
    assert weight_diff < 1e-5
    print(f"2 ranks vs 1 process, steps {steps.start}..{steps.stop - 1}: max |loss diff| {loss_diff:.3g}, "
          f"max |weight diff| at step {steps.stop} {weight_diff:.3g}")  # fmt: skip


@pytest.mark.slow
def test_torchrun_two_processes_match_one(ref, tmp_path):
    log = tmp_path / "log"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    with python(*args, *cli(ref.data, log, "--max-steps", "4", "--eval-steps", "1")) as run:
        assert run.finish() == 0, run.report()
    check_two_ranks(run.stdout, log, ref, range(0, 4))
    assert sorted(n for n in listing(log) if n.startswith("model_")) == ["model_00004.pt"]


@pytest.mark.slow
def test_torchrun_resumes_a_one_process_checkpoint(ref, tmp_path):
    """Half of the GPUs gone or doubled: a 1-process checkpoint continues on 2 ranks with the same global batch."""
    log = copy_run(ref, tmp_path / "log")
    (log / "model_00012.pt").unlink()
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    with python(*args, *cli(ref.data, log, "--resume", "--eval-steps", "1")) as run:
        assert run.finish() == 0, run.report()
    assert resumed_from(run.stdout) == (str(log / "model_00008.pt"), 8)  # printed once, by rank 0
    assert restored_flags(run.stdout) == {}  # every flag was given again, as the reference's
    check_two_ranks(run.stdout, log, ref, range(8, 12))


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one(ref, tmp_path):
    log = tmp_path / "log"
    port = free_port()
    flags = cli(ref.data, log, "--max-steps", "4", "--eval-steps", "1")
    launchers = []
    try:
        for node in (0, 1):
            rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test_resume"]
            args = ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)]
            launchers.append(python(*args, *rdzv, *flags))
        codes = [launcher.finish() for launcher in launchers]
        assert codes == [0, 0], "\n".join(launcher.report() for launcher in launchers)
        # c10d rendezvous ignores --node-rank and numbers nodes as they join: global rank 0 is on either
        with_steps = [launcher.stdout for launcher in launchers if "step " in launcher.stdout]
        assert len(with_steps) == 1, "\n".join(launcher.report() for launcher in launchers)
        check_two_ranks(with_steps[0], log, ref, range(0, 4))
    finally:
        for launcher in launchers:
            launcher.__exit__()


# -----------------------------------------------------------------------------
# interrupted runs resume exactly


@pytest.mark.slow
def test_kill9_then_resume_reproduces_the_uninterrupted_run(ref, tmp_path):
    log = tmp_path / "log"
    with python(*cli(ref.data, log)) as run:
        run.wait_line(r"^step\s+6 \|")
        run.kill()
        assert run.finish() == -signal.SIGKILL
    killed = loss_strings(run.stdout)
    assert {s: killed[s] for s in range(7)} == {s: ref.losses[s] for s in range(7)}
    assert "model_00004.pt" in listing(log) and "model_00012.pt" not in listing(log), "the run was not cut short"

    r = run_ok(*cli(ref.data, log, "--resume"))
    path, start = resumed_from(r.stdout)
    # step 8's checkpoint exists only if the kill came late; either way the newest one is used
    assert start in (4, 8) and path == str(log / f"model_{start:05d}.pt")
    resumed = loss_strings(r.stdout)
    assert sorted(resumed) == list(range(start, 12))
    assert resumed == {s: ref.losses[s] for s in range(start, 12)}
    assert read_log(log) == ref.log_lines  # the killed run's lines after the checkpoint are gone, none doubled
    print(f"resumed at step {start}; max |loss difference| vs uninterrupted: 0 (strings equal)")


@pytest.mark.slow
def test_sigterm_and_sigint_checkpoint_exit_0_and_resume_exactly(ref, tmp_path):
    log = tmp_path / "log"
    losses: dict[int, str] = {}
    start = 0
    for sig, after in ((signal.SIGTERM, 2), (signal.SIGINT, None)):
        extra = ["--resume"] if start else []
        with python(*cli(ref.data, log, *extra)) as run:
            if start:
                assert run.wait_line(RESTORED_RE.pattern).group(1) == str(log / f"model_{start:05d}.pt")
                assert run.wait_line(RESUMED_RE.pattern).group(1) == str(start)
            # the signal goes in after a step line, a step or more into this run
            run.wait_line(rf"^step\s+{after if after is not None else start + 1} \|")
            run.p.send_signal(sig)
            assert run.finish() == 0, run.report()
        out = run.stdout
        name = signal.Signals(sig).name
        assert f"{name}: finishing this step, then checkpoint and exit (again to abort)" in out
        m = STOPPED_RE.search(out)
        assert m, run.report()
        stop, path = int(m.group(1)), m.group(2)
        assert path == str(log / f"model_{stop:05d}.pt")
        assert start < stop < 12, "the run ended before the signal arrived"
        got = loss_strings(out)
        assert sorted(got) == list(range(start, stop)), "stops after finishing the step it was in"
        ckpt = checkpoint.load_checkpoint(path)
        assert ckpt["step"] == stop and ckpt["periodic_done"] is False
        assert ckpt["train_loader"]["position"] == 2 * stop
        losses.update(got)
        start = stop

    r = run_ok(*cli(ref.data, log, "--resume"))
    assert resumed_from(r.stdout) == (str(log / f"model_{start:05d}.pt"), start)
    losses.update(loss_strings(r.stdout))
    assert losses == ref.losses
    assert read_log(log) == ref.log_lines


@pytest.mark.slow
def test_resume_with_only_the_log_dir_continues_a_run_of_non_default_flags_exactly(ref, tmp_path):
    """`train_gpt.py --log-dir X --resume` and nothing else: every flag of the run comes back from its checkpoint
    (schedule, seed, shuffle, shape, batch, data dir, device, cadences), none from the defaults."""
    # COMMON is already far from the defaults (lr, warmup, steps, shape, batch); these change the seed, the data
    # order and the decay too, so a resume that fell back to any default would print other losses
    own = ["--seed", "7", "--shuffle", "--weight-decay", "0.05"]
    whole = tmp_path / "whole"
    uninterrupted = run_ok(*cli(ref.data, whole, *own))
    expected = loss_strings(uninterrupted.stdout)
    assert sorted(expected) == list(range(12))
    assert expected[0] != ref.losses[0], "--seed 7 --shuffle changed nothing; the test would prove little"

    # the run as a kill after its step-4 checkpoint leaves it (the killed run's later lines are rewound)
    log = tmp_path / "log"
    shutil.copytree(whole, log)
    for step in (8, 12):
        (log / f"model_{step:05d}.pt").unlink()
    argv = ["train_gpt.py", "--log-dir", str(log), "--resume"]
    assert [a for a in argv if a.startswith("-")] == ["--log-dir", "--resume"]
    r = run_ok(*argv)
    assert resumed_from(r.stdout) == (str(log / "model_00004.pt"), 4)
    # the restored line lists exactly the flags that differ from the defaults
    assert restored_flags(r.stdout) == {
        "data_dir": str(ref.data), "shuffle": "True", "n_layer": "2", "n_head": "2", "n_embd": "32",
        "batch_size": "4", "seq_len": "32", "total_batch_size": "256",
        "max_lr": "0.006", "min_lr": "0.0006", "warmup_steps": "4", "max_steps": "12", "weight_decay": "0.05",
        "eval_every": "4", "eval_steps": "2", "sample_every": "0", "save_every": "4", "hellaswag_every": "0",
        "device": "cpu", "dtype": "float32", "seed": "7",
    }  # fmt: skip
    assert loss_strings(r.stdout) == {s: expected[s] for s in range(4, 12)}
    assert read_log(log) == read_log(whole)
    resumed, original = (
        checkpoint.load_checkpoint(str(d / "model_00012.pt"), checkpoint.RESUME_KEYS) for d in (log, whole)
    )
    assert same_tensors(resumed["model"], original["model"])
    assert resumed["train_loader"] == original["train_loader"]
    differ = {k for k in original["args"] if resumed["args"][k] != original["args"][k]}
    assert differ == {"log_dir", "resume"}, differ


# -----------------------------------------------------------------------------
# torn and corrupt checkpoints


@pytest.mark.slow
def test_partial_tmp_and_corrupt_checkpoints_are_skipped(ref, tmp_path, capsys):
    log = copy_run(ref, tmp_path / "log")
    # a write killed midway leaves a partial temp file, never a partial model_*.pt ...
    whole = (log / "model_00012.pt").read_bytes()
    (log / "model_00012.pt").unlink()
    (log / "model_00012.pt.tmp").write_bytes(whole[: len(whole) // 2])
    # ... but a disk or a copy can still damage a finished one
    with open(log / "model_00008.pt", "r+b") as f:
        f.truncate(len(whole) // 3)

    latest = checkpoint.latest_checkpoint(str(log))
    path, ckpt = latest.path, latest.state
    assert path == str(log / "model_00004.pt") and ckpt["step"] == 4
    warning = capsys.readouterr().err
    assert warning.startswith(f"skipping {log / 'model_00008.pt'}: not a readable checkpoint (")
    assert warning.count("\n") == 1  # the temp file is not a checkpoint, so not even skipped

    r = run_ok(*cli(ref.data, log, "--resume"))
    assert r.stderr.startswith(f"skipping {log / 'model_00008.pt'}: not a readable checkpoint (")
    assert r.stderr.count("skipping ") == 1
    assert resumed_from(r.stdout) == (str(log / "model_00004.pt"), 4)
    assert loss_strings(r.stdout) == {s: ref.losses[s] for s in range(4, 12)}
    assert read_log(log) == ref.log_lines
    # the run rewrote both damaged checkpoints, identical to the reference's, and left no temp file
    assert listing(log) == {"log.txt", "model_00004.pt", "model_00008.pt", "model_00012.pt"}
    for step in (8, 12):
        new = checkpoint.load_checkpoint(str(log / f"model_{step:05d}.pt"))
        old = checkpoint.load_checkpoint(str(ref.log / f"model_{step:05d}.pt"))
        assert same_tensors(new["model"], old["model"])
        assert new["train_loader"] == old["train_loader"] and new["step"] == step


@pytest.mark.slow
def test_keep_last_never_deletes_the_checkpoint_just_written(ref, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    shutil.copy(ref.log / "model_00008.pt", log)
    (log / "model_00012.pt").write_bytes((ref.log / "model_00012.pt").read_bytes()[:4096])  # damaged
    r = run_ok(*cli(ref.data, log, "--resume", "--keep-last", "1", "--max-steps", "10", "--eval-every", "0"))
    assert resumed_from(r.stdout) == (str(log / "model_00008.pt"), 8)
    assert r.stderr.startswith(f"skipping {log / 'model_00012.pt'}: not a readable checkpoint (")
    # a crash now must be able to continue from step 10, not find nothing but the damaged file
    latest = checkpoint.latest_checkpoint(str(log))
    path, ckpt = latest.path, latest.state
    assert path == str(log / "model_00010.pt") and ckpt["step"] == 10


@pytest.mark.slow
def test_kill9_during_checkpoint_writes_always_leaves_a_resumable_run(ref, tmp_path, capsys):
    """Saves every step; kill -9 as soon as a temp checkpoint appears (+ a random delay), resume, repeat.

    The first kill comes with no delay, so it lands mid-write; the test insists that at least one kill did
    tear a write (left its temp file behind), or it would only have shown that kills between saves are safe."""
    log = tmp_path / "log"
    log.mkdir()  # polled before the run creates it
    flags = cli(ref.data, log, "--save-every", "1", "--keep-last", "2", "--eval-every", "0")
    delays = random.Random(0)
    losses: dict[int, str] = {}
    start, torn = 0, []
    for i in range(3):
        with python(*flags, *(["--resume"] if i else [])) as run:
            target = start + 2  # one step trained after the resume, then a kill while step start+2 (or later) saves
            while run.p.poll() is None and not any(
                (m := TMP_RE.fullmatch(n)) and int(m.group(1)) >= target for n in os.listdir(log)
            ):
                time.sleep(0.002)
            time.sleep(0 if i == 0 else delays.uniform(0, 0.1))
            run.kill()
            assert run.finish() == -signal.SIGKILL, run.report()
        got = loss_strings(run.stdout)
        assert got == {s: ref.losses[s] for s in got}
        losses.update(got)
        # a temp file of this run's saves (an older one was rewritten by the resume) is a torn write
        torn += [n for n in os.listdir(log) if (m := TMP_RE.fullmatch(n)) and int(m.group(1)) >= target]
        # every finished-named file is whole: the rename is the commit point
        for n in sorted(os.listdir(log)):
            if n.endswith(".pt"):
                checkpoint.load_checkpoint(str(log / n))
        ckpt = checkpoint.latest_checkpoint(str(log)).state
        assert capsys.readouterr().err == ""
        assert ckpt["step"] >= target - 1
        start = ckpt["step"]

    # the scenario happened: at least one kill -9 interrupted a checkpoint write
    assert torn, "no kill landed mid-write: every kill found the temp checkpoint already renamed"
    r = run_ok(*flags, "--resume")
    assert resumed_from(r.stdout) == (str(log / f"model_{start:05d}.pt"), start)
    losses.update(loss_strings(r.stdout))
    assert losses == ref.losses
    assert read_log(log) == [line for line in ref.log_lines if line.split()[1] != "val"]
    # --keep-last 2: the two newest, no temp file left behind
    assert listing(log) == {"log.txt", "model_00011.pt", "model_00012.pt"}
    print(f"{len(torn)} of 3 kills left a torn temp checkpoint: {torn}")


# -----------------------------------------------------------------------------
# refusals and flag changes on resume


def fake_run(data: Path, log: Path, *extra: str, step: int = 12) -> Path:
    """The checkpoint the training loop would save at `step` of cli(data, log, *extra), made in a moment."""
    return save_fake_checkpoint(cli(data, log, *extra)[1:], step)


def run_in_process(argv: list[str], capsys) -> str:
    """main() in this process, for errors raised before any training; returns stderr."""
    with pytest.raises(SystemExit) as e:
        train_gpt.main(argv)
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert not [line for line in out.splitlines() if line.startswith(("step ", "validation"))]
    return err


def snapshot(log: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(log.iterdir())}


def test_resume_without_checkpoint_is_a_one_line_error(shards, tmp_path, capsys):
    log = tmp_path / "log"
    log.mkdir()
    (log / "model_00004.pt.tmp").write_bytes(b"torn")  # an unfinished write is not a checkpoint
    err = run_in_process(cli(shards, log, "--resume")[1:], capsys)
    assert err == f"error: --resume: no checkpoint (model_*.pt) in --log-dir {log}: nothing to resume\n"
    assert snapshot(log) == {"model_00004.pt.tmp": b"torn"}


@pytest.mark.parametrize("with_log", [True, False])
def test_fresh_run_into_a_log_dir_with_checkpoints_is_refused(shards, tmp_path, capsys, with_log):
    log = tmp_path / "log"
    fake_run(shards, log)
    held = "model_00012.pt"
    if with_log:
        (log / "log.txt").write_text("0 val 10.9\n0 train 10.95\n")
        held = "log.txt, model_00012.pt"
    before = snapshot(log)
    err = run_in_process(cli(shards, log)[1:], capsys)
    assert err == (
        f"error: --log-dir {log} already holds a run ({held}); pass --resume to continue it, or choose another --log-dir\n"
    )
    assert snapshot(log) == before  # nothing was truncated, and no lock was taken


@pytest.mark.parametrize(
    "flags, diffs",
    [
        (["--n-layer", "3"], "--n-layer 3 (the run has 2)"),
        (["--seq-len", "64"], "--seq-len 64 (the run has 32)"),
        (["--total-batch-size", "512"], "--total-batch-size 512 (the run has 256)"),
        (
            ["--n-head", "4", "--seq-len", "16", "--total-batch-size", "128"],
            "--n-head 4 (the run has 2), --seq-len 16 (the run has 32), --total-batch-size 128 (the run has 256)",
        ),
    ],
)
def test_resume_with_a_changed_shape_or_batch_names_the_mismatch(shards, tmp_path, capsys, flags, diffs):
    log = tmp_path / "log"
    path = fake_run(shards, log)
    before = snapshot(log)
    err = run_in_process(cli(shards, log, "--resume", *flags)[1:], capsys)
    assert err == (
        f"error: --resume from {path}: {diffs} cannot change within a run; drop these flags to continue it, "
        f"or start a new run in another --log-dir with --init-from {path}\n"
    )
    assert snapshot(log) == before


@pytest.mark.slow
def test_resume_with_more_steps_trains_further_and_keeps_last_2(ref, tmp_path):
    log = copy_run(ref, tmp_path / "log")
    r = run_ok(*cli(ref.data, log, "--resume", "--max-steps", "14", "--keep-last", "2"))
    assert resumed_from(r.stdout) == (str(log / "model_00012.pt"), 12)
    steps = {int(m.group(1)): (m.group(2), m.group(3)) for m in STEP_RE.finditer(r.stdout)}
    assert sorted(steps) == [12, 13]
    # step 12 starts from the reference's final weights, on the next data, with the lr of the longer schedule
    ckpt12 = checkpoint.load_checkpoint(str(ref.log / "model_00012.pt"))
    assert float(steps[12][0]) == pytest.approx(step_loss(ckpt12, ref.data), abs=2e-6)
    longer = replace(train_gpt.TrainConfig(), max_lr=6e-3, min_lr=6e-4, warmup_steps=4, max_steps=14)
    for s in (12, 13):
        assert steps[s][1] == f"{train_gpt.get_lr(s, longer):.4e}"
    # and the run says what the longer schedule does to the LR where it resumes (the 12-step one had ended)
    moved = re.findall(r"^resume: --max-steps 12 -> 14 moves the LR at step 12 from (\S+) to (\S+)$", r.stdout, re.M)
    assert len(moved) == 1, r.stdout
    assert [float(lr) for lr in moved[0]] == pytest.approx([6e-4, train_gpt.get_lr(12, longer)], rel=1e-3)
    new_lines = read_log(log)[len(ref.log_lines) :]
    assert read_log(log)[: len(ref.log_lines)] == ref.log_lines
    assert [line.split()[:2] for line in new_lines] == [
        ["12", "train"], ["12", "lr"], ["12", "norm"], ["13", "train"], ["13", "lr"], ["13", "norm"], ["14", "val"],
    ]  # fmt: skip
    assert streams(new_lines, "lr") == [f"{s} lr {train_gpt.get_lr(s, longer):.6e}" for s in (12, 13)]
    assert listing(log) == {"log.txt", "model_00012.pt", "model_00014.pt"}
    ckpt14 = checkpoint.load_checkpoint(str(log / "model_00014.pt"))
    assert ckpt14["step"] == 14 and ckpt14["args"]["max_steps"] == 14 and ckpt14["train_loader"]["position"] == 28


# -----------------------------------------------------------------------------
# the non-finite guard


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_training_goes_on(ref, tmp_path):
    log = tmp_path / "log"
    r = run_ok(
        *cli(ref.data, log, "--inject-nan-steps", "3", "--max-steps", "5", "--save-every", "1", "--eval-every", "0")
    )
    lines = {int(m.group(1)): m.group(0) for m in re.finditer(r"^step\s+(\d+) \|.*$", r.stdout, re.M)}
    assert sorted(lines) == [0, 1, 2, 3, 4]
    assert lines[3].endswith(" | skipped: non-finite loss or grad norm (1 in a row)") and "loss: nan" in lines[3]
    assert not any("skipped" in lines[s] for s in (0, 1, 2, 4))
    losses = loss_strings(r.stdout)
    assert {s: losses[s] for s in (0, 1, 2)} == {s: ref.losses[s] for s in (0, 1, 2)}
    assert streams(read_log(log), "train", "skip") == [
        f"0 train {losses[0]}", f"1 train {losses[1]}", f"2 train {losses[2]}",
        "3 train nan", "3 skip 1", f"4 train {losses[4]}",
    ]  # fmt: skip
    # the skipped step changed neither the weights nor the optimizer; the next one did
    c3, c4, c5 = (checkpoint.load_checkpoint(str(log / f"model_{s:05d}.pt")) for s in (3, 4, 5))
    assert same_tensors(c3["model"], c4["model"])
    assert all(s["step"] == 3 for s in c4["optimizer"]["state"].values())
    assert not same_tensors(c4["model"], c5["model"])
    # step 4 trained from the weights step 3 left alone: its loss, recomputed from them
    assert float(losses[4]) == pytest.approx(step_loss(c4, ref.data), abs=2e-6)
    assert all(torch.isfinite(t).all() for t in c5["model"].values())


@pytest.mark.slow
def test_five_nan_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint(ref, tmp_path):
    log = tmp_path / "log"
    r = run_script(
        *cli(
            ref.data,
            log,
            "--inject-nan-steps",
            "3,4,5,6,7",
            "--max-steps",
            "10",
            "--save-every",
            "2",
            "--eval-every",
            "0",
        ),
        timeout=TIMEOUT,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines()[-1] == (
        "error: stopping at step 7: 5 steps in a row had a non-finite loss or gradient norm; "
        f"last good checkpoint: {log / 'model_00006.pt'}; lower --max-lr or check the data, then --resume"
    )
    assert sorted(loss_strings(r.stdout)) == list(range(8))
    assert [line for line in read_log(log) if " skip " in line] == [f"{s} skip {s - 2}" for s in range(3, 8)]
    assert sorted(n for n in listing(log) if n.startswith("model_")) == [f"model_{s:05d}.pt" for s in (2, 4, 6)]
    # 2 is from before the streak; 4 and 6 hold the weights after step 2's update, untouched by the skipped steps
    c2, c4, c6 = (checkpoint.load_checkpoint(str(log / f"model_{s:05d}.pt")) for s in (2, 4, 6))
    assert same_tensors(c4["model"], c6["model"]) and not same_tensors(c2["model"], c4["model"])
    assert all(torch.isfinite(t).all() for t in c6["model"].values())
    assert all(s["step"] == 3 for s in c6["optimizer"]["state"].values())
    # c4 holds the weights the reference had going into step 3: its step 3 loss, recomputed
    rows_at_3 = 6 * c4["train_loader"]["window_tokens"] // 32  # 6 windows of B=4 rows read before step 3
    c4_at_3 = dict(c4, train_loader=dict(c4["train_loader"], position=6, rows=rows_at_3))
    assert step_loss(c4_at_3, ref.data) == pytest.approx(float(ref.losses[3]), abs=2e-6)
