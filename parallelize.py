"""
How train_gpt.py's GPT is spread over ranks, beside the model (as torchtitan keeps parallelize.py):
tensor parallelism over a "tp" mesh dimension (DTensor: each block's heads and MLP units split),
FSDP2 sharding (or plain replication) over the "dp" dimension, whole weights gathered for a while
(evaluation, sampling), and the gradient norm and clipping over a mix of plain and DTensor
gradients. Only torch.distributed's own APIs: no hand-written collective. It works on the model's
modules; it never imports train_gpt.py.

What --tp splits, over the tp ranks of each data-parallel group:

    attn.c_attn  (C -> 3C)   weight by heads of q, of k and of v (_StridedShard(0, split_factor=3));
                             bias (3C floats) replicated
    attn.c_proj  (C -> C)    by rows (its input is this rank's heads); output all-reduced
    mlp.c_fc     (C -> 4C)   by columns: this rank's 4C/tp hidden units
    mlp.c_proj   (4C -> C)   by rows; output all-reduced
    wte = lm_head, wpe, ln_* replicated, so the chunked loss runs as it is (README, Tensor parallelism)
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import ReplicateModule, replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from cli import UserError

# c_attn's rows are q | k | v: cut in 3 first, then each third sharded, so rank r holds [q_r; k_r; v_r]
# (whole heads of each). The DTensor's global tensor is the unsplit weight: state-dict keys, shapes and
# full state dicts stay the 1-process ones. (_StridedShard is torch's own placement for this, used by
# FSDP2 and torchtitan, but its name is private: tests/test_tp.py holds it to what we need.)
QKV_ROWS = _StridedShard(0, split_factor=3)


def check_tensor_parallel(tp: int, optimizer: str, dtype: str) -> None:
    """--tp's refusals that need no model: a torchrun job it divides, and what cannot run on split matrices."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if "RANK" not in os.environ:
        raise UserError(f"--tp {tp} splits the model over the processes of a torchrun job; launch with torchrun")
    if world % tp:
        raise UserError(f"--tp {tp} does not divide the {world} processes; use a divisor of {world}")
    if optimizer == "muon":
        raise UserError("--optimizer muon needs whole matrices, which --tp splits; use adamw, or drop --tp")
    if dtype == "float16":
        raise UserError("--tp trains in bfloat16 or float32; float16 would need a GradScaler over DTensors")


def check_heads_split(n_head: int, tp: int) -> None:
    """Each tensor-parallel rank holds whole heads, and so an equal share of the MLP's 4 * n_embd hidden units
    (4 * n_head * head size: a tp that divides the heads divides them too)."""
    if n_head % tp:
        raise UserError(f"--tp {tp} does not divide the model's {n_head} heads; use a divisor of {n_head}")


class QKVColwiseParallel(ColwiseParallel):
    """ColwiseParallel for the fused q|k|v Linear, split by heads of each of q, k and v: plain Shard(0)
    would give rank 0 of two all of q and half of k. DTensor carries the strided placement through
    F.linear with no communication, to a local output [q_r | k_r | v_r] (B, T, 3C/tp) that the model
    chunks in 3. The bias stays replicated: FSDP2 over dp cuts a local tensor on dim 0, and a strided
    1-D bias cut again has no placement DTensor can describe (its full state dict came out permuted)."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for pname, param in module.named_parameters():
            placement = QKV_ROWS if pname == "weight" else Replicate()
            dist_param = nn.Parameter(
                distribute_tensor(param, device_mesh, [placement], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad,
            )
            module.register_parameter(pname, dist_param)
            if placement == Replicate():  # its gradient arrives strided, like the output: make it whole
                dist_param.register_hook(lambda g: g.redistribute(placements=[Replicate()]))

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        # the stock hook would redistribute the strided output to Shard(-1): an all-to-all into the
        # wrong layout. The local [q_r | k_r | v_r] is what the attention wants.
        return outputs.to_local() if use_local_output else outputs


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split each block over tp_mesh, in place (the table above). The layer norms, dropout and residual
    adds then run replicated on the whole (B, T, C) activations (no sequence parallelism: for GPT-2
    sizes its memory saving is small next to the attention and MLP activations)."""
    for block in model.transformer.h:
        plan = {
            "attn.c_attn": QKVColwiseParallel(),
            "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(),
        }
        parallelize_module(block, tp_mesh, plan)


def _fsdp_shard_dim(param: nn.Parameter) -> Shard | None:
    """FSDP2's shard dim: its default dim 0, except c_attn's strided weight, cut on dim 1 (its inputs),
    so FSDP's and TP's cuts are on different dims, which DTensor composes exactly."""
    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) for p in param.placements):
        return Shard(1)
    return None


def shard_model(
    model: nn.Module, compute_dtype: torch.dtype, device_type: str, dp_mesh: DeviceMesh | None = None
) -> None:
    """FSDP2, in place, over dp_mesh (None: all ranks): each block is one group of sharded weights and
    the root (embeddings, whose wte is also lm_head, and ln_f) another. On CUDA, weights and compute in
    compute_dtype with float32 gradient reduction replace autocast; on CPU it stays float32."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if device_type == "cuda" else None
    kwargs = {"mp_policy": mp} if mp else {}
    if dp_mesh is not None:
        kwargs["mesh"] = dp_mesh
    blocks = list(model.transformer.h)
    for block in blocks:
        fully_shard(block, reshard_after_forward=True, shard_placement_fn=_fsdp_shard_dim, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    # Backward prefetch stated outright: each block gathers the one before it, as FSDP2 would infer
    # for a plain stack. Left to infer, FSDP2 reads the order of the latest forward calls, and rank
    # 0's sampling alone would make the ranks issue different all-gathers (gloo aborts with
    # "collective mismatch"). Block 0 names the root, whole until backward ends: a no-op.
    model.set_modules_to_backward_prefetch(blocks[-1:])
    for i, block in enumerate(blocks):
        block.set_modules_to_backward_prefetch([blocks[i - 1] if i > 0 else model])


def replicate_model(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Plain data parallelism over dp_mesh for a tensor-parallel model: FSDP2's replicate(), per block
    and root. (DistributedDataParallel refuses DTensor parameters, and its documented workaround turns
    them into local tensors for good, so a full state dict would save the shards.)"""
    for block in model.transformer.h:
        replicate(block, mesh=dp_mesh)
    replicate(model, mesh=dp_mesh)


@contextmanager
def gathered(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Under FSDP, every weight gathered on every rank for a while (evaluation, sampling), so forward
    passes need no collectives over dp and rank 0 can sample alone; a no-op for other models. All
    ranks must enter it together: gathering is a collective."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule) and not isinstance(m, ReplicateModule)]
    groups = sharded if enabled else []  # replicate_model's modules hold whole weights already
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # as shard_model() set them


def syncs_through_fsdp(model: nn.Module) -> bool:
    """Whether FSDP2 (shard_model or replicate_model) reduces this model's gradients, not DDP."""
    return isinstance(model, FSDPModule)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of the whole gradient, a plain 0-d tensor equal on every rank, for plain gradients
    (replicated parameters: every rank holds the same whole gradient, counted once) and DTensor ones
    (sharded by FSDP, TP or both). get_total_norm refuses a list that mixes them, or DTensors of two
    meshes, so: one norm per layout, each made whole over its mesh, then the norm of those."""
    groups: dict = defaultdict(list)
    for g in grads:
        groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) == 1:
        return norms[0]  # one kind (no TP): exactly torch's own norm
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_grads_with_norm_(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """torch.nn.utils.clip_grads_with_norm_, once per mesh of gradients (it refuses a mix in one call)."""
    groups: dict = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)


def split_plain_and_dtensor(groups: list[dict]) -> list[dict]:
    """Optimizer param groups with plain and DTensor parameters apart (each group's other settings
    kept): fused AdamW refuses a group that mixes them, as TP's replicated embeddings and norms do."""
    out = []
    for group in groups:
        for want in (False, True):
            params = [p for p in group["params"] if isinstance(p, DTensor) == want]
            if params:
                out.append({**group, "params": params})
    return out
