"""`rayexit bench exit`'s figure: test accuracy against layer speed-up, one line per method.

Each method's line joins the mean over seeds of its points chosen on validation (full depth,
then 1.5x, 2x and 3x), with the seeds' min-max accuracy as error bars; the single-exit
fine-tune is a horizontal line (its full accuracy) with its 1-point band dotted.
"""

from __future__ import annotations

import statistics
from pathlib import Path

POINTS = ("at_1.5x", "at_2x", "at_3x")


def method_line(items: list[dict]) -> list[tuple[float, float, float, float]]:
    """(mean layer speed-up, mean accuracy, min accuracy, max accuracy) at full depth and each point."""
    line = []
    full = [r["full"] for r in items]
    line.append((1.0, statistics.fmean(full), min(full), max(full)))
    for point in POINTS:
        chosen = [r[point] for r in items if point in r]
        if len(chosen) != len(items):
            continue
        accuracy = [p["accuracy"] for p in chosen]
        line.append((statistics.fmean(p["layer_speedup"] for p in chosen), statistics.fmean(accuracy),
                     min(accuracy), max(accuracy)))
    return line


def plot_methods(output: dict, path: str | Path) -> Path | None:
    """Write the PNG; None (nothing written) before any run has finished."""
    runs = list(output.get("runs", {}).values())
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayexit.files import write_atomic

    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, items in sorted(by_method.items()):
        seeds = len(items)
        if items[0].get("single_exit"):
            level = statistics.fmean(r["full"] for r in items)
            ax.axhline(level, color="black", lw=1.2, label=f"{method} full ({seeds} seeds)")
            ax.axhline(level - output.get("max_drop", 0.01), color="black", lw=0.8, ls=":", label=f"{method} - 1 point")
            continue
        line = method_line(items)
        xs, ys = [p[0] for p in line], [p[1] for p in line]
        error = [[p[1] - p[2] for p in line], [p[3] - p[1] for p in line]]
        ax.errorbar(xs, ys, yerr=error, marker="o", ms=4, capsize=3, label=f"{method} ({seeds} seeds)")
    ax.set_xlabel("layer speed-up (x), points chosen on validation")
    ax.set_ylabel("accuracy on SST-2 dev (mean over seeds, min-max bars)")
    ax.set_title(f"{output.get('model', '')}: {output.get('train_slice', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def quality_path(plot_path: str | Path) -> Path:
    """Where the time-to-quality figure goes: beside the main plot, `-quality` added to its name."""
    plot_path = Path(plot_path)
    return plot_path.with_name(f"{plot_path.stem}-quality{plot_path.suffix or '.png'}")


def plot_time_to_quality(output: dict, path: str | Path) -> Path | None:
    """One panel per seed: each method's 2x-point dev accuracy at its snapshots against training
    seconds, DeeBERT's final 2x-point accuracy (the bar) dashed. A snapshot is a marker, so the
    gap between two markers is the resolution a crossing is known to. None where no run has
    snapshots."""
    by_seed: dict[int, list[dict]] = {}
    for run in output.get("runs", {}).values():
        if run.get("snapshots"):
            by_seed.setdefault(run["seed"], []).append(run)
    if not by_seed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayexit.files import write_atomic

    seeds = sorted(by_seed)
    columns = min(3, len(seeds))
    rows = -(-len(seeds) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    colors: dict[str, str] = {}
    for ax, seed in zip(axes.flat, seeds):
        for run in sorted(by_seed[seed], key=lambda r: r["method"]):
            color = colors.setdefault(run["method"], f"C{len(colors)}")
            xs = [s["train_seconds"] for s in run["snapshots"]]
            ys = [s["at_2x"]["accuracy"] for s in run["snapshots"]]
            ax.plot(xs, ys, marker="o", ms=3, lw=1, color=color, label=run["method"])
            ttq = run.get("time_to_quality")
            if run["method"] == "deebert" and ttq:
                ax.axhline(ttq["bar"], color=color, lw=0.8, ls="--")
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.set_xlabel("training seconds (snapshots left out)", fontsize=8)
        ax.set_ylabel("2x-point accuracy, dev", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(seeds):]:
        ax.axis("off")
    fig.suptitle("time to DeeBERT's final 2x-point accuracy (dashed), each marker one snapshot", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return Path(path)
