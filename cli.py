"""
The command-line layer shared by the four scripts (train_gpt.py, fineweb.py, hellaswag.py, sample.py):
one error type, flags declared once on a config dataclass with their valid range (and, for the
trainer, what --resume does with them), the cli() wrapper that turns a mistake into one line, and
atomic writes. It imports no torch, so fineweb.py's tokenizer workers stay light.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import Field, field, fields
from typing import Any, BinaryIO, NoReturn, TypeVar

try:
    import resource  # the file-size limit, to explain a short write; POSIX only
except ImportError:
    resource = None

Config = TypeVar("Config")

# What --resume does with a trainer flag (the `resume` of flag()):
RESTORED = "restored"  # taken from the checkpoint; a different value given now is refused (it changes what is learned)
MAY_CHANGE = (
    "may change"  # taken from the checkpoint unless given; a given value is used (how the run is watched or computed)
)
NOT_RESTORED = "not restored"  # a choice of this invocation only, never taken from the checkpoint
RESUME_RULES = (RESTORED, MAY_CHANGE, NOT_RESTORED)


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a directory): cli() prints it as one
    `error: ...` line and exits 1, with no traceback."""


def flag(
    default: Any,
    help: str,
    *,
    lo: float | None = None,
    gt: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    resume: str = RESTORED,
) -> Any:
    """A config field that is also a command-line flag: default, help and valid range in one place
    (lo <= value, gt < value, value <= hi), and what --resume does with it (RESUME_RULES)."""
    assert resume in RESUME_RULES, resume
    metadata = dict(help=help, lo=lo, gt=gt, hi=hi, choices=choices, metavar=metavar, resume=resume)
    return field(default=default, metadata=metadata)


def flags_with_rule(cls: type, rule: str) -> set[str]:
    """The names of the fields of a config dataclass whose resume rule is `rule`."""
    return {f.name for f in fields(cls) if f.metadata["resume"] == rule}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line through cli(), not argparse's usage block
        raise UserError(f"{message} (see --help)")


def flag_name(name: str) -> str:
    """The command-line spelling of a config field: max_lr -> --max-lr."""
    return "--" + name.replace("_", "-")


def _range_text(m: Any) -> str:
    bounds = [(">=", m["lo"]), (">", m["gt"]), ("<=", m["hi"])]
    return " and ".join(f"{op} {bound}" for op, bound in bounds if bound is not None)


def integer(text: str) -> int:
    """An int flag also takes an integral float such as 1e8 (a big number is easier to type so)."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer() or abs(number) > 2**53:  # beyond 2**53 a float is not exact
            raise
        return int(number)


def _argument(f: Field) -> dict[str, Any]:
    """argparse's keyword arguments for one config field: its type, help (with range and default)."""
    m = f.metadata
    kind = str(f.type).replace(" | None", "")
    help = m["help"]
    if help != argparse.SUPPRESS:
        bounds = _range_text(m)
        help += f" [{bounds}]" if bounds else ""
        help += f" (default: {f.default})" if f.default not in (None, "") else ""
    kwargs: dict[str, Any] = dict(help=help, metavar=m["metavar"], choices=m["choices"])
    if kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind == "list[str]":
        kwargs["nargs"] = "+"
    else:
        kwargs["type"] = {"int": integer, "float": float, "str": str}[kind]
    return kwargs


def config_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """argparse flags derived from a config dataclass: --field-name, with its type, help and range."""
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    for f in fields(cls):
        parser.add_argument(flag_name(f.name), dest=f.name, **_argument(f))
    return parser


def parse_config(cls: type[Config], argv: list[str] | None, description: str) -> tuple[Config, set[str]]:
    """The config from the command line, every number checked against its declared range before any
    work, and the names of the flags actually given (so --resume can tell a default from a choice)."""
    given = vars(config_parser(cls, description).parse_args(argv))
    config = cls(**given)
    for f in fields(cls):
        value, m = getattr(config, f.name), f.metadata
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise UserError(f"{flag_name(f.name)} {value}: must be a finite number")
        too_low = (m["lo"] is not None and value < m["lo"]) or (m["gt"] is not None and value <= m["gt"])
        if too_low or (m["hi"] is not None and value > m["hi"]):
            raise UserError(f"{flag_name(f.name)} {value}: out of range; use a value {_range_text(m)}")
    return config, set(given)


def os_error_text(e: OSError) -> str:
    """'permission denied', 'no space left on device', 'file too large', ...: the cause of an OSError in
    words: its strerror (the OS's message, first letter lowered), else the message of its errno, else
    its own text, else its class name as it is spelled."""
    if e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    if isinstance(e.errno, int) and e.errno > 0:
        reason = os.strerror(e.errno)
        return reason[0].lower() + reason[1:]
    return " ".join(str(e).split()) or type(e).__name__


def import_optional(module: str, missing: str, context: str, way_out: str = "") -> Any:
    """`import module` for a feature that needs an optional package: a UserError with `missing` if the
    package is not installed, and one saying that it is installed but cannot be imported (with the
    cause, then `way_out`) if importing it fails otherwise (a broken install, a missing dependency)."""
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == package:
            raise UserError(missing) from None
        error: Exception = e
    except Exception as e:  # a broken package raises anything at import
        error = e
    cause = " ".join(f"{type(error).__name__}: {error}".split())
    cause = cause if len(cause) <= 200 else cause[:197] + "..."
    raise UserError(
        f"{context}: {package} is installed but cannot be imported ({cause}); repair it: "
        f"pip install --force-reinstall {package}{way_out}"
    ) from None


def is_rank0() -> bool:
    """Rank 0 of a torchrun job, or a plain process; usable before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's main(argv): a UserError or a filesystem error becomes one `error:` line and
    exit 1 (printed by rank 0 only under torchrun, though every rank exits 1); Ctrl-C exits 130."""
    try:
        main(argv)
        return
    except UserError as e:
        message = str(e)
    except OSError as e:  # a full disk, a read-only or missing dir: the environment's fault, not a bug
        paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
        message = f"{paths}: {os_error_text(e)}" if paths else os_error_text(e)
    except MemoryError:
        message = "out of memory; lower the batch size, the model or the shard size"
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    if is_rank0():
        print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _fsync_dir(path: str) -> None:
    # the rename itself is only durable once the directory entry is on disk
    if os.name != "posix":
        return  # Windows cannot open a directory; NTFS journals the rename anyway
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """A reader (or a resumed run) sees either the old file or the complete new one, never a torn
    one: write a temp file beside it, sync it, then rename over. A failed write leaves no temp file
    and raises a UserError naming the cause and the path."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:
        # torch.save reports a failed write as a RuntimeError of its C++ writer; the OSError that
        # caused it is its context
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        reason = _write_error_text(cause, tmp) if isinstance(cause, OSError) else None
        if os.path.exists(tmp):
            os.remove(tmp)
        if reason is not None:
            raise UserError(f"{reason} while writing {path}") from e
        raise


def _write_error_text(e: OSError, tmp: str) -> str:
    """os_error_text of a failed write; for one without an errno (numpy reports a short write only as
    "N requested and M written"), the full disk or the file-size limit that explains it, if one does."""
    text = os_error_text(e)
    if e.errno is not None:
        return text
    try:
        size = os.path.getsize(tmp)
        free = os.statvfs(os.path.dirname(os.path.abspath(tmp))).f_bavail
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else -1
    except (OSError, AttributeError):
        return text
    if free == 0:
        return f"no space left on device ({text})"
    if resource and limit != resource.RLIM_INFINITY and size >= limit:
        return f"file too large for the file-size limit of {limit} bytes (ulimit -f; {text})"
    return text
