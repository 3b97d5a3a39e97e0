"""What --dtype auto picks, on the hardware it cannot see here: CUDA GPUs with and without native bf16
(their capability monkeypatched), CPUs with and without native bf16 matrix instructions, and the
matmul probe that benchmark mode measures a CPU's peak with."""

import pytest
import torch

import benchmark
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
    gflops = benchmark.measured_matmul_gflops(torch.float32, seconds=0.05)
    assert 0.1 < gflops < 1e5  # GFLOP/s of a real CPU, neither zero nor a unit mistake
