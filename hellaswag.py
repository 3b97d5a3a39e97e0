"""
Score a GPT-2 class model on HellaSwag (pick the right one of 4 endings for a context).

    python hellaswag.py --checkpoint log/model_19073.pt      # a checkpoint of train_gpt.py
    python hellaswag.py --model gpt2 --device cuda           # OpenAI's 124M (needs transformers)

The method is build-nanogpt's: each ending is appended to the context and scored by the
model's cross-entropy on the ending tokens only. acc takes the ending with the lowest summed
loss, acc_norm the lowest mean loss per ending token (ties go to the first ending). The
softmax runs over the model's whole vocabulary, so for our checkpoints (vocab 50304) the 47
padding ids take part in it, as they do in build-nanogpt; a trained model gives them almost
no probability. `--method batched` (default) scores many examples per forward pass and gives
the same predictions as build-nanogpt's one example at a time (`--method one-at-a-time`).

The EleutherAI lm-evaluation-harness scores the same log-likelihoods but differs in ways
that move the numbers a little: its acc_norm divides by the ending's length in characters
(= bytes for this ASCII text), not tokens; Hugging Face GPT-2 has a softmax over the 50257
real tokens only; and its prompt is preprocessed ("activity label: ctx", [title]-style tags
removed).

Prints a progress line on stderr, then one stdout line:
    hellaswag: acc_norm=0.2955 acc=0.2859 n=10042
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from train_gpt import (
    GPT,
    MODEL_SHAPES,
    UserError,
    get_tokenizer,
    load_checkpoint,
    load_hellaswag,
    model_from_checkpoint,
    pick_device,
    pick_dtype,
    render_hellaswag,
    score_hellaswag,
)

Rendered = tuple[list[int], list[list[int]], int]  # (context tokens, 4 endings' tokens, label)
PROGRESS_INTERVAL = 0.25  # seconds between redraws of the progress line


@torch.no_grad()
def score_one_at_a_time(
    model: GPT, rendered: list[Rendered], device: str, autocast=nullcontext()
) -> list[tuple[int, int]]:
    """(pred, pred_norm) per example, build-nanogpt's way: one example (4 rows) per forward pass.

    Slow but obviously right, so it is the reference the batched train_gpt.score_hellaswag is
    tested against, and the baseline of its benchmark.
    """
    was_training = model.training
    model.eval()
    preds = []
    for ctx, endings, _ in rendered:
        rows = [ctx + end for end in endings]
        L = max(len(r) for r in rows)
        tokens = torch.zeros((4, L), dtype=torch.long)
        mask = torch.zeros((4, L), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(ctx) : len(row)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast:
            logits, _ = model(tokens)
        # position t predicts token t+1, so the losses shift by one and so does the mask
        losses = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(4, -1)
        shift_mask = mask[:, 1:]
        sum_loss = (losses * shift_mask).sum(dim=1)
        avg_loss = sum_loss / shift_mask.sum(dim=1)
        preds.append((int(sum_loss.argmin()), int(avg_loss.argmin())))
    model.train(was_training)
    return preds


def longest_row(example: Rendered) -> int:
    ctx, endings, _ = example
    return max(len(ctx) + len(e) for e in endings)


def score_with_progress(
    model: GPT,
    rendered: list[Rendered],
    device: str,
    autocast,
    method: str,
    batch_size: int,
    progress: Callable[[int, int], None],
) -> list[tuple[int, int]]:
    """(pred, pred_norm) per example, calling progress(done, correct_norm) as batches finish."""
    preds: list[tuple[int, int] | None] = [None] * len(rendered)
    if method == "batched":
        # score_hellaswag sorts by length so batches waste little on padding; sorting all examples
        # here and handing it one batch at a time gives the very batches (so the very numbers) of
        # one call over all of them, as in training, with a progress update per batch. The running
        # acc_norm is then over the shortest examples first: a progress hint, not an estimate
        order = sorted(range(len(rendered)), key=lambda i: longest_row(rendered[i]))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        score = lambda batch: score_hellaswag(model, batch, device, autocast, batch_size)  # noqa: E731
    else:
        chunks = [[i] for i in range(len(rendered))]
        score = lambda batch: score_one_at_a_time(model, batch, device, autocast)  # noqa: E731
    done = correct = 0
    for chunk in chunks:
        for i, p in zip(chunk, score([rendered[i] for i in chunk])):
            preds[i] = p
            correct += p[1] == rendered[i][2]
        done += len(chunk)
        progress(done, correct)
    return preds  # type: ignore[return-value]


def check_model_source(checkpoint: str | None, model: str | None) -> None:
    """Fail on a mistyped flag at once, not after the data is downloaded and tokenized."""
    if (checkpoint is None) == (model is None):
        raise UserError("pass exactly one of --checkpoint PATH or --model gpt2|gpt2-medium|gpt2-large|gpt2-xl|HF_DIR")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UserError(f"{checkpoint}: no such checkpoint")
    if model is not None and model not in MODEL_SHAPES and not os.path.isdir(model) and not model.endswith(".pt"):
        raise UserError(
            f"--model {model!r} is not a GPT-2 name ({', '.join(MODEL_SHAPES)}) or a Hugging Face GPT-2 folder"
        )


def load_model(checkpoint: str | None, model: str | None) -> GPT:
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise UserError(f"{checkpoint}: not a train_gpt.py checkpoint (no 'model' and 'config' entries)")
        return model_from_checkpoint(ckpt)
    try:
        return GPT.from_pretrained(model)
    except OSError as e:  # the HF hub unreachable, a folder unreadable: one line, as for our own errors
        raise UserError(f"cannot load --model {model}: {' '.join(str(e).split())}") from e


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Score a GPT-2 class model on HellaSwag (acc_norm, acc).")
    p.add_argument("--checkpoint", help="a model_XXXXX.pt written by train_gpt.py")
    p.add_argument(
        "--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (needs transformers) or a local HF GPT-2 folder"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast dtype; auto = bfloat16 on CUDA that supports it, else float32",
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples (4 rows each) per forward pass")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples")
    p.add_argument("--split", default="val", choices=["val", "train", "test"])
    p.add_argument(
        "--data-dir", default=None, help="folder with hellaswag_{split}.jsonl (default: download to ~/.cache/hellaswag)"
    )
    p.add_argument(
        "--method",
        default="batched",
        choices=["batched", "one-at-a-time"],
        help="one-at-a-time is build-nanogpt's slow reference; both give the same predictions",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[float, float, int]:
    check_model_source(args.checkpoint, args.model)
    device = pick_device(args.device)
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = pick_dtype(args.dtype, device_type)
    # load the data first: a missing file should not cost a model load to find out
    examples = load_hellaswag(args.split, args.data_dir, args.limit)
    if not examples:
        raise UserError(f"HellaSwag {args.split}: no examples to score")
    enc = get_tokenizer()
    rendered = [render_hellaswag(ex, enc) for ex in examples]
    unlabelled = sum(label < 0 for *_, label in rendered)
    if unlabelled:  # the test split's labels are secret: its accuracy means nothing
        print(f"warning: {unlabelled} examples have no label; they count as wrong", file=sys.stderr)
    model = load_model(args.checkpoint, args.model)
    longest = max(longest_row(r) for r in rendered)
    if longest > model.config.block_size:
        raise UserError(
            f"the longest example has {longest} tokens, more than the model's block_size {model.config.block_size}"
        )
    torch.set_float32_matmul_precision("high")  # as train_gpt.py, so the numbers match its in-training eval
    model.to(device)
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    n, t0, last_draw = len(rendered), time.time(), 0.0

    def progress(done: int, correct: int) -> None:
        nonlocal last_draw
        now = time.time()
        if now - last_draw >= PROGRESS_INTERVAL or done == n:
            last_draw = now
            rate = done / max(now - t0, 1e-9)
            end = "\n" if done == n else ""
            print(
                f"\r{done}/{n} | acc_norm {correct / done:.4f} | {rate:.1f} examples/s",
                end=end,
                file=sys.stderr,
                flush=True,
            )

    preds = score_with_progress(model, rendered, device, autocast, args.method, args.batch_size, progress)
    acc_norm = sum(pn == r[2] for r, (_, pn) in zip(rendered, preds)) / n
    acc = sum(p == r[2] for r, (p, _) in zip(rendered, preds)) / n
    return acc_norm, acc, n


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        acc_norm, acc, n = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\naborted", file=sys.stderr)
        sys.exit(130)
    print(f"hellaswag: acc_norm={acc_norm:.4f} acc={acc:.4f} n={n}")


if __name__ == "__main__":
    main()
