"""The sequential-recommendation benchmark (derl.benchmarks.studies.seqrec): the split, the metrics, the
reference models and the resumable loop, on small files written here (and Beauty's first users)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
from pathlib import Path

import pytest
import torch

from derl.benchmarks.studies.seqrec import metrics
from derl.benchmarks.studies.seqrec.data import Split, detect_format, load
from derl.benchmarks.studies.seqrec.models import MODELS, Popularity, SASRec
from derl.benchmarks.studies.seqrec.train import Settings, evaluate, fit

DATA = Path(__file__).parents[1].parent / "shared" / "data"
BEAUTY = DATA / "amazon-seq" / "Beauty.txt"
CPU = torch.device("cpu")


def _write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- data -------------------------------------------------------------------------------------


def test_the_split_holds_out_the_last_two_items_and_test_history_includes_validation(tmp_path):
    long = list(range(1, 61))  # 60 items: histories capped at the last 50
    f = _write(tmp_path / "seq.txt", ["u1 5 6 7 8", "u2 9 10 11", "u3 " + " ".join(map(str, long)), "u4 1 2"])
    split = Split(load(f))
    assert split.n_users == 3 and split.n_items == 60 and split.seqs.dropped_users == 1  # u4: 2 items
    assert split.targets["test"].tolist() == [8, 11, 60]
    assert split.targets["val"].tolist() == [7, 10, 59]
    assert split.history("val", 4).tolist()[:2] == [[0, 0, 5, 6], [0, 0, 0, 9]]
    assert split.history("test", 4).tolist()[:2] == [[0, 5, 6, 7], [0, 0, 9, 10]]
    assert split.history("test", 50)[2].tolist() == list(range(10, 60))  # the last 50 before 60
    assert split.history("val", 50)[2].tolist() == list(range(9, 59))
    # Training windows: the training items only (not validation, not test).
    w = split.train_windows(3)
    assert w[:2].tolist() == [[0, 0, 5, 6], [0, 0, 0, 9]]
    assert w[2].tolist() == [55, 56, 57, 58]
    # The ranking removes the whole history, not only the last 50.
    rows, items = split.seen("test", torch.tensor([2, 0]))
    assert items[rows == 0].tolist() == list(range(1, 60)) and items[rows == 1].tolist() == [5, 6, 7]
    rows, items = split.seen("val", torch.tensor([0]))
    assert items.tolist() == [5, 6]
    assert split.train_counts().tolist()[5:8] == [2, 2, 1]  # u1 trains on 5, 6 (7 is its validation), u3 on 1..58
    assert split.train_counts()[59:].tolist() == [0, 0]


def test_interaction_files_are_ordered_by_time_ties_by_file_order(tmp_path):
    recbole = _write(tmp_path / "x.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float",
                                            "a\t30\t3\t100", "b\t10\t3\t5", "a\t20\t3\t50", "a\t10\t3\t100",
                                            "b\t30\t3\t1", "b\t20\t3\t9", "a\t40\t3\t10"])
    udata = _write(tmp_path / "u.data", ["1\t3\t4\t100", "2\t1\t4\t5", "1\t2\t4\t50", "1\t1\t4\t100",
                                         "2\t3\t4\t1", "2\t2\t4\t9", "1\t4\t4\t10"])
    ml1m = _write(tmp_path / "ratings.dat", ["1::3::4::100", "2::1::4::5", "1::2::4::50", "1::1::4::100",
                                             "2::3::4::1", "2::2::4::9", "1::4::4::10"])
    assert [detect_format(p) for p in (recbole, udata, ml1m)] == ["recbole", "ml-100k", "ml-1m"]
    assert detect_format(_write(tmp_path / "s.txt", ["1 1 2 3 4", "2 5 6 7"])) == "seq-lines"
    # Sparse ids (10, 20, 30, 40) are remapped by first appearance: 30->1, 10->2, 20->3, 40->4.
    assert load(recbole).to_lists() == [[4, 3, 1, 2], [1, 2, 3]]
    for p in (udata, ml1m):  # dense ids kept
        assert load(p).to_lists() == [[4, 2, 3, 1], [3, 1, 2]]


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_on_hand_made_scores():
    # 4 users, items 1..6 (column 0 is padding, never ranked).
    scores = torch.tensor([
        [9.0, 0.1, 0.9, 0.5, 0.3, 0.2, 0.4],  # target 2: best -> rank 0
        [9.0, 0.6, 0.1, 0.5, 0.4, 0.3, 0.2],  # target 2: worst -> rank 5
        [0.0, 0.5, 0.5, 0.5, 0.9, 0.1, 0.2],  # target 3, tied with 1 and 2 (smaller ids first) -> 1 + 2
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 1 -> rank 5
    ])
    targets = torch.tensor([2, 2, 3, 1])
    r = metrics.ranks(scores.clone(), targets)
    assert r.tolist() == [0, 5, 3, 5]
    m = metrics.from_ranks(r, ks=(1, 5, 10))
    assert m["hr@1"] == 0.25 and m["hr@5"] == 0.5 and m["hr@10"] == 1.0
    assert m["ndcg@1"] == pytest.approx(0.25)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7) + 1 / math.log2(5) + 1 / math.log2(7)) / 4)
    # exact_below: ranks below the bound unchanged, the rest at least the bound.
    r2 = metrics.ranks(scores.clone(), targets, exact_below=2)
    assert r2[0] == 0 and (r2[1:] >= 2).all()
    assert list(metrics.from_ranks(r)) == list(metrics.NAMES)


def test_earlier_items_are_removed_from_the_ranking_but_never_the_target(tmp_path):
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.1], [0.0, 0.9, 0.8, 0.7, 0.1]])
    targets = torch.tensor([3, 1])
    assert metrics.ranks(scores.clone(), targets).tolist() == [2, 0]
    rows, items = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 1])  # user 1's target is in its history
    assert metrics.ranks(scores.clone(), targets, rows, items).tolist() == [0, 0]
    # Through the split: u's history (1..4) holds the most popular items, and does not count;
    # v's history is 6, 7 (removed), its target 8 ranks after 1..5.
    split = Split(load(_write(tmp_path / "two.txt", ["u 1 2 3 4 5", "v 6 7 8"])))
    model = Popularity(torch.tensor([0, 9, 8, 7, 6, 2, 1, 1, 1]))
    m = evaluate(model, split, "test", Settings(), CPU)
    assert m["hr@5"] == 0.5 and m["hr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / 2)


def test_popularity_counts_training_interactions_only(tmp_path):
    # Item 9 is every user's test target and item 8 their validation target: never training.
    lines = [f"u{u} {1 + u % 3} {4 + u % 2} 8 9" for u in range(6)]
    split = Split(load(_write(tmp_path / "toy.txt", lines)))
    counts = split.train_counts()
    assert counts[8] == 0 and counts[9] == 0 and counts[1:4].tolist() == [2, 2, 2] and counts[4:6].tolist() == [3, 3]
    model = MODELS["popularity"].build(split, Settings())
    s = model.score(torch.zeros(2, 3, dtype=torch.long))
    assert s.shape == (2, split.n_items + 1) and torch.argmax(s[0, 1:]).item() + 1 == 4
    result = fit(model, split, Settings(), trainable=False, progress=False)
    # Target 9 (count 0) after the 3 counted candidates and the tied 6, 7 (smaller ids): rank 5.
    assert result["test"]["hr@5"] == 0.0 and result["test"]["ndcg@10"] == pytest.approx(1 / math.log2(7))
    assert set(result["test"]) == set(metrics.NAMES) and result["epochs"] == 0


# -- SASRec -------------------------------------------------------------------------------------


def _successor_split(tmp_path, users=300, items=40, length=12) -> Split:
    """Item i is always followed by i + 1 (wrapping): a task popularity cannot solve."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(1, items + 1, (users,), generator=g).tolist()
    lines = [f"u{u} " + " ".join(str((s - 1 + k) % items + 1) for k in range(length)) for u, s in enumerate(starts)]
    return Split(load(_write(tmp_path / "succ.txt", lines)))


SMALL = dict(dim=16, layers=1, heads=1, dropout=0.0, max_len=10, batch_size=64, eval_batch=256, threads=1)


def test_sasrec_learns_the_successor_task_and_beats_popularity(tmp_path):
    split = _successor_split(tmp_path)
    for loss in ("bce", "ssm"):
        torch.manual_seed(0)
        s = Settings(epochs=8, eval_every=4, lr=5e-3, negatives=16, **SMALL)
        model = MODELS["sasrec" if loss == "bce" else "sasrec-ssm"].build(split, s)
        assert isinstance(model, SASRec) and model.loss_kind == loss
        w = split.train_windows(s.max_len)
        users = torch.arange(split.n_users)
        gen = torch.Generator().manual_seed(0)
        before = float(model.loss(w[:, :-1], w[:, 1:], users, gen).detach())
        result = fit(model, split, s, progress=False)
        after = float(model.train().loss(w[:, :-1], w[:, 1:], users, gen).detach())
        assert after < before * 0.8, (loss, before, after)
        pop = fit(MODELS["popularity"].build(split, s), split, s, trainable=False, progress=False)
        assert result["test"]["hr@10"] > 0.9 > pop["test"]["hr@10"] + 0.3, (loss, result["test"], pop["test"])
        assert result["train_examples_per_s"] > 0 and result["best_epoch"] in (4, 8)


def test_sampled_softmax_draws_its_own_negatives_for_every_position():
    """The loss as RecTools' SASRec+SS computes it: each position's positive against
    `negatives` items drawn for that position alone, a draw equal to the positive left out."""
    torch.manual_seed(0)
    model = SASRec(30, dim=8, layers=1, dropout=0.0, max_len=6, loss="ssm", negatives=5,
                   scale_inputs=False, item_dropout=0.1).eval()
    inputs = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    targets = torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 6]])
    loss = model.loss(inputs, targets, torch.tensor([0, 1]), torch.Generator().manual_seed(7))
    m = targets != 0
    h, pos = model.encode(inputs)[m], targets[m]
    neg = torch.randint(1, 31, (len(pos), 5), generator=torch.Generator().manual_seed(7))
    assert len(set(map(tuple, neg.tolist()))) == len(pos)  # a draw per position, not one shared
    neg_logit = torch.einsum("pd,pkd->pk", h, model.item(neg)).masked_fill(neg == pos[:, None], float("-inf"))
    logits = torch.cat([(h * model.item(pos)).sum(-1, keepdim=True), neg_logit], 1)
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert MODELS["sasrec-ssm"].defaults == {"dim": 256, "layers": 1, "eval_every": 1, "patience": 50}


def test_bce_negatives_avoid_the_users_training_items(tmp_path):
    from derl.benchmarks.studies.seqrec.models import sample_unseen, seen_keys

    split = Split(load(_write(tmp_path / "t.txt", ["a 1 2 3 4 5 6 7", "b 7 6 5 4"])))  # a trains on 1..5
    neg = sample_unseen(seen_keys(split), split.n_items, torch.zeros(2000, dtype=torch.long),
                        torch.Generator().manual_seed(0))
    assert set(neg.tolist()) == {6, 7}


def test_padding_does_not_change_the_output():
    torch.manual_seed(0)
    m = SASRec(20, dim=16, layers=2, max_len=8).eval()
    padded, bare = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5]]), torch.tensor([[3, 4, 5]])
    assert torch.allclose(m.score(padded), m.score(bare), atol=1e-5)
    # Causal: a later item does not change the earlier positions' outputs.
    assert torch.allclose(m.encode(torch.tensor([[0, 3, 4, 5, 6]]))[:, :4],
                          m.encode(torch.tensor([[0, 3, 4, 5, 9]]))[:, :4], atol=1e-5)


def test_a_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    split = _successor_split(tmp_path, users=120, items=30, length=8)
    s = Settings(epochs=4, eval_every=1, patience=10, seed=3, **{**SMALL, "dropout": 0.2})

    def build():
        torch.manual_seed(11)
        return MODELS["sasrec"].build(split, s)

    whole = fit(build(), split, s, tmp_path / "whole.pt", progress=False)
    assert fit(build(), split, s, tmp_path / "cut.pt", progress=False, stop_after_epochs=2) is None
    saved = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert saved["epoch"] == 2 and len(saved["curve"]) == 2
    resumed = fit(build(), split, s, tmp_path / "cut.pt", progress=False)
    assert resumed["test"] == whole["test"] and resumed["val"] == whole["val"]
    assert [c["loss"] for c in resumed["curve"]] == [c["loss"] for c in whole["curve"]]
    assert resumed["epochs"] == 4 and resumed["best_epoch"] == whole["best_epoch"]


# -- the suite ----------------------------------------------------------------------------------


def test_derl_bench_suite_seqrec_writes_its_results_and_skips_finished_runs(tmp_path):
    from derl.benchmarks import bench

    data = _successor_split(tmp_path, users=60, items=20, length=6)
    assert data.n_users == 60
    out = tmp_path / "out"
    argv = ["--suite", "seqrec", "--out", str(out), "--dataset", f"toy={tmp_path / 'succ.txt'}",
            "--models", "popularity,sasrec", "--epochs", "2", "--eval-every", "1", "--dim", "8",
            "--layers", "1", "--max-len", "5", "--threads", "1"]
    result = bench.run(argv)
    assert not result["errors"]
    entry = result["seqrec"]["toy"]["sasrec"]
    for k in (*metrics.NAMES, "val", "train_s", "train_examples_per_s", "epochs", "best_epoch"):
        assert k in entry
    assert set(entry["val"]) == set(metrics.NAMES) and entry["epochs"] == 2
    assert json.loads((out / "bench.json").read_text())["seqrec"]["toy"]["popularity"]["epochs"] == 0
    assert (out / "bench.md").is_file() and (out / "seqrec.png").is_file()
    assert (out / "state" / "toy-sasrec.pt").is_file() and (out / "results" / "toy-sasrec.json").is_file()
    # Each row names the command that reproduces it: parsed back, it gives the row's settings.
    from derl.benchmarks.studies.seqrec.suite import settings_for

    command = entry["command"]
    assert command in (out / "bench.md").read_text()
    args = _parse_bench_command(command)
    assert args.out == out and args.dataset == [f"toy={tmp_path / 'succ.txt'}"] and args.models == "sasrec"
    recorded = json.loads((out / "results" / "toy-sasrec.json").read_text())["settings"]
    assert dataclasses.asdict(settings_for("sasrec", args)) == recorded
    before = (out / "results" / "toy-sasrec.json").read_text()
    again = bench.run(argv)  # finished: skipped, results kept
    assert (out / "results" / "toy-sasrec.json").read_text() == before
    assert again["seqrec"]["toy"]["sasrec"] == entry


def _parse_bench_command(command: str) -> argparse.Namespace:
    """`derl bench ...` as the suite's own parser reads it."""
    from derl.benchmarks.studies.seqrec.suite import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(shlex.split(command)[2:])


def test_a_rows_command_carries_flag_like_values_and_switches_back_to_its_settings(tmp_path):
    from derl.benchmarks.studies.seqrec.suite import DATASETS, row_command, settings_for

    settings = dataclasses.replace(Settings(**MODELS["derl"].defaults), derl_args="--seq-len 50 --seed 3",
                                   bf16=True, threads=1)
    result = {"dataset": "beauty", "path": str(DATASETS["beauty"]), "model": "derl",
              "settings": dataclasses.asdict(settings)}
    command = row_command(tmp_path / "my out", result)
    assert "--dataset beauty " in command  # a known data set by name, not by path
    args = _parse_bench_command(command)
    assert args.out == tmp_path / "my out" and dataclasses.asdict(settings_for("derl", args)) == result["settings"]


def test_too_few_derl_days_fail_that_run_naming_the_flag(tmp_path):
    from derl.benchmarks.studies.seqrec.suite import run

    _successor_split(tmp_path, users=20, items=10, length=5)
    result = run(["--out", str(tmp_path / "out"), "--dataset", f"toy={tmp_path / 'succ.txt'}",
                  "--models", "derl", "--derl-days", "3"])
    assert "--derl-days must be at least 4" in result["errors"]["toy/derl"]
    assert not (tmp_path / "out" / "results" / "toy-derl.json").exists()


@pytest.mark.skipif(not BEAUTY.is_file(), reason="needs ../shared/data/amazon-seq/Beauty.txt")
def test_beautys_first_users_split_as_the_file_says(tmp_path):
    from derl.benchmarks.studies.seqrec.suite import DATASETS

    assert DATASETS["beauty"] == BEAUTY.resolve()  # --dataset beauty finds ../shared/data
    with open(BEAUTY) as f:
        lines = [next(f).strip() for _ in range(300)]
    split = Split(load(_write(tmp_path / "beauty300.txt", lines)))
    assert split.n_users == 300
    for u in (0, 137, 299):
        items = [int(x) for x in lines[u].split()[1:]]
        assert split.targets["test"][u] == items[-1] and split.targets["val"][u] == items[-2]
        assert split.history("test", 50)[u][-min(50, len(items) - 1):].tolist() == items[:-1][-50:]
    assert int(split.train_len.sum()) == sum(len(line.split()) - 3 for line in lines)


@pytest.mark.slow
def test_derl_upstream_runs_in_the_suite_through_the_derl_commands(tmp_path):
    """`derl` in the seqrec suite: import, train-upstream in chunks, two exports a chunk, scored
    like the others, the chunk best on validation reported; a rerun resumes after the last chunk."""
    from derl.benchmarks.studies.seqrec.suite import run
    from derl.datapipes.sources import SourceTables

    lines = (DATA / "amazon-seq" / "Beauty.txt").read_text().splitlines()[:300]
    (tmp_path / "b300.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["--out", str(out), "--dataset", f"b300={tmp_path / 'b300.txt'}", "--models", "derl",
            "--derl-eval-every", "1", "--derl-patience", "5", "--derl-days", "6"]
    run([*args, "--derl-epochs", "1"])
    work = out / "state" / "b300-derl-work"
    assert SourceTables(work / "world").days("engagements") == [f"2000-01-0{d}" for d in range(1, 7)]
    first = json.loads((work / "progress.json").read_text())["points"]
    assert [p["epoch"] for p in first] == [1]
    # As a run killed after its first chunk: the rerun (its result removed) trains only the second.
    (out / "results" / "b300-derl.json").unlink()
    run([*args, "--derl-epochs", "2"])
    result = json.loads((out / "results" / "b300-derl.json").read_text())
    points = json.loads((work / "progress.json").read_text())["points"]
    assert points[0] == first[0] and [p["epoch"] for p in points] == [1, 2]
    steps = sorted(int(p.name.split("-")[1]) for p in (work / "upstream" / "checkpoints").glob("step-*"))
    assert steps[-1] == 2 * steps[0]  # resumed: one run of two epochs, not two runs of one
    best = max(points, key=lambda p: p["val"]["ndcg@10"])
    assert result["best_epoch"] == best["epoch"] and result["test"] == best["test"]
    assert [c["epoch"] for c in result["curve"]] == [1, 2] and result["epochs"] == 2
    for stage in ("val", "test"):
        assert all(0.0 <= v <= 1.0 for v in result[stage].values())
        assert result[stage]["hr@20"] >= result[stage]["hr@10"] >= result[stage]["hr@5"]
    assert result["train_s"] > 0 and result["train_examples_per_s"] > 0
    assert json.loads((work / "world" / "_world.json").read_text())["format"] == "seq-lines"
    assert json.loads((out / "bench.json").read_text())["seqrec"]["b300"]["derl"]["hr@10"] == result["test"]["hr@10"]
