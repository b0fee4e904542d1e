"""Dense building blocks shared by derl models: DHEN-style towers and a sequence encoder.

None of these hold embedding tables, so under `DistributedModelParallel` they stay plain dense
modules (DDP-replicated) and TorchRec's train pipelines treat them as FX leaves.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MaskBlock(nn.Module):
    """MaskNet block (Wang et al. 2021): an instance-guided mask gates the layer-normalised input.

    The mask is computed from the input itself, which gives the multiplicative feature
    interactions a plain MLP only approximates.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mask = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, in_dim))
        self.norm = nn.LayerNorm(in_dim)
        self.out = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mask(x) * self.norm(x))


class DHENLayer(nn.Module):
    """One DHEN layer (Zhang et al. 2022), reduced to two interaction modules side by side.

    An MLP and a MaskBlock see the same input; their outputs are concatenated, projected and
    added to a residual of the input, then layer-normalised.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU())
        self.mask = MaskBlock(in_dim, out_dim)
        self.mix = nn.Linear(2 * out_dim, out_dim)
        self.skip = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(torch.cat([self.mlp(x), self.mask(x)], dim=-1))
        return self.norm(mixed + self.skip(x))


class Tower(nn.Module):
    """A stack of DHEN layers of the given widths followed by a linear head to `out_dim`."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.layers = nn.Sequential(*(DHENLayer(a, b) for a, b in zip(dims[:-1], dims[1:])))
        self.head = nn.Linear(dims[-1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


class SequenceEncoder(nn.Module):
    """Transformer over a padded event sequence, behind a learned CLS token.

    Bidirectional (`causal=False`): every event attends to every other and the CLS output is
    the summary. Causal: the CLS token comes first and each position attends to itself and
    what came before, so position k's output is the state after the sequence's first k events
    (k = 0: the CLS token alone, "no history"): every prefix's state, for a next-event
    objective over the whole sequence, in one forward. The summary is then the state after the
    last event. The CLS token is never masked, so an empty sequence (length 0) still has one
    valid key and gives a learned "no history" vector instead of NaN. Position embeddings count
    back from the most recent event, since sequences are oldest-first and right-padded.

    Length buckets: the rows are sorted by length and cut into `buckets` groups of equal size,
    each run padded to its own longest sequence, not the batch's. Padding is masked, so the
    result is the padded batch's (up to float rounding); what goes is the work on padding,
    which on skewed lengths (a few long histories, many short) is most of a padded batch.
    """

    def __init__(self, dim: int, max_len: int, layers: int, heads: int, dropout: float,
                 causal: bool = False, buckets: int = 1) -> None:
        super().__init__()
        self.max_len, self.causal, self.buckets = max_len, causal, buckets
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.recency = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, every_state: bool = False) -> torch.Tensor:
        """tokens: [B, n <= max_len, dim], valid in the first `lengths[b]` steps; returns the
        summary of each sequence [B, dim], or with `every_state` [B, n + 1, dim]: the CLS
        output, then each event's (zero past a row's bucket's longest sequence)."""
        n = tokens.size(1)
        lengths = lengths.clamp(max=n)
        if self.buckets <= 1:
            return self._encode(tokens, lengths, every_state)
        order = torch.argsort(lengths)
        parts = []
        for rows in order.tensor_split(min(self.buckets, len(order))):
            m = int(lengths[rows].max().clamp(min=1))
            part = self._encode(tokens[rows, :m], lengths[rows], every_state)
            parts.append(F.pad(part, (0, 0, 0, n - m)) if every_state else part)
        return torch.cat(parts)[torch.argsort(order)]

    def _encode(self, tokens: torch.Tensor, lengths: torch.Tensor, every_state: bool) -> torch.Tensor:
        n = tokens.size(1)
        steps = torch.arange(n, device=tokens.device)
        lengths = lengths.unsqueeze(1)
        padding = steps.unsqueeze(0) >= lengths
        x = tokens + self.recency((lengths - 1 - steps).clamp(min=0))
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1)
        padding = torch.cat([padding.new_zeros(x.size(0), 1), padding], dim=1)
        mask = None
        if self.causal:
            mask = torch.ones(n + 1, n + 1, dtype=torch.bool, device=x.device).triu(diagonal=1)
        states = self.norm(self.encoder(x, mask=mask, src_key_padding_mask=padding, is_causal=self.causal))
        if every_state:
            return states
        if not self.causal:
            return states[:, 0]
        return states[torch.arange(len(states), device=states.device), lengths.squeeze(1)]
