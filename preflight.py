"""
What train_gpt.py checks before a run builds a model or takes its log dir, so a mistake costs a second,
not an hour: flag combinations that the flags' ranges cannot express, flags typed that mean nothing
without another one, the refusals of --fsdp and --tp, and for --resume the restored flags this machine
cannot honour (each refusal naming the override that works), a run already complete, and a C++
compiler for --compile on the CPU. It works on the config and plain values; it never imports
train_gpt.py.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from checkpoint import Checkpoint
from cli import UserError, flag_name, import_optional, is_rank0
from parallelize import check_tensor_parallel

# what benchmark mode never reads, writes or runs: typed with a value that asks for something, they are refused
# (an "off" value, like --eval-every 0, agrees with it and passes)
BENCHMARK_IGNORES = (
    "data_dir", "shuffle", "log_dir", "max_steps", "eval_every", "eval_steps", "sample_every", "save_every",
    "keep_last", "hellaswag_every", "hellaswag_dir", "wandb", "wandb_run_name",
)  # fmt: skip


def check_flags(cfg: Any, given: set[str], shape_flags: tuple[str, ...]) -> None:
    """What the flags' ranges cannot say alone: combinations that make no sense (the model's own shape and
    source are train_gpt.py's check_config)."""
    if cfg.min_lr > cfg.max_lr:
        raise UserError(f"--min-lr {cfg.min_lr} is above --max-lr {cfg.max_lr}; the decay must go down")
    if cfg.init_from and given & set(shape_flags):
        names = ", ".join(flag_name(n) for n in shape_flags if n in given)
        raise UserError(f"--init-from {cfg.init_from} takes its shape from the source; drop {names}")
    if cfg.resume and cfg.benchmark_steps:
        raise UserError("--benchmark-steps times a fresh model; drop --resume")
    if cfg.benchmark_steps and (unused := [flag_name(n) for n in BENCHMARK_IGNORES if n in given and getattr(cfg, n)]):
        raise UserError(
            f"--benchmark-steps times synthetic batches and writes nothing: {', '.join(unused)} would do nothing; "
            f"drop {'them' if len(unused) > 1 else 'it'}"
        )
    if cfg.fsdp and "RANK" not in os.environ:
        raise UserError("--fsdp shards over the processes of a torchrun job; launch with torchrun, or drop --fsdp")
    if cfg.fsdp and cfg.optimizer == "muon":
        raise UserError("--optimizer muon needs whole matrices, which --fsdp shards; use DDP (drop --fsdp) or adamw")
    if cfg.fsdp and cfg.dtype == "float16":
        raise UserError("--fsdp trains in bfloat16 or float32; float16 would need a sharded GradScaler")
    if cfg.tp > 1:
        check_tensor_parallel(cfg.tp, cfg.optimizer, cfg.dtype)
    if cfg.wandb:  # imported now, on every rank, so a missing or broken wandb stops the job before any work
        if cfg.resume and "wandb" not in given:  # the run's flag: say how to go on without W&B
            off = ", or resume without W&B: --wandb ''"
            missing = (
                f"--wandb {cfg.wandb} (restored from the checkpoint) needs the wandb package: pip install wandb{off}"
            )
        else:
            off, missing = ", or drop --wandb", "--wandb needs the wandb package: pip install wandb"
        import_optional("wandb", missing, "--wandb", off)
    check_flag_pairs(cfg, given)


def check_flag_pairs(cfg: Any, given: set[str]) -> None:
    """A flag typed that only means something with another one, which is off: refused, naming both. Only
    typed flags are checked (one restored by --resume is the run's own, not a mistake of this command)."""
    pairs = [  # (flag, whether the flag it needs is on, that flag as it must be)
        ("cooldown_frac", cfg.lr_schedule == "wsd", "--lr-schedule wsd"),
        ("wandb_run_name", bool(cfg.wandb), "--wandb PROJECT"),
        ("benchmark_warmup", cfg.benchmark_steps > 0, "--benchmark-steps N"),
        ("hellaswag_dir", cfg.hellaswag_every > 0, "--hellaswag-every N"),
        ("keep_last", cfg.save_every > 0, "--save-every N"),
    ]
    for name, on, needs in pairs:
        if name in given and not on:
            other = needs.split()[0]
            value = getattr(cfg, other[2:].replace("-", "_"))
            now = f"{other} {value}" if value not in (None, "") else f"no {other}"
            way = "" if cfg.resume and name == "cooldown_frac" else f", or pass {needs}"  # the schedule is the run's
            raise UserError(
                f"{flag_name(name)} only means something with {needs}, and this run has {now}; "
                f"drop {flag_name(name)}{way}"
            )


def check_resumed(cfg: Any, given: set[str], resumed: Checkpoint) -> bool:
    """What the resumed run's own flags need from this machine, each refusal naming the override that
    works on --resume; True if the run is already complete (said in one line: nothing to do)."""
    step, restored = resumed.state["step"], f"restored from {resumed.path}"
    if step > cfg.max_steps:
        raise UserError(
            f"--max-steps {cfg.max_steps} is below the step of {resumed.path} ({step}); a run cannot go back: "
            f"to train further, pass a --max-steps above {step}"
        )
    if step == cfg.max_steps and resumed.state["periodic_done"]:
        if is_rank0():  # exit 0: a job script that resumes until done then finds it done, not failed
            print(
                f"resume: the run in {cfg.log_dir} is already complete at step {step} (--max-steps {cfg.max_steps}); "
                "nothing to do: to train further, resume with a larger --max-steps"
            )
        return True
    missing = {"cuda": ("CUDA", torch.cuda.is_available), "mps": ("MPS", torch.backends.mps.is_available)}
    if "device" not in given and cfg.device in missing and not missing[cfg.device][1]():
        raise UserError(
            f"--device {cfg.device}: {missing[cfg.device][0]} is not available here; use --device cpu or auto "
            f"(--device {cfg.device} is the run's, {restored})"
        )
    if "data_dir" not in given and not os.path.isdir(cfg.data_dir) and not cfg.benchmark_steps:
        raise UserError(
            f"--data-dir {cfg.data_dir} ({restored}): no such directory here; resume with --data-dir DIR, the "
            "folder of the run's shards on this machine"
        )
    if (
        "hellaswag_dir" not in given
        and cfg.hellaswag_every
        and cfg.hellaswag_dir
        and not os.path.isdir(cfg.hellaswag_dir)
    ):
        raise UserError(
            f"--hellaswag-dir {cfg.hellaswag_dir} ({restored}): no such folder here; resume with --hellaswag-dir DIR "
            "(a folder holding hellaswag_val.jsonl), or --hellaswag-every 0 to go on without HellaSwag"
        )
    return False


def check_cpp_compiler(restored: bool) -> None:
    """--compile on the CPU builds C++ kernels: refuse it at once where torch finds no compiler, instead of
    failing in the first step."""
    try:
        from torch._inductor import cpp_builder, exc

        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        way = "resume with --no-compile" if restored else "drop --compile"
        raise UserError(
            f"--compile{' (restored from the checkpoint)' if restored else ''} needs a C++ compiler on the CPU, and "
            f"none was found (g++, or $CXX); install one, or {way}"
        ) from None
    except Exception:  # the probe is torch's internal API: if it moved, let torch.compile speak for itself
        pass
