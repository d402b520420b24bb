"""MIND source: real-sample counts (SOURCE.md), history timing, missing-text policy, bad input."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from hydra.utils import instantiate

from recsys_lm.data import download as download_module
from recsys_lm.data.sources import mind
from recsys_lm.data.sources.mind import MIND, SPLIT_OFFSET, read_behaviors
from recsys_lm.data.split import make_split
from recsys_lm.data.text import render
from recsys_lm.errors import ConfigError, DataError
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[2]
FOLDER = "mind-small-sample"
SPLIT = "MINDsmall_train"


def placeholder(items: pd.DataFrame) -> pd.Series:
    """Items made by missing_text="keep" for ids without a news.tsv row."""
    return items["abstract"] == "news " + items["item_id"] + " (no text)"


# Real data: the counts stated in SOURCE.md.


@pytest.mark.real_data
def test_news_matches_source_counts(mind_root):
    items = MIND(root=str(mind_root), missing_text="keep").load().items
    news = items[~placeholder(items)]
    assert len(news) == 2000 and news["item_id"].is_unique
    assert news["category"].nunique() == 15
    assert (news["abstract"] == "").sum() == 99
    assert (news["title"] != "").all()


@pytest.mark.real_data
def test_behaviors_match_source_counts(mind_root):
    data = MIND(root=str(mind_root), missing_text="keep").load()
    shown = data.impressions
    assert len(shown) == 189_359
    assert shown["impression_id"].nunique() == 5000
    assert shown["user_id"].nunique() == 4637 and len(data.users) == 4637
    assert shown["label"].sum() == 7542
    assert data.interactions["impression_id"].notna().sum() == 7542  # clicked candidates
    assert shown["timestamp"].between(1573257600, 1573775999).all()  # 2019-11-09 .. 11-14 UTC
    candidates, history = read_behaviors(mind_root / FOLDER / SPLIT / "behaviors.tsv", SPLIT, 0)
    assert candidates["impression_id"].nunique() - history["impression_id"].nunique() == 107
    referenced = pd.concat([data.interactions["item_id"], shown["item_id"]]).unique()
    assert len(referenced) == 22_592
    assert (
        ~placeholder(data.items.set_index("item_id").loc[referenced].reset_index())
    ).sum() == 838
    assert data.dropped == {}


@pytest.mark.real_data
def test_drop_keeps_exactly_the_rows_with_text(mind_root):
    kept = MIND(root=str(mind_root), missing_text="keep").load()
    data = MIND(root=str(mind_root)).load()
    news = set(kept.items.loc[~placeholder(kept.items), "item_id"])
    is_history = kept.interactions["impression_id"].isna()
    history_text = kept.interactions.loc[is_history, "item_id"].isin(news)
    candidate_text = kept.impressions["item_id"].isin(news)
    click_text = candidate_text[kept.impressions["label"] == 1]
    # SOURCE.md: 3.9% of history clicks and 2.8% of candidates have text.
    assert round(history_text.mean(), 3) == 0.039 and round(candidate_text.mean(), 3) == 0.028

    assert len(data.items) == 2000 and set(data.items["item_id"]) == news
    assert data.interactions["impression_id"].isna().sum() == history_text.sum()
    assert data.interactions["impression_id"].notna().sum() == click_text.sum()
    assert len(data.impressions) == candidate_text.sum()
    assert data.dropped["history click without text"] == (~history_text).sum()
    assert data.dropped["impression candidate without text"] == (~candidate_text).sum()
    assert data.dropped["impression click without text"] == (~click_text).sum()
    assert data.dropped["news id without text"] == 22_592 - 838
    assert data.dropped["impression without any candidate text"] == (
        5000 - data.impressions["impression_id"].nunique()
    )
    assert data.dropped["user without any text"] == 4637 - len(data.users)


@pytest.mark.real_data
def test_real_history_clicks_precede_every_impression(mind_root):
    data = MIND(root=str(mind_root), missing_text="keep").load()
    inter = data.interactions
    assert inter["timestamp"].dtype == "int64"
    last_history = inter[inter["impression_id"].isna()].groupby("user_id")["timestamp"].max()
    first_shown = data.impressions.groupby("user_id")["timestamp"].min()
    assert (last_history < first_shown.reindex(last_history.index)).all()


@pytest.mark.real_data
def test_config_templates_render_the_sample(mind_root, tmp_path):
    cfg = make_config(tmp_path, ["data=mind_small", f"data.root={mind_root}"], fast=False)
    data = instantiate(cfg.data.source).load()
    texts = render(data.items, cfg.data.item_template, "data.item_template")
    assert texts[0].endswith("news, newspolitics.")  # "<title>. <category>, <subcategory>."
    assert render(data.items, cfg.data.history_template, "data.history_template")[0]


# Synthetic folders: parsing, timing and validation without the real data.

NEWS = [
    "N1\tnews\tnewsus\tFirst title\tAn abstract\thttps://x/1\t[]\t[]",
    "N2\tsports\tgolf\tSecond title\t\thttps://x/2\t[]\t[]",
    'N3\tnews\tnewsworld\tThird "quoted" title\tMore\thttps://x/3\t[]\t[]',
]
BEHAVIORS = [
    "1\tU1\t11/12/2019 2:14:46 PM\tN1 N9 N2\tN3-1 N8-0 N2-0",
    "2\tU1\t11/13/2019 9:00:00 AM\tN1 N9 N2\tN2-1 N3-0",
    "3\tU2\t11/11/2019 1:00:00 AM\t\tN1-0 N3-1",
]
T1 = 1573568086  # 11/12/2019 2:14:46 PM UTC, U1's first impression


def write_split(
    root: Path,
    news: list[str] | bytes = NEWS,
    behaviors: list[str] | bytes = BEHAVIORS,
    split: str = SPLIT,
    end: str = "\n",
) -> Path:
    folder = root / FOLDER / split
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("news.tsv", news), ("behaviors.tsv", behaviors)):
        data = lines if isinstance(lines, bytes) else "".join(f"{x}{end}" for x in lines).encode()
        (folder / name).write_bytes(data)
    return folder


def test_history_clicks_come_once_in_order_before_the_first_impression(tmp_path):
    write_split(tmp_path)
    data = MIND(root=str(tmp_path), missing_text="keep").load()
    u1 = data.interactions[data.interactions["user_id"] == "U1"]
    history = u1[u1["impression_id"].isna()]
    # U1's history is repeated on both impressions: counted once, in list order.
    assert history["item_id"].tolist() == ["N1", "N9", "N2"]
    assert history["timestamp"].tolist() == [T1 - 3, T1 - 2, T1 - 1]
    clicks = u1[u1["impression_id"].notna()]
    assert clicks["item_id"].tolist() == ["N3", "N2"]
    assert clicks["timestamp"].tolist() == [T1, T1 + 18 * 3600 + 45 * 60 + 14]
    assert (data.interactions["label"] == 1).all()
    assert data.interactions.loc[data.interactions["user_id"] == "U2", "item_id"].tolist() == ["N3"]


def test_a_news_id_repeated_within_one_history_is_two_clicks(tmp_path):
    behaviors = ["1\tU1\t11/12/2019 2:14:46 PM\tN1 N2 N1\tN3-1", *BEHAVIORS[1:]]
    write_split(tmp_path, behaviors=behaviors)
    data = MIND(root=str(tmp_path)).load()
    history = data.interactions[data.interactions["impression_id"].isna()]
    assert history["item_id"].tolist() == ["N1", "N2", "N1"]
    assert history["timestamp"].is_monotonic_increasing and history["timestamp"].is_unique


def test_impressions_hold_every_candidate_with_its_label(tmp_path):
    write_split(tmp_path)
    shown = MIND(root=str(tmp_path), missing_text="keep").load().impressions
    assert len(shown) == 7 and shown["label"].tolist() == [1, 0, 0, 1, 0, 0, 1]
    first = shown[shown["impression_id"] == 1]
    assert first["item_id"].tolist() == ["N3", "N8", "N2"]
    assert (first["timestamp"] == T1).all() and (first["user_id"] == "U1").all()
    assert set(shown.columns) >= {"impression_id", "user_id", "item_id", "timestamp", "label"}


def test_drop_counts_every_removed_row(tmp_path):
    write_split(tmp_path)
    data = MIND(root=str(tmp_path)).load()
    assert data.dropped == {
        "history click without text": 1,  # N9 (once: U1's history is shown twice)
        "impression candidate without text": 1,  # N8
        "impression click without text": 0,
        "news id without text": 2,  # N8, N9
        "impression without any candidate text": 0,
        "user without any text": 0,
    }
    assert set(data.items["item_id"]) == {"N1", "N2", "N3"}
    assert len(data.impressions) == 6 and "N8" not in set(data.impressions["item_id"])
    history = data.interactions[data.interactions["impression_id"].isna()]
    assert history["timestamp"].tolist() == [T1 - 3, T1 - 1]  # N9's time is left unused


def test_keep_makes_placeholder_items_without_content(tmp_path):
    write_split(tmp_path)
    items = MIND(root=str(tmp_path), missing_text="keep").load().items.set_index("item_id")
    assert items.loc["N9"].to_dict() == {
        "title": "",
        "abstract": "news N9 (no text)",
        "category": "",
        "subcategory": "",
    }
    assert items.loc["N2", "abstract"] == "" and items.loc["N3", "title"] == 'Third "quoted" title'


def test_splits_merge_with_unique_impression_ids(tmp_path):
    write_split(tmp_path)
    dev = ["1\tU1\t11/15/2019 8:00:00 AM\tN1 N9 N2\tN1-1 N3-0"]
    write_split(tmp_path, news=NEWS[:1], behaviors=dev, split="MINDsmall_dev")
    source = MIND(root=str(tmp_path), splits=[SPLIT, "MINDsmall_dev"], missing_text="keep")
    data = source.load()
    shown = data.impressions
    assert sorted(shown["impression_id"].unique()) == [1, 2, 3, SPLIT_OFFSET + 1]
    assert shown.loc[shown["impression_id"] == SPLIT_OFFSET + 1, "split"].eq("MINDsmall_dev").all()
    assert data.items["item_id"].is_unique
    history = data.interactions[data.interactions["impression_id"].isna()]
    assert history[history["user_id"] == "U1"]["item_id"].tolist() == ["N1", "N9", "N2"]
    assert source.name == f"{FOLDER}:{SPLIT}+MINDsmall_dev"
    assert source.raw_files()[-1] == tmp_path / FOLDER / "MINDsmall_dev" / "behaviors.tsv"


DEV = "MINDsmall_dev"
DEV_BEHAVIORS = [
    "1\tU1\t11/15/2019 8:00:00 AM\tN1 N9 N2\tN1-1 N3-0",
    "2\tU3\t11/15/2019 9:00:00 AM\tN2\tN3-1 N1-0",  # a user only in dev
]


def test_train_and_dev_folders_give_mind_protocol_parts(tmp_path):
    write_split(tmp_path)
    write_split(tmp_path, behaviors=DEV_BEHAVIORS, split=DEV)
    data = MIND(root=str(tmp_path), splits=[SPLIT, DEV], missing_text="keep").load()
    # History clicks precede the logs: train, even U3's (timed just before its dev impression).
    assert (
        data.interactions.loc[data.interactions["impression_id"].isna(), "part"] == "train"
    ).all()
    clicks = data.interactions.dropna(subset=["impression_id"])
    parts = clicks.set_index(["user_id", "impression_id"])["part"].to_dict()
    # Train folder: its last day is 11/13, so U1's 11/13 click is val; dev clicks are test.
    assert parts == {
        ("U1", 1): "train",
        ("U1", 2): "val",
        ("U2", 3): "train",
        ("U1", SPLIT_OFFSET + 1): "test",
        ("U3", SPLIT_OFFSET + 2): "test",
    }
    assert MIND.parser_version == 2


def test_predefined_split_from_train_and_dev_folders(tmp_path):
    write_split(tmp_path)
    write_split(tmp_path, behaviors=DEV_BEHAVIORS, split=DEV)
    inter = MIND(root=str(tmp_path), splits=[DEV, SPLIT]).load().interactions  # order is free
    users = {u: k for k, u in enumerate(inter["user_id"].unique())}
    items = {i: k for k, i in enumerate(inter["item_id"].unique())}
    frame = pd.DataFrame(
        {
            "user": inter["user_id"].map(users),
            "item": inter["item_id"].map(items),
            "timestamp": inter["timestamp"],
            "part": inter["part"],
        }
    )
    split = make_split(frame, len(users), "predefined")
    u1, u3 = users["U1"], users["U3"]
    names = {k: i for i, k in items.items()}
    assert [names[i] for i in split.train[u1]] == ["N1", "N2", "N3"]  # N9: no text, dropped
    assert [names[i] for i in split.val[u1]] == ["N2"]
    assert [names[i] for i in split.test[u1]] == ["N1"]
    assert [names[i] for i in split.history(u3, "test")] == ["N2"]
    assert [names[i] for i in split.test[u3]] == ["N3"]


@pytest.mark.parametrize("splits", [[SPLIT], [SPLIT, "MINDsmall_extra"], [DEV]])
def test_other_folders_have_no_part_and_predefined_refuses(tmp_path, splits):
    write_split(tmp_path)
    write_split(tmp_path, split="MINDsmall_extra")
    write_split(tmp_path, behaviors=DEV_BEHAVIORS, split=DEV)
    inter = MIND(root=str(tmp_path), splits=splits).load().interactions
    assert "part" not in inter.columns
    frame = pd.DataFrame({"user": 0, "item": 0, "timestamp": inter["timestamp"]})
    with pytest.raises(ConfigError, match=r"data.split.method.*a `part` column"):
        make_split(frame, 1, "predefined")


def test_windows_line_endings_are_read(tmp_path):
    write_split(tmp_path, end="\r\n")
    data = MIND(root=str(tmp_path), missing_text="keep").load()
    assert len(data.impressions) == 7 and data.impressions["item_id"].iloc[-1] == "N3"


def test_mind_config_composes_and_loads_a_folder(tmp_path):
    write_split(tmp_path / "data")
    cfg = make_config(tmp_path, ["data=mind_small", f"data.root={tmp_path / 'data'}"], fast=False)
    assert cfg.data.source.missing_text == "drop" and list(cfg.data.source.splits) == [SPLIT]
    data = instantiate(cfg.data.source).load()
    texts = render(data.items, cfg.data.item_template, "data.item_template")
    assert texts[0] == "First title. news, newsus."


# Malformed input: the message names the file, the line and what was expected.


SHORT_NEWS = "N2\tsports\tgolf\tTitle\t\thttps://x/2\t[]"  # 7 columns
SHORT_LOG = "3\tU2\t11/11/2019 1:00:00 AM\tN1-0 N3-1"  # 4: the empty history lost its tab
LONG_LOG = "3\tU2\t11/11/2019 1:00:00 AM\t\tN1-0 N3-1\textra"  # 6


@pytest.mark.parametrize(
    ("name", "news", "behaviors", "line", "found"),
    [
        ("news.tsv", [NEWS[0], SHORT_NEWS, NEWS[2]], BEHAVIORS, 2, "7 fields instead of 8"),
        ("behaviors.tsv", NEWS, [*BEHAVIORS[:2], SHORT_LOG], 3, "4 fields instead of 5"),
        ("behaviors.tsv", NEWS, [*BEHAVIORS[:2], LONG_LOG], 3, "6 fields instead of 5"),
        ("behaviors.tsv", NEWS, [BEHAVIORS[0], "", *BEHAVIORS[1:]], 2, "1 fields instead of 5"),
    ],
)
def test_wrong_column_count_names_file_and_line(tmp_path, name, news, behaviors, line, found):
    write_split(tmp_path, news=news, behaviors=behaviors)
    with pytest.raises(DataError, match=rf"{name}, line {line}: {found} .*; expected"):
        MIND(root=str(tmp_path)).load()


@pytest.mark.parametrize(
    "time", ["2019-11-12 14:14:46", "11/12/2019 14:14:46", "13/40/2019 2:14:46 PM"]
)
def test_bad_time_names_line_and_format(tmp_path, time):
    write_split(tmp_path, behaviors=[*BEHAVIORS[:1], f"2\tU1\t{time}\tN1\tN2-1"])
    with pytest.raises(
        DataError, match=r"behaviors.tsv, line 2, column 'time': .*M/D/YYYY h:mm:ss AM/PM"
    ):
        MIND(root=str(tmp_path)).load()


@pytest.mark.parametrize("token", ["N2-2", "N2", "-1", "N2-1-x", "N2_1"])
def test_bad_candidate_names_line(tmp_path, token):
    write_split(
        tmp_path, behaviors=[*BEHAVIORS[:2], f"3\tU2\t11/11/2019 1:00:00 AM\t\tN1-0 {token}"]
    )
    with pytest.raises(DataError, match=r"behaviors.tsv, line 3, column 'impressions': .*<0\|1>"):
        MIND(root=str(tmp_path)).load()


def test_impression_without_candidates_names_line(tmp_path):
    write_split(tmp_path, behaviors=[*BEHAVIORS[:1], "2\tU1\t11/13/2019 9:00:00 AM\tN1\t"])
    with pytest.raises(
        DataError,
        match=r"behaviors.tsv, line 2, column 'impressions': '' has no impression candidates",
    ):
        MIND(root=str(tmp_path)).load()


@pytest.mark.parametrize("name", ["news.tsv", "behaviors.tsv"])
def test_empty_file_names_the_file(tmp_path, name):
    folder = write_split(tmp_path)
    (folder / name).write_bytes(b"")
    with pytest.raises(DataError, match=rf"{name}: file is empty; expected lines of"):
        MIND(root=str(tmp_path)).load()


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    news = "\n".join(NEWS).encode().replace(b"Second", b"S\xe9cond") + b"\n"
    write_split(tmp_path, news=news)
    with pytest.raises(DataError, match=r"news.tsv, line 2: byte 0xe9 at column 17 is not UTF-8"):
        MIND(root=str(tmp_path)).load()


def test_missing_files_and_bad_settings(tmp_path, monkeypatch):
    (tmp_path / FOLDER / SPLIT).mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing \['MINDsmall_train/news.tsv'"):
        MIND(root=str(tmp_path)).load()
    write_split(tmp_path)
    with pytest.raises(ConfigError, match="data.source.missing_text"):
        MIND(root=str(tmp_path), missing_text="fill").load()
    with pytest.raises(ConfigError, match="data.source.splits"):
        MIND(root=str(tmp_path), splits=[]).load()
    monkeypatch.delenv("RECSYS_LM_DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match="data.root"):
        MIND().load()


def test_repeated_ids_name_the_line(tmp_path):
    write_split(tmp_path, news=[*NEWS, NEWS[0]])
    with pytest.raises(DataError, match=r"news.tsv, line 4, column 'news_id': 'N1' is repeated"):
        MIND(root=str(tmp_path)).load()
    write_split(tmp_path, behaviors=[*BEHAVIORS, BEHAVIORS[0]])
    with pytest.raises(
        DataError, match=r"behaviors.tsv, line 4, column 'impression_id': 1 is repeated"
    ):
        MIND(root=str(tmp_path)).load()


# Download: official URL, no checksum (a warning instead), unzip into the split folder.


def test_prepare_downloads_each_absent_split_unverified(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, target, checksum, algorithm="sha256"):
        calls.append((url, checksum))
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "w") as bundle:
            bundle.writestr("news.tsv", "\n".join(NEWS) + "\n")
            bundle.writestr("behaviors.tsv", "\n".join(BEHAVIORS) + "\n")
        return target

    monkeypatch.setattr(mind, "download", fake_download)
    source = MIND(root=str(tmp_path), folder="mind-small", download=True, cache_dir=str(tmp_path))
    source.prepare()
    assert calls == [(f"https://mind201910small.blob.core.windows.net/release/{SPLIT}.zip", None)]
    assert len(source.load().impressions) == 6
    source.prepare()  # files present: nothing fetched again
    assert len(calls) == 1
    with pytest.raises(ConfigError, match="official split"):
        MIND(root=str(tmp_path), splits=["mine"], download=True).prepare()


def test_download_without_checksum_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(
        download_module.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"zip bytes")
    )
    target = tmp_path / "MINDsmall_train.zip"
    with caplog.at_level(logging.WARNING, logger="recsys_lm.data.download"):
        assert download_module.download("https://example/x.zip", target, None) == target
        assert target.read_bytes() == b"zip bytes"
        download_module.download("https://example/x.zip", target, None)  # reused as is
    assert "not verified" in caplog.text and "reusing" in caplog.text
    with pytest.raises(DataError, match="does not match"):
        download_module.download("https://example/x.zip", tmp_path / "y.zip", "0" * 64)
