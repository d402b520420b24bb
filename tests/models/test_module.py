"""RecsysLM's item side: `use_item_backbone` embeds the catalogue with another backbone than
the user side's (what quantised serving flavours do), is neither trained nor saved, and
`None` goes back to one backbone."""

from __future__ import annotations

import copy

import pytest
import torch

from recsys_lm.build import build_datamodule, build_module
from tests.conftest import make_config


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("module"), ["head=retrieval"])
    module = build_module(cfg)
    datamodule = build_datamodule(cfg, module)
    datamodule.setup()
    module.attach(datamodule.data)
    return module.eval(), datamodule.data


def perturbed(backbone):
    other = copy.deepcopy(backbone)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return other.eval()


def test_items_are_embedded_by_the_item_backbone_and_users_by_the_backbone(retrieval):
    module, data = retrieval
    history = data.history(0)[:3]
    module.recommend(history, k=1)
    own_items = module.head._item_vectors.clone()
    own_user = module.head.user_vector(module.backbone, history)

    other = perturbed(module.backbone)
    module.use_item_backbone(other)
    assert module.item_backbone is other
    module.recommend(history, k=1)  # the catalogue is embedded again, by `other`
    items = module.head._item_vectors
    assert (items - own_items).abs().max() > 1e-3
    expected = [module.head.item_vectors(other, b) for b in module._item_batches()]
    torch.testing.assert_close(items, torch.cat(expected))
    # the user side still runs on the module's own backbone
    ranked = module.recommend(history, k=5)
    expected = (items @ own_user)[torch.as_tensor(ranked.items)]
    torch.testing.assert_close(torch.as_tensor(ranked.scores), expected, rtol=0, atol=1e-5)

    module.use_item_backbone(None)
    assert module.item_backbone is module.backbone
    module.recommend(history, k=1)
    torch.testing.assert_close(module.head._item_vectors, own_items)


def test_the_item_backbone_is_neither_a_submodule_nor_saved(retrieval):
    module, _ = retrieval
    before = set(module.state_dict())
    count = sum(1 for _ in module.parameters())
    module.use_item_backbone(perturbed(module.backbone))
    assert set(module.state_dict()) == before
    assert sum(1 for _ in module.parameters()) == count
    assert "_item_backbone" not in dict(module.named_children())
    module.use_item_backbone(None)  # the fixture is shared
