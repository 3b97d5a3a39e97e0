"""
What keeps a training run from hurting itself or another: one run per log dir (an OS lock released
even by kill -9), a fresh run never writing over an earlier one, log.txt rewound to the checkpoint
on --resume, SIGTERM/SIGINT turned into "finish the step, checkpoint, exit", the stop after too
many non-finite steps, and a rank-0-only check stopping every rank. It never imports train_gpt.py.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import IO, Any

import torch
import torch.distributed as dist

from checkpoint import Checkpoint, list_checkpoints
from cli import UserError, os_error_text, write_atomic

try:
    import fcntl  # the log-dir lock; POSIX only
except ImportError:  # Windows
    fcntl = None


def check_log_dir(log_dir: str, resume: bool, probe_lock: bool = True) -> None:
    """One run per log dir, and a fresh run never writes over an earlier one: refuse a log dir that a
    live run holds, or, without --resume, one with an earlier run's log or checkpoints."""
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UserError(f"--log-dir {log_dir} is a file, not a directory; choose another --log-dir")
    lock_path = os.path.join(log_dir, "train.lock")
    if probe_lock and fcntl is not None and os.path.isfile(lock_path):
        with open(lock_path) as probe:  # a shared lock fails while the run that owns the dir is alive
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                raise UserError(in_use_message(log_dir, probe.read().strip())) from None
    earlier = [os.path.basename(p) for _, p in list_checkpoints(log_dir)[-1:]]
    log_txt = os.path.join(log_dir, "log.txt")
    if os.path.isfile(log_txt) and os.path.getsize(log_txt) > 0:
        earlier.insert(0, "log.txt")
    if earlier == ["log.txt"] and not resume:  # a run stopped before its first checkpoint: --resume cannot help
        raise UserError(
            f"--log-dir {log_dir} already holds a run (log.txt) but no checkpoint to resume; to start afresh "
            f"there, move {log_txt} aside, or choose another --log-dir"
        )
    if earlier and not resume:
        raise UserError(
            f"--log-dir {log_dir} already holds a run ({', '.join(earlier)}); pass --resume to continue it, "
            "or choose another --log-dir"
        )


def in_use_message(log_dir: str, holder: str) -> str:
    return (
        f"--log-dir {log_dir} is in use by another run ({holder or 'another process'}); "
        "wait for it or stop it, or choose another --log-dir"
    )


def claim_log_dir(log_dir: str, resume_step: int | None, keep_evals: bool) -> IO:
    """Take the log dir for this run (rank 0): an advisory lock that the OS releases when the process
    dies, so a kill -9 never leaves a stale one; then a new log.txt, or the old one rewound to the
    checkpoint's step (resume_step; None for a fresh run). Returns the open lock file, to keep for
    the run's lifetime."""
    try:
        os.makedirs(log_dir, exist_ok=True)
        lock = open(os.path.join(log_dir, "train.lock"), "a+")
    except OSError as e:
        raise UserError(f"--log-dir {log_dir}: cannot write there ({os_error_text(e)})") from None
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UserError(in_use_message(log_dir, lock.read().strip())) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
    check_log_dir(log_dir, resume=resume_step is not None, probe_lock=False)  # again, now under the lock
    log_file = os.path.join(log_dir, "log.txt")
    if resume_step is None:
        open(log_file, "w").close()
    else:
        rewind_log(log_file, resume_step, keep_evals)
    return lock


def rewind_log(log_file: str, step: int, keep_evals: bool) -> None:
    """Drop log lines the resumed run will write again (those after the checkpoint), atomically."""
    if not os.path.exists(log_file):
        return
    with open(log_file) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # cut off mid-write by the crash

    def keep(line: str) -> bool:
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit():
            return True
        s = int(parts[0])
        return s < step or (s == step and keep_evals and parts[1] in ("val", "hella"))

    write_atomic(log_file, lambda f: f.write("".join(line for line in lines if keep(line)).encode()))


class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit; a second one aborts."""

    def __init__(self, verbose: bool):
        self.signum: int | None = None
        self.first = 0.0
        self.verbose = verbose
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.handle)

    @property
    def asked(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            # Ctrl-C under torchrun arrives twice at once (the terminal's SIGINT, then torchrun's
            # SIGTERM): only a later, deliberate second signal aborts
            if time.time() - self.first > 2.0:
                raise KeyboardInterrupt
            return
        self.signum, self.first = signum, time.time()
        if self.verbose:
            print(
                f"\n{signal.Signals(signum).name}: finishing this step, then checkpoint and exit (again to abort)",
                flush=True,
            )


class NonFiniteGuard:
    """Counts the skipped (non-finite) steps in a row, and stops the run after `limit` of them."""

    def __init__(self, log_dir: str, limit: int = 5):
        self.log_dir, self.limit = log_dir, limit
        self.in_a_row = 0

    def update(self, step: int, applied: bool) -> None:
        self.in_a_row = 0 if applied else self.in_a_row + 1
        if self.in_a_row >= self.limit:
            good = list_checkpoints(self.log_dir)
            raise UserError(
                f"stopping at step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"norm; last good checkpoint: {good[-1][1] if good else 'none'}; "
                "lower --max-lr or check the data, then --resume"
            )


def take_log_dir(log_dir: str, resumed: Checkpoint | None, *, master: bool, torchrun: bool, device: str) -> IO | None:
    """Rank 0 claims the log dir for a fresh run or the resumed one (claim_log_dir; the lock it returns
    is held for the run), and a failure there stops every rank of the job."""
    lock, error = None, None
    if master:
        try:
            step = None if resumed is None else resumed.state["step"]
            lock = claim_log_dir(log_dir, step, keep_evals=resumed is not None and resumed.state["periodic_done"])
        except UserError as e:
            error = e
    raise_on_every_rank(torchrun, device, error)
    return lock


def raise_on_every_rank(torchrun: bool, device: str, error: UserError | None) -> None:
    """Raise rank 0's error (or None) on every rank, so a rank-0-only check stops the whole job at once."""
    if torchrun:
        failed = torch.tensor([float(error is not None)], device=device)
        dist.broadcast(failed, src=0)
        if failed.item() and error is None:
            error = UserError("rank 0 stopped the run")  # only rank 0 prints
    if error is not None:
        raise error
