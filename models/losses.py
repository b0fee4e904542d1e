"""Losses shared by derl models: weighted multi-task BCE, in-batch and sampled softmax, pairwise ranking."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F


def multi_task_bce(
    logits: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
) -> Dict[str, torch.Tensor]:
    """Per-task BCE with logits (mean over the rows that have the label) times its weight, for
    every task in `logits` with a label in `labels`.

    Organic and ad rows carry different labels (ENGAGEMENT_LABELS vs AD_LABELS): a row whose
    table lacks a task's label holds NaN there, and a task no row has is skipped, rather than
    treated as negative.
    """
    parts = {}
    for task, logit in logits.items():
        if task not in labels:
            continue
        label = labels[task].to(logit.dtype)
        known = ~torch.isnan(label)
        if bool(known.all()):
            parts[task] = weights.get(task, 1.0) * F.binary_cross_entropy_with_logits(logit, label)
        elif bool(known.any()):
            parts[task] = weights.get(task, 1.0) * F.binary_cross_entropy_with_logits(logit[known], label[known])
    return parts


def in_batch_softmax_loss(
    query: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    positive: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    item_prob: Optional[torch.Tensor] = None,
    logq_strength: float = 1.0,
    groups: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In-batch sampled softmax: row i's positive is item i, the other in-batch items are negatives.

    logits[i, j] = <query_i, item_j> / temperature - log q_j, where q_j = `item_prob[j]` is the
    probability that item j is drawn into a batch (logQ correction, Yi et al. 2019): popular
    items show up as negatives more often than uniform sampling would, and without the
    correction the model learns to push them down. `logq_strength` (beta) scales the
    correction, logits - beta * log q_j: 1 makes the dot product estimate log P(item | query),
    popularity included; 0 the pointwise mutual information, popularity removed; in between,
    the dot carries beta times the log popularity. Off-diagonal columns holding the same item
    id as row i's positive are masked out: they are the positive, not a negative; so are, with
    `groups` [n] (the rows' users), the other positives of row i's own group: the same user at
    the same moment engaged with them too.

    Only rows with `positive[i]` true contribute, and the loss is their summed cross entropy over
    the batch's rows (not over its positives): every positive pair weighs the same, whichever
    table its batch came from. Averaging over positives instead gave each of the few clicks of an
    ad batch the weight of many organic engagements, and those noisy batches cost the organic
    space part of its recall gain (the figures: docs/experiments.md, "The upstream's defaults").
    """
    rows = torch.nonzero(positive).squeeze(1)  # only these contribute: the others' logits are never made
    logits = query[rows] @ item.T / temperature
    if item_prob is not None:
        logits = logits - logq_strength * torch.log(item_prob.clamp(min=1e-12)).unsqueeze(0)
    hidden = item_ids.unsqueeze(0) == item_ids[rows].unsqueeze(1)
    if groups is not None:
        hidden |= (groups.unsqueeze(0) == groups[rows].unsqueeze(1)) & positive.unsqueeze(0)
    hidden[torch.arange(len(rows), device=rows.device), rows] = False  # the row's own positive
    return F.cross_entropy(logits.masked_fill(hidden, float("-inf")), rows, reduction="sum") / len(item_ids)


def sampled_softmax_loss(
    states: torch.Tensor,
    targets: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    logq_strength: float = 1.0,
) -> torch.Tensor:
    """Sampled softmax of each state against its next item among shared candidates.

    states [P, d]: one per position; targets [P]: each one's column in items [C, d], the
    candidates (the batch's distinct next items, then items drawn from the catalogue), whose
    ids are `item_ids` [C]. `log_q` [C] is log of each candidate's expected count among the
    candidates; logits - beta * log q corrects for popular items being drawn more often than
    rare ones (Yi et al. 2019; beta = `logq_strength`). A candidate with the id of a state's
    own target, other than its target column, is masked out: a hit, not a negative. The mean
    cross entropy over the positions.
    """
    logits = states @ items.T / temperature - logq_strength * log_q.unsqueeze(0)
    hit = item_ids.unsqueeze(0) == item_ids[targets].unsqueeze(1)
    hit[torch.arange(len(targets), device=targets.device), targets] = False
    return F.cross_entropy(logits.masked_fill(hit, float("-inf")), targets)


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
