"""The frozen-layer cache: equal outputs, no lower-layer work on a hit, refusals, training."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig

from recsys_lm.build import load_model
from recsys_lm.errors import ConfigError
from recsys_lm.models.adapters import apply_peft
from recsys_lm.models.backbone import Backbone, build_tiny_bert, build_tiny_gpt2
from recsys_lm.models.freezing import BottomK, layer_stack
from recsys_lm.models.frozen_cache import FrozenLayerCache

TEXTS = ["a red shoe", "a much longer blue trail runner for wet days", "hat"]
BUILDERS = {"tiny_bert": build_tiny_bert, "tiny_gpt2": build_tiny_gpt2}


def encode(backbone: Backbone, texts: list[str]) -> tuple[torch.Tensor, ...]:
    enc = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")


def with_lora(name: str, layers: int = 3) -> Backbone:
    """A backbone with LoRA everywhere; random B so that the adapters change the output."""
    kwargs = {"num_hidden_layers": layers} if name == "tiny_bert" else {"n_layer": layers}
    backbone = BUILDERS[name](**kwargs)
    apply_peft(backbone, "lora", LoraConfig(r=2, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return backbone


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cached_forward_equals_the_uncached_one(name, k):
    backbone = with_lora(name).eval()
    ids, mask, types = encode(backbone, TEXTS)
    with torch.no_grad():
        reference = backbone(ids, mask, types)
        BottomK(k=k, cache_frozen=True).apply(backbone)
        first = backbone(ids, mask, types)  # fills the cache
        again = backbone(ids, mask, types)  # read from it
        # the short row alone, without padding: the entry filled in the padded batch serves it
        n = int(mask[2].sum())
        alone = backbone(ids[2:3, :n], mask[2:3, :n], None if types is None else types[2:3, :n])
    torch.testing.assert_close(first, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-4)
    assert n < ids.shape[1]  # it was padded in the batch
    torch.testing.assert_close(alone, reference[2:3], atol=1e-5, rtol=1e-4)
    assert len(backbone.frozen_cache) == len(TEXTS)


def test_causal_lm_pooling_is_unchanged_by_the_cache():
    backbone = build_tiny_gpt2(causal_lm=True).eval()
    ids, mask, _ = encode(backbone, TEXTS)
    with torch.no_grad():
        reference = backbone(ids, mask)
        BottomK(k=1, cache_frozen=True).apply(backbone)
        cached = backbone(ids, mask)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2"])
def test_a_second_pass_runs_no_lower_layer(name):
    backbone = with_lora(name)
    layers = layer_stack(backbone.model)
    lowest, upper = count_calls(layers[0]), count_calls(layers[2])
    BottomK(k=2, cache_frozen=True).apply(backbone)
    ids, mask, types = encode(backbone, TEXTS)
    backbone(ids, mask, types)
    assert lowest == [1] and upper == [1]  # the fill: one lower pass for the three misses
    backbone(ids, mask, types)
    backbone(ids[:2], mask[:2], None if types is None else types[:2])
    assert lowest == [1] and upper == [3]
    stats = backbone.frozen_cache.stats
    assert (stats.misses, stats.hits, stats.lower_passes) == (3, 5, 1)


def test_gradients_reach_the_upper_adapters_only():
    backbone = with_lora("tiny_bert").train()
    BottomK(k=1, cache_frozen=True).apply(backbone)
    ids, mask, types = encode(backbone, TEXTS)
    for _ in range(2):  # a miss, then a hit
        backbone.zero_grad()
        backbone(ids, mask, types).sum().backward()
        grads = {n for n, p in backbone.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n and "layer.0." not in n for n in grads)


def test_lower_layers_are_computed_without_dropout():
    """In training mode the cached states are the eval-mode ones: dropout below k is off."""
    backbone = build_tiny_bert(num_hidden_layers=2).train()
    ids, mask, types = encode(backbone, TEXTS)
    cache = FrozenLayerCache(layer_stack(backbone.model), 2, [])
    real = mask.bool()
    with torch.no_grad():
        states = cache.run(backbone.model, ids, mask, token_type_ids=types).last_hidden_state
        assert all(m.training for m in backbone.model.modules())  # modes restored after the fill
        noisy = backbone.model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        reference = backbone.eval().model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(states[real], reference.last_hidden_state[real])
    assert not torch.allclose(noisy.last_hidden_state[real], reference.last_hidden_state[real])


def test_a_lower_layer_made_trainable_is_refused():
    backbone = with_lora("tiny_bert")
    BottomK(k=2, cache_frozen=True).apply(backbone)
    layer_stack(backbone.model)[1].requires_grad_(True)  # e.g. a later unfreeze
    ids, mask, types = encode(backbone, TEXTS)
    with pytest.raises(ConfigError, match="freeze.cache_frozen"):
        backbone(ids, mask, types)
    layers = layer_stack(build_tiny_bert().model)
    with pytest.raises(ConfigError, match="freeze.cache_frozen"):
        FrozenLayerCache(layers, 1, list(layers[0].parameters()))


def test_prefix_tuning_is_refused():
    backbone = build_tiny_bert()
    apply_peft(backbone, "prefix", PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ConfigError, match="`peft` = 'prefix_tuning'"):
        BottomK(k=1, cache_frozen=True).apply(backbone)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"k": 0}, "freeze.k"),
        ({"k": 1, "cache_dtype": "int8"}, "freeze.cache_dtype"),
        ({"k": 1, "cache_max_mb": 0}, "freeze.cache_max_mb"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        BottomK(cache_frozen=True, **kwargs).apply(build_tiny_bert())


def test_every_block_cached_on_a_causal_lm_is_refused():
    with pytest.raises(ConfigError, match="freeze.k"):
        BottomK(k=2, cache_frozen=True).apply(build_tiny_gpt2(causal_lm=True))


def test_the_size_bound_stores_no_more_and_still_answers():
    backbone = build_tiny_bert().eval()
    ids, mask, types = encode(backbone, TEXTS)
    with torch.no_grad():
        reference = backbone(ids, mask, types)
        # room for the first row (3 tokens + 2 specials = 5 x 32 floats) only
        BottomK(k=1, cache_frozen=True, cache_max_mb=5 * 32 * 4 / 2**20).apply(backbone)
        cached = backbone(ids, mask, types)
    stats = backbone.frozen_cache.stats
    assert (len(backbone.frozen_cache), stats.full_skips, stats.bytes) == (1, 2, 5 * 32 * 4)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-4)


def test_bfloat16_storage_halves_memory_at_a_small_error():
    backbone = build_tiny_bert().eval()
    ids, mask, types = encode(backbone, TEXTS)
    with torch.no_grad():
        reference = backbone(ids, mask, types)
        BottomK(k=1, cache_frozen=True, cache_dtype="bfloat16").apply(backbone)
        cached = backbone(ids, mask, types)
    assert backbone.frozen_cache.stats.bytes == int(mask.sum()) * 32 * 2
    assert not torch.equal(cached, reference)
    torch.testing.assert_close(cached, reference, atol=0.05, rtol=0.05)


def test_left_padded_rows_are_refused():
    backbone = build_tiny_bert()
    BottomK(k=1, cache_frozen=True).apply(backbone)
    ids, mask, types = encode(backbone, TEXTS)
    with pytest.raises(Exception, match="right-padded"):
        backbone(ids, mask.flip(1), types)


@pytest.mark.parametrize(
    "overrides",
    [
        ["head=click", "peft.config.layers_to_transform=[1]"],  # LoRA only above k
        ["head=retrieval"],
        ["head=sequential", "head.net.item_embeddings=trained"],
    ],
)
def test_training_with_the_cache_through_lightning(config, monkeypatch, overrides):
    from tests.conftest import fresh_datamodule, recomputed_auroc, train_and_keep

    result, cfg, module = train_and_keep(
        config,
        monkeypatch,
        [
            *overrides,
            "peft=lora",
            "freeze=bottom_k",
            "freeze.k=1",
            "freeze.cache_frozen=true",
            "trainer.num_sanity_val_steps=2",  # the validation rows once before training
            "baselines=[]",
        ],
    )
    cache = module.backbone.frozen_cache
    assert len(cache) > 0 and cache.stats.hits > 0  # the validation rows (and items) again
    assert result["params"]["trainable"] > 0
    assert load_model(result["model_dir"]).backbone.frozen_cache is None  # serving: plain model
    if overrides[0] == "head=click":  # the reported AUROC is that of the uncached model too
        datamodule = fresh_datamodule(cfg, module.cpu())
        module.backbone.frozen_cache = None
        assert result["test"]["auroc"] == pytest.approx(
            recomputed_auroc(module, datamodule), abs=1e-4
        )
        assert all("layer.1." in n for n, p in module.named_parameters() if "lora_" in n)
    else:
        assert "ndcg@10" in result["test"]
