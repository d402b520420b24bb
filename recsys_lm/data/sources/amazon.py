"""Amazon product reviews (McAuley Lab, UCSD): the 2018 release and the 2023 release.

Both releases are reviews (who rated what, when) plus one metadata record per product (title,
brand, categories, description). The two sources below share everything except file names,
record keys and units; the shared part is `_AmazonSource`.

Policies are explicit and their effects are counted in `CanonicalData.dropped`:
- `duplicates`: a user who reviewed the same item twice ("keep_last": keep the latest review;
  "keep_all": keep every review).
- `missing_meta`: an item without a metadata record ("drop": remove its interactions;
  "id_text": keep it with the text "item <asin>", which is the id rather than real text).
- `on_bad_line`: a malformed line ("error": stop; "skip": skip and count it).
Titles that are scraped page fragments (most of Magazine_Subscriptions 2018) are cleaned or
replaced, never fed as markup (see recsys_lm/data/markup.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.download import dataset_folder
from recsys_lm.data.download import download as fetch
from recsys_lm.data.markup import TitleFix, clean_title, join_text, strip_html
from recsys_lm.data.readers import (
    BadRecord,
    Layout,
    check_on_bad_line,
    integer,
    number_or_nan,
    read_json_lines,
    read_strings,
)
from recsys_lm.errors import ConfigError, DataError

URL_2018 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2"
URL_2023 = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw"
# md5 of the files whose digest is known (the copies described in the dataset's SOURCE.md).
MD5_2018 = {
    "Magazine_Subscriptions.csv": "b18519fa2cdad35a99e68ee8ee391930",
    "Magazine_Subscriptions_5.json.gz": "43dcd7688fee737fd659f2928fec2f99",
    "meta_Magazine_Subscriptions.json.gz": "f05ddfa43790956891a2e71e6776dd26",
}
DUPLICATES = ("keep_last", "keep_all")
MISSING_META = ("drop", "id_text")
REVIEWS_2018 = ("5core", "full", "ratings")
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "rating"]
# Below this a 2023 timestamp cannot be milliseconds (it would be before March 1973).
MIN_MILLISECONDS = 100_000_000_000


@dataclass
class MetaRecord:
    """The raw text fields of one metadata line, before cleaning."""

    item_id: str
    title: str
    brand: str
    categories: list[str]
    description: list[str]
    features: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class _AmazonSource:
    """What both releases share: folders, download, policies, items built from metadata."""

    root: str | None = None  # folder of datasets; None: $RECSYS_LM_DATA_ROOT
    folder: str  # sub-folder of `root` with the files
    category: str  # file stem, e.g. "Magazine_Subscriptions"
    # Fetch missing files into the folder read (<cache_dir>/<folder> when no root is set).
    download: bool = False
    cache_dir: str = "~/.cache/recsys_lm"
    duplicates: str = "keep_last"  # see DUPLICATES and the module docstring
    missing_meta: str = "drop"  # see MISSING_META
    on_bad_line: str = "error"  # see recsys_lm/data/readers.py
    max_description_chars: int = 500  # long blurbs would be cut by the tokenizer anyway
    # filename -> md5 (or None: verify nothing), overriding the built-in table.
    checksums: Mapping[str, str | None] = field(default_factory=dict)

    parser_version: ClassVar[int] = 1  # bump when load() gives other output for the same files
    release: ClassVar[str] = ""  # "2018" | "2023": names the dataset
    features_column: ClassVar[bool] = False  # whether items get a `features` column (2023)
    meta_required: ClassVar[tuple[str, ...]] = ()  # keys every meta line must have; [0] is the id
    known_md5: ClassVar[dict[str, str]] = {}  # filename -> md5 where the digest is known

    def __post_init__(self) -> None:
        if not self.category or self.category == "???":
            raise ConfigError("data.source.category", self.category, "an Amazon category name")
        _choice("data.source.duplicates", self.duplicates, DUPLICATES)
        _choice("data.source.missing_meta", self.missing_meta, MISSING_META)
        check_on_bad_line(self.on_bad_line)

    @property
    def name(self) -> str:
        return f"amazon{self.release}_{self.category.lower()}"

    @property
    def path(self) -> Path:
        return dataset_folder(self.root, self.folder, self.download, self.cache_dir)

    # Release-specific parts.
    def candidates(self, kind: str) -> list[str]:
        """File names that may hold `kind` ("reviews" | "meta"); the last one is downloadable."""
        raise NotImplementedError

    def url(self, filename: str) -> str:
        raise NotImplementedError

    def read_interactions(self, file: Path, dropped: dict[str, int]) -> pd.DataFrame:
        """`INTERACTION_COLUMNS` in file order; bad lines skipped are added to `dropped`."""
        raise NotImplementedError

    def parse_meta(self, record: dict[str, Any]) -> MetaRecord:
        raise NotImplementedError

    # Shared parts.
    def checksum(self, filename: str) -> str | None:
        return {**self.known_md5, **dict(self.checksums)}.get(filename)

    def find(self, kind: str) -> Path | None:
        path = self.path
        return next((path / n for n in self.candidates(kind) if (path / n).exists()), None)

    def raw_files(self) -> list[Path]:
        """The files `load()` reads (the canonical cache hashes them); absent ones as expected."""
        return [self.find(k) or self.path / self.candidates(k)[-1] for k in ("reviews", "meta")]

    def prepare(self) -> None:
        if not self.download:
            return
        for kind in ("reviews", "meta"):
            if self.find(kind) is None:
                name = self.candidates(kind)[-1]
                fetch(self.url(name), self.path / name, self.checksum(name), "md5")

    def load(self) -> CanonicalData:
        reviews, meta = self._files()
        dropped: dict[str, int] = {}
        interactions = self.read_interactions(reviews, dropped)
        if self.duplicates == "keep_last":
            kept = _keep_last(interactions)
            _count(dropped, "duplicate (user, item) pair", len(interactions) - len(kept))
            interactions = kept
        wanted = set(interactions["item_id"])
        items = self._items(self.meta_records(meta, dropped, wanted), dropped)
        interactions, items = self._apply_missing_meta(interactions, items, meta, dropped)
        return CanonicalData(self.name, items, interactions, dropped=dropped)

    def meta_records(
        self,
        file: Path | None = None,
        dropped: dict[str, int] | None = None,
        wanted: set[str] | None = None,
    ) -> list[MetaRecord]:
        """Every metadata line (or those of `wanted` item ids), raw, in file order."""
        file = file or self._files()[1]

        def parse(record: dict[str, Any]) -> MetaRecord | None:
            if wanted is not None and str(record[self.meta_required[0]]) not in wanted:
                return None  # not reviewed: skip the parsing work
            return self.parse_meta(record)

        rows, skipped = read_json_lines(file, self.meta_required, parse, self.on_bad_line)
        _count(dropped if dropped is not None else {}, f"bad line in {file.name}", skipped)
        return [r for r in rows if r is not None]

    def _files(self) -> tuple[Path, Path]:
        found = {kind: self.find(kind) for kind in ("reviews", "meta")}
        missing = [self.candidates(k)[-1] for k, f in found.items() if f is None]
        if missing:
            raise DataError(
                f"{self.path}: missing {missing}; expected the Amazon {self.release} review and "
                f"metadata files of category {self.category!r} (or data.source.download=true "
                f"where a network exists)"
            )
        return found["reviews"], found["meta"]

    def _items(self, records: list[MetaRecord], dropped: dict[str, int]) -> pd.DataFrame:
        """One cleaned row per item: the first record with text wins over later duplicates."""
        cleaned = [self._clean(r) for r in records]
        frame = pd.DataFrame([row for row, _ in cleaned], columns=self._text_columns())
        frame["_fix"] = [fix for _, fix in cleaned]
        frame["_empty"] = (frame["title"] == "") & (frame["description"] == "")
        frame = frame.sort_values("_empty", kind="stable")  # records with text first
        unique = frame.drop_duplicates("item_id", keep="first")
        _count(dropped, "duplicate meta record", len(frame) - len(unique))
        fixes = Counter(unique["_fix"])
        detected = len(unique) - fixes[TitleFix.KEPT]
        _count(dropped, "html title detected", detected)
        for fix in (TitleFix.CLEANED, TitleFix.REPLACED, TitleFix.EMPTY):
            _count(dropped, f"html title {fix.value}", fixes[fix])
        return unique.drop(columns=["_fix", "_empty"]).reset_index(drop=True)

    def _clean(self, record: MetaRecord) -> tuple[dict[str, str], TitleFix]:
        brand = strip_html(record.brand)
        # A fragment title falls back to the description's first sentence, then the brand.
        title, fix = clean_title(record.title, [*record.description, *record.features, brand])
        row = {
            "item_id": record.item_id,
            "title": title,
            "brand": brand,
            "category": join_text(record.categories, " > "),
            "description": join_text(record.description, limit=self.max_description_chars),
        }
        if self.features_column:
            row["features"] = join_text(record.features, "; ", self.max_description_chars)
        return row, fix

    def _text_columns(self) -> list[str]:
        columns = ["item_id", "title", "brand", "category", "description"]
        return columns + ["features"] if self.features_column else columns

    def _apply_missing_meta(
        self, interactions: pd.DataFrame, items: pd.DataFrame, meta: Path, dropped: dict[str, int]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        order = interactions["item_id"].drop_duplicates()
        lacking = order[~order.isin(items["item_id"])]
        if self.missing_meta == "id_text":
            _count(dropped, "item without metadata (text is its id)", len(lacking))
            stand_in = pd.DataFrame({"item_id": lacking, "title": "item " + lacking})
            items = pd.concat([items, stand_in], ignore_index=True).fillna("")
        else:
            known = interactions["item_id"].isin(items["item_id"])
            _count(dropped, "interaction with an item without metadata", int((~known).sum()))
            interactions = interactions[known].reset_index(drop=True)
            if interactions.empty:
                raise DataError(
                    f"{meta}: none of the {len(order)} reviewed items has a metadata record; "
                    f"expected the meta file of the same category as the reviews"
                )
        # Catalogue = reviewed items, in order of first interaction (full ranking scores them all).
        items = items.set_index("item_id").loc[interactions["item_id"].unique()].reset_index()
        return interactions, items


@dataclass(kw_only=True)
class Amazon2018(_AmazonSource):
    """Amazon Review Data 2018 (Ni, Li, McAuley, EMNLP 2019): `<root>/<folder>/` holds
    `<Category>_5.json.gz` (5-core), `<Category>.json.gz` (all reviews) or `<Category>.csv`
    (ratings only), and `meta_<Category>.json.gz`."""

    folder: str = "amazon2018-magazine-subscriptions"
    category: str = "Magazine_Subscriptions"
    reviews: str = "5core"  # 5core | full | ratings

    release: ClassVar[str] = "2018"
    meta_required: ClassVar[tuple[str, ...]] = ("asin",)
    known_md5: ClassVar[dict[str, str]] = MD5_2018

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("data.source.reviews", self.reviews, REVIEWS_2018)

    @property
    def name(self) -> str:
        return f"amazon2018_{self.category.lower()}_{self.reviews}"

    def candidates(self, kind: str) -> list[str]:
        if kind == "meta":
            return [f"meta_{self.category}.json.gz"]
        suffix = {"5core": "_5.json.gz", "full": ".json.gz", "ratings": ".csv"}[self.reviews]
        return [f"{self.category}{suffix}"]

    def url(self, filename: str) -> str:
        if filename.startswith("meta_"):
            return f"{URL_2018}/metaFiles2/{filename}"
        folder = "categoryFiles" if self.reviews == "full" else "categoryFilesSmall"
        return f"{URL_2018}/{folder}/{filename}"

    def read_interactions(self, file: Path, dropped: dict[str, int]) -> pd.DataFrame:
        if self.reviews == "ratings":
            columns = ["item_id", "user_id", "rating", "timestamp"]
            numeric = ["rating", "timestamp"]
            layout = Layout(tuple(columns), numeric=tuple(numeric))
            frame, skipped = read_strings(file, layout, self.on_bad_line)
        else:
            rows, skipped = read_json_lines(
                file, ("asin", "reviewerID", "unixReviewTime"), _review_2018, self.on_bad_line
            )
            frame = pd.DataFrame(rows, columns=INTERACTION_COLUMNS)
        _count(dropped, f"bad line in {file.name}", skipped)
        return _typed(frame)

    def parse_meta(self, record: dict[str, Any]) -> MetaRecord:
        categories = [strip_html(str(c)) for c in _as_list(record.get("category"))]
        main = strip_html(str(record.get("main_cat") or ""))
        if categories and categories[0] == main:
            categories = categories[1:]  # the top level repeats main_cat on every item
        return MetaRecord(
            item_id=str(record["asin"]),
            title=str(record.get("title") or ""),
            brand=str(record.get("brand") or ""),
            categories=categories,
            description=[str(d) for d in _as_list(record.get("description"))],
        )


@dataclass(kw_only=True)
class Amazon2023(_AmazonSource):
    """Amazon Reviews 2023 (Hou et al., McAuley Lab): `<root>/<folder>/` holds
    `<Category>.jsonl[.gz]` reviews and `meta_<Category>.jsonl[.gz]`; items are `parent_asin`s
    (a product with all its variants), timestamps are converted from milliseconds to seconds."""

    folder: str = "amazon2023"
    category: str = ""
    release: ClassVar[str] = "2023"
    features_column: ClassVar[bool] = True
    meta_required: ClassVar[tuple[str, ...]] = ("parent_asin",)

    def candidates(self, kind: str) -> list[str]:
        stem = f"meta_{self.category}" if kind == "meta" else self.category
        return [f"{stem}.jsonl", f"{stem}.jsonl.gz"]

    def url(self, filename: str) -> str:
        folder = "meta_categories" if filename.startswith("meta_") else "review_categories"
        return f"{URL_2023}/{folder}/{filename}"

    def read_interactions(self, file: Path, dropped: dict[str, int]) -> pd.DataFrame:
        required = ("user_id", "parent_asin", "timestamp")
        rows, skipped = read_json_lines(file, required, _review_2023, self.on_bad_line)
        _count(dropped, f"bad line in {file.name}", skipped)
        return _typed(pd.DataFrame(rows, columns=INTERACTION_COLUMNS))

    def parse_meta(self, record: dict[str, Any]) -> MetaRecord:
        categories = [str(c) for c in _as_list(record.get("categories"))]
        return MetaRecord(
            item_id=str(record["parent_asin"]),
            title=str(record.get("title") or ""),
            brand=str(record.get("store") or ""),
            categories=categories or [str(record.get("main_category") or "")],
            description=[str(d) for d in _as_list(record.get("description"))],
            features=[str(f) for f in _as_list(record.get("features"))],
        )


def _review_2018(record: dict[str, Any]) -> tuple[str, str, int, float]:
    return (
        str(record["reviewerID"]),
        str(record["asin"]),
        integer(record, "unixReviewTime"),
        number_or_nan(record, "overall"),
    )


def _review_2023(record: dict[str, Any]) -> tuple[str, str, int, float]:
    milliseconds = integer(record, "timestamp")
    if milliseconds < MIN_MILLISECONDS:
        raise BadRecord.value(
            "timestamp",
            milliseconds,
            "unix milliseconds (this looks like seconds, or a date before 1973)",
            "is too small",
        )
    return (
        str(record["user_id"]),
        str(record["parent_asin"]),
        milliseconds // 1000,
        number_or_nan(record, "rating"),
    )


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(
        {"user_id": str, "item_id": str, "timestamp": "int64", "rating": "float32"}
    )[INTERACTION_COLUMNS]


def _keep_last(interactions: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, item): the latest (file order breaks ties), rows kept in file order."""
    latest = interactions.sort_values("timestamp", kind="stable")
    kept = latest.drop_duplicates(["user_id", "item_id"], keep="last").sort_index()
    return kept.reset_index(drop=True)


def _as_list(value: object) -> list[Any]:
    """List fields are sometimes a bare string or null in scraped metadata."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"one of {list(allowed)}")


def _count(dropped: dict[str, int], reason: str, number: int) -> None:
    """Record a policy's effect; zero counts are left out so the dict lists what happened."""
    if number:
        dropped[reason] = dropped.get(reason, 0) + int(number)
