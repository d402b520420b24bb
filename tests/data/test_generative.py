"""Generative ranking samples: history prompt + item text, with the item's tokens marked."""

from __future__ import annotations

import pytest

from recsys_lm.data.batches import CandidateBatch, LMBatch
from recsys_lm.data.prepared import PreparedData
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.models.backbone import decoder_style_tokenizer
from tests.conftest import make_datamodule


@pytest.fixture(scope="module")
def dm() -> PreparedData:
    tokenizer = decoder_style_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    prompt = {"history_prefix": "watched:", "candidate_prefix": "next:"}
    return make_datamodule(
        tokenizer,
        "generative_ranking",
        SampleSource(num_users=12, num_items=40),
        eval_mode="sampled",
        eval_negatives=3,
        batch_size=4,
        prompt=prompt,
        use_cache=False,
    ).data


def test_training_rows_mark_the_next_items_tokens(dm):
    dataset = dm.datasets["train"]
    rows = [dataset[i] for i in range(4)]
    batch = dataset.collate(rows)
    assert isinstance(batch, LMBatch)
    prompt = dm.tokens.prompt
    for row, (history, item) in enumerate(rows):
        ids = batch.input_ids[row]
        marked = ids[batch.target_mask[row]].tolist()
        assert marked == dm.tokens.item_ids[item] and batch.item_index[row] == item
        start = int(batch.target_mask[row].float().argmax())
        before = ids[:start].tolist()
        assert before[: len(prompt["history_prefix"])] == prompt["history_prefix"]
        assert before[-len(prompt["candidate_prefix"]) :] == prompt["candidate_prefix"]
        assert dm.tokens.history(history, dm.settings.max_history_tokens)[-1] in before
    assert (batch.target_mask <= batch.attention_mask.bool()).all()  # never on padding


def test_evaluation_has_one_sequence_per_user_and_candidate(dm):
    dataset = dm.datasets["test"]
    rows = [dataset[i] for i in range(3)]
    batch = dataset.collate(rows)
    assert isinstance(batch, CandidateBatch)
    candidates = [dataset.candidates[user] for user, _, _, _ in rows]
    assert len(batch.query) == sum(map(len, candidates)) == 3 * 4  # target + 3 negatives
    for n in range(len(batch.query)):
        row, item = int(batch.query[n]), int(batch.item_index[n])
        assert item in candidates[row]
        assert batch.input_ids[n][batch.target_mask[n]].tolist() == dm.tokens.item_ids[item]
    relevant, exclude = dataset.masks(rows)
    assert (batch.relevant == relevant).all() and (batch.exclude == exclude).all()
    assert (~batch.exclude).sum() == len(batch.query)  # the candidates are all that is ranked
