from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf.errors import MissingMandatoryValue

from recsys_lm.data.cache import CachedSource
from recsys_lm.data.sources.custom import CustomSource
from recsys_lm.data.split import make_split
from recsys_lm.errors import ConfigError, DataError

EVENTS = pd.DataFrame(
    {
        "customer": ["u1", "u1", "u2", "u2", "u2"],
        "sku": ["007", "B", "B", "C", "007"],
        "ts": [1_600_000_000, 1_600_000_100, 1_600_000_200, 1_600_000_300, 1_600_000_400],
        "stars": [5.0, 3.0, 4.0, 1.0, 2.0],
        "extra": ["x"] * 5,
    }
)
PRODUCTS = pd.DataFrame(
    {
        "sku": ["007", "B", "C"],
        "name": ["Spy kit", "Book, hardcover", None],
        "brand": ["Acme", "Pages", "Clay"],
        "price": [1.0, 2.0, 3.0],
    }
)
MAPPING = {
    "interactions": {"path": "events.csv", "user": "customer", "item": "sku", "time": "ts"},
    "items": {"path": "products.csv", "id": "sku", "text": ["name", "brand"]},
}


def custom_overrides(root: Path, interactions: str) -> list[str]:
    """`data=custom` mapped onto the test files in `root`; `interactions` names the file(s)."""
    return [
        "data=custom",
        f"data.root={root}",
        interactions,
        "data.source.interactions.user=customer",
        "data.source.interactions.item=sku",
        "data.source.interactions.time=ts",
        "data.source.items.path=products.csv",
        "data.source.items.id=sku",
        "data.source.items.text=[name,brand]",
    ]


def write_csv(tmp_path: Path, events: pd.DataFrame = EVENTS) -> None:
    events.to_csv(tmp_path / "events.csv", index=False)
    PRODUCTS.to_csv(tmp_path / "products.csv", index=False)


def source(tmp_path: Path, interactions: dict | None = None, **kw) -> CustomSource:
    mapping = {**MAPPING["interactions"], **(interactions or {})}
    return CustomSource(mapping, MAPPING["items"], root=str(tmp_path), **kw)


def test_csv_loads_from_the_mapping_alone(tmp_path):
    write_csv(tmp_path)
    data = source(tmp_path, {"rating": "stars"}).load()
    assert list(data.items.columns) == ["item_id", "name", "brand"]
    # Ids stay strings in text files: "007" keeps its zeros.
    assert data.items["item_id"].tolist() == ["007", "B", "C"]
    assert data.items["name"].tolist() == ["Spy kit", "Book, hardcover", ""]  # missing -> ""
    inter = data.interactions
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert inter["timestamp"].dtype == "int64"
    assert inter["timestamp"].tolist() == EVENTS["ts"].tolist()
    assert inter["rating"].tolist() == EVENTS["stars"].tolist()
    assert data.dropped == {} and len(data.users) == 2


def test_parquet_with_millisecond_times_and_int_ids(tmp_path):
    events = pd.DataFrame(
        {"u": [1, 1, 2], "i": [10, 20, 10], "t_ms": [1_600_000_000_123, 1_600_000_100_999, 5]}
    )
    events.loc[2, "t_ms"] = 1_600_000_200_000
    items = pd.DataFrame({"item": [10, 20], "title": ["Ten", "Twenty"]})
    events.to_parquet(tmp_path / "events.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    data = CustomSource(
        {"path": str(tmp_path / "events.parquet"), "user": "u", "item": "i", "time": "t_ms"},
        {"path": str(tmp_path / "items.parquet"), "id": "item", "text": "title"},
    ).load()  # absolute paths: no data.root needed
    assert data.interactions["timestamp"].tolist() == [1_600_000_000, 1_600_000_100, 1_600_000_200]
    assert data.items["item_id"].dtype == "int64"
    assert data.items["title"].tolist() == ["Ten", "Twenty"]


def test_parquet_datetime_column_and_mismatched_id_types(tmp_path):
    events = pd.DataFrame(
        {
            "u": ["a", "b"],
            "i": ["10", "20"],  # strings here, ints in the items file
            "when": pd.to_datetime(["2020-01-01 00:00:10", "2020-01-02 00:00:00"]),
        }
    )
    events.to_parquet(tmp_path / "events.parquet")
    pd.DataFrame({"item": [10, 20], "title": ["Ten", "Twenty"]}).to_parquet(tmp_path / "items.pq")
    data = CustomSource(
        {"path": "events.parquet", "user": "u", "item": "i", "time": "when"},
        {"path": "items.pq", "id": "item", "text": ["title"]},
        root=str(tmp_path),
    ).load()
    assert data.interactions["timestamp"].tolist() == [1577836810, 1577923200]
    assert data.interactions["item_id"].tolist() == ["10", "20"]


def test_datetime_strings_with_and_without_a_format(tmp_path):
    events = EVENTS.assign(ts=["2020-01-01 00:00:00", "2020-01-01 00:01:00"] + ["2020-01-02"] * 3)
    write_csv(tmp_path, events)
    data = source(tmp_path).load()  # ISO 8601, date-times and dates mixed; no zone -> UTC
    assert data.interactions["timestamp"].tolist()[:3] == [1577836800, 1577836860, 1577923200]
    events = EVENTS.assign(ts=["02/01/2020 10:00"] * 5)  # day first: needs the format
    write_csv(tmp_path, events)
    data = source(tmp_path, {"time_format": "%d/%m/%Y %H:%M"}).load()
    assert data.interactions["timestamp"].iloc[0] == 1577959200  # 2020-01-02 10:00 UTC


def test_unparsable_time_names_file_column_and_row(tmp_path):
    write_csv(tmp_path, EVENTS.assign(ts=["2020-01-01"] * 3 + ["soon", "2020-01-02"]))
    with pytest.raises(DataError, match=r"events.csv, line 5, column 'ts': 'soon' is not a time"):
        source(tmp_path).load()


def test_forced_unit_and_too_fine_times(tmp_path):
    write_csv(tmp_path, EVENTS.assign(ts=[5_000] * 5))
    data = source(tmp_path, {"time_format": "ms"}).load()
    assert data.interactions["timestamp"].tolist() == [5] * 5
    write_csv(tmp_path, EVENTS.assign(ts=[1_600_000_000_000_000] * 5))  # microseconds
    with pytest.raises(DataError, match="beyond milliseconds"):
        source(tmp_path).load()


def test_missing_column_names_file_column_and_existing_columns(tmp_path):
    write_csv(tmp_path)
    with pytest.raises(DataError) as err:
        source(tmp_path, {"user": "client"}).load()
    message = str(err.value)
    assert "events.csv" in message and "'client' (mapping key interactions.user)" in message
    assert "['customer', 'sku', 'ts', 'stars', 'extra']" in message
    bad_items = CustomSource(
        MAPPING["interactions"],
        {**MAPPING["items"], "text": ["name", "colour"]},
        root=str(tmp_path),
    )
    with pytest.raises(
        DataError, match=r"products.csv: no column 'colour' \(mapping key items.text\)"
    ):
        bad_items.load()


def test_unknown_items_error_or_drop(tmp_path):
    events = pd.concat([EVENTS, EVENTS.iloc[[0]].assign(sku="ZZZ")], ignore_index=True)
    write_csv(tmp_path, events)
    with pytest.raises(
        DataError,
        match=r"events.csv, line 7, column 'sku': 'ZZZ' is absent .*unknown_items=drop",
    ):
        source(tmp_path).load()
    data = source(tmp_path, unknown_items="drop").load()
    assert data.dropped == {"unknown item": 1}
    assert len(data.interactions) == len(EVENTS) and "ZZZ" not in set(data.interactions["item_id"])


def test_mapping_mistakes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="time"):
        CustomSource({"path": "a.csv", "user": "u", "item": "i"}, MAPPING["items"])
    with pytest.raises(ConfigError, match="timestamp"):
        source(tmp_path, {"timestamp": "ts"})
    with pytest.raises(ConfigError, match="unknown_items"):
        source(tmp_path, unknown_items="ignore")
    with pytest.raises(ConfigError, match=r"\.csv, \.tsv or \.parquet"):
        (tmp_path / "events.xlsx").write_text("")
        source(tmp_path, {"path": "events.xlsx"}).load()
    with pytest.raises(DataError, match="no such file"):
        source(tmp_path, {"path": "nowhere.csv"}).load()


def test_tsv_and_empty_id_rows(tmp_path):
    EVENTS.to_csv(tmp_path / "events.tsv", sep="\t", index=False)
    PRODUCTS.to_csv(tmp_path / "products.csv", index=False)
    assert len(source(tmp_path, {"path": "events.tsv"}).load().interactions) == 5
    EVENTS.assign(customer=["u1", None, "u2", "u2", "u2"]).to_csv(
        tmp_path / "events.csv", index=False
    )
    with pytest.raises(
        DataError, match=r"events.csv, line 3, column 'customer': '' is empty \(1 such row"
    ):
        source(tmp_path).load()


def test_config_requires_the_mapping_and_loads_with_it(config, tmp_path):
    with pytest.raises(MissingMandatoryValue, match="interactions.user"):
        instantiate(config(["data=custom"], fast=False).data.source)
    write_csv(tmp_path)
    overrides = [
        *custom_overrides(tmp_path, "data.source.interactions.path=events.csv"),
        "data.item_template='{name}. Brand: {brand}.'",
        "data.history_template='{name}'",
    ]
    cfg = config(overrides, fast=False)
    data = instantiate(cfg.data.source).load()
    assert len(data.interactions) == 5 and list(data.items.columns) == ["item_id", "name", "brand"]


def test_one_bad_unix_time_names_its_own_line_column_and_value(tmp_path):
    # pandas reads the column as text because of the one typo; the typo is the error.
    (tmp_path / "events.csv").write_text(
        "customer,sku,ts\nu1,B,1600000000\nu1,C,1600000100\nu2,B,abc\nu2,C,1600000300\n"
    )
    PRODUCTS.to_csv(tmp_path / "products.csv", index=False)
    with pytest.raises(DataError) as err:
        source(tmp_path).load()
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'events.csv'}, line 4, column 'ts': 'abc'"), message
    assert "1600000000" not in message and "expected unix seconds" in message


def test_split_column_becomes_the_part_column_and_a_predefined_split(tmp_path):
    split = ["train", "Validation", "TEST", "train", "dev"]
    write_csv(tmp_path, EVENTS.assign(fold=split))
    data = source(tmp_path, {"split": "fold"}).load()
    assert data.interactions["part"].tolist() == ["train", "val", "test", "train", "val"]
    frame = pd.DataFrame(
        {
            "user": data.interactions["user_id"].map({"u1": 0, "u2": 1}),
            "item": data.interactions["item_id"].map({"007": 0, "B": 1, "C": 2}),
            "timestamp": data.interactions["timestamp"],
            "part": data.interactions["part"],
        }
    )
    result = make_split(frame, 2, "predefined")
    assert result.train == [[0], [2]] and result.val == [[1], [0]] and result.test == [[], [1]]
    write_csv(tmp_path, EVENTS.assign(fold=["train", "train", "holdout", "test", "test"]))
    with pytest.raises(DataError, match=r"events.csv, line 4, column 'fold': 'holdout'"):
        source(tmp_path, {"split": "fold"}).load()


# One file per part (`interactions.files`) instead of one file (`path`).

NO_PATH = {"path": None}
PART_FILES = {"train": "train.csv", "val": "val.parquet", "test": "test.csv"}


def write_parts(tmp_path: Path, test: pd.DataFrame = EVENTS.iloc[[4]]) -> None:
    """u1: 007 then B (train); u2: B (train), C (val, Parquet), 007 (test). The Parquet file
    keeps pandas' index (3): rows must still line up (they once did not)."""
    EVENTS.iloc[[0, 1, 2]].to_csv(tmp_path / "train.csv", index=False)
    EVENTS.iloc[[3]].to_parquet(tmp_path / "val.parquet")
    test.to_csv(tmp_path / "test.csv", index=False)
    PRODUCTS.to_csv(tmp_path / "products.csv", index=False)


def by_index(data) -> pd.DataFrame:
    """The canonical interactions as make_split's integer frame."""
    inter = data.interactions
    return pd.DataFrame(
        {
            "user": inter["user_id"].map({"u1": 0, "u2": 1}),
            "item": inter["item_id"].map({"007": 0, "B": 1, "C": 2}),
            "timestamp": inter["timestamp"],
            "part": inter["part"],
        }
    )


def test_files_per_part_give_exactly_those_parts(tmp_path):
    write_parts(tmp_path)
    files = {"test": "test.csv", "Validation": "val.parquet", "train": "train.csv"}
    data = source(tmp_path, {**NO_PATH, "files": files, "rating": "stars"}).load()
    inter = data.interactions
    assert inter["part"].tolist() == ["train", "train", "train", "val", "test"]
    assert inter["item_id"].tolist() == ["007", "B", "B", "C", "007"]
    assert inter["rating"].tolist() == EVENTS["stars"].tolist()
    result = make_split(by_index(data), 2, "predefined")
    assert result.train == [[0, 1], [1]] and result.val == [[], [2]] and result.test == [[], [0]]
    # Every file is a raw file, in train/val/test order, then the items file.
    names = [f.name for f in source(tmp_path, {**NO_PATH, "files": files}).raw_files()]
    assert names == ["train.csv", "val.parquet", "test.csv", "products.csv"]


def test_without_a_val_file_each_users_latest_train_row_is_val(tmp_path):
    write_parts(tmp_path)
    files = {"train": "train.csv", "test": "test.csv"}
    inter = source(tmp_path, {**NO_PATH, "files": files}).load().interactions
    # u1's later train row (B) is val; u2 has a single train row: it stays train.
    assert inter["part"].tolist() == ["train", "val", "train", "test"]
    assert list(source(tmp_path, {**NO_PATH, "files": files}).interactions["files"]) == [
        "train",
        "test",
    ]


def test_a_changed_part_file_changes_the_cache_key(tmp_path):
    write_parts(tmp_path)
    cached = CachedSource(source(tmp_path, {**NO_PATH, "files": PART_FILES}), tmp_path / "cache")
    key = cached.key()
    assert cached.key() == key
    write_parts(tmp_path, test=EVENTS.iloc[[4]].assign(ts=1_600_000_500))
    assert cached.key() != key


def test_errors_in_a_part_file_name_that_file_and_line(tmp_path):
    write_parts(tmp_path, test=EVENTS.iloc[[4, 4, 4]].assign(ts=["1600000400", "1", "later"]))
    with pytest.raises(DataError, match=r"test.csv, line 4, column 'ts': 'later' is not a n"):
        source(tmp_path, {**NO_PATH, "files": PART_FILES}).load()
    write_parts(tmp_path, test=EVENTS.iloc[[4, 4]].assign(sku=["007", "ZZZ"]))
    with pytest.raises(DataError, match=r"test.csv, line 3, column 'sku': 'ZZZ' is absent"):
        source(tmp_path, {**NO_PATH, "files": PART_FILES}).load()
    data = source(tmp_path, {**NO_PATH, "files": PART_FILES}, unknown_items="drop").load()
    assert data.dropped == {"unknown item": 1} and data.interactions["part"].iloc[-1] == "test"
    with pytest.raises(DataError, match=r"no such file \(from data.source.interactions.files.val"):
        source(tmp_path, {**NO_PATH, "files": {**PART_FILES, "val": "gone.csv"}}).load()


@pytest.mark.parametrize(
    ("interactions", "key"),
    [
        ({"files": PART_FILES}, "data.source.interactions.files"),  # with path
        (NO_PATH, "data.source.interactions.path"),  # neither
        ({**NO_PATH, "files": {**PART_FILES, "holdout": "h.csv"}}, "interactions.files.holdout"),
        ({**NO_PATH, "files": {**PART_FILES, "dev": "d.csv"}}, "interactions.files.dev"),  # 2 vals
        ({**NO_PATH, "files": {"train": "train.csv"}}, r"interactions.files`.*\['test'\] missing"),
        ({**NO_PATH, "files": ["train.csv"]}, "data.source.interactions.files"),
        ({**NO_PATH, "files": PART_FILES, "split": "fold"}, "data.source.interactions.split"),
    ],
)
def test_bad_file_settings_name_the_key(tmp_path, interactions, key):
    with pytest.raises(ConfigError, match=key):
        source(tmp_path, interactions)


def test_config_takes_files_instead_of_path(config, tmp_path):
    write_parts(tmp_path)
    overrides = custom_overrides(
        tmp_path, "data.source.interactions.files={train:train.csv,val:val.parquet,test:test.csv}"
    )
    data = instantiate(config(overrides, fast=False).data.source).load()
    assert data.interactions["part"].tolist() == ["train"] * 3 + ["val", "test"]
