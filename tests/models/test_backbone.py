from __future__ import annotations

import pytest
import torch

from recsys_lm.errors import ConfigError
from recsys_lm.models.backbone import build_tiny_bert, load_pretrained, pool


def test_pooling_ignores_padding():
    states = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(states, mask, "mean").squeeze(-1).tolist() == [2.0, 4.0]
    assert pool(states, mask, "cls").squeeze(-1).tolist() == [1.0, 2.0]
    assert pool(states, mask, "last").squeeze(-1).tolist() == [3.0, 6.0]


def test_pooling_drops_prompt_tuning_virtual_tokens():
    states = torch.tensor([[[9.0], [9.0], [1.0], [3.0]]])  # 2 virtual tokens in front
    mask = torch.tensor([[1, 1]])
    assert pool(states, mask, "cls").item() == 1.0
    assert pool(states, mask, "mean").item() == 2.0


def test_tiny_bert_is_small_and_reproducible():
    a, b = build_tiny_bert(), build_tiny_bert()
    assert sum(p.numel() for p in a.parameters()) < 1_500_000
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    ids = torch.tensor([[101, 2000, 102]])
    assert a(ids, torch.ones_like(ids)).shape == (1, 32)


def test_unknown_pooling_is_a_config_error():
    with pytest.raises(ConfigError, match="backbone.pooling"):
        build_tiny_bert(pooling="max")


def test_missing_local_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="backbone.name_or_path.*does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="config.json"):
        load_pretrained(str(tmp_path))


@pytest.mark.pretrained
def test_packaged_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_pretrained()
    assert backbone.hidden_size == 384 and not backbone.is_decoder
    enc = backbone.tokenizer(
        ["a red running shoe", "a blue trail runner"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        emb = backbone(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (2, 384)
    assert torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0) > 0.3
