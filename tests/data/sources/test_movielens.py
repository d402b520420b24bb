from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys_lm.data.download import resolve_root
from recsys_lm.data.sources import movielens
from recsys_lm.data.sources.movielens import MovieLens1M, MovieLens100K, MovieLensCSV
from recsys_lm.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"


@pytest.mark.real_data
def test_movielens_100k_matches_its_source_counts(ml100k_root):
    data = MovieLens100K(root=str(ml100k_root)).load()
    assert len(data.interactions) == 100_000
    assert data.interactions["user_id"].nunique() == 943
    assert len(data.items) == 1682
    assert data.interactions["timestamp"].between(874724710, 893286638).all()
    titles = set(data.items["title"])
    assert "Misérables, Les (1995)" in titles  # latin-1 decoded
    toy = data.items.loc[data.items["item_id"] == 1].iloc[0]
    assert toy["title"] == "Toy Story (1995)" and "Animation" in toy["genres"]


def test_missing_root_is_a_config_error(monkeypatch):
    monkeypatch.delenv("RECSYS_LM_DATA_ROOT", raising=False)
    with pytest.raises(ConfigError, match="data.root"):
        resolve_root(None)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_root("/no/such/dir")


def test_folder_without_files_names_what_is_missing(tmp_path):
    (tmp_path / "movielens-100k").mkdir()
    with pytest.raises(DataError, match=r"missing \['u.data', 'u.item'\]"):
        MovieLens100K(root=str(tmp_path)).load()


def test_malformed_ratings_name_the_file(tmp_path):
    folder = tmp_path / "movielens-100k"
    folder.mkdir()
    (folder / "u.data").write_text("1\t2\tthree\t4\n")
    (folder / "u.item").write_text("2|Heat (1995)|01-Jan-1995||url" + "|0" * 19 + "\n")
    with pytest.raises(DataError, match="u.data"):
        MovieLens100K(root=str(tmp_path)).load()


# --- The rest of the family: MovieLensCSV (latest-small / 20m / 25m) and MovieLens1M. ---


def shared_folder(folder: str, probe: str) -> Path:
    """<data root>/<folder> when `probe` exists there, else skip with the reason."""
    root = os.environ.get("RECSYS_LM_DATA_ROOT") or str(SHARED)
    if not Path(root, folder, probe).exists():
        pytest.skip(f"{folder}/{probe} not found under {root}: set RECSYS_LM_DATA_ROOT")
    return Path(root)


@pytest.mark.real_data
def test_latest_small_matches_its_source_counts():
    root = shared_folder("movielens-latest-small", "ratings.csv")
    data = MovieLensCSV(root=str(root), variant="latest-small").load()
    assert data.name == "movielens_latest_small"
    assert len(data.interactions) == 100_004
    assert data.interactions["user_id"].nunique() == 671
    assert len(data.items) == 9_125
    assert data.interactions["item_id"].nunique() == 9_066
    assert data.interactions["timestamp"].between(789652009, 1476640644).all()
    assert set(data.interactions["rating"].unique()) <= {x / 2 for x in range(1, 11)}
    by_id = data.items.set_index("item_id")
    # Quoted in movies.csv because of its comma; a naive split would shift the genres.
    assert by_id.loc[11, "title"] == "American President, The (1995)"
    assert by_id.loc[11, "genres"] == "Comedy, Drama, Romance"
    assert by_id.loc[1, "tags"] == "Pixar" and by_id.loc[1, "year"] == "1995"
    assert len(data.items["tags"].iloc[0].split(", ")) <= 10
    assert (data.items["tags"] != "").sum() > 0


def write_csv_release(folder: Path, tags: str | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,2.5,200\n2,2,5.0,300\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,"Cry, the Beloved Country (1995)",Drama\n'
        '2,"Quote ""Me"" (2001)",Comedy|Sci-Fi\n'
        "3,Untitled,(no genres listed)\n"
    )
    if tags is not None:
        (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n" + tags)


def test_csv_release_parses_quotes_genres_and_ranks_tags(tmp_path):
    tags = "".join(f"{u},1,{t},5\n" for u, t in enumerate(["dark", "Funny", "funny", "dark ", "a"]))
    tags += "9,1,dark,5\n9,3,lonely,5\n"  # tag timestamps never become interactions
    write_csv_release(tmp_path / "movielens-latest-small", tags)
    data = MovieLensCSV(root=str(tmp_path), max_tags=2).load()
    items = data.items.set_index("item_id")
    assert items.loc[1, "title"] == "Cry, the Beloved Country (1995)"
    assert items.loc[2, "title"] == 'Quote "Me" (2001)'
    assert items.loc[2, "genres"] == "Comedy, Sci-Fi" and items.loc[2, "year"] == "2001"
    assert items.loc[3, "genres"] == "unknown" and items.loc[3, "year"] == ""
    # dark x3 > funny x2 (case merged, first spelling kept) > a x1, capped at 2.
    assert items.loc[1, "tags"] == "dark, Funny"
    assert items.loc[2, "tags"] == "" and items.loc[3, "tags"] == "lonely"
    assert len(data.interactions) == 3
    assert data.interactions["rating"].dtype == "float32"


def test_csv_release_without_tags_file_still_has_a_tags_column(tmp_path):
    write_csv_release(tmp_path / "movielens-latest-small")
    source = MovieLensCSV(root=str(tmp_path), min_rating=3.0)
    data = source.load()
    assert (data.items["tags"] == "").all()
    assert data.dropped == {"rating < 3": 1} and len(data.interactions) == 2
    assert [f.name for f in source.raw_files()] == ["ratings.csv", "movies.csv"]


def test_csv_header_without_a_column_names_file_and_column(tmp_path):
    write_csv_release(tmp_path / "movielens-latest-small")
    (tmp_path / "movielens-latest-small" / "ratings.csv").write_text(
        "userId,movieId,stars\n1,1,4\n"
    )
    with pytest.raises(
        DataError, match=r"ratings.csv, line 1: no column\(s\) \['rating', 'timestamp'\]"
    ):
        MovieLensCSV(root=str(tmp_path)).load()


def test_csv_variants_pick_folder_name_and_url():
    big = MovieLensCSV(variant="25m")
    assert big.name == "movielens_25m" and big.release.folder == "movielens-25m"
    assert big.release.url.endswith("/ml-25m.zip") and big.release.checksum
    assert MovieLensCSV(variant="20m").release.url.endswith("/ml-20m.zip")
    with pytest.raises(ConfigError, match="variant"):
        MovieLensCSV(variant="10m")


def test_download_uses_the_release_url_and_checksum(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, target, checksum, algorithm):
        calls.append((url, target.name, checksum, algorithm))
        if target.name == "ml-latest-small.zip":  # what unzipping it would leave
            write_csv_release(tmp_path / "c" / "ml-latest-small")
        return target

    monkeypatch.setattr(movielens, "download", fake_download)
    monkeypatch.setattr(movielens, "unzip", lambda archive, destination: destination)
    monkeypatch.delenv("RECSYS_LM_DATA_ROOT", raising=False)
    source = MovieLensCSV(download=True, cache_dir=str(tmp_path / "c"))
    source.prepare()
    # ml-latest-small is rebuilt by GroupLens: no checksum to verify (download() warns).
    assert calls == [
        (f"{movielens.GROUPLENS}/ml-latest-small.zip", "ml-latest-small.zip", None, "md5")
    ]
    assert len(source.load().interactions) == 3
    MovieLens1M(download=True, cache_dir=str(tmp_path / "c")).prepare()
    assert calls[-1][1:] == ("ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "md5")


def write_1m(folder: Path, ratings: bytes) -> None:
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_bytes(ratings)
    # latin-1 bytes (0xe9 = é) and a literal quote, as in the real movies.dat.
    (folder / "movies.dat").write_bytes(
        b"1::Toy Story (1995)::Animation|Children's|Comedy\n"
        b'2::Mis\xe9rables, Les "Les Mis" (1995)::Drama|Musical\n'
    )


def test_1m_format_with_latin1_titles(tmp_path):
    write_1m(
        tmp_path / "movielens-1m", b"1::1::5::978300760\n1::2::3::978302109\n2::2::4::978301968\n"
    )
    source = MovieLens1M(root=str(tmp_path))
    data = source.load()
    assert data.name == "movielens_1m"
    items = data.items.set_index("item_id")
    assert items.loc[2, "title"] == 'Misérables, Les "Les Mis" (1995)'
    assert items.loc[1, "genres"] == "Animation, Children's, Comedy"
    assert items.loc[1, "year"] == "1995"
    assert data.interactions["timestamp"].tolist() == [978300760, 978302109, 978301968]
    assert data.interactions.dtypes.to_dict() == {
        "user_id": "int64",
        "item_id": "int64",
        "rating": "float32",
        "timestamp": "int64",
    }
    assert [f.name for f in source.raw_files()] == ["ratings.dat", "movies.dat"]


def test_1m_malformed_line_is_named(tmp_path):
    write_1m(tmp_path / "movielens-1m", b"1::1::5::978300760\n1::2::five::978302109\n")
    with pytest.raises(
        DataError, match=r"ratings.dat, line 2, column 'rating': 'five' is not a number"
    ):
        MovieLens1M(root=str(tmp_path)).load()


def test_100k_records_the_rating_filter_in_dropped(tmp_path):
    folder = tmp_path / "movielens-100k"
    folder.mkdir()
    (folder / "u.data").write_text("1\t2\t5\t10\n1\t2\t1\t20\n")
    (folder / "u.item").write_text("2|Heat (1995)|01-Jan-1995||url" + "|0" * 19 + "\n")
    data = MovieLens100K(root=str(tmp_path), min_rating=4).load()
    assert data.dropped == {"rating < 4": 1} and len(data.interactions) == 1


@pytest.mark.real_data
def test_100k_fold_1_is_the_shipped_split(ml100k_root):
    from recsys_lm.data.split import make_split

    source = MovieLens100K(root=str(ml100k_root), fold=1)
    assert [f.name for f in source.raw_files()] == ["u1.base", "u1.test", "u.item"]
    data = source.load()
    parts = data.interactions["part"].value_counts().to_dict()
    # u1.test holds 20,000 ratings; val is each u1.base user's latest rating (943 users).
    assert parts == {"train": 80_000 - 943, "val": 943, "test": 20_000}
    users = {u: i for i, u in enumerate(data.interactions["user_id"].unique())}
    items = {m: i for i, m in enumerate(data.items["item_id"])}
    frame = data.interactions.assign(
        user=data.interactions["user_id"].map(users), item=data.interactions["item_id"].map(items)
    )[["user", "item", "timestamp", "part"]]
    split = make_split(frame, len(users), "predefined")
    assert sum(map(len, split.test)) == 20_000 and sum(map(len, split.val)) == 943
    with pytest.raises(ConfigError, match="data.source.fold"):
        MovieLens100K(root=str(ml100k_root), fold=6)
