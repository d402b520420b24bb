from __future__ import annotations

import pytest

from recsys_lm.data.sample import SampleSource
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
