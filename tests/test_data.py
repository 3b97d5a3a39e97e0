"""Tests for the data loader in train_gpt.py: shard formats, window coverage, global order, shuffle, resume, errors.

Shards here hold consecutive token ids (shard i continues where shard i-1 stopped), so a token's value
names its shard and position, and every batch can be traced back to the exact tokens it was cut from.
The command-line tests at the end run train_gpt.py in a subprocess and are marked slow.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_script, write_shards

from checkpoint import shard_fingerprint
from cli import UserError
from shards import write_bin_shard, write_shard
from train_gpt import DataLoaderLite, list_shards, open_shard

VOCAB = 50304  # GPTConfig's padded vocab, the loader's default


def hand_bin(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1, count: int | None = None) -> None:
    """An llm.c shard spelled out byte by byte, independent of shards.write_bin_shard."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def arange_shards(data_dir: Path, sizes: list[int], split: str = "train", fmt: str = "npy") -> list[np.ndarray]:
    """Shards of consecutive ids, named in order; fmt "npy", "bin" or "hand" (hand_bin)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    assert sum(sizes) <= VOCAB
    arrays, start = [], 0
    for i, n in enumerate(sizes):
        tokens = np.arange(start, start + n, dtype=np.uint16)
        start += n
        if fmt == "npy":
            write_shard(data_dir / f"t_{split}_{i:06d}.npy", tokens)
        elif fmt == "bin":
            write_bin_shard(data_dir / f"t_{split}_{i:06d}.bin", tokens)
        else:
            hand_bin(data_dir / f"t_{split}_{i:06d}.bin", tokens)
        arrays.append(tokens)
    return arrays


def window_of(x: torch.Tensor, y: torch.Tensor, arrays: list[np.ndarray], B: int, T: int) -> tuple[int, int]:
    """(shard, first token position) of a batch, after checking it is B*T+1 consecutive tokens of that one shard."""
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == (B, T) and y.shape == (B, T)
    xs, ys = x.flatten().numpy(), y.flatten().numpy()
    np.testing.assert_array_equal(xs[1:], ys[:-1])  # y is x shifted by one
    run = np.concatenate([xs, ys[-1:]])
    first = int(run[0])
    shard = next(i for i, a in enumerate(arrays) if len(a) and a[0] <= first <= a[-1])
    start = first - int(arrays[shard][0])
    np.testing.assert_array_equal(run, arrays[shard][start : start + B * T + 1])
    return shard, start


def unshuffled(sizes: list[int], B: int, T: int) -> list[tuple[int, int]]:
    """The hand-derived window order: shards in name order, windows B*T apart, each needing B*T+1 tokens."""
    return [(i, w * B * T) for i, n in enumerate(sizes) for w in range(max(0, n - 1) // (B * T))]


def read(loader: DataLoaderLite, n: int, arrays: list[np.ndarray]) -> list[tuple[int, int]]:
    return [window_of(*loader.next_batch(), arrays, loader.B, loader.T) for _ in range(n)]


def interleave(runs: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Rank batches in global order: step k of rank r is global window k*W + r."""
    return [run[k] for k in range(len(runs[0])) for run in runs]


# ---------------------------------------------------------------------------------------------------------------------
# shard formats


def test_npy_and_bin_formats_give_identical_batches(tmp_path):
    sizes, B, T = [100, 40, 70], 2, 8
    dirs = {fmt: tmp_path / fmt for fmt in ("npy", "bin", "hand")}
    arrays = {fmt: arange_shards(d, sizes, fmt=fmt) for fmt, d in dirs.items()}
    # a plain np.save (no fineweb helper) and a folder mixing all three writers
    dirs["np.save"], dirs["mixed"] = tmp_path / "np_save", tmp_path / "mixed"
    for d in (dirs["np.save"], dirs["mixed"]):
        d.mkdir()
    for i, tokens in enumerate(arrays["npy"]):
        np.save(dirs["np.save"] / f"t_train_{i:06d}.npy", tokens)
    write_shard(dirs["mixed"] / "t_train_000000.npy", arrays["npy"][0])
    write_bin_shard(dirs["mixed"] / "t_train_000001.bin", arrays["npy"][1])
    hand_bin(dirs["mixed"] / "t_train_000002.bin", arrays["npy"][2])

    # fineweb's .bin writer produces exactly the bytes of the format spelled out by hand
    for i in range(3):
        name = f"t_train_{i:06d}.bin"
        assert (dirs["bin"] / name).read_bytes() == (dirs["hand"] / name).read_bytes()
        assert len((dirs["hand"] / name).read_bytes()) == 1024 + 2 * sizes[i]

    expected = unshuffled(sizes, B, T)
    assert expected == [(0, s) for s in range(0, 96, 16)] + [(1, 0), (1, 16)] + [(2, s) for s in range(0, 64, 16)]
    batches = {}
    for name, d in dirs.items():
        loader = DataLoaderLite(B, T, 0, 1, "train", data_dir=str(d))
        batches[name] = [loader.next_batch() for _ in range(len(expected) + 2)]
        got = [window_of(x, y, arrays["npy"], B, T) for x, y in batches[name]]
        assert got == expected + expected[:2]
    for name in dirs:
        for (x, y), (x0, y0) in zip(batches[name], batches["npy"]):
            assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("fmt", ["npy", "bin", "hand"])
def test_open_shard_is_a_read_only_memory_map(tmp_path, fmt):
    (tokens,) = arange_shards(tmp_path, [777], fmt=fmt)
    path = next(tmp_path.iterdir())
    shard = open_shard(str(path))
    # a memory map keeps anonymous memory flat however large the shard
    assert isinstance(shard, np.memmap)
    assert not shard.flags.writeable
    assert shard.dtype == np.uint16 and shard.shape == (777,)
    np.testing.assert_array_equal(shard, tokens)


# ---------------------------------------------------------------------------------------------------------------------
# coverage: disjoint windows, every token but a short tail of each shard


@pytest.mark.parametrize(
    "B, T, sizes, n_windows",
    [
        (2, 8, [100, 17, 16, 33, 50], [6, 1, 0, 2, 3]),  # 16 tokens: one short of a window
        (3, 5, [15, 16, 47, 0, 31], [0, 1, 3, 0, 2]),  # an empty shard too
        (1, 1, [5, 1, 2], [4, 0, 1]),
        (4, 64, [2000, 256, 257, 513], [7, 0, 1, 2]),
    ],
)
def test_windows_are_disjoint_and_cover_each_shard(tmp_path, B, T, sizes, n_windows):
    arrays = arange_shards(tmp_path, sizes)
    loader = DataLoaderLite(B, T, 0, 1, "train", data_dir=str(tmp_path))
    assert loader.n_windows == n_windows
    assert loader.total == sum(n_windows)
    assert [Path(p).name for p in loader.paths] == [f"t_train_{i:06d}.npy" for i in range(len(sizes))]

    got = read(loader, loader.total, arrays)
    assert got == unshuffled(sizes, B, T)
    for g, (shard, start) in enumerate(got):
        assert loader.locate(g) == (shard, start // (B * T))
        assert loader.locate(g + 2 * loader.total) == (shard, start // (B * T))

    BT = B * T
    for i, n in enumerate(sizes):
        starts = [s for shard, s in got if shard == i]
        inputs = [p for s in starts for p in range(s, s + BT)]
        assert len(inputs) == len(set(inputs)) == n_windows[i] * BT  # disjoint
        covered = set(inputs) | {s + BT for s in starts}  # the last target of each window
        # what is left uncovered is a tail at the shard's end, never more than B*T tokens
        tail = n - len(covered)
        assert covered == set(range(n - tail))
        assert 0 <= tail <= BT
        if n_windows[i]:
            assert tail == (n - 1) - n_windows[i] * BT < BT


def test_a_split_too_small_for_one_window_is_refused(tmp_path):
    arange_shards(tmp_path, [16, 4])
    with pytest.raises(UserError) as e:
        DataLoaderLite(2, 8, 0, 1, "train", data_dir=str(tmp_path))
    assert str(e.value) == (
        f"--data-dir {tmp_path}: the 'train' split has 20 tokens, but in 2 shards of at most 16, and a batch of "
        "B*T+1 = 17 tokens never crosses shards; lower --batch-size or --seq-len, or make bigger shards "
        "(fineweb.py --shard-size)"
    )
    arange_shards(tmp_path / "one", [16])  # one shard: the split itself is smaller than a batch
    with pytest.raises(UserError) as e:
        DataLoaderLite(2, 8, 0, 1, "train", data_dir=str(tmp_path / "one"))
    assert str(e.value) == (
        f"--data-dir {tmp_path / 'one'}: the 'train' split has 16 tokens, fewer than one batch of B*T+1 = 17; "
        "lower --batch-size or --seq-len, or add data"
    )


# ---------------------------------------------------------------------------------------------------------------------
# global order across ranks and epochs

ORDER_SIZES, OB, OT = [100, 17, 50, 17], 2, 8  # 6 + 1 + 3 + 1 = 11 windows: no world size here divides an epoch


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_r_step_k_reads_global_window_k_times_world_plus_r(tmp_path, world):
    arrays = arange_shards(tmp_path, ORDER_SIZES)
    expected = unshuffled(ORDER_SIZES, OB, OT)
    assert len(expected) == 11
    steps = 12  # 12 to 36 global windows: past the end of the 11-window epoch, for 2 and 3 ranks inside a step
    runs = [
        read(DataLoaderLite(OB, OT, r, world, "train", data_dir=str(tmp_path)), steps, arrays) for r in range(world)
    ]
    for r, run in enumerate(runs):
        assert run == [expected[(k * world + r) % 11] for k in range(steps)]
    single = read(DataLoaderLite(OB, OT, 0, 1, "train", data_dir=str(tmp_path)), steps * world, arrays)
    assert interleave(runs) == single
    # after the last window of an epoch, window 0 again
    assert single[11] == single[0] == (0, 0)


def test_shuffle_keeps_the_global_order_across_ranks(tmp_path):
    sizes, B, T = [41, 30, 5, 22], 1, 4
    arrays = arange_shards(tmp_path, sizes)
    total = len(unshuffled(sizes, B, T))
    assert total == 23
    steps = 2 * total  # two full epochs and more for every world size
    kw = dict(data_dir=str(tmp_path), shuffle=True, seed=5)
    single = read(DataLoaderLite(B, T, 0, 1, "train", **kw), 3 * steps, arrays)
    for world in (2, 3):
        runs = [read(DataLoaderLite(B, T, r, world, "train", **kw), steps, arrays) for r in range(world)]
        assert interleave(runs) == single[: steps * world]


# ---------------------------------------------------------------------------------------------------------------------
# shuffle

SHUF_SIZES, SB, ST = [41, 30, 5, 22, 13, 9], 1, 4  # 10 + 7 + 1 + 5 + 3 + 2 = 28 windows over 6 shards


def epochs(data_dir: Path, arrays, n_epochs: int, **kw) -> list[list[tuple[int, int]]]:
    loader = DataLoaderLite(SB, ST, 0, 1, "train", data_dir=str(data_dir), **kw)
    seq = read(loader, n_epochs * loader.total, arrays)
    return [seq[e * loader.total : (e + 1) * loader.total] for e in range(n_epochs)]


def test_shuffle_is_off_by_default(tmp_path):
    arrays = arange_shards(tmp_path, SHUF_SIZES)
    assert DataLoaderLite(SB, ST, 0, 1, "train", data_dir=str(tmp_path)).shuffle is False
    expected = unshuffled(SHUF_SIZES, SB, ST)
    assert epochs(tmp_path, arrays, 2) == [expected, expected]


def test_shuffle_permutes_every_epoch_differently_and_deterministically(tmp_path):
    arrays = arange_shards(tmp_path, SHUF_SIZES)
    plain = unshuffled(SHUF_SIZES, SB, ST)
    assert len(plain) == 28
    shuffled = epochs(tmp_path, arrays, 4, shuffle=True, seed=1337)
    for epoch in shuffled:
        assert sorted(epoch) == plain  # every window exactly once per epoch
        assert epoch != plain
    assert len({tuple(e) for e in shuffled}) == 4  # each epoch its own order

    # shards are reordered, and windows within a shard too, both drawn afresh each epoch
    shard_orders = [list(dict.fromkeys(shard for shard, _ in e)) for e in shuffled]
    assert any(order != sorted(order) for order in shard_orders)
    assert len({tuple(order) for order in shard_orders}) > 1
    window_orders = [[s for shard, s in e if shard == 0] for e in shuffled]  # shard 0 has 10 windows
    assert any(order != sorted(order) for order in window_orders)
    assert len({tuple(order) for order in window_orders}) > 1

    assert epochs(tmp_path, arrays, 4, shuffle=True, seed=1337) == shuffled  # same seed, same order
    other = epochs(tmp_path, arrays, 4, shuffle=True, seed=1338)
    assert all(a != b for a, b in zip(other, shuffled))


# ---------------------------------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 3)])
def test_state_dict_resumes_at_the_exact_window(tmp_path, shuffle, rank, world):
    sizes, B, T = [41, 30, 5, 22], 1, 4  # 23 windows
    arrays = arange_shards(tmp_path, sizes)
    kw = dict(data_dir=str(tmp_path), shuffle=shuffle, seed=3)
    old = DataLoaderLite(B, T, rank, world, "train", **kw)
    read(old, 10, arrays)  # 30 global windows with 3 ranks: into the second epoch
    path = tmp_path / "state.pt"
    torch.save(old.state_dict(), path)  # travels in a checkpoint, which is loaded with weights_only
    new = DataLoaderLite(B, T, rank, world, "train", **kw)
    new.load_state_dict(torch.load(path, weights_only=True))
    assert read(new, 20, arrays) == read(old, 20, arrays)


def test_state_dict_carries_over_to_another_world_size(tmp_path):
    arrays = arange_shards(tmp_path, ORDER_SIZES)
    expected = unshuffled(ORDER_SIZES, OB, OT)
    one = DataLoaderLite(OB, OT, 0, 1, "train", data_dir=str(tmp_path))
    read(one, 7, arrays)
    state = one.state_dict()
    runs = []
    for r in range(2):
        loader = DataLoaderLite(OB, OT, r, 2, "train", data_dir=str(tmp_path))
        loader.load_state_dict(state)
        runs.append(read(loader, 4, arrays))
    assert interleave(runs) == [expected[(7 + g) % 11] for g in range(8)]


def test_state_dict_names_each_shard_by_name_size_and_content(tmp_path):
    arrays = arange_shards(tmp_path, [41, 30])
    loader = DataLoaderLite(1, 4, 0, 1, "train", data_dir=str(tmp_path))
    read(loader, 5, arrays)
    state = loader.state_dict()
    assert state["position"] == 5 and state["window_tokens"] == 4 and state["n_tokens"] == 71
    assert [(name, n) for name, n, _ in state["shards"]] == [("t_train_000000.npy", 41), ("t_train_000001.npy", 30)]
    fingerprints = [fp for _, _, fp in state["shards"]]
    assert fingerprints == [shard_fingerprint(str(tmp_path / name)) for name, _, _ in state["shards"]]
    assert len(set(fingerprints)) == 2


def differs(message: str) -> str:
    return f"the training data differs from the checkpoint's ({message}); resume with the --data-dir it was trained on"


@pytest.mark.parametrize(
    "change, message",
    [
        ("content", "t_train_000001.npy has other tokens"),  # same name, same size
        ("size", "t_train_000001.npy of 30 tokens, now t_train_000001.npy of 31"),
        ("name", "t_train_000001.npy of 30 tokens, now u_train_000001.npy of 30"),
        ("count", "2 train shards, now 3"),
        ("seed", "shuffle seed 3, now 4"),
    ],
)
def test_load_state_dict_refuses_other_data(tmp_path, change, message):
    first, second = tmp_path / "first", tmp_path / "second"
    arrays = arange_shards(first, [41, 30])
    old = DataLoaderLite(1, 4, 0, 1, "train", data_dir=str(first), shuffle=True, seed=3)
    read(old, 5, arrays)
    state = old.state_dict()
    shutil.copytree(first, second)
    shard = second / "t_train_000001.npy"
    seed = 3
    if change == "content":
        write_shard(shard, arrays[1][::-1].copy())
    elif change == "size":
        write_shard(shard, np.arange(41, 72, dtype=np.uint16))
    elif change == "name":
        shard.rename(second / "u_train_000001.npy")
    elif change == "count":
        write_shard(second / "t_train_000002.npy", np.arange(100, 140, dtype=np.uint16))
    else:
        seed = 4
    new = DataLoaderLite(1, 4, 0, 1, "train", data_dir=str(second), shuffle=True, seed=seed)
    with pytest.raises(UserError) as e:
        new.load_state_dict(state)
    assert str(e.value) == differs(message)
    # the same data, even in another folder, continues where the old loader was
    same = DataLoaderLite(
        1, 4, 0, 1, "train", data_dir=str(shutil.copytree(first, tmp_path / "copy")), shuffle=True, seed=3
    )
    same.load_state_dict(state)
    assert read(same, 5, arrays) == read(old, 5, arrays)


def test_load_state_dict_of_an_older_checkpoint_compares_the_token_count(tmp_path):
    arrays = arange_shards(tmp_path / "a", [41, 30])
    old = DataLoaderLite(1, 4, 0, 1, "train", data_dir=str(tmp_path / "a"))
    read(old, 5, arrays)
    state = {k: v for k, v in old.state_dict().items() if k != "shards"}  # as saved before shards were named
    new = DataLoaderLite(1, 4, 0, 1, "train", data_dir=str(tmp_path / "a"))
    new.load_state_dict(state)
    assert read(new, 3, arrays) == read(old, 3, arrays)
    arange_shards(tmp_path / "b", [41, 31])
    with pytest.raises(UserError) as e:
        DataLoaderLite(1, 4, 0, 1, "train", data_dir=str(tmp_path / "b")).load_state_dict(state)
    assert str(e.value) == differs("71 train tokens, now 72")


def test_reset_returns_to_the_first_window(tmp_path):
    arrays = arange_shards(tmp_path, ORDER_SIZES)
    loader = DataLoaderLite(OB, OT, 1, 2, "train", data_dir=str(tmp_path))
    first = read(loader, 8, arrays)
    loader.reset()
    assert read(loader, 8, arrays) == first
    assert first[0] == (0, 16)


# ---------------------------------------------------------------------------------------------------------------------
# bad shards: one line naming the file


def expect_error(data_dir: Path, split: str = "train", **kw) -> str:
    """The UserError a loader raises, at construction or at the latest on its first batch."""
    with pytest.raises(UserError) as e:
        loader = DataLoaderLite(2, 8, 0, 1, split, data_dir=str(data_dir), **kw)
        loader.next_batch()
    message = str(e.value)
    assert "\n" not in message
    return message


def too_large_message(path: Path, top: int = 60000, vocab: int = VOCAB) -> str:
    return f"{path}: token id {top} >= vocab_size {vocab}; the shard is corrupt or was made with another tokenizer"


@pytest.mark.parametrize("fmt", ["npy", "bin"])
def test_token_id_beyond_vocab(tmp_path, fmt):
    tokens = np.arange(100, dtype=np.uint16)
    tokens[-1] = 60000  # in the tail no window reads: every token is checked, not just those used
    path = tmp_path / f"t_train_000000.{fmt}"
    (write_shard if fmt == "npy" else write_bin_shard)(path, tokens)
    assert expect_error(tmp_path) == too_large_message(path)
    # start-up reads the headers only; the ids are checked when the shard is first used
    loader = DataLoaderLite(2, 8, 0, 1, "train", data_dir=str(tmp_path))
    with pytest.raises(UserError) as e:
        loader.next_batch()
    assert str(e.value) == too_large_message(path)


def test_token_id_limit_is_the_vocab_size(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    tokens[50] = 50256
    path = tmp_path / "t_train_000000.npy"
    write_shard(path, tokens)
    DataLoaderLite(2, 8, 0, 1, "train", data_dir=str(tmp_path), vocab_size=50257).next_batch()
    tokens[50] = 50257
    write_shard(path, tokens)
    assert expect_error(tmp_path, vocab_size=50257) == too_large_message(path, 50257, 50257)


def test_bad_later_shard_fails_before_any_of_its_tokens_are_served(tmp_path):
    arrays = arange_shards(tmp_path, [40, 40])
    bad = arrays[1].copy()
    bad[0] = 60000
    path = tmp_path / "t_train_000001.npy"
    write_shard(path, bad)
    with pytest.raises(UserError) as e:
        loader = DataLoaderLite(2, 8, 0, 1, "train", data_dir=str(tmp_path))
        for _ in range(loader.total):
            x, y = loader.next_batch()
            assert window_of(x, y, arrays, 2, 8)[0] == 0
    assert str(e.value) == too_large_message(path)


@pytest.mark.parametrize("keep", [-10, 40])  # cut into the tokens, or into the .npy header itself
def test_truncated_npy(tmp_path, keep):
    arange_shards(tmp_path, [1000])
    path = tmp_path / "t_train_000000.npy"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    message = expect_error(tmp_path)
    assert message.startswith(f"{path}: unreadable token shard (")
    assert message.endswith("); it may be truncated, rebuild it with fineweb.py")


def test_truncated_bin(tmp_path):
    arange_shards(tmp_path, [1000], fmt="bin")
    path = tmp_path / "t_train_000000.bin"
    path.write_bytes(path.read_bytes()[:-3])
    expected = f"{path}: truncated or padded: header says 1000 tokens (3024 bytes), the file has 3021 bytes"
    assert expect_error(tmp_path) == expected


def test_bin_header_count_larger_than_file(tmp_path):
    path = tmp_path / "t_train_000000.bin"
    hand_bin(path, np.arange(100), count=150)
    expected = f"{path}: truncated or padded: header says 150 tokens (1324 bytes), the file has 1224 bytes"
    assert expect_error(tmp_path) == expected


@pytest.mark.parametrize("extra", [1, 2])  # one odd byte must not round away
def test_bin_with_bytes_beyond_its_count(tmp_path, extra):
    path = tmp_path / "t_train_000000.bin"
    hand_bin(path, np.arange(100))
    path.write_bytes(path.read_bytes() + b"\0" * extra)
    expected = f"{path}: truncated or padded: header says 100 tokens (1224 bytes), the file has {1224 + extra} bytes"
    assert expect_error(tmp_path) == expected


BAD_HEADER = (
    "not an llm.c token shard (expected a 256-int32 header with magic 20240520, version 1); rebuild it with fineweb.py"
)


@pytest.mark.parametrize(
    "magic, version, cut",
    [
        (12345, 1, 0),  # wrong magic
        (20240520, 2, 0),  # llm.c's version 2 holds uint32 LLaMA-3 tokens
        (20240520, 1, 1024 + 200 - 100),  # only 100 bytes left: not even a whole header
    ],
)
def test_bad_bin_header(tmp_path, magic, version, cut):
    path = tmp_path / "t_train_000000.bin"
    hand_bin(path, np.arange(100), magic=magic, version=version)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    assert expect_error(tmp_path) == f"{path}: {BAD_HEADER}"


@pytest.mark.parametrize("array", [np.arange(100, dtype=np.int32), np.zeros((10, 10), dtype=np.uint16)])
def test_wrong_npy_dtype_or_shape(tmp_path, array):
    path = tmp_path / "t_train_000000.npy"
    np.save(path, array)
    assert expect_error(tmp_path) == (
        f"{path}: holds a {array.ndim}-d {array.dtype} array, expected 1-d uint16 GPT-2 tokens; rebuild it with fineweb.py"
    )


def test_no_shards_for_the_split(tmp_path):
    arange_shards(tmp_path, [100], split="train")
    (tmp_path / "t_val_000000.npy.tmp").write_bytes(b"")  # a writer's temp file is not a shard
    assert (
        expect_error(tmp_path, "val") == f"--data-dir {tmp_path}: no 'val' shards (*_val_*.npy or .bin); run fineweb.py"
    )


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    assert expect_error(missing) == f"--data-dir {missing}: no such directory; make shards with `python fineweb.py`"


# ---------------------------------------------------------------------------------------------------------------------
# the same errors from the command line: one line on stderr, exit status 1, no traceback


def run_train(data_dir: Path, log_dir: Path):
    return run_script(
        "train_gpt.py",
        *["--data-dir", str(data_dir), "--log-dir", str(log_dir), "--device", "cpu", "--no-compile"],
        *["--batch-size", "2", "--seq-len", "16", "--total-batch-size", "32", "--max-steps", "1", "--eval-steps", "1"],
        *TINY,
    )


def assert_cli_error(result, message: str, filename: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert result.stderr.splitlines() == [f"error: {message}"]
    assert filename in result.stderr


@pytest.mark.slow
def test_cli_token_id_beyond_vocab(tmp_path):
    data_dir = tmp_path / "data"
    shards = write_shards(data_dir, n_train=1)
    bad = shards[1].copy()
    bad[-1] = 60000
    path = data_dir / "test_train_000001.npy"
    write_shard(path, bad)
    assert_cli_error(run_train(data_dir, tmp_path / "log"), too_large_message(path), path.name)


@pytest.mark.slow
def test_cli_truncated_bin(tmp_path):
    data_dir = tmp_path / "data"
    shards = write_shards(data_dir, n_train=1)
    (data_dir / "test_val_000000.npy").unlink()
    path = data_dir / "test_val_000000.bin"
    hand_bin(path, shards[0])
    path.write_bytes(path.read_bytes()[:-1001])
    message = f"{path}: truncated or padded: header says 5000 tokens (11024 bytes), the file has 10023 bytes"
    assert_cli_error(run_train(data_dir, tmp_path / "log"), message, path.name)


@pytest.mark.slow
def test_cli_no_val_shards(tmp_path):
    data_dir = tmp_path / "data"
    write_shards(data_dir, n_train=1)
    (data_dir / "test_val_000000.npy").unlink()
    message = f"--data-dir {data_dir}: no 'val' shards (*_val_*.npy or .bin); run fineweb.py"
    assert_cli_error(run_train(data_dir, tmp_path / "log"), message, str(data_dir))


def test_llmc_single_file_names(tmp_path):
    """llm.c's small datasets are one file per split (tiny_shakespeare_val.bin), not numbered shards."""
    hand_bin(tmp_path / "tiny_shakespeare_val.bin", np.arange(100))
    hand_bin(tmp_path / "tiny_shakespeare_train.bin", np.arange(200))
    (tmp_path / "notes_validation.bin").write_bytes(b"")  # 'val' inside another word is not the split
    assert list_shards(str(tmp_path), "val") == [str(tmp_path / "tiny_shakespeare_val.bin")]
    assert list_shards(str(tmp_path), "train") == [str(tmp_path / "tiny_shakespeare_train.bin")]
