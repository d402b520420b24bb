"""Generative heads on a tiny GPT-2 with its LM head: yes/no click and title log-likelihood."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from recsys_lm.build import build_module, load_model
from recsys_lm.data.batches import CandidateBatch, LMBatch, PairBatch, pad
from recsys_lm.errors import ConfigError
from recsys_lm.models.heads.generative import GenerativeClickHead
from recsys_lm.train import train
from tests.conftest import (
    TINY,
    assert_ranking_metrics,
    fresh_datamodule,
    make_datamodule,
    recomputed_auroc,
    train_and_keep,
)

GPT2 = ["backbone=tiny_gpt2", "data.eval_negatives=4"]  # 5 candidates per user: fast LM scoring
CHEAP = ["trainer.max_steps=2", "baselines=[]"]


def built(config, overrides):
    """(module, set-up datamodule) for a composed config, without training."""
    cfg = config([*GPT2, *overrides])
    module = build_module(cfg).eval()
    return module, fresh_datamodule(cfg, module)


def unpadded_logits(module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, V] logits of one row run alone, without padding; virtual tokens dropped."""
    real = ids[mask.bool()].unsqueeze(0)
    with torch.no_grad():
        logits = module.backbone.model(input_ids=real, attention_mask=torch.ones_like(real)).logits
    return logits[0, -real.shape[1] :]


@pytest.mark.parametrize(
    ("head", "peft"),
    [
        pytest.param("generative", "none", marks=pytest.mark.slow),
        ("generative", "lora"),
        pytest.param("generative", "prompt", marks=pytest.mark.slow),
        pytest.param("generative_rank", "lora", marks=pytest.mark.slow),
        ("generative_rank", "prefix"),
    ],
)
def test_generative_heads_train_and_evaluate(config, monkeypatch, head, peft):
    result, cfg, module = train_and_keep(
        config, monkeypatch, [*GPT2, f"head={head}", f"peft={peft}"]
    )
    metric = "auroc" if head == "generative" else "ndcg@10"
    if head == "generative":  # the reported AUROC is the tested weights' own
        auroc = recomputed_auroc(module.cpu(), fresh_datamodule(cfg, module))
        assert result["test"]["auroc"] == pytest.approx(auroc, abs=1e-4)
    else:  # 5 candidates, k = 10: every held-out item is in the top 10
        assert_ranking_metrics(result["test"], k=10)
        assert result["test"]["hr@10"] == 1.0
        assert result["test"]["mrr@10"] == pytest.approx(result["test"]["mrr"])
    assert result["timing"]["train_steps"] == 4
    assert result["protocol"]["task"] == ("click" if head == "generative" else "generative_ranking")
    assert result["protocol"]["eval_mode"] == "sampled-4"
    assert metric in result["baselines"]["popularity"]["test"]  # same candidates, same metric
    if peft != "none":
        assert 0 < result["params"]["trainable"] < 0.05 * result["params"]["total"]


@pytest.mark.parametrize("peft", ["none", "prompt"])
def test_p_yes_is_the_two_answer_softmax_at_the_last_prompt_token(config, peft):
    module, dm = built(config, ["head=generative", f"peft={peft}"])
    batch: PairBatch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        p_yes = module.head(module.backbone, batch)
    assert p_yes.shape == batch.labels.shape and ((p_yes > 0) & (p_yes < 1)).all()
    row = int(batch.attention_mask.sum(1).argmin())  # the shortest row: right-padded
    assert batch.attention_mask[row, -1] == 0
    last = unpadded_logits(module, batch.input_ids[row], batch.attention_mask[row])[-1]
    yes, no = module.head.answer_ids
    expected = F.softmax(last[[yes, no]], dim=0)[0]
    torch.testing.assert_close(p_yes[row], expected, rtol=1e-4, atol=1e-6)


def test_answer_words_are_single_first_tokens_that_differ():
    from recsys_lm.models.backbone import build_tiny_gpt2

    backbone = build_tiny_gpt2(causal_lm=True)
    head = GenerativeClickHead(32, answer_yes=" Yes.", answer_no=" No.")
    head.bind(backbone)
    ids = backbone.tokenizer([" yes", " no"], add_special_tokens=False)["input_ids"]
    assert head.answer_ids == [ids[0][0], ids[1][0]]
    with pytest.raises(ConfigError, match="head.net.answer_no"):
        GenerativeClickHead(32, answer_yes=" Yes", answer_no=" yes please").bind(backbone)
    with pytest.raises(ConfigError, match="head.net.loss"):
        GenerativeClickHead(32, loss="hinge")


@pytest.mark.parametrize("loss", ["lm", "binary"])
def test_click_losses(config, loss):
    module, dm = built(config, ["head=generative", "peft=none", f"head.net.loss={loss}"])
    batch: PairBatch = next(iter(dm.train_dataloader()))
    head, backbone = module.head, module.backbone
    with torch.no_grad():
        value = head.loss(backbone, batch)
        logits = head.next_token_logits(backbone, batch)
    yes, no = head.answer_ids
    if loss == "lm":  # the LM loss of the answer token, over the whole vocabulary
        answers = torch.where(batch.labels > 0.5, yes, no)
        expected = F.cross_entropy(logits, answers)
    else:  # -log of the two-answer softmax's probability of the right answer
        p = F.softmax(logits[:, [yes, no]], dim=1)[:, 0]
        expected = F.binary_cross_entropy(p, batch.labels)
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_candidate_score_is_the_log_likelihood_of_its_title(config, score):
    module, dm = built(config, ["head=generative_rank", "peft=none", f"head.net.score={score}"])
    batch: CandidateBatch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        scores = module.head(module.backbone, batch)
    n = int(batch.attention_mask.sum(1).argmin())  # a padded sequence
    ids, mask, target = batch.input_ids[n], batch.attention_mask[n], batch.target_mask[n]
    logp = unpadded_logits(module, ids, mask).log_softmax(-1)
    positions = target.nonzero().flatten().tolist()
    item = int(batch.item_index[n])
    assert ids[positions].tolist() == dm.data.tokens.item_ids[item]  # the targets are the title
    by_hand = sum(float(logp[p - 1, ids[p]]) for p in positions)
    if score == "mean":
        by_hand /= len(positions)
    assert scores[batch.query[n], item].item() == pytest.approx(by_hand, rel=1e-4)
    # Every candidate is scored; everything else is excluded from ranking.
    candidates = scores > torch.finfo(torch.float32).min
    assert torch.equal(candidates, ~batch.exclude)


def test_lm_training_loss_matches_transformers_own_shifted_loss(config):
    module, dm = built(config, ["head=generative_rank", "peft=none"])
    batch: LMBatch = next(iter(dm.train_dataloader()))
    labels = batch.input_ids.masked_fill(~batch.target_mask, -100)
    with torch.no_grad():
        ours = module.head.loss(module.backbone, batch)
        theirs = module.backbone.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("head", "peft"), [("generative", "lora"), ("generative_rank", "prompt")])
def test_saved_generative_model_reloads_to_identical_scores(
    config, tmp_path, head, peft, monkeypatch
):
    cfg_overrides = [*GPT2, *CHEAP, f"head={head}", f"peft={peft}", "optim.lr=1e-2"]
    _, cfg, trained = train_and_keep(config, monkeypatch, cfg_overrides)
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").exists()
    trained = trained.cpu().eval()
    dm = fresh_datamodule(cfg, trained)
    batch = next(iter(dm.test_dataloader()))
    reloaded = load_model(tmp_path / "model")
    with torch.no_grad():
        expected = trained.head(trained.backbone, batch)
        actual = reloaded.head(reloaded.backbone, batch)
        fresh = build_module(cfg).eval()
        untrained = fresh.head(fresh.backbone, batch)
    assert torch.allclose(expected, actual, atol=1e-6)
    assert not torch.allclose(untrained, actual, atol=1e-6)


def test_causal_lm_adapter_is_saved_as_a_causal_lm_adapter(config, tmp_path):
    import json

    module = build_module(config([*GPT2, "head=generative", "peft=lora"]))
    module.backbone.model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM"  # loads with AutoPeftModelForCausalLM


@pytest.mark.parametrize("head", ["generative", "generative_rank"])
def test_encoder_backbone_is_refused_with_the_key_and_the_choice(config, head):
    with pytest.raises(ConfigError) as error:
        build_module(config([f"head={head}"]))  # FAST's backbone: tiny_bert, an encoder
    message = str(error.value)
    assert "`backbone`" in message and "backbone=tiny_gpt2" in message
    assert "backbone=hf backbone.name_or_path=" in message and "head=click" in message


def test_decoder_without_its_lm_head_is_refused(config):
    with pytest.raises(ConfigError, match="backbone.causal_lm"):
        build_module(config([*GPT2, "head=generative", "backbone.causal_lm=false"]))


def test_full_ranking_is_refused_for_generative_ranking(tokenizer):
    with pytest.raises(ConfigError, match="data.eval_mode.*n_items passes per user"):
        make_datamodule(tokenizer, "generative_ranking", eval_mode="full")


@pytest.mark.real_data
def test_generative_ranking_on_movielens_100k(config, ml100k_root, tmp_path):
    """Next-title log-likelihood ranking on MovieLens-100K: a few LM steps, then every user's
    held-out movie among 4 sampled ones, scored by the decoder."""
    result = train(
        config(
            [
                *TINY,
                *GPT2,
                "head=generative_rank",
                "data=movielens_100k",
                f"data.root={ml100k_root}",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.eval_batch_size=16",
                "+trainer.limit_test_batches=2",  # 32 users: the path, not the figure
                "export_model=false",
            ],
            fast=False,
        )
    )
    assert result["protocol"]["eval_mode"] == "sampled-4"
    assert result["protocol"]["eval_users"]["test"] == 943
    assert_ranking_metrics(result["test"], k=10)
    assert result["test"]["hr@10"] == 1.0  # 5 candidates: all within the top 10
    assert "popularity" in result["baselines"]


@pytest.mark.pretrained
def test_smollm2_answers_a_tallrec_question_through_the_generative_head(smollm2):
    head = GenerativeClickHead(smollm2.hidden_size)
    head.bind(smollm2)
    tok = smollm2.tokenizer
    prompts = [
        "The user likes: Toy Story ; Babe\nThe user dislikes: Heat\n"
        "Will the user like the movie Aladdin?\nAnswer:",
        "The user likes: Alien\nThe user dislikes: Fargo\nWill the user like the movie Se7en?"
        "\nAnswer:",
    ]
    batch = prompt_batch(tok, prompts, [1.0, 0.0])
    short = prompt_batch(tok, prompts[1:], [0.0])  # the shorter prompt alone: no padding
    with torch.no_grad():
        p_yes, alone = head(smollm2, batch), head(smollm2, short)
        loss = head.loss(smollm2, batch)
    assert p_yes.shape == (2,) and bool(((p_yes > 0) & (p_yes < 1)).all())
    assert float(p_yes[1]) == pytest.approx(float(alone[0]), abs=1e-4)  # padding is ignored
    assert torch.isfinite(loss) and loss > 0


def prompt_batch(tokenizer, prompts: list[str], labels: list[float]) -> PairBatch:
    ids, mask = pad([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id)
    rows = torch.arange(len(prompts))
    return PairBatch(ids, mask, torch.zeros_like(ids), torch.tensor(labels), rows, rows)
