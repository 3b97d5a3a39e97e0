"""
Use a trained model outside training: sample text from it, or export it for Hugging Face.

    python sample.py --model log/model_19073.pt --prompt "Hello, I'm a language model,"
    python sample.py --model gpt2 --temperature 0 --max-new-tokens 64     # greedy, OpenAI's weights
    python sample.py --model log/model_19073.pt --export-hf gpt2-ours     # an HF GPT-2 folder

--model takes one of our .pt checkpoints, a local HF GPT-2 folder, or a GPT-2 name
(gpt2, gpt2-medium, gpt2-large, gpt2-xl: needs transformers and the network).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fineweb import EOT, get_tokenizer
from train_gpt import GPT, UserError, pick_device, pick_dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample from a GPT-2 checkpoint, or export it as an HF folder.")
    p.add_argument("--model", required=True, help="a .pt checkpoint, an HF GPT-2 folder, or gpt2[-medium|-large|-xl]")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    p.add_argument("--num-samples", type=int, default=4, help="continuations of the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 disables")
    p.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=True, help="stop at <|endoftext|>")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--export-hf", metavar="DIR", help="write an HF GPT-2 folder (config.json + model.safetensors) and exit"
    )
    return p.parse_args(argv)


def sample(args: argparse.Namespace) -> None:
    model = GPT.from_pretrained(args.model)
    if args.export_hf:
        model.save_pretrained(args.export_hf)
        print(f"wrote {args.export_hf} (load it with transformers.GPT2LMHeadModel.from_pretrained)")
        return
    if args.num_samples <= 0 or args.max_new_tokens <= 0:
        raise UserError("--num-samples and --max-new-tokens must be positive")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model.to(device).eval()
    enc = get_tokenizer()
    prompt = enc.encode_ordinary(args.prompt) or [EOT]  # an empty prompt starts a fresh document
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else torch.autocast(device, enabled=False)
    t0 = time.time()
    with autocast:
        out = model.generate(
            idx,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            eos=EOT if args.stop_at_eot else None,
            generator=gen,
        )
    dt = time.time() - t0
    for i, row in enumerate(out.tolist()):
        new = row[len(prompt) :]
        if EOT in new and args.stop_at_eot:
            new = new[: new.index(EOT)]
        print(f"--- sample {i}\n{args.prompt}{enc.decode(new)}")
    n_new = (out.size(1) - len(prompt)) * args.num_samples
    print(f"--- {n_new} tokens in {dt:.2f}s ({n_new / dt:.1f} tok/s)", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    try:
        sample(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
