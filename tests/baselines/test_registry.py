"""The registry: one row per baseline; tasks name the baselines that apply to them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recsys_lm.baselines import BASELINES, Baseline, run_baselines
from recsys_lm.data.tasks import TASKS


def test_every_row_is_named_by_its_key_and_documented():
    assert list(BASELINES) == ["popularity", "item_knn", "sasrec", "bias", "item_majority"]
    for name, row in BASELINES.items():
        assert row.name == name and callable(row.build) and row.doc
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASELINES["popularity"].name = "other"


def test_every_baseline_a_task_names_is_registered_and_serves_some_task():
    named = {name for task in TASKS.values() for name in (*task.baselines, *task.default_baselines)}
    assert named <= set(BASELINES)
    assert set(BASELINES) <= named  # no row that no task can use
    for task in TASKS.values():
        assert set(task.default_baselines) <= set(task.baselines)


def test_a_new_baseline_is_one_row(prepared, monkeypatch):
    """A row in BASELINES and its name in the task's record: run_baselines fits and scores it
    like the built-in ones (options passed through)."""
    built = {}

    def build(data, boost: float = 0.0):
        built["boost"] = boost
        return lambda users, histories: torch.full((len(users), data.num_items), boost)

    monkeypatch.setitem(BASELINES, "constant", Baseline("constant", build, "the same score"))
    data = prepared()
    data = dataclasses.replace(data, task=dataclasses.replace(data.task, baselines=("constant",)))
    result = run_baselines(data, ["constant", "popularity"], {"constant": {"boost": 2.0}})
    assert built == {"boost": 2.0}
    assert set(result["constant"]) == {"val", "test"} and "ndcg@10" in result["constant"]["test"]
    assert "baselines=['constant']" in result["popularity"]["skipped"]
