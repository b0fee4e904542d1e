"""The training batch every derl model consumes, and the feature names it carries.

A batch holds sparse features as one `KeyedJaggedTensor` (ids, the user sequence as jagged
features), dense features and labels as named tensors, and `meta` (timestamps, request ids) that
evaluation and point-in-time joins need but models do not. It implements TorchRec's
`Pipelineable` so that `TrainPipelineSparseDist` and friends can move and overlap it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from derl.datapipes import schema as S

# Sparse features, one id per example unless noted.
USER_FEATURES = ("user_id", "country", "age_bucket", "gender")
PIN_FEATURES = ("pin_id", "category", "advertiser_id")  # advertiser_id: empty for organic Pins
# Jagged: the last L engagements, each with its Pin's attributes (read from the same tables as the
# candidate Pin's), so that the Pin tower can embed every event: the next-Pin objective's targets.
# seq_advertiser_id holds the ad events' advertisers only; dense `seq_is_ad` says which events.
SEQUENCE_FEATURES = ("seq_pin_id", "seq_category", "seq_advertiser_id", "seq_action", "seq_gap")
CONTEXT_FEATURES = ("surface", "hour")
AD_FEATURES = ("campaign_id", "position")  # empty for organic rows (campaign: unless an ad)
# The upstream's catalogue negatives (datapipes/windows.py), from the candidate Pin's tables;
# empty in every other batch.
NEGATIVE_FEATURES = ("neg_pin_id", "neg_category", "neg_advertiser_id")
# Every batch carries all of these, in this order: sharded TorchRec modules fix the key order on
# their first batch, so organic and ad batches must share one layout.
ALL_SPARSE_FEATURES = (USER_FEATURES + PIN_FEATURES + SEQUENCE_FEATURES + CONTEXT_FEATURES + AD_FEATURES
                       + NEGATIVE_FEATURES)
# The columns of the upstream's dense `row_context` (datapipes/windows.py): what the interaction
# tower knows of a row beyond its user and Pin.
ROW_CONTEXT = ("surface", "hour", "position")

# Time since a sequence engagement, in log2(hours + 1) buckets.
NUM_GAP_BUCKETS = 16
# An event's time from its window's day start: NUM_GAP_BUCKETS buckets before the start, as many after.
NUM_EVENT_TIMES = 2 * NUM_GAP_BUCKETS
# Ad slot positions above this share one bucket.
NUM_POSITIONS = 32


def feature_vocab(id_sizes: Dict[str, int]) -> Dict[str, int]:
    """num_embeddings per sparse feature, from the sizes of the id columns (largest id + 1 of
    user_id, country, age_bucket, gender, pin_id, category, advertiser_id, campaign_id): the
    sequence features share their Pin column's size, the enums have fixed ones."""
    return {
        **id_sizes,
        "seq_pin_id": id_sizes["pin_id"],
        "seq_category": id_sizes["category"],
        "seq_advertiser_id": id_sizes["advertiser_id"],
        "neg_pin_id": id_sizes["pin_id"],
        "neg_category": id_sizes["category"],
        "neg_advertiser_id": id_sizes["advertiser_id"],
        "seq_action": S.NUM_ACTIONS,
        "seq_gap": NUM_EVENT_TIMES,
        "surface": S.NUM_SURFACES,
        "hour": S.NUM_HOURS,
        "position": NUM_POSITIONS,
    }

# Dense features: the Pin's content embedding [B, CONTENT_DIM]; the content of the sequence's Pins
# [events, CONTENT_DIM], one row per `seq_pin_id` value (jagged like it); `seq_is_ad` [events]
# bool, which events' Pins carry an advertiser (in `seq_advertiser_id`, in event order); and
# `pin_sampling_prob`, the probability that a row of the reader's table shows this Pin [B] (the
# logQ correction's q).

# Labels by example table.
ENGAGEMENT_LABELS = ("closeup", "click", "save", "long_click", "hide")
AD_LABELS = ("clicked", "converted")


@dataclass
class Batch(Pipelineable):
    sparse: KeyedJaggedTensor
    dense: Dict[str, torch.Tensor]
    labels: Dict[str, torch.Tensor]
    meta: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.sparse.stride())

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        def move(d: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {k: v.to(device=device, non_blocking=non_blocking) for k, v in d.items()}

        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            dense=move(self.dense),
            labels=move(self.labels),
            meta=move(self.meta),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        for d in (self.dense, self.labels, self.meta):
            for v in d.values():
                v.record_stream(stream)

    def pin_memory(self) -> "Batch":
        def pin(d: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {k: v.pin_memory() for k, v in d.items()}

        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=pin(self.dense),
            labels=pin(self.labels),
            meta=pin(self.meta),
        )
