"""scripts/measure.py: the benchmark-line parser, the micro-batch search, the whole flow on a fake CUDA
trainer (out-of-memory, budget, timeouts; no GPU needed), and a real run on the CPU (marked slow)."""

import importlib.util
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from conftest import ROOT, run_script

spec = importlib.util.spec_from_file_location("measure", ROOT / "scripts" / "measure.py")
measure = importlib.util.module_from_spec(spec)
sys.modules["measure"] = measure  # dataclasses look their module up
spec.loader.exec_module(measure)

# captured from `python train_gpt.py --device cpu --n-layer 2 --n-head 2 --n-embd 64 --batch-size 2
# --seq-len 64 --total-batch-size 128 --benchmark-steps 2 --benchmark-warmup 1` on this repo's CI machine
REAL_CPU_LINE = (
    "benchmark: 2 steps after 1 warmup | dtype bfloat16 | 975 tok/s | 131.2 ms/step | peak memory 0.53 GiB max RSS | "
    "19.5 GFLOP/s achieved, MFU 5.2% of 377 GFLOP/s, a measured bfloat16 matmul peak of this CPU"
)
# report_benchmark()'s CUDA form (its f-string with an H200's values; not captured on a GPU)
CUDA_LINE = (
    "benchmark: 10 steps after 3 warmup | dtype bfloat16 | 612,345 tok/s | 107.0 ms/step | "
    "peak memory 31.20 GiB allocated | 455123.4 GFLOP/s achieved, MFU 46.0% of 989 TFLOP/s (H200 bf16 dense)"
)


def test_parses_a_real_cpu_benchmark_line():
    b = measure.parse_benchmark_line(REAL_CPU_LINE)
    assert (b.dtype, b.tok_s, b.ms_step, b.memory, b.mfu) == ("bfloat16", 975.0, 131.2, "0.53 GiB", 5.2)
    assert b.peak == "377 GFLOP/s, a measured bfloat16 matmul peak of this CPU"
    assert b.startup_s is None and b.line == REAL_CPU_LINE


def test_parses_the_start_up_field_and_ignores_fields_it_does_not_know():
    b = measure.parse_benchmark_line(CUDA_LINE + " | start-up 12.3 s | compile 40.1 s | 7 ms/token")
    assert (b.tok_s, b.ms_step, b.memory, b.mfu) == (612345.0, 107.0, "31.20 GiB", 46.0)
    assert b.peak == "989 TFLOP/s (H200 bf16 dense)"
    assert b.startup_s == 12.3  # not the compile field's 40.1, and ms/step not the ms/token field's 7
    moved = "benchmark: start-up 3.5 s | 1,000 tok/s | dtype float32 | 2.0 ms/step"  # any order
    assert measure.parse_benchmark_line(moved) == measure.Bench(moved, 1000.0, 2.0, "float32", startup_s=3.5)


def test_parser_without_a_known_peak_and_lines_that_are_no_result():
    b = measure.parse_benchmark_line(CUDA_LINE.split(", MFU")[0])  # a GPU the trainer has no datasheet for
    assert (b.mfu, b.peak) == (None, None)
    assert measure.parse_benchmark_line("benchmark: no timed steps") is None
    assert measure.parse_benchmark_line("step     2 | loss: 10.8 | tok/sec: 813.03") is None
    stdout = f"model: 3,385,088 params {{'n_layer': 2}}\n{REAL_CPU_LINE}\nbenchmark: no timed steps\n"
    assert measure.find_benchmark(stdout).tok_s == 975.0


def probes_of(limit: int, fail_at: int | None = None):
    """A probe that fits up to `limit` sequences (out of memory above), failing otherwise at `fail_at`."""
    tried = []

    def probe(b: int) -> "measure.Outcome":
        tried.append(b)
        if b == fail_at:
            return measure.Outcome("failed", [], note="failed (exit 1: boom)")
        if b > limit:
            return measure.Outcome("oom", [], note="out of memory")
        return measure.Outcome("ok", [], bench=measure.parse_benchmark_line(CUDA_LINE))

    return probe, tried


@pytest.mark.parametrize(
    "total, start, limit, largest, smallest_fail, tried",
    [
        (512, 64, 128, 128, 256, [64, 128, 256]),  # the recipe on an H200-sized GPU: double until it breaks
        (512, 64, 1000, 512, None, [64, 128, 256, 512]),  # everything fits: stop at the whole batch
        (512, 64, 20, 16, 32, [64, 32, 16]),  # a small GPU: halve until one fits
        (512, 64, 0, None, 1, [64, 32, 16, 8, 4, 2, 1]),  # nothing fits
        (384, 64, 100, 96, 128, [64, 128, 96]),  # 384 = 3 * 128 sequences: bisection finds 96
    ],
)
def test_micro_batch_search(total, start, limit, largest, smallest_fail, tried):
    probe, seen = probes_of(limit)
    s = measure.search_batch(measure.batch_candidates(total * 1024, 1024), start, probe, {})
    assert (s.largest_fit, s.smallest_fail, seen, s.stopped) == (largest, smallest_fail, tried, "")


def test_micro_batch_search_stops_at_a_probe_that_neither_fits_nor_runs_out_of_memory():
    probe, seen = probes_of(1000, fail_at=256)
    s = measure.search_batch(measure.batch_candidates(512 * 1024, 1024), 64, probe, {})
    assert (s.largest_fit, s.smallest_fail, seen) == (128, None, [64, 128, 256])
    assert s.stopped == "B=256: failed (exit 1: boom)"


FAKE_TRAINER = """
import os, subprocess, sys, time
args = sys.argv[1:]
b, t = int(args[args.index("--batch-size") + 1]), int(args[args.index("--seq-len") + 1])
compiled = "--compile" in args
if compiled and "FAKE_WORKER_PIDS" in os.environ:  # a compile worker, as Inductor starts them
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.environ["FAKE_WORKER_PIDS"], "a") as f:
        print(worker.pid, file=f)
time.sleep(float(os.environ.get("FAKE_COMPILE_S" if compiled else "FAKE_EAGER_S", "0")))
if b * (4 if "--no-chunked-loss" in args else 1) > int(os.environ["FAKE_FIT"]):
    print("Traceback (most recent call last):", file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 12.28 GiB.", file=sys.stderr)
    sys.exit(1)
tok = 5000 * b * (2 if compiled else 1)
print("model: 124,475,904 params {'block_size': 1024, 'n_layer': 12, 'n_head': 12, 'n_embd': 768} | device cuda:0")
print(f"benchmark: 10 steps after 3 warmup | dtype bfloat16 | {tok:,.0f} tok/s | {1000 * b * t / tok:.1f} ms/step | "
      f"peak memory {0.5 * b:.2f} GiB allocated | {tok * 0.76:.1f} GFLOP/s achieved, MFU {tok * 0.76 / 9890:.1f}% "
      "of 989 TFLOP/s (H200 bf16 dense) | start-up 1.5 s")
"""
H200 = {"torch": "2.13.0+cu128", "cuda": True, "name": "NVIDIA H200", "memory_gib": 139.8, "cuda_version": "12.8"}


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    """measure.py on a 'GPU': the probe says H200, and the trainer is a script that fits FAKE_FIT sequences."""
    fake = tmp_path / "fake_train_gpt.py"
    fake.write_text(FAKE_TRAINER)
    monkeypatch.setattr(measure, "TRAINER", str(fake))
    monkeypatch.setattr(measure, "probe_torch", lambda: H200)
    monkeypatch.setenv("FAKE_FIT", "128")
    return tmp_path


HEADER = (
    "| model | loss | activation checkpointing | B | tok/s | ms/step | MFU | peak memory | start-up (s) | wall (s) |"
)


def table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split(" | ")]
        for line in text.splitlines()
        if line.startswith(("| eager", "| torch.compile"))
    ]


def test_fake_gpu_measures_all_rows_and_finds_the_largest_micro_batch(fake_cuda, capsys):
    out = fake_cuda / "m.md"
    measure.measure(["--out", str(out), "--trainer-args", "--dtype bfloat16 --seed 7"])
    text = out.read_text()
    assert capsys.readouterr().out == text
    assert "NVIDIA H200 (139.8 GiB)" in text and "torch 2.13.0+cu128, CUDA 12.8" in text
    assert HEADER in text
    rows = table_rows(text)
    assert [r[:4] for r in rows] == [[*c.cells(), "64"] for c in measure.CONFIGURATIONS]
    assert [r[4] for r in rows] == ["320,000", "out of memory", "640,000", "out of memory"] * 2
    assert rows[0][6:9] == ["24.6%", "32.00 GiB", "1.5"] and float(rows[0][9]) >= 0  # MFU, memory, start-up, wall
    assert "**B = 128** (B = 256: out of memory)" in text
    assert "then 4 micro-steps" in text and "--total-batch-size 65536" in text
    assert text.count("--dtype bfloat16 --seed 7") == 1 + 8 + 2  # the intro's command, the 8 rows', B=128 and 256
    # the search's runs, B=64 (the first row's run, reused) then 128 and 256
    assert "| 64 | 320,000 |" in text and "| 128 | 640,000 |" in text and "| 256 | out of memory |" in text


def test_fake_small_gpu_runs_the_rows_at_a_micro_batch_that_fits(fake_cuda, monkeypatch):
    monkeypatch.setenv("FAKE_FIT", "20")
    out = fake_cuda / "m.md"
    measure.measure(["--out", str(out)])
    rows = table_rows(out.read_text())
    assert {r[3] for r in rows} == {"16"}  # B=64 died of OOM, so every row ran at the largest B that fits
    assert rows[0][4] == "80,000" and rows[2][4] == "160,000"
    assert "**B = 16** (B = 32: out of memory)" in out.read_text()


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped yet is dead too
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_fake_gpu_budget_skips_rows_and_times_out_a_slow_one(fake_cuda, monkeypatch):
    monkeypatch.setenv("FAKE_COMPILE_S", "30")  # a compilation that never ends within the budget
    monkeypatch.setenv("FAKE_WORKER_PIDS", str(fake_cuda / "workers"))
    out = fake_cuda / "m.md"
    t0 = time.monotonic()
    measure.measure(["--out", str(out), "--budget-s", "4", "--min-run-s", "0.5"])
    assert time.monotonic() - t0 < 10
    text = out.read_text()
    rows = table_rows(text)
    # the eager rows and the micro-batch search run first, so a slow compilation costs only compiled rows
    assert [rows[i][4] for i in (0, 1, 4, 5)] == ["320,000", "out of memory"] * 2
    assert "**B = 128**" in text
    assert re.fullmatch(r"timed out after \d+ s \(budget\)", rows[2][4]), rows[2]
    assert rows[-1][4] == "skipped (budget)" and rows[-1][9] == "–"
    # the timed-out run's whole process group was killed: its compile worker too
    workers = [int(pid) for pid in (fake_cuda / "workers").read_text().split()]
    deadline = time.monotonic() + 5
    while not all(dead(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == 1 and all(dead(pid) for pid in workers)


def test_bad_flags_and_an_existing_out_give_one_error_line(tmp_path, capsys):
    for argv, message in [
        (["--budget-s", "0"], "--budget-s 0.0: out of range; use a value > 0"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from auto, cuda, cpu) (see --help)"),
        (["--warmup", "-1"], "--warmup -1: out of range; use a value >= 0 and <= 1000000"),
        (
            ["--out", str(tmp_path / "no" / "m.md")],
            f"--out {tmp_path / 'no' / 'm.md'}: not a file in an existing directory",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            measure.main(argv)
        assert e.value.code == 1
        assert capsys.readouterr().err.replace("'auto', 'cuda', 'cpu'", "auto, cuda, cpu") == f"error: {message}\n"


def test_the_script_imports_no_torch():
    # the import the tests above do, in a fresh interpreter: neither the script nor cli.py loads torch
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('measure', 'scripts/measure.py')\n"
        "sys.modules['measure'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(sys.modules['measure'])\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "False\n", proc.stderr


def read_cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU"


@pytest.mark.slow
def test_cpu_run_writes_the_table_and_refuses_to_overwrite_it(tmp_path):
    out = tmp_path / "m.md"
    before = datetime.now(timezone.utc)
    proc = run_script("scripts/measure.py", "--device", "cpu", "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert proc.stdout == text
    # the date and the device
    assert {before.strftime("%Y-%m-%d"), (before + timedelta(minutes=2)).strftime("%Y-%m-%d")} & set(
        re.findall(r"\d{4}-\d\d-\d\d", text)
    )
    assert f"CPU: {read_cpu_name()} ({os.cpu_count()} logical cores)" in text
    # a header row, then one row per configuration: the eager ones measured, the compiled ones skipped
    assert HEADER in text
    rows = table_rows(text)
    assert [r[:3] for r in rows] == [c.cells() for c in measure.CONFIGURATIONS]
    measured = [r for r in rows if r[0] == "eager"]
    assert len(measured) == 4
    assert all(r[4].startswith("skipped (CPU") for r in rows if r[0] == "torch.compile")
    # every measured value is the trainer's own: the table's cells match its `benchmark:` lines
    raw = re.findall(
        r"^benchmark: .*? \| ([\d,]+) tok/s \| ([\d.]+) ms/step \| peak memory ([\d.]+) GiB max RSS \| .*MFU ([\d.]+)%"
        r".* \| start-up ([\d.]+) s$",
        text,
        re.M,
    )
    assert len(raw) == 4
    for row, (tok_s, ms, mem, mfu, start_up) in zip(measured, raw):
        assert float(row[4].replace(",", "")) > 0 and float(row[5]) > 0 and float(row[7].split()[0]) > 0
        assert (row[4], row[5], row[6], row[7], row[8]) == (tok_s, ms, f"{mfu}%", f"{mem} GiB", start_up)
        assert float(row[9]) > float(row[8])  # the whole command's wall time includes the start-up
    # a second run without --force refuses, in one line, and leaves the file as it was
    first = out.read_bytes()
    again = run_script("scripts/measure.py", "--device", "cpu", "--out", str(out), timeout=60)
    assert again.returncode == 1
    assert again.stderr == f"error: --out {out} exists; pass --force to replace it\n"
    assert again.stdout == ""
    assert out.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.md"]  # no temp file left behind
