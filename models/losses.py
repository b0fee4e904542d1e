"""Losses shared by derl models: weighted multi-task BCE, in-batch sampled softmax, next-item softmax,
pairwise ranking."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F


def multi_task_bce(
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
) -> Dict[str, torch.Tensor]:
    """Per-task BCE with logits (mean over the batch) times its weight, for every task in
    `logits` whose label is present in `labels`.

    Organic and ad batches carry different labels (ENGAGEMENT_LABELS vs AD_LABELS), so a task
    without a label in this batch is skipped rather than treated as all-negative.
    """
    return {
        task: weights.get(task, 1.0)
        * F.binary_cross_entropy_with_logits(logit, labels[task].to(logit.dtype))
        for task, logit in logits.items()
        if task in labels
    }


def in_batch_softmax_loss(
    query: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    positive: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    item_prob: Optional[torch.Tensor] = None,
    logq_strength: float = 1.0,
) -> torch.Tensor:
    """In-batch sampled softmax: row i's positive is item i, the other in-batch items are negatives.

    logits[i, j] = <query_i, item_j> / temperature - log q_j, where q_j = `item_prob[j]` is the
    probability that item j is drawn into a batch (logQ correction, Yi et al. 2019): popular
    items show up as negatives more often than uniform sampling would, and without the
    correction the model learns to push them down. `logq_strength` (beta) scales the
    correction, logits - beta * log q_j: 1 makes the dot product estimate log P(item | query),
    popularity included; 0 the pointwise mutual information, popularity removed; in between,
    the dot carries beta times the log popularity. Off-diagonal columns holding the same item
    id as row i's positive are masked out: they are the positive, not a negative.

    Only rows with `positive[i]` true contribute, and the loss is their summed cross entropy over
    the batch's rows (not over its positives): every positive pair weighs the same, whichever
    table its batch came from. Averaging over positives instead gave each of the few clicks of an
    ad batch the weight of many organic engagements, and those noisy batches cost the organic
    space part of its recall gain (the figures: docs/experiments.md, "The upstream's defaults").
    """
    logits = query @ item.T / temperature
    if item_prob is not None:
        logits = logits - logq_strength * torch.log(item_prob.clamp(min=1e-12)).unsqueeze(0)
    diagonal = torch.eye(len(item_ids), dtype=torch.bool, device=logits.device)
    same_item = (item_ids.unsqueeze(0) == item_ids.unsqueeze(1)) & ~diagonal
    logits = logits.masked_fill(same_item, float("-inf"))
    targets = torch.arange(len(item_ids), device=logits.device)
    per_row = F.cross_entropy(logits, targets, reduction="none")
    positive = positive.to(per_row.dtype)
    return (per_row * positive).sum() / len(per_row)


def next_item_softmax_loss(
    states: torch.Tensor,
    targets: torch.Tensor,
    items: torch.Tensor,
    item_counts: torch.Tensor,
    negatives: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    logq_strength: float = 1.0,
) -> torch.Tensor:
    """Sampled softmax of each state against its next item, the other items as negatives.

    states [P, d]: one per sequence position; targets [P]: the row of each one's next item in
    items [U, d] (the batch's distinct next items); negatives [K]: the rows of `items` every
    state is contrasted with (all of them, or a sample). Negatives drawn from the batch's next
    items come in proportion to `item_counts` (their count among the targets), hence the logQ
    correction, logits - beta * log q, on the positive and the negatives alike (as in
    `in_batch_softmax_loss`); a negative that is the state's own target is masked out. The mean
    cross entropy over the positions.
    """
    log_q = torch.log(item_counts.to(states.dtype) / item_counts.sum())
    positive = (states * items[targets]).sum(dim=1) / temperature - logq_strength * log_q[targets]
    negative = states @ items[negatives].T / temperature - logq_strength * log_q[negatives].unsqueeze(0)
    negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive.unsqueeze(1), negative], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def pairwise_logistic_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of softplus(s_neg - s_pos) over every (positive, negative) pair of the rows: the
    logistic surrogate of one minus the AUC of `scores` for `labels` (> 0 positive). Needs no
    bias, so a score can be trained to rank rows whose base rate it does not know. 0 (with a
    gradient path) when the rows hold no pair."""
    positive = labels > 0
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return scores.sum() * 0.0
    return F.softplus(neg.unsqueeze(0) - pos.unsqueeze(1)).mean()
