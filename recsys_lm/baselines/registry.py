"""The baseline registry: one row per baseline.

`build(data, **options)` turns a `PreparedData` and the baseline's options
(conf/train.yaml `baseline_options.<name>`) into a fitted `Scorer` (ranking and click tasks)
or `PointPredictor` (rating, behaviour): see recsys_lm.baselines.evaluate. Which tasks a
baseline applies to is said by the tasks (`Task.baselines`, recsys_lm.data.tasks), not here.
Adding a baseline is one module with a `build` and one row below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from recsys_lm.baselines import bias, item_knn, item_majority, popularity, sasrec
from recsys_lm.baselines.evaluate import PointPredictor, Scorer


@dataclass(frozen=True)
class Baseline:
    name: str  # as listed in `baselines=[...]`
    build: Callable[..., Scorer | PointPredictor]  # (data, **options) -> fitted baseline
    doc: str  # one line: what it is


def _registry(*rows: Baseline) -> dict[str, Baseline]:
    return {row.name: row for row in rows}


BASELINES: dict[str, Baseline] = _registry(
    Baseline("popularity", popularity.build, "training interaction counts, seeded tie order"),
    Baseline("item_knn", item_knn.build, "item-based kNN, cosine over the training matrix"),
    Baseline("sasrec", sasrec.build, "ID-only SASRec, trained and early-stopped here"),
    Baseline("bias", bias.build, "mean + regularised user and item biases (Koren, 2008)"),
    Baseline("item_majority", item_majority.build, "each item's most frequent training class"),
)
