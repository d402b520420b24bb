"""Every shipped config composes and passes `check_config`: each conf/experiment/*.yaml and
each conf/head/*.yaml, found by glob (a new file is covered without editing this test). Nothing
is loaded: no weights, no data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys_lm.build import check_config
from recsys_lm.data.tasks import TASKS
from recsys_lm.models.heads.base import Head
from recsys_lm.train import CONFIG_DIR
from tests.conftest import make_config

EXPERIMENTS = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml"))
HEADS = sorted(p.stem for p in Path(CONFIG_DIR, "head").glob("*.yaml"))


def test_the_globs_find_the_shipped_configs():
    assert {"lora_video", "tallrec_video", "sequential_video"} <= set(EXPERIMENTS)
    assert {"click", "retrieval", "rating", "behaviour", "sequential"} <= set(HEADS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_resolves_and_checks(tmp_path, name):
    overrides = [f"experiment={name}", f"data.root={tmp_path}", "trainer.accelerator=cpu"]
    cfg = make_config(tmp_path, overrides, fast=False)
    if OmegaConf.is_missing(cfg.backbone, "name_or_path"):  # backbone=hf: the user names one
        cfg = make_config(tmp_path, [*overrides, f"backbone.name_or_path={tmp_path}"], fast=False)
    # Every interpolation resolves and no required value is left unset.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    checked = check_config(cfg)
    assert checked.task.name in TASKS
    assert checked.source is not None


@pytest.mark.parametrize("name", HEADS)
def test_every_head_config_builds_its_head_for_a_registered_task(tmp_path, name):
    cfg = make_config(tmp_path, [f"head={name}"], fast=False)
    if cfg.head.get("lm_head"):
        cfg = make_config(tmp_path, [f"head={name}", "backbone=tiny_gpt2"], fast=False)
    head = instantiate(cfg.head.net, hidden_size=8)
    assert isinstance(head, Head)
    assert head.task in TASKS
    assert check_config(cfg).task is TASKS[head.task]
