"""Scaling within a job: DDP (trainer=ddp), FSDP (trainer=fsdp) and 4/8-bit backbones.

On CPU, DDP runs as 2 gloo processes. The end-to-end test trains through the real command
line (Lightning starts rank 1 by running the command again) on a sample whose 41 test users
split unevenly, and checks that the run's metrics equal one process's evaluation of the same
saved weights. FSDP and quantised loading need CUDA GPUs: on CPU their clear errors are
tested, on a GPU (`gpu` marker) a tiny GPT-2 trains with each.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import ShardingStrategy
from torch.utils.data import RandomSampler

import recsys_lm.build as build
from recsys_lm.build import build_module, build_trainer, check_config, evaluate_saved
from recsys_lm.data.datamodule import RankShard, eval_shard
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.errors import ConfigError, DataError
from recsys_lm.models.backbone import build_tiny_gpt2, load_pretrained
from recsys_lm.models.sharding import TransformerBlocks
from tests import distributed_worker
from tests.conftest import make_config, make_datamodule, train_cli

CUDA = torch.cuda.is_available()

# 41 users: 41 validation and 41 test rows, so 2 processes get 21 and 20 (a padded split
# would repeat one); eval batches of 10 give the processes 3 and 2 batches.
RUN = [
    "backbone=tiny_bert",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.limit_val_batches=1.0",
    "data.batch_size=8",
    "data.eval_batch_size=10",
    "data.source.num_users=41",
    "data.source.num_items=60",
    "data.eval_negatives=9",
    "logger=none",
    "baselines=[popularity]",
]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


# -- data sharding ------------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "world"), [(41, 2), (40, 2), (7, 3), (3, 3)])
def test_eval_shard_gives_every_row_to_exactly_one_process(rows, world):
    dataset = list(range(rows))
    shares = [list(eval_shard(dataset, rank, world)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == dataset  # none dropped, none twice
    assert sum(len(share) for share in shares) == rows
    assert max(map(len, shares)) - min(map(len, shares)) <= 1 and min(map(len, shares)) >= 1


def test_eval_shard_is_none_alone_and_refuses_fewer_rows_than_processes():
    assert eval_shard(list(range(5)), 0, 1) is None
    with pytest.raises(DataError, match="2 rows, fewer than the 3 processes"):
        eval_shard([0, 1], 0, 3, "test")


def test_datamodule_shards_evaluation_and_training_per_process(tokenizer):
    # 43 users: 43 test rows (22 and 21 per process, in 4 and 3 batches of 7), 739 training
    # pairs (370 per process, one of them twice)
    source = SampleSource(num_users=43, num_items=60)
    datamodule = make_datamodule(tokenizer, "retrieval", source, batch_size=8, eval_batch_size=7)
    test_rows = len(datamodule.data.datasets["test"])
    train_rows = len(datamodule.data.datasets["train"])
    assert test_rows == 43 and train_rows % 2 == 1  # odd: padding would show
    users, trained, lengths = [], [], []
    for rank in range(2):
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        for batch in datamodule.eval_dataloader("test"):
            users += batch.user_index.tolist()
        loader = datamodule.train_dataloader()
        lengths.append(len(loader))
        trained.append([i for batch in loader.batch_sampler for i in batch])
    datamodule.trainer = None
    everyone = datamodule.data.split.eval_users("test")
    assert sorted(users) == sorted(everyone) and len(users) == len(set(users)) == 43
    # training: equal step counts, together the whole epoch, one sample twice (the padding)
    assert lengths[0] == lengths[1] == math.ceil(math.ceil(train_rows / 2) / 8)
    assert len(trained[0]) == len(trained[1]) == math.ceil(train_rows / 2)
    assert set(trained[0]) | set(trained[1]) == set(range(train_rows))
    assert len(set(trained[0]) & set(trained[1])) <= 1
    assert len(list(datamodule.eval_dataloader("test").sampler)) == 43  # alone again: all


def test_rank_shards_interleave_back_into_the_shared_order():
    def sampler() -> RandomSampler:  # the same seeded order in every process
        return RandomSampler(range(11), generator=torch.Generator().manual_seed(3))

    shards = [list(RankShard(sampler(), rank, 2)) for rank in range(2)]
    assert [len(s) for s in shards] == [6, 6]
    woven = [i for pair in zip(*shards, strict=True) for i in pair]
    order = list(sampler())
    assert woven == order + order[:1]  # the shared order, wrapped around by one


# -- metrics across processes ---------------------------------------------------------------
def _spawned(worker, tmp_path: Path) -> dict:
    """What `worker` wrote after running in 2 processes (gloo, a file store in tmp_path)."""
    out = tmp_path / "out.json"
    torch.multiprocessing.spawn(worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_metric_set_combines_processes_into_the_single_process_numbers(tmp_path):
    written = _spawned(distributed_worker.main, tmp_path)
    single = distributed_worker.single_process()
    for name, values in single.items():
        assert written["combined"][name].keys() == values.keys(), name
        for key, value in values.items():
            assert written["combined"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
    # rank 0's rows alone give other numbers: the combination above did gather
    assert written["local"]["ranking"] != single["ranking"]
    assert written["local"]["rating"] != single["rating"]
    assert written["alone"] == pytest.approx(single["ranking"], abs=1e-6)  # local: no gather


@pytest.mark.slow
def test_catalogue_embedding_outside_a_step_works_with_fsdp_sharded_weights(tmp_path):
    written = _spawned(distributed_worker.fsdp_catalogue, tmp_path)
    assert written["units"] == 3  # the root and the two GPT-2 blocks
    assert written["direct"]  # called directly, the sharded root weights fail...
    assert written["diff"] <= 1e-6  # ...through the wrapper's forward: the unsharded vectors


# -- DDP end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, isolated_cache):
    """A 2-process CPU DDP run through the command line: (its folder, the process)."""
    folder = tmp_path_factory.mktemp("ddp") / "run"
    proc = train_cli(*RUN, *DDP, f"hydra.run.dir={folder}", cache=isolated_cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder, proc


@pytest.mark.slow
def test_ddp_run_metrics_equal_one_process_evaluation_of_its_weights(ddp_run, tmp_path):
    folder, _ = ddp_run
    written = json.loads((folder / "metrics.json").read_text())
    assert written["protocol"]["eval_users"] == {"val": 41, "test": 41}
    single = evaluate_saved(folder / "model", make_config(tmp_path, RUN), ("val", "test"))
    for stage in ("val", "test"):
        assert (
            written[stage].keys() == single[stage].keys() == {"hr@10", "mrr", "mrr@10", "ndcg@10"}
        )
        for key, value in single[stage].items():
            assert written[stage][key] == pytest.approx(value, abs=1e-6), (stage, key)
    assert 0 < written["test"]["hr@10"] < 1  # a repeated or missing user would move it


def schema(value):
    """The nested keys of a metrics.json (values left out)."""
    if isinstance(value, dict):
        return {key: schema(inner) for key, inner in value.items()}
    return type(value).__name__ if isinstance(value, list | str | bool) else "number"


@pytest.mark.slow
def test_ddp_run_writes_the_single_process_results_once(ddp_run, tmp_path):
    import recsys_lm.train as entry

    folder, proc = ddp_run
    written = json.loads((folder / "metrics.json").read_text())
    single = entry.train(make_config(tmp_path, RUN))
    assert schema(written) == schema(single)
    assert written["baselines"] == single["baselines"]  # rank 0 scored them on all the data
    # rank 1 wrote nothing but Hydra's log of its process; the summary was printed once
    assert {p.name for p in folder.iterdir()} == {
        ".hydra", "checkpoints", "metrics.json", "model", "train.log", "train_ddp_process_1.log",
    }  # fmt: skip
    assert proc.stdout.count("outputs:") == 1, proc.stdout[-3000:]


# -- refusals -----------------------------------------------------------------------------------
def test_ddp_in_a_local_multirun_is_refused(config, monkeypatch):
    cfg = config(DDP)
    fake = SimpleNamespace(
        initialized=lambda: True, get=lambda: SimpleNamespace(mode=RunMode.MULTIRUN)
    )
    monkeypatch.setattr(build, "HydraConfig", fake)
    with pytest.raises(ConfigError, match="trainer.devices.*multirun"):
        build_trainer(cfg, check_config(cfg).task)
    monkeypatch.setattr(build, "HydraConfig", SimpleNamespace(initialized=lambda: False))
    assert build_trainer(cfg, check_config(cfg).task).world_size == 2  # a plain run: allowed


def test_fsdp_config_builds_the_strategy_with_a_block_policy(config):
    cfg = config(["trainer=fsdp", "backbone=tiny_gpt2"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.kwargs["use_orig_params"] is True and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, TransformerBlocks)
    module = build_module(cfg)
    assert policy(module, True, 0)  # the root: look inside
    wrapped = {type(m).__name__ for m in module.modules() if policy(m, False, 0)}
    assert wrapped == {"GPT2Block"}
    assert cfg.trainer.precision == "bf16-mixed"


def test_fsdp_mixed_precision_from_dtype_names():
    node = {"_target_": "recsys_lm.models.sharding.mixed_precision", "reduce_dtype": "float32"}
    made = instantiate(node)
    assert (made.param_dtype, made.reduce_dtype, made.buffer_dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.bfloat16,
    )
    with pytest.raises(InstantiationException) as caught:
        instantiate({**node, "param_dtype": "bf16"})
    assert isinstance(caught.value.__cause__, ConfigError)
    assert caught.value.__cause__.key == "trainer.strategy.mixed_precision.param_dtype"


@pytest.mark.skipif(CUDA, reason="a GPU is present: FSDP is valid here")
@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        (["trainer.accelerator=cpu"], "trainer.accelerator", "CUDA GPUs only"),
        (["trainer.accelerator=gpu"], "trainer.strategy", "CUDA GPUs (none found)"),
    ],
)
def test_fsdp_without_a_gpu_is_refused_clearly(config, overrides, key, says):
    cfg = config(["trainer=fsdp", *overrides])
    with pytest.raises(ConfigError) as caught:
        build_trainer(cfg, check_config(cfg).task)
    assert caught.value.key == key and says in str(caught.value)


QUANTIZABLE = importlib.util.find_spec("bitsandbytes") is not None and CUDA


@pytest.mark.skipif(QUANTIZABLE, reason="bitsandbytes and a GPU are present")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_backbone_without_gpu_or_bitsandbytes_names_key_and_what_is_missing(config, bits):
    with pytest.raises(ConfigError) as caught:
        check_config(config(["backbone=minilm", f"backbone.quantization={bits}"]))
    message = str(caught.value)
    assert caught.value.key == "backbone.quantization" and bits in message
    missing = [] if CUDA else ["a CUDA GPU"]
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes")
    assert missing and all(what in message for what in missing), message
    with pytest.raises(ConfigError, match="backbone.quantization"):  # also at load time
        load_pretrained(quantization=bits)


def test_quantization_values_and_peft_none_are_refused(config):
    with pytest.raises(ConfigError, match=r"null or one of \['4bit', '8bit'\]"):
        check_config(config(["backbone=minilm", "backbone.quantization=3bit"]))
    if QUANTIZABLE:
        with pytest.raises(ConfigError, match="peft=lora"):
            check_config(config(["backbone=minilm", "backbone.quantization=4bit", "peft=none"]))


# -- on a GPU -----------------------------------------------------------------------------------
@pytest.fixture
def single_gpu_process_group():
    """FSDP on one GPU initialises a process group in this process: closed afterwards."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("head", ["retrieval", "generative"])
def test_fsdp_trains_tiny_gpt2_on_a_gpu(config, head, single_gpu_process_group):
    import recsys_lm.train as entry

    cfg = config(
        [
            "trainer=fsdp",
            "trainer.accelerator=gpu",  # the test preset (conftest FAST) says cpu
            "trainer.devices=1",
            "backbone=tiny_gpt2",
            f"head={head}",
            "baselines=[]",
        ]
    )
    result = entry.train(cfg)
    metric = "ndcg@10" if head == "retrieval" else "auroc"
    assert 0.0 <= result["test"][metric] <= 1.0 and result["timing"]["train_steps"] == 4


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not QUANTIZABLE, reason="needs a CUDA GPU and bitsandbytes")
def test_4bit_tiny_gpt2_trains_lora_on_a_gpu(config, tmp_path):
    import recsys_lm.train as entry

    saved = tmp_path / "tiny_gpt2"
    backbone = build_tiny_gpt2()
    backbone.model.save_pretrained(saved)
    backbone.tokenizer.save_pretrained(saved)
    cfg = config(
        [
            "backbone=hf",
            f"backbone.name_or_path={saved}",
            "backbone.pooling=last",
            "backbone.quantization=4bit",
            "peft=lora",
            "trainer.accelerator=gpu",
            "trainer.precision=bf16-mixed",
            "baselines=[]",
        ]
    )
    result = entry.train(cfg)
    assert 0.0 <= result["test"]["ndcg@10"] <= 1.0 and result["timing"]["train_steps"] == 4
