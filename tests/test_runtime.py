"""What --dtype auto picks, on the hardware it cannot see here: CUDA GPUs with and without native bf16
(their capability monkeypatched), CPUs with and without native bf16 matrix instructions, and the
matmul probe that benchmark mode measures a CPU's peak with."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import benchmark
import parallelize
import train_gpt
from train_gpt import runtime


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device whose bf16 is native (Ampere on) or only emulated (V100, T4: is_bf16_supported()
    says True unless asked to exclude emulation). Records how it was asked."""
    calls = []

    def set_native(native: bool) -> None:
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            calls.append(including_emulation)
            return native or including_emulation

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)

    return set_native, calls


def test_cuda_with_native_bf16_gets_bf16(fake_cuda):
    set_native, calls = fake_cuda
    set_native(True)
    assert runtime("auto", "auto") == train_gpt.Runtime("cuda:0", torch.bfloat16)
    assert runtime("cuda", "auto", local_rank=3).device == "cuda:3"
    assert calls and not any(calls)  # always asked without emulation


def test_cuda_with_emulated_bf16_gets_fp16_and_a_grad_scaler(fake_cuda):
    set_native, calls = fake_cuda
    set_native(False)
    rt = runtime("auto", "auto")
    assert rt == train_gpt.Runtime("cuda:0", torch.float16)
    assert calls == [False]
    assert torch.cuda.is_bf16_supported()  # the default question would have said yes: the trap avoided
    assert runtime("auto", "bfloat16").dtype == torch.bfloat16  # an explicit choice is kept


@pytest.mark.parametrize(
    "capabilities, env, mkldnn, expected",
    [
        ({"avx512_bf16": True}, {}, True, torch.bfloat16),
        ({"amx_bf16": True}, {}, True, torch.bfloat16),
        ({"avx512f": True, "avx2": True}, {}, True, torch.float32),  # AVX-512 without BF16
        ({"avx2": True}, {}, True, torch.float32),
        ({"avx512_bf16": True}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, True, torch.float32),  # oneDNN capped
        ({"avx512_bf16": True}, {"DNNL_MAX_CPU_ISA": "avx2"}, True, torch.float32),
        ({"avx512_bf16": True}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True, torch.bfloat16),
        ({"avx512_bf16": True}, {}, False, torch.float32),  # oneDNN switched off
    ],
)
def test_cpu_auto_dtype_is_bf16_only_with_native_bf16(capabilities, env, mkldnn, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", mkldnn)
    assert runtime("auto", "auto") == train_gpt.Runtime("cpu", expected)
    assert runtime("cpu", "float32").dtype == torch.float32  # an explicit choice is kept


def test_runtime_autocast_is_off_in_float32_and_on_otherwise():
    with train_gpt.Runtime("cpu", torch.float32).autocast():
        assert not torch.is_autocast_enabled("cpu")
    with train_gpt.Runtime("cpu", torch.bfloat16).autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_matmul_probe_measures_a_plausible_rate():
    gflops = benchmark.measured_matmul_gflops(torch.float32, n=256, reps=3)
    assert 0.1 < gflops < 1e5  # GFLOP/s of a real CPU, neither zero nor a unit mistake


def test_fsdp_on_cuda_keeps_bf16_as_the_compute_dtype(monkeypatch, capsys):
    """Under --fsdp on CUDA, FSDP's mixed precision casts the weights, so autocast is off; but the run still
    computes in bf16: the start-up line says so, the MFU stream has a peak, and the benchmark reports MFU.
    (On main before the fix the runtime became float32: `dtype float32`, no mfu, no benchmark MFU.)"""
    shards = []
    monkeypatch.setattr(
        parallelize, "shard_model", lambda model, dtype, device_type, mesh: shards.append((dtype, device_type))
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "2"]
    cfg, _ = train_gpt.parse_args([*tiny, "--total-batch-size", "32", "--fsdp", "--benchmark-steps", "1"])
    real_build = train_gpt.build_model

    def build_on_cpu(cfg, resumed):  # a CUDA model that stays on the CPU
        model = real_build(cfg, resumed)
        model.to = lambda *args, **kwargs: model
        return model

    monkeypatch.setattr(train_gpt, "build_model", build_on_cpu)
    cuda = train_gpt.Runtime("cuda:0", torch.bfloat16)
    precision = torch.get_float32_matmul_precision()
    with torch.random.fork_rng(devices=[]):  # setup_training seeds the global RNG
        t = train_gpt.setup_training(cfg, train_gpt.World(), cuda, None)
    torch.set_float32_matmul_precision(precision)  # setup_training sets "high" for the whole process
    assert shards == [(torch.bfloat16, "cuda")]  # FSDP's param dtype is the compute dtype
    assert t.rt == train_gpt.Runtime("cuda:0", torch.bfloat16, use_autocast=False)
    with t.rt.autocast():
        assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")
    assert "| device cuda:0 | dtype bfloat16 | world 1 |" in capsys.readouterr().out
    rate = benchmark.mfu_rate(t.raw_model, cfg.seq_len, t.rt, cfg.peak_tflops)
    assert rate == benchmark.model_flops_per_token(t.raw_model, 16) / 989e12
    benchmark.report_benchmark(t.raw_model, cfg, t.rt, [0.5], 12.25)
    line = capsys.readouterr().out.strip()
    assert line.startswith("benchmark: 1 steps after 3 warmup | dtype bfloat16 | 64 tok/s | 500.0 ms/step")
    assert line.endswith("| peak memory 3.00 GiB allocated | " + f"{rate * 64 * 989e3:.1f} GFLOP/s achieved, "
                         f"MFU {100 * rate * 64:.1f}% of 989 TFLOP/s (H100 bf16 dense) | start-up 12.2 s")  # fmt: skip


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kib_of_a_fresh_tensor(before: str) -> int:
    """In a fresh process: run `before`, then allocate and touch a 64 MiB float32 tensor and return the
    process's AnonHugePages (KiB) while it is alive, read from /proc/self/smaps_rollup."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{before}\nimport torch\n"
        "t = torch.ones(16 * 2**20)\n"
        "rollup = open('/proc/self/smaps_rollup').read()\n"
        "print(next(int(l.split()[1]) for l in rollup.splitlines() if l.startswith('AnonHugePages:')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
    reason="needs Linux transparent huge pages in madvise mode (the usual default), where only asking helps",
)
def test_large_cpu_tensors_get_huge_pages_when_train_gpt_asks_first():
    """train_gpt.main() asks for huge pages before anything is allocated, and importing train_gpt (with
    everything it imports) allocates nothing first, or torch would have read the setting already."""
    plain = huge_kib_of_a_fresh_tensor("import train_gpt")
    asked = huge_kib_of_a_fresh_tensor("import train_gpt, benchmark\nbenchmark.use_huge_pages_for_large_cpu_tensors()")
    assert plain < 4096  # in madvise mode nothing asked for huge pages
    assert asked >= 32 * 1024  # most of the 64 MiB tensor sits on 2 MiB pages


def test_train_gpt_main_asks_for_huge_pages_before_its_first_tensor(monkeypatch):
    """main() sets THP_MEM_ALLOC_ENABLE before it parses a flag (a user's own value is kept)."""
    seen = []
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setattr(
        train_gpt, "parse_args", lambda argv: seen.append(os.environ.get("THP_MEM_ALLOC_ENABLE")) or sys.exit(0)
    )
    with pytest.raises(SystemExit):
        train_gpt.main([])
    assert seen == ["1"]
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    seen.clear()
    with pytest.raises(SystemExit):
        train_gpt.main([])
    assert seen == ["0"]
