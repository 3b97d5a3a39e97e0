"""
Use a trained model outside training: sample text from it, or export it for Hugging Face.

    python sample.py --model log/model_19073.pt --prompt "Hello, I'm a language model,"
    python sample.py --model gpt2 --temperature 0 --max-new-tokens 64     # greedy, OpenAI's weights
    python sample.py --model log/model_19073.pt --export-hf gpt2-ours     # an HF GPT-2 folder

--model takes one of our .pt checkpoints, a local HF GPT-2 folder, or a GPT-2 name
(gpt2, gpt2-medium, gpt2-large, gpt2-xl: needs transformers and the network).
The export holds the weights, config.json, generation_config.json and GPT-2's tokenizer
files, so transformers' AutoTokenizer / AutoModelForCausalLM load it with no network.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from checkpoint import quiet_unpickling
from cli import UserError, cli, flag, flag_name, parse_config
from tokenizer import EOT, get_tokenizer
from train_gpt import DEVICES, DTYPES, GPT, GPT2_VOCAB, check_model_source, runtime


@dataclass
class SampleConfig:
    model: str | None = flag(None, "a .pt checkpoint, an HF GPT-2 folder, or gpt2[-medium|-large|-xl] (required)")
    prompt: str = flag("Hello, I'm a language model,", "text to continue")
    num_samples: int = flag(4, "continuations of the prompt", lo=1, hi=4096)
    max_new_tokens: int = flag(64, "tokens to generate", lo=1, hi=10**6)
    temperature: float = flag(1.0, "0 = greedy", lo=0, hi=100)
    top_k: int = flag(50, "sample among the k most likely tokens; 0 disables", lo=0, hi=2**17)
    top_p: float = flag(1.0, "nucleus sampling mass; 1.0 disables", gt=0, hi=1)
    stop_at_eot: bool = flag(True, "stop at <|endoftext|>")
    seed: int = flag(42, "sampling seed", lo=0, hi=2**63 - 1)
    device: str = flag("auto", "auto = CUDA, else MPS, else CPU", choices=DEVICES)
    dtype: str = flag("auto", "autocast dtype", choices=DTYPES)
    export_hf: str | None = flag(None, "write an HF GPT-2 folder (a new or empty one) and exit", metavar="DIR")


SAMPLING_FLAGS = ("prompt", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "stop_at_eot", "seed")


def check_flags(args: SampleConfig, given: set[str]) -> None:
    """Flags typed that would do nothing with the others given: refused, naming both."""
    if args.export_hf and (unused := [flag_name(n) for n in (*SAMPLING_FLAGS, "device", "dtype") if n in given]):
        raise UserError(
            f"--export-hf writes the model and exits, without sampling: {', '.join(unused)} would do nothing; "
            f"drop {'them' if len(unused) > 1 else 'it'}"
        )
    if args.temperature == 0 and (unused := [flag_name(n) for n in ("top_k", "top_p") if n in given]):
        raise UserError(
            f"--temperature 0 samples greedily (the most likely token): {', '.join(unused)} would do nothing; "
            f"drop {'them' if len(unused) > 1 else 'it'}, or use a temperature above 0"
        )


def sample(args: SampleConfig, given: set[str] = frozenset()) -> None:
    if args.model is None:
        raise UserError("--model is required: a .pt checkpoint, an HF GPT-2 folder or gpt2[-medium|-large|-xl]")
    check_flags(args, given)
    if (
        args.export_hf
        and os.path.exists(args.export_hf)
        and (not os.path.isdir(args.export_hf) or os.listdir(args.export_hf))
    ):
        raise UserError(f"--export-hf {args.export_hf} already exists and is not an empty folder; choose a new one")
    check_model_source(args.model)
    with quiet_unpickling():  # a foreign pytorch_model.bin: our one line, not torch's warning first
        model = GPT.from_pretrained(args.model)
    if args.export_hf:
        model.save_pretrained(args.export_hf)
        print(f"wrote {args.export_hf} (transformers' AutoModelForCausalLM and AutoTokenizer load it offline)")
        return
    if model.config.vocab_size < GPT2_VOCAB:  # the prompt's GPT-2 token ids would index past its embedding
        raise UserError(
            f"{args.model}: the model's vocabulary has {model.config.vocab_size} tokens, fewer than the GPT-2 "
            f"tokenizer's {GPT2_VOCAB} that prompts and samples are written in; sample a model with GPT-2's vocabulary"
        )
    rt = runtime(args.device, args.dtype)
    model.to(rt.device).eval()
    enc = get_tokenizer()
    prompt = enc.encode_ordinary(args.prompt) or [EOT]  # an empty prompt starts a fresh document
    idx = torch.tensor([prompt] * args.num_samples, device=rt.device)
    gen = torch.Generator(device=rt.device).manual_seed(args.seed)
    t0 = time.time()
    with rt.autocast():
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
    description = "Sample from a GPT-2 checkpoint, or export it as an HF folder."
    cli(lambda argv: sample(*parse_config(SampleConfig, argv, description)), argv)


if __name__ == "__main__":
    main()
