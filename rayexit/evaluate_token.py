"""Evaluate a multi-exit tagger: entity F1 of every exit, and F1 against speed-up per policy.

F1 is seqeval's entity-level F1 (conlleval rules) as a fraction in [0, 1]. Every curve point
is a real run of the batched SENTEE/TOKEE runner: its F1, its FLOPs against full depth (tokens
actually computed at each layer), and its wall-clock time against the same runner at full
depth on the same batches.
"""

from __future__ import annotations

import time

import torch
from seqeval.metrics import f1_score

from rayexit.data.conll import EncodedTokens, TokenBatch, token_batches
from rayexit.progress import progress
from rayexit.token_exits import TaggedRun, TokenPolicy, run_over_tokens
from rayexit.train.token_loop import word_logits

SENTEE_THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
TOKEE_THRESHOLDS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
TOKEE_WINDOWS = (1, 3, 5)


def default_token_sweep(
    windows: tuple[int, ...] = TOKEE_WINDOWS,
    tokee_thresholds: tuple[float, ...] = TOKEE_THRESHOLDS,
    sentee_thresholds: tuple[float, ...] = SENTEE_THRESHOLDS,
) -> list[TokenPolicy]:
    sweep = [TokenPolicy("sentee", t) for t in sentee_thresholds]
    sweep += [TokenPolicy("tokee", t, window=w) for w in windows for t in tokee_thresholds]
    return sweep


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> float:
    return float(f1_score(gold, predicted))


@torch.no_grad()
def exit_f1(model, data: EncodedTokens, gold: list[list[str]], batches: list[TokenBatch]) -> list[float]:
    """Entity F1 of every exit at full depth, exit 1 first."""
    per_layer: list[list[list[int]]] = [[[] for _ in range(data.num_sentences)] for _ in range(model.num_layers)]
    for batch in batches:
        logits = model(batch.input_ids, batch.attention_mask)
        for layer, z in enumerate(logits):
            predicted = word_logits(z, batch).argmax(-1)
            for b, row in enumerate(batch.rows):
                sentence, _ = data.pieces[row]
                per_layer[layer][sentence].extend(predicted[b, : len(data.word_starts[row])].tolist())
    return [entity_f1(gold, to_tags(model.labels, layer)) for layer in per_layer]


def to_tags(labels: list[str], ids: list[list[int]]) -> list[list[str]]:
    return [[labels[i] for i in sentence] for sentence in ids]


def timed_run(model, data: EncodedTokens, policy: TokenPolicy, batches: list[TokenBatch]) -> tuple[TaggedRun, float]:
    start = time.perf_counter()
    run = run_over_tokens(model, data, policy, batches=batches)
    return run, time.perf_counter() - start


def evaluate_token_model(
    model,
    data: EncodedTokens,
    gold: list[list[str]],
    batch_size: int = 32,
    sweep: list[TokenPolicy] | None = None,
    show_progress: bool = True,
) -> dict:
    model.eval()
    batches = list(token_batches(data, batch_size))
    exit_scores = exit_f1(model, data, gold, batches)
    labels = model.labels
    full_run, full_seconds = timed_run(model, data, TokenPolicy("none"), batches)

    def point(policy: TokenPolicy) -> dict:
        run, seconds = timed_run(model, data, policy, batches)
        return {
            **policy.to_dict(),
            "f1": entity_f1(gold, to_tags(labels, run.predictions)),
            "flops_speedup": run.full_flops / run.flops,
            "wallclock_speedup": full_seconds / seconds,
            "mean_exit_layer": run.mean_exit_layer(),
        }

    policies = sweep if sweep is not None else default_token_sweep()
    curve = [point(p) for p in progress(policies, desc="threshold sweep", enabled=show_progress)]
    return {
        "task": "token",
        "sentences": data.num_sentences,
        "words": sum(len(s) for s in gold),
        "batch_size": batch_size,
        "num_layers": model.num_layers,
        "exit_f1": exit_scores,
        "full": exit_scores[-1],
        "full_runner_f1": entity_f1(gold, to_tags(labels, full_run.predictions)),
        "full_depth_seconds": full_seconds,
        "full_flops": full_run.full_flops,
        "curve": curve,
    }


def best_at_speedup(curve: list[dict], policy: str, speedup: float, window: int | None = None) -> dict | None:
    """The highest-F1 point of `policy` whose FLOPs speed-up is at least `speedup`."""
    eligible = [
        p for p in curve
        if p["policy"] == policy and p["flops_speedup"] >= speedup and (window is None or p["window"] == window)
    ]
    return max(eligible, key=lambda p: p["f1"]) if eligible else None


def format_token_table(report: dict) -> str:
    lines = ["exit  F1"] + [f"{i + 1:>4}  {f:6.4f}" for i, f in enumerate(report["exit_f1"])]
    lines += ["", f"{'policy':<8}{'window':>7}{'threshold':>10}{'F1':>8}{'FLOPs x':>9}{'clock x':>9}"]
    for p in report["curve"]:
        window = p["window"] if p["policy"] == "tokee" else "-"
        lines.append(
            f"{p['policy']:<8}{window!s:>7}{p['threshold']:>10}{p['f1']:8.4f}"
            f"{p['flops_speedup']:9.2f}{p['wallclock_speedup']:9.2f}"
        )
    lines.append(f"full depth F1 {report['full']:.4f}")
    return "\n".join(lines)


def plot_token_curve(report: dict, path, title: str = ""):
    """F1 against FLOPs and wall-clock speed-up; SENTEE one line, TOKEE one line per window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rayexit.files import write_atomic

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    groups: dict[str, list[dict]] = {}
    for p in report["curve"]:
        name = "sentee" if p["policy"] == "sentee" else f"tokee w={p['window']}"
        groups.setdefault(name, []).append(p)
    for ax, key, label in (
        (axes[0], "flops_speedup", "FLOPs speed-up (x)"),
        (axes[1], "wallclock_speedup", f"wall-clock speed-up at batch {report.get('batch_size', '?')} (x)"),
    ):
        for name, points in sorted(groups.items()):
            points = sorted(points, key=lambda p: p[key])
            ax.plot([p[key] for p in points], [p["f1"] for p in points], marker="o", ms=3, label=name)
        ax.axhline(report["full"], color="grey", ls="--", lw=1, label="full depth")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("entity F1")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(title or "F1 against speed-up")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run_token_eval(model_dir: str, source: str, json_path: str, plot_path: str | None, batch_size: int) -> int:
    """`rayexit eval` for a token model directory."""
    from rayexit.data.conll import encode_tagged, load_tagged
    from rayexit.files import write_json
    from rayexit.models import load_tokenizer
    from rayexit.models.token import MultiExitForTokenClassification

    model = MultiExitForTokenClassification.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    sentences = load_tagged(source)
    if sentences.origin.startswith("atis:"):
        sentences = sentences.keep_known(model.labels)
    data = encode_tagged(tokenizer, sentences, model.labels, model.exit_config.max_length)
    report = evaluate_token_model(model, data, sentences.tags, batch_size)
    report["model"] = str(model_dir)
    report["data"] = source
    write_json(json_path, report)
    print(format_token_table(report))
    if plot_path:
        plot_token_curve(report, plot_path, title=f"{model_dir} on {source}")
        print(f"plot -> {plot_path}")
    print(f"report -> {json_path}")
    return 0
