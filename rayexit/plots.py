"""Accuracy against speed-up, drawn as PNG (written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rayexit.files import write_atomic  # noqa: E402


def plot_curve(report: dict, path: str | Path, title: str = "", score: str = "accuracy") -> Path:
    """Left: the replayed curve against the task's speed-up (layers or FLOPs), one line per policy
    kind; right: the timed points against wall-clock speed-up, with their min-max spread."""
    cost = report.get("cost", "layer_speedup")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    groups: dict[str, list[dict]] = {}
    for p in report["curve"]:
        policy = p["policy"]
        name = policy["kind"] + (f" w={policy['window']}" if "window" in policy else "")
        groups.setdefault(name, []).append(p)
    for name, points in sorted(groups.items()):
        points = sorted(points, key=lambda p: p[cost])
        axes[0].plot([p[cost] for p in points], [p[score] for p in points], marker="o", ms=3, label=name)
    if cost == "layer_speedup" and "oracle_layer_speedup" in report:
        axes[0].axvline(report["oracle_layer_speedup"], color="tab:red", ls=":", lw=1, label="oracle")
    for p in report.get("timed", []):
        low, high = p["wallclock_spread"]
        error = [[p["wallclock_speedup"] - low], [high - p["wallclock_speedup"]]]
        axes[1].errorbar(p["wallclock_speedup"], p[score], xerr=error, marker="o", capsize=3, label=p["describe"])
    selected = report.get("selected")
    if selected:
        for ax, key in ((axes[0], cost), (axes[1], "wallclock_speedup")):
            ax.plot(selected[key], selected[score], marker="*", ms=14, color="black", ls="none", label="selected")
    for ax, label in (
        (axes[0], f"{cost.replace('_', ' ')} (x), replayed"),
        (axes[1], f"wall-clock speed-up at batch {report.get('batch_size', '?')} (x), median and range"),
    ):
        ax.axhline(report["full"], color="grey", ls="--", lw=1, label="full depth")
        ax.axhline(report["full"] - 0.01, color="grey", ls=":", lw=1, label="full - 1 point")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel(score)
    fig.suptitle(title or f"{score} against speed-up")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
