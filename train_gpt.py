"""
Pretrain a GPT-2 class model from scratch.

    python train_gpt.py                                     # one device
    torchrun --standalone --nproc-per-node=8 train_gpt.py   # one node, 8 GPUs

The defaults reproduce the GPT-2 124M recipe on FineWeb-Edu 10B (shards from
`python fineweb.py`). The file reads top to bottom in the order data flows:
config, model, loss, data, evaluation, checkpoints, training loop.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import re
import signal
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fineweb import BIN_HEADER_INTS, BIN_MAGIC, BIN_VERSION, EOT, get_tokenizer, write_atomic

GPT2_VOCAB = 50257  # real GPT-2 tokens; ids 50257..50303 only pad the vocab for speed
IGNORE_INDEX = -100  # targets with this value are padding and carry no loss


class UserError(Exception):
    """Bad input or an unrecoverable run state: main() prints it as one line, no traceback."""


# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50304  # 50257 GPT-2 tokens, padded to a multiple of 64 for fast matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


MODEL_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class TrainConfig:
    # data and logs
    data_dir: str = "edu_fineweb10B"
    log_dir: str = "log"
    shuffle: bool = False
    # model shape: a named shape, optionally overridden field by field
    model: str = "gpt2"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    vocab_size: int = 50304
    init_from: str | None = None
    # batch: total_batch_size tokens per optimizer step, reached by gradient accumulation
    seq_len: int = 1024
    batch_size: int = 64
    total_batch_size: int = 524288
    # optimisation
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    max_steps: int = 19073
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # periodic actions (0 disables)
    eval_every: int = 250
    eval_steps: int = 20
    sample_every: int = 250
    save_every: int = 5000
    hellaswag_every: int = 250
    hellaswag_dir: str | None = None
    keep_last: int = 0
    resume: bool = False
    # runtime
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    chunked_loss: bool = True
    fused_adamw: bool = True
    seed: int = 1337
    # benchmark mode: time this many steps after a warmup, then exit
    benchmark_steps: int = 0
    benchmark_warmup: int = 3
    peak_tflops: float | None = None
    inject_nan_steps: str = ""  # testing only: poison the loss at these steps
    plot: str | None = None  # draw curves.png from this log.txt and exit


def model_config(cfg: TrainConfig) -> GPTConfig:
    """The model shape that the flags describe, checked so a mistake fails before any work."""
    if cfg.model not in MODEL_SHAPES:
        raise UserError(f"--model {cfg.model!r} is unknown; choose one of {', '.join(MODEL_SHAPES)}")
    shape = dict(MODEL_SHAPES[cfg.model])
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(cfg, name) is not None:
            shape[name] = getattr(cfg, name)
    for name, value in shape.items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} {value} must be positive")
    if shape["n_embd"] % shape["n_head"]:
        raise UserError(
            f"--n-embd {shape['n_embd']} is not divisible by --n-head {shape['n_head']}; "
            "pick a head count that divides the width"
        )
    return GPTConfig(block_size=1024, vocab_size=cfg.vocab_size, **shape)


# -----------------------------------------------------------------------------
# model


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(layer, k, v)
        # a cached decode step has one query that may see every key, so only a fresh prefix is masked
        is_causal = T == k.size(2)
        assert is_causal or T == 1, "the cache extends one token at a time after the prompt"
        y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


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
        self.shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.n_layer = config.n_layer
        self.kv: torch.Tensor | None = None
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
        self.loss_chunk_size = 512  # rows of logits alive at once in the loss; 0 = all (plain)
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
        """Final-layer-norm activations (B, T, n_embd): what lm_head turns into logits."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) without targets; (None, loss) with them, since the loss never builds full logits.

        targets are already shifted (targets[:, t] = idx[:, t+1]); IGNORE_INDEX marks padding.
        """
        x = self.hidden(idx)
        if targets is None:
            return self.lm_head(x), None
        return None, cross_entropy(x, self.lm_head.weight, targets, self.loss_chunk_size)

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, device_type: str, verbose: bool = False, fused: bool = True
    ) -> torch.optim.AdamW:
        """AdamW that decays only matrices (weights, embeddings), never biases or layer norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = fused and device_type in ("cuda", "cpu")  # one kernel per tensor: on CPU 2-3x the plain loop
        if verbose:
            print(
                f"decayed tensors: {len(decay)} ({sum(p.numel() for p in decay):,} params), "
                f"non-decayed: {len(no_decay)} ({sum(p.numel() for p in no_decay):,} params), fused AdamW: {fused}"
            )
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)

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
            logits = self.lm_head(x[:, -1, :]).float()
            nxt = sample_next_token(logits, temperature, top_k, top_p, generator)
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
        """A model from a GPT-2 name (HF hub), a local HF GPT-2 folder, or one of our .pt checkpoints."""
        if src.endswith(".pt"):
            return model_from_checkpoint(load_checkpoint(src))
        if os.path.isdir(src):
            hf_config, state = read_hf_folder(src)
        elif src in MODEL_SHAPES:
            try:
                from transformers import GPT2LMHeadModel
            except ImportError:
                raise UserError(
                    f"loading {src!r} from the HF hub needs transformers: pip install transformers"
                ) from None
            hf = GPT2LMHeadModel.from_pretrained(src)
            hf_config, state = hf.config.to_dict(), hf.state_dict()
        else:
            raise UserError(
                f"--init-from/--model {src!r} is not a GPT-2 name ({', '.join(MODEL_SHAPES)}), "
                "an HF GPT-2 folder or a .pt checkpoint"
            )
        unsupported = {
            "tie_word_embeddings": (hf_config.get("tie_word_embeddings", True), True),
            "activation_function": (hf_config.get("activation_function", "gelu_new"), "gelu_new"),
            "layer_norm_epsilon": (hf_config.get("layer_norm_epsilon", 1e-5), 1e-5),
            "n_inner": (hf_config.get("n_inner"), None),
        }
        for key, (value, ours) in unsupported.items():
            if value != ours:
                raise UserError(f"{src}: {key}={value!r} is not GPT-2's ({ours!r}); this model cannot load it")
        config = GPTConfig(
            block_size=hf_config["n_positions"],
            vocab_size=hf_config["vocab_size"],
            n_layer=hf_config["n_layer"],
            n_head=hf_config["n_head"],
            n_embd=hf_config["n_embd"],
        )
        model = cls(config)
        ours = model.state_dict()
        for key, value in state.items():
            key = key.removeprefix("transformer.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers, and the head tied to wte
            name = key if key.startswith("lm_head") else "transformer." + key
            if name not in ours:
                raise UserError(f"{src}: unexpected weight {key!r}; is this a GPT-2 model?")
            if key.endswith(cls._HF_TRANSPOSED):
                value = value.t()
            if value.shape != ours[name].shape:
                raise UserError(f"{src}: {key} has shape {tuple(value.shape)}, expected {tuple(ours[name].shape)}")
            with torch.no_grad():
                ours[name].copy_(value)
        return model

    def save_pretrained(self, out_dir: str) -> None:
        """An HF GPT-2 folder (config.json + model.safetensors) that GPT2LMHeadModel loads as is."""
        from safetensors.torch import save_file

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
        hf_config = {
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
        }
        os.makedirs(out_dir, exist_ok=True)
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)


def read_hf_folder(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights of a local HF GPT-2 folder, with no need for transformers."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{path}: no config.json; expected a Hugging Face GPT-2 folder")
    with open(config_path) as f:
        hf_config = json.load(f)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        from safetensors.torch import load_file

        state = load_file(os.path.join(path, "model.safetensors"))
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")
    return hf_config, state


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


def cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """The one loss of this file (training, validation, scoring): the mean negative log-likelihood
    of targets under softmax(x @ weight.T), over positions whose target is not IGNORE_INDEX.

    chunk_size > 0 computes it chunk_size rows at a time, so the (B*T, V) logits never exist;
    chunk_size 0 is the plain full-logits version, kept as the reference.
    """
    x = x.reshape(-1, x.size(-1))
    targets = targets.reshape(-1)
    if chunk_size <= 0:
        logits = (x @ weight.t()).to(accumulate_dtype(x.dtype))
        # a sum over the valid count, not reduction="mean", so an all-padding batch is 0, not nan
        total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return chunked_cross_entropy(x, weight, targets, chunk_size)


@torch.compiler.disable  # a Python loop of chunks: torch.compile gains nothing and would unroll it
def chunked_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_size)
    return token_nll(x, weight, targets, chunk_size).sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def token_nll(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Per-position negative log-likelihood, 0 where the target is ignored; no gradients (scoring)."""
    shape = targets.shape
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    w = weight.to(compute_dtype(x))
    acc = accumulate_dtype(w.dtype)
    out = torch.zeros(targets.shape, dtype=acc, device=x.device)
    for s in range(0, x.size(0), chunk_size if chunk_size > 0 else max(x.size(0), 1)):
        logits = (x[s : s + chunk_size].to(w.dtype) @ w.t()).to(acc)
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
        w = weight.to(dt)
        valid = targets != IGNORE_INDEX
        scale = valid.to(acc) / valid.sum().clamp(min=1)  # per-row weight of the mean
        safe_targets = targets.clamp(min=0)[:, None]
        loss = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=acc)
        # one logits buffer for every chunk: fresh CPU allocations this size cost page faults
        buf = torch.empty(min(chunk_size, x.size(0)), w.size(0), dtype=acc, device=x.device) if dt == acc else None
        for s in range(0, x.size(0), chunk_size):
            xc = x[s : s + chunk_size].to(dt)
            r = xc.size(0)
            logits = torch.mm(xc, w.t(), out=buf[:r]) if buf is not None else (xc @ w.t()).to(acc)
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
            g = e.to(dt)
            grad_x[s : s + r] = ((g @ w) * row).to(x.dtype)
            xs = xc * row.to(dt)
            if g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), xs)
            else:
                grad_w += (g.t() @ xs).to(acc)
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
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable token shard ({e}); it may be truncated, rebuild it with fineweb.py") from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(
            f"{path}: holds a {tokens.ndim}-d {tokens.dtype} array, expected 1-d uint16 GPT-2 tokens; "
            "rebuild it with fineweb.py"
        )
    return tokens


def check_tokens(tokens: np.ndarray, path: str, vocab_size: int) -> np.ndarray:
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab_size:
        raise UserError(
            f"{path}: token id {top} >= vocab_size {vocab_size}; the shard is corrupt or was made with another tokenizer"
        )
    return tokens


def list_shards(data_dir: str, split: str) -> list[str]:
    """The .npy/.bin shards of one split, in name order (build-nanogpt and llm.c both number them)."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such directory; make shards with `python fineweb.py`")
    # build-nanogpt: edufineweb_val_000000.npy; llm.c: fineweb_val_000000.bin or tiny_shakespeare_val.bin
    pattern = re.compile(rf"(^|_){split}(_|\.)")
    names = sorted(n for n in os.listdir(data_dir) if pattern.search(n) and n.endswith((".npy", ".bin")))
    if not names:
        raise UserError(f"--data-dir {data_dir}: no '{split}' shards (*_{split}_*.npy or .bin); run fineweb.py")
    return [os.path.join(data_dir, n) for n in names]


class DataLoaderLite:
    """Batches (x, y) of shape (B, T) cut from a split's token shards, y being x shifted by one.

    Each shard is cut into windows of B*T+1 tokens, B*T apart, so windows never cross a shard
    and drop fewer than B*T tokens at its end. The windows of all shards, in shard order (or a
    seeded shuffle of shards and of windows, fresh each epoch), form one global order. The k-th
    next_batch() of rank r in a world of W returns global window k*W + r, so a step's global
    batch is the same tokens whatever the number of processes.
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
        # every shard is checked whole now (a sequential read, no anonymous memory), so a bad one
        # fails at start-up, on every rank alike, rather than hours in on one rank
        self.shards = [check_tokens(open_shard(p), p, vocab_size) for p in self.paths]
        self.n_windows = [max(0, (len(s) - 1) // (B * T)) for s in self.shards]
        self.total = sum(self.n_windows)
        if self.total == 0:
            n = sum(len(s) for s in self.shards)
            raise UserError(
                f"--data-dir {data_dir}: the '{split}' split has {n} tokens, fewer than one batch of "
                f"B*T+1 = {B * T + 1}; lower --batch-size or --seq-len, or add data"
            )
        self._epoch_order: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window_perm: tuple[int, int, np.ndarray] | None = None
        if verbose:
            print(f"{split}: {len(self.shards)} shards, {sum(map(len, self.shards)):,} tokens, {self.total:,} windows")
        self.reset()

    def reset(self) -> None:
        self.position = 0  # global index of the window rank 0 reads next

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "window_tokens": self.B * self.T,
            "n_tokens": sum(len(s) for s in self.shards),
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        diffs = [
            f"{k}: checkpoint {state.get(k)}, now {now[k]}"
            for k in ("n_tokens", "shuffle", "seed")[: 3 if self.shuffle else 2]
            if state.get(k) != now[k]
        ]
        if diffs:
            raise UserError(
                f"the training data differs from the checkpoint's ({'; '.join(diffs)}); resume on the same shards"
            )
        # a different B keeps the token position; the window grid itself moves with B
        self.position = state["position"] * state["window_tokens"] // (self.B * self.T)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard, window = self.locate(self.position + self.process_rank)
        self.position += self.num_processes
        start = window * self.B * self.T
        buf = torch.from_numpy(self.shards[shard][start : start + self.B * self.T + 1].astype(np.int64))
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

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
# evaluation: validation loss, HellaSwag, samples


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoaderLite, steps: int, device: str, autocast) -> float:
    """Mean loss over the first `steps` val batches of every rank, averaged across ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
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
    os.makedirs(data_dir, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise UserError(
            f"HellaSwag {split} data: {path} is missing and {url} cannot be downloaded ({e}); "
            f"copy hellaswag_{split}.jsonl there or point --hellaswag-dir/--data-dir at a folder holding it"
        ) from e
    write_atomic(path, lambda f: f.write(data))
    return path


def load_hellaswag(split: str = "val", data_dir: str | None = None, limit: int | None = None) -> list[dict]:
    path = hellaswag_file(split, data_dir)
    with open(path) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    return examples[:limit] if limit else examples


def render_hellaswag(example: dict, enc) -> tuple[list[int], list[list[int]], int]:
    """(context tokens, the 4 endings' tokens, label), tokenized as build-nanogpt does."""
    ctx = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + e) for e in example["endings"]]
    return ctx, endings, int(example.get("label", -1))


@torch.no_grad()
def score_hellaswag(
    model: GPT, rendered: list, device: str, autocast=nullcontext(), batch_size: int = 16
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
    for b in range(0, len(order), batch_size):
        batch = [rendered[i] for i in order[b : b + batch_size]]
        rows = [(ctx, end) for ctx, endings, _ in batch for end in endings]
        L = max(len(c) + len(e) for c, e in rows)
        idx = torch.zeros((len(rows), L), dtype=torch.long)
        targets = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
        for r, (ctx, end) in enumerate(rows):
            idx[r, : len(ctx) + len(end)] = torch.tensor(ctx + end)
            targets[r, len(ctx) - 1 : len(ctx) + len(end) - 1] = torch.tensor(end)  # position t predicts t+1
        idx, targets = idx.to(device), targets.to(device)
        with autocast:
            x = model.hidden(idx)
            keep = targets != IGNORE_INDEX
            nll = token_nll(x[keep], model.lm_head.weight, targets[keep], model.loss_chunk_size or 1024)
        row_of = torch.arange(len(rows), device=device)[:, None].expand_as(targets)[keep]
        loss_sum = torch.zeros(len(rows), device=device).index_add_(0, row_of, nll).view(-1, 4)
        n_tokens = keep.sum(dim=1).view(-1, 4)
        for j, (s, n) in enumerate(zip(loss_sum.tolist(), n_tokens.tolist())):
            mean = [a / c for a, c in zip(s, n)]
            preds[order[b + j]] = (min(range(4), key=s.__getitem__), min(range(4), key=mean.__getitem__))
    model.train(was_training)
    return preds


def evaluate_hellaswag(
    model: GPT, rendered: list, device: str, autocast, rank: int = 0, world: int = 1
) -> tuple[float, float, int]:
    """(acc_norm, acc, n) over all examples, each rank scoring every world-th one."""
    mine = rendered[rank::world]
    preds = score_hellaswag(model, mine, device, autocast)
    counts = torch.tensor(
        [
            sum(pn == ex[2] for ex, (_, pn) in zip(mine, preds)),
            sum(p == ex[2] for ex, (p, _) in zip(mine, preds)),
            len(mine),
        ],
        dtype=torch.float64,
        device=device,
    )
    if dist.is_initialized():
        dist.all_reduce(counts)
    norm, plain, n = counts.tolist()
    return norm / n, plain / n, int(n)


def print_samples(model: GPT, enc, device: str, autocast, rank: int = 0, n: int = 4, max_tokens: int = 32) -> None:
    """Top-k 50 continuations of a fixed prompt, seeded so samples of different steps compare."""
    idx = torch.tensor([enc.encode_ordinary("Hello, I'm a language model,")] * n, device=device)
    gen = torch.Generator(device=device).manual_seed(42 + rank)
    with autocast:
        out = model.generate(idx, max_tokens - idx.size(1), top_k=50, generator=gen)
    for i, row in enumerate(out.tolist()):
        print(f"rank {rank} sample {i}: {enc.decode(row)}")


GPT2_124M_REFERENCE = {"val": 3.2924, "hella": 0.2955}  # OpenAI's GPT-2 124M on FineWeb-Edu val / HellaSwag


def read_log(log_file: str) -> dict[str, tuple[list[int], list[float]]]:
    """stream -> (steps, values) from a log.txt (ours or build-nanogpt's: `{step} {stream} {value}`)."""
    streams: dict[str, tuple[list[int], list[float]]] = {}
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0].isdigit():
                steps, values = streams.setdefault(parts[1], ([], []))
                steps.append(int(parts[0]))
                values.append(float(parts[2]))
    return streams


def plot_curves(log_file: str, out_png: str, reference_124m: bool = False) -> None:
    """Loss, val perplexity and HellaSwag against step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    s = read_log(log_file)
    panels = 3 if "hella" in s else 2
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
    if panels == 3:
        ax = axes[2]
        ax.plot(*s["hella"], marker=".", label="acc_norm")
        if reference_124m:
            ax.axhline(GPT2_124M_REFERENCE["hella"], color="r", ls="--", label="GPT-2 124M")
        ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
        ax.legend()
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)


# -----------------------------------------------------------------------------
# checkpoints: everything needed to continue a run exactly, written atomically

CHECKPOINT_RE = re.compile(r"model_(\d{5,})\.pt")


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


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Temp file, fsync, rename: a kill at any moment leaves either the old state or the new one."""
    write_atomic(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def latest_checkpoint(log_dir: str) -> tuple[str, dict]:
    """The newest checkpoint in log_dir that loads, skipping (with a warning) any that do not."""
    for _, path in reversed(list_checkpoints(log_dir)):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    raise UserError(f"--resume: no checkpoint (model_*.pt) in --log-dir {log_dir}; start without --resume")


def model_from_checkpoint(checkpoint: dict) -> GPT:
    model = GPT(GPTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    return model


def check_resumable(checkpoint: dict, config: GPTConfig, cfg: TrainConfig, path: str) -> None:
    """Refuse to continue a run whose shape or batch changed, naming every mismatch."""
    was = dict(checkpoint["config"])
    was.update({k: checkpoint["args"][k] for k in ("seq_len", "total_batch_size")})
    now = dict(asdict(config), seq_len=cfg.seq_len, total_batch_size=cfg.total_batch_size)
    diffs = [f"{k}: checkpoint {was[k]}, now {now[k]}" for k in now if was.get(k) != now[k]]
    if diffs:
        raise UserError(f"cannot resume from {path}: {'; '.join(diffs)}; use the original flags or another --log-dir")


def remove_old_checkpoints(log_dir: str, keep_last: int, step: int) -> None:
    """Keep the keep_last newest checkpoints up to `step`, the one just written; a later one can only
    be a leftover that resume skipped as unreadable, and must not count as newest."""
    if keep_last > 0:
        for _, path in [c for c in list_checkpoints(log_dir) if c[0] <= step][:-keep_last]:
            os.remove(path)


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
# distributed and device setup


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str) -> tuple[Dist, str]:
    """Join the torchrun process group if launched by torchrun; pick this process's device."""
    if "RANK" not in os.environ:
        return Dist(), pick_device(device_flag)
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), True)
    device = pick_device(device_flag)
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device))
    else:
        dist.init_process_group(backend="gloo")  # so DDP runs, and is tested, on CPU
    return d, device


def pick_device(flag: str) -> str:
    if flag != "auto":
        if flag.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {flag}: CUDA is not available here; use --device cpu or auto")
        if flag == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps: MPS is not available here; use --device cpu or auto")
        return flag
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(flag: str, device: str) -> torch.dtype:
    """Autocast dtype: bf16 on CUDA that has it, fp16 (+ GradScaler) on older CUDA, else float32."""
    if flag != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[flag]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)  # gloo has no ReduceOp.AVG: sum, then divide
        t = t / dist.get_world_size()
    return t


def peak_flops(device: str, dtype: torch.dtype, override_tflops: float | None) -> tuple[float, str] | None:
    """Assumed dense peak of the device for MFU, with a label saying what was assumed."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100", 989.0), ("H200", 989.0), ("A100", 312.0)):
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s ({key} bf16 dense)"
    return None


# -----------------------------------------------------------------------------
# training loop


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


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
    for name in ("batch_size", "seq_len", "total_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be positive")
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


def train(cfg: TrainConfig) -> None:
    """Everything from flags to the final checkpoint, on one process or as one torchrun rank."""
    config = model_config(cfg)  # flag errors before any process group or data work
    if cfg.seed < 0:
        raise UserError(f"--seed {cfg.seed} must be >= 0")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_batch(cfg, world_size, config.block_size)
    if cfg.benchmark_steps == 0:  # a missing data dir or split is known before any model is built
        list_shards(cfg.data_dir, "train")
        list_shards(cfg.data_dir, "val")
        if not cfg.resume and list_checkpoints(cfg.log_dir):
            raise UserError(
                f"--log-dir {cfg.log_dir} already holds checkpoints ({os.path.basename(list_checkpoints(cfg.log_dir)[-1][1])}); "
                "pass --resume to continue that run, or choose another --log-dir"
            )
    d, device = setup_distributed(cfg.device)
    try:
        run(cfg, d, device)
    finally:
        if d.ddp:
            dist.destroy_process_group()


def run(cfg: TrainConfig, d: Dist, device: str) -> None:
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = pick_dtype(cfg.dtype, device_type)
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    bench = cfg.benchmark_steps > 0
    log_file = os.path.join(cfg.log_dir, "log.txt")

    def log(line: str) -> None:
        if d.master and not bench:
            with open(log_file, "a") as f:  # a line at a time, so others can follow the file
                f.write(line + "\n")

    # the model: resumed, fine-tuned from pretrained weights, or fresh
    checkpoint, ckpt_path = None, None
    if cfg.resume:
        ckpt_path, checkpoint = latest_checkpoint(cfg.log_dir)
        # a fine-tuning run's shape comes from --init-from, not from the shape flags
        expected = GPTConfig(**checkpoint["config"]) if cfg.init_from else model_config(cfg)
        check_resumable(checkpoint, expected, cfg, ckpt_path)
        model = model_from_checkpoint(checkpoint)
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from)
    else:
        model = GPT(model_config(cfg))
    config = model.config
    is_124m = all(getattr(config, k) == v for k, v in MODEL_SHAPES["gpt2"].items())
    grad_accum = check_batch(cfg, d.world_size, config.block_size)
    # 512 rows measured best on a 2-core CPU (README, Speed); larger chunks keep a GPU's matmuls big
    model.loss_chunk_size = (512 if device_type == "cpu" else 8192) if cfg.chunked_loss else 0
    model.to(device)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if d.ddp:
        model = DDP(model, device_ids=[d.local_rank] if device_type == "cuda" else None)
    optimizer = raw_model.configure_optimizers(
        cfg.weight_decay, cfg.max_lr, device_type, verbose=d.master, fused=cfg.fused_adamw
    )
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if d.master:
        print(
            f"model: {raw_model.num_params():,} params {asdict(config)} | device {device} | dtype {str(dtype)[6:]} | "
            f"world {d.world_size} | total batch {cfg.total_batch_size} = {cfg.batch_size} x {cfg.seq_len} x "
            f"{d.world_size} x {grad_accum} accumulation steps"
        )

    # data, and what the periodic actions need, loaded now so a problem shows before hours of work
    if bench:
        gen = torch.Generator().manual_seed(cfg.seed)
        fixed = torch.randint(0, min(GPT2_VOCAB, config.vocab_size), (cfg.batch_size, cfg.seq_len + 1), generator=gen)
        next_batch = lambda: (fixed[:, :-1], fixed[:, 1:])  # noqa: E731 -- benchmark mode times the model, not the disk
    else:
        loader_args = dict(data_dir=cfg.data_dir, vocab_size=config.vocab_size, verbose=d.master)
        train_loader = DataLoaderLite(
            cfg.batch_size,
            cfg.seq_len,
            d.rank,
            d.world_size,
            "train",
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            **loader_args,
        )
        val_loader = DataLoaderLite(cfg.batch_size, cfg.seq_len, d.rank, d.world_size, "val", **loader_args)
        next_batch = train_loader.next_batch
    enc = get_tokenizer() if not bench and (cfg.sample_every > 0 or cfg.hellaswag_every > 0) else None
    hellaswag = []
    if cfg.hellaswag_every > 0 and not bench:
        hellaswag = [render_hellaswag(ex, enc) for ex in load_hellaswag("val", cfg.hellaswag_dir)]

    start_step, periodic_done, val_loss = 0, False, None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        train_loader.load_state_dict(checkpoint["train_loader"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device_type == "cuda" and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        start_step, periodic_done, val_loss = checkpoint["step"], checkpoint["periodic_done"], checkpoint["val_loss"]
        if d.master:
            print(f"resuming from {ckpt_path} at step {start_step}")
    if d.master and not bench:
        os.makedirs(cfg.log_dir, exist_ok=True)
        if checkpoint is not None:
            rewind_log(log_file, start_step, keep_evals=periodic_done)
        else:
            open(log_file, "w").close()

    def save(step: int, periodic_done: bool) -> str:
        path = checkpoint_path(cfg.log_dir, step)
        save_checkpoint(
            path,
            {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "config": asdict(config),
                "args": asdict(cfg),
                "step": step,
                "val_loss": val_loss,
                "train_loader": train_loader.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else [],
                },
                "scaler": scaler.state_dict(),
                "periodic_done": periodic_done,  # whether eval/save of this step already happened
            },
        )
        remove_old_checkpoints(cfg.log_dir, cfg.keep_last, step)
        return path

    stop = StopFlag(verbose=d.master)
    inject_nan = {int(s) for s in cfg.inject_nan_steps.split(",") if s.strip()}
    max_steps = cfg.benchmark_warmup + cfg.benchmark_steps if bench else cfg.max_steps
    tokens_per_step = cfg.batch_size * cfg.seq_len * grad_accum * d.world_size
    bad_in_a_row, step_times = 0, []
    for step in range(start_step, max_steps + 1):
        last = step == max_steps
        if not bench and not (step == start_step and periodic_done):
            did_eval = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or last)
            did_hella = cfg.hellaswag_every > 0 and (step % cfg.hellaswag_every == 0 or last)
            if did_eval:
                val_loss = evaluate_loss(model, val_loader, cfg.eval_steps, device, autocast)
                if d.master:
                    print(f"validation loss: {val_loss:.4f} | ppl: {math.exp(min(val_loss, 700)):.2f}")
                log(f"{step} val {val_loss:.4f}")
            if did_hella:
                acc_norm, acc, n = evaluate_hellaswag(raw_model, hellaswag, device, autocast, d.rank, d.world_size)
                if d.master:
                    print(f"hellaswag: acc_norm={acc_norm:.4f} acc={acc:.4f} n={n}")
                log(f"{step} hella {acc_norm:.4f}")
            if d.master and (did_eval or did_hella):
                try:
                    plot_curves(log_file, os.path.join(cfg.log_dir, "curves.png"), is_124m)
                except Exception as e:  # a picture is never worth a dead run
                    print(f"warning: could not draw curves.png ({type(e).__name__}: {e})", file=sys.stderr)
            if d.master and cfg.sample_every > 0 and ((step > 0 and step % cfg.sample_every == 0) or last):
                print_samples(raw_model, enc, device, autocast)
            if d.master and cfg.save_every > 0 and step > 0 and (step % cfg.save_every == 0 or last):
                save(step, periodic_done=True)
        if last:
            break

        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            x, y = next_batch()
            if device_type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            else:
                x, y = x.to(device), y.to(device)
            if d.ddp:  # all-reduce gradients once, on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with autocast:
                _, loss = model(x, y)
            loss = loss / grad_accum  # the gradients sum over micro-steps; the mean is wanted
            if step in inject_nan:
                loss = loss * float("nan")
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(
            raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        # one all-reduce and one host sync per step: mean loss, and whether any rank was told to stop
        stats = torch.stack(
            [loss_accum.float(), torch.tensor(float(stop.signum is not None), device=device), norm.float()]
        )
        if d.ddp:
            dist.all_reduce(stats)
        loss_sum, stop_votes, norm_sum = stats.tolist()
        loss_value, norm_value = loss_sum / d.world_size, norm_sum / d.world_size
        lr = get_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler.is_enabled())
        if finite:
            scaler.step(optimizer)
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
        scaler.update()
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        if step - start_step >= cfg.benchmark_warmup:
            step_times.append(dt)
        if d.master:
            note = "" if finite else f" | skipped: non-finite loss or grad norm ({bad_in_a_row} in a row)"
            print(
                f"step {step:5d} | loss: {loss_value:.6f} | lr {lr:.4e} | norm: {norm_value:.4f} | "
                f"dt: {dt * 1000:.2f}ms | tok/sec: {tokens_per_step / dt:.2f}{note}",
                flush=True,
            )
        log(f"{step} train {loss_value:.6f}")
        if not finite:
            log(f"{step} skip {bad_in_a_row}")
            if bad_in_a_row >= 5:
                good = list_checkpoints(cfg.log_dir)
                raise UserError(
                    f"stopping at step {step}: {bad_in_a_row} steps in a row had a non-finite loss or gradient norm; "
                    f"last good checkpoint: {good[-1][1] if good else 'none'}; lower --max-lr or check the data, then --resume"
                )
        if stop_votes > 0 and not bench:
            if d.master:
                path = save(step + 1, periodic_done=False)
                print(f"stopped at step {step + 1}: checkpoint written to {path}; continue with --resume")
            return

    if bench and d.master:
        report_benchmark(raw_model, cfg, device, dtype, tokens_per_step, step_times)


def report_benchmark(
    model: GPT, cfg: TrainConfig, device: str, dtype: torch.dtype, tokens_per_step: int, times: list[float]
) -> None:
    """tokens/s, ms/step, peak memory and MFU of the timed steps (those after the warmup)."""
    if not times:
        print("benchmark: no timed steps")
        return
    c = model.config
    step_s = sum(times) / len(times)
    tok_s = tokens_per_step / step_s
    flops_per_token = 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * cfg.seq_len
    achieved = flops_per_token * tok_s
    if device.startswith("cuda"):
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    else:
        import resource

        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max RSS"
    peak = peak_flops(device, dtype, cfg.peak_tflops)
    mfu = f"MFU {100 * achieved / peak[0]:.1f}% of {peak[1]}" if peak else f"{achieved / 1e9:.1f} GFLOP/s achieved"
    print(
        f"benchmark: {len(times)} steps after {cfg.benchmark_warmup} warmup | {tok_s:,.0f} tok/s | "
        f"{1000 * step_s:.1f} ms/step | peak memory {memory} | {mfu}"
    )


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Pretrain GPT-2 (defaults: the 124M recipe on FineWeb-Edu 10B).")
    a = p.add_argument_group("data and logs").add_argument
    a("--data-dir", default=d.data_dir, help="folder of *_train_* / *_val_* token shards (.npy or llm.c .bin)")
    a("--log-dir", default=d.log_dir, help="log.txt, checkpoints and curves.png go here")
    a(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=d.shuffle,
        help="reshuffle shards and windows each epoch (seeded)",
    )
    a = p.add_argument_group("model").add_argument
    a("--model", default=d.model, help=f"named shape: {', '.join(MODEL_SHAPES)}")
    a("--n-layer", type=int, default=d.n_layer, help="override the shape's layer count")
    a("--n-head", type=int, default=d.n_head, help="override the shape's head count")
    a("--n-embd", type=int, default=d.n_embd, help="override the shape's width")
    a("--vocab-size", type=int, default=d.vocab_size, help="50257 GPT-2 tokens, padded for speed")
    a(
        "--init-from",
        default=d.init_from,
        help="fine-tune from gpt2[-medium|-large|-xl], an HF GPT-2 folder or a .pt checkpoint",
    )
    a = p.add_argument_group("batch").add_argument
    a("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (T)")
    a("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch per process (B)")
    a(
        "--total-batch-size",
        type=int,
        default=d.total_batch_size,
        help="tokens per optimizer step, via gradient accumulation",
    )
    a = p.add_argument_group("optimisation").add_argument
    a("--max-lr", type=float, default=d.max_lr)
    a("--min-lr", type=float, default=d.min_lr)
    a("--warmup-steps", type=int, default=d.warmup_steps)
    a("--max-steps", type=int, default=d.max_steps)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--grad-clip", type=float, default=d.grad_clip, help="max global grad norm; 0 disables clipping")
    a = p.add_argument_group("periodic actions (0 disables)").add_argument
    a("--eval-every", type=int, default=d.eval_every, help="val loss every N steps, at step 0 and at the end")
    a("--eval-steps", type=int, default=d.eval_steps, help="val batches per rank in each evaluation")
    a("--sample-every", type=int, default=d.sample_every)
    a("--save-every", type=int, default=d.save_every, help="checkpoint every N steps and at the end")
    a("--hellaswag-every", type=int, default=d.hellaswag_every)
    a(
        "--hellaswag-dir",
        default=d.hellaswag_dir,
        help="folder with hellaswag_val.jsonl (default: download to ~/.cache/hellaswag)",
    )
    a("--keep-last", type=int, default=d.keep_last, help="keep only the newest N checkpoints (0 keeps all)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --log-dir")
    a = p.add_argument_group("runtime").add_argument
    a("--device", default=d.device, choices=["auto", "cpu", "cuda", "mps"])
    a("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"], help="autocast dtype")
    a("--compile", action=argparse.BooleanOptionalAction, default=d.compile, help="torch.compile the model")
    a(
        "--chunked-loss",
        action=argparse.BooleanOptionalAction,
        default=d.chunked_loss,
        help="never build the full B*T*V logits",
    )
    a(
        "--fused-adamw",
        action=argparse.BooleanOptionalAction,
        default=d.fused_adamw,
        help="fused AdamW kernels (CUDA, CPU)",
    )
    a("--seed", type=int, default=d.seed)
    a = p.add_argument_group("benchmark mode").add_argument
    a(
        "--benchmark-steps",
        type=int,
        default=d.benchmark_steps,
        help="time N steps on synthetic tokens after a warmup, print tok/s, memory, MFU, exit",
    )
    a("--benchmark-warmup", type=int, default=d.benchmark_warmup, help="untimed steps before the timed ones")
    a(
        "--peak-tflops",
        type=float,
        default=d.peak_tflops,
        help="device peak for MFU (default: known H100/H200/A100 bf16)",
    )
    a("--inject-nan-steps", default=d.inject_nan_steps, help=argparse.SUPPRESS)
    a = p.add_argument_group("other modes").add_argument
    a(
        "--plot",
        metavar="LOG_TXT",
        default=d.plot,
        help="draw curves.png beside an existing log.txt (ours or build-nanogpt's) and exit; GPT-2 124M reference lines when the shape flags are 124M's",
    )
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        if cfg.plot:
            out = os.path.join(os.path.dirname(cfg.plot), "curves.png")
            if not os.path.isfile(cfg.plot):
                raise UserError(f"--plot {cfg.plot}: no such log file")
            is_124m = asdict(model_config(cfg)) == asdict(GPTConfig())
            plot_curves(cfg.plot, out, reference_124m=is_124m)
            print(f"wrote {out}")
            return
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
