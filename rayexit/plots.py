"""Accuracy against speed-up, drawn as PNG (written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rayexit.files import write_atomic  # noqa: E402


def plot_curve(report: dict, path: str | Path, title: str = "", score: str = "accuracy") -> Path:
    """Two panels, layer speed-up and wall-clock speed-up; one line per policy."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in (
        (axes[0], "layer_speedup", "layer speed-up (x)"),
        (axes[1], "wallclock_speedup", f"wall-clock speed-up at batch {report.get('batch_size', '?')} (x)"),
    ):
        for policy in sorted({p["policy"] for p in report["curve"]}):
            points = sorted((p for p in report["curve"] if p["policy"] == policy), key=lambda p: p[key])
            ax.plot([p[key] for p in points], [p[score] for p in points], marker="o", ms=3, label=policy)
        chosen = report.get("chosen")
        if chosen:
            ax.plot(chosen[key], chosen[score], marker="*", ms=14, color="black", ls="none", label="saved policy")
        ax.axhline(report["full"], color="grey", ls="--", lw=1, label="full depth")
        ax.axhline(report["full"] - 0.01, color="grey", ls=":", lw=1, label="full - 1 point")
        if key == "layer_speedup" and "oracle_layer_speedup" in report:
            ax.axvline(report["oracle_layer_speedup"], color="tab:red", ls=":", lw=1, label="oracle")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(score)
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(title or "accuracy against speed-up")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
