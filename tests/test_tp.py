"""Tensor parallelism (--tp, parallelize.py): torchrun on CPU with gloo, float32, a tiny model. A TP run equals
one process on the same global batch (train and val losses within 1e-5 relative, final weights within 1e-4,
with the clip engaged at every step; the same samples and HellaSwag scores); so does 2 x 2 (--tp 2 --fsdp, and
--tp 2 alone on 4 ranks: data parallel over the dp dimension); kill -9 then --resume under TP is exact; a TP
checkpoint resumes under DDP and in one process, and a one-process checkpoint under TP; every refusal is one line.
"""

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY, Launch, write_shards
from test_resume import loss_strings, read_log, resumed_from

import checkpoint
import train_gpt

TIMEOUT = 400  # 4 ranks on 2 cores are slow; a hang still fails
CLIP = 0.5  # below every step's gradient norm here, so clipping engages at every step (asserted)
COMMON = [
    *TINY[:2], "--n-head", "4", "--n-embd", "64", "--sample-every", "6", "--hellaswag-every", "6",
    "--device", "cpu", "--dtype", "float32", "--batch-size", "2", "--seq-len", "32", "--total-batch-size", "128",
    "--max-lr", "1e-3", "--min-lr", "1e-4", "--warmup-steps", "2", "--max-steps", "6", "--grad-clip", str(CLIP),
    "--eval-every", "3", "--save-every", "3",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
HELLASWAG_ROWS = [
    {"ctx": "The man picks up the guitar and", "endings": ["plays a song.", "eats it.", "flies.", "is a cat."], "label": 0},
    {"ctx": "She opens the oven door and", "endings": ["sings.", "takes out the bread.", "runs.", "sleeps."], "label": 1},
    {"ctx": "A dog runs across the field", "endings": ["to fetch it.", "and reads.", "quietly.", "with a hat."], "label": 2},
]  # fmt: skip


@dataclass
class Run:
    log: Path
    stdout: str

    @property
    def losses(self) -> dict[int, float]:
        return {s: float(v) for s, v in loss_strings(self.stdout).items()}

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith(prefix)]

    def norms(self) -> list[float]:
        return [float(line.split("norm: ")[1].split()[0]) for line in self.lines("step ")]

    def weights(self, step: int = 6) -> dict[str, torch.Tensor]:
        return checkpoint.load_checkpoint(str(self.log / f"model_{step:05d}.pt"))["model"]


def launch(ranks: int, *args: str) -> list[str]:
    if ranks == 1:
        return [sys.executable, "train_gpt.py", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "train_gpt.py",
        *args,
    ]


def train(ranks: int, data: Path, log: Path, *extra: str) -> Run:
    with Launch(launch(ranks, *COMMON, "--data-dir", str(data), "--log-dir", str(log), *extra), ENV, TIMEOUT) as p:
        code = p.finish()
        assert code == 0, p.report()
        return Run(log, p.stdout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tp")
    write_shards(root / "data", n_train=1, tokens_per_shard=6000)
    (root / "hs").mkdir()
    (root / "hs" / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_ROWS))
    return root / "data", root


@pytest.fixture(scope="module")
def one(setup) -> Run:
    data, root = setup
    return train(1, data, root / "one", "--hellaswag-dir", str(root / "hs"))


@pytest.fixture(scope="module")
def tp2(setup) -> Run:
    data, root = setup
    return train(2, data, root / "tp2", "--tp", "2", "--hellaswag-dir", str(root / "hs"))


def assert_same_run(run: Run, ref: Run, val: bool = True) -> None:
    assert sorted(run.losses) == sorted(ref.losses) == list(range(6))
    for step, loss in run.losses.items():
        assert abs(loss - ref.losses[step]) <= 1e-5 * abs(ref.losses[step]), step
    if val:
        got, want = (
            [float(x.split()[2]) for x in run.lines("validation")],
            [float(x.split()[2]) for x in ref.lines("validation")],
        )
        assert len(got) == len(want) == 3 and all(abs(a - b) <= 1e-5 * b for a, b in zip(got, want)), (got, want)
    mine, theirs = run.weights(), ref.weights()
    assert mine.keys() == theirs.keys()  # the full state dict: whole tensors under the 1-process names
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) <= 1e-4
    assert all(norm > CLIP for norm in run.norms())  # the clip scaled every step's gradients


@pytest.mark.slow
def test_tp2_equals_one_process(tp2, one):
    assert "| world 2 = dp 1 x tp 2 | total batch 128 = 2 x 32 x 1 x 2 accumulation steps" in tp2.stdout
    assert_same_run(tp2, one)
    # sampling (the KV cache on n_head/tp heads) and HellaSwag, during the run, on rank 0 of the tp group
    assert tp2.lines("rank 0 sample") == one.lines("rank 0 sample") and len(one.lines("rank 0 sample")) == 4
    assert tp2.lines("hellaswag:") == one.lines("hellaswag:") and one.lines("hellaswag:")[0].endswith("n=3")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [True, False], ids=["tp2-fsdp2", "tp2-dp2"])
def test_2x2_equals_one_process(setup, one, fsdp):
    """4 ranks as dp 2 x tp 2: FSDP2 over dp (2-D, as torchtitan), or plain data parallelism over dp. Each rank
    reads half of the val batches of one process with twice --eval-steps, so that is the reference's val."""
    data, root = setup
    flags = ["--tp", "2", "--eval-steps", "2", "--hellaswag-every", "0", "--sample-every", "0"] + (
        ["--fsdp"] if fsdp else []
    )
    run = train(4, data, root / f"2x2-{fsdp}", *flags)
    ref = train(
        1, data, root / f"one-eval4-{fsdp}", "--eval-steps", "4", "--hellaswag-every", "0", "--sample-every", "0"
    )
    assert "| world 4 = dp 2 x tp 2 | total batch 128 = 2 x 32 x 2 x 1 accumulation steps" in run.stdout
    assert_same_run(run, ref)


@pytest.mark.slow
def test_kill9_during_a_tp_run_then_resume_under_tp_is_exact(setup, tp2):
    data, root = setup
    log = root / "tp2-killed"
    args = [*COMMON, "--data-dir", str(data), "--log-dir", str(log), "--tp", "2", "--hellaswag-dir", str(root / "hs")]
    with Launch(launch(2, *args), ENV, TIMEOUT) as p:
        p.wait_line(r"^step\s+4 \|")  # model_00003.pt is written
        p.kill()
        assert p.finish() == -signal.SIGKILL
    assert not (log / "model_00006.pt").exists(), "the run was not cut short"
    with Launch(launch(2, "--log-dir", str(log), "--resume"), ENV, TIMEOUT) as p:
        assert p.finish() == 0, p.report()
        resumed = p.stdout
    assert resumed_from(resumed) == (str(log / "model_00003.pt"), 3)
    assert loss_strings(resumed) == {s: v for s, v in loss_strings(tp2.stdout).items() if s >= 3}
    assert read_log(log) == read_log(tp2.log)
    assert all(torch.equal(a, b) for a, b in zip(Run(log, resumed).weights().values(), tp2.weights().values()))


@pytest.mark.slow
@pytest.mark.parametrize("ranks, flags", [(1, []), (2, [])], ids=["one-process", "ddp"])
def test_a_tp_checkpoint_resumes_without_tp(setup, one, tp2, ranks, flags):
    data, root = setup
    log = root / f"from-tp-{ranks}"
    log.mkdir()
    for name in ("model_00003.pt", "log.txt"):
        (log / name).write_bytes((tp2.log / name).read_bytes())
    with Launch(launch(ranks, "--log-dir", str(log), "--resume", "--tp", "1", *flags), ENV, TIMEOUT) as p:
        assert p.finish() == 0, p.report()
        run = Run(log, p.stdout)
    assert resumed_from(run.stdout)[1] == 3
    for step, loss in run.losses.items():
        assert abs(loss - one.losses[step]) <= 1e-5 * one.losses[step], step
    assert max((run.weights()[k] - one.weights()[k]).abs().max().item() for k in one.weights()) <= 1e-4


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_tp(setup, one):
    data, root = setup
    log = root / "from-one"
    log.mkdir()
    for name in ("model_00003.pt", "log.txt"):
        (log / name).write_bytes((one.log / name).read_bytes())
    with Launch(launch(2, "--log-dir", str(log), "--resume", "--tp", "2"), ENV, TIMEOUT) as p:
        assert p.finish() == 0, p.report()
        run = Run(log, p.stdout)
    assert "dp 1 x tp 2" in run.stdout and resumed_from(run.stdout)[1] == 3
    for step, loss in run.losses.items():
        assert abs(loss - one.losses[step]) <= 1e-5 * one.losses[step], step
    assert max((run.weights()[k] - one.weights()[k]).abs().max().item() for k in one.weights()) <= 1e-4


def refusal(monkeypatch, capsys, argv: list[str], world: int | None) -> str:
    if world is not None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    else:
        monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        train_gpt.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err[len("error: ") : -1]


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (["--tp", "2"], None, "--tp 2 splits the model over the processes of a torchrun job; launch with torchrun"),
        (["--tp", "2"], 3, "--tp 2 does not divide the 3 processes; use a divisor of 3"),
        (["--tp", "2", "--optimizer", "muon"], 2, "--optimizer muon needs whole matrices, which --tp splits; use adamw, or drop --tp"),
        (["--tp", "2", "--dtype", "float16"], 2, "--tp trains in bfloat16 or float32; float16 would need a GradScaler over DTensors"),
        (["--tp", "2", "--n-head", "3", "--n-embd", "48"], 2, "--tp 2 does not divide the model's 3 heads; use a divisor of 3"),
    ],
)  # fmt: skip
def test_tp_refusals_are_one_line_before_any_work(shards, tmp_path, monkeypatch, capsys, extra, world, message):
    argv = [*TINY, "--device", "cpu", "--data-dir", str(shards), "--log-dir", str(tmp_path / "log"), *extra]
    assert refusal(monkeypatch, capsys, argv, world) == message
    assert not (tmp_path / "log").exists()


def test_the_strided_qkv_placement_is_what_the_split_needs():
    """parallelize.py relies on torch's private _StridedShard: rank r of tp holds rows [q_r; k_r; v_r] of c_attn,
    and the global tensor is the unsplit weight. Checked on the placement's own local-shard rule, no process group."""
    from parallelize import QKV_ROWS

    weight = torch.arange(3 * 8 * 2).view(3 * 8, 2)  # C = 8: rows 0-7 q, 8-15 k, 16-23 v
    for rank, rows in (
        (0, [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]),
        (1, [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]),
    ):
        shards, _ = QKV_ROWS._split_tensor(weight, 2, with_padding=False, contiguous=True)
        assert torch.equal(shards[rank], weight[rows]), rank
