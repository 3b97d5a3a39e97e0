"""
The chunked loss's elementwise work, fused by torch.compile: train_gpt.py's ChunkedLinearCrossEntropy
computes each chunk's logits with one matmul, then (in eager code) a max, a subtraction, an exp, a
sum, a log, a gather and a scatter, each a pass over the chunk's rows x V values: memory traffic, not
arithmetic. Here those passes are one compiled program that reads the chunk for the row max and the
sum of exponentials and writes softmax - onehot over it in place, in the matmul's own dtype (under
bf16 autocast no float32 copy of the chunk exists), plus one that adds a chunk's bf16 d(weight)
into the float32 total in a single pass.

Compiled once per process and (device, dtype), checked against the eager body on an example chunk,
with dynamic shapes so the shorter last chunk does not recompile; where compiling fails (no C++
compiler, an unsupported platform, a backend error) one start-up line says so and the eager body
runs. On a CPU in float32 it is not used: measured there it gains nothing (README, Speed), and the
float32 path stays bit for bit what it was. It never imports train_gpt.py.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch


class ChunkKernels(NamedTuple):
    softmax_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> nll, in place
    accumulate: Callable[[torch.Tensor, torch.Tensor], None]  # total += part, upcast in registers
    compile_s: float  # the cold compile, paid once at start-up


def softmax_grad(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (r, V) become softmax - onehot(targets), in place; returns the rows' nll (r,) in float32.
    Float32 math whatever the buffer's dtype; exp(z - logsumexp) is recomputed in the last pass, so
    inductor materialises nothing of (r, V)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    top = z.amax(dim=1, keepdim=True)
    lse = top + torch.exp(z - top).sum(dim=1, keepdim=True).log()
    nll = (lse - z.gather(1, targets[:, None])).squeeze(1)
    hit = torch.arange(z.size(1), device=z.device)[None, :] == targets[:, None]
    p = torch.exp(z - lse)
    logits.copy_(torch.where(hit, p - 1, p))
    return nll


def accumulate(total: torch.Tensor, part: torch.Tensor) -> None:
    """total += part in one pass (eager would allocate an upcast copy of part, V x C, page faults and all)."""
    total.copy_(total + part.to(total.dtype))


def used_for(device_type: str, dtype: torch.dtype) -> bool:
    """Where fusing pays: CUDA, and CPU bf16/fp16 autocast (measured); not CPU float32, nor float64 (exact tests)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return device_type == "cuda" or (device_type == "cpu" and dtype != torch.float32)


def chunk_kernels(device_type: str, dtype: torch.dtype) -> ChunkKernels | None:
    """The compiled kernels for chunks of logits in dtype on device_type, or None: the eager body."""
    return compiled_kernels(device_type, dtype) if used_for(device_type, dtype) else None


@functools.cache  # once per process and (device, dtype): the cache is this function's alone
def compiled_kernels(device_type: str, dtype: torch.dtype) -> ChunkKernels | None:
    t0 = time.perf_counter()
    try:
        if sys.platform == "win32" and device_type == "cpu":
            raise RuntimeError("inductor's CPU backend needs a C++ toolchain that is not set up on Windows")
        kernels = ChunkKernels(
            torch.compile(softmax_grad, dynamic=True, fullgraph=True),
            torch.compile(accumulate, dynamic=True, fullgraph=True),
            0.0,
        )
        check_against_eager(kernels, device_type, dtype)
    except Exception as e:  # no C++ compiler, a backend that cannot build, or results that differ
        why = " ".join(str(e).split())[:160] or type(e).__name__
        say(f"loss: torch.compile unavailable for the fused loss ({type(e).__name__}: {why}); eager chunk body")
        return None
    kernels = kernels._replace(compile_s=time.perf_counter() - t0)
    say(
        f"loss: fused chunk kernels compiled for {device_type} {str(dtype).removeprefix('torch.')} in {kernels.compile_s:.1f}s"
    )
    return kernels


def check_against_eager(kernels: ChunkKernels, device_type: str, dtype: torch.dtype) -> None:
    """The compiled kernels on an example chunk (and a shorter one: no recompile wanted) against eager."""
    gen = torch.Generator(device=device_type).manual_seed(0)
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        for rows in (64, 37):
            logits = (torch.randn(rows, 1000, device=device_type, generator=gen) * 3).to(dtype)
            targets = torch.randint(0, 1000, (rows,), device=device_type, generator=gen)
            want = torch.softmax(logits.float(), dim=1)
            want_nll = torch.logsumexp(logits.float(), dim=1) - logits.float().gather(1, targets[:, None]).squeeze(1)
            want[torch.arange(rows), targets] -= 1
            nll = kernels.softmax_grad(logits, targets)
            total = torch.zeros(rows, 8, device=device_type)
            kernels.accumulate(total, logits[:, :8])
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            if not (
                torch.allclose(nll, want_nll, rtol=tol, atol=tol)
                and torch.allclose(logits.float(), want, atol=tol)
                and torch.equal(total, logits[:, :8].float())
            ):
                raise RuntimeError("the compiled chunk body disagrees with the eager one")


def say(line: str) -> None:
    """A start-up line, from the first process of a torchrun job only."""
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)
