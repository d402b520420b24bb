"""Sequential head (SASRec over LM item embeddings) and the ID-only SASRec baseline."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from recsys_lm.baselines import evaluate_scores
from recsys_lm.data.sequences import IGNORE, SequenceSet, left_pad, windows
from recsys_lm.data.split import Split
from recsys_lm.errors import ConfigError
from recsys_lm.models.export import load_model
from recsys_lm.models.heads.sequential import CausalEncoder, SequentialHead
from recsys_lm.models.id_sasrec import IDSASRec
from recsys_lm.train import train
from tests.conftest import TINY, fresh_datamodule

CACHED = ["peft=none", "freeze=head_only", "head.net.item_embeddings=cached"]


def test_windows_cover_every_transition_once():
    seq = list(range(12))
    chunks = windows(seq, max_len=4)
    pairs = {(a, b) for w in chunks for a, b in zip(w[:-1], w[1:], strict=True)}
    assert pairs == {(i, i + 1) for i in range(11)}
    assert all(len(w) <= 5 for w in chunks)
    assert windows([3], 4) == []


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
        train(config(["head=sequential", "head.net.item_embeddings=cached"]))


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

    reloaded = load_model(tmp_path / "model")
    datamodule = fresh_datamodule(cfg, reloaded)
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        # The exported head carries its item table: no backbone pass is needed to serve.
        if "head.net.item_embeddings=cached" in overrides:
            reloaded.head.index_catalogue(None, [])
        else:  # trained mode re-embeds item texts with the fine-tuned backbone
            reloaded.head.index_catalogue(reloaded.backbone, datamodule.item_dataloader())
        served = reloaded.head.score_catalogue(None, batch)
    assert served.shape == (len(batch.items), datamodule.num_items)
    assert torch.isfinite(served).all()
    # Re-evaluating the reloaded model reproduces the run's test metrics.
    from recsys_lm.metrics import RankingMetrics

    metrics = RankingMetrics(10)
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            reloaded.head.evaluate(None, batch, metrics)
    again = metrics.compute()
    assert again["ndcg@10"] == pytest.approx(result["test"]["ndcg@10"], abs=1e-5)


def test_recommend_returns_unseen_top_k(config, tmp_path):
    train(config(["head=sequential", *CACHED, "head.net.id_embedding=true"]))
    head = load_model(tmp_path / "model").head
    head.index_catalogue(None, [])
    items, scores = head.recommend([1, 2, 3], k=5)
    assert len(items) == 5 and not {1, 2, 3} & set(items)
    assert scores == sorted(scores, reverse=True)


def test_id_sasrec_learns_a_sequential_habit(config):
    """On data where the next item usually follows the previous one, ID-SASRec must beat
    popularity by a wide margin: it is a real model, not a placeholder."""
    cfg = config(["head=sequential", "data.source.num_users=120"])
    from recsys_lm.models.backbone import build_tiny_bert

    datamodule = instantiate(
        cfg.data, tokenizer=build_tiny_bert().tokenizer, task="sequential", max_length=128
    )
    datamodule.setup()
    n = datamodule.num_items
    chain = [[(start + t) % n for t in range(12)] for start in range(0, 240, 2)]
    datamodule.split = Split(
        train=[c[:-2] for c in chain], val=[[c[-2]] for c in chain], test=[[c[-1]] for c in chain]
    )
    datamodule.datasets = {s: datamodule._dataset(s) for s in ("train", "val", "test")}
    model = IDSASRec(datamodule, dim=32, max_epochs=60, eval_every=20, lr=5e-3, device="cpu")
    sasrec = evaluate_scores(datamodule, "test", model)
    assert model.history and sasrec["hr@10"] > 0.8


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
    assert 0.0 <= result["test"]["ndcg@10"] <= 1.0
