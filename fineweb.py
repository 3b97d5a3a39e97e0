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

This module must not import torch: train_gpt.py imports it (the shard format), and every
spawned tokenizer worker imports it again, so it has to stay light.
"""

from __future__ import annotations

import gzip
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from cli import UserError, cli, flag, flag_name, import_optional, parse_config, write_atomic
from shards import SHARD_RE, shard_name, write_bin_shard, write_shard
from tokenizer import EOT, get_tokenizer

MANIFEST_VERSION = 1


# Documents per task sent to a worker: enough to amortize the pickling round trip
# for short documents, few enough (~1 MB of FineWeb text) to keep all workers busy.
BATCH_SIZE = 256

Documents = Generator[str, None, int]  # yields texts, returns how many it skipped


# -----------------------------------------------------------------------------
# tokenizing (the GPT-2 tokenizer itself: tokenizer.py)


def tokenize(text: str) -> np.ndarray:
    """One document -> uint16 tokens, starting with the EOT that delimits documents."""
    tokens = [EOT]
    # encode_ordinary: a literal "<|endoftext|>" in web text is just text, not a delimiter
    tokens.extend(get_tokenizer().encode_ordinary(text))
    assert max(tokens) < 2**16, "token dictionary too large for uint16"
    return np.array(tokens, dtype=np.uint16)


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
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise UserError(f'{path}:{lineno}: no "text" string field')
            yield text
    return min(n, skip)


def _import_parquet(path: str) -> Any:
    return import_optional("pyarrow.parquet", f"{path}: reading .parquet needs pyarrow; pip install pyarrow", path)


def read_parquet(path: str, skip: int) -> Documents:
    pq = _import_parquet(path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise UserError(f'{path}: no "text" column')
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
                    raise UserError(f"{path}: row {row}: text is {type(text).__name__}, not a string")
                yield text
    except pa.ArrowException as e:
        raise UserError(f"{path}: cannot read ({_one_line(e)})") from None
    return skip


def _reader(path: str) -> Callable[[str, int], Documents]:
    name = path.lower()
    if name.endswith(".txt"):
        return read_txt
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl
    if name.endswith(".parquet"):
        return read_parquet
    raise UserError(f"{path}: unsupported input type; use .txt, .jsonl, .jsonl.gz or .parquet")


def iter_documents(paths: list[str], skip: int = 0) -> Iterator[str]:
    """The documents of all input files in order, without the first `skip` of them."""
    for path in paths:
        try:
            skip -= yield from _reader(path)(path, skip)
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
            raise UserError(f"{path}: cannot read ({_one_line(e)})") from None


def check_inputs(paths: list[str]) -> None:
    """Fail on a bad input before any shard is written: missing, unknown type, wrong schema."""
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file")
        if _reader(path) is not read_txt:
            # parsing the first document catches the usual mistake (no "text" field) early
            docs = iter_documents([path])
            next(docs, None)
            docs.close()


def open_fineweb(dataset: str, name: str) -> Any:
    hint = "or tokenize local files with --input FILE..."
    missing = f"cannot stream {dataset} (datasets is not installed); pip install datasets, {hint}"
    datasets = import_optional("datasets", missing, f"cannot stream {dataset}")
    try:
        return datasets.load_dataset(dataset, name=name, split="train", streaming=True)
    except Exception as e:  # the Hub client raises many kinds; all mean "cannot stream"
        if os.path.isdir(dataset):  # a local folder: no network involved, so no retry can help
            raise UserError(
                f"cannot read {dataset} as a data set with name={name} ({_one_line(e)}); it must be laid out as on "
                f"the Hub (data files and a README.md declaring the --name config), {hint}"
            ) from None
        raise UserError(f"cannot stream {dataset} name={name} ({_one_line(e)}); check the network, {hint}") from None


def iter_fineweb(ds: Any, skip: int = 0, what: str = "the data set") -> Iterator[str]:
    # skip() still downloads the skipped rows, but at least they are not tokenized again
    if skip:
        ds = ds.skip(skip)
    rows = iter(ds)
    for n in itertools.count(skip + 1):
        try:
            row = next(rows, None)
        except Exception as e:  # a dropped connection hours in: say so in one line, a rerun resumes
            raise UserError(f"streaming stopped ({_one_line(e)}); rerun the same command to resume") from None
        if row is None:
            return
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):  # a null text: a bad row, which no rerun mends
            kind = "null" if text is None else type(text).__name__
            raise UserError(f'{what}: row {n} has a {kind} "text", not a string; fix or drop that row')
        yield text


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
        raise UserError(f"cannot read {path} ({_one_line(e)}); delete the output dir to start over") from None


def resume_point(output_dir: str, args: dict) -> tuple[list[dict], bool]:
    """The complete shards a previous run with the same args left, and whether it finished.

    Refuses an output dir that holds shards or a manifest made with other arguments,
    since mixing them would silently corrupt the training data.
    """
    if not os.path.exists(output_dir):
        return [], False
    if not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir} is not a directory")
    prefix, fmt = args["prefix"], args["format"]
    path = manifest_path(output_dir, prefix)
    names = sorted(os.listdir(output_dir))
    if not os.path.exists(path):
        # a manifest under another prefix is ours too, and says what differs
        others = [n for n in names if n.endswith("_manifest.json")]
        if others:
            path = os.path.join(output_dir, others[0])
        elif any(SHARD_RE.fullmatch(n) for n in names):
            raise UserError(
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
        raise UserError(
            f"{output_dir} holds shards made with {'; '.join(diffs)}; use another --output-dir or delete it"
        )
    ours = re.compile(rf"{re.escape(prefix)}_(val|train)_\d{{6}}\.{fmt}")
    for name in names:
        if SHARD_RE.fullmatch(name) and not ours.fullmatch(name):
            raise UserError(
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
# main


@dataclass
class FinewebConfig:
    dataset: str = flag("HuggingFaceFW/fineweb-edu", "Hugging Face dataset to stream (or a local folder in its layout)")
    name: str = flag("sample-10BT", "dataset configuration (subset)")
    input: list[str] | None = flag(
        None,
        "local files instead of the dataset: .txt (one document per file), "
        '.jsonl / .jsonl.gz / .parquet (one document per "text" field)',
        metavar="FILE",
    )
    output_dir: str = flag("edu_fineweb10B", "where the shards and the manifest go")
    shard_size: int = flag(100_000_000, "tokens per shard", lo=1, hi=2**31 - 1)  # .bin headers hold an int32
    workers: int = flag(max(1, (os.cpu_count() or 1) // 2), "tokenizer processes", lo=1, hi=1024)
    prefix: str = flag("edufineweb", "shard file name prefix (letters, digits, '.', '-', '_')")
    format: str = flag("npy", "npy (build-nanogpt) or bin (llm.c)", choices=("npy", "bin"))


class ShardWriter:
    """Cuts the token stream into shards of exactly shard_size tokens, as build-nanogpt
    does (but a document may span any number of shards), and after each shard records
    in the manifest how far into the documents it got. Nothing is written, not even the
    output dir, before the first shard is complete, so a run that fails early leaves no trace."""

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
        os.makedirs(self.out_dir, exist_ok=True)
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


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # as Ctrl-C: the pool is shut down, then one line and exit 130


def run(args: FinewebConfig, given: set[str] = frozenset()) -> None:
    if args.input and (unused := [flag_name(n) for n in ("dataset", "name") if n in given]):
        raise UserError(
            f"--input tokenizes local files, so {', '.join(unused)} would do nothing; "
            f"drop {'them' if len(unused) > 1 else 'it'}"
        )
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.prefix):
        raise UserError(f"--prefix {args.prefix!r}: use only letters, digits, '.', '-' and '_'")
    # What defines the output; a rerun must match it exactly to resume. --workers does
    # not change the output, so it may differ.
    if args.input:
        check_inputs(args.input)
        inputs = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in args.input]
        source = {"dataset": None, "name": None, "inputs": inputs}
    else:
        source = {"dataset": args.dataset, "name": args.name, "inputs": None}
    out_args = {**source, "shard_size": args.shard_size, "prefix": args.prefix, "format": args.format}
    out_dir = args.output_dir
    shards, complete = resume_point(out_dir, out_args)
    if complete:
        print(f"all {len(shards)} shards in {out_dir} are already complete; nothing to do")
        return
    start_doc = shards[-1]["documents"] if shards else 0
    start_offset = shards[-1]["document_offset"] if shards else 0
    if args.input:
        documents = iter_documents(args.input, skip=start_doc)
    else:
        documents = iter_fineweb(open_fineweb(args.dataset, args.name), skip=start_doc, what=args.dataset)
    try:
        get_tokenizer()  # fail here, once, rather than in every worker
    except (OSError, ValueError) as e:  # no download, or a file with the wrong hash
        raise UserError(f"cannot load the GPT-2 tokenizer ({_one_line(e)})") from None
    if shards:
        print(f"resuming after shard {len(shards) - 1} ({start_doc:,} documents done)", file=sys.stderr)

    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        tokenize_to_shards(args, documents, ShardWriter(out_dir, out_args, shards), start_doc, start_offset)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def tokenize_to_shards(
    args: FinewebConfig, documents: Iterable[str], writer: ShardWriter, start_doc: int, start_offset: int
) -> None:
    """Tokenize the documents into the writer's shards, with a progress bar on a terminal."""
    shards = writer.shards
    n_shards_before = len(shards)
    doc, n_tokens, t0 = start_doc, 0, time.perf_counter()
    what = ", ".join(args.input) if args.input else f"{args.dataset} name={args.name}"
    seen_text = n_shards_before > 0  # a document with a token besides its <|endoftext|>
    # tqdm draws only on a terminal (disable=None), so logs of batch jobs stay clean
    with tqdm(unit="tok", unit_scale=True, disable=None, dynamic_ncols=True) as progress:
        for tokens in tokenize_all(documents, args.workers):
            # only the first document of a resumed run starts part-way
            pos = start_offset if doc == start_doc else 0
            seen_text = seen_text or len(tokens) > 1
            if not seen_text and writer.fill + len(tokens) >= len(writer.buf):  # before a shard of nothing
                raise UserError(
                    f"no text in {what}: its first {doc + 1:,} documents are empty, so shard 0 (val) would hold "
                    "only <|endoftext|> tokens; drop the empty documents"
                )
            writer.add(tokens, doc, pos)
            n_tokens += len(tokens) - pos
            doc += 1
            progress.update(len(tokens) - pos)
            progress.set_postfix(documents=doc - start_doc, shards=len(shards), refresh=False)
        if doc == 0:
            raise UserError(f"no documents in {what}; nothing to tokenize")
        if not seen_text:
            raise UserError(f"no text in {what}: its {doc:,} documents are all empty; nothing to tokenize")
        writer.finish(doc)
    if len(shards) == 1:  # train_gpt.py refuses a folder without train shards: say so now
        print(
            f"note: the corpus fit in one shard, {shards[0]['file']} (shard 0 is val), so there is no train "
            f"shard; for train_gpt.py, rerun with a --shard-size below {shards[0]['tokens']} into a new --output-dir",
            file=sys.stderr,
        )

    seconds = time.perf_counter() - t0
    print(
        f"{doc - start_doc:,} documents, {n_tokens:,} tokens, "
        f"{len(shards) - n_shards_before} shards written ({len(shards)} in {writer.out_dir}) "
        f"in {seconds:.1f}s, {n_tokens / max(seconds, 1e-9):,.0f} tokens/s"
    )


def main(argv: list[str] | None = None) -> None:
    description = "Tokenize FineWeb-Edu (or local files) into GPT-2 token shards."
    cli(lambda argv: run(*parse_config(FinewebConfig, argv, description)), argv)


if __name__ == "__main__":
    main()
