"""
Checkpoints of train_gpt.py and --resume: the format (one file per step, whole tensors whatever the
parallelism), saving atomically, loading with validation, finding the newest usable checkpoint, the
run's flags restored from it (each flag's resume rule is declared on TrainConfig), and the check
that a resumed run reads the same training data. It works on state dicts, configs and plain
values; it never imports train_gpt.py.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict

from cli import MAY_CHANGE, NOT_RESTORED, UserError, flag_name, flags_with_rule, is_rank0, os_error_text, write_atomic

CHECKPOINT_RE = re.compile(r"model_(\d{5,})\.pt")
MODEL_KEYS = ("model", "config")  # enough to load the weights (--init-from, hellaswag.py, sample.py)
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "args", "step", "val_loss", "train_loader", "rng", "scaler", "periodic_done")
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU


@dataclass
class Checkpoint:
    """A checkpoint file and what it holds (the dict torch.save wrote)."""

    path: str
    state: dict


@dataclass
class RunPosition:
    """Where a run stands: the next step, whether that step's evaluations and save already ran (a
    checkpoint written after them), the latest val loss and the W&B run id."""

    step: int = 0
    evals_done: bool = False
    val_loss: float | None = None
    wandb_id: str | None = None


def checkpoint_path(log_dir: str, step: int) -> str:
    return os.path.join(log_dir, f"model_{step:05d}.pt")


def list_checkpoints(log_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the finished checkpoints in log_dir, oldest first (temp files excluded)."""
    if not os.path.isdir(log_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(log_dir, n)) for n in os.listdir(log_dir) if (m := CHECKPOINT_RE.fullmatch(n))
    ]
    return sorted(found)


def checkpoint_state(
    *,
    position: RunPosition,
    cfg: Any,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    train_loader: Any,
) -> dict:
    """Everything a run needs to continue exactly: restore_state() puts each piece back. One format
    whatever the parallelism (torch's full state dicts, optimizer state keyed by parameter name), so a
    run saved under DDP resumes under FSDP and the other way round. Under FSDP every rank must call
    it: the shards are gathered to rank 0, which then holds the whole state in host memory."""
    model_state, optimizer_state = get_state_dict(model, optimizers, options=FULL_STATE)
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "config": asdict(model.config),
        "args": asdict(cfg),
        "step": position.step,
        "val_loss": position.val_loss,
        "train_loader": train_loader.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "scaler": scaler.state_dict(),
        "periodic_done": position.evals_done,  # whether eval/save of this step already happened
        "wandb_id": position.wandb_id,
    }


def restore_state(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    train_loader: Any,
) -> RunPosition:
    """Put back what checkpoint_state() saved (the model is built from it already), then drop the
    loaded copy, ~16 bytes a parameter of host memory."""
    state = checkpoint.state
    train_loader.load_state_dict(state["train_loader"])
    optimizer_state = state["optimizer"]
    groups = optimizer_state["param_groups"]
    if groups and isinstance(groups[0]["params"][0], int):
        optimizers[0].load_state_dict(optimizer_state)  # an older version's checkpoint: one AdamW, keyed by position
    else:
        set_optimizer_state_dict(model, optimizers, optimizer_state, options=StateDictOptions(full_state_dict=True))
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    position = RunPosition(state["step"], state["periodic_done"], state["val_loss"], state.get("wandb_id"))
    state.clear()
    return position


def save_checkpoint(log_dir: str, step: int, state: dict, keep_last: int) -> str:
    """Temp file, fsync, rename: a kill at any moment leaves either the old state or the new one.
    Then keep the keep_last newest checkpoints up to this one (a later one can only be a leftover
    that --resume skipped as unusable, and must not count as newest)."""
    path = checkpoint_path(log_dir, step)
    write_atomic(path, lambda f: torch.save(state, f))
    if keep_last > 0:
        for _, old in [c for c in list_checkpoints(log_dir) if c[0] <= step][:-keep_last]:
            os.remove(old)
    return path


def load_checkpoint(path: str, keys: tuple[str, ...] = MODEL_KEYS) -> dict:
    """A checkpoint of train_gpt.py, or a one-line UserError saying why not. Loaded with
    weights_only=True: a file holding anything but tensors and plain data is refused, never run."""
    try:
        with quiet_unpickling():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the checkpoint ({os_error_text(e)})") from None
    except pickle.UnpicklingError:
        raise UserError(
            f"{path}: not a train_gpt.py checkpoint (corrupt, or holding objects other than tensors)"
        ) from None
    except Exception as e:  # a torn zip, a truncated tensor: torch raises many kinds
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}; truncated or corrupt?)") from None
    missing = [k for k in keys if k not in checkpoint] if isinstance(checkpoint, dict) else list(keys)
    if missing:
        raise UserError(f"{path}: not a train_gpt.py checkpoint (no {', '.join(missing)}; a bare state dict?)")
    return checkpoint


@contextmanager
def quiet_unpickling() -> Iterator[None]:
    """Around torch.load(weights_only=True): silences its warning about the pickle protocol of a file
    that is no torch checkpoint (a hostile or foreign pickle, refused anyway), so the user sees only
    our one line; every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def check_tensors(src: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Refuse weights that do not match the model exactly, naming the first few differences."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    problems = [(missing, "missing"), (extra, "unexpected"), (shapes, "misshapen")]
    text = "; ".join(
        f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for keys, what in problems if keys
    )
    if text:
        raise UserError(f"{src}: the weights do not match its config ({text})")


def latest_checkpoint(log_dir: str) -> Checkpoint:
    """The newest checkpoint in log_dir that can continue a run, naming each one skipped and why."""
    found = list_checkpoints(log_dir)
    if not found:
        log_txt = os.path.join(log_dir, "log.txt")
        there = (
            "it holds a log.txt but no checkpoint (was --save-every 0, or was the run stopped before its "
            f"first one?), so there is nothing to resume; to start afresh, drop --resume and move {log_txt} "
            "aside, or choose another --log-dir"
            if os.path.isfile(log_txt) and os.path.getsize(log_txt) > 0
            else "nothing to resume"
        )
        raise UserError(f"--resume: no checkpoint (model_*.pt) in --log-dir {log_dir}: {there}")
    for _, path in reversed(found):
        try:
            return Checkpoint(path, load_checkpoint(path, RESUME_KEYS))
        except UserError as e:
            if is_rank0():
                print(f"skipping {e}", file=sys.stderr)
    names = ", ".join(os.path.basename(p) for _, p in found)
    raise UserError(
        f"--resume: none of the checkpoints in {log_dir} is usable ({names}); restore a good copy, or move "
        f"the run's files (log.txt, model_*.pt) out of {log_dir} to start afresh there"
    )


# -----------------------------------------------------------------------------
# --resume: the run's flags, and the same data


def resume_config(
    cfg: Any, given: set[str], checkpoint: Checkpoint, lr_at: Callable[[int, Any], float] | None = None
) -> Any:
    """The run's own flags, from its checkpoint: flags not given now are restored; a given one that
    would change what the run learns is refused, naming every difference. lr_at(step, cfg) is the
    LR schedule, to say how a new --max-steps moves the LR."""
    config_type = type(cfg)
    may_change, not_restored = flags_with_rule(config_type, MAY_CHANGE), flags_with_rule(config_type, NOT_RESTORED)
    known = {f.name for f in fields(config_type)}
    saved = {k: v for k, v in checkpoint.state["args"].items() if k in known and k not in not_restored}
    diffs = [
        f"{flag_name(k)} {getattr(cfg, k)} (the run has {saved[k]})"
        for k in sorted(given & saved.keys() - may_change)
        if getattr(cfg, k) != saved[k]
    ]
    if diffs:
        raise UserError(
            f"--resume from {checkpoint.path}: {', '.join(diffs)} cannot change within a run; drop these flags to "
            f"continue it, or start a new run in another --log-dir with --init-from {checkpoint.path}"
        )
    restored = {k: v for k, v in saved.items() if k not in given}
    if restored.get("fsdp") and "RANK" not in os.environ:
        del restored["fsdp"]  # FSDP shards over torchrun's ranks; one plain process holds the whole model anyway
    new = replace(cfg, **restored)
    if is_rank0():
        changed = [f"{k}={v}" for k, v in restored.items() if v != getattr(cfg, k)]
        print(
            f"resume: restored the run's flags from {checkpoint.path}: {', '.join(changed) or 'all were the defaults'}"
        )
        step, old_steps = checkpoint.state["step"], saved.get("max_steps", new.max_steps)
        if lr_at is not None:
            before, after = lr_at(step, replace(new, max_steps=old_steps)), lr_at(step, new)
            if before != after:  # cosine stretches; wsd moves only if the checkpoint is in its cooldown
                print(
                    f"resume: --max-steps {old_steps} -> {new.max_steps} moves the LR at step {step} "
                    f"from {before:.4e} to {after:.4e}"
                )
    return new


def shard_fingerprint(path: str, blocks: int = 16, block_bytes: int = 4096) -> str:
    """A cheap content check for --resume: sha256 of the size and of evenly spaced blocks of the file."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(size * i // blocks)
            h.update(f.read(block_bytes))
    return h.hexdigest()[:16]


def data_identity(paths: list[str], lengths: list[int]) -> list[list]:
    """[name, tokens, fingerprint] of each shard: what --resume compares to be sure the data is the same."""
    return [[os.path.basename(p), n, shard_fingerprint(p)] for p, n in zip(paths, lengths)]


def check_same_data(saved: dict, identity: list[list], n_tokens: int, shuffle: bool, seed: int) -> None:
    """Refuse to resume on other training data (or another shuffle seed) than the loader state was saved with."""
    diffs = data_differences(saved, identity, n_tokens)
    if shuffle and saved.get("seed") != seed:
        diffs.append(f"shuffle seed {saved.get('seed')}, now {seed}")
    if diffs:
        raise UserError(
            f"the training data differs from the checkpoint's ({'; '.join(diffs[:3])}); "
            "resume with the --data-dir it was trained on"
        )


def data_differences(saved: dict, identity: list[list], n_tokens: int) -> list[str]:
    """How the shards now (their identity and token count) differ from those a loader state was saved
    with: names, sizes, content."""
    if "shards" not in saved:  # checkpoints of older versions hold the token count only
        return [] if saved["n_tokens"] == n_tokens else [f"{saved['n_tokens']:,} train tokens, now {n_tokens:,}"]
    was = saved["shards"]
    if len(was) != len(identity):
        return [f"{len(was)} train shards, now {len(identity)}"]
    diffs = []
    for (name, n, fingerprint), (new_name, new_n, new_fingerprint) in zip(was, identity):
        if (name, n) != (new_name, new_n):
            diffs.append(f"{name} of {n:,} tokens, now {new_name} of {new_n:,}")
        elif fingerprint != new_fingerprint:
            diffs.append(f"{name} has other tokens")
    return diffs
