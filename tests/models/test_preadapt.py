"""Item-text pre-adaptation: the loss, the module, and the run stage that feeds the backbone."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from recsys_lm.errors import ConfigError
from recsys_lm.models.preadapt import Preadapt, contrastive_loss


def test_loss_is_in_batch_infonce_when_items_are_distinct():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    items_a, items_b = torch.arange(4), torch.arange(4, 8)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.1
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(contrastive_loss(a, b, items_a, items_b, 0.1), expected)


def test_a_recurring_item_is_no_negative():
    """Rows 0 and 1 share their positive item: each must not be pushed away from it."""
    torch.manual_seed(0)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    b[1] = b[0]
    shared = contrastive_loss(a, b, torch.tensor([0, 1, 2]), torch.tensor([5, 5, 6]), 0.1)
    distinct = contrastive_loss(a, b, torch.tensor([0, 1, 2]), torch.tensor([5, 7, 6]), 0.1)
    assert shared < distinct  # the duplicate column stopped counting as a negative
    # with every other column a duplicate, the forward loss of row 0 is zero
    b2 = b[0].expand(3, 8).clone()
    alone = contrastive_loss(
        a[:1].expand(3, 8), b2, torch.zeros(3).long(), torch.ones(3).long(), 0.1
    )
    assert alone.abs() < 1e-6


@pytest.mark.parametrize(
    ("key", "value"), [("steps", 0), ("batch_size", 1), ("temperature", 0.0), ("top_layers", 0)]
)
def test_bad_settings_name_their_key(key, value):
    with pytest.raises(ConfigError, match=f"preadapt.{key}"):
        Preadapt(**{key: value})


def test_a_wrapped_backbone_is_refused():
    from peft import LoraConfig

    from recsys_lm.models.adapters import apply_peft
    from recsys_lm.models.backbone import build_tiny_bert
    from recsys_lm.models.preadapt import ItemContrastive

    backbone = build_tiny_bert()
    apply_peft(backbone, "lora", LoraConfig(r=2))
    with pytest.raises(ConfigError, match="preadapt"):
        ItemContrastive(backbone, Preadapt())


PREADAPT = ["head=sequential", "peft=none", "freeze=head_only", "preadapt=cooccur"]


def embed(backbone, data, items):
    batch = data.items.collate(items)
    with torch.no_grad():
        return F.normalize(backbone.eval()(batch.item_ids, batch.item_mask), dim=-1)


@pytest.mark.parametrize(
    ("peft", "top_layers"), [("lora", "null"), ("full", "null"), ("lora", "1")]
)
def test_preadaptation_pulls_cooccurring_items_together(config, peft, top_layers):
    """After the stage, co-occurring training pairs are more similar than before, relative
    to random pairs; the run's backbone is the saved folder, and it loads. With top_layers=1
    (the lower layer cached) the lower layer's weights stay as they were."""
    from recsys_lm.build import PREADAPTED, check_config, preadapted_config
    from recsys_lm.data.cooccurrence import cooccurring_pairs
    from recsys_lm.data.prepared import prepare
    from recsys_lm.models.freezing import layer_stack

    extra = ["preadapt.peft=null", "preadapt.lr=1e-3"] if peft == "full" else ["preadapt.lr=1e-2"]
    extra.append(f"preadapt.top_layers={top_layers}")
    cfg = config([*PREADAPT, "preadapt.steps=80", "preadapt.batch_size=16", *extra])
    checked = check_config(cfg)
    out = preadapted_config(cfg, checked)
    folder = out.backbone.name_or_path
    assert folder.endswith(PREADAPTED) and cfg.backbone._target_.endswith("build_tiny_bert")
    from hydra.utils import instantiate

    old, new = instantiate(cfg.backbone), instantiate(out.backbone)
    data = prepare(checked.source, checked.settings, checked.task, old.tokenizer, 128)
    pairs = torch.as_tensor(cooccurring_pairs(data.split.train))
    gen = torch.Generator().manual_seed(0)
    shuffled = pairs[:, 1][torch.randperm(len(pairs), generator=gen)]

    def margin(backbone):
        table = embed(backbone, data, list(range(data.num_items)))
        together = (table[pairs[:, 0]] * table[pairs[:, 1]]).sum(-1).mean()
        apart = (table[pairs[:, 0]] * table[shuffled]).sum(-1).mean()
        return float(together - apart)

    assert margin(new) > margin(old) + 0.01
    assert not any(n for n, _ in new.model.named_parameters() if "lora_" in n)  # merged
    lower = [
        torch.equal(a, b)
        for a, b in zip(
            layer_stack(old.model)[0].parameters(),
            layer_stack(new.model)[0].parameters(),
            strict=True,
        )
    ]
    assert all(lower) == (top_layers == "1")


def test_run_saves_and_reuses_the_preadapted_backbone(config, monkeypatch, tmp_path):
    """The saved model names the pre-adapted folder and loads with its weights; a second
    call on the same run folder (a resumed run) reuses the folder without training again."""
    import recsys_lm.build as build
    import recsys_lm.train as entry
    from recsys_lm.build import load_model

    cfg = config([*PREADAPT, "preadapt.steps=3", "baselines=[]"])
    result = entry.train(cfg)
    folder = tmp_path / build.PREADAPTED
    assert result["run"]["backbone"] == str(folder.resolve())
    assert result["run"]["preadapt"]["steps"] == 3 and result["timing"]["preadapt_s"] > 0
    from safetensors.torch import load_file

    loaded = load_model(tmp_path / "model").backbone.model.state_dict()
    # every saved weight (tiny BERT has no pooler; AutoModel adds an unused random one)
    saved = load_file(folder / "model.safetensors")
    assert len(saved) > 10
    for name, theirs in saved.items():
        assert torch.equal(loaded[name], theirs), name
    fresh = build.instantiate(cfg.backbone).model.state_dict()
    assert any(not torch.equal(fresh[n], t) for n, t in saved.items())  # it did change

    def refit(*args, **kwargs):
        raise AssertionError("pre-adaptation ran again")

    monkeypatch.setattr(build, "_preadapt", refit)
    again = build.preadapted_config(cfg, build.check_config(cfg))
    assert again.backbone.name_or_path == str(folder.resolve())


def test_without_preadapt_the_config_is_untouched(config):
    from recsys_lm.build import check_config, preadapted_config

    cfg = config(["head=sequential", "peft=none", "freeze=head_only"])
    assert "preadapt" not in cfg
    assert preadapted_config(cfg, check_config(cfg)) is cfg


def test_several_devices_are_refused_before_any_work(config):
    from recsys_lm.build import check_config, preadapted_config

    cfg = config([*PREADAPT, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    with pytest.raises(ConfigError, match="trainer.devices"):
        preadapted_config(cfg, check_config(cfg))
