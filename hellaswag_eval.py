"""
HellaSwag for train_gpt.py (in training) and hellaswag.py (a checkpoint): the data file (downloaded
once, each row checked), rendering an example as build-nanogpt does, and batched scoring of any
model with hidden() and masked_token_nll() (train_gpt.py's GPT), split across ranks. It never
imports train_gpt.py.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from cli import UserError, write_atomic

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"

Rendered = tuple[list[int], list[list[int]], int]  # (context tokens, the 4 endings' tokens, label)


def hellaswag_file(split: str = "val", data_dir: str | None = None, flag: str = "--data-dir") -> str:
    """Path of hellaswag_{split}.jsonl, downloaded into data_dir (default: a cache folder) if absent;
    flag is the calling script's name for data_dir, which the offline error offers."""
    if data_dir is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        data_dir = os.path.join(cache, "hellaswag")
    path = os.path.join(data_dir, f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    url = HELLASWAG_URL.format(split=split)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise UserError(
            f"HellaSwag {split} data: {path} is missing and {url} cannot be downloaded ({e}); "
            f"copy hellaswag_{split}.jsonl there or point {flag} at a folder holding it"
        ) from e
    os.makedirs(data_dir, exist_ok=True)
    write_atomic(path, lambda f: f.write(data))
    return path


def load_hellaswag(
    split: str = "val", data_dir: str | None = None, limit: int | None = None, flag: str = "--data-dir"
) -> list[dict]:
    """The examples of a HellaSwag split, each row checked: ctx a string, 4 string endings, label 0..3."""
    path = hellaswag_file(split, data_dir, flag)
    examples = []
    with open(path, "rb") as f:  # bytes, decoded line by line, so a bad byte is named by its line
        for lineno, raw in enumerate(f, 1):
            if limit and len(examples) == limit:
                break
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is no part of the data
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at byte {e.start + 1} of the line); "
                    "replace the file with a good copy (a missing one is downloaded again)"
                ) from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e})") from None
            endings = ex.get("endings") if isinstance(ex, dict) else None
            label = ex.get("label", -1) if isinstance(ex, dict) else None
            if not isinstance(ex, dict) or not isinstance(ex.get("ctx"), str):
                raise UserError(f'{path}:{lineno}: not a HellaSwag row (no "ctx" string)')
            if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
                raise UserError(f'{path}:{lineno}: "endings" must be a list of 4 strings')
            if isinstance(label, bool) or not isinstance(label, int) or label not in (-1, 0, 1, 2, 3):
                raise UserError(f'{path}:{lineno}: "label" must be an integer 0..3, not {label!r}')
            # an empty context leaves no token to predict an ending from; an empty ending would score a lone space
            if not ex["ctx"].strip():
                raise UserError(f'{path}:{lineno}: "ctx" is empty; a HellaSwag row needs a context to score')
            if empty := [i for i, e in enumerate(endings) if not e.strip()]:
                raise UserError(f'{path}:{lineno}: "endings"[{empty[0]}] is empty; a HellaSwag ending needs text')
            examples.append(ex)
    if not examples:
        raise UserError(f"{path}: no HellaSwag examples")
    return examples


def render_hellaswag(example: dict, enc: Any) -> Rendered:
    """(context tokens, the 4 endings' tokens, label), tokenized as build-nanogpt does."""
    ctx = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + e) for e in example["endings"]]
    return ctx, endings, int(example.get("label", -1))


def rendered_examples(
    split: str, data_dir: str | None, enc: Any, limit: int | None = None, flag: str = "--data-dir"
) -> list[Rendered]:
    """The examples of a split (the first `limit`), checked and rendered: what score_hellaswag scores."""
    return [render_hellaswag(ex, enc) for ex in load_hellaswag(split, data_dir, limit, flag)]


@torch.no_grad()
def score_hellaswag(
    model: nn.Module, rendered: list[Rendered], rt: Any, batch_size: int = 16, progress: bool = False
) -> list[tuple[int, int]]:
    """(pred, pred_norm) for each rendered example: the ending of lowest summed / mean token loss.

    Rows of similar length are batched (examples sorted by length, right-padded; causal
    attention keeps padding from touching real positions), and lm_head plus the loss run
    only at the positions that predict an ending token.
    """
    order = sorted(range(len(rendered)), key=lambda i: max(len(rendered[i][0]) + len(e) for e in rendered[i][1]))
    preds: list[tuple[int, int]] = [(0, 0)] * len(rendered)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), unit="ex", desc="hellaswag", disable=None if progress else True, leave=False)
    for b in range(0, len(order), batch_size):
        batch = [rendered[i] for i in order[b : b + batch_size]]
        rows = [(ctx, end) for ctx, endings, _ in batch for end in endings]  # 4 rows per example
        L = max(len(c) + len(e) for c, e in rows)
        idx = torch.zeros((len(rows), L), dtype=torch.long)
        targets = torch.zeros((len(rows), L), dtype=torch.long)
        scored = torch.zeros((len(rows), L), dtype=torch.bool)  # the positions that predict an ending token
        for r, (ctx, end) in enumerate(rows):
            idx[r, : len(ctx) + len(end)] = torch.tensor(ctx + end)
            targets[r, len(ctx) - 1 : len(ctx) + len(end) - 1] = torch.tensor(end)  # position t predicts t+1
            scored[r, len(ctx) - 1 : len(ctx) + len(end) - 1] = True
        idx, targets, scored = idx.to(rt.device), targets.to(rt.device), scored.to(rt.device)
        with rt.autocast():
            nll = model.masked_token_nll(idx, targets, scored)  # (scored positions,)
        row_of = torch.arange(len(rows), device=rt.device)[:, None].expand_as(targets)[scored]
        loss_sum = torch.zeros(len(rows), device=rt.device).index_add_(0, row_of, nll).view(-1, 4)
        n_tokens = scored.sum(dim=1).view(-1, 4)
        for j, (s, n) in enumerate(zip(loss_sum.tolist(), n_tokens.tolist())):
            mean = [a / c for a, c in zip(s, n)]
            preds[order[b + j]] = (min(range(4), key=s.__getitem__), min(range(4), key=mean.__getitem__))
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return preds


def evaluate_hellaswag(
    model: nn.Module, rendered: list[Rendered], rt: Any, rank: int = 0, world: int = 1, group: Any = None
) -> tuple[float, float, int]:
    """(acc_norm, acc, n) over all examples, each of the `world` data-parallel ranks scoring every world-th
    one, their counts summed over `group` (None: all ranks; under TP the dp group, whose tp ranks score
    the same examples together)."""
    mine = rendered[rank::world]
    preds = score_hellaswag(model, mine, rt, progress=rank == 0)
    counts = torch.tensor(
        [
            sum(pn == ex[2] for ex, (_, pn) in zip(mine, preds)),
            sum(p == ex[2] for ex, (p, _) in zip(mine, preds)),
            len(mine),
        ],
        dtype=torch.float64,
        device=rt.device,
    )
    if dist.is_initialized():
        dist.all_reduce(counts, group=group)
    norm, plain, n = counts.tolist()
    return norm / n, plain / n, int(n)
