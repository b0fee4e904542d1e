"""The training and evaluation loop: every position of every training window in one batched
forward, early stopping on validation NDCG@10, resumable from DIR/state/<dataset>-<model>.pt.

    result = fit(model, split, Settings(...), state_path, trainable=True)

An epoch is one pass over the users with at least one training position (a target after an
input), each user's last max_len + 1 training items as one window (max_len positions), in
batches of `batch_size` users. Batches are length-bucketed: the shuffled users are cut into
chunks of `bucket` batches, sorted by length inside a chunk, split into batches, and the
batches of the epoch shuffled; each batch is cropped to its longest window, so padding costs
little (Beauty: ~8 positions per user against 50). `bucket=0` gives plain shuffled batches of
full max_len windows (same model, same loss; only the batching differs).

Every `eval_every` epochs the model is evaluated on validation (full ranking, metrics.py);
the best state by validation NDCG@10 is kept; after `patience` evaluations without
improvement, or at `epochs`, training stops, the best state is restored and evaluated on test.
At each evaluation the state (model, optimizer, epoch, best validation and its state, the
curve, every RNG) is saved: a rerun continues from the last evaluation and reproduces the
uninterrupted run exactly (same seed, same device and threads).

Throughput: train_examples_per_s = training positions (targets scored) / training time, the
time of the batch loop only (evaluation, checkpoints excluded); s_per_epoch = train_s / epochs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from derl.benchmarks.studies.seqrec import metrics
from derl.benchmarks.studies.seqrec.data import Split
from derl.models.fields import setting

SELECT = "ndcg@10"  # the validation metric of model selection and early stopping


@dataclass
class Settings:
    epochs: int = setting(200, "maximum epochs")
    eval_every: int = setting(5, "epochs between validation evaluations")
    patience: int = setting(10, "evaluations without a better validation NDCG@10 before stopping")
    batch_size: int = setting(128, "users a batch")
    lr: float = setting(1e-3, "Adam's learning rate")
    beta2: float = setting(0.98, "Adam's beta2 (beta1 0.9), as SASRec's code")
    seed: int = setting(0, "seed of the model and the data order")
    threads: int = setting(0, "torch threads (0: every core)")
    device: str = setting("auto", "auto (cuda if present), cpu or cuda")
    eval_batch: int = setting(1024, "users a score matrix")
    bucket: int = setting(32, "batches per length-sorted chunk (0: none)")
    bf16: bool = setting(False, "autocast the forward to bfloat16")
    # the network (sasrec, sasrec-ssm)
    dim: int = setting(64, "width")
    layers: int = setting(2, "transformer blocks")
    heads: int = setting(1, "attention heads")
    dropout: float = setting(0.2, "dropout")
    max_len: int = setting(50, "history items a position sees")
    negatives: int = setting(256, "sasrec-ssm sampled negatives per position")
    sampling: str = setting("uniform", "sasrec-ssm negatives: uniform | popularity (with logQ)")
    # derl (derl_model.py): at most `derl_epochs` of `derl train-upstream`, scored on validation
    # every `derl_eval_every`, stopped after `derl_patience` scores without a better one
    derl_epochs: int = setting(50, "derl: maximum epochs")
    derl_eval_every: int = setting(5, "derl: epochs between validation scores")
    derl_patience: int = setting(2, "derl: scores without a better one before stopping")
    derl_model: str = setting("small", "derl: the presets' small model or the TrainUpstreamConfig defaults",
                              choices=("small", "default"))
    derl_days: int = setting(8, "derl: days the seq-lines import spreads each history over")
    derl_args: str = setting("", "derl: more train-upstream flags, after the model's: \"--seq-len 50 ...\"")


def device_of(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def _autocast(device: torch.device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, stage: str, settings: Settings,
             device: torch.device) -> Dict[str, float]:
    """Full-ranking metrics of `stage` (val or test) over every user."""
    model.eval()
    hist_len = (split.ends[stage] - split.start).clamp(max=settings.max_len)
    order = torch.argsort(hist_len, stable=True)  # similar lengths together: little padding
    targets = split.targets[stage]
    total = dict.fromkeys(metrics.NAMES, 0.0)
    for i in range(0, split.n_users, settings.eval_batch):
        users = order[i:i + settings.eval_batch]
        inputs = split.history(stage, int(hist_len[users].max()), users).to(device)
        with _autocast(device, settings.bf16):
            # A model that keeps its own user state (derl's snapshot vectors) scores by user.
            scores = (model.score_users(users.to(device), stage) if hasattr(model, "score_users")
                      else model.score(inputs))
        rows, items = split.seen(stage, users)
        r = metrics.ranks(scores.float(), targets[users].to(device), rows.to(device), items.to(device),
                          exact_below=max(metrics.CUTOFFS))
        for k, v in metrics.sums(r).items():
            total[k] += v
    return {k: v / split.n_users for k, v in total.items()}


def epoch_batches(users: torch.Tensor, npos: torch.Tensor, batch_size: int, bucket: int,
                  gen: torch.Generator) -> List[torch.Tensor]:
    """One epoch's batches of user ids (every user once), length-bucketed (module doc)."""
    perm = users[torch.randperm(len(users), generator=gen)]
    if not bucket:
        return list(perm.split(batch_size))
    batches = []
    for chunk in perm.split(batch_size * bucket):
        chunk = chunk[torch.argsort(npos[chunk], descending=True, stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _rng_state(gen: torch.Generator, dev_gen: torch.Generator) -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "batches": gen.get_state(), "device": dev_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, object], gen: torch.Generator, dev_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["batches"])
    dev_gen.set_state(state["device"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, state: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fit(model: nn.Module, split: Split, settings: Settings, state_path: Optional[Path] = None,
        trainable: bool = True, desc: str = "", progress: bool = True,
        stop_after_epochs: Optional[int] = None) -> Optional[Dict[str, object]]:
    """Train (if trainable) with early stopping, evaluate the best state; the result dict.

    stop_after_epochs: return None after that many epochs of this call, at an evaluation (as a
    killed run would leave it; for tests).
    """
    torch.set_num_threads(settings.threads or os.cpu_count())
    device = device_of(settings)
    torch.manual_seed(settings.seed)
    model = model.to(device)
    base = {"device": str(device), "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "settings": asdict(settings)}
    if not trainable:
        t0 = time.perf_counter()
        val = evaluate(model, split, "val", settings, device)
        test = evaluate(model, split, "test", settings, device)
        return {**base, "test": test, "val": val, "train_s": 0.0, "train_examples_per_s": None,
                "s_per_epoch": None, "epochs": 0, "best_epoch": 0, "stopped": "not trained",
                "eval_s": round(time.perf_counter() - t0, 2), "curve": [{"epoch": 0, "val_" + SELECT: val[SELECT]}]}

    windows = split.train_windows(settings.max_len).to(device)
    npos = (split.train_len - 1).clamp(min=0, max=settings.max_len)
    users = (npos > 0).nonzero().squeeze(1)
    positions_per_epoch = int(npos.sum())
    # The fused Adam kernel: faster per step than the default on the CPU (docs/seqrec.md).
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, settings.beta2),
                           fused=all(p.is_floating_point() for p in model.parameters()))
    gen = torch.Generator().manual_seed(settings.seed)
    dev_gen = torch.Generator(device=device).manual_seed(settings.seed + 1)

    st = {"epoch": 0, "best": {"value": -1.0, "epoch": 0, "val": None, "state": None}, "bad": 0,
          "curve": [], "train_s": 0.0, "eval_s": 0.0, "stopped": None}
    if state_path is not None and Path(state_path).is_file():
        saved = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        _set_rng_state(saved["rng"], gen, dev_gen)
        st = {k: saved[k] for k in st}
        if progress:
            print(f"{desc}: resuming after epoch {st['epoch']} (best validation {SELECT} "
                  f"{st['best']['value']:.4f} at epoch {st['best']['epoch']})", file=sys.stderr, flush=True)

    def checkpoint() -> None:
        if state_path is not None:
            _save(Path(state_path), {"model": model.state_dict(), "opt": opt.state_dict(),
                                     "rng": _rng_state(gen, dev_gen), **st})

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.epochs, initial=st["epoch"], desc=desc, unit="epoch",
                   file=sys.stderr, mininterval=10, dynamic_ncols=False, ncols=110)
    ran = 0
    while st["stopped"] is None and st["epoch"] < settings.epochs:
        model.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        batches = epoch_batches(users, npos, settings.batch_size, settings.bucket, gen)
        for b in batches:
            T = int(npos[b].max())
            w = windows[b.to(device)][:, -(T + 1):]
            with _autocast(device, settings.bf16):
                loss = model.loss(w[:, :-1], w[:, 1:], b.to(device), dev_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        loss_mean = float(loss_sum) / len(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        st["train_s"] += time.perf_counter() - t0
        st["epoch"] += 1
        ran += 1
        point = {"epoch": st["epoch"], "loss": round(loss_mean, 5), "train_s": round(st["train_s"], 2)}
        if st["epoch"] % settings.eval_every == 0 or st["epoch"] == settings.epochs:
            t1 = time.perf_counter()
            val = evaluate(model, split, "val", settings, device)
            st["eval_s"] += time.perf_counter() - t1
            point["val_" + SELECT] = val[SELECT]
            point["val_hr@10"] = val["hr@10"]
            if val[SELECT] > st["best"]["value"]:
                st["best"] = {"value": val[SELECT], "epoch": st["epoch"], "val": val,
                              "state": copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})}
                st["bad"] = 0
            else:
                st["bad"] += 1
            if st["bad"] >= settings.patience:
                st["stopped"] = f"patience ({settings.patience} evaluations)"
            elif st["epoch"] >= settings.epochs:
                st["stopped"] = "max epochs"
            st["curve"].append(point)
            checkpoint()
            if bar is not None:
                bar.write(f"{desc} epoch {st['epoch']}: loss {loss_mean:.4f}, val {SELECT} "
                          f"{val[SELECT]:.4f} hr@10 {val['hr@10']:.4f} (best {st['best']['value']:.4f} "
                          f"at {st['best']['epoch']}), {st['train_s'] / st['epoch']:.2f} s/epoch")
            if stop_after_epochs is not None and ran >= stop_after_epochs:
                if bar is not None:
                    bar.close()
                return None
        else:
            st["curve"].append(point)
        if bar is not None:
            best = f"{st['best']['value']:.4f}" if st["best"]["epoch"] else "-"
            bar.set_postfix_str(f"loss {loss_mean:.4f} best val {SELECT} {best}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()

    model.load_state_dict(st["best"]["state"])
    t1 = time.perf_counter()
    test = evaluate(model, split, "test", settings, device)
    st["eval_s"] += time.perf_counter() - t1
    epochs = st["epoch"]
    return {**base, "test": test, "val": st["best"]["val"], "train_s": round(st["train_s"], 2),
            "train_examples_per_s": round(positions_per_epoch * epochs / st["train_s"], 1),
            "s_per_epoch": round(st["train_s"] / epochs, 3), "epochs": epochs,
            "best_epoch": st["best"]["epoch"], "stopped": st["stopped"], "eval_s": round(st["eval_s"], 2),
            "positions_per_epoch": positions_per_epoch, "curve": st["curve"]}
