from __future__ import annotations

import pytest

from recsys_lm.errors import ConfigError
from recsys_lm.models.adapters import apply_peft
from recsys_lm.models.backbone import build_tiny_bert
from recsys_lm.models.freezing import BitFit, BottomK, Embeddings, HeadOnly


def trainable(backbone):
    return {n for n, p in backbone.named_parameters() if p.requires_grad}


def test_bottom_k_freezes_embeddings_and_lowest_layers():
    backbone = build_tiny_bert()
    BottomK(k=1).apply(backbone)
    names = trainable(backbone)
    assert names and all("encoder.layer.1." in n for n in names)


@pytest.mark.parametrize("k", [3, -3])
def test_bottom_k_beyond_depth_names_the_key(k):
    with pytest.raises(ConfigError, match="freeze.k"):
        BottomK(k=k).apply(build_tiny_bert())


def test_negative_k_trains_only_the_top_layers():
    """k=-1 on a 3-layer stack freezes layers 0 and 1, as k=2 does."""
    backbone = build_tiny_bert(num_hidden_layers=3)
    BottomK(k=-1, cache_frozen=True).apply(backbone)
    names = trainable(backbone)
    assert names and all("encoder.layer.2." in n for n in names)
    assert backbone.frozen_cache is not None and backbone.frozen_cache.k == 2


def test_embeddings_and_bitfit_and_head_only():
    backbone = build_tiny_bert()
    Embeddings().apply(backbone)
    assert not any("embeddings" in n for n in trainable(backbone))
    backbone = build_tiny_bert()
    BitFit().apply(backbone)
    assert trainable(backbone) and all(n.endswith(".bias") for n in trainable(backbone))
    backbone = build_tiny_bert()
    HeadOnly().apply(backbone)
    assert not trainable(backbone)


def test_lora_with_bottom_k_trains_adapters_only_in_upper_layers():
    from peft import LoraConfig

    backbone = build_tiny_bert()
    apply_peft(backbone, "lora", LoraConfig(r=2))
    BottomK(k=1).apply(backbone)
    names = trainable(backbone)
    assert names and all("lora_" in n and "layer.1." in n for n in names)


def test_peft_that_does_not_fit_names_the_strategy():
    from peft import LoraConfig

    with pytest.raises(ConfigError, match="`peft` = 'lora'"):
        apply_peft(build_tiny_bert(), "lora", LoraConfig(target_modules=["nonexistent"]))
