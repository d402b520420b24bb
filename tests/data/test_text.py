from __future__ import annotations

import pandas as pd
import pytest
import torch

from recsys_lm.data.text import TokenCache, TokenLayout, render
from recsys_lm.errors import ConfigError


def test_layout_matches_the_tokenizer_for_single_and_pair(tokenizer):
    layout = TokenLayout.probe(tokenizer)
    a = tokenizer("the red shoe", add_special_tokens=False)["input_ids"]
    b = tokenizer("blue hat", add_special_tokens=False)["input_ids"]
    assert layout.single(a)[0] == tokenizer("the red shoe")["input_ids"]
    ids, types = layout.pair(a, b)
    expected = tokenizer("the red shoe", "blue hat")
    assert ids == expected["input_ids"]
    assert types == expected["token_type_ids"]


def test_render_formats_items_and_names_missing_fields():
    items = pd.DataFrame({"item_id": [1], "title": ["Heat (1995)"], "genres": ["Action"]})
    assert render(items, "{title}. Genres: {genres}.", "k") == ["Heat (1995). Genres: Action."]
    with pytest.raises(ConfigError, match="data.item_template.*brand"):
        render(items, "{title} by {brand}", "data.item_template")


def test_history_keeps_the_most_recent_items_within_budget(tokenizer):
    titles = ["alpha", "beta", "gamma", "delta"]
    cache = TokenCache(tokenizer, titles, titles, max_item_tokens=8)
    ids = cache.history([0, 1, 2, 3], budget=5)  # 3 one-token titles + 2 separators
    assert tokenizer.decode(ids) == "beta ; gamma ; delta"
    assert tokenizer.decode(cache.history([0, 1, 2, 3], budget=1)) == "delta"


def test_token_ids_are_cached_on_disk_and_reused(tokenizer, tmp_path, monkeypatch):
    titles = ["alpha beta", "gamma"]
    first = TokenCache(tokenizer, titles, titles, max_item_tokens=8, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 1
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    second = TokenCache(tokenizer, titles, titles, max_item_tokens=8, cache_dir=tmp_path)
    assert len(loads) == 1  # read from disk
    assert second.item_ids == first.item_ids and second.history_ids == first.history_ids
    third = TokenCache(tokenizer, ["other text", "gamma"], titles, 8, cache_dir=tmp_path)
    assert len(loads) == 1 and third.item_ids != first.item_ids  # new texts: a new entry
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 2
