"""The upstream entity model, DERM (docs/architecture.md, "Upstream"): user and pin towers whose L2-normalised
outputs share one space, an interaction tower with the per-task heads, and a contrastive term.

All embedding tables live in four TorchRec modules at the top of `DERM`, so that
`DistributedModelParallel` shards them and `TrainPipelineSparseDist` can pipeline their input
distribution: `forward` passes each of them `batch.sparse` untouched, and is FX-traceable (the
towers and the loss are plain dense modules, which the pipeline's tracer treats as leaves).

Sharded modules fix the order of the KJT's keys on their first batch, so every batch a DERM
sees (training or export) must carry the same keys in the same order: at least
`UpstreamConfig.sparse_features`; a feature an example lacks is an empty list, never a missing key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from derl.datapipes.batch import (
    CONTEXT_FEATURES,
    NEGATIVE_FEATURES,
    PIN_FEATURES,
    ROW_CONTEXT,
    SEQUENCE_FEATURES,
    USER_FEATURES,
    Batch,
)
from derl.datapipes.domains import DOMAINS, NEGATIVE_LABELS
from derl.datapipes.schema import CONTENT_DIM
from derl.models.blocks import SequenceEncoder, Tower
from derl.models.fields import check, flag_name, setting
from derl.models.losses import (
    in_batch_softmax_loss,
    multi_task_bce,
    pairwise_logistic_loss,
    sampled_softmax_loss,
)

# Each feature that reads a candidate Pin feature's table: an event's Pin, a catalogue negative
# and the candidate Pin start from the same vectors, and the Pin tower can embed any of them.
SHARED_TABLES = {"seq_pin_id": "pin_id", "seq_category": "category", "seq_advertiser_id": "advertiser_id",
                 "neg_pin_id": "pin_id", "neg_category": "category", "neg_advertiser_id": "advertiser_id"}


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    """What shapes a DERM and may be tuned: each field is a `derl train-upstream` flag of its own
    name (`TrainUpstreamConfig` inherits these), checked here, once. `UpstreamConfig` adds what
    the data fixes."""

    embedding_dim: int = setting(64, "width of every table and of the entity vectors")
    seq_len: int = setting(32, "events of history the model reads before a day (a training window holds "
                                "up to as many of the day's own after them)")
    seq_layers: int = setting(2, "transformer layers over the user sequence")
    seq_heads: int = setting(4, "attention heads of the sequence transformer (--embedding-dim must be a multiple)")
    seq_dropout: float = setting(0.1, "dropout in the sequence transformer")
    tower_dims: Tuple[int, ...] = setting((256, 128), "hidden widths of the user and Pin towers")
    interaction_dims: Tuple[int, ...] = setting((256, 128), "hidden widths of the interaction tower")
    # Without user_id the user vector is what the profile and the history say, not a free vector
    # per user that learns each user's past Pins by heart (docs/seqrec.md, "derl").
    user_features: Tuple[str, ...] = setting(USER_FEATURES, "comma-separated profile features the user tower "
                                                            "reads, of user_id, country, age_bucket, gender")
    contrastive: bool = setting(True, "drop the in-batch contrastive term: BCE heads only (ablation)")
    # How much of the logQ correction to apply (see `in_batch_softmax_loss`). 0 by default: the
    # dot then estimates log P(pin | user) / q, affinity without popularity, which is what the
    # rankers downstream need; retrieval adds log q back (`retrieval_prior_weight`).
    logq_strength: float = setting(0.0, "share of the logQ correction in training: 0 leaves popularity out "
                                        "of the dot (retrieval adds it back), 1 puts it in")
    # Centre each tower's output over the batch (BatchNorm without affine) before the L2
    # normalisation; see `_Unit`. Without it the dot hardly ranks impressions by what came of them.
    center_entities: bool = setting(True, "do not centre the tower outputs over the batch before "
                                          "normalising (ablation)")
    # The term is averaged over all rows (docs/experiments.md, "The upstream's defaults", for
    # how 3 was chosen).
    contrastive_weight: float = setting(3.0, "weight of the contrastive term")
    # A row is a contrastive positive if any of these labels is > 0 and no NEGATIVE_LABELS is;
    # unset: every task but the NEGATIVE_LABELS (`UpstreamConfig` fills it in).
    contrastive_positives: Optional[Tuple[str, ...]] = setting(
        None, "comma-separated labels whose rows are positives (default: every task but hide)")
    # 0.1: better than 0.05 on both yardsticks (the seqrec suite and the demo world's recall and
    # ranker gains; docs/seqrec.md, "derl"), worse at 0.2.
    temperature: float = setting(0.1, "softmax temperature of the dot")
    # The next-Pin term is PinnerFormer's dense all-action objective, SASRec's next item: the
    # state after each event of a window against the Pin tower's vector of the event that
    # followed, under a sampled softmax over the batch's other next Pins and Pins drawn from
    # the whole catalogue, logQ-corrected (datapipes/windows.py).
    next_pin_weight: float = setting(1.0, "weight of the next-Pin term over every engagement of the "
                                          "training days (0: off)")
    # PinnerFormer's user tower reads PinSage vectors; here the mean of the history's Pin-tower
    # vectors sits beside the encoder's state (docs/experiments.md, "2026-12-07: the user tower").
    history_mean: bool = setting(True, "the user tower reads the encoder's state only, not beside it the mean "
                                       "of its history's Pin-tower vectors (ablation)")
    catalogue_negatives: int = setting(256, "Pins drawn uniformly from the catalogue each batch, negatives "
                                            "of every next-Pin target beside the batch's other targets")
    # The contrastive and next-Pin terms teach the dot which Pins a user engages with among all
    # Pins, exposure included; the dot-rank term (per task, a pairwise logistic loss of
    # scale_task x user·pin; docs/experiments.md, "2026-12-06") which of the Pins they were
    # shown they engage with, which is what a ranker reads it for.
    dot_rank_weight: float = setting(0.0, "weight of a pairwise (AUC) loss on the user·Pin dot over the "
                                          "batch's labelled rows, per task (0: off)")
    # Each group padded to its own longest (`SequenceEncoder`): the same result for less work on padding.
    length_buckets: int = setting(4, "groups of similar sequence length the transformer runs a batch in")
    # The sequence transformer's matmuls in bf16 where the hardware has them (`SequenceEncoder`):
    # faster training at d 64 on a CPU with bf16 matmuls, quality within seed noise; slower at
    # d 32, where the demo preset turns it off (docs/experiments.md, "2026-12-04" and
    # "2026-12-05").
    seq_bf16: bool = setting(True, "keep the sequence transformer's matmuls in float32 where the "
                                   "hardware multiplies bf16")

    def __post_init__(self) -> None:
        check(self, positive=("embedding_dim", "seq_len", "seq_layers", "seq_heads", "temperature",
                              "length_buckets"),
              non_negative=("contrastive_weight", "next_pin_weight", "dot_rank_weight", "catalogue_negatives"),
              below_one=("seq_dropout",), fraction=("logq_strength",),
              widths=("tower_dims", "interaction_dims"))
        if not self.user_features or set(self.user_features) - set(USER_FEATURES):
            raise ValueError(f"{flag_name(type(self), 'user_features')} must name some of "
                             f"{','.join(USER_FEATURES)}, got {','.join(self.user_features)!r}")
        if self.embedding_dim % self.seq_heads:
            raise ValueError(f"{flag_name(type(self), 'embedding_dim')} must be a multiple of "
                             f"{flag_name(type(self), 'seq_heads')} {self.seq_heads}, got {self.embedding_dim}")


@dataclass(frozen=True)
class UpstreamConfig(UpstreamSettings):
    """Everything that shapes a DERM: its settings, and what the data fixes. `num_embeddings`
    maps each sparse feature it reads (`sparse_features`, minus seq_pin_id which shares pin_id's
    table) to its vocabulary size; extra keys are ignored, so `datapipes` vocabularies can be
    passed as they are."""

    num_embeddings: Mapping[str, int]
    content_dim: int = CONTENT_DIM
    # Of ROW_CONTEXT, what the interaction tower reads ("position": none on organic rows).
    context_features: Tuple[str, ...] = CONTEXT_FEATURES
    tasks: Tuple[str, ...] = DOMAINS["engagement"].tasks
    task_weights: Mapping[str, float] = field(default_factory=dict)  # missing tasks weigh 1
    learn_temperature: bool = False
    # batch.dense key of each row's pin sampling probability (logQ correction); None: no correction.
    sampling_prob_key: Optional[str] = "pin_sampling_prob"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.contrastive_positives:  # unset (or empty): the tasks' own
            positives = tuple(t for t in self.tasks if t not in NEGATIVE_LABELS)
            object.__setattr__(self, "contrastive_positives", positives)  # frozen: set once, here
        missing = [f for f in self.sparse_features + self.context_features
                   if f not in SHARED_TABLES and f not in self.num_embeddings]
        if missing:
            raise ValueError(f"num_embeddings lacks {missing}")
        unknown = set(self.task_weights) - set(self.tasks)
        if unknown:
            raise ValueError(f"task_weights names tasks not in {self.tasks}: {sorted(unknown)}")

    @property
    def retrieval_prior_weight(self) -> float:
        """Weight of log q_p (the Pin's share of training rows) in a retrieval score
        v·p / temperature + weight · log q_p. The in-batch softmax trains logit − β log q
        (β = `logq_strength`) towards log P(p | user) − log q; so the dot holds log P(p | user)
        − (1 − β) log q_p, and adding (1 − β) log q_p back ranks by P(p | user). No logQ
        correction at all is β = 0; without the contrastive term the dot is no such estimate."""
        if not self.contrastive:
            return 0.0
        return 1.0 if self.sampling_prob_key is None else 1.0 - self.logq_strength

    @property
    def sparse_features(self) -> Tuple[str, ...]:
        """The KJT keys a DERM reads."""
        return self.user_features + PIN_FEATURES + SEQUENCE_FEATURES + NEGATIVE_FEATURES

    @classmethod
    def for_domain(
        cls, domain: str, num_embeddings: Mapping[str, int], **overrides: Any
    ) -> "UpstreamConfig":
        """The config of one upstream domain: its tasks (and so its contrastive positives)."""
        return cls(**{"tasks": DOMAINS[domain].tasks, **overrides}, num_embeddings=num_embeddings)


def _bag_tables(cfg: UpstreamConfig, features: Sequence[str]) -> List[EmbeddingBagConfig]:
    """One sum-pooled table per feature: an empty feature (advertiser_id of an organic pin)
    pools to a zero vector."""
    return [
        EmbeddingBagConfig(
            name=f"t_{f}",
            embedding_dim=cfg.embedding_dim,
            num_embeddings=cfg.num_embeddings[f],
            feature_names=[f],
            pooling=PoolingType.SUM,
        )
        for f in features
    ]


def _sequence_tables(cfg: UpstreamConfig) -> List[EmbeddingConfig]:
    """Unpooled tables for the sequence. The Pin tables also serve the candidate Pin's features
    (`SHARED_TABLES`), so a Pin in a user's history and the same Pin as a candidate start from
    the same vectors; this is why the Pin's features sit in the EmbeddingCollection and not in
    an EmbeddingBagCollection (TorchRec cannot share a table between the two module kinds)."""

    def table(feature: str, features: List[str]) -> EmbeddingConfig:
        return EmbeddingConfig(name=f"t_{feature}", embedding_dim=cfg.embedding_dim,
                               num_embeddings=cfg.num_embeddings[feature], feature_names=features)

    shared = [table(f, [f] + [g for g, of in SHARED_TABLES.items() if of == f]) for f in PIN_FEATURES]
    return shared + [table("seq_action", ["seq_action"]), table("seq_gap", ["seq_gap"])]


def _pooled(embeddings: KeyedTensor, features: Sequence[str]) -> torch.Tensor:
    """[B, len(features) * d] in the given feature order. A sharded EBC's output keys follow the
    sharding plan, not the config, so never rely on `KeyedTensor.values()`'s order."""
    return torch.cat([embeddings[f] for f in features], dim=1)


class _Centre(nn.Module):
    """Batch normalisation without affine parameters whose running statistics stay the same on
    every rank: each training step averages the ranks' batch statistics into them (DMP's data
    parallel wrapper does not broadcast buffers, and evaluation and export use these)."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor, reference: Optional[int] = None) -> torch.Tensor:
        """reference: the batch statistics from the first `reference` rows only (all by
        default), so that rows of another kind are centred as those are."""
        ref = x if reference is None else x[:reference]
        if self.training and ref.size(0) > 1:
            mean, var = ref.mean(dim=0), ref.var(dim=0, unbiased=False)
            with torch.no_grad():
                stats = torch.cat([mean, ref.var(dim=0)]).detach()
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(stats)
                    stats /= dist.get_world_size()
                self.running_mean.lerp_(stats[: x.size(1)], self.momentum)
                self.running_var.lerp_(stats[x.size(1):], self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps)


class _Unit(nn.Module):
    """Tower output -> unit vector, optionally centred first.

    ReLU and LayerNorm layers give every entity's tower output a large shared component: at
    initialisation the unit vectors of all Pins (and of all users) lie in a narrow cone (the
    mean unit vector has a large norm, where random directions would give nearly 0; the
    figures: docs/experiments.md, "The upstream's defaults"). There
    the in-batch softmax settles on the popularity solution (every user nearly the same vector,
    Pins spread along it by popularity), and affinity, a product of two small deviations from
    the cone, hardly moves. Centring and scaling each dimension over the batch (`_Centre`,
    running statistics at evaluation and export) removes the shared component, so the vectors
    start spread over the sphere.
    """

    def __init__(self, dim: int, center: bool) -> None:
        super().__init__()
        self.center = _Centre(dim) if center else nn.Identity()

    def forward(self, x: torch.Tensor, reference: Optional[int] = None) -> torch.Tensor:
        centred = self.center(x, reference) if isinstance(self.center, _Centre) else x
        return F.normalize(centred, dim=-1)


@dataclass
class PinFeatures:
    """The Pin tower's inputs for N Pins: id, category and advertiser embeddings [N, d] (zero
    where a Pin has no advertiser) and content [N, content_dim]."""

    pin: torch.Tensor
    category: torch.Tensor
    advertiser: torch.Tensor
    content: torch.Tensor

    def __getitem__(self, rows: torch.Tensor) -> "PinFeatures":
        return PinFeatures(self.pin[rows], self.category[rows], self.advertiser[rows], self.content[rows])

    def __len__(self) -> int:
        return len(self.pin)

    @staticmethod
    def cat(parts: Sequence["PinFeatures"]) -> "PinFeatures":
        return PinFeatures(*(torch.cat([getattr(p, f) for p in parts])
                             for f in ("pin", "category", "advertiser", "content")))

    @staticmethod
    def of(ids: Dict[str, JaggedTensor], prefix: str, content: torch.Tensor, is_ad: torch.Tensor) -> "PinFeatures":
        """Pins whose id and category embeddings are the values of `<prefix>pin_id` and
        `<prefix>category` (one each per Pin) and whose advertiser embeddings, the values of
        `<prefix>advertiser_id`, belong to the Pins where `is_ad` [N] holds."""
        pin = ids[prefix + "pin_id"].values()
        advertiser = pin.new_zeros(pin.shape).index_put((is_ad,), ids[prefix + "advertiser_id"].values())
        return PinFeatures(pin, ids[prefix + "category"].values(), advertiser, content)


@dataclass
class Windows:
    """A batch's user windows through the encoder: `states` [T, d], the packed states (per
    window its CLS output, then one after each event: `SequenceEncoder.layout`), `starts` [W]
    each window's CLS slot, `lengths` [W] its events, `context` [W] how many of them are
    context (the day-start state is the one after them)."""

    states: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    context: torch.Tensor
    first: torch.Tensor  # [W] the flat index of each window's first kept event

    def day_start_slots(self) -> torch.Tensor:
        return self.starts + self.context

    def means(self, vectors: torch.Tensor, window: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """[N, d] the mean of `vectors` [E, d] (one per flat event) over the first `seen` [N] kept
        events of each `window` [N] (0 where none)."""
        total = torch.cat([vectors.new_zeros(1, vectors.size(1), dtype=torch.float64),
                           vectors.double().cumsum(0)])
        start = self.first[window]
        return ((total[start + seen] - total[start]) / seen.clamp(min=1).unsqueeze(1)).to(vectors.dtype)

    def transitions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the slot of every state that has a next event after the context, [P]; that event's
        flat index, [P]; its window, [P]): each window's events past its context are its next-Pin
        targets, each predicted by the state after the events before it."""
        targets = self.lengths - self.context
        window = torch.repeat_interleave(torch.arange(len(targets), device=targets.device), targets)
        step = torch.arange(len(window), device=window.device) - (torch.cumsum(targets, 0) - targets)[window]
        step = step + self.context[window]  # events before the target
        return (self.starts[window] + step).long(), (self.first[window] + step).long(), window


class UserTower(nn.Module):
    """Profile embeddings + the sequence encoder's state -> DHEN tower -> unit vector.

    Each event is the sum of its Pin's id, category and advertiser embeddings, its projected
    content embedding (as PinnerFormer feeds PinSage vectors: a Pin seen a few times has a weak
    id embedding but informative content), its action and its time from the window's day start.
    The encoder is causal: the state after each event of a window is a user state (after the
    context: the user at the day's start; after each later event: the query for the next)."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.content = nn.Linear(cfg.content_dim, d)
        self.sequence = SequenceEncoder(
            d, cfg.seq_len, cfg.seq_layers, cfg.seq_heads, cfg.seq_dropout, causal=True,
            buckets=cfg.length_buckets, bf16=cfg.seq_bf16)
        self.mlp = Tower((len(cfg.user_features) + 1 + cfg.history_mean) * d, cfg.tower_dims, d)
        self.unit = _Unit(d, cfg.center_entities)

    def windows(self, events: PinFeatures, actions: JaggedTensor, gaps: JaggedTensor,
                context: Optional[torch.Tensor]) -> Windows:
        """events: every window's Pins, flat in event order; actions/gaps: the events' action
        and gap embeddings, jagged per window; context [W] (None: every event is context)."""
        lengths = actions.lengths()
        flat = (events.pin + events.category + events.advertiser + self.content(events.content)
                + actions.values() + gaps.values())
        states = self.sequence(flat, lengths, every_state=True, context=context)
        packed = self.sequence.layout(lengths, context)
        first = torch.cumsum(lengths, 0) - packed.kept
        return Windows(states, packed.starts, packed.kept, packed.kept if context is None else context, first)

    def forward(self, profile: torch.Tensor, states: torch.Tensor, reference: Optional[int] = None) -> torch.Tensor:
        """profile [N, len(user_features) * d] and states [N, d] (with `history_mean`, [N, 2d]:
        the encoder's state, then the history's mean Pin) -> [N, d] unit vectors."""
        return self.unit(self.mlp(torch.cat([profile, states], dim=1)), reference)


class PinTower(nn.Module):
    """pin_id, category, advertiser embeddings + projected content -> DHEN tower -> unit vector."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.content = nn.Sequential(nn.Linear(cfg.content_dim, d), nn.ReLU())
        self.mlp = Tower((len(PIN_FEATURES) + 1) * d, cfg.tower_dims, d)
        self.unit = _Unit(d, cfg.center_entities)

    def forward(self, pins: PinFeatures) -> torch.Tensor:
        x = torch.cat([pins.pin, pins.category, pins.advertiser, self.content(pins.content)], dim=1)
        return self.unit(self.mlp(x))


@dataclass
class NextPins:
    """What the next-Pin term needs of a batch: the `states` [P, d] that have a next event, and
    for each its `targets` [P] column among `items` [C, d] (the Pin tower's vectors of the
    batch's distinct next Pins, then the catalogue negatives), with the columns' Pin ids
    `item_ids` [C] and `log_q` [C] (log of each one's expected count among the columns)."""

    states: torch.Tensor
    targets: torch.Tensor
    items: torch.Tensor
    item_ids: torch.Tensor
    log_q: torch.Tensor


@dataclass
class TowerOutputs:
    """What the towers make of a batch: `users` [W, d], each window's user at its day's start;
    with candidates, `pins` [R, d] their vectors, `row_window` [R] each one's window and
    `row_users` [R, d] its window's user; `next_pins` in training."""

    users: Optional[torch.Tensor]
    pins: Optional[torch.Tensor] = None
    row_window: Optional[torch.Tensor] = None
    row_users: Optional[torch.Tensor] = None
    next_pins: Optional[NextPins] = None


class EntityTowers(nn.Module):
    """The user and Pin towers, with what both read of a batch's Pins: a candidate's features,
    every event's and every catalogue negative's, from the same tables. One module, so that the
    train pipeline's tracer (which treats DERM's children as leaves) never sees the next-Pin
    term's data-dependent choices: which Pins are distinct."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        super().__init__()
        self.user = UserTower(cfg)
        self.pin = PinTower(cfg)
        self.next_pin = cfg.next_pin_weight > 0
        self.history_mean = cfg.history_mean

    def forward(self, ids: Dict[str, JaggedTensor], profile: Optional[torch.Tensor],
                dense: Dict[str, torch.Tensor], candidates: bool,
                event_pin_ids: Optional[torch.Tensor] = None,
                negative_pin_ids: Optional[torch.Tensor] = None) -> TowerOutputs:
        """Tensors, not the batch, come in: every caller goes through here, and DERM's own
        methods are traced by the train pipeline, its children are not. `dense` holds the
        events' `seq_content` and `seq_is_ad` (with `profile`), the candidates' `content_emb`
        (and `pin_is_ad` where a window holds several), and for training the windows'
        `context_len`, the negatives' `neg_content`, `neg_is_ad` and the `*_log_q`; the
        next-Pin term's inputs are made in training mode, from batches that have them, with the
        events' and the negatives' Pin ids."""
        pins = row_window = None
        if candidates:
            lengths = ids["pin_id"].lengths()
            is_ad = dense["pin_is_ad"] if "pin_is_ad" in dense else ids["advertiser_id"].lengths() > 0
            pins = PinFeatures.of(ids, "", dense["content_emb"], is_ad)
            row_window = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        if profile is None:
            return TowerOutputs(None, None if pins is None else self.pin(pins), row_window)
        events = PinFeatures.of(ids, "seq_", dense["seq_content"], dense["seq_is_ad"])
        windows = self.user.windows(events, ids["seq_action"], ids["seq_gap"], dense.get("context_len"))
        day_start = windows.day_start_slots()
        with_next = self.training and self.next_pin and event_pin_ids is not None and "neg_log_q" in dense
        if with_next:
            slots, targets, window = windows.transitions()
            with_next = len(targets) > 0
        window_of = torch.arange(len(day_start), device=day_start.device)
        history = self.pin(events) if self.history_mean else None

        def user_states(slots: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
            if history is None:
                return windows.states[slots]
            return torch.cat([windows.states[slots], windows.means(history, window, slots - windows.starts[window])],
                             dim=1)

        if not with_next:
            users = self.user(profile, user_states(day_start, window_of))
            return TowerOutputs(users, None if pins is None else self.pin(pins), row_window,
                                None if pins is None else users[row_window])
        # Centred with the day-start states' statistics: the ones export computes.
        vectors = self.user(torch.cat([profile, profile[window]]),
                            user_states(torch.cat([day_start, slots]), torch.cat([window_of, window])),
                            reference=len(day_start))
        users, states = vectors[: len(day_start)], vectors[len(day_start):]
        distinct, column = torch.unique(event_pin_ids[targets], return_inverse=True)
        # One event of each distinct next Pin stands for it: its features are the Pin's.
        first = torch.full_like(distinct, len(event_pin_ids)).scatter_reduce(0, column, targets, "amin")
        negatives = PinFeatures.of(ids, "neg_", dense["neg_content"], dense["neg_is_ad"])
        n_pins = 0 if pins is None else len(pins)
        vectors = self.pin(PinFeatures.cat(([] if pins is None else [pins]) + [events[first], negatives]))
        next_pins = NextPins(states, column, vectors[n_pins:], torch.cat([distinct, negative_pin_ids]),
                             torch.cat([dense["seq_log_q"][first], dense["neg_log_q"]]))
        return TowerOutputs(users, None if pins is None else vectors[:n_pins], row_window,
                            None if pins is None else users[row_window], next_pins)


class InteractionTower(nn.Module):
    """The only place context (surface, hour, ad position) meets the entities: it sees both
    tower outputs, their elementwise product and dot product, and the context embeddings, and
    emits one logit per task. Its gradients flow back into the towers on purpose: the entity
    vectors must be useful to the heads. The context tables are a few dozen rows each, plain
    dense embeddings (a last row for "none": an organic row's ad position)."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.tasks = cfg.tasks
        self.columns = [ROW_CONTEXT.index(f) for f in cfg.context_features]
        self.context = nn.ModuleList(nn.Embedding(cfg.num_embeddings[f] + 1, d) for f in cfg.context_features)
        in_dim = (3 + len(cfg.context_features)) * d + 1
        self.mlp = Tower(in_dim, cfg.interaction_dims, len(cfg.tasks))

    def forward(self, user: torch.Tensor, pin: torch.Tensor, row_context: torch.Tensor) -> Dict[str, torch.Tensor]:
        """row_context [R, len(ROW_CONTEXT)], -1 where a row has none."""
        context = [table(torch.where(row_context[:, c] < 0, table.num_embeddings - 1, row_context[:, c]))
                   for c, table in zip(self.columns, self.context)]
        cross = user * pin
        x = torch.cat([user, pin, cross, cross.sum(dim=1, keepdim=True), *context], dim=1)
        logits = self.mlp(x)
        return {task: logits[:, i] for i, task in enumerate(self.tasks)}


class UpstreamLoss(nn.Module):
    """Weighted BCE over the tasks labelled in the batch + the weighted contrastive, next-Pin and
    (optional) dot-rank terms.

    The temperature is fixed by default: a learned one is driven down by the contrastive term
    alone and changes the scale of the space between retrains, which the snapshot smoothing
    (aligning E(t-1) to a retrained model) would then have to undo. `learn_temperature`
    makes it a parameter (log-parametrised, kept >= 0.01 as in CLIP).
    """

    def __init__(self, cfg: UpstreamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        log_t = torch.tensor(math.log(cfg.temperature))
        if cfg.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        # Per task, the dot's scale in the dot-rank term (learned; hide's may turn negative).
        self.dot_scale = nn.Parameter(torch.ones(len(cfg.tasks))) if cfg.dot_rank_weight > 0 else None

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=0.01)

    def positive_rows(self, labels: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Rows whose pin the user engaged with (any positive label > 0) and did not hide."""
        positive = torch.zeros(len(like), dtype=torch.bool, device=like.device)
        for name in self.cfg.contrastive_positives:
            if name in labels:
                positive |= labels[name] > 0
        for name in NEGATIVE_LABELS:
            if name in labels:
                positive &= ~(labels[name] > 0)
        return positive

    def forward(
        self,
        logits: Dict[str, torch.Tensor],
        user: torch.Tensor,
        pin: torch.Tensor,
        pin_ids: torch.Tensor,
        row_window: torch.Tensor,
        labels: Dict[str, torch.Tensor],
        dense: Dict[str, torch.Tensor],
        next_pins: Optional[NextPins] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        cfg = self.cfg
        parts = multi_task_bce(logits, labels, cfg.task_weights)
        if next_pins is not None:
            n = next_pins
            parts["next_pin"] = cfg.next_pin_weight * sampled_softmax_loss(
                n.states, n.targets, n.items, n.item_ids, n.log_q, self.temperature(), cfg.logq_strength)
        if self.dot_scale is not None:
            dot = (user * pin).sum(dim=1)
            ranked = []
            for i, t in enumerate(cfg.tasks):
                if t in labels:
                    known = ~torch.isnan(labels[t])
                    ranked.append(pairwise_logistic_loss(self.dot_scale[i] * dot[known], labels[t][known]))
            if ranked:
                parts["dot_rank"] = cfg.dot_rank_weight * torch.stack(ranked).mean()
        if cfg.contrastive and len(pin_ids):
            key = cfg.sampling_prob_key
            if key is not None and key not in dense:
                raise KeyError(f"logQ correction needs batch.dense[{key!r}], the pin sampling prob")
            parts["contrastive"] = cfg.contrastive_weight * in_batch_softmax_loss(
                user,
                pin,
                pin_ids,
                self.positive_rows(labels, pin_ids),
                self.temperature(),
                dense[key] if key is not None else None,
                cfg.logq_strength,
                groups=row_window,
            )
        if not parts:
            raise ValueError(f"batch has none of the labels {cfg.tasks}, contrastive is off")
        if not len(pin_ids):
            # A batch of windows without rows (days before the rows: next-Pin targets only): the
            # heads still take part, at zero weight, since data parallel training with a static
            # graph needs every parameter in every step.
            parts["no_rows"] = 0.0 * sum(logit.sum() for logit in logits.values())
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}


class DERM(nn.Module):
    """Decoupled entity representation model: `forward(batch) -> (loss, outputs)` for training
    on user windows (datapipes/windows.py; TorchRec's train pipelines expect exactly that),
    `embed_users` / `embed_pins` / `embed_both` for export, evaluation and the coupled ranker.

    outputs: "logits" (task -> [R]), "user_emb" and "pin_emb" ([R, d], unit norm: each row's
    user at its day's start and its Pin), "losses" (detached per-part losses, for logging),
    "next_pins" (the next-Pin term's inputs, or None).
    `table_device="meta"` defers allocating the tables to `DistributedModelParallel`, which
    builds only this rank's shards.
    """

    def __init__(self, cfg: UpstreamConfig, table_device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_ebc = EmbeddingBagCollection(_bag_tables(cfg, cfg.user_features), device=table_device)
        self.sequence_ec = EmbeddingCollection(_sequence_tables(cfg), device=table_device)
        self.towers = EntityTowers(cfg)
        self.interaction = InteractionTower(cfg)
        self.loss = UpstreamLoss(cfg)

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Dict[str, Any]]:
        ids = self.sequence_ec(batch.sparse)
        sparse = batch.sparse
        towers = self.towers(ids, self._profile(sparse), batch.dense, True, sparse["seq_pin_id"].values(),
                             sparse["neg_pin_id"].values())
        # Attributes, not unpacked: under the train pipeline's tracer the towers' output is a proxy.
        user, pin = towers.row_users, towers.pins
        logits = self.interaction(user, pin, batch.dense["row_context"])
        loss, losses = self.loss(logits, user, pin, batch.sparse["pin_id"].values(), towers.row_window,
                                 batch.labels, batch.dense, towers.next_pins)
        return loss, {"logits": logits, "user_emb": user, "pin_emb": pin, "losses": losses,
                      "next_pins": towers.next_pins}

    def _profile(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """[W, len(user_features) * d] the user's pooled profile embeddings."""
        return _pooled(self.user_ebc(sparse), self.cfg.user_features)

    def embed_users(self, sparse: KeyedJaggedTensor, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, d] unit user vectors, without labels, each after all of its sequence (dense: the
        events' `seq_content` and `seq_is_ad`). `sparse` still carries every key of
        `cfg.sparse_features`; Pin features may be empty lists."""
        return self.towers(self.sequence_ec(sparse), self._profile(sparse), dense, False).users

    def embed_both(self, sparse: KeyedJaggedTensor,
                   dense: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """([B, d] user, [B, d] pin) unit vectors of each row, without labels, reading each
        table once: under TorchRec's train pipeline an embedding module may be called only once
        per forward (the coupled ranker runs the towers this way)."""
        towers = self.towers(self.sequence_ec(sparse), self._profile(sparse), dense, True)
        return towers.row_users, towers.pins

    def embed_pins(self, sparse: KeyedJaggedTensor, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, d] unit pin vectors, without labels (dense: `content_emb`). `sparse` still
        carries every key of `cfg.sparse_features`; user and sequence features may be empty."""
        return self.towers(self.sequence_ec(sparse), None, dense, True).pins
