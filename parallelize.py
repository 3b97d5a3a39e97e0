"""
How train_gpt.py's GPT is spread over ranks, beside the model (as torchtitan keeps parallelize.py):
FSDP2 sharding of weights, gradients and optimizer state, and whole weights gathered on every rank
for a while (evaluation, sampling). It works on the model's modules; it never imports train_gpt.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def shard_model(model: nn.Module, compute_dtype: torch.dtype, device_type: str) -> None:
    """FSDP2, in place: each block is one group of sharded weights and the root (embeddings, whose
    wte is also lm_head, and ln_f) another. On CUDA, weights and compute in compute_dtype with
    float32 gradient reduction replace autocast; on CPU it stays float32."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if device_type == "cuda" else None
    kwargs = {"mp_policy": mp} if mp else {}
    blocks = list(model.transformer.h)
    for block in blocks:
        fully_shard(block, reshard_after_forward=True, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    # Backward prefetch stated outright: each block gathers the one before it, as FSDP2 would infer
    # for a plain stack. Left to infer, FSDP2 reads the order of the latest forward calls, and rank
    # 0's sampling alone would make the ranks issue different all-gathers (gloo aborts with
    # "collective mismatch"). Block 0 names the root, whole until backward ends: a no-op.
    model.set_modules_to_backward_prefetch(blocks[-1:])
    for i, block in enumerate(blocks):
        block.set_modules_to_backward_prefetch([blocks[i - 1] if i > 0 else model])


@contextmanager
def gathered(model: nn.Module, enabled: bool = True) -> Iterator[None]:
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


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards this model (its gradients then sync through FSDP, not DDP)."""
    return isinstance(model, FSDPModule)
