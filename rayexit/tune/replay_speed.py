"""How many token exit settings a second the search replays, on a real data set's cached exits.

    python -m rayexit.tune.replay_speed --data ../shared/datasets/conll2003/valid.txt [--model DIR]

With `--model`, a trained token model directory makes the cache. Without it, the packaged
MiniLM encoder with freshly initialised tag heads does (a real encoder pass over the real
sentences; untrained heads make every word's tag vary across exits, the search's slowest
case). Prints the rate of the search `rayexit tune --task token` runs in every trial (the
global-threshold sweep, one-off set-up per level and window included) and of the direct
replay that also takes one threshold per layer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rayexit.config import TrainSettings
from rayexit.model_dir import ModelDir
from rayexit.tasks import task_named
from rayexit.token_exits import cache_token_exits
from rayexit.tune.thresholds import one_thread
from rayexit.tune.token_replay import TokenReplayCache, search_token_settings, threshold_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a CoNLL-style file (e.g. CoNLL-2003 valid.txt)")
    parser.add_argument("--model", help="a token model directory (default: MiniLM with new tag heads)")
    parser.add_argument("--thresholds", type=int, default=2048, help="thresholds per level and window")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 3, 5, 7, 9, 15])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--live", type=int, default=0, metavar="N",
        help="also run some SENTEE/TOKEE settings live on the first N sentences and report replay minus live",
    )
    args = parser.parse_args(argv)

    task = task_named("token")
    examples = task.load(args.data)
    if args.model:
        directory = ModelDir(args.model)
        model, tokenizer = directory.load_model(expected_task="token"), directory.load_tokenizer()
        labels = model.labels
    else:
        from rayexit.models import load_tokenizer

        labels = task.label_set(examples)
        model, tokenizer = task.new_model("minilm", labels, TrainSettings(seed=0)).eval(), load_tokenizer("minilm")
    data = task.encode(tokenizer, examples, labels, model.exit_config.max_length)
    start = time.perf_counter()
    cache = cache_token_exits(model, data)
    pass_seconds = time.perf_counter() - start
    start = time.perf_counter()
    replay = TokenReplayCache(cache, labels, data.gold)  # once per cache: layouts, chunk tables, segments
    prepare_seconds = time.perf_counter() - start

    rates = []
    for _ in range(args.repeats):
        result = search_token_settings(replay, windows=args.windows, thresholds=args.thresholds)
        rates.append(result.settings_per_second)
    grid = threshold_grid(replay, 256)
    direct = []
    with one_thread():
        for _ in range(args.repeats):
            per_layer = grid[:, None].expand(-1, replay.num_layers)
            start = time.perf_counter()
            replay.evaluate("tokee", 3, per_layer)
            direct.append(len(grid) / (time.perf_counter() - start))
    figures = {
        "data": args.data,
        "model": args.model or "minilm with new tag heads",
        "sentences": data.num_sentences,
        "words": replay.num_words,
        "words_in_varying_segments": replay.variable_positions,
        "layers": replay.num_layers,
        "full_pass_seconds": pass_seconds,
        "prepare_seconds": prepare_seconds,
        "search_settings": result.settings,
        "search_settings_per_second": sorted(rates),
        "direct_settings_per_second": sorted(direct),
        "threads": 1,
    }
    if args.live:
        figures["live"] = live_gaps(model, tokenizer, task.subset(examples, list(range(args.live)), "live"), labels)
    print(json.dumps(figures, indent=2))
    if args.json:
        from rayexit.files import write_json

        write_json(args.json, figures)
    return 0


def live_gaps(model, tokenizer, examples, labels: list[str]) -> list[dict]:
    """Replayed minus live figures for settings at quantiles of the cached uncertainties."""
    from rayexit.policy import ExitPolicy

    task = task_named("token")
    data = task.encode(tokenizer, examples, labels, model.exit_config.max_length)
    replay = TokenReplayCache(cache_token_exits(model, data), labels, data.gold)
    values = replay.u_words[:, :-1].reshape(-1)
    cuts = torch.quantile(values[:200_000], torch.tensor([0.5, 0.7, 0.85])).tolist()
    out = []
    for kind, window in [("sentee", 1), ("tokee", 1), ("tokee", 3), ("tokee", 5)]:
        for threshold in cuts:
            policy = ExitPolicy(kind, float(threshold), window=window if kind == "tokee" else 3)
            replayed = replay.evaluate(kind, window, torch.tensor([threshold]), keep_halting=True)
            live = task.run_live(model, data, task.eval_batches(data, 32), policy)
            halt = torch.zeros_like(replayed.halting[0])
            for row, (sentence, first) in enumerate(data.pieces):
                count = len(data.word_starts[row])
                halt[row, :count] = torch.tensor(live.exit_layers[sentence][first : first + count])
            mask = replay.cache.word_mask
            out.append({
                "policy": policy.describe(),
                "replay_f1": float(replayed.f1[0]),
                "live_f1": live.score,
                "replay_flops_speedup": float(replayed.flops_speedup[0]),
                "live_flops_speedup": live.flops_speedup,
                "words_halting_elsewhere": int((replayed.halting[0] != halt)[mask].sum()),
                "words": int(mask.sum()),
            })
    return out


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
