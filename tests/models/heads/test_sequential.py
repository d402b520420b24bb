"""Sequential head (SASRec over LM item embeddings); the ID-only SASRec baseline is tested in
tests/baselines/test_sasrec.py."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from recsys_lm.build import build_module, load_model
from recsys_lm.data.datasets.sequences import IGNORE, SequenceSet, left_pad, spans, windows
from recsys_lm.data.settings import data_settings
from recsys_lm.data.split import Split
from recsys_lm.errors import ConfigError
from recsys_lm.metrics import RankingMetrics
from recsys_lm.models.heads.sequential import CausalEncoder, SequentialHead
from recsys_lm.train import train
from tests.conftest import TINY, assert_ranking_metrics, fresh_datamodule

CACHED = ["peft=none", "freeze=head_only", "head.net.item_embeddings=cached"]


def test_windows_cover_every_transition_once():
    seq = list(range(12))
    chunks = windows(seq, max_len=4)
    pairs = {(a, b) for w in chunks for a, b in zip(w[:-1], w[1:], strict=True)}
    assert pairs == {(i, i + 1) for i in range(11)}
    assert all(len(w) <= 5 for w in chunks)
    assert windows([3], 4) == []


@pytest.mark.parametrize("stride", [None, 1, 2, 4])
def test_strided_windows_train_every_transition_once_with_its_context(stride):
    seq, max_len = list(range(12)), 4
    trained = []  # (target position, items before it inside its window)
    for start, end, n in spans(len(seq), max_len, stride):
        assert end - start <= max_len + 1
        trained += [(t, t - start) for t in range(end - n, end)]
    assert sorted(t for t, _ in trained) == list(range(1, 12))  # each transition, once
    context = dict(trained)
    if stride == 1:  # one sample per prefix: every target sees min(t, max_len) items
        assert all(context[t] == min(t, max_len) for t in context)
    if stride is None:  # not overlapping: the old cut, early targets of a window see little
        assert windows(seq, max_len) == [[7, 8, 9, 10, 11], [3, 4, 5, 6, 7], [0, 1, 2, 3]]
        assert context[4] == 1


def test_spans_refuse_a_stride_outside_the_window():
    with pytest.raises(ValueError, match="window stride 5"):
        spans(10, 4, 5)


def test_strided_batch_ignores_targets_a_later_window_trains():
    split = Split(train=[[1, 2, 3, 4, 5, 6]], val=[[]], test=[[]])
    data = SequenceSet(split, max_len=3, stride=1)
    assert data.rows == [[3, 4, 5, 6], [2, 3, 4, 5], [1, 2, 3, 4]]
    batch = data.collate([data[0], data[2]])
    assert batch.items.tolist() == [[3, 4, 5], [1, 2, 3]]
    assert batch.targets.tolist() == [[IGNORE, IGNORE, 6], [2, 3, 4]]  # the first window: all


def test_window_stride_is_checked_against_the_sequence_length():
    with pytest.raises(ConfigError, match=r"data.window_stride.*1..data.max_sequence_length \(8\)"):
        data_settings(OmegaConf.create({"max_sequence_length": 8, "window_stride": 9}))
    assert data_settings(OmegaConf.create({"window_stride": 1})).window_stride == 1


def test_left_pad_keeps_the_latest_item_last():
    items, mask = left_pad([[1, 2, 3], [7]])
    assert items.tolist() == [[1, 2, 3], [0, 0, 7]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_sequence_batch_targets_are_the_next_items():
    split = Split(train=[[5, 6, 7], [1, 2]], val=[[], []], test=[[], []])
    data = SequenceSet(split, max_len=4)
    batch = data.collate([data[0], data[1]])
    assert batch.items.tolist() == [[5, 6], [0, 1]]
    assert batch.targets.tolist() == [[6, 7], [IGNORE, 2]]
    assert batch.unique.tolist() == [1, 2, 5, 6, 7]


def test_encoder_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    encoder = CausalEncoder(dim=8, max_len=6, num_layers=2, num_heads=2, dropout=0.0).eval()
    x = torch.randn(1, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = encoder(x, mask)
    changed = x.clone()
    changed[0, 3] += 5.0  # the future must not change earlier positions
    assert torch.allclose(encoder(changed, mask)[0, :3], out[0, :3], atol=1e-5)
    # The same history left-padded with junk gives the same last state.
    padded = torch.cat([torch.randn(1, 2, 8), x], dim=1)
    pad_mask = torch.tensor([[False, False, True, True, True, True]])
    assert torch.allclose(encoder(padded, pad_mask)[0, -1], out[0, -1], atol=1e-5)


def test_head_needs_some_item_vector():
    with pytest.raises(ConfigError, match="head.net.text"):
        SequentialHead(16, text=False, id_embedding=False)


def test_cached_embeddings_refuse_a_trainable_backbone(config):
    with pytest.raises(ConfigError, match="freeze=head_only"):
        build_module(config(["head=sequential", "head.net.item_embeddings=cached"]))


@pytest.mark.parametrize(
    ("backbone", "overrides"),
    [
        ("tiny_bert", ["peft=lora"]),  # trained: LoRA adapts the item encoder
        ("tiny_gpt2", ["peft=lora"]),
        ("tiny_bert", CACHED),
        ("tiny_bert", [*CACHED, "head.net.id_embedding=true", "head.net.negatives=16"]),
        ("tiny_gpt2", [*CACHED, "head.net.id_embedding=true"]),
    ],
)
def test_trains_evaluates_and_reloads(config, tmp_path, backbone, overrides):
    cfg = config([f"backbone={backbone}", "head=sequential", "optim.lr=1e-2", *overrides])
    result = train(cfg)
    assert set(result["test"]) == {"ndcg@10", "hr@10", "mrr", "mrr@10"}
    assert result["protocol"]["task"] == "sequential"
    assert result["protocol"]["exclude_seen"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"] == result["test"]

    assert_ranking_metrics(result["test"], k=10)

    reloaded = load_model(tmp_path / "model")
    datamodule = fresh_datamodule(cfg, reloaded)
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        # The exported head carries its item table: no backbone pass is needed to serve.
        if "head.net.item_embeddings=cached" in overrides:
            reloaded.head.on_eval_start(None, [])
        else:  # trained mode re-embeds item texts with the fine-tuned backbone
            reloaded.head.on_eval_start(reloaded.backbone, datamodule.item_dataloader())
        served = reloaded.head.score_catalogue(None, batch)
    assert served.shape == (len(batch.items), datamodule.data.num_items)
    assert torch.isfinite(served).all()
    # Re-evaluating the reloaded model reproduces the run's test metrics.
    metrics = RankingMetrics(10)
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            reloaded.head.evaluate(None, batch, metrics)
    again = metrics.compute()
    assert again["ndcg@10"] == pytest.approx(result["test"]["ndcg@10"], abs=1e-5)


def test_recommend_returns_unseen_top_k_from_the_saved_table_alone(config, tmp_path):
    train(config(["head=sequential", *CACHED, "head.net.id_embedding=true", "baselines=[]"]))
    head = load_model(tmp_path / "model").head  # no data attached, no backbone pass
    top = head.recommend(None, [1, 2, 3], k=5, exclude=[4])
    assert len(top.items) == 5 and not {1, 2, 3, 4} & set(top.items)
    assert top.scores == sorted(top.scores, reverse=True)
    again = head.score(None, [1, 2, 3], top.items)
    assert torch.allclose(again, torch.tensor(top.scores), atol=1e-5)


def test_an_item_unseen_in_training_is_its_text_alone(config, tmp_path):
    """Cold-start split: the held-out items never train, so their ID vectors (only ever
    pushed down by the softmax) are left out; the trained items keep theirs; the flag
    travels with the saved model."""
    cfg = config(
        ["head=sequential", *CACHED, "head.net.id_embedding=true", "data.split.method=cold_start",
         "baselines=[]", "optim.lr=1e-2"]
    )  # fmt: skip
    train(cfg)
    module = load_model(tmp_path / "model")
    data = fresh_datamodule(cfg, module).data
    head = module.head
    cold = sorted(data.split.cold_items)
    known = torch.as_tensor(data.item_counts > 0)
    assert cold and not known[cold].any() and head.id_known.tolist() == known.tolist()
    with torch.no_grad():
        vectors = head.table()
        text_only = head.project(head.text_table)
    assert torch.allclose(vectors[cold], text_only[cold])
    warm = torch.nonzero(known).squeeze(1)
    assert not torch.allclose(vectors[warm], text_only[warm])  # ID vectors still count there


def test_a_warm_start_keeps_the_loaded_text_table(config, tmp_path):
    """Refresh's warm start: the frozen backbone would embed the same texts again, so the
    loaded table is kept at fit start (a fresh head still embeds them)."""
    from recsys_lm.build import warm_start

    cfg = config(["head=sequential", *CACHED, "head.net.id_embedding=true", "baselines=[]"])
    train(cfg)
    saved = load_model(tmp_path / "model").head.text_table
    fresh = build_module(cfg)
    fresh.attach(fresh_datamodule(cfg, fresh).data)
    assert not fresh.head._table_loaded
    warm = build_module(cfg)
    warm.attach(fresh_datamodule(cfg, warm).data)
    warm_start(warm, tmp_path / "model")

    def refuse(*args):
        raise AssertionError("the table was embedded again")

    warm.head.embed_texts = refuse
    warm.head.on_fit_start(warm.backbone, [])
    assert torch.equal(warm.head.text_table, saved)


@pytest.mark.real_data
@pytest.mark.parametrize("split", ["leave_one_out", "cold_start"])
def test_sequential_head_on_movielens_100k(config, ml100k_root, tmp_path, split):
    """A few steps of the sequential head on MovieLens-100K (full ranking of 1,682 movies), and
    on the cold-start split ranked among cold movies only."""
    overrides = [
        *TINY,
        "head=sequential",
        *CACHED,
        "data=movielens_100k",
        f"data.root={ml100k_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "baselines=[popularity]",
        "export_model=false",
    ]
    if split == "cold_start":
        overrides += ["data.split.method=cold_start", "data.eval_items=cold"]
    result = train(config(overrides, fast=False))
    protocol = result["protocol"]
    assert protocol["items"] == 1682 and protocol["eval_mode"] == "full"
    assert protocol["ranked_items"] == ("cold items only" if split == "cold_start" else "all")
    # Cold-start users hold out several items each; leave-one-out, one.
    single = split == "leave_one_out"
    assert_ranking_metrics(result["test"], k=10, one_relevant=single)
    assert_ranking_metrics(result["baselines"]["popularity"]["test"], k=10, one_relevant=single)


def _head_with_ids(**options) -> SequentialHead:
    head = SequentialHead(4, dim=8, num_layers=1, text=True, id_embedding=True, **options)
    head.resize("ids.weight", (50, 8), lambda t: torch.nn.init.normal_(t))
    head.resize("id_known", (50,), lambda t: t.fill_(True))
    return head


def test_id_dropout_scores_some_items_by_text_alone_in_training_only():
    torch.manual_seed(0)
    head = _head_with_ids(id_dropout=0.5)
    text, index = torch.zeros(50, 4), torch.arange(50)
    text_only = head.project(text)
    dropped = (head.vectors_of(text, index) - text_only).abs().sum(-1) == 0
    assert 10 < int(dropped.sum()) < 40  # about half the items lost their ID vector
    head.eval()
    assert not ((head.vectors_of(text, index) - text_only).abs().sum(-1) == 0).any()


def test_id_dropout_needs_a_probability():
    with pytest.raises(ConfigError, match="head.net.id_dropout"):
        SequentialHead(4, id_embedding=True, id_dropout=1.0)
    with pytest.raises(ConfigError, match="head.net.id_dropout"):  # no ID vector to drop
        SequentialHead(4, id_embedding=False, id_dropout=0.3)


def test_logq_is_refused_where_no_in_batch_softmax_runs():
    with pytest.raises(ConfigError, match="head.net.logq"):
        SequentialHead(4, item_embeddings="cached", logq=True)


def test_logq_subtracts_the_log_frequency_from_the_logits():
    states, table = torch.randn(3, 2, 8), torch.randn(5, 8)
    targets = torch.tensor([[1, 2], [IGNORE, 4], [0, 3]])
    correction = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]))
    plain = SequentialHead._softmax(states, targets, table)
    corrected = SequentialHead._softmax(states, targets, table, correction)
    keep = targets != IGNORE
    logits = states[keep] @ table.T - correction
    assert corrected == pytest.approx(torch.nn.functional.cross_entropy(logits, targets[keep]))
    assert corrected != pytest.approx(plain)


def test_trained_item_side_with_logq_and_id_dropout_trains(config):
    cfg = config(
        [
            "head=sequential",
            "peft=lora",
            "head.net.id_embedding=true",
            "head.net.id_dropout=0.3",
            "head.net.logq=true",
            "baselines=[]",
        ]
    )
    result = train(cfg)
    assert_ranking_metrics(result["test"], k=10)
