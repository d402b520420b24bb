from __future__ import annotations

import pytest

from recsys_lm.data.movielens import MovieLens100K, resolve_root
from recsys_lm.errors import ConfigError, DataError


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
