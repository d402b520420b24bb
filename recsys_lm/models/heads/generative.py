"""Generative heads: a decoder's own next-token predictions score recommendations.

Neither head adds parameters: PEFT (or full fine-tuning) adapts the language model itself.
Both read `Backbone.lm_logits` on right-padded sequences and gather the real positions they
need per row, so prompt tuning's virtual tokens and padding never shift what is read.

- `GenerativeClickHead` (head=generative, task click): TALLRec's yes/no question (Bao et al.,
  RecSys 2023). The prompt (history, candidate and question, from `data.prompt`) ends at the
  last real token; P(yes) = softmax over the " Yes" and " No" logits there.
- `GenerativeRankingHead` (head=generative_rank, task generative_ranking): a candidate's score
  is the log-likelihood of its text given the history prompt; training is the teacher-forced
  LM loss of the next item's text.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from recsys_lm.data.batches import CandidateBatch, LMBatch, PairBatch
from recsys_lm.data.datasets.generative import lm_sequences
from recsys_lm.errors import ConfigError
from recsys_lm.metrics import ClickMetrics, RankingMetrics
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.heads.base import Head, PairHead

CLICK_LOSSES = ("lm", "binary")
SCORES = ("sum", "mean")


def last_real(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whichever side the padding is on."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask).argmax(dim=1)


class GenerativeHead(Head):
    """What both modes share: a decoder backbone that carries its LM head."""

    def bind(self, backbone: Backbone) -> None:
        if backbone.causal_lm:
            return
        if backbone.is_decoder:
            raise ConfigError(
                "backbone.causal_lm", False, "true: head=generative reads the LM head's logits"
            )
        raise ConfigError(
            "backbone",
            backbone.model_type,
            "a decoder with its LM head for head=generative: backbone=tiny_gpt2 (tests) or "
            "backbone=hf backbone.name_or_path=<local GPT-2/Llama/Qwen folder>; "
            f"`{backbone.model_type}` is an encoder (with an encoder, use head=click)",
        )


class GenerativeClickHead(GenerativeHead, PairHead):
    """P(click) as the answer to a yes/no question at the end of the prompt (TALLRec).

    `answer_yes`/`answer_no` are the answer words; their first tokens decide (" Yes." and
    " Yes" score the same), and they must differ. Loss `lm` is the LM loss of the answer token over the whole
    vocabulary, as TALLRec trains; `binary` is cross-entropy over the two answers only, the
    same quantity that is scored.
    """

    task = "click"

    def __init__(
        self,
        hidden_size: int,
        answer_yes: str = " Yes",
        answer_no: str = " No",
        loss: str = "lm",
    ) -> None:
        super().__init__(hidden_size)
        if loss not in CLICK_LOSSES:
            raise ConfigError("head.net.loss", loss, f"one of {list(CLICK_LOSSES)}")
        self.words = {"answer_yes": answer_yes, "answer_no": answer_no}
        self.loss_kind = loss
        self.answer_ids: list[int] = []

    def bind(self, backbone: Backbone) -> None:
        super().bind(backbone)
        tokenizer = backbone.tokenizer
        for key, word in self.words.items():
            if not tokenizer(word, add_special_tokens=False)["input_ids"]:
                raise ConfigError(f"head.net.{key}", word, "an answer word with some token")
        self.answer_ids = [
            tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in self.words.values()
        ]
        if self.answer_ids[0] == self.answer_ids[1]:
            raise ConfigError(
                "head.net.answer_no",
                self.words["answer_no"],
                "an answer whose first token differs from answer_yes's",
            )

    def next_token_logits(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        """[B, V] logits of the token after each prompt's last real token."""
        mask = batch.attention_mask
        last = last_real(mask)
        keep = mask.shape[1] - int(last.min())  # only the positions some row ends at
        logits = backbone.lm_logits(batch.input_ids, mask, keep)
        rows = torch.arange(len(last), device=last.device)
        return logits[rows, last - (mask.shape[1] - keep)].float()

    def answer_logit(self, logits: torch.Tensor) -> torch.Tensor:
        """log P(yes) - log P(no) under the two-answer softmax."""
        return logits[:, self.answer_ids[0]] - logits[:, self.answer_ids[1]]

    def forward(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        """P(yes) per row: softmax over the two answers' logits."""
        return torch.sigmoid(self.answer_logit(self.next_token_logits(backbone, batch)))

    def loss(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        logits = self.next_token_logits(backbone, batch)
        if self.loss_kind == "binary":
            return F.binary_cross_entropy_with_logits(self.answer_logit(logits), batch.labels)
        answers = torch.tensor(self.answer_ids, device=logits.device)
        return F.cross_entropy(logits, answers[(batch.labels < 0.5).long()])

    def evaluate(self, backbone: Backbone, batch: PairBatch, metrics: ClickMetrics) -> None:
        metrics.update(self(backbone, batch), batch.labels)


class GenerativeRankingHead(GenerativeHead):
    """Candidates ranked by log P(item text | history prompt).

    `score`: `sum` of the text's token log-probabilities (the sequence's log-likelihood,
    which favours short titles) or their `mean` (length-normalised). `chunk_size` sequences go
    through the model at once in evaluation: one user brings 1 + data.eval_negatives of them.
    """

    task = "generative_ranking"

    def __init__(self, hidden_size: int, score: str = "sum", chunk_size: int = 64) -> None:
        super().__init__(hidden_size)
        if score not in SCORES:
            raise ConfigError("head.net.score", score, f"one of {list(SCORES)}")
        if chunk_size < 1:
            raise ConfigError("head.net.chunk_size", chunk_size, "a positive count")
        self.score, self.chunk_size = score, chunk_size

    @staticmethod
    def token_logprobs(
        backbone: Backbone, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities, target mask), both [B, L']: each target token's log P given
        every token before it; zero where the mask is False. Token p is predicted at p - 1,
        and only positions from the earliest target's predecessor on are projected."""
        start = max(int(target.float().argmax(dim=1).min()) - 1, 0)
        logits = backbone.lm_logits(ids, mask, ids.shape[1] - start)[:, :-1].float()
        following = ids[:, start + 1 :].unsqueeze(-1)
        # log_softmax, gathered: no second [B, L', V] tensor is allocated.
        picked = logits.gather(-1, following).squeeze(-1) - logits.logsumexp(dim=-1)
        wanted = target[:, start + 1 :]
        return picked * wanted, wanted

    def loss(self, backbone: Backbone, batch: LMBatch) -> torch.Tensor:
        logp, wanted = self.token_logprobs(
            backbone, batch.input_ids, batch.attention_mask, batch.target_mask
        )
        return -logp.sum() / wanted.sum().clamp_min(1)

    def sequence_scores(
        self, backbone: Backbone, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        logp, wanted = self.token_logprobs(backbone, ids, mask, target)
        total = logp.sum(dim=1)
        return total if self.score == "sum" else total / wanted.sum(dim=1).clamp_min(1)

    def forward(self, backbone: Backbone, batch: CandidateBatch) -> torch.Tensor:
        """Scores [B, n_items]: each candidate's, the lowest float for every other item
        (those are in `exclude`, so they are never ranked)."""
        scores = torch.full(
            batch.relevant.shape, torch.finfo(torch.float32).min, device=batch.input_ids.device
        )
        for start in range(0, len(batch.query), self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            width = int(batch.attention_mask[rows].sum(dim=1).max())  # trim shared padding
            chunk = self.sequence_scores(
                backbone,
                batch.input_ids[rows, :width],
                batch.attention_mask[rows, :width],
                batch.target_mask[rows, :width],
            )
            scores[batch.query[rows], batch.item_index[rows]] = chunk
        return scores

    def evaluate(self, backbone: Backbone, batch: CandidateBatch, metrics: RankingMetrics) -> None:
        metrics.update(self(backbone, batch), batch.relevant, batch.exclude)

    @torch.no_grad()
    def score(self, backbone: Backbone, history, candidates) -> torch.Tensor:
        """Each candidate's text log-likelihood (sum or mean) after the history prompt."""
        catalogue = self.require_catalogue()
        candidates = list(candidates)
        out = []
        for start in range(0, len(candidates), self.chunk_size):
            pairs = [(list(history), int(c)) for c in candidates[start : start + self.chunk_size]]
            ids, mask, target = lm_sequences(catalogue.tokens, catalogue.history_budget, pairs)
            device = backbone.device
            out.append(
                self.sequence_scores(backbone, ids.to(device), mask.to(device), target.to(device))
            )
        return torch.cat(out)
