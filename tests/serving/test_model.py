"""ServedModel: the serving path answers like the head's own `recommend` / `score`, new items
join from their text, removed items leave, and a two-stage pipeline re-ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_lm.build import build_module
from recsys_lm.errors import UnknownItem
from recsys_lm.serving.model import Pipeline, ServedModel, catalogue_frame, user_histories
from tests.conftest import fresh_datamodule, make_config

HEADS = {
    "sequential": [
        "head=sequential",
        "peft=none",
        "freeze=head_only",
        "head.net.id_embedding=true",
    ],
    "retrieval": ["head=retrieval", "peft=lora"],
    "click": ["head=click", "peft=none"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """head name -> (module, prepared data), untrained: serving must match the head whatever
    its weights."""
    torch.manual_seed(0)
    out = {}
    for name, overrides in HEADS.items():
        cfg = make_config(tmp_path_factory.mktemp(name), overrides)
        module = build_module(cfg)
        data = fresh_datamodule(cfg, module).data
        module.attach(data)
        module.eval()._begin_eval()  # item texts cached as after a test epoch, no dropout
        out[name] = (module.eval(), data)
    return out


def served(built, name: str, **kwargs) -> ServedModel:
    module, data = built[name]
    return ServedModel.from_prepared(module, data, **kwargs)


def users_with_history(data, count: int = 5) -> list[int]:
    return [u for u in range(len(data.user_ids)) if len(data.history(u)) >= 2][:count]


@pytest.mark.parametrize("name", ["sequential", "retrieval"])
def test_recommend_matches_the_heads_own_ranking(built, name):
    module, data = built[name]
    model = served(built, name)
    ids = catalogue_frame(data)["item_id"].tolist()
    users = users_with_history(data)
    histories = [[ids[i] for i in data.history(u)] for u in users]
    answers = model.recommend_batch(histories, k=10)
    for user, answer in zip(users, answers, strict=True):
        expected = module.recommend(data.history(user), k=10)
        assert answer.items == [ids[i] for i in expected.items]
        np.testing.assert_allclose(answer.scores, expected.scores, rtol=1e-4, atol=1e-5)
        assert not set(answer.items) & set(ids[i] for i in data.history(user))


@pytest.mark.parametrize("name", ["sequential", "retrieval", "click"])
def test_scores_match_the_heads_score(built, name):
    module, data = built[name]
    model = served(built, name)
    ids = catalogue_frame(data)["item_id"].tolist()
    user = users_with_history(data)[0]
    history, candidates = data.history(user), [0, 3, 7, 11]
    got = model.score_batch([[ids[i] for i in history]] * 2, [[ids[i] for i in candidates]] * 2)
    expected = module.score(history, candidates).tolist()
    for row in got:
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)


def test_user_state_is_every_interaction_in_time_order(built):
    _, data = built["sequential"]
    users = user_histories(data)
    ids = catalogue_frame(data)["item_id"].tolist()
    split = data.split
    u = users_with_history(data)[0]
    assert users[str(data.user_ids[u])] == [
        ids[i] for i in split.train[u] + split.val[u] + split.test[u]
    ]


def test_an_item_added_by_text_is_recommended_to_a_user_who_read_that_text(built):
    """The two-tower head reads a one-item history and a new item through the same tower: a
    new item with that item's text scores the maximum cosine, 1, and comes first."""
    model = served(built, "retrieval")
    frame = catalogue_frame(built["retrieval"][1])
    seen = frame.iloc[5]
    assert "new-1" not in model.index
    model.add_items({"new-1": seen["history_text"]})
    answer = model.recommend_batch([[seen["item_id"]]], k=3)[0]
    assert answer.items[0] == "new-1"
    assert answer.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert model.has_item("new-1") and len(model.index) == len(frame) + 1
    # The new item is scored and can sit in a history like any other.
    assert model.score_batch([["new-1"]], [["new-1"]])[0][0] == pytest.approx(1.0, abs=1e-5)


def test_new_items_of_the_sequential_head_have_text_vectors_only(built):
    module, data = built["sequential"]
    model = served(built, "sequential")
    frame = catalogue_frame(data)
    model.add_items({"fresh": frame.iloc[2]["item_text"]})
    head = module.head
    text = torch.as_tensor(head.text_table[2]).unsqueeze(0)
    expected = head.project(text)[0].detach()  # same text, no learned ID vector
    np.testing.assert_allclose(model.index.vectors(["fresh"])[0], expected.numpy(), atol=1e-5)
    trained = model.index.vectors([frame.iloc[2]["item_id"]])[0]
    assert not np.allclose(trained, expected.numpy(), atol=1e-4)  # that one has its ID vector


def test_removed_items_are_never_recommended_and_cannot_be_candidates(built):
    _, data = built["sequential"]
    model = served(built, "sequential")
    ids = catalogue_frame(data)["item_id"].tolist()
    history = [ids[i] for i in data.history(users_with_history(data)[0])]
    first = model.recommend_batch([history], k=5)[0]
    model.remove_items(first.items[:2])
    after = model.recommend_batch([history], k=5)[0]
    assert not set(first.items[:2]) & set(after.items)
    assert after.items[:3] == first.items[2:5]
    with pytest.raises(UnknownItem) as raised:
        model.score_batch([history], [[first.items[0]]])
    assert raised.value.ids == [first.items[0]]
    model.recommend_batch([[first.items[0], *history]], k=5)  # still readable in a history
    with pytest.raises(UnknownItem):
        model.remove_items([first.items[0]])


def test_exclude_and_allow_filter_inside_the_query(built):
    _, data = built["sequential"]
    model = served(built, "sequential")
    ids = catalogue_frame(data)["item_id"].tolist()
    history = [ids[i] for i in data.history(users_with_history(data)[0])]
    top = model.recommend_batch([history], k=5)[0].items
    shifted = model.recommend_batch([history], k=5, exclude=[{top[0]}])[0].items
    assert shifted == top[1:] + shifted[4:]
    allowed = set(ids[-6:]) - set(history)
    only = model.recommend_batch([history], k=10, allow=[allowed])[0].items
    assert set(only) == allowed
    kept = model.recommend_batch([history], k=3, exclude_seen=False)[0]
    assert len(kept.items) == 3


def test_unknown_history_items_are_named(built):
    model = served(built, "sequential")
    with pytest.raises(UnknownItem) as raised:
        model.recommend_batch([["no-such-item", "nor-this"]], k=3)
    assert raised.value.ids == ["no-such-item", "nor-this"]


def test_pipeline_reranks_the_retrievers_candidates_with_the_cross_encoder(built):
    _, data = built["sequential"]
    retriever, ranker = served(built, "sequential"), served(built, "click")
    pipeline = Pipeline(retriever, ranker, n=20)
    ids = catalogue_frame(data)["item_id"].tolist()
    history = [ids[i] for i in data.history(users_with_history(data)[0])]
    answer = pipeline.recommend_batch([history], k=5)[0]
    candidates = retriever.recommend_batch([history], k=20)[0].items
    assert set(answer.items) <= set(candidates)
    rescored = dict(zip(candidates, ranker.score_batch([history], [candidates])[0], strict=True))
    best = sorted(candidates, key=lambda i: -rescored[i])[:5]
    assert answer.items == best
    assert answer.scores == pytest.approx([rescored[i] for i in best])
    assert set(answer.stages) == {"retrieve", "rerank"}
