"""TALLRec's protocol in the data layer: rating labels, n-item histories, few-shot subsets."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest

from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.prepared import PreparedData
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.errors import ConfigError, RecsysLMError
from tests.conftest import make_datamodule

USERS, PER_USER, ITEMS = 6, 20, 40


@dataclass
class RatedSource:
    """Each user rates 20 distinct movies, one per hour; ratings cycle through 1..5."""

    with_ratings: bool = True
    name = "rated"

    def prepare(self) -> None:
        return None

    def load(self) -> CanonicalData:
        rows = [
            (f"u{u}", (7 * u + 3 * t) % ITEMS, 3600 * (u * PER_USER + t), 1 + (u + t) % 5)
            for u in range(USERS)
            for t in range(PER_USER)
        ]
        frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
        if not self.with_ratings:
            frame = frame.drop(columns=["rating"])
        items = pd.DataFrame(
            {"item_id": range(ITEMS), "title": [f"movie {i}" for i in range(ITEMS)]}
        )
        return CanonicalData(self.name, items, frame)


def make(tokenizer, source=None, **kw) -> PreparedData:
    options = {
        "eval_mode": "sampled",
        "click_labels": "rating",
        "history_items": 3,
        "use_cache": False,
        **kw,
    }
    return make_datamodule(tokenizer, "click", source or RatedSource(), **options).data


def timeline(dm: PreparedData, user: int) -> tuple[list[int], list[float]]:
    """The user's items and ratings in time order, over every part."""
    items = dm.split.train[user] + dm.split.val[user] + dm.split.test[user]
    ratings = [r for part in ("train", "val", "test") for r in dm.split.attr("rating", user, part)]
    return items, ratings


def test_labels_follow_the_threshold_and_histories_are_the_n_previous_items(tokenizer):
    dm = make(tokenizer, rating_threshold=3)
    for stage in ("train", "val", "test"):
        rows = dm.datasets[stage].rows
        assert rows
        for user, history, item, label in rows:
            items, ratings = timeline(dm, user)
            t = items.index(item)
            assert history == items[t - 3 : t]  # the 3 interactions before it, in time
            assert label == float(ratings[t] > 3)
    # Leave-one-out: 18 training interactions per user, the first 3 lack a full history.
    assert len(dm.datasets["train"]) == USERS * (PER_USER - 2 - 3)
    assert len(dm.datasets["test"]) == USERS and len(dm.datasets["val"]) == USERS
    labels = dm.datasets["train"].labels
    assert 0 < labels.mean() < 1  # ratings 4 and 5 are positives, 1-3 negatives


def test_threshold_is_configurable(tokenizer):
    low, high = make(tokenizer, rating_threshold=1), make(tokenizer, rating_threshold=4)
    assert low.datasets["train"].labels.mean() > high.datasets["train"].labels.mean()


def test_all_previous_items_when_history_items_is_null(tokenizer):
    dm = make(tokenizer, history_items=None)
    user, history, item, _ = dm.datasets["test"].rows[0]
    items, _ = timeline(dm, user)
    assert history == items[: items.index(item)] and len(history) == PER_USER - 1


def test_few_shot_subset_has_its_size_and_is_seed_stable(tokenizer):
    full = make(tokenizer).datasets["train"].rows
    first = make(tokenizer, max_train_samples=16, seed=0).datasets["train"].rows
    again = make(tokenizer, max_train_samples=16, seed=0, max_test_samples=2).datasets["train"]
    other = make(tokenizer, max_train_samples=16, seed=1).datasets["train"].rows
    assert len(first) == 16 and all(row in full for row in first)
    assert again.rows == first  # the same rows whatever the other parts' caps are
    assert other != first
    assert make(tokenizer, max_train_samples=10_000).datasets["train"].rows == full


def test_validation_and_test_caps(tokenizer):
    dm = make(tokenizer, history_items=None, max_val_samples=2, max_test_samples=3)
    assert len(dm.datasets["val"]) == 2 and len(dm.datasets["test"]) == 3
    protocol = dm.protocol()
    assert protocol["samples"] == {"train": len(dm.datasets["train"]), "val": 2, "test": 3}
    assert protocol["max_samples"] == {"train": None, "val": 2, "test": 3}


def test_protocol_says_where_labels_came_from(tokenizer):
    protocol = make(tokenizer).protocol()
    assert protocol["eval_mode"] == "rating>3" and protocol["click_labels"] == "rating"
    assert protocol["history_items"] == 3 and "previous interactions" in protocol["labels"]
    assert protocol["positives"]["train"] == int(make(tokenizer).datasets["train"].labels.sum())


def test_rating_labels_need_ratings(tokenizer):
    with pytest.raises(ConfigError, match="data.click_labels.*has no rating column"):
        make(tokenizer, RatedSource(with_ratings=False))


def test_rating_labels_need_a_time_ordered_split(tokenizer):
    with pytest.raises(ConfigError, match="data.split.method"):
        make(tokenizer, split={"method": "random"})


def test_unknown_click_labels_and_bad_caps_are_config_errors(tokenizer):
    with pytest.raises(ConfigError, match="data.click_labels"):
        make(tokenizer, click_labels="x")
    with pytest.raises(ConfigError, match="data.max_train_samples"):
        make(tokenizer, max_train_samples=0)


def test_prompt_words_surround_the_pair_and_default_changes_nothing(tokenizer):
    kw = {"click_labels": "sampled", "history_items": None, "eval_negatives": 2}
    plain = make(tokenizer, SampleSource(num_users=10, num_items=30), **kw)
    rows = plain.datasets["test"].rows[:2]
    batch = plain.datasets["test"].collate(rows)
    layout, cache = plain.tokens.layout, plain.tokens
    expected = layout.pair(cache.history(rows[0][1], 64), cache.item_ids[rows[0][2]])[0]
    assert batch.input_ids[0, : len(expected)].tolist() == expected  # as before prompts existed

    words = {"history_prefix": "watched:", "candidate_prefix": "next:", "question": "? answer:"}
    prompted = make(tokenizer, SampleSource(num_users=10, num_items=30), prompt=words, **kw)
    ids = prompted.datasets["test"].collate(rows).input_ids[0]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("watched :") and text.endswith("? answer :") and "next :" in text


def test_prompt_tokens_count_against_max_length(tokenizer):
    with pytest.raises(ConfigError, match="data.prompt"):
        make(
            tokenizer,
            max_history_tokens=100,
            max_item_tokens=20,
            max_length=128,
            prompt={"question": " ".join(["word"] * 10)},
        )


@pytest.mark.real_data
@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=tallrec_video", "backbone=tiny_bert"],
        ["experiment=tallrec_generative_video", "backbone=tiny_gpt2"],
    ],
)
def test_tallrec_protocol_on_movielens_100k(config, ml100k_root, tmp_path, overrides):
    from recsys_lm.train import train

    cfg = config(
        [
            *overrides,
            f"data.root={ml100k_root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_train_samples=16",
            "data.max_val_samples=32",
            "data.max_test_samples=64",
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=1",
            "export_model=false",
        ],
        fast=False,
    )
    result = train(cfg)
    protocol = result["protocol"]
    assert protocol["samples"] == {"train": 16, "val": 32, "test": 64}
    assert protocol["eval_mode"] == "rating>3" and protocol["history_items"] == 10
    assert protocol["history_by_rating"] is True  # TALLRec's liked / disliked prompt
    assert protocol["split_method"] == "temporal"
    assert result["timing"]["train_steps"] == 2  # 16 samples, batch 16, 2 epochs
    assert 0.0 <= result["test"]["auroc"] <= 1.0


BY_RATING = {"history_by_rating": True, "prompt": {"disliked_prefix": "dislikes:"}}


def test_history_by_rating_splits_by_earlier_ratings_only(tokenizer):
    dm = make(tokenizer, rating_threshold=3, **BY_RATING)
    for stage in ("train", "val", "test"):
        for user, history, item, _ in dm.datasets[stage].rows:
            items, ratings = timeline(dm, user)
            t = items.index(item)
            assert history.items == tuple(items[t - 3 : t])
            assert history.liked == tuple(r > 3 for r in ratings[t - 3 : t])
    # Ratings cycle 1..5, so some histories mix both groups: the prompt lists liked, then
    # the words, then disliked, each in time order.
    cache = dm.tokens
    row = next(r for r in dm.datasets["train"].rows if 0 < sum(r[1].liked) < 3)
    liked = [i for i, ok in zip(row[1].items, row[1].liked, strict=True) if ok]
    disliked = [i for i, ok in zip(row[1].items, row[1].liked, strict=True) if not ok]
    ids = cache.history_text(row[1], 64)
    expected = cache.history(liked, 64) + cache.prompt["disliked_prefix"]
    assert ids == expected + cache.history(disliked, 64)


def test_history_by_rating_does_not_leak_the_target_rating(tokenizer):
    # One interaction's rating flipped across the threshold: its own sample's label flips
    # but its history must not change; only later samples, which show it, see the new verdict.
    @dataclass
    class OneFlipped(RatedSource):
        def load(self) -> CanonicalData:
            data = super().load()
            row = data.interactions.index[10]  # user 0's 11th rating (rating 1: disliked)
            data.interactions.loc[row, "rating"] = 5
            return data

    def by_item(dm: PreparedData) -> dict[int, tuple]:
        return {item: (h, label) for u, h, item, label in dm.datasets["train"].rows if u == 0}

    base, flipped = (
        by_item(make(tokenizer, **BY_RATING)),
        by_item(make(tokenizer, OneFlipped(), **BY_RATING)),
    )
    target = 0 + 3 * 10  # RatedSource: user 0's 11th item
    assert base[target][1] == 0.0 and flipped[target][1] == 1.0  # the label follows the rating
    assert base[target][0] == flipped[target][0]  # ...and its history does not
    later = [item for item, (h, _) in base.items() if target in h.items]
    assert later
    for item in later:
        position = base[item][0].items.index(target)
        assert not base[item][0].liked[position] and flipped[item][0].liked[position]


def test_history_by_rating_needs_rating_labels_and_dislike_words(tokenizer):
    with pytest.raises(ConfigError, match="data.click_labels"):
        make(
            tokenizer, SampleSource(num_users=10, num_items=30), click_labels="sampled", **BY_RATING
        )
    with pytest.raises(ConfigError, match="data.prompt.disliked_prefix"):
        make(tokenizer, history_by_rating=True)
    with pytest.raises(ConfigError, match="data.prompt.disliked_prefix"):
        make(tokenizer, prompt={"disliked_prefix": "dislikes:"})


def test_a_history_without_ratings_is_refused_by_a_rating_split_prompt(tokenizer):
    # Serving passes plain histories: a model trained on liked / disliked prompts must not
    # silently read them all as liked.
    dm = make(tokenizer, rating_threshold=3, **BY_RATING)
    with pytest.raises(RecsysLMError, match="history_by_rating"):
        dm.tokens.pair([1, 2, 3], 4, 64)
    plain = make(tokenizer, rating_threshold=3)
    assert plain.tokens.pair([1, 2, 3], 4, 64)[0]
