"""The served token model: whitespace-split words in, one tag and exit layer per word out.

Thin on purpose: the per-token early exit lives in rayexit.token_exits.predict_tags. A request
is tagged as one call (no cross-request batching): tagging requests carry whole sentences and
the token runner already batches within them.
"""

from __future__ import annotations

from pathlib import Path


class ServedTagger:
    def __init__(self, model, tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, directory: str | Path, device: str = "auto", dtype: str = "auto") -> ServedTagger:
        from rayexit.models import load_model_dir, load_tokenizer

        # The token runner builds its tensors on the CPU, so the tagger stays there whatever `device` says.
        del device, dtype
        return cls(load_model_dir(directory), load_tokenizer(directory))

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def tag(self, texts: list[str], max_layers: int | None = None) -> list[dict]:
        from rayexit.token_exits import predict_tags

        sentences = [text.split() for text in texts]
        tagged = predict_tags(self.model, self.tokenizer, sentences, layer_cap=max_layers)
        return [
            {"words": words, "tags": result["tags"], "exit_layers": [int(x) for x in result["exit_layers"]]}
            for words, result in zip(sentences, tagged, strict=True)
        ]
