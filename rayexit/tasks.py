"""The two tasks rayexit knows, behind one interface: sentence classification and token tagging.

Everything that differs between them lives here: how data is loaded (and which labels are
kept), encoded and cut into batches, which model class holds it, what is scored (accuracy or
entity F1), what a speed-up is measured in (layers or FLOPs), which runner exits early and
how a policy is replayed on a cached full pass. Commands, the training loop, the sweep
harness and Serve ask the task instead of testing `task == "token"` themselves.

Scores are kept as per-example statistics (`Outcome.stats`), so one rule can judge a drop
with its uncertainty for both metrics: accuracy is the mean of `correct`; entity F1 is
2 tp / (2 tp + fp + fn) over summed per-sentence counts (seqeval's micro F1).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from rayexit.config import POOLINGS
from rayexit.errors import RayexitError
from rayexit.policy import FULL_DEPTH, NEVER_SURE, ExitPolicy, precision_thresholds

log = logging.getLogger(__name__)

# Replay is cheap, and with 10 quantiles the fastest point within a bar was often a long step short
# of the bar's edge (docs/romebert/choosing.md, "Choosing the point"), so every 2%.
SENTENCE_GRID_QUANTILES = tuple(round(0.02 * i, 2) for i in range(1, 50))
# Per-exit precision targets for `precision_thresholds`, as fractions of the way from the final
# exit's validation accuracy (0) to always right (1); negative steps ask less than the final gives.
PRECISION_STEPS = (-0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TOKEN_GRID_QUANTILES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
# Most words are sure at every exit, so quantiles of all word uncertainties bunch near zero and
# stop short of the thresholds a 2-3x point needs; this ladder (the paper's recipes sit at 0.1-0.25)
# covers the tail. Replay is cheap, so a longer grid costs little.
TOKEN_GRID_LADDER = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
TOKEE_WINDOWS = (1, 3, 5)

# Learning rates (encoder, exit heads) when the user sets none: measured in docs/defaults.md on
# the packaged MiniLM and a random-initialised BERT, on SST-2 and ATIS / CoNLL-2003 slices.
SENTENCE_RATES = (1e-4, 1e-3)
TOKEN_RATES = (1e-4, 1e-3)
# An encoder whose pooler was trained (BERT-base and kin, pretrained with next-sentence
# prediction) keeps RomeBERT's published setting: not measurable here (no hub), and 1e-4 is
# above the range BERT's authors recommend for fine-tuning it (2e-5 to 5e-5).
PAPER_RATES = (2e-5, 2e-5)  # heads at the encoder's rate, as in RomeBERT


@dataclass
class Outcome:
    """What one policy gives on one data set, replayed or run live."""

    policy: ExitPolicy
    stats: torch.Tensor  # [N, k] per-example statistics the metric is computed from
    score: float  # accuracy or entity F1
    layer_speedup: float
    flops_speedup: float
    exit_layers: list = field(default_factory=list)

    def figures(self, task: Task) -> dict:
        return {
            "policy": self.policy.to_dict(),
            "describe": self.policy.describe(),
            task.metric: self.score,
            "layer_speedup": self.layer_speedup,
            "flops_speedup": self.flops_speedup,
        }


class Task:
    name = ""
    metric = ""  # the score's key in reports: accuracy | f1
    cost = ""  # the speed-up a budget is stated in: layer_speedup | flops_speedup
    exit_key = ""  # per-exit scores in reports and training history

    # -- data ------------------------------------------------------------------------------------

    def load(self, source: str, max_examples: int | None = None, known: list[str] | None = None):
        """Examples from `source`; with `known`, the packaged ATIS test split's unseen labels are left out."""
        raise NotImplementedError

    def label_set(self, examples) -> list[str]:
        raise NotImplementedError

    def subset(self, examples, rows: list[int], part: str):
        raise NotImplementedError

    def strata(self, examples) -> list[str]:
        """What a validation split is stratified by."""
        raise NotImplementedError

    def encode(self, tokenizer, examples, labels: list[str], max_length: int):
        raise NotImplementedError

    def batches(self, data, batch_size: int, *, shuffle_seed: int | None = None, rank: int = 0, world_size: int = 1):
        raise NotImplementedError

    def split(self, examples, fraction: float, seed: int):
        """(fit, validation): per stratum, a seeded shuffle sends `fraction` of it to validation.

        Hand-written rather than `datasets.Dataset.train_test_split(stratify_by_column=...)`:
        that one needs a ClassLabel column (token strata are computed, not a column), refuses
        strata with a single member, and does not promise every stratum a validation member;
        one generator per stratum also keeps the other strata's picks when a class is added.
        """
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(self.strata(examples)):
            groups.setdefault(key, []).append(index)
        chosen: list[int] = []
        for key in sorted(groups):
            members = groups[key][:]
            random.Random(f"{seed}:{key}").shuffle(members)  # one generator per stratum: others stay put
            take = min(max(round(len(members) * fraction), 1), len(members) - 1) if len(members) >= 2 else 0
            chosen += members[:take]
        if not chosen:
            raise RayexitError(f"{examples.origin}: too few examples to carve a validation split ({len(examples)})")
        picked = set(chosen)
        fit = [i for i in range(len(examples)) if i not in picked]
        return self.subset(examples, fit, "fit"), self.subset(examples, sorted(chosen), "validation")

    # -- model -------------------------------------------------------------------------------------

    def model_class(self):
        raise NotImplementedError

    def exit_config(self, labels: list[str], settings):
        raise NotImplementedError

    backbone_defaults: tuple[str, ...] = ("lr", "head_lr")  # settings whose default depends on the backbone
    rates: tuple[float, float] = SENTENCE_RATES
    # Settings this task's models never read, with why: given anyway, they are refused, not ignored.
    unread_settings: ClassVar[dict[str, str]] = {}

    def check_settings(self, settings) -> None:
        """Refuse a setting this task would silently ignore (before any data or weights are read)."""
        for name, why in self.unread_settings.items():
            value = getattr(settings, name)
            if value is not None:
                raise RayexitError(f"{name}: got {value!r} for a {self.name} task, which {why}; leave {name} out")
        if settings.policy is not None and settings.method != "finetune":
            settings.policy.check_task(self.name)

    def default_settings(self, facts, settings) -> dict[str, tuple]:
        """Settings this task chooses for a backbone (`rayexit.models.backbone.BackboneFacts`)
        when the user left them unset: {name: (value, why)}. Measured in docs/defaults.md."""
        if facts.trained_pooler:
            why = "RomeBERT's setting for BERT-base-like encoders (pooler trained in pretraining)"
            return {"lr": (PAPER_RATES[0], why), "head_lr": (settings.lr or PAPER_RATES[1], f"the encoder's; {why}")}
        lr, head_lr = self.rates
        return {
            "lr": (lr, f"measured for {self.name} exits on MiniLM-sized and random-initialised encoders"),
            "head_lr": (head_lr, "exit heads start from scratch and learn little at the encoder's rate"),
        }

    def new_model(self, base_model: str, labels: list[str], settings):
        torch.manual_seed(settings.seed)  # heads are initialised here: the run's seed must cover them
        return self.model_class().from_backbone(base_model, self.exit_config(labels, settings))

    # -- scoring and running -------------------------------------------------------------------------

    def score_of(self, stats: torch.Tensor) -> torch.Tensor:
        """The metric from per-example statistics [..., N, k] (leading dims: bootstrap draws)."""
        raise NotImplementedError

    def exit_scores(self, model, data, batch_size: int, device=None) -> list[float]:
        """Every exit's score at full depth, exit 1 first."""
        replay = self.replay(model, data, batch_size, device)
        return replay.exit_scores()

    def replay(self, model, data, batch_size: int, device=None):
        """One full-depth pass, from which any policy's outcome is computed without the model."""
        raise NotImplementedError

    def eval_batches(self, data, batch_size: int) -> list:
        return list(self.batches(data, batch_size))

    def run_live(self, model, data, batches: list, policy: ExitPolicy) -> Outcome:
        """`policy` through the batched early-exit runner on `batches` (what Serve runs)."""
        raise NotImplementedError

    def default_grid(self, replay) -> list[ExitPolicy]:
        """Policies to sweep, placed at quantiles of `replay`'s own scores: give it validation data."""
        raise NotImplementedError


# -- sentence classification -------------------------------------------------------------------


class SentenceTask(Task):
    name = "sequence"
    metric = "accuracy"
    cost = "layer_speedup"
    exit_key = "exit_accuracy"
    backbone_defaults = ("pooling", "lr", "head_lr")

    def load(self, source, max_examples=None, known=None):
        from rayexit.data import load_text_classification

        examples = load_text_classification(source, max_examples)
        if known is not None and examples.origin.startswith("atis:"):
            examples = _keep_known_labels(examples, known)
        return examples

    def label_set(self, examples) -> list[str]:
        labels = set(examples.labels)
        if len(labels) < 2:
            raise RayexitError(f"{examples.origin}: found only one label ({examples.labels[0]!r}); need at least two")
        if all(label.lstrip("-").isdigit() for label in labels):  # numerically, so '10' follows '9'
            return sorted(labels, key=int)
        return sorted(labels)

    def subset(self, examples, rows, part):
        from rayexit.data import TextExamples

        lines = [examples.lines[i] for i in rows] if examples.lines else None
        texts, labels = [examples.texts[i] for i in rows], [examples.labels[i] for i in rows]
        return TextExamples(texts, labels, f"{examples.origin}[{part}]", lines)

    def strata(self, examples) -> list[str]:
        return list(examples.labels)

    def encode(self, tokenizer, examples, labels, max_length):
        from rayexit.data import encode_examples

        return encode_examples(tokenizer, examples, labels, max_length)

    def batches(self, data, batch_size, *, shuffle_seed=None, rank=0, world_size=1):
        from rayexit.data.encode import iterate_batches

        return iterate_batches(data, batch_size, shuffle_seed=shuffle_seed, rank=rank, world_size=world_size)

    def default_settings(self, facts, settings):
        return {**super().default_settings(facts, settings), "pooling": _pooling(facts)}

    def model_class(self):
        from rayexit.models import MultiExitForSequenceClassification

        return MultiExitForSequenceClassification

    def exit_config(self, labels, settings):
        from rayexit.models import ExitConfig

        if settings.pooling is None:  # `rayexit.train.recipe.prepare` chooses it from the backbone
            raise RayexitError(
                f"pooling: not chosen; expected one of {', '.join(POOLINGS)} (prepare() picks one from the backbone)"
            )
        return ExitConfig(
            task=self.name, labels=labels, head=settings.head, pooling=settings.pooling, dropout=settings.dropout,
            max_length=settings.max_length, method=settings.method, policy=self._saved_policy(settings),
        )

    def _saved_policy(self, settings) -> ExitPolicy:
        # A single-exit fine-tune's intermediate heads never trained: it answers at full depth only.
        if settings.method == "finetune":
            return FULL_DEPTH
        return (settings.policy or ExitPolicy()).check_task(self.name)

    def score_of(self, stats):
        return stats[..., 0].double().mean(-1)

    def replay(self, model, data, batch_size, device=None):
        from rayexit.exits import ExitCache, collect_exit_logits

        model.eval()
        batches = _moved(self.batches(data, batch_size), device)
        logits, labels = collect_exit_logits(model, batches)
        return SentenceReplay(self, model, ExitCache(logits.cpu()), labels.cpu(), data, batch_size)

    def run_live(self, model, data, batches, policy):
        from rayexit.exits import run_early_exit

        results = [run_early_exit(model, ids, mask, policy) for ids, mask, _ in batches]
        predictions = torch.cat([r.predictions for r in results])
        layers = torch.cat([r.exit_layers for r in results])
        labels = torch.cat([b[2] for b in batches])
        stats = (predictions == labels).double()[:, None]
        flops, full = sum(r.flops for r in results), sum(r.full_flops for r in results)
        return Outcome(
            policy, stats, float(self.score_of(stats)), model.num_layers / layers.double().mean().item(),
            full / max(flops, 1), layers.tolist(),
        )

    def default_grid(self, replay):
        cache = replay.cache
        quantiles = torch.tensor(SENTENCE_GRID_QUANTILES, dtype=torch.float32)
        entropies = torch.quantile(cache.entropy[:, :-1].flatten(), quantiles).tolist()
        confidences = torch.quantile(cache.confidence[:, :-1].flatten(), 1 - quantiles).tolist()
        grid = [ExitPolicy("entropy", _round(t)) for t in sorted(set(entropies))]
        grid += [ExitPolicy("maxprob", _round(t)) for t in sorted(set(confidences), reverse=True)]
        grid += [ExitPolicy("patience", p) for p in range(1, cache.num_layers)]
        return grid + self.precision_grid(replay)

    def precision_grid(self, replay) -> list[ExitPolicy]:
        """Maxprob with one threshold per exit, each exit held to the same validation precision."""
        cache = replay.cache
        if cache.num_layers < 2:
            return []
        correct = cache.argmax == replay.labels[:, None]
        final = float(correct[:, -1].double().mean())
        grid, seen = [], set()
        for step in PRECISION_STEPS:
            target = final + step * (1.0 - final)
            thresholds = precision_thresholds(cache.confidence, correct, target)
            values = [t if t == NEVER_SURE else _round(t) for t in thresholds]
            if all(t == NEVER_SURE for t in values) or tuple(values) in seen:
                continue
            seen.add(tuple(values))
            grid.append(ExitPolicy("maxprob", values))
        return grid


def _pooling(facts) -> tuple[str, str]:
    """The first token is a sentence summary only where something trained it (BERT's NSP pooler);
    elsewhere every token is read. A sentence-embedding encoder trained under the mean gets
    `attention`, a learned weighting per exit that starts as that mean; an encoder with an
    untrained pooler keeps the plain mean (docs/defaults.md measures both on both kinds)."""
    if facts.pooling == "mean" and not facts.rayexit_model:
        why = "a learned weighting of the tokens per exit, starting from the mean it was trained with"
        return "attention", f"{facts.pooling_source} says mean; attention is {why}"
    if facts.pooling is not None:
        return facts.pooling, f"{facts.pooling_source} says {facts.pooling}"
    if facts.trained_pooler:
        return "cls", "its pooler was trained (non-zero bias): its first token summarises the text"
    if facts.trained_pooler is False:
        return "mean", "its pooler was never trained (bias still zero: random-initialised or distilled encoder)"
    return "mean", "it has no pooler weights, so nothing trained its first token to summarise the text"


class SentenceReplay:
    """A sentence set's full pass: every exit's logits, replayed exactly for any policy."""

    def __init__(self, task: SentenceTask, model, cache, labels: torch.Tensor, data, batch_size: int) -> None:
        from rayexit.flops import replay_full_sentence_flops, replay_sentence_flops

        self.task, self.cache, self.labels = task, cache, labels
        self.num_layers = cache.num_layers
        lengths = torch.tensor([len(ids) for ids in data.input_ids])
        batches = [list(range(s, min(s + batch_size, len(data)))) for s in range(0, len(data), batch_size)]
        self._flops = lambda layers: replay_sentence_flops(model, layers, lengths, batches)
        self._full_flops = replay_full_sentence_flops(model, lengths, batches)

    def exit_scores(self) -> list[float]:
        return self.cache.exit_accuracies(self.labels)

    def oracle_layer_speedup(self) -> float:
        return self.num_layers / self.cache.oracle_exit_layers().double().mean().item()

    def outcome(self, policy: ExitPolicy) -> Outcome:
        result = self.cache.simulate(policy)
        stats = (result.predictions == self.labels).double()[:, None]
        return Outcome(
            policy, stats, float(self.task.score_of(stats)), result.layer_speedup(self.num_layers),
            self._full_flops / max(self._flops(result.exit_layers), 1), result.exit_layers.tolist(),
        )


# -- token tagging -----------------------------------------------------------------------------


class TokenTask(Task):
    name = "token"
    metric = "f1"
    cost = "flops_speedup"
    exit_key = "exit_f1"
    rates = TOKEN_RATES
    unread_settings = {"pooling": "labels every word and pools nothing"}

    def load(self, source, max_examples=None, known=None):
        from rayexit.data.conll import load_tagged

        sentences = load_tagged(source, max_examples)
        if known is not None and sentences.origin.startswith("atis:"):
            sentences = sentences.keep_known(known)
        return sentences

    def label_set(self, examples) -> list[str]:
        from rayexit.data.conll import tag_set

        tags = tag_set(examples)
        if len(tags) < 2:
            raise RayexitError(f"{examples.origin}: found only one tag ({tags[0]!r}); need at least two")
        return tags

    def subset(self, examples, rows, part):
        from rayexit.data.conll import TaggedSentences

        lines = [examples.lines[i] for i in rows] if examples.lines else None
        words, tags = [examples.words[i] for i in rows], [examples.tags[i] for i in rows]
        return TaggedSentences(words, tags, f"{examples.origin}[{part}]", lines)

    def strata(self, examples) -> list[str]:
        # By the rarest entity type a sentence holds, so rare types reach validation too.
        counts: dict[str, int] = {}
        for tags in examples.tags:
            for tag in tags:
                counts[tag] = counts.get(tag, 0) + 1
        return [min(set(tags), key=lambda t: (counts[t], t)) if tags else "" for tags in examples.tags]

    def encode(self, tokenizer, examples, labels, max_length):
        from rayexit.data.conll import encode_tagged

        data = encode_tagged(tokenizer, examples, labels, max_length)
        data.gold = examples.tags  # type: ignore[attr-defined]  # entity F1 needs the gold tag strings
        data.tag_names = labels  # type: ignore[attr-defined]
        return data

    def batches(self, data, batch_size, *, shuffle_seed=None, rank=0, world_size=1):
        from rayexit.data.conll import token_batches

        return token_batches(data, batch_size, shuffle_seed, rank=rank, world_size=world_size)

    def model_class(self):
        from rayexit.models.token import MultiExitForTokenClassification

        return MultiExitForTokenClassification

    def exit_config(self, labels, settings):
        from rayexit.models import ExitConfig

        # A sentence policy (entropy, ...) is refused here rather than swapped for TOKEE unseen.
        policy = (settings.policy or ExitPolicy("tokee", 0.1, window=3)).check_task(self.name)
        return ExitConfig(
            task=self.name, labels=labels, head="linear", pooling="token", dropout=settings.dropout,
            max_length=settings.max_length, method=settings.method, policy=policy,
        )

    def score_of(self, stats):
        stats = stats.double()
        tp, fp, fn = stats[..., 0].sum(-1), stats[..., 1].sum(-1), stats[..., 2].sum(-1)
        denominator = 2 * tp + fp + fn
        return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1e-12), torch.zeros_like(tp))

    def replay(self, model, data, batch_size, device=None):
        from rayexit.token_exits import cache_token_exits

        return TokenReplay(self, cache_token_exits(model, data, batch_size), data, model.labels)

    def run_live(self, model, data, batches, policy):
        from rayexit.token_exits import run_over_tokens

        run = run_over_tokens(model, data, policy, batches=batches)
        stats = entity_counts(data.gold, [[model.labels[t] for t in s] for s in run.predictions])
        layers = [layer for sentence in run.exit_layers for layer in sentence]
        return Outcome(
            policy, stats, float(self.score_of(stats)), model.num_layers * len(layers) / max(sum(layers), 1),
            run.flops_speedup, run.exit_layers,
        )

    def default_grid(self, replay):
        u = replay.cache.uncertainty[:, :, :-1][replay.cache.word_mask].flatten()
        u = u[torch.randperm(len(u), generator=torch.Generator().manual_seed(0))[:200_000]]  # quantile's size limit
        cuts = torch.quantile(u, torch.tensor(TOKEN_GRID_QUANTILES)).tolist()
        thresholds = sorted({_round(t) for t in (*cuts, *TOKEN_GRID_LADDER) if t > 0})
        grid = [ExitPolicy("sentee", t) for t in thresholds]
        grid += [ExitPolicy("tokee", t, window=w) for w in TOKEE_WINDOWS for t in thresholds]
        return grid


class TokenReplay:
    """A tagged set's full pass, replayed per policy (exact for SENTEE, approximate for TOKEE)."""

    def __init__(self, task: TokenTask, cache, data, labels: list[str]) -> None:
        self.task, self.cache, self.data, self.labels = task, cache, data, labels
        self.num_layers = cache.num_layers

    def exit_scores(self) -> list[float]:
        return [self._score(self.cache.exit_tags(layer))[1] for layer in range(self.num_layers)]

    def oracle_layer_speedup(self) -> float:
        final = self.cache.tags[:, :, -1:]
        same = (self.cache.tags == final) & self.cache.word_mask[:, :, None]
        # the earliest layer from which every later exit agrees with the final one
        stays = torch.flip(torch.cumprod(torch.flip(same.int(), [2]), 2), [2]).bool()
        first = (~stays).int().sum(2) + 1
        words = self.cache.word_mask
        return self.num_layers * int(words.sum()) / max(int(first[words].sum()), 1)

    def _score(self, ids: list[list[int]]) -> tuple[torch.Tensor, float]:
        stats = entity_counts(self.data.gold, [[self.labels[t] for t in s] for s in ids])
        return stats, float(self.task.score_of(stats))

    def outcome(self, policy: ExitPolicy) -> Outcome:
        if policy.kind == "none":
            stats, score = self._score(self.cache.exit_tags(self.num_layers - 1))
            return Outcome(policy, stats, score, 1.0, 1.0, [])
        tags, layers, flops_speedup = self.cache.simulate(policy)
        stats, score = self._score(tags)
        flat = [layer for sentence in layers for layer in sentence]
        return Outcome(policy, stats, score, self.num_layers * len(flat) / max(sum(flat), 1), flops_speedup, layers)


def entity_counts(gold: list[list[str]], predicted: list[list[str]]) -> torch.Tensor:
    """Per sentence (tp, fp, fn) of entity spans, with seqeval's span rules: [N, 3]."""
    from seqeval.metrics.sequence_labeling import get_entities

    rows = []
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        truth, guess = set(get_entities(list(gold_tags))), set(get_entities(list(predicted_tags)))
        hits = len(truth & guess)
        rows.append((hits, len(guess) - hits, len(truth) - hits))
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)


# -- lookup ------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {"sequence": SentenceTask(), "token": TokenTask()}


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise RayexitError(f"task: got {name!r}, expected one of {', '.join(TASKS)}")
    return TASKS[name]


def _keep_known_labels(examples, labels: list[str]):
    """For the packaged demo data only: ATIS's test split has intents its train split lacks."""
    known = set(labels)
    keep = [i for i, label in enumerate(examples.labels) if label in known]
    dropped = len(examples) - len(keep)
    if dropped:
        log.warning("%s: left out %d example(s) whose label never occurs in training", examples.origin, dropped)
    return SentenceTask().subset(examples, keep, "known labels") if dropped else examples


def _moved(batches, device) -> Iterator:
    for batch in batches:
        if device is None:
            yield batch
        elif isinstance(batch, tuple):
            yield tuple(t.to(device) for t in batch)
        else:
            yield batch.to(device)


def _round(value: float) -> float:
    return float(f"{value:.4g}")


__all__ = ["FULL_DEPTH", "Outcome", "SentenceTask", "Task", "TokenTask", "entity_counts", "task_named"]
