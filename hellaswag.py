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

The EleutherAI lm-evaluation-harness (its hellaswag task) scores log-likelihoods the same way,
but on its own prompt, and its acc_norm is another metric. The prompt is preprocessed
("activity_label: ctx_a Ctx_b", with WikiHow's [title]/[header]/[step] tags removed from
contexts and endings). acc_norm divides the log-likelihood by the ending's length in
characters (len() of the preprocessed ending, without its leading space), not by its tokens.
Characters are not bytes here either: 199 of the 40168 val endings are not ASCII (lm-eval's
separate acc_bytes divides by UTF-8 bytes). An HF GPT-2 folder also has its softmax over the
50257 real tokens only, where our checkpoints' covers 50304. Given lm-eval's own prompts,
this scorer picks the same endings as lm-eval does (README: Sampling, Hugging Face and
lm-evaluation-harness).

Shows a progress bar on a terminal, then prints one line:
    hellaswag: acc_norm=0.2955 acc=0.2859 n=10042
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from checkpoint import quiet_unpickling
from cli import UserError, cli, flag, parse_config
from hellaswag_eval import rendered_examples, score_hellaswag
from tokenizer import get_tokenizer
from train_gpt import DEVICES, DTYPES, GPT, GPT2_VOCAB, check_model_source, runtime


@dataclass
class HellaswagConfig:
    checkpoint: str | None = flag(None, "a model_XXXXX.pt written by train_gpt.py")
    model: str | None = flag(None, "a .pt checkpoint, a local HF GPT-2 folder, or gpt2[-medium|-large|-xl]")
    device: str = flag("auto", "auto = CUDA, else MPS, else CPU", choices=DEVICES)
    dtype: str = flag(
        "auto", "autocast dtype; auto = bf16 where the GPU or CPU has it natively, float16 on older GPUs, else float32",
        choices=DTYPES,
    )  # fmt: skip
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
    rendered = rendered_examples(args.split, args.data_dir, get_tokenizer(), args.limit)
    unlabelled = sum(label < 0 for *_, label in rendered)
    if unlabelled:  # the test split's labels are secret: its accuracy means nothing
        print(f"warning: {unlabelled} examples have no label; they count as wrong", file=sys.stderr)
    src = args.checkpoint or args.model
    with quiet_unpickling():  # a foreign pytorch_model.bin: our one line, not torch's warning first
        model = GPT.from_pretrained(src)
    if model.config.vocab_size < GPT2_VOCAB:  # HellaSwag's GPT-2 token ids would index past its embedding
        raise UserError(
            f"{src}: the model's vocabulary has {model.config.vocab_size} tokens, fewer than the GPT-2 tokenizer's "
            f"{GPT2_VOCAB} that HellaSwag is scored with; score a model with GPT-2's vocabulary"
        )
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
