"""Dense building blocks shared by derl models: DHEN-style towers and a sequence encoder.

None of these hold embedding tables, so under `DistributedModelParallel` they stay plain dense
modules (DDP-replicated) and TorchRec's train pipelines treat them as FX leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

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


class EncoderLayer(nn.Module):
    """A pre-norm transformer layer over packed tokens: x + attention(LN(x)), then x + FFN(LN(x)),
    as `nn.TransformerEncoderLayer(norm_first=True)` computes it (same parameter shapes, ReLU
    FFN of width 4 * dim), except that the projections, the FFN and the norms run on the real
    tokens only ([T, dim], no padding) and only attention sees padded groups (`Groups`).
    Dropout acts on the residual branches and inside the FFN, not on the attention weights:
    attention dropout keeps `scaled_dot_product_attention` off its fused CPU kernel and its
    random draws were the largest single cost of a CPU step (docs/experiments.md, "2026-12-04").
    Attention itself always runs in float32, also under bf16 autocast (`SequenceEncoder`): the
    CPU's fused attention backward ran several times slower in bf16 (docs/results.md,
    "Upstream training")."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        # As `nn.MultiheadAttention` starts: Xavier projections, zero biases (nn.Linear's default
        # random biases gave a small model measurably worse retrieval: docs/experiments.md,
        # "2026-12-03").
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, groups: "Groups") -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        x = x + dropout(self.out(groups.attend(self.qkv(self.norm_attn(x)), self.heads)), p)
        hidden = dropout(F.relu(self.ff1(self.norm_ffn(x))), p)
        return x + dropout(self.ff2(hidden), p)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time dropout (`F.dropout(x, p)`). On CPU the keep mask comes from 16 random bits
    per element, four to each full-range int64 draw, where `bernoulli_` spends a draw on every
    element, at less than half the cost (docs/experiments.md, "2026-12-04"). A kept element is
    scaled by 1 / its exact keep probability, (65536 - cut) / 65536."""
    if p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    cut = round(p * 65536)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= cut - 32768
    return torch.where(keep, x * (65536 / (65536 - cut)), 0.0)


@lru_cache(maxsize=None)  # asked every forward; the hardware does not change
def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (CUDA with bf16, a CPU with AVX-512
    BF16 or AMX); elsewhere bf16 autocast is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities() if device.type == "cpu" else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


class Groups:
    """Where a batch's packed sequences sit for attention: rows sorted by length and cut into
    `buckets` groups of equal size, each padded to its own longest sequence. `index[g]` [rows,
    m]: the packed position of each group slot (T, a zero row, for padding); `back`: the
    permutation that puts the groups' valid slots back in packed order. A group pays for its
    own padding only, and only in attention, the one part that must see a row as a whole."""

    def __init__(self, lengths: torch.Tensor, starts: torch.Tensor, total: int, buckets: int,
                 causal: bool) -> None:
        self.causal, self.total = causal, total
        order = torch.argsort(lengths)
        self.index, self.valid, slots = [], [], []
        for rows in order.tensor_split(min(buckets, len(order))):
            m = int(lengths[rows].max())
            steps = torch.arange(m, device=lengths.device)
            valid = steps.unsqueeze(0) < lengths[rows].unsqueeze(1)
            index = torch.where(valid, starts[rows].unsqueeze(1) + steps, total)
            self.index.append(index)
            self.valid.append(valid)
            slots.append(index[valid])
        self.back = torch.argsort(torch.cat(slots))

    def attend(self, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        """[T, 3 * dim] packed queries, keys, values -> [T, dim] attention outputs. Causal: each
        position sees itself and what precedes it in its row (a row's valid positions come
        first, so padding is never among them). Bidirectional: every valid position of the row."""
        dim = qkv.size(1) // 3
        qkv = F.pad(qkv.to(torch.promote_types(qkv.dtype, torch.float32)), (0, 0, 0, 1))  # bf16 -> float32
        parts = []
        for index, valid in zip(self.index, self.valid):
            rows, m = index.shape
            q, k, v = qkv[index].view(rows, m, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            mask = None if self.causal else valid[:, None, None, :]
            with torch.autocast(qkv.device.type, enabled=False):  # float32 attention (EncoderLayer)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
            parts.append(out.transpose(1, 2).reshape(rows, m, dim)[valid])
        return torch.cat(parts)[self.back]


class SequenceEncoder(nn.Module):
    """Transformer over windows of events, behind a learned CLS token, computed on the real
    events only (packed, no padding but in attention's groups: `Groups`).

    A window is its context (at most `max_len` events) and the events after it (at most as
    many more). Position embeddings count back from the context's newest event (0: the newest,
    as SASRec's right-aligned positions do) and, after it, forward (a second range of `max_len`):
    the state after the context is then the same function of the context wherever more events
    follow, which is what makes a training window's day-start state the exported one. Without
    `context`, every event is context and a window keeps its latest `max_len` events.

    Bidirectional (`causal=False`): every event attends to every other and the CLS output is
    the summary. Causal: the CLS token comes first and each position attends to itself and
    what came before, so position k's output is the state after the window's first k kept
    events (k = 0: the CLS token alone, "no history"): every prefix's state, for a next-event
    objective, in one forward. The summary is then the state after the last event. An empty
    window is its CLS token alone and gives a learned "no history" vector.

    `bf16`: the layers' projections and feed-forward under bf16 autocast where the device
    multiplies bf16 in hardware (`native_bf16`); the residual stream, the norms and attention
    stay float32, and so does everything on other devices.
    """

    def __init__(self, dim: int, max_len: int, layers: int, heads: int, dropout: float,
                 causal: bool = False, buckets: int = 1, bf16: bool = False) -> None:
        super().__init__()
        self.max_len, self.causal, self.buckets, self.bf16 = max_len, causal, buckets, bf16
        self.cls = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.position = nn.Embedding(2 * max_len, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def matmul_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the layers' projections and feed-forward multiply in on `device`."""
        return torch.bfloat16 if self.bf16 and native_bf16(device) else torch.float32

    def forward(self, events: torch.Tensor, lengths: torch.Tensor, every_state: bool = False,
                context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """events: [E, dim], every window's events flat and oldest-first (`lengths` [B] of them
        each, the first `context` [B] of them context); returns the summary of each window
        [B, dim], or with `every_state` the packed states [T, dim] laid out as
        `layout(lengths, context)` says: per window its CLS output, then one per kept event."""
        packed = self.layout(lengths, context)
        anchor = packed.kept if context is None else context
        first_kept = torch.cumsum(lengths, 0) - packed.kept  # flat index of each window's oldest kept event
        source = first_kept[packed.row] + packed.step - 1
        events = F.pad(events, (0, 0, 0, 1))  # a row to point CLS slots at, even with no events
        tokens = events[torch.where(packed.step > 0, source, len(events) - 1)]
        ahead = packed.step - anchor[packed.row]  # <= 0: context (0: its newest event)
        index = torch.where(ahead <= 0, -ahead, self.max_len + ahead - 1).clamp(0, 2 * self.max_len - 1)
        x = torch.where((packed.step > 0).unsqueeze(1), tokens + self.position(index), self.cls)  # CLS: no position
        groups = Groups(packed.kept + 1, packed.starts, len(x), self.buckets, self.causal)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.matmul_dtype(x.device) == torch.bfloat16):
            for layer in self.layers:
                x = layer(x, groups)
        states = self.norm(x)
        if every_state:
            return states
        return states[packed.starts + packed.kept] if self.causal else states[packed.starts]

    def layout(self, lengths: torch.Tensor, context: Optional[torch.Tensor] = None) -> "Packed":
        """Where each window's CLS and kept events sit among the packed tokens: a window with
        a `context` keeps all its events, one without its latest `max_len`."""
        kept = lengths.clamp(max=self.max_len) if context is None else lengths
        size = kept + 1
        starts = torch.cumsum(size, 0) - size
        total = int(size.sum())
        row = torch.repeat_interleave(torch.arange(len(kept), device=kept.device), size, output_size=total)
        return Packed(kept, starts, row, torch.arange(total, device=kept.device) - starts[row])


@dataclass
class Packed:
    """The packed token layout of a batch of windows: `kept` [B] events per window, `starts`
    [B] each window's first (CLS) slot; per slot [T], its `row` (window) and its `step` (0:
    CLS, k: the window's k-th kept event, oldest first)."""

    kept: torch.Tensor
    starts: torch.Tensor
    row: torch.Tensor
    step: torch.Tensor
