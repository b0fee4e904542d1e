"""The upstream model (DERM): shapes, gradients, losses by hand, context isolation, sharding."""

from __future__ import annotations

import copy
import math
import socket
from typing import Dict, Optional, Sequence

import numpy as np

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from derl.datapipes.batch import NUM_EVENT_TIMES, Batch
import torch.nn.functional as F

from derl.models.losses import in_batch_softmax_loss, pairwise_logistic_loss, sampled_softmax_loss
from derl.models.upstream import DERM, SHARED_TABLES, PinFeatures, UpstreamConfig

VOCAB = dict(
    user_id=10, country=3, age_bucket=4, gender=3, pin_id=12, category=5, advertiser_id=4,
    seq_action=6, seq_gap=NUM_EVENT_TIMES, surface=3, hour=24,
)
B = 4


def small_config(**overrides) -> UpstreamConfig:
    kw = dict(
        num_embeddings=VOCAB, embedding_dim=8, seq_len=5, seq_layers=1, seq_heads=2,
        seq_dropout=0.0, tower_dims=(16,), interaction_dims=(16,),
    )
    return UpstreamConfig(**{**kw, **overrides})


K = 3  # catalogue negatives of a test batch


def make_batch(
    cfg: UpstreamConfig,
    seq_lengths: Sequence[int] = (3, 0, 5, 1),
    context: Optional[Sequence[int]] = None,
    pin_ids: Sequence[int] = (1, 2, 3, 4),
    surface: Sequence[int] = (0, 1, 2, 0),
    hour: Sequence[int] = (0, 5, 12, 23),
    labels: Optional[Dict[str, torch.Tensor]] = None,
    seed: int = 0,
) -> Batch:
    """A batch of B windows (datapipes/windows.py), one row each, with every key of
    cfg.sparse_features: window w's events, of which the first `context[w]` are context (by
    default all but the last two of a window of two or more: those are next-Pin targets); the
    rows' Pins 1 and 3 are organic (no advertiser); K catalogue negatives in window 0's lists."""
    g = torch.Generator().manual_seed(seed)
    if context is None:
        context = [n - 2 if n >= 2 else n for n in seq_lengths]
    seq_is_ad = torch.rand(sum(seq_lengths), generator=g) < 0.3
    neg_is_ad = torch.tensor([True, False, False])
    owner = torch.repeat_interleave(torch.arange(B), torch.tensor(seq_lengths))
    values, lengths = [], []
    for f in cfg.sparse_features:
        if f == "pin_id":
            lens, vals = [1] * B, torch.tensor(pin_ids)
        else:
            lens = list(seq_lengths) if f.startswith("seq_") else [1] * B
            if f == "advertiser_id":
                lens = [0, 1, 0, 1]
            if f == "seq_advertiser_id":
                lens = torch.bincount(owner[seq_is_ad], minlength=B).tolist()
            if f.startswith("neg_"):
                lens = [int(neg_is_ad.sum()) if f == "neg_advertiser_id" else K] + [0] * (B - 1)
            rows = VOCAB[SHARED_TABLES.get(f, f)]
            vals = torch.randint(0, rows, (sum(lens),), generator=g)
        values.append(vals)
        lengths += lens
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=list(cfg.sparse_features), values=torch.cat(values), lengths=torch.tensor(lengths)
    )
    if labels is None:
        labels = {
            "click": torch.tensor([1.0, 0.0, 1.0, 0.0]),
            "save": torch.tensor([0.0, 1.0, 0.0, 0.0]),
            "hide": torch.tensor([0.0, 0.0, 0.0, 1.0]),
        }
    dense = {
        "content_emb": torch.randn(B, cfg.content_dim, generator=g),
        "pin_is_ad": torch.tensor([False, True, False, True]),
        "seq_content": torch.randn(sum(seq_lengths), cfg.content_dim, generator=g),
        "seq_is_ad": seq_is_ad,
        "context_len": torch.tensor(context),
        "pin_sampling_prob": torch.tensor([0.1, 0.2, 0.05, 0.3]),
        "row_context": torch.stack([torch.tensor(surface), torch.tensor(hour), torch.full((B,), -1)], dim=1),
        "neg_content": torch.randn(K, cfg.content_dim, generator=g),
        "neg_is_ad": neg_is_ad,
        "seq_log_q": torch.log(torch.rand(sum(seq_lengths), generator=g)),
        "neg_log_q": torch.log(torch.full((K,), 0.1)),
    }
    return Batch(sparse=sparse, dense=dense, labels=labels)


@pytest.fixture
def model() -> DERM:
    torch.manual_seed(0)
    return DERM(small_config())


def test_forward_backward_reaches_tables_and_transformer(model: DERM) -> None:
    loss, out = model(make_batch(model.cfg))
    assert set(out["logits"]) == set(model.cfg.tasks)
    assert set(out["losses"]) == {"click", "save", "hide", "contrastive", "next_pin"}
    assert out["losses"]["contrastive"] > 0 and out["losses"]["next_pin"] > 0
    loss.backward()
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, missing
    for name in (
        "sequence_ec.embeddings.t_pin_id.weight",
        "sequence_ec.embeddings.t_seq_action.weight",
        "sequence_ec.embeddings.t_seq_gap.weight",
        "sequence_ec.embeddings.t_category.weight",
        "sequence_ec.embeddings.t_advertiser_id.weight",
        "user_ebc.embedding_bags.t_user_id.weight",
        "interaction.context.1.weight",
        "towers.user.sequence.cls",
        "towers.user.sequence.layers.0.qkv.weight",
    ):
        assert params[name].grad.abs().sum() > 0, name


def test_a_user_tower_without_user_id_has_no_such_table_and_ignores_the_id() -> None:
    """Batches always carry every profile key; a tower told to leave user_id out reads the rest."""
    batch = make_batch(small_config())
    ids = dict(batch.sparse.to_dict())  # a copy: the KJT caches and hands out this dict
    ids["user_id"] = JaggedTensor(values=(ids["user_id"].values() + 1) % VOCAB["user_id"],
                                  lengths=ids["user_id"].lengths())
    other_ids = KeyedJaggedTensor.from_jt_dict(ids)
    for features, ignores in ((("country", "age_bucket", "gender"), True), (None, False)):
        torch.manual_seed(0)
        model = DERM(small_config(**({"user_features": features} if features else {}))).eval()
        assert any("t_user_id" in name for name, _ in model.named_parameters()) is not ignores
        same = torch.allclose(model.embed_users(batch.sparse, batch.dense), model.embed_users(other_ids, batch.dense))
        assert same is ignores
    with pytest.raises(ValueError, match="--user-features must name some of"):
        small_config(user_features=("user_id", "age"))


def test_outputs_are_unit_norm_and_match_embed_methods(model: DERM) -> None:
    """In evaluation (in training the user vectors are centred over the prefixes' states too)."""
    batch = make_batch(model.cfg)
    model.eval()
    _, out = model(batch)
    for key in ("user_emb", "pin_emb"):
        assert out[key].shape == (B, model.cfg.embedding_dim)
        torch.testing.assert_close(out[key].norm(dim=1), torch.ones(B))
    torch.testing.assert_close(model.embed_users(batch.sparse, batch.dense), out["user_emb"])
    torch.testing.assert_close(
        model.embed_pins(batch.sparse, batch.dense), out["pin_emb"]
    )


def test_centred_towers_give_unit_vectors_in_training_and_export() -> None:
    """center_entities: a BatchNorm (batch statistics in training, running ones in eval and
    export) before the L2 normalisation; embed_* then agree with the eval-mode forward."""
    torch.manual_seed(0)
    model = DERM(small_config(center_entities=True))
    batch = make_batch(model.cfg)
    loss, out = model(batch)
    loss.backward()
    for key in ("user_emb", "pin_emb"):
        torch.testing.assert_close(out[key].norm(dim=1), torch.ones(B))
        # centred over the batch: the mean direction is far from any single vector's
        assert out[key].mean(dim=0).norm() < 0.9
    assert model.towers.user.unit.center.running_mean.abs().sum() > 0  # statistics were tracked
    model.eval()
    _, out = model(batch)
    torch.testing.assert_close(model.embed_users(batch.sparse, batch.dense), out["user_emb"])
    torch.testing.assert_close(model.embed_pins(batch.sparse, batch.dense), out["pin_emb"])


@pytest.mark.parametrize("seq_lengths", [(0, 2, 0, 5), (0, 0, 0, 0), (7, 1, 0, 2)])
def test_empty_and_overlong_sequences(model: DERM, seq_lengths) -> None:
    loss, out = model(make_batch(model.cfg, seq_lengths=seq_lengths))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(out["user_emb"]).all()
    torch.testing.assert_close(out["user_emb"].norm(dim=1), torch.ones(B))


def _with_last_event_changed(batch: Batch, row_lengths) -> Batch:
    """The same batch with row 0's newest event's Pin id changed."""
    kjt = batch.sparse.to_dict()
    last = row_lengths[0] - 1
    values, lengths = [], []
    for f in kjt:
        v = kjt[f].values().clone()
        if f == "seq_pin_id":
            v[last] = (v[last] + 1) % VOCAB["pin_id"]
        values.append(v)
        lengths.append(kjt[f].lengths())
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=list(kjt), values=torch.cat(values), lengths=torch.cat(lengths))
    return Batch(sparse=sparse, dense=batch.dense, labels=batch.labels)


def test_states_never_see_later_events() -> None:
    """The causal encoder with positions from the window's start: changing window 0's newest
    event changes only the state after it; every earlier state of the window, and every other
    window, stays as it was (so a window's day-start state is export's user vector)."""
    torch.manual_seed(0)
    model = DERM(small_config()).eval()
    lengths = (4, 1, 0, 2)
    batch = make_batch(model.cfg, seq_lengths=lengths)
    changed = _with_last_event_changed(batch, lengths)

    def states(b: Batch):
        user = model.towers.user
        ids = model.sequence_ec(b.sparse)
        events = PinFeatures.of(ids, "seq_", b.dense["seq_content"], b.dense["seq_is_ad"])
        return user.windows(events, ids["seq_action"], ids["seq_gap"], b.dense["context_len"]).states

    a, b = states(batch), states(changed)
    last_of_window_0 = lengths[0]  # packed: CLS, then one state per event
    torch.testing.assert_close(a[:last_of_window_0], b[:last_of_window_0], rtol=0, atol=0)
    assert not torch.allclose(a[last_of_window_0], b[last_of_window_0])
    torch.testing.assert_close(a[last_of_window_0 + 1:], b[last_of_window_0 + 1:], rtol=0, atol=0)


def test_next_pin_term_follows_its_weight() -> None:
    torch.manual_seed(0)
    off = DERM(small_config(next_pin_weight=0.0))
    _, out = off(make_batch(off.cfg))
    assert "next_pin" not in out["losses"]
    # Windows of context only have no next event: no term, and nothing breaks.
    on = DERM(small_config())
    _, out = on(make_batch(on.cfg, seq_lengths=(1, 0, 3, 0), context=(1, 0, 3, 0)))
    assert "next_pin" not in out["losses"]
    _, out = on(make_batch(on.cfg))
    assert out["next_pins"].states.shape == (4, on.cfg.embedding_dim)  # 2 targets in windows 0 and 2


def test_sampled_softmax_matches_hand_computation() -> None:
    """Each state against every candidate column, logits - beta log q, a column with the
    state's target id other than its own masked out (column 2 repeats item 10)."""
    g = torch.Generator().manual_seed(0)
    states = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    items = F.normalize(torch.randn(4, 4, generator=g), dim=1)
    targets, item_ids = torch.tensor([0, 1, 1]), torch.tensor([10, 11, 10, 12])
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.05]))
    t, beta = 0.5, 0.7
    expected = []
    for p in range(3):
        cols = [c for c in range(4) if c == targets[p] or item_ids[c] != item_ids[targets[p]]]
        logits = torch.stack([states[p] @ items[c] / t - beta * log_q[c] for c in cols])
        expected.append(-torch.log_softmax(logits, 0)[cols.index(int(targets[p]))])
    got = sampled_softmax_loss(states, targets, items, item_ids, log_q, t, beta)
    torch.testing.assert_close(got, torch.stack(expected).mean())


def test_pairwise_logistic_matches_hand_computation() -> None:
    scores, labels = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    pairs = [(0.5, -1.0), (0.5, 0.0), (2.0, -1.0), (2.0, 0.0)]  # (positive, negative)
    expected = torch.tensor([math.log1p(math.exp(n - p)) for p, n in pairs]).mean()
    torch.testing.assert_close(pairwise_logistic_loss(scores, labels), expected)
    # No pair (all positive, or all negative): zero, and still a graph to backpropagate through.
    none = scores.clone().requires_grad_()
    loss = pairwise_logistic_loss(none, torch.ones(4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(none.grad, torch.zeros(4))


def test_dot_rank_term_follows_its_weight_and_trains_the_dot_scales() -> None:
    torch.manual_seed(0)
    off = DERM(small_config())
    _, out = off(make_batch(off.cfg))
    assert "dot_rank" not in out["losses"] and off.loss.dot_scale is None
    on = DERM(small_config(dot_rank_weight=2.0, contrastive=False, next_pin_weight=0.0))
    loss, out = on(make_batch(on.cfg))
    # Three tasks with a pair each in the default batch (click, save, hide): the weight times
    # their mean pairwise loss, from the outputs' own dot.
    dot = (out["user_emb"] * out["pin_emb"]).sum(dim=1).detach()
    labels = make_batch(on.cfg).labels
    expected = 2.0 * torch.stack([pairwise_logistic_loss(dot, labels[t]) for t in ("click", "save", "hide")]).mean()
    torch.testing.assert_close(out["losses"]["dot_rank"], expected)
    loss.backward()
    assert on.loss.dot_scale.grad is not None and bool((on.loss.dot_scale.grad != 0).any())


def test_context_does_not_reach_entity_embeddings(model: DERM) -> None:
    _, a = model(make_batch(model.cfg))
    _, b = model(make_batch(model.cfg, surface=(2, 2, 0, 1), hour=(9, 9, 9, 9)))  # same seed: same draws
    torch.testing.assert_close(a["user_emb"], b["user_emb"], rtol=0, atol=0)
    torch.testing.assert_close(a["pin_emb"], b["pin_emb"], rtol=0, atol=0)
    assert not torch.equal(a["logits"]["click"], b["logits"]["click"])


def test_bce_only_over_labels_present(model: DERM) -> None:
    ad_labels = {"clicked": torch.tensor([1.0, 0, 0, 0]), "converted": torch.zeros(B)}
    _, out = model(make_batch(model.cfg, labels=ad_labels))
    assert set(out["losses"]) == {"clicked", "contrastive", "next_pin"}
    # A row whose table lacks a label holds NaN there: the task's BCE is over the other rows.
    nan = float("nan")
    mixed = {"click": torch.tensor([1.0, nan, 0.0, nan]), "clicked": torch.tensor([nan, 1.0, nan, 0.0])}
    model.eval()
    _, out = model(make_batch(model.cfg, labels=mixed))
    logits = out["logits"]
    torch.testing.assert_close(out["losses"]["click"], F.binary_cross_entropy_with_logits(
        logits["click"][[0, 2]], torch.tensor([1.0, 0.0])))
    torch.testing.assert_close(out["losses"]["clicked"], F.binary_cross_entropy_with_logits(
        logits["clicked"][[1, 3]], torch.tensor([1.0, 0.0])))
    # No task label and no contrastive or next-Pin term: nothing to learn from.
    off = DERM(small_config(contrastive=False, next_pin_weight=0.0))
    with pytest.raises(ValueError):
        off(make_batch(off.cfg, labels={"converted": torch.zeros(B)}))


def test_contrastive_positives_follow_labels(model: DERM) -> None:
    labels = {
        "click": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "save": torch.tensor([0.0, 1.0, 0.0, 0.0]),
        "hide": torch.tensor([1.0, 0.0, 0.0, 0.0]),
    }
    rows = model.loss.positive_rows(labels, torch.zeros(B))
    assert rows.tolist() == [False, True, True, False]  # row 0 was hidden
    # an ad row has no `hide` (NaN): it stays a positive if clicked
    ad = {"clicked": torch.tensor([1.0, 0.0, 1.0, 0.0]), "hide": torch.full((B,), float("nan"))}
    assert model.loss.positive_rows(ad, torch.zeros(B)).tolist() == [True, False, True, False]


def test_missing_sampling_probability_is_an_error(model: DERM) -> None:
    batch = make_batch(model.cfg)
    del batch.dense["pin_sampling_prob"]
    with pytest.raises(KeyError, match="pin_sampling_prob"):
        model(batch)


def test_learned_temperature_gets_gradient() -> None:
    m = DERM(small_config(learn_temperature=True))
    loss, _ = m(make_batch(m.cfg))
    loss.backward()
    assert m.loss.log_temperature.grad.abs() > 0


# --- the contrastive loss by hand -------------------------------------------------------------


def _reference(q, p, ids, prob, positive, t) -> float:
    """Sampled softmax written out row by row: allowed columns are the diagonal and every
    column holding another item; logits carry -log q; positive rows' losses summed over all rows."""
    losses = []
    for i in range(len(ids)):
        if not positive[i]:
            continue
        cols = [j for j in range(len(ids)) if j == i or ids[j] != ids[i]]
        log_q = np.zeros(len(ids)) if prob is None else np.log(prob)
        z = np.array([q[i] @ p[j] / t - log_q[j] for j in cols])
        losses.append(-(z[cols.index(i)] - np.log(np.exp(z).sum())))
    return float(np.sum(losses)) / len(ids)


Q = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
P = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [-0.6, 0.8]])
PROB = np.array([0.5, 0.25, 0.125, 0.125])


def _loss(ids, positive, prob=PROB, t=0.5) -> torch.Tensor:
    return in_batch_softmax_loss(
        torch.tensor(Q), torch.tensor(P), torch.tensor(ids), torch.tensor(positive), t,
        None if prob is None else torch.tensor(prob),
    )


def test_logq_correction_matches_hand_computation() -> None:
    ids, positive = [0, 1, 2, 3], [True] * 4
    corrected = _loss(ids, positive)
    assert corrected.item() == pytest.approx(_reference(Q, P, ids, PROB, positive, 0.5), rel=1e-9)
    plain = _loss(ids, positive, prob=None)
    assert plain.item() == pytest.approx(_reference(Q, P, ids, None, positive, 0.5), rel=1e-9)
    assert abs(corrected.item() - plain.item()) > 1e-3
    # A uniform q shifts every logit equally: the correction then changes nothing.
    uniform = _loss(ids, positive, prob=np.full(4, 0.25))
    assert uniform.item() == pytest.approx(plain.item(), rel=1e-9)


def test_logq_strength_scales_the_correction() -> None:
    """beta * log q: beta 1 is the full correction, 0 none, 0.5 the correction with q**0.5."""
    ids, positive = [0, 1, 2, 3], [True] * 4

    def loss(beta: float) -> float:
        return in_batch_softmax_loss(torch.tensor(Q), torch.tensor(P), torch.tensor(ids),
                                     torch.tensor(positive), 0.5, torch.tensor(PROB), beta).item()

    assert loss(1.0) == pytest.approx(_loss(ids, positive).item(), rel=1e-12)
    assert loss(0.0) == pytest.approx(_loss(ids, positive, prob=None).item(), rel=1e-12)
    assert loss(0.5) == pytest.approx(_reference(Q, P, ids, np.sqrt(PROB), positive, 0.5), rel=1e-9)


def test_retrieval_prior_puts_back_the_popularity_the_correction_left_out() -> None:
    """Training at logQ strength beta leaves (1 - beta) log q out of the dot; retrieval adds it."""
    assert small_config(logq_strength=0.0).retrieval_prior_weight == 1.0
    assert small_config(logq_strength=0.25).retrieval_prior_weight == 0.75
    assert small_config(logq_strength=1.0).retrieval_prior_weight == 0.0
    assert small_config(logq_strength=1.0, sampling_prob_key=None).retrieval_prior_weight == 1.0
    assert small_config(contrastive=False).retrieval_prior_weight == 0.0


def test_each_positive_weighs_the_same_in_any_batch() -> None:
    """The loss is summed over positives and divided by the rows: a batch with one positive
    (an ad batch) adds that pair's loss / B, not the weight of a whole batch of positives."""
    ids = [0, 1, 2, 3]
    one = _loss(ids, [True, False, False, False]).item()
    both = _loss(ids, [True, False, True, False]).item()
    third = _loss(ids, [False, False, True, False]).item()
    assert both == pytest.approx(one + third, rel=1e-9)


def test_same_pin_in_batch_negatives_are_masked() -> None:
    ids, positive = [7, 7, 3, 7], [True] * 4
    masked = _loss(ids, positive)
    assert masked.item() == pytest.approx(_reference(Q, P, ids, PROB, positive, 0.5), rel=1e-9)
    assert abs(masked.item() - _loss([0, 1, 2, 3], positive).item()) > 1e-3


def test_only_positive_rows_count() -> None:
    ids = [0, 1, 2, 3]
    positive = [True, False, True, False]
    assert _loss(ids, positive).item() == pytest.approx(
        _reference(Q, P, ids, PROB, positive, 0.5), rel=1e-9
    )
    q = torch.tensor(Q, requires_grad=True)
    nobody = torch.zeros(4, dtype=torch.bool)
    none = in_batch_softmax_loss(q, torch.tensor(P), torch.tensor(ids), nobody, 0.5)
    none.backward()
    assert none.item() == 0.0 and q.grad is not None and not q.grad.any()


# --- sharded -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_model_parallel_and_train_pipeline() -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        cfg = small_config(center_entities=True)  # the _Centre buffers under DMP and the pipeline
        model = DERM(cfg, table_device=torch.device("meta"))
        tables = []
        for m in model.modules():
            if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)):
                apply_optimizer_in_backward(RowWiseAdagrad, m.parameters(), {"lr": 0.1})
                tables += [n for n, _ in m.named_parameters()]
        # Tiny tables would be planned data-parallel; force table-wise to exercise the all-to-alls.
        constraints = {
            n.split(".")[-2]: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])
            for n in tables
        }
        sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints
        )
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(
            model, device=torch.device("cpu"), plan=plan, sharders=sharders
        )
        dense = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(dmp.named_parameters())),
            lambda params: torch.optim.Adam(params, lr=1e-2),
        )
        optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])

        def pin_table() -> torch.Tensor:
            weight = dmp.state_dict()["sequence_ec.embeddings.t_pin_id.weight"]
            return weight.local_shards()[0].tensor.clone()

        before = pin_table()
        batch = make_batch(cfg)
        loss, out = dmp(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
        assert not torch.equal(before, pin_table())  # the fused optimizer stepped in backward

        pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
        batches = iter([make_batch(cfg, seed=s) for s in range(3)])
        for _ in range(3):
            out = pipeline.progress(batches)
            assert all(torch.isfinite(v) for v in out["losses"].values())
        # Every embedding module had its input dist pipelined (forward is FX-traceable).
        assert len(pipeline._pipelined_modules) == 2
        pipeline.detach()
        users = dmp.module.embed_users(batch.sparse, batch.dense)
        torch.testing.assert_close(users.norm(dim=1), torch.ones(B))
    finally:
        dist.destroy_process_group()


def _padded_reference(encoder, events: torch.Tensor, lengths: torch.Tensor):
    """What `encoder` computes, the padded way: each row's latest max_len events right-padded
    to the longest, behind CLS, through PyTorch's own `nn.TransformerEncoder` (norm first,
    dropout 0) holding the same weights. Returns the states [B, n + 1, d] and the reference
    module (its parameters named as PyTorch names them)."""
    from torch import nn

    dim, heads = encoder.cls.size(1), encoder.layers[0].heads
    layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
    reference = nn.ModuleDict({"layers": nn.TransformerEncoder(layer, len(encoder.layers), enable_nested_tensor=False),
                               "norm": copy.deepcopy(encoder.norm)}).double()
    for ours, theirs in zip(encoder.layers, reference["layers"].layers):
        theirs.self_attn.in_proj_weight.data.copy_(ours.qkv.weight)
        theirs.self_attn.in_proj_bias.data.copy_(ours.qkv.bias)
        for a, b in (("out", "self_attn.out_proj"), ("ff1", "linear1"), ("ff2", "linear2"),
                     ("norm_attn", "norm1"), ("norm_ffn", "norm2")):
            theirs.get_submodule(b).load_state_dict(getattr(ours, a).state_dict())
    kept = lengths.clamp(max=encoder.max_len)
    n = int(kept.max())
    ends = torch.cumsum(lengths, 0)
    rows = []
    for b in range(len(lengths)):
        mine = events[ends[b] - kept[b]: ends[b]] + encoder.position(torch.arange(int(kept[b]) - 1, -1, -1))
        rows.append(torch.cat([encoder.cls, mine, events.new_zeros(n - int(kept[b]), dim)]))
    x = torch.stack(rows)
    padding = torch.arange(n + 1).unsqueeze(0) > kept.unsqueeze(1)
    causal = torch.ones(n + 1, n + 1, dtype=torch.bool).triu(1) if encoder.causal else None
    states = reference["norm"](reference["layers"](x, mask=causal, src_key_padding_mask=padding,
                                                    is_causal=encoder.causal))
    return states, reference


@pytest.mark.parametrize("causal", [True, False])
def test_packed_encoder_gives_the_padded_transformers_states_and_gradients(causal: bool) -> None:
    """The packed encoder (real tokens only, attention in length groups) against the padded
    batch through `nn.TransformerEncoder` with the same weights: the same states at every valid
    position and the same gradients for the events and every weight, in float64 (in float32 a
    few gradients, sums of many cancelling terms, differ in the third digit by rounding alone).
    A row longer than max_len keeps its latest events; an empty row is its CLS alone."""
    from derl.models.blocks import SequenceEncoder

    torch.manual_seed(0)
    encoder = SequenceEncoder(8, 6, 2, 2, 0.0, causal=causal, buckets=3).double()
    lengths = torch.tensor([0, 6, 2, 1, 9, 3, 6])
    events = torch.randn(int(lengths.sum()), 8, dtype=torch.float64, requires_grad=True)
    packed = encoder(events, lengths, every_state=True)
    summary = encoder(events, lengths)
    (packed.square().sum() + summary.sum()).backward()
    ours = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    events_grad, events.grad = events.grad.clone(), None
    encoder.zero_grad()

    padded, reference = _padded_reference(encoder, events, lengths)
    kept = lengths.clamp(max=6)
    valid = torch.arange(padded.size(1)).unsqueeze(0) <= kept.unsqueeze(1)
    last = padded[torch.arange(len(kept)), kept] if causal else padded[:, 0]
    (padded[valid].square().sum() + last.sum()).backward()
    torch.testing.assert_close(packed, padded[valid])
    torch.testing.assert_close(summary, last)
    torch.testing.assert_close(events_grad, events.grad)
    for name in ("cls", "position.weight"):  # the embeddings outside the layers
        torch.testing.assert_close(ours[name], encoder.get_parameter(name).grad, msg=name)
    for i, theirs in enumerate(reference["layers"].layers):
        for a, b in (("qkv.weight", "self_attn.in_proj_weight"), ("qkv.bias", "self_attn.in_proj_bias"),
                     ("out.weight", "self_attn.out_proj.weight"), ("ff1.weight", "linear1.weight"),
                     ("ff2.bias", "linear2.bias"), ("norm_attn.weight", "norm1.weight"),
                     ("norm_ffn.bias", "norm2.bias")):
            torch.testing.assert_close(ours[f"layers.{i}.{a}"], theirs.get_parameter(b).grad, msg=a)
    torch.testing.assert_close(ours["norm.weight"], reference["norm"].weight.grad)


def test_cpu_dropout_drops_p_and_keeps_the_mean() -> None:
    """The 16-bit keep mask: about p of the elements zeroed, independently in each of an int64
    draw's four lanes, the rest scaled so the expectation stays x; the gradient is the same mask."""
    from derl.models.blocks import dropout

    torch.manual_seed(0)
    x = torch.ones(4000, 250, requires_grad=True)
    y = dropout(x, 0.1)
    dropped = (y == 0).float()
    assert abs(dropped.mean().item() - 0.1) < 0.002
    lanes = dropped.flatten().view(-1, 4).mean(0)  # the four 16-bit lanes of each draw
    assert (lanes - 0.1).abs().max() < 0.004, lanes
    assert abs(y.mean().item() - 1.0) < 0.003
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())
    assert dropout(x, 0.0) is x


@pytest.mark.skipif(not __import__("derl.models.blocks", fromlist=["native_bf16"]).native_bf16(torch.device("cpu")),
                    reason="this CPU has no bf16 matmuls")
def test_bf16_encoder_stays_close_to_float32() -> None:
    """bf16 autocast changes the rounding of the projections and the feed-forward, not what the
    encoder computes: states within bf16's precision of the float32 ones, gradients pointing the
    same way, and a float64 encoder untouched by it."""
    from derl.models.blocks import SequenceEncoder

    torch.manual_seed(0)
    exact = SequenceEncoder(64, 32, 2, 2, 0.0, causal=True, buckets=3)
    fast = copy.deepcopy(exact)
    fast.bf16 = True
    lengths = torch.randint(0, 40, (64,))
    events = torch.randn(int(lengths.sum()), 64)
    a, b = exact(events, lengths, every_state=True), fast(events, lengths, every_state=True)
    assert not torch.equal(a, b)  # autocast did run
    torch.testing.assert_close(b, a, atol=0.05, rtol=0)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(exact.named_parameters(), fast.parameters()):
        cosine = F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)
    double = copy.deepcopy(fast).double()
    torch.testing.assert_close(double(events.double(), lengths), exact.double()(events.double(), lengths))


def test_length_groups_change_only_the_work() -> None:
    """One attention group (the batch padded to its longest) and one per row give the same states."""
    from derl.models.blocks import SequenceEncoder

    torch.manual_seed(0)
    one = SequenceEncoder(8, 6, 2, 2, 0.0, causal=True, buckets=1).double()
    many = copy.deepcopy(one)
    many.buckets = 7
    lengths = torch.tensor([0, 6, 2, 1, 9, 3, 6])
    events = torch.randn(int(lengths.sum()), 8, dtype=torch.float64)
    torch.testing.assert_close(one(events, lengths, every_state=True), many(events, lengths, every_state=True))
