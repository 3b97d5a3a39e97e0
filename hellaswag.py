"""
Score a GPT-2 class model on HellaSwag (pick the right one of 4 endings for a context).

    python hellaswag.py --checkpoint log/model_19073.pt      # a checkpoint of train_gpt.py
    python hellaswag.py --model gpt2 --device cuda           # OpenAI's 124M (needs transformers)

The method is build-nanogpt's: each ending is appended to the context and scored by the
model's cross-entropy on the ending tokens only. acc takes the ending with the lowest summed
loss, acc_norm the lowest mean loss per ending token (ties go to the first ending). The
softmax runs over the model's whole vocabulary, so for our checkpoints (vocab 50304) the 47
padding ids take part in it, as they do in build-nanogpt; a trained model gives them almost
no probability. Many examples are scored per forward pass, with the same predictions as
build-nanogpt's one example at a time (the tests hold that reference scorer).

The EleutherAI lm-evaluation-harness scores the same log-likelihoods but differs in ways
that move the numbers a little: its acc_norm divides by the ending's length in characters
(= bytes for this ASCII text), not tokens; Hugging Face GPT-2 has a softmax over the 50257
real tokens only; and its prompt is preprocessed ("activity label: ctx", [title]-style tags
removed).

Shows a progress bar on a terminal, then prints one line:
    hellaswag: acc_norm=0.2955 acc=0.2859 n=10042
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from cli import UserError, cli, flag, parse_config
from fineweb import get_tokenizer
from hellaswag_eval import load_hellaswag, render_hellaswag, score_hellaswag
from train_gpt import DEVICES, DTYPES, GPT, check_model_source, runtime


@dataclass
class HellaswagConfig:
    checkpoint: str | None = flag(None, "a model_XXXXX.pt written by train_gpt.py")
    model: str | None = flag(None, "a .pt checkpoint, a local HF GPT-2 folder, or gpt2[-medium|-large|-xl]")
    device: str = flag("auto", "auto = CUDA, else MPS, else CPU", choices=DEVICES)
    dtype: str = flag("auto", "autocast dtype; auto = bf16 on CUDA that has it, else float32", choices=DTYPES)
    batch_size: int = flag(16, "examples (4 rows each) per forward pass", lo=1, hi=4096)
    limit: int | None = flag(None, "score only the first N examples", lo=1, hi=10**7)
    split: str = flag("val", "which HellaSwag file", choices=("val", "train", "test"))
    data_dir: str | None = flag(None, "folder with hellaswag_{split}.jsonl (default: download to ~/.cache/hellaswag)")


def evaluate(args: HellaswagConfig) -> tuple[float, float, int]:
    if (args.checkpoint is None) == (args.model is None):
        raise UserError("pass exactly one of --checkpoint PATH or --model (a .pt, an HF GPT-2 folder or gpt2...)")
    if args.checkpoint is not None and not args.checkpoint.endswith(".pt"):
        raise UserError(f"--checkpoint {args.checkpoint}: expected a .pt file of train_gpt.py; use --model for others")
    check_model_source(args.checkpoint or args.model)
    rt = runtime(args.device, args.dtype)
    # the data first: a missing file should not cost a model load to find out
    examples = load_hellaswag(args.split, args.data_dir, args.limit)
    enc = get_tokenizer()
    rendered = [render_hellaswag(ex, enc) for ex in examples]
    unlabelled = sum(label < 0 for *_, label in rendered)
    if unlabelled:  # the test split's labels are secret: its accuracy means nothing
        print(f"warning: {unlabelled} examples have no label; they count as wrong", file=sys.stderr)
    model = GPT.from_pretrained(args.checkpoint or args.model)
    longest = max(len(ctx) + len(end) for ctx, endings, _ in rendered for end in endings)
    if longest > model.config.block_size:
        raise UserError(
            f"the longest example has {longest} tokens, more than the model's block_size {model.config.block_size}"
        )
    torch.set_float32_matmul_precision("high")  # as train_gpt.py, so the numbers match its in-training eval
    model.to(rt.device)
    preds = score_hellaswag(model, rendered, rt, args.batch_size, progress=True)
    n = len(rendered)
    acc_norm = sum(pn == r[2] for r, (_, pn) in zip(rendered, preds)) / n
    acc = sum(p == r[2] for r, (p, _) in zip(rendered, preds)) / n
    return acc_norm, acc, n


def main(argv: list[str] | None = None) -> None:
    def start(argv: list[str] | None) -> None:
        args, _ = parse_config(HellaswagConfig, argv, "Score a GPT-2 class model on HellaSwag (acc_norm, acc).")
        acc_norm, acc, n = evaluate(args)
        print(f"hellaswag: acc_norm={acc_norm:.4f} acc={acc:.4f} n={n}")

    cli(start, argv)


if __name__ == "__main__":
    main()
