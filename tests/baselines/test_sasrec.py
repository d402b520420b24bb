"""ID-SASRec: trained by a Lightning Trainer, early-stopped on the task's validation metric,
restored to its best weights, seeded."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recsys_lm.baselines import BASELINES, evaluate_scores
from recsys_lm.baselines.sasrec import SASRecOptions, fit
from recsys_lm.data.split import Split
from recsys_lm.errors import ConfigError

# Small and fast: one step an epoch on the 40-user sample (about 40 training windows).
TINY = {"dim": 16, "num_heads": 1, "num_layers": 1, "batch_size": 64, "max_len": 20}


def options(**kw) -> SASRecOptions:
    return SASRecOptions(**{**TINY, "accelerator": "cpu", **kw})


def test_it_early_stops_and_restores_the_best_validation_weights(prepared):
    data = prepared("sequential")
    model = fit(
        data, options(lr=3e-2, batch_size=32, max_epochs=40, eval_every=1, seed=1, patience=1)
    )
    values = [h["val"] for h in model.history]
    best = max(values)
    assert len(values) < 40, "early stopping never fired"
    # Stopped after `patience` validations without a strict improvement...
    assert values.index(best) == len(values) - 2 and values[-1] < best
    # ...and the weights are those of the best validation, measured the same way again.
    again = evaluate_scores(data, "val", model)
    assert again["ndcg@10"] == pytest.approx(best, abs=1e-6)
    assert not model.training


def test_validation_inside_lightning_is_evaluate_scores(prepared):
    """The value Lightning logged for the last validation is what evaluate_scores computes
    for the same weights (no restore: the last validation is the best when patience is 0
    and nothing failed to improve before the end)."""
    data = prepared("sequential")
    model = fit(data, options(max_epochs=1, eval_every=1))
    logged = model.trainer.callback_metrics
    measured = evaluate_scores(data, "val", model)
    assert set(measured) == {k.removeprefix("val/") for k in logged}
    for name, value in measured.items():
        assert float(logged[f"val/{name}"]) == pytest.approx(value, abs=1e-6)


def test_it_is_seeded_and_leaves_the_callers_rng_alone(prepared):
    data = prepared("sequential")
    users, histories = [0, 1, 2], [[1, 2, 3], [4], [5, 6]]
    state = torch.random.get_rng_state()
    first = fit(data, options(max_epochs=2, eval_every=2))(users, histories)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = fit(data, options(max_epochs=2, eval_every=2))(users, histories)
    other = fit(data, options(max_epochs=2, eval_every=2, seed=1))(users, histories)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_the_last_epoch_is_validated_when_eval_every_does_not_divide_it(prepared):
    model = fit(prepared("sequential"), options(max_epochs=3, eval_every=2, patience=5))
    assert [h["epoch"] for h in model.history] == [2, 3]


def test_the_monitor_follows_the_task(prepared):
    """Click runs watch AUROC (the task's monitored metric), not NDCG."""
    model = fit(prepared("click"), options(max_epochs=1, eval_every=1))
    assert model.monitor == "val/auroc" and set(model.trainer.callback_metrics) == {"val/auroc"}


def test_bad_options_are_config_errors(prepared):
    with pytest.raises(ConfigError, match="baseline_options.sasrec"):
        options(eval_every=0)
    with pytest.raises(ConfigError, match=r"sasrec.window_stride.*max_len \(20\)"):
        options(window_stride=21)
    with pytest.raises(TypeError, match="dims"):
        BASELINES["sasrec"].build(prepared("sequential"), dims=8)


@pytest.mark.slow
def test_id_sasrec_learns_a_sequential_habit(prepared):
    """On data where the next item usually follows the previous one, ID-SASRec must beat
    popularity by a wide margin: it is a real model, not a placeholder."""
    data = prepared("sequential", source=(("num_users", 120), ("num_items", 150)))
    n = data.num_items
    chain = [[(start + t) % n for t in range(12)] for start in range(0, 240, 2)]
    split = Split(
        train=[c[:-2] for c in chain], val=[[c[-2]] for c in chain], test=[[c[-1]] for c in chain]
    )
    data = dataclasses.replace(data, split=split, item_counts=split.counts(n))
    data.datasets = {s: data.task.build(data, s) for s in ("train", "val", "test")}
    model = BASELINES["sasrec"].build(
        data, dim=32, max_epochs=60, eval_every=20, lr=5e-3, accelerator="cpu"
    )
    sasrec = evaluate_scores(data, "test", model)
    popularity = evaluate_scores(data, "test", BASELINES["popularity"].build(data))
    assert model.history and sasrec["hr@10"] > 0.8 > popularity["hr@10"] + 0.5


@pytest.mark.slow
@pytest.mark.parametrize("head", ["retrieval", "click"])
def test_id_sasrec_baseline_from_the_command_line(config, head):
    """ID-SASRec trains inside the run and is scored on the run's own rows and metrics."""
    from recsys_lm.train import train

    result = train(
        config(
            [
                f"head={head}",
                "baselines=[popularity,sasrec]",
                "baseline_options.sasrec.max_epochs=2",
                "baseline_options.sasrec.eval_every=1",
                "baseline_options.sasrec.dim=16",
                "export_model=false",
            ]
        )
    )
    sasrec = result["baselines"]["sasrec"]
    assert set(sasrec["test"]) == set(result["test"])
    assert sasrec["val"] != result["baselines"]["popularity"]["val"]


def test_per_prefix_windows_reach_the_trainer(prepared):
    """window_stride=1: one window per prefix longer than max_len (the earliest window holds
    the shorter prefixes whole), every transition trained once."""
    from recsys_lm.baselines.sasrec import _train_loader

    data = prepared("sequential")
    lengths = [len(s) for s in data.split.train if len(s) >= 2]
    per_prefix = _train_loader(data, options(window_stride=1)).dataset
    assert len(per_prefix) == sum(max(n - 1 - TINY["max_len"], 0) + 1 for n in lengths)
    assert sum(per_prefix.trained) == sum(n - 1 for n in lengths)
    assert len(_train_loader(data, options()).dataset) < len(per_prefix)
