"""The fused chunked loss (fused_loss.py, used by ChunkedLinearCrossEntropy under bf16 autocast on a CPU and on
CUDA): the same loss and gradients as the plain full-logits F.cross_entropy path to float noise, with ignored
targets, a shorter last chunk and an all-ignored batch; compiled once (no recompile per chunk shape); in place
(nothing of rows x V allocated); and, where compiling fails, one start-up line and the eager body's results."""

import pytest
import torch
import torch.nn.functional as F

import fused_loss
import train_gpt
from train_gpt import IGNORE_INDEX, cross_entropy

N, C, V, CHUNK = 37, 16, 203, 8  # 37 rows in chunks of 8: the last chunk has 5


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, requires_grad=True)
    w = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = IGNORE_INDEX
    return x, w, t


def loss_and_grads(x, w, t, chunk):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(x, w, t, chunk)
    return (loss, *torch.autograd.grad(loss, (x, w)))


def plain_reference(x, w, t):
    """The plain path written out under the same autocast: full logits, F.cross_entropy over the valid count."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (x @ w.t()).float()
        loss = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum") / (t != IGNORE_INDEX).sum()
    return (loss, *torch.autograd.grad(loss, (x, w)))


def forget_compiled() -> None:
    """Drop the compiled kernels, and dynamo's code caches with them: each compile of the same functions counts
    towards dynamo's recompile limit of the process, which these tests would otherwise reach."""
    fused_loss.compiled_kernels.cache_clear()
    torch._dynamo.reset()


def test_the_fused_kernels_are_what_runs_here():
    """This machine has a C++ compiler: the compiled path is the one under test, not the fallback; float32 on a
    CPU keeps the eager body (no gain measured there)."""
    assert fused_loss.chunk_kernels("cpu", torch.bfloat16) is not None
    assert fused_loss.chunk_kernels("cpu", torch.float32) is None and not fused_loss.used_for("cpu", torch.float64)


@pytest.mark.parametrize("chunk", [CHUNK, 1, 1024])  # a short last chunk; one row at a time; one chunk
def test_fused_equals_plain_under_bf16_autocast(chunk):
    x, w, t = inputs()
    loss, gx, gw = loss_and_grads(x, w, t, chunk)
    ref_loss, ref_gx, ref_gw = plain_reference(x, w, t)
    assert gx.dtype == gw.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < 1e-3  # both round the same bf16 logits
    assert (gx - ref_gx).abs().max() < 1e-2 * ref_gx.abs().max()
    assert (gw - ref_gw).abs().max() < 1e-2 * ref_gw.abs().max()


def test_all_ignored_is_zero_with_zero_grads():
    x, w, t = inputs()
    t[:] = IGNORE_INDEX
    loss, gx, gw = loss_and_grads(x, w, t, CHUNK)
    assert loss.item() == 0.0 and not gx.any() and not gw.any()


def test_the_kernel_writes_softmax_minus_onehot_in_place():
    kernels = fused_loss.chunk_kernels("cpu", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for rows in (8, 5):
        logits = (torch.randn(rows, V, generator=g) * 3).bfloat16()
        t = torch.randint(0, V, (rows,), generator=g)
        want = torch.softmax(logits.float(), dim=1)
        want_nll = -torch.log_softmax(logits.float(), dim=1).gather(1, t[:, None]).squeeze(1)
        want[torch.arange(rows), t] -= 1
        ptr = logits.data_ptr()
        nll = kernels.softmax_grad(logits, t)
        assert logits.data_ptr() == ptr and logits.dtype == torch.bfloat16  # in place, in the matmul dtype
        torch.testing.assert_close(nll, want_nll, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits.float(), want, rtol=0, atol=1e-2)


def test_compiled_once_for_every_chunk_shape():
    """Dynamic shapes: other chunk sizes and short last chunks reuse the kernels (no new graph is compiled)."""
    import torch._dynamo.utils as dynamo_utils

    fused_loss.chunk_kernels("cpu", torch.bfloat16)
    dynamo_utils.counters.clear()
    x, w, t = inputs()
    for chunk in (CHUNK, 3, 11):
        loss_and_grads(x, w, t, chunk)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 0


def test_a_failed_compile_is_one_line_and_the_eager_body(monkeypatch, capsys):
    """No C++ compiler (torch.compile failing, as inductor does then): one start-up line, then the eager passes,
    with the fused path's results to float noise."""
    x, w, t = inputs()
    fused = loss_and_grads(x, w, t, CHUNK)
    forget_compiled()

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    try:
        assert fused_loss.chunk_kernels("cpu", torch.bfloat16) is None
        assert capsys.readouterr().out == (
            "loss: torch.compile unavailable for the fused loss (RuntimeError: InvalidCxxCompiler: No working C++ "
            "compiler found); eager chunk body\n"
        )
        eager = loss_and_grads(x, w, t, CHUNK)
        assert abs(eager[0].item() - fused[0].item()) < 1e-3
        for a, b in zip(eager[1:], fused[1:]):
            assert (a - b).abs().max() < 1e-2 * b.abs().max()
    finally:
        forget_compiled()  # the next test compiles again


def test_the_start_up_line_comes_from_setup(capsys, monkeypatch):
    forget_compiled()
    cfg, _ = train_gpt.parse_args(["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
                                   "--batch-size", "2", "--total-batch-size", "32", "--device", "cpu", "--dtype", "bfloat16"])  # fmt: skip
    precision = torch.get_float32_matmul_precision()
    try:
        with torch.random.fork_rng(devices=[]):  # setup_training seeds the global RNG
            train_gpt.setup_training(cfg, train_gpt.World(), train_gpt.runtime("cpu", "bfloat16"), None)
    finally:
        torch.set_float32_matmul_precision(precision)  # setup_training sets "high" for the whole process
    out = capsys.readouterr().out
    assert out.startswith("loss: fused chunk kernels compiled for cpu bfloat16 in "), out
