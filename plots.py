"""
log.txt read back and drawn: loss, val perplexity, HellaSwag and the LR against step, as a PNG, for
our logs and build-nanogpt's (`{step} {stream} {value}` lines). matplotlib is imported only to draw.
"""

from __future__ import annotations

import math
import os
import sys

from cli import UserError, write_atomic

GPT2_124M_REFERENCE = {"val": 3.2924, "hella": 0.2955}  # OpenAI's GPT-2 124M on FineWeb-Edu val / HellaSwag


def read_log(log_file: str) -> dict[str, tuple[list[int], list[float]]]:
    """stream -> (steps, values) from a log.txt (ours or build-nanogpt's: `{step} {stream} {value}`)."""
    streams: dict[str, tuple[list[int], list[float]]] = {}
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0].isdigit():
                try:
                    value = float(parts[2])
                except ValueError:
                    continue  # a line cut off by a crash
                steps, values = streams.setdefault(parts[1], ([], []))
                steps.append(int(parts[0]))
                values.append(value)
    return streams


def plot_curves(log_file: str, out_png: str, reference_124m: bool = False) -> None:
    """Loss, val perplexity and HellaSwag against step, as a PNG (written atomically)."""
    import matplotlib

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
    ax.legend()
    ax = axes[1]
    if "val" in s:
        ax.plot(s["val"][0], [math.exp(min(v, 700)) for v in s["val"][1]], marker=".", label="val ppl")
        ax.set_yscale("log")
    if reference_124m:
        ax.axhline(math.exp(GPT2_124M_REFERENCE["val"]), color="r", ls="--", label="GPT-2 124M")
    ax.set(xlabel="step", ylabel="perplexity", title="val perplexity")
    ax.legend()
    if "hella" in s:
        ax = axes[2]
        ax.plot(*s["hella"], marker=".", label="acc_norm")
        if reference_124m:
            ax.axhline(GPT2_124M_REFERENCE["hella"], color="r", ls="--", label="GPT-2 124M")
        ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
        ax.legend()
    if "lr" in s:
        axes[-1].plot(*s["lr"])
        axes[-1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    write_atomic(out_png, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


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
    out = os.path.join(os.path.dirname(log_file), "curves.png")
    plot_curves(log_file, out, reference_124m)
    print(f"wrote {out}")
