"""The upstream's sequence transformer against the limit and a peer, on one real training batch:
its achieved GFLOP/s beside a plain matmul's of the FFN's shape, and the reference SASRec's
training examples/s on the same history lengths (how each is counted: docs/results.md,
"Upstream training")."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula,
                                     sdpa_backward_flop, sdpa_flop)

from derl.benchmarks.studies.seqrec.models import SASRec
from derl.benchmarks.studies.seqrec.train import Settings

_aten = torch.ops.aten
# The counter knows the CUDA attention kernels; the CPU one computes the same products.
for _op, _formula in ((_aten._scaled_dot_product_flash_attention_for_cpu, sdpa_flop),
                      (_aten._scaled_dot_product_flash_attention_for_cpu_backward, sdpa_backward_flop)):
    if _op not in flop_registry:
        register_flop_formula(_op, get_raw=True)(_formula)  # already shape-wrapped


def _seconds(step: Callable[[], object], reps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(encoder: torch.nn.Module, events: torch.Tensor, lengths: torch.Tensor, n_items: int,
            reps: int = 5) -> Dict[str, float]:
    """The figures above for `encoder` (a `SequenceEncoder`) on one batch's `events` [E, d]
    (flat, oldest-first per row) and `lengths` [B]."""
    events = events.detach().requires_grad_()
    was_training = encoder.training
    encoder.train()

    def transformer_step() -> None:
        encoder(events, lengths, every_state=True).square().mean().backward()

    with FlopCounterMode(display=False) as counter:
        transformer_step()
    flops = counter.get_total_flops()
    transformer_s = _seconds(transformer_step, reps)
    encoder.zero_grad(set_to_none=True)
    encoder.train(was_training)

    d = events.size(1)
    tokens = int((lengths.clamp(max=encoder.max_len) + 1).sum())
    dtype = encoder.matmul_dtype(events.device)
    a, b = torch.randn(tokens, d, dtype=dtype), torch.randn(d, 4 * d, dtype=dtype)
    mm_s = _seconds(lambda: torch.mm(a, b), max(reps, 20))
    transformer_gflop_s = flops / transformer_s / 1e9
    matmul_gflop_s = 2 * tokens * d * 4 * d / mm_s / 1e9
    return {
        "tokens": tokens,
        "transformer_gflop": flops / 1e9,
        "transformer_ms": 1e3 * transformer_s,
        "transformer_gflop_s": transformer_gflop_s,
        "matmul_gflop_s": matmul_gflop_s,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "fraction_of_matmul_peak": transformer_gflop_s / matmul_gflop_s,
        "sasrec_examples_per_s": sasrec_examples_per_s(
            lengths.clamp(max=encoder.max_len), n_items, d, len(encoder.layers), encoder.max_len, reps),
    }


def sasrec_examples_per_s(kept: torch.Tensor, n_items: int, dim: int, layers: int, max_len: int,
                          reps: int) -> float:
    """Training examples/s of the reference SASRec on windows of the given history lengths."""
    g = torch.Generator().manual_seed(0)
    rows, width = len(kept), int(kept.max().clamp(min=1))
    items = torch.randint(1, n_items + 1, (rows, width + 1), generator=g)
    present = torch.arange(width + 1).unsqueeze(0) >= width - kept.unsqueeze(1)  # left-padded
    items = items * present
    inputs, targets = items[:, :-1], items[:, 1:]
    users = torch.arange(rows)
    seen = torch.sort((users.unsqueeze(1) * (n_items + 1) + items).flatten()).values
    s = Settings()
    model = SASRec(n_items, dim, layers, s.heads, s.dropout, max_len, "bce", seen=seen).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, betas=(0.9, s.beta2))

    def step() -> None:
        model.loss(inputs, targets, users, g).backward()
        optimizer.step()
        optimizer.zero_grad()

    return rows / _seconds(step, reps)
