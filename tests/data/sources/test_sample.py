from __future__ import annotations

import hashlib

import pytest

from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.errors import ConfigError


@pytest.mark.parametrize(
    ("flavour", "fields"),
    [
        ("ecom", {"title", "category", "brand"}),
        ("news", {"title", "category", "subcategory"}),
        ("video", {"title", "genres", "director"}),
    ],
)
def test_flavours_have_their_own_item_fields(flavour, fields):
    data = SampleSource(flavour=flavour, num_users=20, num_items=50).load()
    assert set(data.items.columns) == {"item_id"} | fields
    assert len(data.items) == 50
    assert data.items["title"].is_unique
    assert data.interactions["user_id"].nunique() == 20


def test_generation_is_deterministic():
    a = SampleSource(num_users=30, num_items=60).load()
    b = SampleSource(num_users=30, num_items=60).load()
    assert a.interactions.equals(b.interactions) and a.items.equals(b.items)
    c = SampleSource(num_users=30, num_items=60, seed=8).load()
    assert not a.interactions.equals(c.interactions)


def test_users_follow_their_tastes_and_habits():
    data = SampleSource(num_users=100, num_items=200).load()
    merged = data.interactions.merge(data.items, on="item_id").sort_values(["user_id", "timestamp"])
    same = (merged.groupby("user_id")["category"].shift() == merged["category"]).mean()
    # 8 categories: by chance about 1/8 of consecutive pairs would match.
    assert same > 0.4


def test_unknown_flavour_is_a_config_error():
    with pytest.raises(ConfigError, match="data.source.flavour"):
        SampleSource(flavour="music").load()


# Items and sequences as they were before ratings and behaviours were added: the feedback
# comes from its own generator, so nothing else may change (other tests depend on it).
BEFORE_FEEDBACK = {
    "ecom": "af7b44e796f52e7f",
    "news": "ef9db67e4c1f7d8c",
    "video": "36470684589711a9",
}


@pytest.mark.parametrize("flavour", list(BEFORE_FEEDBACK))
def test_feedback_leaves_items_and_sequences_unchanged(flavour):
    data = SampleSource(flavour=flavour).load()
    digest = hashlib.sha256()
    digest.update(data.items.to_csv(index=False).encode())
    digest.update(
        data.interactions[["user_id", "item_id", "timestamp"]].to_csv(index=False).encode()
    )
    assert digest.hexdigest()[:16] == BEFORE_FEEDBACK[flavour]


def test_ratings_and_behaviours_follow_the_users_tastes():
    data = SampleSource(num_users=100, num_items=200).load()
    frame = data.interactions.merge(data.items, on="item_id")
    assert set(frame["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert set(frame["behaviour"].unique()) == {"view", "click", "buy"}
    # A user's most frequent category stands for their tastes: rated higher than the rest.
    top = frame.groupby("user_id")["category"].agg(lambda c: c.value_counts().index[0])
    favourite = frame["category"] == frame["user_id"].map(top)
    assert frame.loc[favourite, "rating"].mean() > frame.loc[~favourite, "rating"].mean() + 0.3
    # Buying goes with liking: buys are rated higher than views.
    by_behaviour = frame.groupby("behaviour")["rating"].mean()
    assert by_behaviour["buy"] > by_behaviour["click"] > by_behaviour["view"]
