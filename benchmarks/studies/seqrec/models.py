"""The model registry and the reference models.

A model is an `nn.Module` with
- `score(inputs) -> [B, n_items + 1]`: scores of every item for the next position after
  `inputs` ([B, T] item ids, right-aligned: the latest item last, 0-padded on the left,
  T <= max_len);
- when trainable, `loss(inputs, targets, users, generator) -> scalar`: the training loss on
  [B, T] windows of training sequences, targets[b, t] the item after inputs[b, t] (0: no
  target at that position), users[b] the window's user (for negative sampling), generator the
  run's RNG for any sampling (so that a resumed run draws what an uninterrupted one would).

`MODELS` maps a name to a `ModelSpec`: how to build it from the split and the settings, whether
it trains, and its defaults (any `train.Settings` field). `train.fit` trains any trainable model
in the same loop (batching, Adam, early stopping on validation, checkpoints); a spec with its own
`fit` (same signature and result as `train.fit`) trains itself instead. A new model (derl's own
upstream, say) registers here with `register("name", ModelSpec(...))`.

Reference models (what each computes, and its recipe's sources: docs/seqrec.md, "Models"):
`popularity`, `popularity-all`, `sasrec` (SASRec as its authors built it, binary cross-entropy
with one sampled negative), `sasrec-ssm` (eSASRec's SASRec+SS baseline: a sampled softmax over
256 uniform negatives per position, its published recipe as defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from derl.benchmarks.studies.seqrec import derl_model
from derl.benchmarks.studies.seqrec.data import Split


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[Split, Any], nn.Module]  # (split, train.Settings) -> model
    trainable: bool = True
    defaults: Dict[str, object] = field(default_factory=dict)  # train.Settings overrides
    fit: Optional[Callable] = None  # None: train.fit
    label: str = ""


MODELS: Dict[str, ModelSpec] = {}


def register(name: str, spec: ModelSpec) -> None:
    MODELS[name] = spec


# -- popularity ---------------------------------------------------------------------------------


class Popularity(nn.Module):
    def __init__(self, counts: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("counts", counts.float())

    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(len(inputs), -1).clone()


# -- SASRec -------------------------------------------------------------------------------------


def seen_keys(split: Split) -> torch.Tensor:
    """Sorted user * (n_items + 1) + item over every training interaction (membership tests)."""
    users, items = split.train_items()
    return torch.sort(users * (split.n_items + 1) + items).values


def sample_unseen(keys: torch.Tensor, n_items: int, users: torch.Tensor, generator: torch.Generator,
                  rounds: int = 100) -> torch.Tensor:
    """One uniform item per entry of `users` not in that user's training sequence (rejection:
    the hits are redrawn, `rounds` times at most)."""
    neg = torch.randint(1, n_items + 1, users.shape, generator=generator, device=users.device)
    for _ in range(rounds):
        k = users * (n_items + 1) + neg
        at = torch.searchsorted(keys, k).clamp(max=len(keys) - 1)
        hit = keys[at] == k
        n_hit = int(hit.sum())
        if not n_hit:
            break
        neg[hit] = torch.randint(1, n_items + 1, (n_hit,), generator=generator, device=users.device)
    return neg


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln_attn = nn.LayerNorm(dim, eps=1e-8)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln_ffn = nn.LayerNorm(dim, eps=1e-8)
        self.ff1 = nn.Linear(dim, dim)
        self.ff2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.heads
        q = self.ln_attn(x)
        k, v = self.kv(x).view(B, T, 2, h, D // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self.q(q).view(B, T, h, D // h).transpose(1, 2), k, v,
                                           attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = q + self.out(a.transpose(1, 2).reshape(B, T, D))
        x = self.ln_ffn(x)
        x = x + self.drop(self.ff2(self.drop(F.relu(self.ff1(x)))))
        return x * valid


class SASRec(nn.Module):
    def __init__(self, n_items: int, dim: int = 64, layers: int = 2, heads: int = 1,
                 dropout: float = 0.2, max_len: int = 50, loss: str = "bce", negatives: int = 256,
                 sampling: str = "uniform", counts: Optional[torch.Tensor] = None,
                 seen: Optional[torch.Tensor] = None, scale_inputs: bool = True,
                 item_dropout: float = 0.0) -> None:
        super().__init__()
        self.n_items, self.dim, self.max_len = n_items, dim, max_len
        self.loss_kind, self.negatives, self.sampling = loss, negatives, sampling
        self.scale = math.sqrt(dim) if scale_inputs else 1.0
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.item_drop = nn.Dropout(item_dropout)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=1e-8)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item.weight[0].zero_()
        if loss == "bce":
            self.register_buffer("seen", seen, persistent=False)
        if loss == "ssm" and sampling == "popularity":
            q = counts.double() + 1.0
            q[0] = 0.0
            self.register_buffer("q", (q / q.sum()).float(), persistent=False)
            self.register_buffer("log_q", torch.log(self.q.clamp(min=1e-30)), persistent=False)

    def items(self) -> torch.Tensor:
        """[n_items + 1, dim]: the item table as this step uses it, input and output alike (with
        item_dropout, one dropout mask over the table per step, as RecTools' item network)."""
        return self.item_drop(self.item.weight)

    def encode(self, inputs: torch.Tensor, items: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, T, dim]: the output at every position of right-aligned `inputs`."""
        B, T = inputs.shape
        valid = (inputs != 0).unsqueeze(-1)
        x = (self.item(inputs) if items is None else items[inputs]) * self.scale + self.pos.weight[self.max_len - T:]
        x = self.drop(x) * valid
        ar = torch.arange(T, device=inputs.device)
        causal = ar[None, :] <= ar[:, None]  # [q, k]: k <= q
        # Padded keys masked; a padded query sees itself only (its output is zeroed, never used).
        mask = (causal[None] & valid.transpose(1, 2)) | (ar[None, :] == ar[:, None])[None]
        mask = mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask, valid)
        return self.norm(x)

    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encode(inputs)[:, -1] @ self.item.weight.T

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, users: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        m = (inputs != 0) & (targets != 0)
        if self.loss_kind == "bce":
            h, pos = self.encode(inputs)[m], targets[m]
            neg = sample_unseen(self.seen, self.n_items, users[:, None].expand_as(inputs)[m], generator)
            pos_logit = (h * self.item(pos)).sum(-1)
            neg_logit = (h * self.item(neg)).sum(-1)
            return (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
                    + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit)))
        items = self.items()
        h, pos = self.encode(inputs, items)[m], targets[m]
        shape = (len(pos), self.negatives)  # negatives of their own for every position
        if self.sampling == "popularity":
            neg = torch.multinomial(self.q, shape[0] * shape[1], replacement=True,
                                    generator=generator).view(shape)
        else:
            neg = torch.randint(1, self.n_items + 1, shape, generator=generator, device=inputs.device)
        # Every item's logit, then the sampled ones picked: the same logits as gathering each
        # position's negatives' vectors, at a fraction of the memory traffic.
        logits = h @ items.T
        pos_logit, neg_logit = logits.gather(1, pos[:, None]), logits.gather(1, neg)
        if self.sampling == "popularity":  # logQ correction (uniform: a constant, no effect)
            pos_logit = pos_logit - self.log_q[pos][:, None]
            neg_logit = neg_logit - self.log_q[neg]
        neg_logit = neg_logit.masked_fill(neg == pos[:, None], float("-inf"))
        logits = torch.cat([pos_logit, neg_logit], 1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def _sasrec(loss: str) -> Callable[[Split, Any], nn.Module]:
    """bce: the original SASRec network; ssm: RecTools' (inputs not scaled by sqrt(d), dropout
    on the item table)."""
    def build(split: Split, s) -> nn.Module:
        return SASRec(split.n_items, s.dim, s.layers, s.heads, s.dropout, s.max_len, loss,
                      s.negatives, s.sampling, counts=split.train_counts(),
                      seen=seen_keys(split) if loss == "bce" else None,
                      scale_inputs=loss == "bce", item_dropout=s.dropout if loss == "ssm" else 0.0)
    return build


register("popularity", ModelSpec(lambda split, s: Popularity(split.train_counts()), trainable=False,
                                 label="popularity (training counts)"))
# The published popularity figure (S3-Rec's table) is reproduced exactly only by counting every
# interaction, the test targets included (docs/seqrec.md): a reference, not a fair baseline.
register("popularity-all", ModelSpec(
    lambda split, s: Popularity(torch.bincount(split.items, minlength=split.n_items + 1)),
    trainable=False, label="popularity (every interaction counted: test leaks)"))
register("sasrec", ModelSpec(_sasrec("bce"), label="SASRec, original loss (BCE, 1 negative)"))
# The recipe of eSASRec's SASRec+SS baseline on the S3-Rec data (docs/seqrec.md: its repository
# blondered/transformer_benchmark, configs/paper/loo/s3_vanilla.yaml, on RecTools 0.13.0):
# d 256, 1 block, 1 head, dropout 0.2, max_len 50, 256 negatives; validation every epoch,
# stopped after 50 epochs without a better one, 200 at most.
register("sasrec-ssm", ModelSpec(_sasrec("ssm"), defaults={"dim": 256, "layers": 1, "eval_every": 1, "patience": 50},
                                 label="SASRec, sampled softmax (RecTools' SASRec+SS recipe)"))
# derl's own upstream, trained and exported by the derl commands (derl_model.py).
register("derl", ModelSpec(derl_model.build, fit=derl_model.fit,
                           label="derl upstream (DERM user and Pin towers, via derl import/train-upstream/export)"))
