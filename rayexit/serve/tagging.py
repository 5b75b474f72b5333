"""The served token model: whitespace-split words in, one tag and exit layer per word out.

The same path as the classifier's (engine.py): a batch from the queue is grouped by layer cap
(the runner takes one cap per call), its encoded windows sorted by length and cut into passes
under the padded-token budget, and the policy is the served one relaxed by the controller's
level. The per-token early exit itself is rayexit.token_exits.run_token_exit, on the model's
device; everything here runs in one worker thread of the replica, Ray stays in app.py.
"""

from __future__ import annotations

import time

from rayexit.config import ExitPolicy
from rayexit.data.conll import encode_tagged, make_batch
from rayexit.policy import TOKEN_KINDS
from rayexit.serve.controller import relax_policy
from rayexit.serve.engine import PassStats, ServedModel, token_budget_chunks
from rayexit.token_exits import DEFAULT_POLICY, run_token_exit


def served_token_policy(saved: ExitPolicy, kind: str | None = None, thresholds=None) -> ExitPolicy:
    """The policy a tagger serves: the model directory's token policy (TOKEE w=3 / 0.1 when it has
    none), with the serve settings' `policy_kind` / `thresholds` over it; checked for the token task."""
    base = saved if saved.kind in TOKEN_KINDS else DEFAULT_POLICY
    if kind is None and thresholds is None:
        return base.check_task("token")
    chosen = ExitPolicy(
        kind or base.kind, base.thresholds if thresholds is None else thresholds, window=base.window, reduce=base.reduce
    )
    return chosen.check_task("token")


class ServedTagger(ServedModel):
    task = "token"

    @staticmethod
    def default_policy(saved: ExitPolicy) -> ExitPolicy:
        return served_token_policy(saved)

    def exit_cache(self, sentences: list[list[str]]):
        """Every exit's per-word uncertainty and tag at full depth (the accuracy guard's check)."""
        from rayexit.data.conll import encode_tagged
        from rayexit.token_exits import cache_token_exits

        data = encode_tagged(self.tokenizer, sentences, None, self.model.exit_config.max_length)
        return cache_token_exits(self.model, data)

    def count_tokens(self, sentences: list[list[str]]) -> list[int]:
        """Word-pieces per sentence as tagging will run them (windows and their special tokens
        included): the cost of tagging it. Raises whatever the tokenizer raises on a sentence it
        cannot encode."""
        from rayexit.data.conll import tagged_token_counts

        return tagged_token_counts(self.tokenizer, sentences, self.max_length)

    def tag(self, texts: list[str], max_layers: int | None = None, relax_level: int = 0) -> list[dict]:
        return self.tag_words([text.split() for text in texts], [max_layers] * len(texts), relax_level)[0]

    def tag_words(
        self, sentences: list[list[str]], layer_caps: list[int | None] | None = None, relax_level: int = 0
    ) -> tuple[list[dict], PassStats]:
        """One result per sentence, in order; `layer_caps[i]` bounds sentence i's depth.

        A sentence longer than the model's max_length is encoded as several windows (as
        `predict_tags` does); its windows may land in different passes and are stitched back here.
        """
        caps = list(layer_caps) if layer_caps is not None else [None] * len(sentences)
        policy = relax_policy(self.policy, relax_level, len(self.labels))
        if relax_level > 0 and self.overload_layer_cap is not None:
            caps = [min(c or self.num_layers, self.overload_layer_cap) for c in caps]
        tags: list[list[str]] = [[""] * len(s) for s in sentences]
        layers: list[list[int]] = [[0] * len(s) for s in sentences]
        stats = PassStats()
        nonempty = [i for i, s in enumerate(sentences) if s]
        if nonempty:
            data = encode_tagged(self.tokenizer, [sentences[i] for i in nonempty], None, self.max_length)
            by_cap: dict[int | None, list[int]] = {}
            for row, (sentence, _) in enumerate(data.pieces):
                by_cap.setdefault(caps[nonempty[sentence]], []).append(row)
            for cap, rows in by_cap.items():
                for chunk in token_budget_chunks(rows, [len(data.input_ids[r]) for r in rows], self.token_budget):
                    batch = make_batch(data, chunk)
                    stats.passes += 1
                    stats.real_tokens += int(batch.attention_mask.sum())
                    stats.padded_tokens += batch.attention_mask.numel()
                    result = run_token_exit(self.model, batch, policy, cap)
                    predictions, exits = result.predictions.tolist(), result.exit_layers.tolist()
                    for b, row in enumerate(chunk):
                        sentence, first = data.pieces[row]
                        count = len(data.word_starts[row])
                        i = nonempty[sentence]
                        tags[i][first : first + count] = [self.labels[t] for t in predictions[b][:count]]
                        layers[i][first : first + count] = exits[b][:count]
        results = [
            {"words": sentence, "tags": tags[i], "exit_layers": layers[i]} for i, sentence in enumerate(sentences)
        ]
        return results, stats

    def warm_up(self) -> float:
        """One pass so the first real request does not pay for lazy initialisation; returns its seconds."""
        start = time.perf_counter()
        self.tag(["warm up"])
        return time.perf_counter() - start
