"""evaluate_scores / run_baselines: the one path by which every baseline is measured."""

from __future__ import annotations

import pytest
import torch

from recsys_lm.baselines import evaluate_points, evaluate_scores, run_baselines
from recsys_lm.baselines.evaluate import EVAL_BATCH, StageEvaluation
from recsys_lm.errors import ConfigError


def oracle(data, stage, sign=1.0):
    """Scores the stage's held-out items +sign, everything else 0."""
    targets = {user: data.split.targets(user, stage) for user in data.split.eval_users(stage)}

    def score(users, histories):
        scores = torch.zeros(len(users), data.num_items)
        for row, user in enumerate(users):
            scores[row, targets[user]] = sign
        return scores

    return score


def test_an_oracle_scores_one_and_its_opposite_ranks_the_targets_last(prepared):
    data = prepared()
    best = evaluate_scores(data, "test", oracle(data, "test"))
    assert best == {"ndcg@10": 1.0, "hr@10": 1.0, "mrr": 1.0, "mrr@10": 1.0}
    worst = evaluate_scores(data, "test", oracle(data, "test", -1.0))
    assert worst["hr@10"] == 0.0
    # Full ranking excludes each user's history: the target ranks last among the rest.
    users = data.split.eval_users("test")
    seen = [set(data.split.history(u, "test")) - set(data.split.targets(u, "test")) for u in users]
    ranks = [data.num_items - len(s) for s in seen]
    assert worst["mrr"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks), rel=1e-5)


def test_click_rows_read_the_candidates_column(prepared):
    data = prepared("click")
    assert evaluate_scores(data, "test", oracle(data, "test"))["auroc"] == 1.0
    assert evaluate_scores(data, "test", oracle(data, "test", -1.0))["auroc"] == 0.0


def test_batches_are_the_stage_rows_in_order(prepared):
    data = prepared("retrieval", source=(("num_users", 300), ("num_items", 80)))
    evaluation = StageEvaluation(data, "val")
    batches = list(evaluation.batches())
    assert [len(b) for b in batches] == [EVAL_BATCH, len(data.datasets["val"]) - EVAL_BATCH]
    dataset = data.datasets["val"]
    assert sum(batches, []) == [dataset[i] for i in range(len(dataset))]


def test_points_need_a_pointwise_task(prepared):
    data = prepared()
    with pytest.raises(TypeError, match="retrieval"):
        evaluate_points(data, "test", lambda users, items: torch.zeros(len(users)))


def test_unknown_baseline_is_a_config_error_before_anything_is_fitted(prepared, monkeypatch):
    import recsys_lm.baselines.run as run

    monkeypatch.setattr(run, "evaluate_scores", lambda *a: pytest.fail("fitted first"))
    with pytest.raises(ConfigError, match="baselines.*item_knn"):
        run_baselines(prepared(), ["popularity", "itemknn"])


def test_baselines_that_do_not_apply_are_skipped_with_the_reason(prepared):
    result = run_baselines(prepared("rating"), ["popularity", "bias"])
    assert "task `rating`" in result["popularity"]["skipped"]
    assert "it serves ['click', 'retrieval', 'sequential'" in result["popularity"]["skipped"]
    assert "baselines=['bias']" in result["popularity"]["skipped"]
    assert set(result["bias"]) == {"val", "test"} and "rmse" in result["bias"]["test"]
    assert (
        "baselines=['popularity', 'item_knn', 'sasrec']"
        in run_baselines(prepared("click"), ["bias"])["bias"]["skipped"]
    )


@pytest.mark.slow
def test_baselines_list_from_the_command_line(config):
    from recsys_lm.train import train

    result = train(config(["baselines=[popularity,item_knn]", "export_model=false"]))
    assert set(result["baselines"]) == {"popularity", "item_knn"}
    assert result["baselines"]["item_knn"]["test"]["ndcg@10"] > 0.0
