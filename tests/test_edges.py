"""The edges: every flag, file and run-directory mistake gets one `error:` line (exit 1, no traceback),
and nothing already written is lost or silently wrong. Each test asserts the exact line (or its key
words), the exit code, and, where files were there before, that they are byte-for-byte intact."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, descendants, open_failing_after, run_script, write_shards

import checkpoint
import fineweb
import hellaswag
import sample
import train_gpt
from train_gpt import GPT, GPTConfig

SMALL = [*TINY, "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--seq-len", "32"]
SMALL += ["--total-batch-size", "128", "--eval-steps", "1", "--warmup-steps", "2"]


def one_line_error(main, argv: list[str], capsys) -> str:
    """Run a script's main() in-process; it must exit 1 having printed exactly one `error:` line."""
    rng, precision = torch.get_rng_state(), torch.get_float32_matmul_precision()
    try:
        with pytest.raises(SystemExit) as e:  # any other exception would be a traceback
            main(argv)
    finally:
        torch.set_rng_state(rng)
        torch.set_float32_matmul_precision(precision)
    assert e.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "train.lock"}


@pytest.fixture
def data(tmp_path) -> Path:
    write_shards(tmp_path / "data")
    return tmp_path / "data"


# -----------------------------------------------------------------------------
# 1. every flag declared once, with its range, checked before any work


CONFIGS = [train_gpt.TrainConfig, fineweb.FinewebConfig, hellaswag.HellaswagConfig, sample.SampleConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_numeric_flag_has_a_range_and_every_flag_has_help(cls):
    for f in fields(cls):
        assert f.metadata["help"], f.name
        if str(f.type).replace(" | None", "") in ("int", "float"):
            m = f.metadata
            assert (m["lo"] is not None or m["gt"] is not None) and m["hi"] is not None, f.name


@pytest.mark.parametrize(
    "main, argv, expected",
    [
        (train_gpt.main, ["--max-lr", "-1"], "--max-lr -1.0: out of range; use a value > 0 and <= 10"),
        (train_gpt.main, ["--max-lr", "nan"], "--max-lr nan: must be a finite number"),
        (train_gpt.main, ["--vocab-size", "-5"], "--vocab-size -5: out of range; use a value >= 50257 and <= 131072"),
        (train_gpt.main, ["--seed", "1e23"], "argument --seed: invalid integer value: '1e23' (see --help)"),
        (train_gpt.main, ["--seed", str(2**64)], "--seed 18446744073709551616: out of range; use a value >= 0 and <= 9223372036854775807"),
        (train_gpt.main, ["--seed", "1.5"], "argument --seed: invalid integer value: '1.5' (see --help)"),
        (train_gpt.main, ["--eval-steps", "0"], "--eval-steps 0: out of range; use a value >= 1 and <= 1000000"),
        (train_gpt.main, ["--batch-size", "0"], "--batch-size 0: out of range; use a value >= 1 and <= 1048576"),
        (train_gpt.main, ["--max-lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 is above --max-lr 0.0001; the decay must go down"),
        (train_gpt.main, ["--model", "gpt5"], "argument --model: invalid choice: 'gpt5' (choose from ..."),
        (train_gpt.main, ["--bogus"], "unrecognized arguments: --bogus (see --help)"),
        (sample.main, ["--model", "x.pt", "--top-k", "-3"], "--top-k -3: out of range; use a value >= 0 and <= 131072"),
        (sample.main, ["--model", "x.pt", "--top-p", "0"], "--top-p 0.0: out of range; use a value > 0 and <= 1"),
        (sample.main, ["--model", "x.pt", "--num-samples", "0"], "--num-samples 0: out of range; use a value >= 1 and <= 4096"),
        (sample.main, ["--top-k", "5"], "--model is required: a .pt checkpoint, an HF GPT-2 folder or gpt2[-medium|-large|-xl]"),
        (hellaswag.main, ["--model", "x.pt", "--batch-size", "0"], "--batch-size 0: out of range; use a value >= 1 and <= 4096"),
        (hellaswag.main, ["--model", "x.pt", "--limit", "-1"], "--limit -1: out of range; use a value >= 1 and <= 10000000"),
        (fineweb.main, ["--shard-size", "1e12"], "--shard-size 1000000000000: out of range; use a value >= 1 and <= 2147483647"),
        (fineweb.main, ["--workers", "0"], "--workers 0: out of range; use a value >= 1 and <= 1024"),
    ],
)  # fmt: skip
def test_bad_numbers_and_flags_are_one_line(main, argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear in the working directory either
    message = one_line_error(main, argv, capsys)
    if expected.endswith("..."):  # Python versions quote argparse's choices differently
        assert message.startswith(expected.removesuffix("...")) and message.endswith(" (see --help)")
    else:
        assert message == expected
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_negative_max_steps_leaves_the_earlier_log_untouched(data, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    (log / "log.txt").write_text("0 val 10.9\n0 train 10.95\n")
    before = snapshot(log)
    r = run_script("train_gpt.py", *SMALL, "--data-dir", str(data), "--log-dir", str(log), "--max-steps", "-3")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == "error: --max-steps -3: out of range; use a value >= 1 and <= 1000000000\n"
    assert snapshot(log) == before


# -----------------------------------------------------------------------------
# 3. one run per log dir, and a fresh run never truncates an earlier one


def test_a_fresh_run_refuses_a_dir_holding_only_an_earlier_log(data, tmp_path, capsys):
    log = tmp_path / "log"
    log.mkdir()
    (log / "log.txt").write_text("0 val 10.9\n0 train 10.95\n1 train 10.5\n")  # a --save-every 0 run
    before = snapshot(log)
    argv = [*SMALL, "--data-dir", str(data), "--log-dir", str(log), "--max-steps", "2"]
    assert one_line_error(train_gpt.main, argv, capsys) == (
        f"--log-dir {log} already holds a run (log.txt) but no checkpoint to resume; to start afresh there, "
        f"move {log / 'log.txt'} aside, or choose another --log-dir"
    )
    assert snapshot(log) == before
    # and --resume says why it cannot continue that run, instead of pointing back to a fresh start
    message = one_line_error(train_gpt.main, [*argv, "--resume"], capsys)
    assert message == (
        f"--resume: no checkpoint (model_*.pt) in --log-dir {log}: it holds a log.txt but no checkpoint (was "
        "--save-every 0, or was the run stopped before its first one?), so there is nothing to resume; to start "
        f"afresh, drop --resume and move {log / 'log.txt'} aside, or choose another --log-dir"
    )
    assert snapshot(log) == before


def test_log_dir_that_is_a_file(data, tmp_path, capsys):
    path = tmp_path / "log"
    path.write_text("not a directory")
    argv = [*SMALL, "--data-dir", str(data), "--log-dir", str(path), "--max-steps", "2"]
    assert one_line_error(train_gpt.main, argv, capsys) == (
        f"--log-dir {path} is a file, not a directory; choose another --log-dir"
    )
    assert path.read_text() == "not a directory"


@pytest.mark.slow
def test_a_second_trainer_on_the_same_log_dir_is_refused(data, tmp_path):
    log = tmp_path / "log"
    args = [*SMALL, "--data-dir", str(data), "--log-dir", str(log), "--save-every", "1", "--eval-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "train_gpt.py", *args, "--max-steps", "100000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        while not (line := first.stdout.readline()).startswith("step     2"):  # it has written checkpoints
            assert line, "the first trainer ended early"
        os.kill(first.pid, signal.SIGSTOP)  # freeze it, so its files can be compared before and after
        before = snapshot(log)
        assert "log.txt" in before and "model_00002.pt" in before
        for extra in ([], ["--resume"]):
            second = run_script("train_gpt.py", *args, "--max-steps", "5", *extra)
            assert second.returncode == 1 and "Traceback" not in second.stderr
            assert second.stderr.startswith(f"error: --log-dir {log} is in use by another run (pid {first.pid} on ")
            assert second.stderr.endswith("; wait for it or stop it, or choose another --log-dir\n")
            assert snapshot(log) == before
    finally:
        first.kill()
        first.wait()
        first.stdout.close()


# -----------------------------------------------------------------------------
# 4. unusable checkpoints are named, never unpickled, never circular


class Boom:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"garbage bytes, not a torch file", "not a train_gpt.py checkpoint (corrupt, or holding objects other than tensors)"),
        ("hostile", "not a train_gpt.py checkpoint (corrupt, or holding objects other than tensors)"),
        ("bare", "not a train_gpt.py checkpoint (no model, config; a bare state dict?)"),
    ],
)  # fmt: skip
def test_a_bad_pt_is_one_line_of_our_own(content, reason, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    if content == "hostile":
        path.write_bytes(pickle.dumps({"model": Boom()}))
    elif content == "bare":
        torch.save(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)).state_dict(), path)
    else:
        path.write_bytes(content)
    message = one_line_error(sample.main, ["--model", str(path)], capsys)
    assert message == f"{path}: {reason}"
    assert "weights_only" not in message and not (tmp_path / "hacked").exists()


@pytest.mark.slow
def test_resume_names_each_unusable_checkpoint_and_the_way_out(data, tmp_path):
    log = tmp_path / "log"
    args = [*SMALL, "--data-dir", str(data), "--log-dir", str(log), "--max-steps", "4", "--save-every", "2"]
    assert run_script("train_gpt.py", *args).returncode == 0
    (log / "model_00002.pt").write_bytes(b"torn")
    (log / "model_00004.pt").write_bytes((log / "model_00004.pt").read_bytes()[:1000])
    before = snapshot(log)
    r = run_script("train_gpt.py", *args, "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"skipping {log / 'model_00004.pt'}: not a readable checkpoint (")
    assert lines[1].startswith(f"skipping {log / 'model_00002.pt'}: not a readable checkpoint (")
    assert lines[2] == (
        f"error: --resume: none of the checkpoints in {log} is usable (model_00002.pt, model_00004.pt); restore a "
        f"good copy, or move the run's files (log.txt, model_*.pt) out of {log} to start afresh there"
    )
    assert len(lines) == 3 and snapshot(log) == before


# -----------------------------------------------------------------------------
# 2. --resume continues that run: restored flags, refused changes, the same data


@pytest.mark.slow
def test_resume_refuses_flags_that_change_what_the_run_learns(data, tmp_path):
    log = tmp_path / "log"
    args = [*SMALL, "--data-dir", str(data), "--log-dir", str(log), "--max-steps", "2", "--save-every", "2"]
    assert run_script("train_gpt.py", *args, "--max-lr", "2e-3").returncode == 0
    before = snapshot(log)
    r = run_script("train_gpt.py", "--log-dir", str(log), "--resume", "--max-lr", "1e-3", "--n-layer", "3")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    path = log / "model_00002.pt"
    assert r.stderr == (
        f"error: --resume from {path}: --max-lr 0.001 (the run has 0.002), --n-layer 3 (the run has 2) cannot "
        f"change within a run; drop these flags to continue it, or start a new run in another --log-dir with "
        f"--init-from {path}\n"
    )
    assert snapshot(log) == before

    # other shards with the same names and token counts are other data
    other = tmp_path / "other"
    write_shards(other, seed=1)
    r = run_script("train_gpt.py", "--log-dir", str(log), "--resume", "--data-dir", str(other), "--max-steps", "3")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: the training data differs from the checkpoint's (test_train_000001.npy has ")
    assert r.stderr.endswith("; resume with the --data-dir it was trained on\n")
    assert snapshot(log) == before


# -----------------------------------------------------------------------------
# 5. weights load completely or not at all


def hf_folder(folder: Path, n_layer: int = 2, drop: str | None = None) -> Path:
    """A local HF GPT-2 folder of a random tiny model, optionally lying about its layers or missing a tensor."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50257))
    model.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = n_layer
    (folder / "config.json").write_text(json.dumps(config))
    if drop:
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        del state[drop]
        save_file(state, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize(
    "n_layer, drop, problem",
    [
        (3, None, "missing: transformer.h.2.ln_1.weight, transformer.h.2.ln_1.bias, transformer.h.2.attn.c_attn.weight ..."),
        (1, None, "unexpected: transformer.h.1.attn.c_attn.bias, transformer.h.1.attn.c_attn.weight, transformer.h.1.attn.c_proj.bias ..."),
        (2, "transformer.h.1.mlp.c_fc.bias", "missing: transformer.h.1.mlp.c_fc.bias"),
    ],
)  # fmt: skip
def test_hf_folder_must_match_its_config_exactly(n_layer, drop, problem, tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf", n_layer, drop)
    message = one_line_error(sample.main, ["--model", str(folder), "--max-new-tokens", "2"], capsys)
    assert message == f"{folder}: the weights do not match its config ({problem})"


def test_garbage_config_json_is_one_line(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf")
    (folder / "config.json").write_text("{not json")
    message = one_line_error(sample.main, ["--model", str(folder)], capsys)
    assert message.startswith(f"{folder / 'config.json'}: not valid JSON (")
    (folder / "config.json").write_text(json.dumps({"n_layer": 2}))
    message = one_line_error(sample.main, ["--model", str(folder)], capsys)
    assert message == f"{folder}: config.json lacks positive integers for n_positions, vocab_size, n_head, n_embd"


def test_init_from_with_shape_flags_is_refused(data, tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf")
    argv = [*SMALL, "--data-dir", str(data), "--log-dir", str(tmp_path / "log"), "--init-from", str(folder)]
    assert one_line_error(train_gpt.main, argv, capsys) == (
        f"--init-from {folder} takes its shape from the source; drop --n-layer, --n-head, --n-embd"
    )
    assert not (tmp_path / "log").exists()


@pytest.mark.slow
def test_gpt2_name_offline_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    r = run_script("sample.py", "--model", "gpt2", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: cannot download gpt2 from the Hugging Face hub (")
    assert r.stderr.endswith("); offline, pass a local HF GPT-2 folder (config.json + model.safetensors) instead\n")


# -----------------------------------------------------------------------------
# 6. shard names: the split is matched exactly


def test_a_prefix_containing_train_or_val_keeps_each_shard_in_its_split(tmp_path):
    for prefix in ("x_train", "val_x_train"):
        folder = tmp_path / prefix
        folder.mkdir()
        for name in (f"{prefix}_val_000000.npy", f"{prefix}_train_000001.npy", f"{prefix}_train_000002.npy"):
            fineweb.write_shard(folder / name, torch.arange(300, dtype=torch.int32).numpy().astype("uint16"))
        val = [os.path.basename(p) for p in train_gpt.list_shards(str(folder), "val")]
        train = [os.path.basename(p) for p in train_gpt.list_shards(str(folder), "train")]
        assert val == [f"{prefix}_val_000000.npy"]
        assert train == [f"{prefix}_train_000001.npy", f"{prefix}_train_000002.npy"]


# -----------------------------------------------------------------------------
# 7. HellaSwag rows are validated


GOOD_ROW = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1}


@pytest.mark.parametrize(
    "row, problem",
    [
        ({**GOOD_ROW, "endings": ["a", "b", "c"]}, '"endings" must be a list of 4 strings'),
        ({**GOOD_ROW, "endings": ["a", "b", "c", "d", "e"]}, '"endings" must be a list of 4 strings'),
        ({**GOOD_ROW, "endings": "abcd"}, '"endings" must be a list of 4 strings'),
        ({**GOOD_ROW, "label": 7}, '"label" must be an integer 0..3, not 7'),
        ({**GOOD_ROW, "label": 2.7}, '"label" must be an integer 0..3, not 2.7'),
        ({**GOOD_ROW, "ctx": None}, 'not a HellaSwag row (no "ctx" string)'),
        ("{garbled", "invalid JSON ("),
    ],
)
def test_bad_hellaswag_rows_name_the_file_and_line(row, problem, tmp_path, capsys):
    path = tmp_path / "hellaswag_val.jsonl"
    bad = row if isinstance(row, str) else json.dumps(row)
    path.write_text(json.dumps(GOOD_ROW) + "\n\n" + bad + "\n")
    ckpt = tmp_path / "model.pt"
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64))
    torch.save({"model": model.state_dict(), "config": vars(model.config)}, ckpt)
    argv = ["--checkpoint", str(ckpt), "--data-dir", str(tmp_path), "--device", "cpu"]
    assert one_line_error(hellaswag.main, argv, capsys).startswith(f"{path}:3: {problem}")


# -----------------------------------------------------------------------------
# 8. filesystem errors: one line naming the path and the cause; nothing torn, nothing lost


def test_no_space_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    previous = checkpoint.checkpoint_path(str(tmp_path), 2)
    Path(previous).write_bytes(b"the previous checkpoint")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    state = {"model": {"w": torch.zeros(1000)}}
    path = checkpoint.checkpoint_path(str(tmp_path), 4)
    with pytest.raises(fineweb.UserError) as e:
        checkpoint.save_checkpoint(str(tmp_path), 4, state, keep_last=1)
    assert str(e.value) == f"no space left on device while writing {path}"
    assert sorted(os.listdir(tmp_path)) == ["model_00002.pt"]  # no temp file, no half checkpoint
    assert Path(previous).read_bytes() == b"the previous checkpoint"


def test_torch_save_failing_mid_write_is_reported_as_its_os_error(tmp_path, monkeypatch):
    """torch.save turns a failed write into a RuntimeError of its own; the cause must still be named."""
    monkeypatch.setattr("builtins.open", open_failing_after(2000, errno.ENOSPC))
    path = checkpoint.checkpoint_path(str(tmp_path), 4)
    with pytest.raises(fineweb.UserError) as e:
        checkpoint.save_checkpoint(str(tmp_path), 4, {"w": torch.zeros(10000)}, keep_last=0)
    monkeypatch.undo()
    assert str(e.value) == f"no space left on device while writing {path}"
    assert os.listdir(tmp_path) == []


def test_unreadable_data_dir_is_one_line(tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "data")

    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(os, "listdir", denied)  # chmod means nothing to root, who runs CI
    with pytest.raises(fineweb.UserError) as e:
        train_gpt.list_shards(str(tmp_path / "data"), "train")
    assert str(e.value) == f"--data-dir {tmp_path / 'data'}: cannot list it (permission denied)"


def test_cli_turns_os_errors_into_one_line(tmp_path, capsys):
    def main(argv):
        open(tmp_path / "missing" / "file.txt")

    with pytest.raises(SystemExit) as e:
        fineweb.cli(main, [])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing' / 'file.txt'}: no such file or directory\n"


@pytest.mark.slow
def test_fineweb_empty_corpus_is_an_error_and_leaves_no_output_dir(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    out = tmp_path / "out"
    r = run_script("fineweb.py", "--input", str(tmp_path / "empty.jsonl"), "--output-dir", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == f"error: no documents in {tmp_path / 'empty.jsonl'}; nothing to tokenize\n"
    assert not out.exists()


def alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie has exited: only its exit status is left to collect)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_fineweb_sigterm_stops_the_workers_quietly(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 200}) + "\n" for i in range(40000)))
    out = tmp_path / "out"
    args = ["fineweb.py", "--input", str(docs), "--output-dir", str(out), "--workers", "2", "--shard-size", "100000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not any(n.endswith(".npy") for n in os.listdir(out)) if out.exists() else True:
        assert time.time() < deadline and p.poll() is None, "no shard was written"
        time.sleep(0.2)
    workers = descendants(p.pid)  # the 2 pool workers (and multiprocessing's resource tracker)
    assert len(workers) >= 2, workers
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130
    assert stderr.strip() == "interrupted" and "Traceback" not in stderr and "BrokenPipe" not in stderr
    # and none of them outlives it (a moment allowed for the OS to reap a child of the exited process)
    deadline = time.time() + 10
    while (left := [pid for pid in workers if alive(pid)]) and time.time() < deadline:
        time.sleep(0.1)
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]
    # a rerun resumes from the complete shards
    r = run_script("fineweb.py", *args[1:], "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "resuming after shard" in r.stderr


# -----------------------------------------------------------------------------
# 9. under torchrun an error is printed once


@pytest.mark.slow
def test_torchrun_prints_a_bad_input_error_once(data, tmp_path):
    log = tmp_path / "log"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train_gpt.py", *SMALL]
    r = run_script(*args, "--data-dir", str(data), "--log-dir", str(log), "--total-batch-size", "100", timeout=300)
    assert r.returncode != 0
    expected = "error: --total-batch-size 100 is not divisible by batch-size * seq-len * world-size = 4 * 32 * 2 = 256"
    assert r.stderr.count(expected) == 1, r.stderr
    # torchrun itself reports a failed worker with a traceback of its own; ours must have none
    assert f'File "{ROOT / "train_gpt.py"}"' not in r.stderr and 'train_gpt.py", line' not in r.stderr
