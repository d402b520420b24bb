"""MovieLens-100K (GroupLens): `u.data` ratings and `u.item` movies (latin-1, `|`-separated)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recsys_lm.data.canonical import CanonicalData
from recsys_lm.data.download import download, unzip
from recsys_lm.errors import ConfigError, DataError

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_SHA1 = "cd4dcac4241c8a4ad7badc7ca635da8a69dddb83"
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
REQUIRED = ("u.data", "u.item")


def resolve_root(root: str | None, key: str = "data.root") -> Path:
    """The folder that holds the datasets: `data.root`, else $RECSYS_LM_DATA_ROOT."""
    root = root or os.environ.get("RECSYS_LM_DATA_ROOT")
    if not root:
        raise ConfigError(
            key, root, "a folder of datasets; set data.root=... or RECSYS_LM_DATA_ROOT"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(key, root, f"an existing folder; {path.resolve()} does not exist")
    return path


@dataclass
class MovieLens100K:
    """Reads `<root>/<folder>/u.data` and `u.item`; downloads the official zip if asked."""

    root: str | None = None
    folder: str = "movielens-100k"
    download: bool = False  # fetch ml-100k.zip (sha1-checked) when the files are absent
    cache_dir: str = "~/.cache/recsys_lm"
    min_rating: float | None = None  # keep only ratings >= this as interactions (None: all)

    name = "movielens_100k"

    @property
    def path(self) -> Path:
        if self.download and not self.root and not os.environ.get("RECSYS_LM_DATA_ROOT"):
            return Path(self.cache_dir).expanduser() / "ml-100k"
        return resolve_root(self.root) / self.folder

    def prepare(self) -> None:
        path = self.path
        if all((path / f).exists() for f in REQUIRED) or not self.download:
            return
        cache = Path(self.cache_dir).expanduser()
        archive = download(ML100K_URL, cache / "ml-100k.zip", ML100K_SHA1, "sha1")
        unzip(archive, cache)
        if path != cache / "ml-100k":
            raise DataError(f"downloaded to {cache / 'ml-100k'}; set data.source.folder to it")

    def load(self) -> CanonicalData:
        path = self.path
        missing = [f for f in REQUIRED if not (path / f).exists()]
        if missing:
            raise DataError(
                f"{path}: missing {missing}; expected the unzipped ml-100k files "
                f"(or data.source.download=true where a network exists)"
            )
        ratings = self._ratings(path / "u.data")
        if self.min_rating is not None:
            ratings = ratings[ratings["rating"] >= self.min_rating].reset_index(drop=True)
        return CanonicalData(self.name, self._items(path / "u.item"), ratings)

    @staticmethod
    def _ratings(file: Path) -> pd.DataFrame:
        try:
            frame = pd.read_csv(
                file,
                sep="\t",
                header=None,
                names=["user_id", "item_id", "rating", "timestamp"],
                dtype={
                    "user_id": "int64",
                    "item_id": "int64",
                    "rating": "float32",
                    "timestamp": "int64",
                },
            )
        except (ValueError, pd.errors.ParserError) as err:
            raise DataError(
                f"{file}: expected 4 tab-separated integer columns "
                f"(user, item, rating, timestamp): {err}"
            ) from err
        return frame

    @staticmethod
    def _items(file: Path) -> pd.DataFrame:
        columns = ["item_id", "title", "release_date", "video_release_date", "url", *GENRES]
        try:
            frame = pd.read_csv(file, sep="|", header=None, names=columns, encoding="latin-1")
        except (ValueError, pd.errors.ParserError) as err:
            raise DataError(f"{file}: expected 24 '|'-separated fields per movie: {err}") from err
        flags = frame[list(GENRES)].to_numpy().astype(bool)
        genres = [", ".join(g for g, on in zip(GENRES, row, strict=True) if on) for row in flags]
        return pd.DataFrame(
            {
                "item_id": frame["item_id"].astype("int64"),
                "title": frame["title"].fillna("unknown title").astype(str),
                "genres": genres,
                "year": frame["release_date"].fillna("").astype(str).str[-4:],
            }
        )
