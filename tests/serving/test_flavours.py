"""Inference flavours one by one, on tiny backbones built in-process (no training): a merged
adapter computes what the adapter did, pruning keeps exactly the lowest layers, int8 and ONNX
stay close to the float model, and what cannot work is refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from recsys_lm.build import build_module
from recsys_lm.errors import ConfigError
from recsys_lm.models.adapters import apply_peft, is_peft, make_peft_config
from recsys_lm.models.backbone import build_tiny_bert, build_tiny_gpt2
from recsys_lm.models.export import save_model
from recsys_lm.serving import flavours as fl
from tests.conftest import ROOT, make_config


def batch(backbone, texts=("a short text", "a rather longer text about a film and a book")):
    encoded = backbone.tokenizer(list(texts), padding=True, return_tensors="pt")
    segments = torch.zeros_like(encoded["input_ids"])
    segments[:, 3:] = 1  # BERT-style segment ids must reach the model, as in a click pair
    return encoded["input_ids"], encoded["attention_mask"], segments


def adapted(name: str, seed: int = 0):
    """A tiny BERT wrapped with `name` (conf/peft/<name>.yaml), its adapter weights set to
    random values: freshly initialised LoRA is the identity, which would merge to anything."""
    backbone = build_tiny_bert().eval()
    apply_peft(backbone, name, peft_config(name))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in backbone.model.named_parameters():
            if "lora_" in param_name or "ia3_" in param_name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))
    return backbone.eval()


def peft_config(name: str):
    """The PEFT config of conf/peft/<name>.yaml."""
    return make_peft_config(name, OmegaConf.load(ROOT / "conf" / "peft" / f"{name}.yaml").config)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# -- names -----------------------------------------------------------------------------------
def test_flavours_expand_in_a_fixed_order_with_merged_first():
    names = [f.name for f in fl.expand(["pruned", "int8", "onnx"], [3, 1], total_layers=4)]
    assert names == ["merged", "onnx", "int8", "pruned-3", "pruned-1"]
    every_count = fl.expand(["pruned"], None, total_layers=4)
    assert [f.name for f in every_count] == ["merged", "pruned-3", "pruned-2", "pruned-1"]
    assert [f.layers for f in every_count] == [None, 3, 2, 1]
    assert fl.expand([], None, total_layers=4) == []  # eager only
    assert fl.parse("onnx-int8").kind == "onnx-int8"
    assert fl.parse("pruned-2").folder == "flavours/pruned-2"


@pytest.mark.parametrize(
    ("requested", "pruned", "key"),
    [(["fp16"], None, "flavours"), (["pruned"], [4], "pruned"), (["pruned"], [0], "pruned")],
)
def test_unknown_flavours_and_impossible_layer_counts_are_refused(requested, pruned, key):
    with pytest.raises(ConfigError) as err:
        fl.expand(requested, pruned, total_layers=4)
    assert err.value.key == key


def test_a_name_that_is_no_flavour_is_refused():
    with pytest.raises(ConfigError, match="pruned-<layers>"):
        fl.parse("pruned-two")


# -- merged ----------------------------------------------------------------------------------
@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_merged_backbone_computes_what_the_adapter_did(peft):
    backbone = adapted(peft)
    ids, mask, segments = batch(backbone)
    with torch.no_grad():
        expected = backbone(ids, mask, segments)
        with backbone.model.disable_adapter():
            base = backbone(ids, mask, segments)
        merged = fl.merged_backbone(backbone)
        got = merged(ids, mask, segments)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters, so merging is tested
    assert not is_peft(merged) and is_peft(backbone)  # a copy: the trained model is untouched
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prompt_learning_cannot_be_merged():
    backbone = build_tiny_bert()
    apply_peft(backbone, "prefix", peft_config("prefix"))
    with pytest.raises(ConfigError, match="cannot be merged"):
        fl.merged_backbone(backbone)


def test_merged_folder_loads_as_a_plain_model_with_the_same_head(tmp_path):
    cfg = make_config(tmp_path, ["peft=lora", "head=click"])
    module = build_module(cfg).eval()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name or name.startswith("head."):
                param.copy_(torch.randn_like(param))
    save_model(module, cfg, tmp_path / "model")  # what an export starts from
    fl.write_merged(module, OmegaConf.load(tmp_path / "model" / "model.yaml"), tmp_path / "merged")
    loaded = build_module(fl.load_config(tmp_path / "merged"))
    fl.load_head(loaded, tmp_path / "merged")
    loaded.eval()
    assert not is_peft(loaded.backbone) and loaded.hparams.peft_name == "none"
    ids, mask, segments = batch(module.backbone)
    with torch.no_grad():
        expected = module.head.classifier(module.backbone(ids, mask, segments))
        got = loaded.head.classifier(loaded.backbone(ids, mask, segments))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- load-time transforms --------------------------------------------------------------------
@pytest.mark.parametrize("build", [build_tiny_bert, build_tiny_gpt2], ids=["bert", "gpt2"])
def test_pruning_keeps_exactly_the_lowest_layers(build):
    full = build(num_hidden_layers=3) if build is build_tiny_bert else build(n_layer=3)
    full.eval()
    ids, mask, _ = batch(full)
    with torch.no_grad():
        states = full.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        pruned = fl.prune_layers(copy.deepcopy(full), 1)
        got = pruned.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert fl.num_layers(pruned) == 1 and pruned.model.config.num_hidden_layers == 1
    # hidden_states[1] is layer 0's output; a decoder's last state passes a final norm
    expected = states.hidden_states[1]
    if hasattr(pruned.model, "ln_f"):
        expected = pruned.model.ln_f(expected)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - states.last_hidden_state).abs().max() > 1e-3  # the removed layers mattered


def test_a_model_without_known_layers_cannot_be_pruned():
    with pytest.raises(ConfigError, match="transformer blocks"):
        fl.transformer_layers(nn.Linear(2, 2))


@pytest.mark.parametrize("config", fl.INT8_CONFIGS)
def test_int8_quantises_every_linear_layer_and_stays_close(config):
    reference = build_tiny_bert().eval()
    quantised = fl.quantize_int8(build_tiny_bert().eval(), config)
    linears = [m for m in quantised.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all("Int8" in type(m.weight).__name__ for m in linears)
    ids, mask, segments = batch(reference)
    with torch.no_grad():
        expected, got = reference(ids, mask, segments), quantised(ids, mask, segments)
    assert not torch.equal(got, expected)
    assert cosine(got, expected).min() > 0.99


def test_an_unknown_torchao_config_is_refused():
    with pytest.raises(ConfigError) as err:
        fl.int8_recipe("Int4WeightOnlyConfig")
    assert err.value.key == "int8.config"


def test_onnx_refuses_backbones_whose_heads_read_logits():
    with pytest.raises(ConfigError, match="next-token logits"):
        fl.check_onnx(build_tiny_gpt2(causal_lm=True))
    fl.check_onnx(build_tiny_gpt2())  # a pooling decoder is fine


# -- ONNX ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A tiny BERT, its ONNX graph and that graph quantised (one export: seconds)."""
    folder = tmp_path_factory.mktemp("onnx")
    backbone = build_tiny_bert().eval()
    recipe = fl.export_onnx(backbone, folder / "model.onnx")
    fl.quantize_onnx(
        folder / "model.onnx", folder / "int8.onnx", per_channel=True, reduce_range=False
    )
    return backbone, folder, recipe


@pytest.mark.slow
@pytest.mark.parametrize(("rows", "length"), [(1, 3), (2, 9), (5, 40)])
def test_onnx_backbone_matches_the_eager_one_at_any_batch_and_length(graphs, rows, length):
    backbone, folder, recipe = graphs
    onnx = fl.OnnxBackbone(folder / "model.onnx", backbone, threads=1)
    assert recipe["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    generator = torch.Generator().manual_seed(rows)
    ids = torch.randint(1000, 2000, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, length // 2 + 1 :] = 0  # right padding in the first row
    segments = (torch.arange(length) >= length // 2).long().expand(rows, -1)
    with torch.no_grad():
        expected = backbone(ids, mask, segments)
        got = onnx(ids, mask, segments)
        without_segments = onnx(ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(without_segments, backbone(ids, mask), atol=1e-5, rtol=1e-5)
    assert (got - without_segments).abs().max() > 1e-4  # segment ids reach the graph
    assert onnx.hidden_size == backbone.hidden_size and onnx.tokenizer is backbone.tokenizer
    assert onnx.device == torch.device("cpu") and not list(onnx.parameters())


@pytest.mark.slow
def test_onnx_int8_graph_multiplies_in_int8_and_stays_close(graphs):
    import onnx

    backbone, folder, _ = graphs
    ops = {node.op_type for node in onnx.load(str(folder / "int8.onnx")).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    quantised = fl.OnnxBackbone(folder / "int8.onnx", backbone, threads=1)
    ids, mask, segments = batch(backbone)
    with torch.no_grad():
        expected, got = backbone(ids, mask, segments), quantised(ids, mask, segments)
    assert not torch.allclose(got, expected, atol=1e-6)
    assert cosine(got, expected).min() > 0.98


@pytest.fixture(scope="module")
def query_graph(tmp_path_factory):
    """A sequential head's encoder (random weights, eval mode) and its ONNX graph."""
    from recsys_lm.models.heads.sequential import SequentialHead

    torch.manual_seed(0)
    head = SequentialHead(hidden_size=32, dim=16, num_layers=2, num_heads=2, max_len=12).eval()
    path = tmp_path_factory.mktemp("query") / fl.QUERY_GRAPH
    network = head.query_network()
    recipe = fl.export_query(network, network.dim, path)
    return head, path, recipe


@pytest.mark.slow
@pytest.mark.parametrize(("rows", "length"), [(1, 1), (1, 12), (3, 7)])
def test_the_query_graph_gives_the_encoders_last_state(query_graph, rows, length):
    head, path, recipe = query_graph
    assert recipe["graph"] == fl.QUERY_GRAPH and recipe["output"] == "query [batch, 16]"
    generator = torch.Generator().manual_seed(length)
    vectors = torch.randn(rows, length, 16, generator=generator)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, : length // 2] = False  # left padding in the first row
    with torch.no_grad():
        expected = head.encoder(vectors, mask)[:, -1]
    got = fl.OnnxQuery(path, threads=1)(vectors, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_head_given_the_graph_runs_its_user_side_through_it(query_graph):
    head, path, _ = query_graph
    table = torch.randn(20, 16)
    histories = [[3, 4, 5], [7]]
    calls = []
    graph = fl.OnnxQuery(path, threads=1)

    def counted(vectors, mask):
        calls.append(vectors.shape)
        return graph(vectors, mask)

    with torch.no_grad():
        expected = head.query_vectors(None, histories, table)
        head.use_query_network(counted)
        try:
            got = head.query_vectors(None, histories, table)
        finally:
            head.use_query_network(None)
    assert calls == [torch.Size([2, 3, 16])]  # the graph ran, once for the batch
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "_query_network" not in dict(head.named_children())
