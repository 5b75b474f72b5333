"""Tests that fail on specific broken implementations the rest of the suite let through.

- the batched runner keeping every row (or every padding column) after samples exit;
- `reverse` and `final` swapped in RomeBERT's gradient projection, checked through the loop;
- a `gr_scope` projecting over other parameters than the ones it names;
- 2 workers on data that does not divide into global batches: a trailing partial batch used;
- `rayexit eval` on `atis:test` for a model trained on `atis` (test-only intents).

Every entry point is one small function at the top, so that a restructure re-points it once.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import tiny_sequence_model
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rayexit.config import ExitPolicy, TrainSettings
from rayexit.data.encode import EncodedSet, iterate_batches, steps_per_epoch
from rayexit.losses import romebert_losses

# -- entry points (re-point these after a restructure) -------------------------------------


def run_runner(model, ids, mask, policy):
    from rayexit.exits import run_early_exit

    return run_early_exit(model, ids, mask, policy)


def run_runner_capped(model, ids, mask, layer_cap):
    from rayexit.exits import run_early_exit

    return run_early_exit(model, ids, mask, ExitPolicy("none", 0.0), layer_cap=layer_cap)


def train(model, data: EncodedSet, settings: TrainSettings, rank: int = 0, world_size: int = 1) -> None:
    from rayexit.train.loop import train_model

    train_model(model, data, settings, rank=rank, world_size=world_size, show_progress=False)


def rank_batches(data: EncodedSet, batch_size: int, seed: int, rank: int, world_size: int):
    return iterate_batches(data, batch_size, shuffle_seed=seed, rank=rank, world_size=world_size)


def rank_steps(data: EncodedSet, batch_size: int, world_size: int) -> int:
    return steps_per_epoch(data, batch_size, world_size)


def evaluate_cli(model_dir, data: str, json_path) -> int:
    from rayexit.cli import main

    return main(["eval", "--model", str(model_dir), "--data", data, "--json", str(json_path),
                 "--batch-size", "1000", "--repeats", "1"])


# -- the runner drops exited rows and dead padding columns ---------------------------------


class ScriptedExits:
    """The real tiny encoder's layers, with exits scripted by sequence length.

    A row of length n is sure of class n % 2 at layer `leave_at[n]` and undecided (uniform)
    everywhere else, so the test knows which rows must be left at every layer.
    """

    def __init__(self, model, leave_at: dict[int, int]) -> None:
        self.model = model
        self.leave_at = leave_at
        self.num_layers = model.num_layers
        self.backbone, self.exit_config, self.labels = model.backbone, model.exit_config, model.labels  # FLOPs

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def additive_mask(self, mask, dtype):
        return self.model.additive_mask(mask, dtype)

    def run_layer(self, index, hidden, mask):
        return self.model.run_layer(index, hidden, mask)

    def exit_logits(self, layer, hidden, mask):
        assert hidden.shape[:2] == mask.shape, "states and mask out of step"
        logits = torch.zeros(hidden.shape[0], 2)
        for row, length in enumerate(mask.sum(1).tolist()):
            if self.leave_at.get(length) == layer + 1:
                logits[row, length % 2] = 30.0
        return logits


def test_runner_computes_only_the_rows_and_columns_still_needed():
    model = tiny_sequence_model(layers=4, seed=1)
    lengths = [12, 3, 8, 5, 10, 4]
    leave_at = {12: 1, 10: 2, 8: 2, 4: 3}  # 3 and 5 go to the last layer
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(1000, 1000 + n)
        mask[row, :n] = 1
    seen: list[tuple[int, int, int]] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, *args[0].shape[:2])))
        for i, layer in enumerate(model.backbone.encoder.layer)
    ]
    try:
        result = run_runner(ScriptedExits(model, leave_at), ids, mask, ExitPolicy("entropy", 0.1))
    finally:
        for hook in hooks:
            hook.remove()
    exit_layers = [leave_at.get(n, 4) for n in lengths]
    assert result.exit_layers.tolist() == exit_layers
    # rows leaving early answer their scripted class; the others the final exit's argmax (0)
    assert result.predictions.tolist() == [n % 2 if n in leave_at else 0 for n in lengths]
    expected = []
    for layer in range(4):
        still = [n for n, leaves in zip(lengths, exit_layers) if leaves > layer]
        expected.append((layer, len(still), max(still)))
    assert expected == [(0, 6, 12), (1, 5, 10), (2, 3, 5), (3, 2, 5)]  # the batch shrinks in rows and width
    assert seen == expected


# -- RomeBERT's projection through the real loop: direction and scope ----------------------

DIRECTIONS = ("reverse", "final")
SCOPES = ("encoder", "shared", "per_tensor")
TOY_SEED = 3  # model and data with conflicting gradients at the first step in every scope (asserted)


def toy_batch(n: int = 8, seed: int = TOY_SEED) -> EncodedSet:
    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids.append([101] + torch.randint(1000, 3000, (length,), generator=g).tolist() + [102])
    return EncodedSet(ids, torch.randint(0, 3, (n,), generator=g).tolist(), 0)


def toy_model():
    model = tiny_sequence_model(layers=3, labels=("a", "b", "c"), seed=TOY_SEED)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the loop and the reference below must see the same network
    return model


def in_scope(name: str, scope: str) -> bool:
    """The parameters each `gr_scope` names: encoder layers, or everything the exits share."""
    if scope == "encoder":
        return name.startswith("backbone.encoder.layer.")
    return name.startswith("backbone.")


def loss_gradients(model, data: EncodedSet, settings: TrainSettings):
    """Per parameter name: the final exit's and the inner exits' gradients on the first batch."""
    ids, mask, labels = next(iterate_batches(data, settings.batch_size, shuffle_seed=settings.seed))
    model.train()
    final, exits = romebert_losses(model(ids, mask), labels, settings.gamma, settings.temperature)
    names, params = zip(*model.named_parameters())

    def grads(loss, retain):
        found = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, found)}

    return grads(final, True), grads(exits, False)


def expected_update(g_final: dict, g_exits: dict, direction: str, scope: str) -> tuple[dict, bool]:
    """RomeBERT's rule written out: leader + (other minus its part against the leader) on the scope."""
    leader, other = (g_exits, g_final) if direction == "reverse" else (g_final, g_exits)
    update = {n: leader[n] + other[n] for n in leader}
    shared = [n for n in leader if in_scope(n, scope)]
    groups = [[n] for n in shared] if scope == "per_tensor" else [shared]
    conflict = False
    for group in groups:
        dot = sum(float((other[n].double() * leader[n].double()).sum()) for n in group)
        norm_sq = sum(float((leader[n].double() ** 2).sum()) for n in group)
        if dot < 0 and norm_sq > 0:
            conflict = True
            for n in group:
                update[n] = leader[n] + other[n] - (dot / norm_sq) * leader[n]
    return update, conflict


def unit(update: dict) -> dict:
    """Direction only: gradient clipping scales every parameter by one factor."""
    norm = sum(float((g.double() ** 2).sum()) for g in update.values()) ** 0.5
    return {n: g.double() / norm for n, g in update.items()}


def first_applied_update(model, data: EncodedSet, settings: TrainSettings) -> dict:
    """Each parameter's gradient as the optimizer sees it at the loop's first step."""
    names = {id(p): n for n, p in model.named_parameters()}
    captured: dict = {}

    def hook(optimizer, args, kwargs):
        if captured:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                captured[names[id(p)]] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()

    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(model, data, settings)
    finally:
        handle.remove()
    return captured


def distance(a: dict, b: dict) -> float:
    """Euclidean distance over all parameters (of unit vectors: a relative difference)."""
    return sum(float(((a[n] - b[n]) ** 2).sum()) for n in a) ** 0.5


@pytest.fixture(scope="module")
def toy_gradients():
    data = toy_batch()
    settings = romebert_settings("reverse", "encoder", len(data))
    return data, loss_gradients(toy_model(), data, settings)


def romebert_settings(direction: str, scope: str, batch: int) -> TrainSettings:
    return TrainSettings(method="romebert", epochs=1, batch_size=batch, lr=1e-3, dropout=0.0, warmup_ratio=0.0,
                         gr_direction=direction, gr_scope=scope, exit_grad_scale=1.0,
                         final_weight=1.0)  # the paper's L and update; their own effects: test_romebert_recipe.py


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_projection_leader_and_scope_through_the_loop(direction, scope, toy_gradients):
    data, (g_final, g_exits) = toy_gradients
    hypotheses = {(d, s): expected_update(g_final, g_exits, d, s) for d in DIRECTIONS for s in SCOPES}
    want, conflict = hypotheses[(direction, scope)]
    assert conflict, "the toy gradients must conflict, or the projection never acts"
    want = unit(want)
    # every other (direction, scope) gives a clearly different update: the check below can tell them apart
    for key, (other, _) in hypotheses.items():
        if key != (direction, scope):
            assert distance(unit(other), want) > 5e-4, key

    applied = unit(first_applied_update(toy_model(), data, romebert_settings(direction, scope, len(data))))
    assert applied.keys() == want.keys()
    assert distance(applied, want) < 1e-5
    for name in want:
        gap = float((applied[name] - want[name]).norm())
        assert gap <= 1e-4 * float(want[name].norm()) + 1e-9, name


def test_reverse_keeps_the_exits_gradient_whole_and_final_the_final_one(toy_gradients):
    """update = leader + (follower minus its part along the leader), up to clipping's common scale.

    Written on the encoder layers as a vector: the update lies in the plane of the two gradients,
    the follower's coefficient is the clipping scale c, and update / c - leader is orthogonal to
    the leader (and not to the follower).
    """
    data, (g_final, g_exits) = toy_gradients
    names = [n for n in g_final if in_scope(n, "encoder")]

    def flat(grads: dict) -> torch.Tensor:
        return torch.cat([grads[n].double().reshape(-1) for n in names])

    for direction, leader, follower in (("reverse", flat(g_exits), flat(g_final)),
                                        ("final", flat(g_final), flat(g_exits))):
        assert float(leader @ follower) < 0, "the toy gradients must conflict"
        update = flat(first_applied_update(toy_model(), data, romebert_settings(direction, "encoder", len(data))))
        plane = torch.stack([leader, follower], 1)
        coefficients = torch.linalg.lstsq(plane, update[:, None]).solution[:, 0]
        assert float((plane @ coefficients - update).norm()) < 1e-4 * float(update.norm())
        applied = update / float(coefficients[1])
        kept = applied - leader  # the projected follower
        assert abs(float(kept @ leader)) < 1e-6 * float(leader @ leader), direction
        assert abs(float((applied - follower) @ follower)) > 1e-3 * float(follower @ follower), direction


# -- 2 workers, data that does not divide: only full global batches ------------------------


def identified(n: int) -> EncodedSet:
    """Example i carries token 1000 + i, so every batch says which examples it holds."""
    return EncodedSet([[101, 1000 + i] + [5000] * (i % 4) + [102] for i in range(n)], [i % 2 for i in range(n)], 0)


def example_ids(ids: torch.Tensor) -> list[int]:
    return [int(t) - 1000 for t in ids[:, 1]]


def test_two_ranks_take_equal_steps_over_full_global_batches_only():
    data, per_worker, seed = identified(21), 4, 11  # global batch 8: 2 full ones, 5 examples left over
    assert rank_steps(data, per_worker, 2) == 2
    assert rank_steps(data, per_worker, 1) == 6  # one process keeps its short last batch
    global_batches = [example_ids(ids) for ids, _, _ in rank_batches(data, 2 * per_worker, seed, 0, 1)][:2]
    ranks = [[example_ids(ids) for ids, _, _ in rank_batches(data, per_worker, seed, r, 2)] for r in (0, 1)]
    assert [len(batches) for batches in ranks] == [2, 2]
    for step, whole in enumerate(global_batches):
        assert ranks[0][step] + ranks[1][step] == whole


def test_two_ranks_through_the_loop_use_exactly_the_full_global_batches():
    data, per_worker = identified(21), 4
    settings = TrainSettings(method="joint", epochs=2, batch_size=per_worker, lr=1e-3, dropout=0.0, seed=5)
    used: dict[int, list[list[int]]] = {}
    for rank in (0, 1):
        model = tiny_sequence_model(layers=2, seed=0)
        seen: list[list[int]] = []

        def record(module, args, kwargs, seen=seen):
            seen.append(example_ids(kwargs.get("input_ids", args[0] if args else None)))

        hook = model.backbone.embeddings.register_forward_pre_hook(record, with_kwargs=True)
        try:
            train(model, data, settings, rank=rank, world_size=2)
        finally:
            hook.remove()
        used[rank] = seen
    assert len(used[0]) == len(used[1]) == 4  # 2 steps per epoch on each rank
    for epoch in range(2):
        whole = [example_ids(ids) for ids, _, _ in rank_batches(data, 2 * per_worker, settings.seed + epoch, 0, 1)]
        for step in range(2):
            k = 2 * epoch + step
            assert used[0][k] + used[1][k] == whole[step]


# -- eval on atis:test with a model trained on atis -----------------------------------------


def test_eval_on_atis_test_drops_the_intents_training_never_saw(tmp_path, minilm_tokenizer, caplog):
    from rayexit.data import load_text_classification
    from rayexit.tasks import task_named

    labels = task_named("sequence").label_set(load_text_classification("atis"))
    test = load_text_classification("atis:test")
    known = sum(label in set(labels) for label in test.labels)
    assert 0 < known < len(test), "atis:test must hold intents that train lacks, or this test proves nothing"
    model_dir = tmp_path / "atis-model"
    tiny_sequence_model(layers=2, labels=labels).save_pretrained(model_dir, minilm_tokenizer)
    report_path = tmp_path / "report.json"
    with caplog.at_level(logging.WARNING):
        assert evaluate_cli(model_dir, "atis:test", report_path) == 0
    report = json.loads(report_path.read_text())
    assert report["examples"] == known
    assert f"left out {len(test) - known} example(s)" in caplog.text


def test_eval_on_a_file_with_an_unknown_label_still_refuses(tmp_path, minilm_tokenizer, capsys):
    """Only the packaged ATIS split is filtered; a user's file with a label the model lacks is an error."""
    model_dir = tmp_path / "model"
    tiny_sequence_model(layers=2, labels=("0", "1")).save_pretrained(model_dir, minilm_tokenizer)
    data = tmp_path / "eval.tsv"
    data.write_text("sentence\tlabel\ngood film\t1\nbad film\t2\n")
    assert evaluate_cli(model_dir, str(data), tmp_path / "r.json") == 2
    assert "label '2' is not in the model's label set" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# -- cases a mutation run (mutmut) showed the suite did not pin down -----------------------


def test_distillation_scales_by_t_squared_at_a_temperature_other_than_two():
    """At T = 2, T^2 and 2T agree; T = 3 tells them apart. Two rows: the mean is over the batch."""

    from rayexit.losses import distillation_kl

    student = [[1.0, 0.0, -1.0], [2.0, 2.0, 2.0]]
    teacher = [[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]
    t = 3.0

    def softmax(row):
        e = [math.exp(x / t) for x in row]
        return [x / sum(e) for x in e]

    per_row = [
        sum(p * math.log(p / q) for p, q in zip(softmax(tr), softmax(sr))) for sr, tr in zip(student, teacher)
    ]
    expected = t * t * sum(per_row) / len(per_row)
    got = distillation_kl(torch.tensor(student), torch.tensor(teacher), t).item()
    assert math.isclose(got, expected, rel_tol=1e-5)


def test_romebert_losses_with_a_single_exit_have_no_inner_term():
    final, exits = romebert_losses([torch.tensor([[2.0, 0.0]])], torch.tensor([0]), gamma=0.5, temperature=2.0)
    assert exits.shape == () and exits.item() == 0.0
    assert final.item() == pytest.approx(torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0]]),
                                                                           torch.tensor([0])).item())


def test_projection_reports_no_conflict_when_nothing_conflicts():
    from rayexit.gradreg import project_conflicting

    leader = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    orthogonal = [torch.tensor([0.0, 5.0]), torch.tensor([3.0, 0.0])]  # dot 0: nothing to remove
    agreeing = [torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])]
    for per_tensor in (False, True):
        for other in (orthogonal, agreeing):
            projected, conflict = project_conflicting(other, leader, per_tensor=per_tensor)
            assert conflict is False, (per_tensor, other)
            assert all(torch.equal(a, b) for a, b in zip(projected, other))


def test_combine_projects_over_all_tensors_as_one_vector_by_default():
    """RomeBERT's choice: one dot product over every tensor; per-tensor only when asked."""
    from rayexit.gradreg import combine_with_projection

    leader = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    other = [torch.tensor([-2.0, 0.0]), torch.tensor([0.0, 1.0])]  # dot -2 + 1 = -1 overall; tensor 1 agrees
    combined, conflict = combine_with_projection(leader, other)
    # whole vector: other - (-1 / 2) * leader = [-1.5, 0], [0, 1.5]; plus leader
    assert conflict is True
    assert torch.allclose(combined[0], torch.tensor([-0.5, 0.0]))
    assert torch.allclose(combined[1], torch.tensor([0.0, 2.5]))
    per_tensor, _ = combine_with_projection(leader, other, per_tensor=True)
    assert torch.allclose(per_tensor[0], torch.tensor([1.0, 0.0]))  # [-2, 0] projected to [0, 0]
    assert torch.allclose(per_tensor[1], torch.tensor([0.0, 2.0]))


class ScriptedLogits(ScriptedExits):
    """Exit logits read from a table [rows, layers, classes]; a row is known by its length (3, 4, ...)."""

    def __init__(self, model, table: torch.Tensor) -> None:
        super().__init__(model, {})
        self.table = table

    def exit_logits(self, layer, hidden, mask):
        return self.table[mask.sum(1) - 3, layer]


# Per row, the logits of exits 1..4 over 3 classes. Row 1 is certain: [200, 0, 0] gives a softmax of
# exactly [1, 0, 0] in float32, so its confidence is exactly 1 and its entropy exactly 0.
TABLE = torch.tensor([
    [[200, 0, 0], [200, 0, 0], [200, 0, 0], [200, 0, 0]],  # argmax 0 0 0 0; agreeing 0 1 2 3
    [[0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1]],  # argmax 1 0 0 2; agreeing 0 0 1 0; confidence 0.58
    [[0, 0, 2], [0, 0, 2], [0, 2, 0], [0, 2, 0]],  # argmax 2 2 1 1; agreeing 0 1 0 1; confidence 0.79
    [[0, 3, 0], [0, 3, 0], [0, 3, 0], [0, 3, 0]],  # argmax 1 1 1 1; agreeing 0 1 2 3; confidence 0.91
    [[0, 0, 3], [0, 3, 0], [3, 0, 0], [0, 0, 3]],  # argmax 2 1 0 2; agreeing 0 0 0 0; confidence 0.91
], dtype=torch.float32)


def hand_made_batch():
    """Rows of lengths 3..7 (the row of TABLE each one reads), right-padded."""
    lengths = [3, 4, 5, 6, 7]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(1000, 1000 + n)
        mask[row, :n] = 1
    return lengths, ids, mask


@pytest.mark.parametrize(
    "policy, exit_layers",
    [
        (ExitPolicy("maxprob", 1.0), [1, 4, 4, 4, 4]),  # confidence >= threshold: exactly 1 leaves
        (ExitPolicy("maxprob", 0.9), [1, 4, 4, 1, 1]),
        (ExitPolicy("entropy", 0.0), [4, 4, 4, 4, 4]),  # entropy < threshold: exactly 0 stays
        (ExitPolicy("entropy", [0.0, 0.0, 0.9]), [3, 4, 3, 3, 3]),  # per layer; row 2 has 0.98 at exit 3
        (ExitPolicy("patience", 1), [2, 3, 2, 2, 4]),  # agreeing layers >= patience
        (ExitPolicy("patience", 2), [3, 4, 4, 3, 4]),
        (ExitPolicy("none", 0.0), [4, 4, 4, 4, 4]),
    ],
)
def test_runner_and_replay_on_hand_made_exits(policy, exit_layers):
    from rayexit.exits import ExitCache

    lengths, ids, mask = hand_made_batch()
    runner = run_runner(ScriptedLogits(tiny_sequence_model(layers=4, seed=1), TABLE), ids, mask, policy)
    replay = ExitCache(TABLE).simulate(policy)
    rows = torch.arange(len(lengths))
    probs = TABLE.softmax(-1)
    for result in (runner, replay):
        assert result.exit_layers.tolist() == exit_layers
        assert torch.equal(result.predictions, TABLE.argmax(-1)[rows, result.exit_layers - 1])
        torch.testing.assert_close(result.confidences, probs.max(-1).values[rows, result.exit_layers - 1])


def test_replay_layer_cap_and_exit_accuracies_by_hand():
    from rayexit.exits import ExitCache

    cache = ExitCache(TABLE)
    everyone = ExitPolicy("none", 0.0)
    assert cache.simulate(everyone, layer_cap=2).exit_layers.tolist() == [2] * 5
    assert cache.simulate(everyone, layer_cap=0).exit_layers.tolist() == [1] * 5  # at least one layer
    assert cache.simulate(everyone, layer_cap=9).exit_layers.tolist() == [4] * 5  # at most all of them
    # argmax per exit: [0 1 2 1 2], [0 0 2 1 1], [0 0 1 1 0], [0 2 1 1 2] against labels [0 2 1 1 2]
    assert cache.exit_accuracies(torch.tensor([0, 2, 1, 1, 2])) == pytest.approx([0.6, 0.4, 0.6, 1.0])


def test_even_window_reaches_one_word_further_right():
    from rayexit.token_exits import window_scores

    u = torch.tensor([[0.1, 0.5, 0.2, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert window_scores(u, mask, 2)[0].tolist() == pytest.approx([0.5, 0.5, 0.2, 0.0])


# -- the token runner (SENTEE/TOKEE): the same guards -----------------------------------------


def run_token_runner(model, batch, policy, layer_cap=None):
    from rayexit.token_exits import run_token_exit

    return run_token_exit(model, batch, policy, layer_cap)


def token_batch(tokenizer, sentences):
    from rayexit.data.conll import encode_tagged, make_batch

    data = encode_tagged(tokenizer, sentences, None, 64)
    return make_batch(data, list(range(len(data))))


@torch.no_grad()
def first_exit_uncertainty(model, batch) -> torch.Tensor:
    """Each word's uncertainty at exit 1 [B, W], from a plain full-depth forward."""
    from rayexit.token_exits import token_uncertainty

    logits = model(batch.input_ids, batch.attention_mask)[0]
    at_words = logits.gather(1, batch.word_starts[:, :, None].expand(-1, -1, logits.shape[-1]))
    return token_uncertainty(at_words)


def certain_tagger():
    """Every exit answers tag 0 with a softmax of exactly [1, 0, ...]: uncertainty exactly 0."""
    from test_token_exits import tiny_tagger

    model = tiny_tagger()
    with torch.no_grad():
        for head in model.heads:
            head.classifier.weight.zero_()
            head.classifier.bias.zero_()
            head.classifier.bias[0] = 200.0
    return model


def test_token_runner_drops_finished_sentences_and_dead_columns(minilm_tokenizer, monkeypatch):
    from test_token_exits import SENTENCES, tiny_tagger

    from rayexit.token_exits import TokenPolicy

    batch = token_batch(minilm_tokenizer, SENTENCES)
    longest = int(batch.attention_mask.sum(1).argmax())
    # a tagger (by seed) on which the longest sentence is not the least sure at exit 1, and a threshold
    # just above its mean uncertainty there: it leaves at once, and others stay
    for seed in range(10):
        model = tiny_tagger(seed=seed)
        u = torch.where(batch.word_mask, first_exit_uncertainty(model, batch), torch.zeros(()))
        means = u.sum(1) / batch.word_mask.sum(1)
        threshold = float(means[longest]) + 1e-4
        if (means > threshold + 1e-3).any():
            break
    else:
        pytest.fail("no tagger on which the longest sentence leaves first")
    seen: list[tuple[int, int]] = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        seen.append((key.shape[0], key.shape[2]))  # sentences in the batch, token columns
        return attention(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    result = run_token_runner(model, batch, TokenPolicy("sentee", threshold, reduce="mean"))
    monkeypatch.undo()
    sentence_exit = result.exit_layers.max(1).values  # SENTEE: every word of a sentence leaves together
    lengths = batch.attention_mask.sum(1)
    expected = []
    for layer in range(model.num_layers):
        running = sentence_exit > layer
        if running.any():
            expected.append((int(running.sum()), int(lengths[running].max())))
    assert expected[1][0] < expected[0][0] and expected[1][1] < expected[0][1]  # fewer rows, narrower
    assert seen == expected


def test_token_runner_thresholds_are_strict_and_sentee_is_honoured(minilm_tokenizer):
    from rayexit.token_exits import TokenPolicy

    model = certain_tagger()
    batch = token_batch(minilm_tokenizer, [["Peter", "visited", "Brussels"], ["Hi"]])
    layers, words = model.num_layers, batch.word_mask
    for kind in ("tokee", "sentee"):
        stay = run_token_runner(model, batch, TokenPolicy(kind, 0.0, window=1))  # uncertainty 0 is not < 0
        assert stay.exit_layers[words].tolist() == [layers] * int(words.sum()), kind
        leave = run_token_runner(model, batch, TokenPolicy(kind, 0.5, window=1))
        assert leave.exit_layers[words].tolist() == [1] * int(words.sum()), kind
        assert leave.exit_layers[~words].tolist() == [0] * int((~words).sum()), "no exit layer where no word"
        assert leave.predictions[words].tolist() == [0] * int(words.sum())


def test_sentee_mean_and_max_differ(minilm_tokenizer):
    from test_token_exits import tiny_tagger

    from rayexit.token_exits import TokenPolicy

    model = tiny_tagger()
    batch = token_batch(minilm_tokenizer, [["Peter", "Blackburn", "visited", "Brussels", "today"]])
    u = first_exit_uncertainty(model, batch)[0]
    mean, top = float(u.mean()), float(u.max())
    assert top - mean > 1e-3, "the words need different uncertainties at exit 1"
    threshold = (mean + top) / 2
    by_mean = run_token_runner(model, batch, TokenPolicy("sentee", threshold, reduce="mean"))
    by_max = run_token_runner(model, batch, TokenPolicy("sentee", threshold, reduce="max"))
    assert by_mean.exit_layers[0].tolist() == [1] * 5
    assert min(by_max.exit_layers[0].tolist()) > 1


def test_halted_first_word_stops_computing(minilm_tokenizer):
    """[CLS] a b [SEP]: once word 0 halts, later layers compute 3 query rows, not 4 (FLOPs by hand)."""
    from test_token_exits import tiny_tagger

    from rayexit.token_exits import TokenPolicy, layer_flops

    model = tiny_tagger()
    for pair in (["a", "b"], ["b", "a"], ["x", "y"], ["y", "x"], ["of", "the"], ["the", "of"]):
        batch = token_batch(minilm_tokenizer, [pair])
        u = first_exit_uncertainty(model, batch)[0]
        if batch.attention_mask.sum() == 4 and float(u[1] - u[0]) > 1e-3:
            break
    else:
        pytest.fail("no two-word sentence whose first word is the surer one at exit 1")
    result = run_token_runner(model, batch, TokenPolicy("tokee", float(u[0] + u[1]) / 2, window=1))
    first, second = result.exit_layers[0].tolist()
    assert first == 1 and second > 1
    h, i, tags = 32, 64, len(model.labels)
    expected = layer_flops(h, i, torch.tensor([4]), torch.tensor([4])) + 2 * h * tags * 2
    expected += (second - 1) * (layer_flops(h, i, torch.tensor([3]), torch.tensor([4])) + 2 * h * tags * 1)
    assert result.flops == expected


def test_runner_layer_cap_of_one_stops_after_the_first_layer():
    _, ids, mask = hand_made_batch()
    capped = run_runner_capped(ScriptedLogits(tiny_sequence_model(layers=4, seed=1), TABLE), ids, mask, 1)
    assert capped.exit_layers.tolist() == [1] * 5
    assert torch.equal(capped.predictions, TABLE[:, 0].argmax(-1))
