"""Parity of an inference flavour with the trained model, on the run's own test users.

Score figures go through the Head contract only (`recommend` / `score`), so they hold for any
head:

- ranking heads that rank the whole catalogue (a task with a `full` eval mode: retrieval,
  sequential): each user's scores of every item outside their history, from
  `recommend(history, k=n_items)` (the heads' own fast path over cached item vectors);
- other heads (click, rating, behaviour, generative): `score(history, candidates)` over the
  user's held-out items plus seeded random others, `candidates` in all.

`max_score_diff` is the largest absolute difference of any score; `top_k_overlap` the mean
share of the reference's top k (history left out) that the flavour also puts in its top k,
or, for heads that give class probabilities ([n, C] scores), the share of candidates given
the same most likely class. The task's metric comes from Lightning's `trainer.test` on the
run's test loader (the caller passes it in: building a Trainer is the composition root's
job). `latency_ms` is the median time of one backbone forward over one user's history text.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recsys_lm.data.batches import pad
from recsys_lm.data.prepared import PreparedData
from recsys_lm.models.heads.base import top_k
from recsys_lm.models.module import RecsysLM

STAGE = "test"
WARMUP = 2  # untimed forwards before timing (first-call allocation, lazy initialisation)


@dataclass(frozen=True)
class Limits:
    """A flavour's parity thresholds; None leaves a figure unchecked."""

    max_score_diff: float | None = None
    min_overlap: float | None = None
    max_metric_change: float | None = None  # relative: |flavour - trained| / |trained|


def sample_users(data: PreparedData, count: int, seed: int) -> list[int]:
    """Up to `count` of the run's test users (those with a held-out item and some history),
    a seeded random choice, in index order."""
    users = data.split.eval_users(STAGE)
    if len(users) <= count:
        return users
    chosen = np.random.default_rng(seed).choice(len(users), count, replace=False)
    return [users[i] for i in sorted(chosen)]


def ranks_catalogue(data: PreparedData) -> bool:
    """Whether the task ranks the whole catalogue (so `recommend` over it is cheap)."""
    return "full" in data.task.eval_modes


class Scorer:
    """The scores parity compares, for one set of users, computed once for the reference."""

    def __init__(self, data: PreparedData, users: list[int], candidates: int, seed: int) -> None:
        self.data, self.users = data, users
        self.full = ranks_catalogue(data)
        rng = np.random.default_rng(seed)
        self.candidates = {u: self._candidates(u, candidates, rng) for u in users}

    def _candidates(self, user: int, count: int, rng: np.random.Generator) -> list[int]:
        if self.full:
            return []
        split = self.data.split
        held_out = list(dict.fromkeys(split.targets(user, STAGE)))
        seen = split.seen(user)
        others = [i for i in rng.permutation(self.data.num_items) if int(i) not in seen]
        return held_out + [int(i) for i in others[: max(0, count - len(held_out))]]

    def history(self, user: int) -> list[int]:
        return self.data.split.history(user, STAGE)

    @torch.no_grad()
    def scores(self, module: RecsysLM) -> list[torch.Tensor]:
        """Per user: [n_items] scores (-inf on the history) or [n_candidates(, C)] scores."""
        module.eval()  # no dropout, whatever a Trainer left behind
        out = []
        for user in self.users:
            history = self.history(user)
            if self.full:
                ranked = module.recommend(history, k=self.data.num_items)
                row = torch.full((self.data.num_items,), float("-inf"))
                row[torch.as_tensor(ranked.items)] = torch.as_tensor(ranked.scores)
                out.append(row)
            else:
                out.append(module.score(history, self.candidates[user]).float().cpu())
        return out


def compare(reference: list[torch.Tensor], flavour: list[torch.Tensor], k: int) -> dict:
    """max_score_diff and top_k_overlap of two Scorer.scores results."""
    largest, overlaps = 0.0, []
    for ref, got in zip(reference, flavour, strict=True):
        finite = torch.isfinite(ref)
        if not torch.equal(finite, torch.isfinite(got)):
            largest = float("inf")  # items scored by one and not the other
        elif finite.any():
            largest = max(largest, float((ref[finite] - got[finite]).abs().max()))
        overlaps.append(_agreement(ref, got, k))
    return {"max_score_diff": largest, "top_k_overlap": float(np.mean(overlaps)), "k": k}


def _agreement(ref: torch.Tensor, got: torch.Tensor, k: int) -> float:
    if ref.dim() == 2:  # class probabilities: the same most likely class
        return float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    k = min(k, int(torch.isfinite(ref).sum()))
    banned = torch.nonzero(~torch.isfinite(ref)).flatten().tolist()
    a = set(top_k(ref, k, banned).items)
    b = set(top_k(got, k, banned).items)
    return len(a & b) / max(k, 1)


@torch.no_grad()
def latency_ms(
    module: RecsysLM, data: PreparedData, users: Sequence[int], repeats: int = 3
) -> float:
    """Median milliseconds of one backbone forward over one user's history text (what a
    two-tower query costs): each user's fastest of `repeats` forwards (the others lost time
    to whatever else ran), the median over `users`."""
    tokens, budget = data.tokens, data.settings.max_history_tokens
    backbone = module.backbone
    times = []
    for i, user in enumerate(users):
        ids = tokens.layout.single(tokens.history(data.split.history(user, STAGE), budget))[0]
        input_ids, mask = pad([ids], tokens.pad_id)
        input_ids, mask = input_ids.to(backbone.device), mask.to(backbone.device)
        for _ in range(WARMUP if i == 0 else 0):
            backbone(input_ids, mask)
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            backbone(input_ids, mask)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return round(1000 * statistics.median(times), 3)


def relative_change(value: float, reference: float) -> float | None:
    """(value - reference) / |reference|; 0 when both are 0, None (undefined) when only the
    reference is."""
    if reference == 0:
        return 0.0 if value == 0 else None
    return (value - reference) / abs(reference)


def failures(figures: dict, limits: Limits, prefix: str = "parity") -> list[str]:
    """Each threshold the figures miss, naming the figure, its value and the config key
    (`<prefix>.<limit>`) it missed."""
    out = []
    diff, overlap = figures["max_score_diff"], figures["top_k_overlap"]
    change = figures.get("metric_change")
    if limits.max_score_diff is not None and not diff <= limits.max_score_diff:
        out.append(
            f"max score difference {diff:.3g} > {prefix}.max_score_diff={limits.max_score_diff:g}"
        )
    if limits.min_overlap is not None and not overlap >= limits.min_overlap:
        out.append(
            f"top-{figures['k']} overlap {overlap:.4f} < {prefix}.min_overlap={limits.min_overlap:g}"
        )
    if (
        limits.max_metric_change is not None
        and change is not None
        and not abs(change) <= limits.max_metric_change
    ):
        out.append(
            f"test {figures['metric']} {figures['metric_value']:.4f} vs trained "
            f"{figures['metric_reference']:.4f} ({change:+.2%}): beyond "
            f"{prefix}.max_metric_change={limits.max_metric_change:g}"
        )
    return out
