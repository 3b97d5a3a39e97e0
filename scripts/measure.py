"""Measure the GPT-2 124M recipe on this machine's GPU and write a markdown table for the README.

On a CUDA machine, from the repository root:

    python scripts/measure.py --out measure.md

Within --budget-s it runs `train_gpt.py --benchmark-steps ...` once per configuration (eager or --compile,
chunked or full-logits loss, with or without --activation-checkpointing) and searches the largest
micro-batch that fits. On CPU it runs a tiny shape, a smoke test. Only its subprocesses import torch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from subprocess import PIPE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this script lives in scripts/; cli.py is at the repository root

from cli import UserError, cli, flag, parse_config, write_atomic  # noqa: E402

TRAINER = "train_gpt.py"  # run with ROOT as the working directory
RECIPE_TOTAL_BATCH = 524288  # tokens per optimizer step of the 124M recipe
CPU_SHAPE = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64"]
CPU_DEFAULTS = dict(batch_size=2, seq_len=64, warmup=1, steps=2, run_timeout_s=120.0, min_run_s=3.0)
OOM_RE = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED", re.I)


@dataclass
class MeasureConfig:  # the defaults are CUDA's; on CPU, the flags not given take CPU_DEFAULTS
    device: str = flag("auto", "auto = CUDA if present, else CPU", choices=("auto", "cuda", "cpu"))
    out: str = flag("measure.md", "markdown file to write")
    force: bool = flag(False, "replace an existing --out")
    budget_s: float = flag(540.0, "seconds for the whole measurement; no run starts after them", gt=0)
    run_timeout_s: float = flag(300.0, "seconds per run (CPU: 120)", gt=0)
    min_run_s: float = flag(15.0, "start no run with less time left (CPU: 3)", gt=0)
    steps: int = flag(10, "timed steps per run (CPU: 2)", lo=1, hi=10**6)
    warmup: int = flag(3, "untimed steps before them (CPU: 1)", lo=0, hi=10**6)
    batch_size: int = flag(64, "B of the rows (CPU: 2)", lo=1, hi=2**20)
    seq_len: int = flag(1024, "T (CPU: 64)", lo=1, hi=2**20)
    peak_tflops: float | None = flag(None, "device peak for MFU, passed to the trainer", gt=0)
    batch_search: bool | None = flag(None, "search the largest micro-batch (default: on CUDA only)")
    compile_on_cpu: bool = flag(False, "also run the --compile rows on CPU")
    trainer_args: str = flag("", "more flags for every trainer run, e.g. --trainer-args='--model gpt2-medium'")


def check_out(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UserError(f"--out {path} exists; pass --force to replace it")
    if path.is_dir() or not path.parent.is_dir():
        raise UserError(f"--out {path}: not a file in an existing directory")


def probe_torch(timeout_s: float = 120.0) -> dict:
    """torch's version and the GPU, asked in a subprocess so this process never imports torch."""
    code = (
        "import json, torch\n"
        "info = {'torch': torch.__version__, 'cuda': torch.cuda.is_available()}\n"
        "if info['cuda']:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(name=p.name, memory_gib=p.total_memory / 2**30, cuda_version=torch.version.cuda)\n"
        "print(json.dumps(info))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError, OSError):
        raise UserError(f"{sys.executable} could not import torch; install requirements.txt") from None


def for_device(args: MeasureConfig, given: set[str], info: dict) -> MeasureConfig:
    """The flags with the device chosen; on CPU, those not given take CPU_DEFAULTS."""
    if args.device == "cuda" and not info.get("cuda"):
        raise UserError("--device cuda: CUDA is not available here; use --device cpu or auto")
    device = args.device
    if device == "auto":
        device = "cuda" if info.get("cuda") else "cpu"
    search = device == "cuda" if args.batch_search is None else args.batch_search
    args = replace(args, device=device, batch_search=search)
    if device == "cpu":
        args = replace(args, **{name: value for name, value in CPU_DEFAULTS.items() if name not in given})
    return args


# --- the eight configurations, and running the trainer for one
@dataclass(frozen=True)
class Configuration:
    compile: bool = False
    chunked: bool = True
    checkpointing: bool = False

    def flags(self) -> list[str]:
        flags = ["--compile"] if self.compile else []
        if not self.chunked:
            flags.append("--no-chunked-loss")
        if self.checkpointing:
            flags.append("--activation-checkpointing")
        return flags

    def cells(self) -> list[str]:
        model = "torch.compile" if self.compile else "eager"
        loss = "chunked" if self.chunked else "full logits"
        return [model, loss, "on" if self.checkpointing else "off"]


DEFAULT = Configuration()
CONFIGURATIONS = [  # the table's rows, in this order
    Configuration(compile=compiled, chunked=chunked, checkpointing=checkpointing)
    for checkpointing, compiled, chunked in product((False, True), (False, True), (True, False))
]
# eager rows (and the micro-batch search) first: a compilation slower than the budget costs only its own rows
RUN_ORDER = sorted(CONFIGURATIONS, key=lambda configuration: configuration.compile)
assert RUN_ORDER[0] == DEFAULT  # the first run is also the micro-batch search's first probe


@dataclass
class Outcome:  # what one trainer run gave: status ok, oom, timeout, failed or skipped
    status: str
    cmd: list[str]
    bench: Bench | None = None
    wall_s: float | None = None
    note: str = ""  # why it failed or was skipped

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def batch_size(self) -> int:
        return int(self.cmd[self.cmd.index("--batch-size") + 1])


def run_with_timeout(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of cmd; None for the status if it timed out and its group was killed."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout_s)
        return p.returncode, stdout, stderr
    except BaseException as e:
        with suppress(ProcessLookupError, PermissionError):  # it may be gone already
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()  # a process outside the group may hold the pipes open: do not wait for it
        p.stderr.close()
        if isinstance(e, subprocess.TimeoutExpired):
            return None, "", ""
        raise


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip()[:160] if lines else ""


class Runner:  # runs the trainer with the measurement's flags, none after the deadline
    def __init__(self, args: MeasureConfig, deadline: float) -> None:
        self.args, self.deadline = args, deadline
        self.search_total = RECIPE_TOTAL_BATCH if args.device == "cuda" else 16 * args.seq_len  # B divides it

    def command(self, configuration: Configuration, batch_size: int) -> list[str]:
        args = self.args
        command = [sys.executable, TRAINER, "--device", args.device]
        command += ["--benchmark-steps", str(args.steps), "--benchmark-warmup", str(args.warmup)]
        command += ["--batch-size", str(batch_size), "--seq-len", str(args.seq_len)]
        command += ["--total-batch-size", str(batch_size * args.seq_len)]  # one micro-step per step
        command += CPU_SHAPE if args.device == "cpu" else []
        command += configuration.flags()
        command += ["--peak-tflops", f"{args.peak_tflops:g}"] if args.peak_tflops else []
        return command + shlex.split(args.trainer_args)

    def run(self, configuration: Configuration, batch_size: int) -> Outcome:
        out = self.outcome(configuration, batch_size)
        result = f"{out.bench.tok_s:,.0f} tok/s" if out.ok else out.note
        wall = "" if out.wall_s is None else f" ({out.wall_s:.1f} s)"
        model, loss, checkpointing = configuration.cells()
        progress(f"{model}, {loss} loss, activation checkpointing {checkpointing}, B={batch_size}: {result}{wall}")
        return out

    def outcome(self, configuration: Configuration, batch_size: int) -> Outcome:
        """The run's result: skipped, timed out, its benchmark line, out of memory, or why it failed."""
        args, cmd = self.args, self.command(configuration, batch_size)
        if args.device == "cpu" and configuration.compile and not args.compile_on_cpu:
            return Outcome("skipped", cmd, note="skipped (CPU: --compile-on-cpu runs it)")
        left = self.deadline - time.monotonic()
        if left < args.min_run_s:
            return Outcome("skipped", cmd, note="skipped (budget)")
        timeout = min(args.run_timeout_s, left)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"  # steadier timings on a shared machine
        t0 = time.monotonic()
        status, stdout, stderr = run_with_timeout(cmd, env, timeout)
        wall_s = time.monotonic() - t0
        if status is None:
            why = "budget" if timeout < args.run_timeout_s else "--run-timeout-s"
            return Outcome("timeout", cmd, wall_s=wall_s, note=f"timed out after {timeout:.0f} s ({why})")
        if status == 0:
            bench = find_benchmark(stdout)
            note = "" if bench else f"no benchmark line: {last_line(stdout)}"
            return Outcome("ok" if bench else "failed", cmd, bench=bench, wall_s=wall_s, note=note)
        if OOM_RE.search(stderr) or OOM_RE.search(stdout):
            return Outcome("oom", cmd, wall_s=wall_s, note="out of memory")
        if status == -signal.SIGKILL:
            return Outcome("oom", cmd, wall_s=wall_s, note="killed (SIGKILL: out of host memory?)")
        why = f"exit {status}" if status > 0 else f"signal {-status}"
        return Outcome("failed", cmd, wall_s=wall_s, note=f"failed ({why}: {last_line(stderr) or last_line(stdout)})")


def progress(text: str) -> None:
    print(f"measure: {text}", file=sys.stderr, flush=True)


@dataclass
class Bench:  # what the table shows of one `benchmark:` line
    line: str
    tok_s: float
    ms_step: float
    dtype: str | None = None
    memory: str | None = None  # peak memory, "31.20 GiB"
    mfu: float | None = None  # percent
    peak: str | None = None  # what the MFU is relative to, in the trainer's words
    startup_s: float | None = None  # process start to the first timed step, compilation included


NUM = r"\d[\d,]*(?:\.\d+)?"
BENCH_FIELDS = [
    re.compile(r"^dtype (?P<dtype>\S+)$"),
    re.compile(rf"^(?P<tok_s>{NUM}) tok/s$"),
    re.compile(rf"^(?P<ms_step>{NUM}) ms/step$"),
    re.compile(rf"^peak memory (?P<memory>{NUM} [KMGT]i?B)\b.*$"),
    re.compile(rf"^{NUM} GFLOP/s achieved(?:, MFU (?P<mfu>{NUM})% of (?P<peak>.+))?$"),
    re.compile(rf"^start-?up(?: time)?:? (?P<startup_s>{NUM}) ?s$"),
]
TEXT_FIELDS = ("dtype", "memory", "peak")  # the others are numbers


def parse_benchmark_line(line: str) -> Bench | None:
    """A `benchmark: ... | ... tok/s | ... ms/step | ...` line, fields in any order, those it does not know
    ignored; None without tok/s or ms/step."""
    line = line.strip()
    if not line.startswith("benchmark:"):
        return None
    values: dict[str, float | str] = {}
    for part in line.removeprefix("benchmark:").split("|"):
        matches = [pattern.match(part.strip()) for pattern in BENCH_FIELDS]
        for match in filter(None, matches):  # none for a field this parser does not know
            for name, text in match.groupdict().items():
                if text and text.strip():
                    values[name] = text.strip() if name in TEXT_FIELDS else float(text.replace(",", ""))
    if "tok_s" not in values or "ms_step" not in values:
        return None
    return Bench(line=line, **values)


def find_benchmark(stdout: str) -> Bench | None:
    """The last parseable `benchmark:` line of a run's stdout."""
    parsed = [parse_benchmark_line(line) for line in stdout.splitlines()]
    benches = [bench for bench in parsed if bench]
    return benches[-1] if benches else None


# --- the micro-batch search
@dataclass
class Search:
    start: int | None = None  # the first micro-batch tried
    largest_fit: int | None = None
    smallest_fail: int | None = None
    stopped: str = ""  # why the search ended early: a skipped or failed probe
    probes: dict[int, Outcome] = field(default_factory=dict)  # B -> its run


def batch_candidates(total_tokens: int, seq_len: int) -> list[int]:
    """Micro-batches B that divide the batch: total_tokens % (B * seq_len) == 0."""
    if total_tokens % seq_len:
        return []
    sequences = total_tokens // seq_len
    return [b for b in range(1, sequences + 1) if sequences % b == 0]


def next_probe(candidates: list[int], fit: int, fail: int) -> int:
    """Double B while none failed, halve it while none fitted, then bisect (indices; -1, len: none yet)."""
    if fail == len(candidates):
        bigger = [i for i, b in enumerate(candidates) if b >= 2 * candidates[fit]]
        return bigger[0] if bigger else len(candidates) - 1
    if fit == -1:
        smaller = [i for i, b in enumerate(candidates) if b <= candidates[fail] // 2]
        return smaller[-1] if smaller else 0
    return (fit + fail) // 2


def search_batch(candidates: list[int], start: int, probe: Callable[[int], Outcome], known: dict) -> Search:
    """The largest candidate that fits, from the largest <= start. Out of memory does not fit; a skipped,
    timed out or otherwise failed run stops the search. `known`: runs already made, by B."""
    search = Search(probes=dict(known))
    if not candidates:
        search.stopped = "no micro-batch divides the total batch"
        return search
    at_or_below = [i for i, b in enumerate(candidates) if b <= start]
    at = at_or_below[-1] if at_or_below else 0
    search.start = candidates[at]
    fit, fail = -1, len(candidates)
    while fail - fit > 1:
        b = candidates[at]
        if b not in search.probes:
            search.probes[b] = probe(b)
        if search.probes[b].ok:
            fit = at
        elif search.probes[b].status == "oom":
            fail = at
        else:
            search.stopped = f"B={b}: {search.probes[b].note}"
            break
        at = next_probe(candidates, fit, fail)
    search.largest_fit = candidates[fit] if fit >= 0 else None
    search.smallest_fail = candidates[fail] if fail < len(candidates) else None
    return search


# --- the measurement, and its markdown
def run_search(runner: Runner, first: Outcome) -> Search:
    """The micro-batch search for the default configuration; `first` is its run at the rows' B."""
    candidates = batch_candidates(runner.search_total, runner.args.seq_len)
    reusable = first.status != "skipped" and first.batch_size in candidates
    known = {first.batch_size: first} if reusable else {}
    return search_batch(candidates, runner.args.batch_size, lambda b: runner.run(DEFAULT, b), known)


def measure_rows(runner: Runner) -> tuple[dict[Configuration, Outcome], Search | None]:
    """The rows in RUN_ORDER, with the search before the compiled ones, or at once if the default runs
    out of memory: then every row runs at the largest B that fits."""
    args = runner.args
    rows: dict[Configuration, Outcome] = {}
    search = None
    for configuration in RUN_ORDER:
        if args.batch_search and search is None and configuration != DEFAULT:
            default_oom = rows[DEFAULT].status == "oom"
            if default_oom or configuration.compile:
                search = run_search(runner, rows[DEFAULT])
                if default_oom and search.largest_fit:
                    args.batch_size = search.largest_fit  # the B of the remaining rows, and of the report
                    rows[DEFAULT] = search.probes[search.largest_fit]
        rows[configuration] = runner.run(configuration, args.batch_size)
    if args.batch_search and search is None:
        search = run_search(runner, rows[DEFAULT])
    return rows, search


def md(text: str) -> str:
    return text.replace("|", "\\|")


def describe_device(info: dict, device: str) -> str:
    if device == "cuda":
        return f"{info['name']} ({info['memory_gib']:.1f} GiB)"
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return f"CPU: {names[0] if names else 'unknown'} ({os.cpu_count()} logical cores)"


VALUE_HEADER = ["tok/s", "ms/step", "MFU", "peak memory", "start-up (s)", "wall (s)"]


def value_cells(out: Outcome) -> list[str]:
    """The VALUE_HEADER cells of a run: what it measured, or why it has no numbers and dashes."""
    wall = "–" if out.wall_s is None else f"{out.wall_s:.1f}"
    if not out.ok:
        return [md(out.note or out.status), "–", "–", "–", "–", wall]
    b = out.bench
    mfu = "–" if b.mfu is None else f"{b.mfu:.1f}%"  # none on a GPU without a known peak: see --peak-tflops
    startup = "–" if b.startup_s is None else f"{b.startup_s:.1f}"
    return [f"{b.tok_s:,.0f}", f"{b.ms_step:.1f}", mfu, b.memory or "–", startup, wall]


def table(header: list[str], rows: list[list[str]], numeric_from: int) -> list[str]:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(row) + " |" for row in (header, align, *rows)]


@dataclass
class Report:  # the markdown of a measurement: its runs, and when and where they ran
    runner: Runner
    info: dict  # probe_torch()'s
    started: datetime
    took_s: float
    rows: dict[Configuration, Outcome]
    search: Search | None

    def probes(self) -> list[Outcome]:
        return [out for _, out in sorted(self.search.probes.items())] if self.search else []

    def intro(self) -> list[str]:
        """The title, when and where it was measured, what the rows are, and what the columns mean."""
        args, info = self.runner.args, self.info
        measured = [out.bench for out in [*self.rows.values(), *self.probes()] if out.ok]
        device = describe_device(info, args.device)
        cuda = f", CUDA {info['cuda_version']}" if info.get("cuda_version") else ""
        when = f"Measured {self.started:%Y-%m-%d %H:%M UTC} on **{device}**, torch {info.get('torch', '?')}{cuda}"
        when += f", by `python scripts/measure.py` in {self.took_s:.0f} s (budget {args.budget_s:g} s)."
        if args.device == "cpu":
            when += " **A tiny shape with OMP_NUM_THREADS=1, to test the script: not the 124M recipe's numbers.**"
        dtypes = ", ".join(sorted({bench.dtype for bench in measured if bench.dtype})) or "?"
        peaks = sorted({bench.peak for bench in measured if bench.peak}) or ["no known peak"]
        peak = peaks[0] if len(peaks) == 1 else "the peak each run names below (on CPU each measures its own)"
        base_cmd = " ".join(["python", *self.runner.command(DEFAULT, args.batch_size)[1:]])
        return [
            f"### train_gpt.py speed on {device}, {self.started:%Y-%m-%d}",
            "",
            when,
            f"Each row is one run of `{base_cmd}` with the row's flags and B (T = {args.seq_len}, dtype {dtypes},"
            f" {args.warmup} warmup + {args.steps} timed steps on synthetic tokens):"
            " **--total-batch-size = B × T, one micro-step per optimizer step**.",
            f"MFU: model FLOPs (6 × non-embedding params + attention) against {peak}. Peak memory: allocated"
            " (CUDA) or max RSS (CPU). Start-up: the trainer's seconds from its start to the first timed step,"
            " compilation included. Wall: seconds for the whole command (torch.compile's caches as found).",
        ]

    def rows_table(self) -> list[str]:
        body = []
        for configuration in CONFIGURATIONS:
            out = self.rows[configuration]
            body.append([*configuration.cells(), str(out.batch_size), *value_cells(out)])
        return table(["model", "loss", "activation checkpointing", "B", *VALUE_HEADER], body, numeric_from=3)

    def search_lines(self) -> list[str]:
        """What the micro-batch search found, and a table of its runs (tok/s says which did not fit)."""
        args, search, total = self.runner.args, self.search, self.runner.search_total
        what = f"Largest micro-batch B for eager, chunked loss (T = {args.seq_len}, B dividing {total} tokens / T)"
        if search is None:
            why = "not run (--no-batch-search)"
            if args.device == "cpu":
                why = "skipped on CPU (no device memory to fill; --batch-search runs it)"
            return [f"{what}: {why}."]
        found = "none fits" if search.smallest_fail else "not found"
        if search.largest_fit:
            found = f"**B = {search.largest_fit}**"
            if search.smallest_fail:
                found += f" (B = {search.smallest_fail}: out of memory)"
            micro_steps = total // (search.largest_fit * args.seq_len)
            found += f"; the {total}-token batch is then {micro_steps} micro-step{'s' if micro_steps > 1 else ''}"
        if search.stopped:
            found += f"; search stopped early at {md(search.stopped)}"
        how = f"doubling from B = {search.start}, then bisection; a run that dies of out-of-memory does not fit"
        body = [[str(out.batch_size), *value_cells(out)] for out in self.probes()]
        probes_table = ["", *table(["B", *VALUE_HEADER], body, numeric_from=1)] if body else []
        return [f"{what}: {found} ({how}).", *probes_table]

    def details(self) -> list[str]:
        """Every command that ran, with the trainer's benchmark line or what went wrong."""
        lines = ["<details><summary>commands and the trainer's benchmark lines</summary>", "", "```"]
        shown: set[int] = set()
        for out in [*self.rows.values(), *self.probes()]:
            if out.status == "skipped" or id(out) in shown:
                continue
            shown.add(id(out))
            lines.append("$ " + " ".join(["python", *out.cmd[1:]]))
            lines.append(out.bench.line if out.ok else f"-> {out.note}")
        return [*lines, "```", "", "</details>", ""]


def measure(argv: list[str] | None = None) -> None:
    """The whole measurement: flags, runs, the markdown to stdout and --out."""
    started_at, started = time.monotonic(), datetime.now(timezone.utc)
    args, given = parse_config(MeasureConfig, argv, __doc__.splitlines()[0])  # --help starts with it
    out_path = Path(args.out).expanduser()
    check_out(out_path, args.force)
    info = probe_torch()
    args = for_device(args, given, info)
    progress(f"{describe_device(info, args.device)}, torch {info.get('torch')}, budget {args.budget_s:g} s")
    runner = Runner(args, deadline=started_at + args.budget_s)
    rows, search = measure_rows(runner)
    report = Report(runner, info, started, time.monotonic() - started_at, rows, search)
    text = "\n".join([*report.intro(), "", *report.rows_table(), "", *report.search_lines(), "", *report.details()])
    print(text, end="", flush=True)
    check_out(out_path, args.force)  # again: it may have appeared during the runs
    write_atomic(out_path, lambda f: f.write(text.encode("utf-8")))
    progress(f"wrote {out_path}")
    if not any(out.ok for out in rows.values()):
        raise UserError(f"no configuration ran; the first: {rows[DEFAULT].note}")


def main(argv: list[str] | None = None) -> None:
    cli(measure, argv)


if __name__ == "__main__":
    main()
