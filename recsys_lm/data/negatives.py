"""Negative samplers, chosen by `data.negatives.sampler`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsys_lm.errors import ConfigError


@dataclass
class NegativeSampler:
    """Draws items a user has not interacted with.

    uniform: every other item equally likely. popularity: proportional to training count
    ** alpha (harder negatives; word2vec's 0.75 by default). native: the items shown in the
    same impression and not clicked (MIND); uniform where an interaction has no impression.
    """

    num_items: int
    method: str = "uniform"
    counts: np.ndarray | None = None
    alpha: float = 0.75
    # impression id -> items shown and not clicked
    impressions: dict[object, list[int]] = field(default_factory=dict)
    # (user, item) -> impression id of that click
    shown_with: dict[tuple[int, int], object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("uniform", "popularity", "native"):
            raise ConfigError(
                "data.negatives.sampler", self.method, "uniform, popularity or native"
            )
        if self.method == "native" and not self.impressions:
            raise ConfigError(
                "data.negatives.sampler",
                "native",
                "a dataset with impression logs (MIND); this one has none",
            )
        self._p = None
        # How many negatives came from impressions vs the uniform fallback: reported.
        self.drawn = {"native": 0, "sampled": 0}
        if self.method == "popularity":
            weights = (np.asarray(self.counts, dtype=np.float64) + 1.0) ** self.alpha
            self._p = weights / weights.sum()

    def sample(
        self, rng: np.random.Generator, user: int, item: int, avoid: set[int], n: int
    ) -> list[int]:
        """`n` distinct negatives for the positive (user, item), none of them in `avoid`."""
        out: list[int] = []
        if self.method == "native":
            shown = [
                i
                for i in self.impressions.get(self.shown_with.get((user, item)), [])
                if i not in avoid
            ]
            if shown:
                pick = rng.permutation(len(shown))[:n]
                out = [shown[i] for i in pick]
        extra = self._draw(rng, avoid | set(out), n - len(out))
        self.drawn["native"] += len(out)
        self.drawn["sampled"] += len(extra)
        return out + extra

    def _draw(self, rng: np.random.Generator, avoid: set[int], n: int) -> list[int]:
        n = min(n, self.num_items - len(avoid))
        out: list[int] = []
        chosen: set[int] = set()
        while len(out) < n:
            draw = rng.choice(self.num_items, size=2 * (n - len(out)) + 4, p=self._p)
            for item in draw.tolist():
                if item not in avoid and item not in chosen:
                    chosen.add(item)
                    out.append(item)
                    if len(out) == n:
                        break
        return out
