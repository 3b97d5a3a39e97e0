"""
Benchmark mode of train_gpt.py (--benchmark-steps) and what speed needs to know of the hardware:
time the real training step on a fixed synthetic batch, then report tokens/s, ms/step, peak memory
and MFU against the device's peak (a datasheet figure for known GPUs, else a matmul peak measured on
this CPU); whether this CPU multiplies bf16 natively (what --dtype auto picks on a CPU); and huge pages
for large CPU tensors, which train_gpt.py asks for first thing. It works on callables and plain values;
it never imports train_gpt.py.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

DATASHEET_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0))  # bf16 dense


def synthetic_batches(batch_size: int, seq_len: int, vocab: int, seed: int) -> Callable[[], tuple]:
    """One fixed random batch (x, y), so the timing is the model's, not the disk's."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen)
    return lambda: (fixed[:, :-1], fixed[:, 1:])


def time_steps(one_step: Callable[[int], float], warmup: int, steps: int) -> list[float]:
    """Run warmup + steps optimisation steps (one_step(step) returns its seconds); the seconds of the
    timed ones, those after the warmup."""
    times = [one_step(step) for step in range(warmup + steps)]
    return times[warmup:]


def model_flops_per_token(model: Any, seq_len: int) -> int:
    """Training FLOPs per token of a GPT, as nanoGPT counts them: 6 per weight (forward and backward;
    wpe is a lookup, not a matmul) plus attention's 12 * n_layer * n_embd * T."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len


def peak_flops(device: str, dtype: torch.dtype, override_tflops: float | None) -> tuple[float, str] | None:
    """Assumed dense peak of the device for MFU, with a label saying what was assumed; None where unknown."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s ({key} bf16 dense)"
    return None


def mfu_rate(model: Any, seq_len: int, rt: Any, peak_tflops: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs per token / the peak of the job's devices, so that MFU = this * the job's tokens/s; None
    where the peak is unknown (the training loop's mfu stream)."""
    peak = peak_flops(rt.device, rt.dtype, peak_tflops)
    return None if peak is None else model_flops_per_token(model, seq_len) / (peak[0] * n_devices)


def measured_matmul_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, reps: int = 10) -> float:
    """This device's dense matmul throughput in dtype, measured: the fastest of `reps` n x n matmuls after
    a warm-up. One fixed size, so every run measures the same thing; the fastest, since a busy host only
    ever slows a matmul down (a mean over a moment of load read a third of the quiet figure)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a, b = torch.randn(2, n, n, device=device, dtype=dtype).unbind(0)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warmup: kernel choice, first touch of out
    sync()
    fastest = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        fastest = min(fastest, time.perf_counter() - t0)
    return 2 * n**3 / fastest / 1e9


def report_benchmark(model: Any, cfg: Any, rt: Any, times: list[float], start_up_s: float, n_devices: int = 1) -> None:
    """tokens/s, ms/step, peak memory and MFU of the timed steps (those after the warmup), and the start-up:
    the seconds before the first timed step (model, torch.compile, the warmup steps)."""
    if not times:
        print("benchmark: no timed steps")
        return
    step_s = sum(times) / len(times)
    tok_s = cfg.total_batch_size / step_s
    achieved = model_flops_per_token(model, cfg.seq_len) * tok_s / n_devices  # per device, as the peak
    if rt.device_type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(rt.device) / 2**30:.2f} GiB allocated"
    else:
        import resource

        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max RSS"
    peak = peak_flops(rt.device, rt.dtype, cfg.peak_tflops)
    if peak is None and rt.device == "cpu":  # no datasheet figure: this machine's own matmul peak
        gflops = measured_matmul_gflops(rt.dtype)
        peak = gflops * 1e9, f"{gflops:.0f} GFLOP/s, a measured {rt.dtype_name} matmul peak of this CPU"
    mfu = f"{achieved / 1e9:.1f} GFLOP/s achieved" + (
        f", MFU {100 * achieved / peak[0]:.1f}% of {peak[1]}" if peak else ""
    )
    print(
        f"benchmark: {len(times)} steps after {cfg.benchmark_warmup} warmup | dtype {rt.dtype_name} | "
        f"{tok_s:,.0f} tok/s | {1000 * step_s:.1f} ms/step | peak memory {memory} | {mfu} | start-up {start_up_s:.1f} s"
    )


def use_huge_pages_for_large_cpu_tensors() -> None:
    """Ask torch to put CPU tensors of 2 MiB and more on transparent huge pages (THP_MEM_ALLOC_ENABLE, read
    by torch's CPU allocator at its first allocation, so this must run before any tensor exists). Without
    it every fresh large tensor (the tied embedding's V x C gradients, the loss's buffers) is mapped in
    4 KiB pages, each faulted in on first touch: measured 34 ms to zero a fresh 50304 x 256 float32
    gradient inside a training step, 3.6 ms with huge pages (README, Speed). A value the user set is kept."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


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
