from __future__ import annotations

import pandas as pd
import pytest

from recsys_lm.data.canonical import CanonicalData
from recsys_lm.errors import DataError

ITEMS = pd.DataFrame({"item_id": [1, 2], "title": ["a", "b"]})


def interactions(**overrides) -> pd.DataFrame:
    frame = {"user_id": [1, 1], "item_id": [1, 2], "timestamp": [10, 20]}
    return pd.DataFrame({**frame, **overrides})


def test_valid_data_derives_users():
    data = CanonicalData("d", ITEMS, interactions())
    assert data.users["user_id"].tolist() == [1]


@pytest.mark.parametrize(
    ("frame", "items", "message"),
    [
        (interactions().drop(columns="timestamp"), ITEMS, r"lack column\(s\) \['timestamp'\]"),
        (interactions(item_id=[1, 9]), ITEMS, "absent from the items table .first: 9"),
        (interactions(timestamp=[1.5, 2.0]), ITEMS, "integer seconds"),
        (interactions(timestamp=[1_600_000_000_000, 1_600_000_000_001]), ITEMS, "milliseconds"),
        (interactions(), pd.concat([ITEMS, ITEMS]), "duplicate item_id 1"),
        (interactions().iloc[:0], ITEMS, "no interactions"),
    ],
)
def test_validation_names_the_dataset_and_the_problem(frame, items, message):
    with pytest.raises(DataError, match=message) as err:
        CanonicalData("shop", items, frame)
    assert "dataset `shop`" in str(err.value)


def test_part_column_values_are_checked():
    items = pd.DataFrame({"item_id": ["a"]})
    inter = pd.DataFrame({"user_id": ["u"], "item_id": ["a"], "timestamp": [1], "part": ["train"]})
    assert CanonicalData("d", items, inter).interactions["part"].tolist() == ["train"]
    with pytest.raises(DataError, match=r"dataset `d`: column 'part' holds 'holdout'"):
        CanonicalData("d", items, inter.assign(part="holdout"))
