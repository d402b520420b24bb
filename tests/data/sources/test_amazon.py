"""Amazon 2018 / 2023 sources: real-data counts (SOURCE.md), malformed input, HTML titles."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys_lm.data.download import file_digest
from recsys_lm.data.markup import TitleFix, clean_title, first_sentence, join_text, strip_html
from recsys_lm.data.sources import amazon
from recsys_lm.data.sources.amazon import MD5_2018, Amazon2018, Amazon2023
from recsys_lm.data.text import render
from recsys_lm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[3]
FOLDER = "amazon2018-magazine-subscriptions"
SPAN = '<span class="a-size-medium a-color-secondary"'


def magazine(root: Path, **kwargs) -> Amazon2018:
    return Amazon2018(root=str(root), **kwargs)


# Real data: the counts stated in SOURCE.md.


@pytest.mark.real_data
def test_5core_counts_before_the_meta_policy(amazon2018_root):
    data = magazine(amazon2018_root, duplicates="keep_all", missing_meta="id_text").load()
    inter = data.interactions
    assert (len(inter), inter["user_id"].nunique(), inter["item_id"].nunique()) == (2375, 348, 157)
    assert data.dropped["item without metadata (text is its id)"] == 6  # 151 of 157 have meta
    assert inter["timestamp"].dtype == "int64" and inter["rating"].between(1, 5).all()


@pytest.mark.real_data
def test_5core_default_policies_drop_items_without_meta(amazon2018_root):
    data = magazine(amazon2018_root).load()
    assert len(data.items) == 151
    removed = data.dropped["duplicate (user, item) pair"]
    removed += data.dropped["interaction with an item without metadata"]
    assert len(data.interactions) + removed == 2375
    # 148 of the 151 titles are page fragments, all replaced by the description's first sentence.
    assert data.dropped["html title detected"] == data.dropped["html title replaced"] == 148
    titles = data.items.set_index("item_id")["title"]
    assert titles["B00005N7P0"] == "MAXIMUM PC is the ultimate upgrade for the savvy PC owners"
    assert titles["B00005N7QH"] == "Gourmet (1-year)"  # a real title is kept


@pytest.mark.real_data
def test_ratings_csv_counts_and_duplicate_policy(amazon2018_root):
    every = magazine(
        amazon2018_root, reviews="ratings", duplicates="keep_all", missing_meta="id_text"
    ).load()
    inter = every.interactions
    assert (len(inter), inter["user_id"].nunique(), inter["item_id"].nunique()) == (
        89_689,
        72_098,
        2_428,
    )
    latest = magazine(amazon2018_root, reviews="ratings", missing_meta="id_text").load()
    assert len(latest.interactions) == 89_689 - 1_371
    assert latest.dropped["duplicate (user, item) pair"] == 1_371
    assert not latest.interactions.duplicated(["user_id", "item_id"]).any()
    assert every.dropped["item without metadata (text is its id)"] == 2_428 - 2_320


@pytest.mark.real_data
def test_meta_lines_and_unique_asins(amazon2018_root):
    records = magazine(amazon2018_root).meta_records()
    assert len(records) == 3_385
    assert len({r.item_id for r in records}) == 2_320


@pytest.mark.real_data
def test_no_markup_reaches_item_text(amazon2018_root):
    data = magazine(amazon2018_root, reviews="ratings").load()
    items = data.items
    assert len(items) == 2_320
    for column in ("title", "brand", "description"):
        assert not items[column].str.contains("<|>|a-size|&amp;").any(), column
    assert not items["category"].str.contains("<|a-size|&amp;").any()  # " > " joins levels
    assert data.dropped["html title detected"] == 2_173
    assert data.dropped["html title replaced"] == 2_171
    assert data.dropped["html title empty"] == 2  # no description or brand to fall back on


@pytest.mark.real_data
def test_checksum_table_matches_the_files(amazon2018_root):
    for name, md5 in MD5_2018.items():
        assert file_digest(amazon2018_root / FOLDER / name, "md5") == md5, name


@pytest.mark.real_data
def test_config_loads_and_renders_without_markup(amazon2018_root, config):
    cfg = config(["data=amazon2018_magazine", f"data.root={amazon2018_root}"], fast=False)
    data = instantiate(cfg.data.source).load()
    texts = render(data.items, cfg.data.item_template, "data.item_template")
    assert len(texts) == 151 and not any("<" in t or "a-size" in t for t in texts)


# Synthetic 2018 files: each malformed input is reported with file, line and expectation.


def review(user: str = "u1", item: str = "i1", time: int = 1_000, rating: float = 5.0) -> dict:
    return {"reviewerID": user, "asin": item, "unixReviewTime": time, "overall": rating}


def meta(item: str = "i1", title: str = "Wired", **extra) -> dict:
    return {"asin": item, "title": title, "brand": "Conde Nast", "description": ["Tech."]} | extra


def encode(line: dict | str | bytes) -> bytes:
    """A dict is dumped as JSON; str and bytes are written as they are (malformed on purpose)."""
    if isinstance(line, bytes):
        return line
    return (json.dumps(line) if isinstance(line, dict) else line).encode()


def write_lines(file: Path, lines: list) -> Path:
    """One line per element, gzipped when the name ends in `.gz`."""
    raw = b"".join(encode(line) + b"\n" for line in lines)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(gzip.compress(raw) if file.suffix == ".gz" else raw)
    return file


def files2018(tmp_path: Path, reviews: list, metas: list | None = None) -> Path:
    write_lines(tmp_path / "amz" / "Cat_5.json.gz", reviews)
    write_lines(tmp_path / "amz" / "meta_Cat.json.gz", metas or [meta("i1"), meta("i2")])
    return tmp_path


def source(root: Path, **kwargs) -> Amazon2018:
    return Amazon2018(root=str(root), folder="amz", category="Cat", **kwargs)


def test_synthetic_5core_loads(tmp_path):
    root = files2018(tmp_path, [review("u1", "i1"), review("u1", "i2", 2_000)])
    data = source(root).load()
    assert data.name == "amazon2018_cat_5core"
    assert data.interactions["timestamp"].tolist() == [1_000, 2_000]
    assert data.items.columns.tolist() == ["item_id", "title", "brand", "category", "description"]
    assert data.dropped == {}


def test_truncated_gzip(tmp_path):
    root = files2018(tmp_path, [review(), review("u2")])
    file = root / "amz" / "Cat_5.json.gz"
    file.write_bytes(file.read_bytes()[:-12])  # cut the gzip trailer and some data
    with pytest.raises(DataError, match=r"Cat_5\.json\.gz: truncated or corrupt gzip"):
        source(root).load()


def test_file_that_is_not_gzip(tmp_path):
    root = files2018(tmp_path, [review()])
    (root / "amz" / "Cat_5.json.gz").write_text(json.dumps(review()) + "\n")
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        source(root).load()


def test_invalid_json_line_names_file_and_line(tmp_path):
    root = files2018(tmp_path, [review(), '{"reviewerID": "u2", "asin": '])
    with pytest.raises(DataError, match=r"Cat_5\.json\.gz, line 2: not valid JSON") as err:
        source(root).load()
    assert "expected one JSON object per line" in str(err.value)


def test_json_that_is_not_an_object(tmp_path):
    root = files2018(tmp_path, [review(), "[1, 2]"])
    with pytest.raises(DataError, match="line 2: a JSON list; expected a JSON object"):
        source(root).load()


def test_missing_key(tmp_path):
    broken = review()
    del broken["reviewerID"]
    root = files2018(tmp_path, [review(), review(), broken])
    with pytest.raises(DataError, match=r"line 3: missing key\(s\) \['reviewerID'\]"):
        source(root).load()


def test_missing_key_in_meta(tmp_path):
    root = files2018(tmp_path, [review()], [meta(), {"title": "no asin"}])
    with pytest.raises(DataError, match=r"meta_Cat\.json\.gz, line 2: missing key\(s\) \['asin'\]"):
        source(root).load()


def test_non_integer_timestamp(tmp_path):
    root = files2018(tmp_path, [review(time="soon")])
    with pytest.raises(
        DataError, match=r"line 1, column 'unixReviewTime': 'soon'; expected an int"
    ):
        source(root).load()


def test_non_utf8_bytes(tmp_path):
    bad = b'{"reviewerID": "u\xff", "asin": "i1", "unixReviewTime": 1}'
    root = files2018(tmp_path, [review(), bad])
    with pytest.raises(DataError, match=r"line 2: byte 0xff at column 18 is not UTF-8"):
        source(root).load()


def test_empty_file(tmp_path):
    root = files2018(tmp_path, [])
    with pytest.raises(DataError, match=r"Cat_5\.json\.gz: no records"):
        source(root).load()


def test_skip_counts_bad_lines_per_file(tmp_path):
    lines = [review(), "not json", b"\xff\xfe", review("u2", "i2"), {"asin": "i1"}]
    root = files2018(tmp_path, lines, [meta("i1"), "{oops", meta("i2")])
    data = source(root, on_bad_line="skip").load()
    assert len(data.interactions) == 2
    assert data.dropped == {"bad line in Cat_5.json.gz": 3, "bad line in meta_Cat.json.gz": 1}


def test_skip_cannot_repair_an_all_bad_file(tmp_path):
    root = files2018(tmp_path, ["nope", "nope"])
    with pytest.raises(DataError, match=r"no records \(2 bad line\(s\) skipped\)"):
        source(root, on_bad_line="skip").load()


def test_raw_files_are_the_files_read(tmp_path):
    root = files2018(tmp_path, [review()])
    assert source(root).raw_files() == [
        root / "amz" / "Cat_5.json.gz",
        root / "amz" / "meta_Cat.json.gz",
    ]
    plain = files2023(
        tmp_path, [review23("u1", "a", "P1", 1_588_687_728_000)], [meta23("P1", "X")], ".jsonl"
    )
    assert (
        Amazon2023(root=str(plain), category="All_Beauty").raw_files()[0].name == "All_Beauty.jsonl"
    )


def test_missing_files_are_named(tmp_path):
    (tmp_path / "amz").mkdir()
    with pytest.raises(DataError, match=r"missing \['Cat_5\.json\.gz', 'meta_Cat\.json\.gz'\]"):
        source(tmp_path).load()


@pytest.mark.parametrize(
    ("key", "value"),
    [("duplicates", "first"), ("missing_meta", "keep"), ("on_bad_line", "warn"), ("reviews", "5")],
)
def test_bad_policy_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match=f"data.source.{key}"):
        Amazon2018(**{key: value})


# Ratings CSV (headerless item,user,rating,timestamp).


def csv_folder(tmp_path: Path, text: str) -> Path:
    (tmp_path / "amz").mkdir(parents=True, exist_ok=True)
    (tmp_path / "amz" / "Cat.csv").write_text(text)
    write_lines(tmp_path / "amz" / "meta_Cat.json.gz", [meta("i1"), meta("i2")])
    return tmp_path


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("i2,u2,4.0", r"line 2: 3 fields instead of 4"),
        ("i2,u2,five,20", r"line 2, column 'rating': 'five' is not a number"),
        ("i2,u2,4.0,noon", r"line 2, column 'timestamp': 'noon' is not a number"),
        ("i2,u2,4.0,20,extra", r"line 2: 5 fields instead of 4"),
    ],
)
def test_bad_csv_row_names_line_and_column(tmp_path, row, message):
    root = csv_folder(tmp_path, f"i1,u1,5.0,10\n{row}\ni1,u3,3.0,30\n")
    with pytest.raises(DataError, match=r"Cat\.csv") as err:
        source(root, reviews="ratings").load()
    assert err.match(message) and "expected 4 comma-separated fields" in str(err.value)


def test_csv_skip_counts_bad_rows(tmp_path):
    text = "i1,u1,5.0,10\ni2,u2,4.0\ni2,u2,4.0,20,extra\ni2,u2,x,20\ni2,u3,2.0,40\n"
    data = source(csv_folder(tmp_path, text), reviews="ratings", on_bad_line="skip").load()
    assert data.interactions["user_id"].tolist() == ["u1", "u3"]
    assert data.interactions["timestamp"].tolist() == [10, 40]
    assert data.dropped == {"bad line in Cat.csv": 3}


def test_empty_csv(tmp_path):
    with pytest.raises(DataError, match=r"Cat\.csv: no records"):
        source(csv_folder(tmp_path, ""), reviews="ratings").load()


def test_csv_non_utf8_bytes(tmp_path):
    root = csv_folder(tmp_path, "")
    (root / "amz" / "Cat.csv").write_bytes(b"i1,u1,5.0,10\ni2,u\xff2,4.0,20\n")
    with pytest.raises(DataError, match=r"Cat\.csv, line 2: byte 0xff at column 5 is not UTF-8"):
        source(root, reviews="ratings").load()


# Policies.


def test_keep_last_keeps_the_latest_review_in_file_order(tmp_path):
    lines = [review("u1", "i1", 50, 1.0), review("u2", "i2", 10), review("u1", "i1", 30, 5.0)]
    root = files2018(tmp_path, lines)
    data = source(root).load()
    assert data.interactions[["user_id", "rating"]].values.tolist() == [["u1", 1.0], ["u2", 5.0]]
    assert data.dropped == {"duplicate (user, item) pair": 1}
    assert len(source(root, duplicates="keep_all").load().interactions) == 3


def test_missing_meta_drop_or_id_text(tmp_path):
    root = files2018(tmp_path, [review("u1", "i1"), review("u1", "i9"), review("u2", "i9")])
    dropped = source(root).load()
    assert dropped.items["item_id"].tolist() == ["i1"]
    assert dropped.dropped == {"interaction with an item without metadata": 2}
    kept = source(root, missing_meta="id_text").load()
    row = kept.items.set_index("item_id").loc["i9"]
    assert row["title"] == "item i9" and row["description"] == ""
    assert kept.dropped == {"item without metadata (text is its id)": 1}


def test_meta_of_another_category_is_an_error(tmp_path):
    root = files2018(tmp_path, [review("u1", "x1")])
    with pytest.raises(DataError, match=r"meta_Cat\.json\.gz: none of the 1 reviewed items"):
        source(root).load()


def test_catalogue_is_the_reviewed_items(tmp_path):
    root = files2018(tmp_path, [review("u1", "i2")], [meta("i1"), meta("i2"), meta("i3")])
    assert source(root).load().items["item_id"].tolist() == ["i2"]


def test_duplicate_meta_keeps_first_record_with_text(tmp_path):
    metas = [meta("i1", title="", description=[]), meta("i1", "Wired"), meta("i1", "Later")]
    data = source(files2018(tmp_path, [review()], metas)).load()
    assert data.items["title"].tolist() == ["Wired"]
    assert data.dropped == {"duplicate meta record": 2}


def test_html_titles_are_replaced_and_counted(tmp_path):
    metas = [
        meta("i1", SPAN, description=["<p>REASON is edited for people. More text.</p>"]),
        meta("i2", "<b>Vogue</b> Magazine"),
        meta("i3", ' Magazines" />', description=[], brand="Hearst"),
        meta("i4", "Disney &amp; Me", category=["Magazine Subscriptions", "Kids &amp; Teens"]),
    ]
    reviews = [review("u1", f"i{n}") for n in range(1, 5)]
    data = source(files2018(tmp_path, reviews, metas)).load()
    assert data.items["title"].tolist() == [
        "REASON is edited for people",
        "Vogue Magazine",
        "Hearst",
        "Disney & Me",
    ]
    assert data.items["category"].iloc[3] == "Magazine Subscriptions > Kids & Teens"
    assert data.dropped == {
        "html title detected": 3,
        "html title cleaned": 1,
        "html title replaced": 2,
    }


def test_top_level_category_equal_to_main_cat_is_skipped(tmp_path):
    metas = [
        meta(category=["Magazine Subscriptions", "Technology"], main_cat="Magazine Subscriptions")
    ]
    data = source(files2018(tmp_path, [review()], metas)).load()
    assert data.items["category"].tolist() == ["Technology"]


def test_description_is_plain_and_truncated(tmp_path):
    words = " ".join(["word"] * 200)
    metas = [meta(description=["<div>A &amp; B</div>", "", f"  {words}  "])]
    data = source(files2018(tmp_path, [review()], metas), max_description_chars=100).load()
    text = data.items["description"].iloc[0]
    assert text.startswith("A & B word word") and text.endswith(" ...") and len(text) <= 104


def test_prepare_downloads_missing_files_with_known_md5(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(amazon, "fetch", lambda *args: calls.append(args))
    Amazon2018(root=str(tmp_path), reviews="ratings", download=True).prepare()
    base = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2"
    csv, meta_file = "Magazine_Subscriptions.csv", "meta_Magazine_Subscriptions.json.gz"
    assert calls == [
        (f"{base}/categoryFilesSmall/{csv}", tmp_path / FOLDER / csv, MD5_2018[csv], "md5"),
        (
            f"{base}/metaFiles2/{meta_file}",
            tmp_path / FOLDER / meta_file,
            MD5_2018[meta_file],
            "md5",
        ),
    ]
    calls.clear()
    Amazon2018(root=str(tmp_path), category="Beauty", reviews="full", download=True).prepare()
    assert calls[0][0] == f"{base}/categoryFiles/Beauty.json.gz" and calls[0][2] is None


def test_prepare_without_download_fetches_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(amazon, "fetch", lambda *args: pytest.fail("no download expected"))
    Amazon2018(root=str(tmp_path)).prepare()


# HTML cleaning.


@pytest.mark.parametrize(
    ("title", "fallbacks", "expected", "fix"),
    [
        (SPAN, ["MAXIMUM PC is the upgrade. Every month..."], "MAXIMUM PC is the upgrade", "replaced"),
        (' Magazines" />', ["", "Hearst Magazines"], "Hearst Magazines", "replaced"),
        ("<b>Wired</b> &amp; Co", [], "Wired & Co", "cleaned"),
        ("<span class='t'>Vogue</span>", [], "Vogue", "cleaned"),
        ("var d = new Date().getTime(); Vogue", ["Fashion monthly"], "Fashion monthly", "replaced"),
        ("<i>" + "long " * 50 + "</i>", ["Short one"], "Short one", "replaced"),
        ("<div><img src='x.jpg'/></div>", ["SPID SHORT DESCRIPTION NOT AVAILABLE", "Brand"], "Brand", "replaced"),
        (SPAN, ["", "<br>"], "", "empty"),
        ("Disney &amp; Me", [], "Disney & Me", "kept"),
        ("Rolling Stone {the Country Issue}", [], "Rolling Stone {the Country Issue}", "kept"),
        ("  Time   Out ", [], "Time Out", "kept"),
    ],
)  # fmt: skip
def test_clean_title(title, fallbacks, expected, fix):
    assert clean_title(title, fallbacks) == (expected, TitleFix(fix))


def test_strip_html_removes_tags_entities_scripts():
    text = "<p>Fun&nbsp;&amp;\n games</p><script>var x = 1;</script>&lt;b&gt;bold&lt;/b&gt; <a href"
    assert strip_html(text) == "Fun & games bold"


def test_first_sentence_joins_abbreviations_and_cuts_long_text():
    assert first_sentence("Inc. is the only magazine for owners. More.") == (
        "Inc. is the only magazine for owners"
    )
    assert first_sentence("First line\nsecond line") == "First line"
    assert first_sentence("<p>Para one</p><p>Para two</p>") == "Para one"
    long = first_sentence("word " * 100, limit=30)
    assert long == "word word word word word word" and len(long) <= 30


def test_join_text_drops_placeholders_and_blanks():
    assert join_text(["", "SPID SHORT DESCRIPTION NOT AVAILABLE  ", "A", None, "B"]) == "A B"


# Amazon 2023: milliseconds, parent_asin items, .jsonl or .jsonl.gz.


def review23(user: str, asin: str, parent: str, ms: int, rating: float = 4.0) -> dict:
    return {
        "rating": rating,
        "title": "Nice",
        "text": "Works well",
        "asin": asin,
        "parent_asin": parent,
        "user_id": user,
        "timestamp": ms,
    }


def meta23(parent: str, title: str, **extra) -> dict:
    record = {
        "parent_asin": parent,
        "title": title,
        "main_category": "All Beauty",
        "categories": [],
        "description": ["A gentle cleanser."],
        "store": "Acme",
        "features": ["Vegan", "200 ml"],
    }
    return record | extra


def files2023(tmp_path: Path, reviews: list, metas: list, suffix: str = ".jsonl.gz") -> Path:
    write_lines(tmp_path / "amazon2023" / f"All_Beauty{suffix}", reviews)
    write_lines(tmp_path / "amazon2023" / f"meta_All_Beauty{suffix}", metas)
    return tmp_path


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl"])
def test_2023_milliseconds_and_parent_asin(tmp_path, suffix):
    reviews = [
        review23("u1", "B01-red", "P1", 1_588_687_728_923),
        review23("u1", "B01-blue", "P1", 1_588_687_729_999),
        review23("u2", "B02", "P2", 1_600_000_000_000, 5.0),
    ]
    metas = [
        meta23("P1", "Foam Cleanser", categories=["Beauty", "Skin Care"]),
        meta23("P2", "Lip Balm"),
    ]
    data = Amazon2023(
        root=str(files2023(tmp_path, reviews, metas, suffix)), category="All_Beauty"
    ).load()
    assert data.name == "amazon2023_all_beauty"
    assert data.interactions["item_id"].tolist() == ["P1", "P2"]  # variants share a parent
    assert data.interactions["timestamp"].tolist() == [1_588_687_729, 1_600_000_000]
    assert data.dropped == {"duplicate (user, item) pair": 1}
    items = data.items.set_index("item_id")
    assert items.loc["P1", "category"] == "Beauty > Skin Care"
    assert items.loc["P2", "category"] == "All Beauty"  # main_category when no categories
    assert items.loc["P2", "brand"] == "Acme" and items.loc["P2", "features"] == "Vegan; 200 ml"


def test_2023_seconds_are_rejected(tmp_path):
    root = files2023(tmp_path, [review23("u1", "a", "P1", 1_588_687_728)], [meta23("P1", "X")])
    with pytest.raises(
        DataError, match=r"All_Beauty\.jsonl\.gz, line 1, column 'timestamp': .*unix milliseconds"
    ):
        Amazon2023(root=str(root), category="All_Beauty").load()


def test_2023_missing_parent_asin(tmp_path):
    broken = review23("u1", "a", "P1", 1_588_687_728_000)
    del broken["parent_asin"]
    root = files2023(tmp_path, [broken], [meta23("P1", "X")])
    with pytest.raises(DataError, match=r"line 1: missing key\(s\) \['parent_asin'\]"):
        Amazon2023(root=str(root), category="All_Beauty").load()


def test_2023_category_is_required():
    with pytest.raises(ConfigError, match="data.source.category"):
        Amazon2023()


def test_2023_prepare_downloads_gz_without_checksum(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(amazon, "fetch", lambda *args: calls.append(args))
    Amazon2023(root=str(tmp_path), category="All_Beauty", download=True).prepare()
    base = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw"
    assert [(c[0], c[2]) for c in calls] == [
        (f"{base}/review_categories/All_Beauty.jsonl.gz", None),
        (f"{base}/meta_categories/meta_All_Beauty.jsonl.gz", None),
    ]
    assert calls[0][1] == tmp_path / "amazon2023" / "All_Beauty.jsonl.gz"


def test_2023_config_requires_a_category(config):
    cfg = config(["data=amazon2023"], fast=False)
    assert OmegaConf.is_missing(cfg.data.source, "category")
    cfg = config(["data=amazon2023", "data.source.category=All_Beauty"], fast=False)
    assert instantiate(cfg.data.source).candidates("meta")[-1] == "meta_All_Beauty.jsonl.gz"
