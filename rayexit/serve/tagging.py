"""The served token model: whitespace-split words in, one tag and exit layer per word out.

Thin on purpose: the per-token early exit lives in rayexit.token_exits.predict_tags. The replica
queues each sentence through `@serve.batch` like the classifier's texts, so sentences of
different requests share passes, and a batch is tagged per layer cap (the runner takes one).
"""

from __future__ import annotations

from pathlib import Path


class ServedTagger:
    def __init__(self, model, tokenizer) -> None:
        from rayexit.token_exits import saved_token_policy

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.policy = saved_token_policy(model)  # the accuracy guard replaces it with its own thresholds

    @classmethod
    def from_model_dir(cls, directory: str | Path, device: str = "auto", dtype: str = "auto") -> ServedTagger:
        from rayexit.api import load

        # The token runner builds its tensors on the CPU, so the tagger stays there whatever `device` says.
        del device, dtype
        loaded = load(directory, task="token")  # the Python API's loader: same checks, same object
        return cls(loaded.model, loaded.tokenizer)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    def exit_cache(self, sentences: list[list[str]]):
        """Every exit's per-word uncertainty and tag at full depth (the accuracy guard's check)."""
        from rayexit.data.conll import encode_tagged
        from rayexit.token_exits import cache_token_exits

        data = encode_tagged(self.tokenizer, sentences, None, self.model.exit_config.max_length)
        return cache_token_exits(self.model, data)

    def count_tokens(self, sentences: list[list[str]]) -> list[int]:
        """Word-pieces per sentence before any window split, with the special tokens: the cost of tagging it.

        Raises whatever the tokenizer raises on a sentence it cannot encode."""
        pieces = self.tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)["input_ids"]
        return [len(p) + 2 for p in pieces]

    def tag(self, texts: list[str], max_layers: int | None = None) -> list[dict]:
        return self.tag_words([text.split() for text in texts], [max_layers] * len(texts))

    def tag_words(self, sentences: list[list[str]], layer_caps: list[int | None]) -> list[dict]:
        """One result per sentence, in order; sentences with the same layer cap are tagged in one call."""
        from rayexit.token_exits import predict_tags

        out: list[dict | None] = [None] * len(sentences)
        by_cap: dict[int | None, list[int]] = {}
        for i, cap in enumerate(layer_caps):
            by_cap.setdefault(cap, []).append(i)
        for cap, rows in by_cap.items():
            tagged = predict_tags(self.model, self.tokenizer, [sentences[i] for i in rows], self.policy.kind,
                                  self.policy.window, self.policy.thresholds, layer_cap=cap)
            for i, result in zip(rows, tagged, strict=True):
                out[i] = {
                    "words": sentences[i],
                    "tags": result["tags"],
                    "exit_layers": [int(x) for x in result["exit_layers"]],
                }
        return out  # type: ignore[return-value]
