"""Edges of issue 19 ("Edges still open", "Unclear for the user"): malformed HellaSwag files and data-set
rows, OS errors that keep their cause, messages that no longer contradict themselves or send the user
back to the step just done, flags that would do nothing, a resume with nothing left to do, library
warnings kept out of our one line, and flags restored by --resume that this machine cannot honour.
Each test asserts the exact line and the exit code."""

import errno
import json
import os
import pickle
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, open_failing_after, run_script, save_fake_checkpoint, write_shards

import checkpoint
import cli
import fineweb
import hellaswag
import hellaswag_eval
import preflight
import sample
import train_gpt
from cli import UserError
from shards import write_shard
from train_gpt import GPT, GPTConfig

SMALL = [*TINY, "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--seq-len", "32"]
SMALL += ["--total-batch-size", "128", "--eval-steps", "1", "--warmup-steps", "2", "--max-steps", "2"]
GOOD_ROW = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def exits(main, argv: list[str], capsys) -> tuple[int | None, str, str]:
    """main(argv) in this process: (exit code, None if it returned; stdout; stderr), global state kept."""
    rng, precision = torch.get_rng_state(), torch.get_float32_matmul_precision()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    code = None
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_rng_state(rng)
        torch.set_float32_matmul_precision(precision)
        for s, h in handlers.items():
            signal.signal(s, h)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(main, argv: list[str], capsys) -> str:
    """main(argv) must exit 1 having printed exactly one `error:` line; that line, without the prefix."""
    code, _, err = exits(main, argv, capsys)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def data(tmp_path) -> Path:
    write_shards(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def tiny_pt(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64))
    torch.save({"model": model.state_dict(), "config": vars(model.config)}, path)
    return path


def hf_folder(folder: Path, vocab_size: int = 50257) -> Path:
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=vocab_size)).save_pretrained(str(folder))
    return folder


def fake_run(data: Path, log: Path, *flags: str, step: int = 2) -> Path:
    """The checkpoint a run of SMALL + flags would save at `step` (untrained weights), made in a moment."""
    path = save_fake_checkpoint([*SMALL, "--data-dir", str(data), "--log-dir", str(log), *flags], step)
    (log / "log.txt").write_text("0 val 10.9\n0 train 10.95\n1 train 10.5\n")
    return path


def broken_package(tmp_path: Path, monkeypatch, name: str, error: str) -> None:
    """`import name` now raises `error` (an installed but broken package), whatever is really installed."""
    root = tmp_path / "broken_site"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"raise {error}\n")
    monkeypatch.syspath_prepend(str(root))
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, module)


# -----------------------------------------------------------------------------
# 1. malformed HellaSwag files, small vocabularies, null data-set rows


@pytest.mark.parametrize(
    "content, problem",
    [
        (
            json.dumps(GOOD_ROW).encode() + b'\n{"ctx": "\xff", "endings": ["a", "b", "c", "d"], "label": 1}\n',
            "2: not UTF-8 text (byte 0xff at byte 10 of the line); replace the file with a good copy (a missing one "
            "is downloaded again)",
        ),
        (json.dumps({**GOOD_ROW, "ctx": ""}).encode(), '1: "ctx" is empty; a HellaSwag row needs a context to score'),
        (json.dumps({**GOOD_ROW, "ctx": "  "}).encode(), '1: "ctx" is empty; a HellaSwag row needs a context to score'),
        (
            json.dumps({**GOOD_ROW, "endings": ["a", "", "c", "d"]}).encode(),
            '1: "endings"[1] is empty; a HellaSwag ending needs text',
        ),
    ],
    ids=["invalid-utf8", "empty-ctx", "blank-ctx", "empty-ending"],
)
def test_malformed_hellaswag_files_are_one_line_naming_file_and_line(content, problem, tmp_path, tiny_pt, capsys):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_bytes(content)
    argv = ["--checkpoint", str(tiny_pt), "--data-dir", str(tmp_path), "--device", "cpu"]
    assert one_line_error(hellaswag.main, argv, capsys) == f"{path}:{problem}"


def test_a_bom_is_no_part_of_the_first_row(tmp_path):
    (tmp_path / "hellaswag_val.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_ROW).encode() + b"\n")
    assert hellaswag_eval.load_hellaswag("val", str(tmp_path)) == [GOOD_ROW]


def test_a_model_with_a_vocabulary_smaller_than_gpt2s_is_refused(tmp_path, capsys):
    folder = hf_folder(tmp_path / "hf", vocab_size=1000)
    (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
    argv = ["--model", str(folder), "--data-dir", str(tmp_path), "--device", "cpu"]
    assert one_line_error(hellaswag.main, argv, capsys) == (
        f"{folder}: the model's vocabulary has 1000 tokens, fewer than the GPT-2 tokenizer's 50257 that HellaSwag "
        "is scored with; score a model with GPT-2's vocabulary"
    )
    assert one_line_error(sample.main, ["--model", str(folder), "--device", "cpu"], capsys) == (
        f"{folder}: the model's vocabulary has 1000 tokens, fewer than the GPT-2 tokenizer's 50257 that prompts "
        "and samples are written in; sample a model with GPT-2's vocabulary"
    )


def test_a_null_text_in_a_streamed_data_set_is_one_line(tmp_path, capsys):
    ds = iter([{"text": "hello"}, {"text": None}])
    docs = fineweb.iter_fineweb(ds, what="my/data")
    assert next(docs) == "hello"
    with pytest.raises(UserError) as e:
        next(docs)
    assert str(e.value) == 'my/data: row 2 has a null "text", not a string; fix or drop that row'


def dataset_folder(folder: Path, texts: list) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (folder / "sample" / "10BT").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), folder / "sample" / "10BT" / "000_00000.parquet")
    readme = (
        "---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n---\n"
    )
    (folder / "README.md").write_text(readme)
    return folder


@pytest.mark.slow
def test_a_local_data_set_folder_with_a_null_text_or_no_data_set_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}
    folder = dataset_folder(tmp_path / "ds", ["hello", None, "world"])
    out = tmp_path / "out"
    r = run_script("fineweb.py", "--dataset", str(folder), "--output-dir", str(out), "--workers", "1", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == f'error: {folder}: row 2 has a null "text", not a string; fix or drop that row\n'
    assert not out.exists()
    # a local folder that is no data set: no advice to check the network
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.md").write_text("hello")
    r = run_script("fineweb.py", "--dataset", str(tmp_path / "notes"), "--output-dir", str(out), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"error: cannot read {tmp_path / 'notes'} as a data set with name=sample-10BT (")
    assert r.stderr.endswith(
        "); it must be laid out as on the Hub (data files and a README.md declaring the --name config), "
        "or tokenize local files with --input FILE...\n"
    )
    assert "network" not in r.stderr and not out.exists()


# -----------------------------------------------------------------------------
# 2. an OS error keeps its cause, in words, and names the path


@pytest.mark.parametrize(
    "error, text",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left on device"),
        (OSError(errno.EFBIG, os.strerror(errno.EFBIG)), "file too large"),
        (OSError("quota exceeded for user 1000"), "quota exceeded for user 1000"),
        (OSError(), "OSError"),
        (BlockingIOError(), "BlockingIOError"),
    ],
    ids=["ENOSPC", "EFBIG", "text-only", "bare", "bare-subclass"],
)
def test_os_error_text_keeps_the_cause_unmangled(error, text, tmp_path, capsys):
    assert cli.os_error_text(error) == text
    path = tmp_path / "out.bin"

    def failing(f):
        f.write(b"some bytes")
        raise error

    with pytest.raises(UserError) as e:
        cli.write_atomic(path, failing)
    assert str(e.value) == f"{text} while writing {path}"
    assert os.listdir(tmp_path) == []  # no temp file, nothing half written

    def main(argv):
        raise error

    assert one_line_error(lambda argv: cli.cli(main, argv), [], capsys) == text


def test_a_file_size_limit_while_torch_saves_names_the_cause_and_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr("builtins.open", open_failing_after(2000, errno.EFBIG))
    path = checkpoint.checkpoint_path(str(tmp_path), 4)
    with pytest.raises(UserError) as e:
        checkpoint.save_checkpoint(str(tmp_path), 4, {"w": torch.zeros(10000)}, keep_last=0)
    monkeypatch.undo()
    assert str(e.value) == f"file too large while writing {path}"
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="POSIX file-size limits")
def test_a_real_file_size_limit_is_named_even_when_numpy_reports_only_a_short_write(tmp_path):
    code = (
        "import resource, numpy as np; from cli import cli; from shards import write_shard; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)); "
        f"cli(lambda argv: write_shard({str(tmp_path / 'x_val_000000.npy')!r}, np.zeros(100000, np.uint16)), [])"
    )
    r = run_script("-c", code)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    # was "error: oSError while writing ...": the cause lost, its name mangled; numpy says only how much it wrote
    assert len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: file too large for the file-size limit of 100000 bytes (ulimit -f; ")
    assert r.stderr.endswith(f" written) while writing {tmp_path / 'x_val_000000.npy'}\n")
    assert os.listdir(tmp_path) == []


def test_cli_names_both_paths_of_a_failed_rename(tmp_path, capsys):
    def main(argv):
        os.rename(tmp_path / "a", tmp_path / "b")

    message = one_line_error(lambda argv: cli.cli(main, argv), [], capsys)
    assert message == f"{tmp_path / 'a'} -> {tmp_path / 'b'}: no such file or directory"


# -----------------------------------------------------------------------------
# 3. messages that said the opposite of the facts, or sent the user back to the step just done


def test_shards_each_smaller_than_a_batch_are_not_called_a_split_smaller_than_one(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"t_train_{i + 1:06d}.npy", np.arange(100, dtype=np.uint16))
    with pytest.raises(UserError) as e:
        train_gpt.DataLoaderLite(4, 32, 0, 1, "train", data_dir=str(tmp_path))
    assert str(e.value) == (
        f"--data-dir {tmp_path}: the 'train' split has 300 tokens, but in 3 shards of at most 100, and a batch of "
        "B*T+1 = 129 tokens never crosses shards; lower --batch-size or --seq-len, or make bigger shards "
        "(fineweb.py --shard-size)"
    )


def test_a_corpus_that_fit_in_one_shard_says_so_and_how_to_split_it(tmp_path, capsys):
    docs, out = tmp_path / "docs.jsonl", tmp_path / "out"
    docs.write_text(json.dumps({"text": "hello world"}) + "\n")
    code, _, err = exits(fineweb.main, ["--input", str(docs), "--output-dir", str(out), "--workers", "1"], capsys)
    assert code is None
    assert err == (
        "note: the corpus fit in one shard, edufineweb_val_000000.npy (shard 0 is val), so there is no train "
        "shard; for train_gpt.py, rerun with a --shard-size below 3 into a new --output-dir\n"
    )
    argv = [*SMALL, "--data-dir", str(out), "--log-dir", str(tmp_path / "log")]
    assert one_line_error(train_gpt.main, argv, capsys) == (
        f"--data-dir {out}: no 'train' shards, only the val shard edufineweb_val_000000.npy (3 tokens): the "
        "corpus fit in one shard, and shard 0 is val; rerun fineweb.py with a --shard-size below 3 (into a new "
        "--output-dir) so that it makes at least two shards"
    )
    assert not (tmp_path / "log").exists()


def test_a_vocabulary_too_small_for_gpt2_tokens_blames_the_model_not_the_shard(tmp_path):
    path = tmp_path / "t_train_000000.npy"
    tokens = np.arange(100, dtype=np.uint16)
    tokens[7] = 50253
    write_shard(path, tokens)
    with pytest.raises(UserError) as e:
        train_gpt.check_tokens(np.load(path), str(path), 1000)
    assert str(e.value) == (
        f"{path}: token id 50253 >= vocab_size 1000: the model's vocabulary is smaller than the 50257 GPT-2 "
        "tokens the shards are made of; train a model with GPT-2's vocabulary (vocab_size >= 50257), not one "
        "--init-from a smaller one"
    )
    tokens[7] = 60000  # no GPT-2 token: the shard is what is wrong, whatever the model
    with pytest.raises(UserError) as e:
        train_gpt.check_tokens(tokens, str(path), 1000)
    assert str(e.value) == (
        f"{path}: token id 60000 >= vocab_size 1000; the shard is corrupt or was made with another tokenizer"
    )


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_wandb_installed_but_broken_is_not_called_missing(how, data, tmp_path, monkeypatch, capsys):
    if how == "missing":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed
        expected = "--wandb needs the wandb package: pip install wandb"
    else:
        broken_package(tmp_path, monkeypatch, "wandb", "AttributeError('module pydantic has no attribute v1')")
        expected = (
            "--wandb: wandb is installed but cannot be imported (AttributeError: module pydantic has no attribute "
            "v1); repair it: pip install --force-reinstall wandb, or drop --wandb"
        )
    argv = [*SMALL, "--data-dir", str(data), "--log-dir", str(tmp_path / "log"), "--wandb", "proj"]
    assert one_line_error(train_gpt.main, argv, capsys) == expected
    assert not (tmp_path / "log").exists()


def test_pyarrow_or_datasets_installed_but_broken_is_not_called_missing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pyarrow")
    table = tmp_path / "docs.parquet"
    table.write_bytes(b"PAR1")  # never read: the import fails first
    broken_package(tmp_path, monkeypatch, "pyarrow", "ImportError('libarrow.so.2600: cannot open shared object file')")
    argv = ["--input", str(table), "--output-dir", str(tmp_path / "out")]
    assert one_line_error(fineweb.main, argv, capsys) == (
        f"{table}: pyarrow is installed but cannot be imported (ImportError: libarrow.so.2600: cannot open shared "
        "object file); repair it: pip install --force-reinstall pyarrow"
    )
    broken_package(
        tmp_path, monkeypatch, "datasets", "ModuleNotFoundError('No module named multiprocess', name='multiprocess')"
    )
    assert one_line_error(fineweb.main, ["--output-dir", str(tmp_path / "out")], capsys) == (
        "cannot stream HuggingFaceFW/fineweb-edu: datasets is installed but cannot be imported (ModuleNotFoundError: "
        "No module named multiprocess); repair it: pip install --force-reinstall datasets"
    )
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# 4. a run killed before its first checkpoint: both messages give a way out, and it works


def test_a_log_dir_without_a_checkpoint_says_how_to_start_afresh(data, tmp_path, capsys, monkeypatch):
    log = tmp_path / "log"
    log.mkdir()
    (log / "log.txt").write_text("0 val 10.9\n0 train 10.95\n1 train 10.5\n")  # killed before step 2's save
    (log / "train.lock").write_text("pid 4242 on node0, since 2026-01-01 00:00:00\n")  # released by its death
    before = snapshot(log)
    argv = [*SMALL, "--data-dir", str(data), "--log-dir", str(log)]
    assert one_line_error(train_gpt.main, argv, capsys) == (
        f"--log-dir {log} already holds a run (log.txt) but no checkpoint to resume; to start afresh there, "
        f"move {log / 'log.txt'} aside, or choose another --log-dir"
    )
    assert one_line_error(train_gpt.main, [*argv, "--resume"], capsys) == (
        f"--resume: no checkpoint (model_*.pt) in --log-dir {log}: it holds a log.txt but no checkpoint (was "
        "--save-every 0, or was the run stopped before its first one?), so there is nothing to resume; to start "
        f"afresh, drop --resume and move {log / 'log.txt'} aside, or choose another --log-dir"
    )
    assert snapshot(log) == before
    # the way out works: with log.txt moved aside a fresh run takes the dir (the lock left behind is no obstacle)
    os.rename(log / "log.txt", tmp_path / "old_log.txt")
    started = []
    monkeypatch.setattr(train_gpt, "run", lambda cfg, *a: started.append(cfg.log_dir))
    code, _, err = exits(train_gpt.main, argv, capsys)
    assert code is None and err == "" and started == [str(log)]
    assert (tmp_path / "old_log.txt").read_text() == "0 val 10.9\n0 train 10.95\n1 train 10.5\n"


# -----------------------------------------------------------------------------
# 5. accepted without a word before


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.jsonl": '{"text": ""}\n{"text": ""}\n', "b.txt": ""}, "no text in {a}, {b}: its 3 documents are all empty; nothing to tokenize"),
        ({"a.jsonl": '{"text": ""}\n' * 5}, "no text in {a}: its first 4 documents are empty, so shard 0 (val) would hold only <|endoftext|> tokens; drop the empty documents"),
    ],
    ids=["all-empty", "first-shard-empty"],
)  # fmt: skip
def test_inputs_that_yield_no_text_are_refused_before_any_shard(files, message, tmp_path, capsys):
    paths = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        paths[name.split(".")[0]] = str(tmp_path / name)
    out = tmp_path / "out"
    argv = ["--input", *paths.values(), "--output-dir", str(out), "--shard-size", "4", "--workers", "1"]
    assert one_line_error(fineweb.main, argv, capsys) == message.format(**paths)
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "nothing to plot"),
        (b"hello\n0 train abc\n0 foo 1.0\n", "nothing to plot"),
        (b"\xff\xfe garbage\n", "not a text file (invalid start byte at byte 0); pass a log.txt"),
    ],
    ids=["empty", "non-numeric", "binary"],
)
def test_plot_of_a_log_with_nothing_plottable_is_refused(content, message, tmp_path, capsys):
    log = tmp_path / "log.txt"
    log.write_bytes(content)
    if message == "nothing to plot":
        message = (
            "nothing to plot (no `STEP STREAM NUMBER` line of hella, lr, train, val); pass the log.txt of a "
            "train_gpt.py or build-nanogpt run"
        )
    assert one_line_error(train_gpt.main, ["--plot", str(log)], capsys) == f"--plot {log}: {message}"
    assert os.listdir(tmp_path) == ["log.txt"]


def test_plot_notes_the_lines_it_skips(tmp_path, capsys):
    log = tmp_path / "log.txt"
    log.write_text("0 train 10.9\n1 train 10.5\n2 train 1o.1\nhello\n3 tra")
    code, out, err = exits(train_gpt.main, ["--plot", str(log)], capsys)
    assert code is None and out == f"wrote {tmp_path / 'curves.png'}\n"
    assert err == "note: skipped 3 line(s) that are not `STEP STREAM NUMBER`: line 3, 4, 5\n"


@pytest.mark.parametrize(
    "main, argv, expected",
    [
        (train_gpt.main, ["--cooldown-frac", "0.3"], "--cooldown-frac only means something with --lr-schedule wsd, and this run has --lr-schedule cosine; drop --cooldown-frac, or pass --lr-schedule wsd"),
        (train_gpt.main, ["--wandb-run-name", "r1"], "--wandb-run-name only means something with --wandb PROJECT, and this run has no --wandb; drop --wandb-run-name, or pass --wandb PROJECT"),
        (train_gpt.main, ["--wandb", "", "--wandb-run-name", "r1"], "--wandb-run-name only means something with --wandb PROJECT, and this run has no --wandb; drop --wandb-run-name, or pass --wandb PROJECT"),
        (train_gpt.main, ["--benchmark-warmup", "2"], "--benchmark-warmup only means something with --benchmark-steps N, and this run has --benchmark-steps 0; drop --benchmark-warmup, or pass --benchmark-steps N"),
        (train_gpt.main, ["--hellaswag-dir", "hs"], "--hellaswag-dir only means something with --hellaswag-every N, and this run has --hellaswag-every 0; drop --hellaswag-dir, or pass --hellaswag-every N"),
        (train_gpt.main, ["--save-every", "0", "--keep-last", "2"], "--keep-last only means something with --save-every N, and this run has --save-every 0; drop --keep-last, or pass --save-every N"),
        (train_gpt.main, ["--benchmark-steps", "2", "--data-dir", "d", "--eval-every", "0", "--log-dir", "l"], "--benchmark-steps times synthetic batches and writes nothing: --data-dir, --log-dir would do nothing; drop them"),
        (train_gpt.main, ["--benchmark-steps", "2", "--save-every", "5"], "--benchmark-steps times synthetic batches and writes nothing: --save-every would do nothing; drop it"),
        (train_gpt.main, ["--plot", "log.txt", "--max-steps", "5", "--resume"], "--plot draws curves.png from a log and exits: --max-steps, --resume would do nothing; drop them"),
        (sample.main, ["--model", "m.pt", "--export-hf", "out", "--temperature", "0.5"], "--export-hf writes the model and exits, without sampling: --temperature would do nothing; drop it"),
        (sample.main, ["--model", "m.pt", "--temperature", "0", "--top-k", "5", "--top-p", "0.9"], "--temperature 0 samples greedily (the most likely token): --top-k, --top-p would do nothing; drop them, or use a temperature above 0"),
        (fineweb.main, ["--input", "a.txt", "--name", "sample-100BT"], "--input tokenizes local files, so --name would do nothing; drop it"),
    ],
)  # fmt: skip
def test_a_flag_that_needs_another_one_is_refused_naming_both(main, argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if main is train_gpt.main:
        argv = [*argv, "--hellaswag-every", "0"] if "--hellaswag-dir" in argv else argv
    assert one_line_error(main, argv, capsys) == expected
    assert os.listdir(tmp_path) == []


def test_peak_tflops_needs_no_benchmark_it_feeds_the_mfu_stream():
    cfg, given = train_gpt.parse_args(["--peak-tflops", "100", "--hellaswag-every", "0"])
    preflight.check_flag_pairs(cfg, given)  # accepted: training logs mfu with it


def test_resume_checks_only_the_flags_typed_now(data, tmp_path, capsys, monkeypatch):
    log = tmp_path / "log"
    fake_run(data, log, "--save-every", "0", "--keep-last", "0")  # the run's own --save-every 0
    started = []
    monkeypatch.setattr(train_gpt, "run", lambda cfg, *a: started.append(cfg.max_steps))
    code, _, err = exits(train_gpt.main, ["--log-dir", str(log), "--resume", "--max-steps", "3"], capsys)
    assert code is None and err == "" and started == [3]  # the restored pair is not this command's mistake
    message = one_line_error(train_gpt.main, ["--log-dir", str(log), "--resume", "--cooldown-frac", "0.2"], capsys)
    assert message == (
        "--cooldown-frac only means something with --lr-schedule wsd, and this run has --lr-schedule cosine; "
        "drop --cooldown-frac"  # on --resume the schedule cannot change: no advice to pass --lr-schedule wsd
    )


def test_resume_of_a_complete_run_says_so_and_how_to_train_further(data, tmp_path, capsys, monkeypatch):
    log = tmp_path / "log"
    path = fake_run(data, log)  # at step 2 = --max-steps 2, its final evals and save done
    before = snapshot(log)
    monkeypatch.setattr(train_gpt, "run", lambda *a: pytest.fail("nothing should train"))
    code, out, err = exits(train_gpt.main, ["--log-dir", str(log), "--resume"], capsys)
    assert code is None and err == ""  # exit 0: a job that resumes until done finds it done, not failed
    assert out.splitlines()[-1] == (
        f"resume: the run in {log} is already complete at step 2 (--max-steps 2); nothing to do: to train "
        "further, resume with a larger --max-steps"
    )
    assert one_line_error(train_gpt.main, ["--log-dir", str(log), "--resume", "--max-steps", "1"], capsys) == (
        f"--max-steps 1 is below the step of {path} (2); a run cannot go back: to train further, pass a "
        "--max-steps above 2"
    )
    assert snapshot(log) == before


# -----------------------------------------------------------------------------
# 6. no library warning before our line


class Boom:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


@pytest.mark.slow
def test_a_hostile_pickle_gets_our_line_only(tmp_path):
    pt = tmp_path / "model.pt"
    pt.write_bytes(pickle.dumps({"model": Boom()}))
    r = run_script("sample.py", "--model", str(pt))
    assert r.returncode == 1
    assert r.stderr == (
        f"error: {pt}: not a train_gpt.py checkpoint (corrupt, or holding objects other than tensors)\n"
    )
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"n_positions": 8, "vocab_size": 50257, "n_layer": 1, "n_head": 1, "n_embd": 8})
    )
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model": Boom()}))
    r = run_script("sample.py", "--model", str(folder))
    assert r.returncode == 1
    weights = folder / "pytorch_model.bin"  # the file named, not only its folder
    assert r.stderr == f"error: {weights}: unreadable weights (UnpicklingError); the file is corrupt or not GPT-2's\n"
    assert not (ROOT / "hacked").exists()


# -----------------------------------------------------------------------------
# 7. a flag restored by --resume that this machine cannot honour names the override that works


def test_compile_without_a_compiler_is_refused_before_the_run_takes_the_log_dir(data, tmp_path, capsys, monkeypatch):
    from torch._inductor import cpp_builder, exc

    def no_compiler():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    argv = [*SMALL, "--data-dir", str(data), "--log-dir", str(tmp_path / "log"), "--compile"]
    assert one_line_error(train_gpt.main, argv, capsys) == (
        "--compile needs a C++ compiler on the CPU, and none was found (g++, or $CXX); install one, or drop --compile"
    )
    assert not (tmp_path / "log").exists()


@pytest.mark.parametrize(
    "flags, prepare, expected, override",
    [
        (["--wandb", "proj"], "no-wandb", "--wandb proj (restored from the checkpoint) needs the wandb package: pip install wandb, or resume without W&B: --wandb ''", ["--wandb", ""]),
        (["--device", "cuda"], "no-cuda", "--device cuda: CUDA is not available here; use --device cpu or auto (--device cuda is the run's, restored from {path})", ["--device", "cpu"]),
        (["--compile"], "no-compiler", "--compile (restored from the checkpoint) needs a C++ compiler on the CPU, and none was found (g++, or $CXX); install one, or resume with --no-compile", ["--no-compile"]),
        (["--hellaswag-every", "1", "--hellaswag-dir", "{tmp}/gone"], None, "--hellaswag-dir {tmp}/gone (restored from {path}): no such folder here; resume with --hellaswag-dir DIR (a folder holding hellaswag_val.jsonl), or --hellaswag-every 0 to go on without HellaSwag", ["--hellaswag-every", "0"]),
        (["--data-dir", "{tmp}/moved"], None, "--data-dir {tmp}/moved (restored from {path}): no such directory here; resume with --data-dir DIR, the folder of the run's shards on this machine", ["--data-dir", "{tmp}/data"]),
    ],
    ids=["wandb", "device", "compile", "hellaswag-dir", "data-dir"],
)  # fmt: skip
def test_a_restored_flag_this_machine_cannot_honour_names_the_override(
    flags, prepare, expected, override, data, tmp_path, capsys, monkeypatch
):
    flags = [f.format(tmp=tmp_path) for f in flags]
    override = [f.format(tmp=tmp_path) for f in override]
    if flags[0] == "--data-dir":  # the run's shards were in a folder that is gone here
        os.rename(data, flags[1])
        path = fake_run(Path(flags[1]), tmp_path / "log")
        os.rename(flags[1], data)
    else:
        path = fake_run(data, tmp_path / "log", *flags)
    if prepare == "no-wandb":
        monkeypatch.setitem(sys.modules, "wandb", None)
    elif prepare == "no-cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elif prepare == "no-compiler":
        from torch._inductor import cpp_builder, exc

        def no_compiler():
            raise exc.InvalidCxxCompiler

        monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    started = []
    monkeypatch.setattr(train_gpt, "run", lambda cfg, *a: started.append(cfg))
    argv = ["--log-dir", str(tmp_path / "log"), "--resume", "--max-steps", "3"]
    message = one_line_error(train_gpt.main, argv, capsys)
    assert message == expected.format(tmp=tmp_path, path=path)
    assert started == []
    code, _, err = exits(train_gpt.main, [*argv, *override], capsys)  # the override named works on --resume
    assert code is None and "error" not in err and len(started) == 1


@pytest.mark.parametrize("script", ["train_gpt", "hellaswag"])
def test_offline_hellaswag_error_names_the_scripts_own_folder_flag(script, tmp_path, monkeypatch, capsys):
    """No network and no hellaswag_val.jsonl: the line offers the flag of the script that was run
    (train_gpt.py --hellaswag-dir, hellaswag.py --data-dir), never the other one's."""

    def offline(url, timeout=None):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hellaswag_eval.urllib.request, "urlopen", offline)
    folder = tmp_path / "hs"
    if script == "train_gpt":
        data = tmp_path / "data"
        write_shards(data)
        main, flag = train_gpt.main, "--hellaswag-dir"
        argv = [*TINY[:6], "--hellaswag-every", "1", flag, str(folder), "--data-dir", str(data)]
        argv += ["--log-dir", str(tmp_path / "log")]
    else:
        main, flag = hellaswag.main, "--data-dir"
        (tmp_path / "m.pt").write_bytes(b"")  # the data is looked for before the model is read
        argv = ["--model", str(tmp_path / "m.pt"), flag, str(folder)]
    line = one_line_error(main, argv, capsys)
    path = folder / "hellaswag_val.jsonl"
    assert line == (
        f"HellaSwag val data: {path} is missing and {hellaswag_eval.HELLASWAG_URL.format(split='val')} cannot be "
        f"downloaded ([Errno -2] Name or service not known); copy hellaswag_val.jsonl there or point {flag} at a "
        "folder holding it"
    )
    assert not (tmp_path / "log").exists() and not folder.exists()


def test_a_checkpoint_whose_config_is_not_a_gpt_config_is_one_line(tiny_pt, capsys):
    """A .pt whose config has a key GPTConfig does not take (here a typo of n_layer): one line naming the
    file and the config (before the fix: a TypeError traceback, the message itself indexing the wrong name)."""
    saved = torch.load(tiny_pt, weights_only=True)
    config = {**saved["config"], "n_layers": 2}
    torch.save({**saved, "config": config}, tiny_pt)
    expected = (
        f"{tiny_pt}: its config {config!r} is not a GPT config "
        "(GPTConfig.__init__() got an unexpected keyword argument 'n_layers')"
    )
    assert one_line_error(sample.main, ["--model", str(tiny_pt), "--device", "cpu"], capsys) == expected
