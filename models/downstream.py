"""The downstream ads ranker: DLRM / DCN-v2 from TorchRec's own blocks, with the upstream
entity vectors as dense features, and two heads (CTR and CVR) (docs/architecture.md, "Rankers").

    sparse ids (ad Pin, advertiser, campaign, category, surface, position, hour, user, profile)
        -> SparseArch (a sharded EmbeddingBagCollection)                      [B, F, D]
    dense = Pin content + upstream vectors (+ user·Pin dots, missing flags)
        -> DenseArch                                                           [B, D]
    -> InteractionArch (DLRM dot) or InteractionDCNArch (DCN-v2 low-rank cross net)
    -> OverArch per task: CTR logit, CVR logit
    (+ the user·Pin dots / upstream temperature, linearly: the wide path)

The wide path is what lets a ranker use the upstream affinity at all on sparse ad data.
dot / temperature is the upstream model's own logit (an estimate of log P(Pin | user) / q, a
log-lift), the natural scale of a log-odds feature. Through the deep arch alone, a ranker that
sees the clicks of sparse ad data once (a second pass overfits its id tables) gained nothing
from the vectors; with the wide path it did (figures: docs/experiments.md, "The ranker on the
earlier demo world").

Where the upstream vectors come from is the one switch (`upstream`):
- `none`: no upstream vectors (the baseline);
- `snapshot`: from the batch, joined from an exported snapshot (`SnapshotJoin`), the decoupled
  design of the paper; an id the snapshot lacks gets a learned default vector and a flag;
- `coupled`: from upstream DERM towers inside the ranker, fine-tuned end to end on ad data, the
  design the paper avoids (every ranker step pays for the towers, sequence transformer included).

CVR is trained ESMM-style (Ma et al. 2018): pCTCVR = pCTR · pCVR is fitted to `converted` on all
impressions. Conversions are rare and only follow clicks; fitting pCVR on clicked rows alone
would train on the clicked few percent of the data and score all impressions with a model that never saw an
unclicked one (sample selection bias). pCVR itself is evaluated on clicked impressions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch, OverArch, SparseArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from derl.datapipes.batch import Batch
from derl.datapipes.schema import CONTENT_DIM
from derl.models.fields import check, flag_name, setting
from derl.models.upstream import DERM, UpstreamConfig

# Ad-side and context ids of an impression, each through its own table.
RANKER_SPARSE_FEATURES = ("user_id", "country", "age_bucket", "gender", "pin_id", "category",
                          "advertiser_id", "campaign_id", "surface", "position", "hour")
UPSTREAM_MODES = ("none", "snapshot", "coupled")
INTERACTIONS = ("dcn", "dot")  # DCN-v2, DLRM
TASKS = ("ctr", "cvr")


def dot_pairs(vectors: Sequence[str]) -> Tuple[Tuple[int, int], ...]:
    """(user, Pin) positions in `vectors` of each domain that has both: their dot product is a
    feature of its own, the affinity the upstream space was trained to carry."""
    pairs = []
    for i, v in enumerate(vectors):
        domain, entity = v.split("/")
        if entity == "users" and f"{domain}/pins" in vectors:
            pairs.append((i, list(vectors).index(f"{domain}/pins")))
    return tuple(pairs)


@dataclass(frozen=True, kw_only=True)
class RankerSettings:
    """What shapes a ranker and may be tuned: each field is a `derl train-downstream` flag of its
    own name (`TrainDownstreamConfig` inherits these), checked here, once. `RankerConfig` adds
    what the data and the snapshot fix."""

    upstream: str = setting("snapshot", "where the upstream vectors come from (none: the baseline)",
                            choices=UPSTREAM_MODES)
    # A learned projection of the concatenated upstream vectors to this width (None: as they are).
    projection_dim: Optional[int] = setting(None, "project the upstream vectors to this width")
    interaction: str = setting("dcn", "feature interaction: DCN-v2 or DLRM's dot", choices=INTERACTIONS)
    embedding_dim: int = setting(16, "width of the ranker's id tables")
    # The last layer of the dense arch is embedding_dim, that of each head one logit.
    dense_arch: Tuple[int, ...] = setting((64,), "hidden widths of the dense arch")
    over_arch: Tuple[int, ...] = setting((128, 64), "hidden widths of each head")

    def __post_init__(self) -> None:
        check(self, positive=("embedding_dim", "projection_dim"), widths=("over_arch",))
        if any(w <= 0 for w in self.dense_arch):
            raise ValueError(f"{flag_name(type(self), 'dense_arch')} must be positive widths, "
                             f"got {','.join(map(str, self.dense_arch))!r}")
        for name, allowed in (("upstream", UPSTREAM_MODES), ("interaction", INTERACTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag_name(type(self), name)} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RankerConfig(RankerSettings):
    """Everything that shapes a ranker: its settings, and what the data and the snapshot fix.
    `vectors` names the upstream vectors it takes, as "<domain>/<entity>" (e.g.
    "engagement/users"); `upstream_dim` is their dimension."""

    num_embeddings: Mapping[str, int]
    vectors: Tuple[str, ...] = ()
    upstream_dim: int = 0
    dcn_layers: int = 2
    dcn_rank: int = 32
    # One per `dot_pairs` entry: the temperature of the upstream model whose dot it is.
    dot_temperatures: Tuple[float, ...] = ()
    # ("ctr",) for a source without conversions (the Taobao display-ad logs): no CVR head.
    tasks: Tuple[str, ...] = TASKS
    cvr_weight: float = 1.0
    # Base rates the heads start from (their output bias = logit of it): a head that starts at
    # 0.5 on a CTR of a few percent spends its first hundreds of steps learning the base rate.
    ctr_prior: float = 0.5
    cvr_prior: float = 0.5
    sparse_features: Tuple[str, ...] = RANKER_SPARSE_FEATURES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.upstream == "none" and self.vectors:
            raise ValueError("upstream 'none' takes no vectors")
        if self.upstream != "none" and (not self.vectors or self.upstream_dim <= 0):
            raise ValueError(f"upstream {self.upstream!r} needs vectors and their dimension")
        if self.tasks not in (TASKS, TASKS[:1]):
            raise ValueError(f"tasks must be {TASKS} or {TASKS[:1]}, not {self.tasks}")
        for name in ("ctr_prior", "cvr_prior"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.upstream != "none" and len(self.dot_temperatures) != len(self.dot_pairs):
            raise ValueError(f"one dot temperature per user·Pin pair {self.dot_pairs}, "
                             f"got {self.dot_temperatures}")
        missing = [f for f in self.sparse_features if f not in self.num_embeddings]
        if missing:
            raise ValueError(f"num_embeddings lacks {missing}")

    @property
    def dot_pairs(self) -> Tuple[Tuple[int, int], ...]:
        return dot_pairs(self.vectors)

    @property
    def upstream_features(self) -> int:
        """Width of the upstream part of the dense input."""
        if self.upstream == "none":
            return 0
        k = len(self.vectors)
        vectors = self.projection_dim or k * self.upstream_dim
        flags = k if self.upstream == "snapshot" else 0
        return vectors + len(self.dot_pairs) + flags


class UpstreamFeatures(nn.Module):
    """[B, k, d] upstream vectors (+ [B, k] missing flags) -> (the upstream part of the dense
    input: the vectors (missing ones replaced by a learned default per vector, projected or
    not), the user·Pin dot of each domain, and the flags; [B, pairs] those dots alone)."""

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        self.pairs = cfg.dot_pairs
        k, d = len(cfg.vectors), cfg.upstream_dim
        self.default = nn.Parameter(torch.zeros(k, d))
        self.projection = nn.Linear(k * d, cfg.projection_dim) if cfg.projection_dim else None

    def forward(self, vectors: torch.Tensor,
                missing: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if missing is not None:
            vectors = torch.where(missing.unsqueeze(-1) > 0, self.default.unsqueeze(0), vectors)
        flat = vectors.flatten(1)
        dots = torch.stack([(vectors[:, u] * vectors[:, p]).sum(dim=1) for u, p in self.pairs], dim=1) \
            if self.pairs else flat.new_zeros(len(flat), 0)
        parts = [self.projection(flat) if self.projection is not None else flat, dots]
        if missing is not None:
            parts.append(missing)
        return torch.cat(parts, dim=1), dots


class CoupledTowers(nn.Module):
    """The upstream DERMs inside the ranker (`coupled` mode): each vector computed by its
    domain's user or Pin tower from the batch's own features, trained with the ranker.
    Only the towers run; each DERM's interaction tower stays unused (DDP's static graph
    allows that)."""

    def __init__(self, vectors: Sequence[str], configs: Mapping[str, UpstreamConfig],
                 table_device: Optional[torch.device]) -> None:
        super().__init__()
        self.vectors = tuple(vectors)
        domains = sorted({v.split("/")[0] for v in vectors})
        self.models = nn.ModuleDict({d: DERM(configs[d], table_device) for d in domains})

    def forward(self, batch: Batch) -> torch.Tensor:
        vectors = {}
        for domain, model in self.models.items():
            user, pin = model.embed_both(batch.sparse, batch.dense)
            vectors[f"{domain}/users"], vectors[f"{domain}/pins"] = user, pin
        return torch.stack([vectors[v] for v in self.vectors], dim=1)


class Ranker(nn.Module):
    """CTR/CVR ranker: `forward(batch) -> (loss, outputs)` as TorchRec's train pipelines
    expect; outputs "ctr" and "cvr" are probabilities [B], "losses" the detached parts,
    "clicked" the batch's CTR label (when labelled), for training metrics.
    `upstream_configs` (coupled mode) are the DERM configs of the domains in `cfg.vectors`."""

    def __init__(self, cfg: RankerConfig, table_device: Optional[torch.device] = None,
                 upstream_configs: Optional[Mapping[str, UpstreamConfig]] = None) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embedding_dim
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=D, feature_names=[f],
                                     num_embeddings=cfg.num_embeddings[f], pooling=PoolingType.SUM)
                  for f in cfg.sparse_features]
        self.sparse_arch = SparseArch(EmbeddingBagCollection(tables, device=table_device))
        self.towers = (CoupledTowers(cfg.vectors, upstream_configs or {}, table_device)
                       if cfg.upstream == "coupled" else None)
        self.upstream = UpstreamFeatures(cfg) if cfg.upstream != "none" else None
        self.dense_arch = DenseArch(CONTENT_DIM + cfg.upstream_features, [*cfg.dense_arch, D])
        num_sparse = len(cfg.sparse_features)
        if cfg.interaction == "dcn":
            width = (num_sparse + 1) * D
            self.interaction = InteractionDCNArch(
                num_sparse, LowRankCrossNet(width, cfg.dcn_layers, cfg.dcn_rank))
        else:
            width = D + (num_sparse + 1) * num_sparse // 2
            self.interaction = InteractionArch(num_sparse)
        self.heads = nn.ModuleDict({t: OverArch(width, [*cfg.over_arch, 1]) for t in cfg.tasks})
        for task, prior in (("ctr", cfg.ctr_prior), ("cvr", cfg.cvr_prior)):
            if task in cfg.tasks:
                nn.init.constant_(self.heads[task].model[-1].bias, math.log(prior / (1 - prior)))
        self.loss = RankerLoss(cfg.cvr_weight)
        self.wide = None
        if cfg.upstream != "none" and cfg.dot_pairs:  # starts at 0: the prior alone
            self.wide = nn.Linear(len(cfg.dot_pairs), len(cfg.tasks))
            nn.init.zeros_(self.wide.weight)
            nn.init.zeros_(self.wide.bias)
            self.register_buffer("dot_temperatures", torch.tensor(cfg.dot_temperatures), persistent=False)

    def dense_input(self, batch: Batch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the dense arch's input, the user·Pin dots or None without upstream vectors)"""
        content = batch.dense["content_emb"]
        if self.cfg.upstream == "none":
            return content, None
        if self.cfg.upstream == "snapshot":
            upstream, dots = self.upstream(batch.dense["upstream"], batch.dense["upstream_missing"])
        else:
            upstream, dots = self.upstream(self.towers(batch), None)
        return torch.cat([content, upstream], dim=1), dots

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Dict[str, Any]]:
        dense_input, dots = self.dense_input(batch)
        x = self.interaction(self.dense_arch(dense_input), self.sparse_arch(batch.sparse))
        logits = {t: head(x).squeeze(1) for t, head in self.heads.items()}
        if self.wide is not None:
            wide = self.wide(dots / self.dot_temperatures)
            logits = {t: v + wide[:, i] for i, (t, v) in enumerate(logits.items())}
        return self.loss(logits["ctr"], logits.get("cvr"), batch.labels)


class RankerLoss(nn.Module):
    """CTR BCE on all impressions + ESMM's CTCVR BCE (with a CVR head), and the outputs. A module
    of its own so that TorchRec's pipeline tracer treats it as a leaf: it looks at which labels a
    batch has."""

    def __init__(self, cvr_weight: float) -> None:
        super().__init__()
        self.cvr_weight = cvr_weight

    def forward(self, ctr_logit: torch.Tensor, cvr_logit: Optional[torch.Tensor],
                labels: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        losses: Dict[str, torch.Tensor] = {}
        outputs: Dict[str, Any] = {"ctr": torch.sigmoid(ctr_logit).detach()}
        if cvr_logit is not None:
            outputs["cvr"] = torch.sigmoid(cvr_logit).detach()
        if "clicked" in labels:
            clicked, converted = labels["clicked"], labels["converted"]
            losses["ctr"] = F.binary_cross_entropy_with_logits(ctr_logit, clicked)
            if cvr_logit is not None:
                # log(pCTR·pCVR) from the logits, stable where both are small.
                log_ctcvr = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
                log_not = torch.log1p(-log_ctcvr.exp().clamp(max=1 - 1e-6))
                losses["ctcvr"] = self.cvr_weight * -(converted * log_ctcvr
                                                      + (1 - converted) * log_not).mean()
            outputs["clicked"] = clicked  # for metrics on the training stream
        loss = sum(losses.values()) if losses else ctr_logit.sum() * 0.0
        outputs["losses"] = {k: v.detach() for k, v in losses.items()}
        return loss, outputs
