"""`data.new_interactions`: logged behaviour appended to a source's interactions."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys_lm.data.appended import UNKNOWN_ITEM, append_interactions, read_interactions
from recsys_lm.data.canonical import CanonicalData
from recsys_lm.errors import DataError


def base(ids: str) -> CanonicalData:
    cast = int if ids == "int" else str
    return CanonicalData(
        "toy",
        items=pd.DataFrame({"item_id": [cast(i) for i in (1, 2, 3)], "title": ["a", "b", "c"]}),
        interactions=pd.DataFrame(
            {"user_id": [cast(10)], "item_id": [cast(1)], "timestamp": [100]}
        ),
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl", ".tsv"])
def test_new_interactions_take_the_source_id_types_and_drop_unknown_items(tmp_path, suffix):
    frame = pd.DataFrame(
        {"user_id": ["10", "11", "11"], "item_id": ["2", "3", "9"], "timestamp": [200.7, 300, 400]}
    )
    path = tmp_path / f"new{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    data = append_interactions(base("int"), path)
    rows = data.interactions
    assert rows["user_id"].tolist() == [10, 10, 11] and rows["item_id"].tolist() == [1, 2, 3]
    assert rows["timestamp"].tolist() == [100, 200, 300]  # seconds: the fraction dropped
    assert data.dropped == {UNKNOWN_ITEM: 1} and sorted(data.users["user_id"]) == [10, 11]
    texts = append_interactions(base("str"), path).interactions
    assert texts["item_id"].tolist() == ["1", "2", "3"]


def test_bad_new_interactions_name_the_file_row_and_column(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"user_id": ["10", "x7"], "item_id": ["1", "2"], "timestamp": [1, 2]}).to_csv(
        bad, index=False
    )
    with pytest.raises(DataError, match=r"bad.csv, row 2, column 'user_id': 'x7'"):
        append_interactions(base("int"), bad)
    late = tmp_path / "late.csv"
    pd.DataFrame({"user_id": ["10"], "item_id": ["1"], "timestamp": ["soon"]}).to_csv(
        late, index=False
    )
    with pytest.raises(DataError, match=r"late.csv, row 1, column 'timestamp': 'soon'"):
        append_interactions(base("int"), late)
    short = tmp_path / "short.csv"
    pd.DataFrame({"user": ["10"], "item_id": ["1"]}).to_csv(short, index=False)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['user_id', 'timestamp'\]"):
        read_interactions(short)
    with pytest.raises(DataError, match=r"\.parquet, \.csv, \.tsv or \.jsonl"):
        read_interactions(tmp_path / "events.xlsx")
