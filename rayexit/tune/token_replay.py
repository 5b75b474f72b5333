"""Many token exit settings replayed at once on a cached full pass: halting, FLOPs and entity F1.

A setting is a criterion level (`sentee`: a sentence's words leave together; `tokee`: words
halt one by one), a window size (tokee) and a threshold per layer. `TokenReplayCache.evaluate`
replays K settings of one level and window in a handful of tensor operations over [K, words]
(any thresholds, one per layer included); `ThresholdSweep` answers every threshold that is the
same at all layers at once (what the search uses: see its docstring):

- Halting follows `rayexit.token_exits.simulate_halting` exactly (same `passes` criterion, a
  halted word's frozen uncertainty in its neighbours' windows): words of all rows are laid out
  in one flat line with a gap of zeros between rows, wide enough that no window reaches across.
- FLOPs are what `TokenCache._flops` counts, rewritten as linear in the halting layers: every
  layer a word runs costs its pieces' rows and its exit head, every layer a row runs costs its
  keys/values and its special tokens, so FLOPs = sum(h * per_word) + sum(row_exit * per_row).
- Entity F1 follows seqeval's chunk rules (the ones `rayexit.tasks.entity_counts` applies): a
  chunk starts or ends at a position by a rule on the (previous tag, tag) pair, so both rules
  become lookup tables built from seqeval's own functions, and a chunk's begin is the last start
  at or before its end (a running maximum). A word tagged O at every exit ends every chunk and
  starts none, exactly like a sentence boundary, so the words are cut there into segments; a
  segment whose tags are the same at every exit scores the same in every setting and is counted
  once, and only the other segments are replayed per setting.

The live TOKEE runner differs from any replay of a full pass: its running words attend to
halted words' frozen states, where the full pass has their later states. `docs/token.md`
("Tuning a token model") says where replay and runner agree exactly and how far apart they were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayexit.policy import ExitPolicy, passes
from rayexit.token_exits import TokenCache

LEVELS = ("tokee", "sentee")
CHUNK = 256  # settings per tensor operation: bounds memory at a few CHUNK x words tensors
CHUNK_PREFIXES = ("B", "I", "E", "S")


@dataclass
class Replayed:
    """K settings' figures on one cache: [K] tensors, and per-sentence (tp, fp, fn) when asked."""

    f1: torch.Tensor
    flops_speedup: torch.Tensor
    layer_speedup: torch.Tensor
    flops: torch.Tensor
    halting: torch.Tensor | None = None  # [K, R, W] when asked
    sentence_counts: torch.Tensor | None = None  # [K, S, 3] when asked


class TokenReplayCache:
    """A `TokenCache` rearranged for replaying many settings at once.

    `labels` are the model's tag names (the cache's tag ids index them); `gold` the data's tag
    strings per sentence (windows stitched), as `rayexit.tasks.TokenTask.encode` keeps them.
    """

    def __init__(self, cache: TokenCache, labels: list[str], gold: list[list[str]]) -> None:
        self.cache = cache
        self.labels = list(labels)
        self.num_layers = cache.num_layers
        mask = cache.word_mask
        self.rows, self.width = mask.shape
        self.row_words = mask.sum(1)
        self.num_words = int(self.row_words.sum())
        self.word_row = torch.repeat_interleave(torch.arange(self.rows), self.row_words)
        self.u_words = cache.uncertainty[mask].float().contiguous()  # [N, L], rows in order
        self.tag_words = cache.tags[mask].long()  # [N, L]
        self.row_scores = {
            "max": torch.where(mask[:, :, None], cache.uncertainty, torch.zeros(())).amax(1),
            "mean": torch.where(mask[:, :, None], cache.uncertainty, torch.zeros(())).sum(1)
            / self.row_words.clamp_min(1)[:, None],
        }
        self._layouts: dict[int, tuple[torch.Tensor, int]] = {}
        self._cost_terms()
        self._chunk_tables(gold)

    # -- halting -------------------------------------------------------------------------------

    def _layout(self, gap: int) -> tuple[torch.Tensor, int]:
        """Positions of the words in a flat line with `gap` zeros before every row, and its length."""
        if gap not in self._layouts:
            position = gap * (self.word_row + 1) + torch.arange(self.num_words)
            self._layouts[gap] = (position, gap * (self.rows + 1) + self.num_words)
        return self._layouts[gap]

    def halting_layers(self, kind: str, window: int, thresholds: torch.Tensor, reduce: str = "max") -> torch.Tensor:
        """[K, N] halting layer (1-based) of every word, rows in order, for K threshold rows [K, L]."""
        layers = self.num_layers
        thresholds = thresholds.float()
        count = thresholds.shape[0]
        if kind == "sentee":
            stat = self.row_scores[reduce][:, : layers - 1]  # [R, L-1]
            leaves = passes(kind, stat[None], thresholds[:, None, : layers - 1])  # [K, R, L-1]
            leaves = torch.cat([leaves, torch.ones(count, self.rows, 1, dtype=torch.bool)], 2)
            row_exit = leaves.int().argmax(2) + 1  # the first layer that passes; the last always does
            return row_exit[:, self.word_row]
        if kind != "tokee":
            raise ValueError(f"no token replay for policy {kind!r}")
        position, length = self._layout(max(window // 2, 1))
        line = torch.zeros(layers, length)
        line[:, position] = self.u_words.T
        active = torch.zeros(count, length, dtype=torch.bool)
        active[:, position] = True
        current = torch.zeros(count, length)
        halt = torch.full((count, length), layers, dtype=torch.long)
        left, right = (window - 1) // 2, window // 2
        for layer in range(layers - 1):
            current = torch.where(active, line[layer], current)
            score = current
            if window > 1:  # the max over the window, as `rayexit.policy.window_scores` pads it
                score = F.max_pool1d(F.pad(current[:, None], (left, right)), window, 1)[:, 0]
            halting = passes(kind, score, thresholds[:, layer, None]) & active
            halt.masked_fill_(halting, layer + 1)
            active &= ~halting
            if not active.any():
                break
        return halt[:, position]

    def critical_thresholds(self, kind: str, window: int, reduce: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
        """tau per word [N, L-1] (rows in order) and per row [R, L-1]: see `ThresholdSweep`."""
        layers = self.num_layers
        if kind == "sentee":
            rows = torch.cummin(self.row_scores[reduce][:, : layers - 1], dim=1).values
            return rows[self.word_row], rows
        if kind != "tokee":
            raise ValueError(f"no token replay for policy {kind!r}")
        position, length = self._layout(max(window // 2, 1))
        line = torch.zeros(layers, length)
        line[:, position] = self.u_words.T
        tau = torch.full((length,), torch.inf)
        left, right = (window - 1) // 2, window // 2
        out = []
        for layer in range(layers - 1):
            reach = torch.minimum(tau, line[layer])  # the gap's zeros never hold a word back, as in window_scores
            if window > 1:
                reach = F.max_pool1d(F.pad(reach[None, None], (left, right)), window, 1)[0, 0]
            tau = torch.minimum(tau, reach)
            out.append(tau[position])
        words = torch.stack(out, 1)
        rows = torch.full((self.rows, layers - 1), -torch.inf)
        rows.scatter_reduce_(0, self.word_row[:, None].expand_as(words), words, "amax")
        return words, rows

    # -- FLOPs ---------------------------------------------------------------------------------

    def _cost_terms(self) -> None:
        """FLOPs = sum over words of h * per_word + sum over rows of (row exit layer) * per_row."""
        hidden, intermediate, num_tags = self.cache.dims
        lengths = self.cache.lengths.long()
        pieces = self.cache.word_pieces[self.cache.word_mask].long()
        specials = lengths - (self.cache.word_pieces * self.cache.word_mask).sum(1)
        per_query = 4 * hidden * hidden + 4 * lengths * hidden + 4 * hidden * intermediate  # [R]
        self.per_word = pieces * per_query[self.word_row] + 2 * hidden * num_tags
        self.per_row = 4 * lengths * hidden * hidden + specials * per_query
        self.full_flops = self.cache._full_flops()

    def flops(self, halt: torch.Tensor) -> torch.Tensor:
        """[K] FLOPs of the runner for halting layers [K, N]."""
        row_exit = torch.zeros(halt.shape[0], self.rows, dtype=torch.long)
        row_exit.scatter_reduce_(1, self.word_row.expand_as(halt), halt, "amax")
        return (halt * self.per_word).sum(1) + (row_exit * self.per_row).sum(1)

    # -- entity F1 -------------------------------------------------------------------------------

    def _chunk_tables(self, gold: list[list[str]]) -> None:
        from seqeval.metrics.sequence_labeling import end_of_chunk, get_entities, start_of_chunk

        data = self.cache.data
        row_sentence = torch.tensor([sentence for sentence, _ in data.pieces], dtype=torch.long)
        word_sentence = row_sentence[self.word_row]
        order = torch.sort(word_sentence, stable=True).indices  # sentence order: a sentence's windows in turn
        self.order = order
        self.num_sentences = data.num_sentences
        names = list(self.labels)
        for tags in gold:
            names += [t for t in tags if t not in names]
        self.exact = all(n == "O" or n in CHUNK_PREFIXES or n[:2] in {p + "-" for p in CHUNK_PREFIXES} for n in names)
        if "O" not in names:
            names.append("O")
        self.vocab = len(names)
        parts = [(n[0], n[1:].split("-", maxsplit=1)[-1] or "_") for n in names]
        types = sorted({t for _, t in parts})
        self.num_types = len(types)
        self.type_of = torch.tensor([types.index(t) for _, t in parts])
        self.start_table = torch.tensor(
            [start_of_chunk(a, b, ta, tb) for a, ta in parts for b, tb in parts], dtype=torch.bool
        )
        self.end_table = torch.tensor(
            [end_of_chunk(a, b, ta, tb) for a, ta in parts for b, tb in parts], dtype=torch.bool
        )
        self.o_id = names.index("O")
        tags = self.tag_words[order]  # [N, L], sentence order
        sentence = word_sentence[order]
        flat_gold = [tag for tags_ in gold for tag in tags_]
        if len(flat_gold) != self.num_words:
            raise ValueError(f"gold tags for {len(flat_gold)} words, the cache holds {self.num_words}")
        self.gold_per_sentence = torch.tensor([len(get_entities(list(t))) for t in gold], dtype=torch.long)
        self.num_gold = int(self.gold_per_sentence.sum())

        # Segments: cut at words that are O at every exit and at sentence ends.
        always_o = (tags == self.o_id).all(1)
        varies = (tags != tags[:, :1]).any(1)
        new_sentence = torch.ones(self.num_words, dtype=torch.bool)
        new_sentence[1:] = sentence[1:] != sentence[:-1]
        segment = torch.cumsum((new_sentence | always_o).long(), 0) - 1
        segment_varies = torch.zeros(int(segment.max()) + 1 if self.num_words else 0, dtype=torch.bool)
        segment_varies.index_put_((segment,), varies, accumulate=True)
        keep = ~always_o
        variable = keep & segment_varies[segment]
        constant = keep & ~segment_varies[segment]

        def line(selected: torch.Tensor):
            """Layout: separator, then each selected segment's words followed by a separator."""
            index = [-1]
            words = selected.nonzero()[:, 0].tolist()
            previous = None
            for w in words:
                if previous is not None and int(segment[w]) != int(segment[previous]):
                    index.append(-1)
                index.append(w)
                previous = w
            index.append(-1)
            return torch.tensor(index, dtype=torch.long)

        starts_at: dict[int, tuple[int, str]] = {}
        base = 0
        for tags_ in gold:
            for kind, begin, end in get_entities(list(tags_)):
                starts_at[base + end] = (base + begin, kind)
            base += len(tags_)

        def gold_keys(index: torch.Tensor) -> torch.Tensor:
            place = {int(w): i for i, w in enumerate(index.tolist()) if w >= 0}
            keys = torch.full((len(index),), -1, dtype=torch.long)
            for end, (begin, kind) in starts_at.items():
                if end in place and begin in place and int(segment[begin]) == int(segment[end]):
                    keys[place[end]] = place[begin] * self.num_types + types.index(kind)
            return keys

        self.var_index = line(variable)
        self.var_gold = gold_keys(self.var_index)
        # gold chunks inside the variable segments, by span: layout positions begin-1 .. end+1, and type
        place = {int(w): i for i, w in enumerate(self.var_index.tolist()) if w >= 0}
        items: dict[int, tuple[list, list]] = {}
        for end, (begin, kind) in starts_at.items():
            if end in place and begin in place and int(segment[begin]) == int(segment[end]):
                span = place[end] - place[begin] + 1
                rows, kinds = items.setdefault(span, ([], []))
                rows.append(list(range(place[begin] - 1, place[end] + 2)))
                kinds.append(types.index(kind))
        self.gold_items = {
            span: (torch.tensor(rows, dtype=torch.long), torch.tensor(kinds, dtype=torch.long))
            for span, (rows, kinds) in sorted(items.items())
        }
        self.var_sentence = torch.where(self.var_index >= 0, sentence[self.var_index.clamp_min(0)], self.num_sentences)
        # the cache's word index (rows in order) of each variable position; separators point at word 0
        self.var_word = torch.where(self.var_index >= 0, order[self.var_index.clamp_min(0)], 0)
        self.var_flat = self.var_word * self.num_layers
        self.var_sep = self.var_index < 0
        const_index = line(constant)
        const_tags = torch.where(const_index >= 0, tags[const_index.clamp_min(0), -1], self.o_id)[None]
        const_sentence = torch.where(const_index >= 0, sentence[const_index.clamp_min(0)], self.num_sentences)
        tp, pred = self._chunk_flags(const_tags, gold_keys(const_index))
        self.const_counts = torch.zeros(self.num_sentences + 1, 2, dtype=torch.long)
        self.const_counts[:, 0].index_add_(0, const_sentence[1:-1], tp[0].long())
        self.const_counts[:, 1].index_add_(0, const_sentence[1:-1], pred[0].long())
        self.variable_positions = int((self.var_index >= 0).sum())

    def _chunk_flags(self, tags: torch.Tensor, gold_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position 1..M-2 of a separated line [K, M]: (a predicted chunk ends here and is gold, one ends here)."""
        pair = tags[:, :-1] * self.vocab + tags[:, 1:]  # (tag at j, tag at j + 1), j = 0..M-2
        starts = self.start_table[pair]  # a chunk starts at j + 1
        ends = self.end_table[pair][:, 1:]  # a chunk ends at j, for j = 1..M-2
        where = torch.arange(1, tags.shape[1])
        begin = torch.cummax(torch.where(starts, where, 0), dim=1).values[:, :-1]  # last start <= j
        key = begin * self.num_types + self.type_of[tags[:, 1:-1]]
        return ends & (key == gold_key[1:-1]), ends

    def f1_counts(self, halt: torch.Tensor, per_sentence: bool = False):
        """(tp [K], predicted [K]) entity counts for halting layers [K, N]; with per_sentence, [K, S, 3]."""
        flat = self.tag_words.reshape(-1)
        picked = halt[:, self.var_word] - 1 + self.var_flat
        tags = torch.where(self.var_sep, self.o_id, flat[picked])
        hits, ends = self._chunk_flags(tags, self.var_gold)
        if not per_sentence:
            constant = self.const_counts[:-1].sum(0)
            return hits.sum(1) + constant[0], ends.sum(1) + constant[1]
        count = halt.shape[0]
        sentence = self.var_sentence[1:-1].expand(count, -1)
        tp = self.const_counts[:, 0].repeat(count, 1).scatter_add_(1, sentence, hits.long())[:, :-1]
        pred = self.const_counts[:, 1].repeat(count, 1).scatter_add_(1, sentence, ends.long())[:, :-1]
        gold = self.gold_per_sentence.expand(count, -1)
        return torch.stack([tp, pred - tp, gold - tp], 2).double()

    # -- the whole replay ------------------------------------------------------------------------

    def evaluate(
        self, kind: str, window: int, thresholds: torch.Tensor, *, reduce: str = "max", keep_halting: bool = False,
        per_sentence: bool = False,
    ) -> Replayed:
        """K settings of one level and window: thresholds [K] (one for every layer) or [K, L] (per layer)."""
        if not self.exact:
            raise ValueError("tags outside O/B-/I-/E-/S-: the vectorised F1 does not cover them")
        if thresholds.dim() == 1:
            thresholds = thresholds[:, None].expand(-1, self.num_layers)
        parts = []
        for start in range(0, thresholds.shape[0], CHUNK):
            halt = self.halting_layers(kind, window, thresholds[start : start + CHUNK], reduce)
            flops = self.flops(halt)
            if per_sentence:
                counts = self.f1_counts(halt, per_sentence=True)
                tp, fp, fn = counts.sum(1).unbind(1)
                f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1e-12)
            else:
                counts = None
                tp, pred = self.f1_counts(halt)
                f1 = 2 * tp.double() / (pred + self.num_gold).double().clamp_min(1e-12)
            layer_speedup = self.num_layers * self.num_words / halt.sum(1).double().clamp_min(1)
            parts.append((f1, flops, layer_speedup, halt if keep_halting else None, counts))
        f1 = torch.cat([p[0] for p in parts])
        flops = torch.cat([p[1] for p in parts])
        replayed = Replayed(
            f1=f1,
            flops_speedup=self.full_flops / flops.double().clamp_min(1),
            layer_speedup=torch.cat([p[2] for p in parts]),
            flops=flops,
        )
        if keep_halting:
            halt = torch.cat([p[3] for p in parts])
            grid = torch.zeros(halt.shape[0], self.rows, self.width, dtype=torch.long)
            grid[:, self.cache.word_mask] = halt
            replayed.halting = grid
        if per_sentence:
            replayed.sentence_counts = torch.cat([p[4] for p in parts])
        return replayed


class StepSum:
    """sum_i weight_i * [t <= value_i] + base, for many t at once (a sorted suffix sum)."""

    def __init__(self, values: torch.Tensor, weights: torch.Tensor, base: int | float = 0) -> None:
        order = torch.argsort(values)
        self.values = values[order].contiguous()
        self.suffix = torch.cat([torch.flip(torch.cumsum(torch.flip(weights[order], [0]), 0), [0]),
                                 torch.zeros(1, dtype=weights.dtype)])
        self.base = base

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.base + self.suffix[torch.searchsorted(self.values, t.to(self.values.dtype), side="left")]


class ThresholdSweep:
    """Every global threshold of one level and window, answered from the cache in O(log) each.

    With one threshold t for every layer, halting is monotone in t: a halted word's frozen
    uncertainty is below t (its window was), so it never holds a neighbour back. Hence each
    word has critical values tau[l] with "halted by layer l+1" exactly when t > tau[l]:

        tau_x[l] = min(tau_x[l-1], max over the window of x of min(tau_j[l-1], u_j[l]))

    (for SENTEE, the running minimum of the row's score), and its halting layer is
    1 + #{l : t <= tau_x[l]}. FLOPs and layers are then sums of steps in t, and so are the
    entity counts: each chunk decision depends on a few words, so it is a step function with
    breakpoints at those words' tau values. Summing the steps once answers every t.
    """

    def __init__(self, replay: TokenReplayCache, kind: str, window: int = 1, reduce: str = "max") -> None:
        self.replay, self.kind, self.window = replay, kind, window
        tau_words, tau_rows = replay.critical_thresholds(kind, window, reduce)
        layers = replay.num_layers - 1
        has_words = replay.row_words > 0
        per_row = torch.where(has_words, replay.per_row, torch.zeros_like(replay.per_row))
        self.flops_steps = StepSum(
            torch.cat([tau_words.reshape(-1), tau_rows.reshape(-1)]),
            torch.cat([replay.per_word.repeat_interleave(layers), per_row.repeat_interleave(layers)]),
            int(replay.per_word.sum() + per_row.sum()),
        )
        self.layer_steps = StepSum(
            tau_words.reshape(-1), torch.ones(tau_words.numel(), dtype=torch.long), replay.num_words
        )
        self.tau = tau_words[replay.order]  # sentence order, as the chunk layout indexes words
        self.tp_steps, self.pred_steps = self._entity_steps()

    def _tags_at(self, positions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Tags at layout `positions` [I, m] for thresholds t [I, k] -> [I, k, m]."""
        replay = self.replay
        words = replay.var_index[positions]  # sentence order; -1: a separator
        tau = self.tau[words.clamp_min(0)]  # [I, m, L-1]
        halt = 1 + (t[:, :, None, None] <= tau[:, None]).sum(-1)  # [I, k, m]
        tags = replay.tag_words[replay.order[words.clamp_min(0)]]  # [I, m, L]
        picked = tags[:, None].expand(-1, t.shape[1], -1, -1).gather(3, (halt - 1)[..., None])[..., 0]
        return torch.where(words[:, None] < 0, replay.o_id, picked)

    def _steps(self, positions: torch.Tensor, decide) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Events (breakpoint, change) of the 0/1 decision `decide(tags [I, k, m])` per item, and its value at +inf."""
        replay = self.replay
        if len(positions) == 0:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long), 0
        words = replay.var_index[positions]
        varies = words >= 0
        tau = torch.where(varies[:, :, None], self.tau[words.clamp_min(0)], -torch.inf)
        points = torch.sort(tau.reshape(len(positions), -1), dim=1).values  # [I, b]
        t = torch.cat([points, torch.full((len(positions), 1), torch.inf)], 1)
        value = decide(self._tags_at(positions, t)).long()  # [I, b + 1]
        change = (value[:, :-1] - value[:, 1:]).reshape(-1)
        moves = change != 0  # most breakpoints change nothing here: fewer events to sort
        return points.reshape(-1)[moves], change[moves], int(value[:, -1].sum())

    def _entity_steps(self) -> tuple[StepSum, StepSum]:
        replay = self.replay
        vocab, start, end = replay.vocab, replay.start_table, replay.end_table
        length = len(replay.var_index)
        # predicted chunks: one ends at j when (tag j, tag j + 1) ends it
        j = torch.arange(length - 1)
        pairs = torch.stack([j, j + 1], 1)
        pairs = pairs[(replay.var_index[pairs] >= 0).any(1)]
        values, changes, base = [], [], 0
        for block in torch.split(pairs, 8192):
            v, c, b = self._steps(block, lambda p: end[p[..., 0] * vocab + p[..., 1]])
            values.append(v)
            changes.append(c)
            base += b
        pred = StepSum(torch.cat(values) if values else torch.zeros(0), torch.cat(changes) if changes else
                       torch.zeros(0, dtype=torch.long), base)
        # gold chunks (type, b, e): found when a chunk starts at b, none starts in (b, e], one ends at e
        values, changes, base = [], [], 0
        for span, (positions, kinds) in replay.gold_items.items():
            def found(p, kinds=kinds, span=span):
                ok = start[p[..., 0] * vocab + p[..., 1]] & end[p[..., span] * vocab + p[..., span + 1]]
                for i in range(2, span + 1):
                    ok &= ~start[p[..., i - 1] * vocab + p[..., i]]
                return ok & (replay.type_of[p[..., span]] == kinds[:, None])
            for block, block_kinds in zip(torch.split(positions, 4096), torch.split(kinds, 4096)):
                v, c, b = self._steps(block, lambda p, k=block_kinds: found(p, k))
                values.append(v)
                changes.append(c)
                base += b
        tp = StepSum(torch.cat(values) if values else torch.zeros(0), torch.cat(changes) if changes else
                     torch.zeros(0, dtype=torch.long), base)
        return tp, pred

    def __call__(self, thresholds: torch.Tensor) -> Replayed:
        """Figures of K global thresholds [K]."""
        replay = self.replay
        t = thresholds.float()
        constant = replay.const_counts[:-1].sum(0)
        tp = self.tp_steps(t) + constant[0]
        pred = self.pred_steps(t) + constant[1]
        flops = self.flops_steps(t)
        return Replayed(
            f1=2 * tp.double() / (pred + replay.num_gold).double().clamp_min(1e-12),
            flops_speedup=replay.full_flops / flops.double().clamp_min(1),
            layer_speedup=replay.num_layers * replay.num_words / self.layer_steps(t).double().clamp_min(1),
            flops=flops,
        )


@dataclass
class TokenSetting:
    """One token exit setting and its figures on the set it was replayed on."""

    kind: str
    window: int
    thresholds: float | list[float]
    f1: float
    flops_speedup: float
    layer_speedup: float

    def to_policy(self) -> ExitPolicy:
        return ExitPolicy(self.kind, self.thresholds, window=self.window if self.kind == "tokee" else 3)

    def to_dict(self) -> dict:
        return {
            "policy": self.kind,
            "window": self.window,
            "thresholds": self.thresholds,
            "f1": self.f1,
            "flops_speedup": self.flops_speedup,
            "layer_speedup": self.layer_speedup,
        }


@dataclass
class TokenSearch:
    points: list[TokenSetting]  # the Pareto front of (F1, FLOPs speed-up) over every setting tried
    full_f1: float
    settings: int
    seconds: float

    @property
    def settings_per_second(self) -> float:
        return self.settings / self.seconds if self.seconds > 0 else float("inf")


def threshold_grid(replay: TokenReplayCache, count: int) -> torch.Tensor:
    """Thresholds between neighbouring observed uncertainties of the exits that can halt.

    A window's or a sentence's score is always one of its words' uncertainties, so cuts of the
    word uncertainties cover every decision; midpoints keep a threshold off any observed value.
    """
    from rayexit.tune.thresholds import cut_points

    values = replay.u_words[:, : replay.num_layers - 1].reshape(-1)
    if len(values) > 200_000:
        values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))[:200_000]]
    return cut_points(values, max(count, 2))


def search_token_settings(
    replay: TokenReplayCache,
    levels: list[str] | tuple[str, ...] = LEVELS,
    windows: list[int] | tuple[int, ...] = (1, 3, 5, 7, 9),
    thresholds: int = 2048,
) -> TokenSearch:
    """Every (level, window, threshold) on the grid, replayed; the Pareto front of F1 against FLOPs speed-up.

    The grid holds up to `thresholds` cuts of the observed uncertainties per level and window
    (0 for all of them: every threshold at which some decision changes).
    """
    from rayexit.tune.thresholds import one_thread

    start = time.perf_counter()
    with one_thread():
        grid = threshold_grid(replay, thresholds)
        groups = [("sentee", 1)] if "sentee" in levels else []
        groups += [("tokee", w) for w in windows] if "tokee" in levels else []
        found: list[TokenSetting] = []
        for kind, window in groups:
            result = ThresholdSweep(replay, kind, window)(grid)
            for i in front_indices(result.f1, result.flops_speedup).tolist():
                found.append(TokenSetting(kind, window, float(grid[i]), float(result.f1[i]),
                                          float(result.flops_speedup[i]), float(result.layer_speedup[i])))
        full = ThresholdSweep(replay, "sentee")(torch.zeros(1))  # nothing is below 0: full depth
    seconds = time.perf_counter() - start
    from rayexit.tune.pareto import pareto_front

    front = pareto_front(found, key=lambda p: (p.f1, p.flops_speedup))
    return TokenSearch(front, float(full.f1[0]), len(grid) * len(groups), seconds)


def front_indices(score: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
    """Indices of the points no other beats on both counts (as `rayexit.tune.pareto.pareto_front`), in tensors."""
    order = torch.from_numpy(__import__("numpy").lexsort((-score.numpy(), -speed.numpy())).copy())
    best = torch.cummax(score[order], 0).values
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[1:] = score[order][1:] > best[:-1]
    return order[keep]


def evaluate_settings(replay: TokenReplayCache, settings: list[TokenSetting], per_sentence: bool = False):
    """The same settings on another cache (e.g. chosen on validation, measured on eval): figures, in order.

    With per_sentence, also each setting's [S, 3] (tp, fp, fn) per sentence (for drop bounds).
    """
    out: list = [None] * len(settings)
    groups: dict[tuple[str, int, bool], list[int]] = {}
    for i, s in enumerate(settings):
        groups.setdefault((s.kind, s.window, isinstance(s.thresholds, list)), []).append(i)
    for (kind, window, _), rows in groups.items():
        grid = torch.tensor(
            [ExitPolicy(kind, settings[i].thresholds).per_layer(replay.num_layers) for i in rows], dtype=torch.float32
        )
        result = replay.evaluate(kind, window, grid, per_sentence=per_sentence)
        for j, i in enumerate(rows):
            point = TokenSetting(
                kind, window, settings[i].thresholds, float(result.f1[j]), float(result.flops_speedup[j]),
                float(result.layer_speedup[j]),
            )
            out[i] = (point, result.sentence_counts[j]) if per_sentence else point
    return out
