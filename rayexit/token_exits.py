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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayexit.data.conll import EncodedTokens, TokenBatch, encode_tagged, token_batches
from rayexit.errors import RayexitError
from rayexit.flops import layer_flops, sizes, token_head_flops
from rayexit.policy import FULL_DEPTH, ExitPolicy, token_halts, token_uncertainty, window_scores  # noqa: F401

DEFAULT_POLICY = ExitPolicy("tokee", 0.1, window=3)
TokenPolicy = ExitPolicy  # the token task's policies are ExitPolicy kinds tokee / sentee / none


@dataclass
class TokenExitResult:
    predictions: torch.Tensor  # [B, W] tag id per word
    exit_layers: torch.Tensor  # [B, W] 1-based layer each word halted at (0 where no word)
    flops: int  # what this run computed
    full_flops: int  # what full depth computes for the same batch


def full_depth_flops(model, tokens: torch.Tensor, words: torch.Tensor) -> int:
    """Every layer on every real token, and the final exit on every word."""
    hidden, intermediate = sizes(model)
    per_layer = layer_flops(hidden, intermediate, tokens, tokens)
    return model.num_layers * per_layer + token_head_flops(model, int(words.sum()))


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
def run_token_exit(model, batch: TokenBatch, policy: ExitPolicy, layer_cap: int | None = None) -> TokenExitResult:
    """SENTEE/TOKEE (or full depth with kind `none`) on one right-padded batch.

    Runs on the model's device (the batch is moved there); the result's tensors come back on the CPU.
    """
    policy.check_task("token")
    num_layers = model.num_layers
    last = num_layers if layer_cap is None else max(1, min(int(layer_cap), num_layers))
    hidden_size, intermediate = sizes(model)
    thresholds = policy.per_layer(num_layers)
    device = next(model.parameters()).device
    if batch.input_ids.device != device:
        batch = batch.to(device)

    valid_all = batch.attention_mask.bool()
    total, words = batch.word_mask.shape
    predictions = torch.zeros(total, words, dtype=torch.long, device=device)
    exit_layers = torch.zeros(total, words, dtype=torch.long, device=device)
    full = full_depth_flops(model, valid_all.sum(1), batch.word_mask.sum(1))

    rows = torch.arange(total, device=device)
    hidden = model.embed(batch.input_ids)
    valid = valid_all
    piece_word = batch.piece_word
    starts = batch.word_starts
    word_mask = batch.word_mask
    word_active = word_mask.clone()
    uncertainty = torch.zeros(total, words, device=device)  # float32 whatever the model's dtype
    local_pred = torch.zeros(total, words, dtype=torch.long, device=device)
    local_exit = torch.zeros(total, words, dtype=torch.long, device=device)
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
        flops += token_head_flops(model, logits.shape[0])
        uncertainty[word_active] = token_uncertainty(logits)
        local_pred[word_active] = logits.argmax(-1)

        if layer == last - 1:
            halting = word_active
        else:
            halting = word_active & token_halts(policy, uncertainty, word_mask, thresholds[layer])
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
    return TokenExitResult(predictions.cpu(), exit_layers.cpu(), flops, full)


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
    model, data: EncodedTokens, policy: ExitPolicy, batch_size: int = 32, layer_cap: int | None = None,
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


def saved_token_policy(model) -> ExitPolicy:
    """The model directory's policy when it is a token one, else TOKEE window 3 / threshold 0.1."""
    saved = model.exit_config.policy
    return saved if saved.kind in ("tokee", "sentee") else DEFAULT_POLICY


def predict_tags(
    model,
    tokenizer,
    sentences: list[list[str]],
    policy: str = "tokee",
    window: int | None = None,
    threshold: float | list[float] | None = None,
    layer_cap: int | None = None,
    batch_size: int = 32,
) -> list[dict]:
    """Tags and exit layers per word for pre-split sentences.

    `policy` is tokee, sentee (max uncertainty) or none (full depth); `window` and `threshold`
    default to the model directory's saved token policy (rayexit.json `policy`), else window 3 /
    threshold 0.1. `layer_cap` bounds every word's depth (a latency budget).
    Returns one dict per sentence: {"tags": [...], "exit_layers": [...]}.
    """
    saved = saved_token_policy(model)
    if policy == "none":
        chosen = FULL_DEPTH
    else:
        chosen = ExitPolicy(
            policy,
            saved.thresholds if threshold is None else threshold if isinstance(threshold, list) else float(threshold),
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


# -- halting simulated on cached uncertainties ------------------------------------------------


def simulate_halting(
    uncertainty: torch.Tensor,
    word_mask: torch.Tensor,
    policy: ExitPolicy,
    thresholds: torch.Tensor | None = None,
    windows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The runner's halting layer (1-based) per word, from per-layer uncertainties [B, W, L].

    As in `run_token_exit`, a halted word's uncertainty stays at its halting layer's value in
    its neighbours' windows and sentence scores. `thresholds` [B] and `windows` [B] give each
    sentence its own setting (self-sampling draws them); by default the policy's apply to all.
    """
    batch, words, layers = uncertainty.shape
    per_layer = policy.per_layer(layers)
    halt = torch.full((batch, words), layers, dtype=torch.long)
    active = word_mask.clone()
    current = torch.zeros(batch, words)
    groups = [(torch.ones(batch, dtype=torch.bool), policy)]
    if windows is not None:
        groups = [(windows == w, ExitPolicy(policy.kind, 0.0, window=int(w))) for w in windows.unique().tolist()]
    for layer in range(layers - 1):
        current = torch.where(active, uncertainty[:, :, layer], current)
        limit = per_layer[layer] if thresholds is None else thresholds[:, None]
        halting = torch.zeros_like(active)
        for rows, group_policy in groups:
            group_limit = limit if thresholds is None else limit[rows]
            halting[rows] = token_halts(group_policy, current[rows], word_mask[rows], group_limit)
        halting &= active
        halt[halting] = layer + 1
        active &= ~halting
    return torch.where(word_mask, halt, torch.zeros_like(halt))


@dataclass
class TokenCache:
    """Every exit's per-word uncertainty and tag at full depth, for replaying token policies.

    SENTEE replays exactly (a sentence leaves whole, so nothing it attends to changes). TOKEE
    replays approximately: live, the words still running attend to halted words' frozen states,
    which full-depth states do not reproduce. Sweeps therefore screen on the replay and report
    the points that matter from live runs.
    """

    uncertainty: torch.Tensor  # [R, W, L] per encoded window (row)
    tags: torch.Tensor  # [R, W, L] argmax tag per exit
    word_mask: torch.Tensor  # [R, W]
    word_pieces: torch.Tensor  # [R, W] word-pieces per word
    lengths: torch.Tensor  # [R] tokens per row, specials included
    data: EncodedTokens
    dims: tuple[int, int, int]  # hidden size, intermediate size, number of tags

    @property
    def num_layers(self) -> int:
        return self.uncertainty.shape[2]

    def exit_tags(self, layer: int) -> list[list[int]]:
        """Per sentence (windows stitched), every word's tag at exit `layer` (0-based)."""
        return self.stitch(self.tags[:, :, layer])

    def stitch(self, per_row: torch.Tensor) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.data.num_sentences)]
        for row, (sentence, _) in enumerate(self.data.pieces):
            out[sentence].extend(per_row[row, : len(self.data.word_starts[row])].tolist())
        return out

    def simulate(self, policy: ExitPolicy) -> tuple[list[list[int]], list[list[int]], float]:
        """(tags per sentence, exit layer per word, FLOPs speed-up) of `policy` replayed."""
        halt = simulate_halting(self.uncertainty, self.word_mask, policy)
        index = (halt.clamp_min(1) - 1)[:, :, None]
        tags = self.tags.gather(2, index)[:, :, 0]
        return self.stitch(tags), self.stitch(halt), self._full_flops() / max(self._flops(halt), 1)

    def _flops(self, halt: torch.Tensor) -> int:
        """What `run_token_exit` computes for these halting layers: per layer, the pieces of
        running words (plus the specials while any word of the sentence runs) attend to the
        sentence's tokens; an exit head runs on every running word."""
        hidden, intermediate, num_tags = self.dims
        specials = self.lengths - (self.word_pieces * self.word_mask).sum(1)
        total = 0
        for layer in range(self.num_layers):
            running = (halt > layer) & self.word_mask
            sentence_runs = running.any(1)
            queries = (self.word_pieces * running).sum(1) + specials * sentence_runs
            keys = self.lengths * sentence_runs
            total += layer_flops(hidden, intermediate, queries, keys) + 2 * int(running.sum()) * hidden * num_tags
        return total

    def _full_flops(self) -> int:
        """As `full_depth_flops`: every layer on every token and the final exit on every word."""
        hidden, intermediate, num_tags = self.dims
        per_layer = layer_flops(hidden, intermediate, self.lengths, self.lengths)
        return self.num_layers * per_layer + 2 * int(self.word_mask.sum()) * hidden * num_tags


@torch.no_grad()
def cache_token_exits(model, data: EncodedTokens, batch_size: int = 32) -> TokenCache:
    """One full-depth pass over `data`: the replay cache of every exit's word uncertainty and tag."""
    model.eval()
    rows, words, layers = len(data), max(len(s) for s in data.word_starts), model.num_layers
    uncertainty = torch.ones(rows, words, layers)
    tags = torch.zeros(rows, words, layers, dtype=torch.long)
    device = next(model.parameters()).device
    for batch in token_batches(data, batch_size):
        moved = batch.to(device)
        logits = model(moved.input_ids, moved.attention_mask)
        per_word = torch.stack([word_logits(z, moved).float().cpu() for z in logits], dim=2)  # [B, W, L, T]
        width = per_word.shape[1]
        for b, row in enumerate(batch.rows):
            uncertainty[row, :width] = token_uncertainty(per_word[b])
            tags[row, :width] = per_word[b].argmax(-1)
    word_mask = torch.zeros(rows, words, dtype=torch.bool)
    pieces = torch.zeros(rows, words, dtype=torch.long)
    for row, starts in enumerate(data.word_starts):
        ends = starts[1:] + [len(data.input_ids[row]) - data.tail_length]
        word_mask[row, : len(starts)] = True
        pieces[row, : len(starts)] = torch.tensor([e - a for a, e in zip(starts, ends, strict=True)])
    lengths = torch.tensor([len(ids) for ids in data.input_ids])
    return TokenCache(uncertainty, tags, word_mask, pieces, lengths, data, (*sizes(model), len(model.labels)))


def word_logits(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """[B, S, T] piece logits -> [B, W, T] at each word's first piece."""
    return logits.gather(1, batch.word_starts[:, :, None].expand(-1, -1, logits.shape[-1]))
