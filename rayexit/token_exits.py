"""Token-level early exit for sequence labeling: SENTEE and TOKEE (Li et al., ACL 2021), batched.

Uncertainty of a word at an exit is its tag distribution's entropy / log(number of tags).
SENTEE stops a whole sentence at the first layer where the max (or mean) word uncertainty is
below the threshold. TOKEE halts single words: a word's score is the max uncertainty over a
window of words centred on it, and it halts when that score is below the threshold.

A halted word's state is copied upward unchanged. Later layers compute queries, the attention
output and the feed-forward only for the rows still active (fewer rows through the matrices,
not a mask over a full computation), while keys and values are computed from every real token
of the sentence, halted ones included, so active tokens still attend to the whole sentence.
A word's continuation pieces halt with it; the special tokens ([CLS], [SEP]) stay active until
every word of their sentence halted, and then the sentence leaves the batch.

FLOPs are counted (multiply-adds x 2) for the rows each layer actually computes; layer norms,
softmax, biases and activations are left out, the same way for the full model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayexit.data.conll import EncodedTokens, TokenBatch, encode_tagged, token_batches
from rayexit.errors import RayexitError

TOKEN_POLICIES = ("tokee", "sentee", "none")
DEFAULT_WINDOW = 3
DEFAULT_THRESHOLD = 0.1


@dataclass
class TokenPolicy:
    """`tokee`: window + threshold per word; `sentee`: threshold on the sentence's max or mean."""

    kind: str = "tokee"
    threshold: float = DEFAULT_THRESHOLD
    window: int = DEFAULT_WINDOW
    reduce: str = "max"  # SENTEE only: max or mean word uncertainty

    def __post_init__(self) -> None:
        if self.kind not in TOKEN_POLICIES:
            raise RayexitError(f"policy: got {self.kind!r}, expected one of {', '.join(TOKEN_POLICIES)}")
        if not isinstance(self.window, int) or self.window < 1:
            raise RayexitError(f"window: got {self.window!r}, expected a whole number >= 1")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise RayexitError(f"threshold: got {self.threshold!r}, expected a value in [0, 1]")
        if self.reduce not in ("max", "mean"):
            raise RayexitError(f"reduce: got {self.reduce!r}, expected max or mean")

    def to_dict(self) -> dict:
        return {"policy": self.kind, "window": self.window, "threshold": self.threshold, "reduce": self.reduce}


@dataclass
class TokenExitResult:
    predictions: torch.Tensor  # [B, W] tag id per word
    exit_layers: torch.Tensor  # [B, W] 1-based layer each word halted at (0 where no word)
    flops: int  # what this run computed
    full_flops: int  # what full depth computes for the same batch


# -- criteria ------------------------------------------------------------------------------


def token_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the tag distribution divided by log(number of tags): 0 sure, 1 uniform."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return entropy / math.log(max(logits.shape[-1], 2))


def window_scores(uncertainty: torch.Tensor, word_mask: torch.Tensor, window: int) -> torch.Tensor:
    """Max of u over a window of `window` words centred on each word (same padding) -> [B, W].

    Slots past a sentence's end count as 0, which for a max over values >= 0 is the same as
    cutting the window at the sentence boundary.
    """
    u = torch.where(word_mask, uncertainty, torch.zeros_like(uncertainty))
    if window <= 1:
        return u
    padded = F.pad(u[:, None, :], ((window - 1) // 2, window // 2), value=0.0)
    return F.max_pool1d(padded, kernel_size=window, stride=1)[:, 0, :]


def sentence_scores(uncertainty: torch.Tensor, word_mask: torch.Tensor, reduce: str) -> torch.Tensor:
    u = torch.where(word_mask, uncertainty, torch.zeros_like(uncertainty))
    if reduce == "mean":
        return u.sum(1) / word_mask.sum(1).clamp_min(1)
    return u.max(1).values


# -- FLOPs -----------------------------------------------------------------------------------


def layer_flops(hidden: int, intermediate: int, queries: torch.Tensor, keys: torch.Tensor) -> int:
    """One encoder layer, per sentence `queries` rows computed and `keys` tokens attended to.

    keys/values 2 x (2 k H^2); query and attention output 2 x (2 q H^2); scores and context
    2 x (2 q k H); feed-forward 2 x (2 q H I).
    """
    q = queries.long()
    k = keys.long()
    projections = 4 * k * hidden * hidden + 4 * q * hidden * hidden
    per_sentence = projections + 4 * q * k * hidden + 4 * q * hidden * intermediate
    return int(per_sentence.sum())


def head_flops(hidden: int, num_tags: int, rows: int) -> int:
    return 2 * rows * hidden * num_tags


def full_depth_flops(model, tokens: torch.Tensor, words: torch.Tensor) -> int:
    """Every layer on every real token, and the final exit on every word."""
    hidden, intermediate = _sizes(model)
    per_layer = layer_flops(hidden, intermediate, tokens, tokens)
    return model.num_layers * per_layer + head_flops(hidden, len(model.labels), int(words.sum()))


def _sizes(model) -> tuple[int, int]:
    config = model.backbone.config
    return config.hidden_size, config.intermediate_size


# -- one layer on the active rows ----------------------------------------------------------


def partial_layer(layer, hidden: torch.Tensor, valid: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """A BERT layer's arithmetic with queries/FFN for `active` tokens and keys/values for `valid`.

    hidden [B, S, H]; valid, active [B, S] bool with active a subset of valid. Returns new
    states [B, S, H]: active rows updated, all others unchanged. Every sentence needs at least
    one valid token (a query row past a sentence's active count attends to real keys, and its
    output is dropped).
    """
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    batch, width, dim = hidden.shape

    source = hidden[valid]  # [n_valid, H], halted tokens included
    keys = hidden.new_zeros(batch, width, dim)
    values = hidden.new_zeros(batch, width, dim)
    keys[valid] = attention.key(source)
    values[valid] = attention.value(source)

    x = hidden[active]  # [n_active, H], row-major: sentence by sentence, positions ascending
    counts = active.sum(1)
    q_width = int(counts.max())
    q_slots = torch.arange(q_width, device=hidden.device)[None, :] < counts[:, None]  # [B, Sq]
    queries = hidden.new_zeros(batch, q_width, dim)
    queries[q_slots] = attention.query(x)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, size).transpose(1, 2)

    scale = getattr(attention, "scaling", size**-0.5)
    context = F.scaled_dot_product_attention(
        split(queries), split(keys), split(values), attn_mask=valid[:, None, None, :], scale=scale
    )
    context = context.transpose(1, 2).reshape(batch, q_width, dim)[q_slots]  # [n_active, H]

    out = layer.attention.output
    attended = out.LayerNorm(out.dense(context) + x)
    ffn = layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(attended)))
    result = layer.output.LayerNorm(ffn + attended)

    new_hidden = hidden.clone()
    new_hidden[active] = result
    return new_hidden


# -- the runner ------------------------------------------------------------------------------


@torch.no_grad()
def run_token_exit(model, batch: TokenBatch, policy: TokenPolicy, layer_cap: int | None = None) -> TokenExitResult:
    """SENTEE/TOKEE (or full depth with kind `none`) on one right-padded batch."""
    num_layers = model.num_layers
    last = num_layers if layer_cap is None else max(1, min(int(layer_cap), num_layers))
    hidden_size, intermediate = _sizes(model)
    num_tags = len(model.labels)

    valid_all = batch.attention_mask.bool()
    total, words = batch.word_mask.shape
    predictions = torch.zeros(total, words, dtype=torch.long)
    exit_layers = torch.zeros(total, words, dtype=torch.long)
    full = full_depth_flops(model, valid_all.sum(1), batch.word_mask.sum(1))

    rows = torch.arange(total)
    hidden = model.embed(batch.input_ids)
    valid = valid_all
    piece_word = batch.piece_word
    starts = batch.word_starts
    word_mask = batch.word_mask
    word_active = word_mask.clone()
    uncertainty = torch.zeros(total, words)
    local_pred = torch.zeros(total, words, dtype=torch.long)
    local_exit = torch.zeros(total, words, dtype=torch.long)
    flops = 0

    for layer in range(last):
        # A piece is active while its word is; specials (word -1) while their sentence runs.
        follows = word_active.gather(1, piece_word.clamp_min(0))
        active = valid & ((piece_word < 0) | follows)
        module = model.backbone.encoder.layer[layer]
        hidden = partial_layer(module, hidden, valid, active)
        flops += layer_flops(hidden_size, intermediate, active.sum(1), valid.sum(1))

        states = hidden.gather(1, starts[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [b, W, H]
        logits = model.exit_logits(layer, states[word_active])
        flops += head_flops(hidden_size, num_tags, logits.shape[0])
        uncertainty[word_active] = token_uncertainty(logits)
        local_pred[word_active] = logits.argmax(-1)

        if layer == last - 1:
            halting = word_active
        elif policy.kind == "tokee":
            halting = word_active & (window_scores(uncertainty, word_mask, policy.window) < policy.threshold)
        elif policy.kind == "sentee":
            done = sentence_scores(uncertainty, word_mask, policy.reduce) < policy.threshold
            halting = word_active & done[:, None]
        else:
            halting = torch.zeros_like(word_active)
        local_exit[halting] = layer + 1
        word_active = word_active & ~halting

        finished = ~word_active.any(1)
        if finished.any():
            predictions[rows[finished]] = local_pred[finished]
            exit_layers[rows[finished]] = local_exit[finished]
            keep = ~finished
            if not keep.any():
                break
            rows, hidden, valid, piece_word = rows[keep], hidden[keep], valid[keep], piece_word[keep]
            starts, word_mask, word_active = starts[keep], word_mask[keep], word_active[keep]
            uncertainty, local_pred, local_exit = uncertainty[keep], local_pred[keep], local_exit[keep]
            width = int(valid.sum(1).max())  # right padding: columns past the longest left are dead
            hidden, valid, piece_word = hidden[:, :width], valid[:, :width], piece_word[:, :width]
    predictions[~batch.word_mask] = 0
    return TokenExitResult(predictions, exit_layers, flops, full)


# -- over a data set ------------------------------------------------------------------------


@dataclass
class TaggedRun:
    """Per sentence (windows stitched back): tag ids and exit layers per word; FLOPs totals."""

    predictions: list[list[int]]
    exit_layers: list[list[int]]
    flops: int
    full_flops: int

    @property
    def flops_speedup(self) -> float:
        return self.full_flops / max(self.flops, 1)

    def mean_exit_layer(self) -> float:
        flat = [layer for sentence in self.exit_layers for layer in sentence]
        return sum(flat) / max(len(flat), 1)


def run_over_tokens(
    model, data: EncodedTokens, policy: TokenPolicy, batch_size: int = 32, layer_cap: int | None = None,
    batches: list[TokenBatch] | None = None,
) -> TaggedRun:
    predictions: list[list[int]] = [[] for _ in range(data.num_sentences)]
    exits: list[list[int]] = [[] for _ in range(data.num_sentences)]
    flops = full = 0
    for batch in batches if batches is not None else token_batches(data, batch_size):
        result = run_token_exit(model, batch, policy, layer_cap)
        flops += result.flops
        full += result.full_flops
        for b, row in enumerate(batch.rows):
            sentence, _ = data.pieces[row]
            count = len(data.word_starts[row])
            # Windows of one sentence come in order, so appending stitches them back.
            predictions[sentence].extend(result.predictions[b, :count].tolist())
            exits[sentence].extend(result.exit_layers[b, :count].tolist())
    return TaggedRun(predictions, exits, flops, full)


def saved_token_policy(model) -> TokenPolicy:
    saved = model.exit_config.extra.get("token_policy") or {}
    return TokenPolicy(
        kind=saved.get("policy", "tokee"),
        threshold=float(saved.get("threshold", DEFAULT_THRESHOLD)),
        window=int(saved.get("window", DEFAULT_WINDOW)),
        reduce=saved.get("reduce", "max"),
    )


def predict_tags(
    model,
    tokenizer,
    sentences: list[list[str]],
    policy: str = "tokee",
    window: int | None = None,
    threshold: float | None = None,
    layer_cap: int | None = None,
    batch_size: int = 32,
) -> list[dict]:
    """Tags and exit layers per word for pre-split sentences.

    `policy` is tokee, sentee (max uncertainty) or none (full depth); `window` and `threshold`
    default to the model directory's saved token policy (rayexit.json `extra.token_policy`),
    else window 3 / threshold 0.1. `layer_cap` bounds every word's depth (a latency budget).
    Returns one dict per sentence: {"tags": [...], "exit_layers": [...]}.
    """
    saved = saved_token_policy(model)
    chosen = TokenPolicy(
        kind=policy,
        threshold=saved.threshold if threshold is None else float(threshold),
        window=saved.window if window is None else int(window),
        reduce=saved.reduce,
    )
    if layer_cap is not None and int(layer_cap) < 1:
        raise RayexitError(f"layer_cap: got {layer_cap!r}, expected a whole number >= 1")
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, list) or not all(isinstance(w, str) for w in sentence):
            raise RayexitError(f"sentences[{index}]: expected a list of words (strings)")
    nonempty = [i for i, s in enumerate(sentences) if s]
    out = [{"tags": [], "exit_layers": []} for _ in sentences]
    if not nonempty:
        return out
    model.eval()
    data = encode_tagged(tokenizer, [sentences[i] for i in nonempty], None, model.exit_config.max_length)
    run = run_over_tokens(model, data, chosen, batch_size, layer_cap)
    labels = model.labels
    for k, i in enumerate(nonempty):
        out[i] = {"tags": [labels[t] for t in run.predictions[k]], "exit_layers": run.exit_layers[k]}
    return out
