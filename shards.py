"""
Token shards, the files between fineweb.py and train_gpt.py: build-nanogpt's .npy (a 1-d uint16
array) and llm.c / modded-nanogpt's .bin (a 256-int32 header, then uint16 tokens), named
{prefix}_{split}_{index}; written atomically, read as memory maps with their headers and token
ids checked. numpy only (no torch), so fineweb.py's tokenizer workers stay light.
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO

import numpy as np

from cli import UserError, os_error_text, write_atomic
from tokenizer import GPT2_VOCAB

BIN_MAGIC = 20240520  # llm.c's magic number for GPT-2 token files
BIN_VERSION = 1
BIN_HEADER_INTS = 256
# {prefix}_{split}_{index}.{npy|bin}; the split is the last field before the index, so a prefix
# that itself contains "train" or "val" cannot move a shard to the other split
SHARD_RE = re.compile(r"(?:(?P<prefix>.*)_)?(?P<split>train|val)(?:_(?P<index>\d+))?\.(?P<format>npy|bin)")


# -----------------------------------------------------------------------------
# writing


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
# reading


def open_shard(path: str) -> np.ndarray:
    """A token shard as a read-only memory map (so RAM does not grow with shard size), header checked.

    Reads build-nanogpt .npy shards (a uint16 array) and llm.c / modded-nanogpt .bin shards
    (a 256-int32 header: magic 20240520, version 1, token count; then uint16 tokens).
    """
    try:
        if path.endswith(".bin"):
            header = np.fromfile(path, dtype="<i4", count=BIN_HEADER_INTS)
            if header.size < BIN_HEADER_INTS or header[0] != BIN_MAGIC or header[1] != BIN_VERSION:
                raise UserError(
                    f"{path}: not an llm.c token shard (expected a 256-int32 header with magic "
                    f"{BIN_MAGIC}, version {BIN_VERSION}); rebuild it with fineweb.py"
                )
            n_tokens = int(header[2])
            size = os.path.getsize(path)
            if size != 4 * BIN_HEADER_INTS + 2 * n_tokens:
                raise UserError(
                    f"{path}: truncated or padded: header says {n_tokens} tokens "
                    f"({4 * BIN_HEADER_INTS + 2 * n_tokens} bytes), the file has {size} bytes"
                )
            return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * BIN_HEADER_INTS, shape=(n_tokens,))
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except PermissionError as e:
        raise UserError(f"{path}: cannot read the shard ({os_error_text(e)})") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable token shard ({e}); it may be truncated, rebuild it with fineweb.py") from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(
            f"{path}: holds a {tokens.ndim}-d {tokens.dtype} array, expected 1-d uint16 GPT-2 tokens; "
            "rebuild it with fineweb.py"
        )
    return tokens


def check_tokens(tokens: np.ndarray, path: str, vocab_size: int) -> None:
    top = int(tokens.max()) if len(tokens) else 0
    if vocab_size <= top < GPT2_VOCAB:  # a real GPT-2 token: the model is what is too small, not the shard
        raise UserError(
            f"{path}: token id {top} >= vocab_size {vocab_size}: the model's vocabulary is smaller than the "
            f"{GPT2_VOCAB} GPT-2 tokens the shards are made of; train a model with GPT-2's vocabulary (vocab_size "
            f">= {GPT2_VOCAB}), not one --init-from a smaller one"
        )
    if top >= vocab_size:
        raise UserError(
            f"{path}: token id {top} >= vocab_size {vocab_size}; the shard is corrupt or was made with another tokenizer"
        )


def list_shards(data_dir: str, split: str) -> list[str]:
    """The .npy/.bin shards of one split, in name order (build-nanogpt and llm.c both number them)."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such directory; make shards with `python fineweb.py`")
    try:
        listing = os.listdir(data_dir)
    except OSError as e:
        raise UserError(f"--data-dir {data_dir}: cannot list it ({os_error_text(e)})") from None
    # build-nanogpt: edufineweb_val_000000.npy; llm.c: fineweb_val_000000.bin or tiny_shakespeare_val.bin
    names = sorted(n for n in listing if (m := SHARD_RE.fullmatch(n)) and m["split"] == split)
    val = [n for n in listing if (m := SHARD_RE.fullmatch(n)) and m["split"] == "val"]
    if not names and split == "train" and len(val) == 1:  # fineweb.py of a corpus smaller than --shard-size
        n = len(open_shard(os.path.join(data_dir, val[0])))
        raise UserError(
            f"--data-dir {data_dir}: no 'train' shards, only the val shard {val[0]} ({n} tokens): the corpus fit "
            f"in one shard, and shard 0 is val; rerun fineweb.py with a --shard-size below {n} (into a new "
            "--output-dir) so that it makes at least two shards"
        )
    if not names:
        raise UserError(f"--data-dir {data_dir}: no '{split}' shards (*_{split}_*.npy or .bin); run fineweb.py")
    return [os.path.join(data_dir, n) for n in names]
