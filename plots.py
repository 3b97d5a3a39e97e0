"""
log.txt read back and drawn: loss, val perplexity, HellaSwag and the LR against step, as a PNG, for
our logs and build-nanogpt's (`{step} {stream} {value}` lines). matplotlib is imported only to draw.
"""

from __future__ import annotations

import math
import os
import sys

from cli import UserError, import_optional, write_atomic

GPT2_124M_REFERENCE = {"val": 3.2924, "hella": 0.2955}  # OpenAI's GPT-2 124M on FineWeb-Edu val / HellaSwag
PLOTTED = {"train", "val", "hella", "lr"}  # the streams curves.png draws


def read_log(log_file: str, skipped: list[int] | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """stream -> (steps, values) from a log.txt (ours or build-nanogpt's: `{step} {stream} {value}`);
    the numbers of the lines that are not such lines go to `skipped`, if given."""
    streams: dict[str, tuple[list[int], list[float]]] = {}
    with open(log_file) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            try:
                if len(parts) != 3 or not parts[0].isdigit():
                    raise ValueError
                value = float(parts[2])
            except ValueError:  # not a log line, or one cut off by a crash
                if parts and skipped is not None:
                    skipped.append(lineno)
                continue
            steps, values = streams.setdefault(parts[1], ([], []))
            steps.append(int(parts[0]))
            values.append(value)
    return streams


def plot_curves(log_file: str, out_png: str, reference_124m: bool = False) -> None:
    """Loss, val perplexity and HellaSwag against step, as a PNG (written atomically)."""
    matplotlib = import_optional("matplotlib", "drawing curves.png needs matplotlib: pip install matplotlib", out_png)
    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    s = read_log(log_file)
    panels = 2 + ("hella" in s) + ("lr" in s)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax = axes[0]
    if "train" in s:
        ax.plot(*s["train"], label="train loss", alpha=0.6)
    if "val" in s:
        ax.plot(*s["val"], label="val loss", marker=".")
    if reference_124m:
        ax.axhline(GPT2_124M_REFERENCE["val"], color="r", ls="--", label="GPT-2 124M val")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    _legend(ax)
    ax = axes[1]
    if "val" in s:
        ax.plot(s["val"][0], [math.exp(min(v, 700)) for v in s["val"][1]], marker=".", label="val ppl")
        ax.set_yscale("log")
    if reference_124m:
        ax.axhline(math.exp(GPT2_124M_REFERENCE["val"]), color="r", ls="--", label="GPT-2 124M")
    ax.set(xlabel="step", ylabel="perplexity", title="val perplexity")
    _legend(ax)
    if "hella" in s:
        ax = axes[2]
        ax.plot(*s["hella"], marker=".", label="acc_norm")
        if reference_124m:
            ax.axhline(GPT2_124M_REFERENCE["hella"], color="r", ls="--", label="GPT-2 124M")
        ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
        _legend(ax)
    if "lr" in s:
        axes[-1].plot(*s["lr"])
        axes[-1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    write_atomic(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty panel (a log without val) gets none, and no warning
        ax.legend()


def draw_curves(log_file: str, reference_124m: bool) -> None:
    """curves.png beside a running log.txt; a failure is a warning, since a picture is never worth a dead run."""
    try:
        plot_curves(log_file, os.path.join(os.path.dirname(log_file), "curves.png"), reference_124m)
    except Exception as e:
        print(f"warning: could not draw curves.png ({type(e).__name__}: {e})", file=sys.stderr)


def plot_log(log_file: str, reference_124m: bool) -> None:
    """--plot: curves.png beside any log.txt (ours or build-nanogpt's)."""
    if not os.path.isfile(log_file):
        raise UserError(f"--plot {log_file}: no such log file")
    skipped: list[int] = []
    try:
        streams = read_log(log_file, skipped)
    except UnicodeDecodeError as e:
        raise UserError(f"--plot {log_file}: not a text file ({e.reason} at byte {e.start}); pass a log.txt") from None
    if not streams.keys() & PLOTTED:
        raise UserError(
            f"--plot {log_file}: nothing to plot (no `STEP STREAM NUMBER` line of {', '.join(sorted(PLOTTED))}); "
            "pass the log.txt of a train_gpt.py or build-nanogpt run"
        )
    out = os.path.join(os.path.dirname(log_file), "curves.png")
    plot_curves(log_file, out, reference_124m)
    if skipped:
        lines = ", ".join(map(str, skipped[:3])) + (", ..." if len(skipped) > 3 else "")
        print(f"note: skipped {len(skipped)} line(s) that are not `STEP STREAM NUMBER`: line {lines}", file=sys.stderr)
    print(f"wrote {out}")
