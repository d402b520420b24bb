"""The task registry: one `Task` record per task (see recsys_lm.data.task).

A head names its task (`Head.task`); everything else about the task lives in its record here.
Adding a task is one record: a builder for its datasets (from a `PreparedData` and a stage),
its metrics, eval modes, monitored metric and applicable baselines. `register_task` adds one
from outside this module (a plugin, a test).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from recsys_lm.data.datasets.examples import STAGE_SEEDS, ClickSet, RankingSet, TwoTowerSet
from recsys_lm.data.datasets.generative import CandidateTitleSet, NextTitleSet
from recsys_lm.data.datasets.points import PointSet, behaviour_targets, rating_targets
from recsys_lm.data.datasets.sequences import SequenceRankingSet, SequenceSet
from recsys_lm.data.prepared import PreparedData
from recsys_lm.data.task import Task
from recsys_lm.errors import ConfigError
from recsys_lm.metrics import BehaviourMetrics, ClickMetrics, RankingMetrics, RatingMetrics

# Baselines that score every item for a user: they fit any task that ranks or picks items.
ITEM_SCORERS = ("popularity", "item_knn", "sasrec")


def click_dataset(data: PreparedData, stage: str) -> Dataset:
    """Positives + sampled negatives (data.click_labels=sampled) or every rated interaction
    labelled by its rating (=rating, TALLRec); then a seeded subset of data.max_<stage>_samples."""
    s = data.settings
    if s.click_labels == "rating":
        rows = ClickSet.from_ratings(
            data.split,
            stage,
            s.rating_threshold,
            s.history_items,
            data.tokens,
            s.max_history_tokens,
            s.history_by_rating,
        )
    elif stage == "train":
        rows = ClickSet.for_training(
            data.split, data.sampler, s.train_negatives, s.seed, data.tokens, s.max_history_tokens
        )
    else:
        rows = ClickSet.for_eval(
            data.split,
            stage,
            data.sampler,
            s.eval_negatives,
            s.seed,
            data.tokens,
            s.max_history_tokens,
        )
    return rows.subset(s.max_samples(stage), s.seed + STAGE_SEEDS[stage])


def check_click_labels(data: PreparedData) -> None:
    if data.settings.click_labels == "rating" and "rating" not in data.split.attrs:
        raise ConfigError(
            "data.click_labels",
            "rating",
            f"a dataset with explicit ratings; {data.name} has no rating column "
            "(use data.click_labels=sampled)",
        )


def click_protocol(data: PreparedData) -> dict:
    """Where click labels came from, and the sample counts when any were capped."""
    s = data.settings
    out: dict = {"click_labels": s.click_labels}
    if s.click_labels == "rating":
        # Every held-out rated interaction is a sample: nothing is sampled or ranked.
        out["eval_mode"] = f"rating>{s.rating_threshold:g}"
        out["history_items"] = s.history_items
        out["history_by_rating"] = s.history_by_rating
        out["labels"] = (
            f"one sample per rated interaction of each part, positive when rating > "
            f"{s.rating_threshold:g}; history = the user's "
            f"{s.history_items or 'all'} previous interactions in time (any part"
            + (
                "; split into liked and disliked by their own ratings"
                if s.history_by_rating
                else ""
            )
            + "); "
            "capped parts are seeded random subsets (TALLRec, Bao et al. 2023)"
        )
    caps = {stage: s.max_samples(stage) for stage in ("train", "val", "test")}
    if s.click_labels == "rating" or any(caps.values()):
        out["samples"] = {stage: len(d) for stage, d in data.datasets.items()}
        out["max_samples"] = caps
        out["positives"] = {stage: int(d.labels.sum()) for stage, d in data.datasets.items()}
    return out


def ranking_candidates(data: PreparedData) -> dict:
    """What a ranking evaluation ranks: the catalogue (or its cold items, data.eval_items),
    or the held-out items plus sampled negatives (data.eval_mode=sampled)."""
    return {
        "sampler": data.sampler if data.eval_mode == "sampled" else None,
        "negatives": data.settings.eval_negatives,
        "seed": data.seed,
        "rank_items": data.rank_items(),
    }


def retrieval_dataset(data: PreparedData, stage: str) -> Dataset:
    budget = data.settings.max_history_tokens
    if stage == "train":
        return TwoTowerSet(data.split, data.tokens, budget, data.settings.split.replay, data.seed)
    return RankingSet(
        data.split, stage, data.num_items, data.tokens, budget, **ranking_candidates(data)
    )


def sequential_dataset(data: PreparedData, stage: str) -> Dataset:
    settings, max_len = data.settings, data.settings.max_sequence_length
    if stage == "train":
        return SequenceSet(
            data.split,
            max_len,
            data.tokens,
            settings.split.replay,
            data.seed,
            settings.window_stride,
        )
    return SequenceRankingSet(
        data.split, stage, data.num_items, max_len, **ranking_candidates(data)
    )


def point_dataset(data: PreparedData, stage: str) -> Dataset:
    return PointSet(data.split, stage, data.targets, data.tokens, data.settings.max_history_tokens)


def generative_ranking_dataset(data: PreparedData, stage: str) -> Dataset:
    """Training: (history, next item) as one LM sequence; evaluation: each user's sampled
    candidates, every one continuing the user's history prompt."""
    s = data.settings
    if stage == "train":
        return NextTitleSet(data.split, data.tokens, s.max_history_tokens)
    return CandidateTitleSet(
        data.split,
        stage,
        data.num_items,
        data.tokens,
        s.max_history_tokens,
        data.sampler,
        s.eval_negatives,
        s.seed,
    )


def interaction_columns(data: PreparedData) -> list[str]:
    return [str(c) for c in data.data.interactions.columns]


def task_rating_targets(data: PreparedData):
    return rating_targets(data.split, data.name, interaction_columns(data))


def task_behaviour_targets(data: PreparedData):
    return behaviour_targets(
        data.split, data.settings.behaviour, data.name, interaction_columns(data)
    )


def ranking_task(name: str, build, **fields) -> Task:
    """A next-item ranking task: full ranking by default, NDCG@k watched, item scorers as
    baselines (popularity reported by default)."""
    defaults = {
        "eval_modes": ("full", "sampled"),
        "monitor": "ndcg@{k}",
        "baselines": ITEM_SCORERS,
        "default_baselines": ("popularity",),
    }
    return Task(name, build, RankingMetrics, **{**defaults, **fields})


POINTWISE = "a value is predicted for each held-out interaction; nothing is ranked"

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add (or replace) a task record; returns it, so a module can keep a reference."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError("head.net._target_", name, f"a head whose task is one of {list(TASKS)}")
    return TASKS[name]


for _task in (
    Task(
        "click",
        click_dataset,
        lambda k: ClickMetrics(),
        eval_modes=("sampled",),
        monitor="auroc",
        baselines=ITEM_SCORERS,
        default_baselines=("popularity",),
        why="a cross-encoder scores sampled candidates; use head=retrieval for full ranking",
        check=check_click_labels,
        protocol=click_protocol,
    ),
    ranking_task("retrieval", retrieval_dataset),
    ranking_task("sequential", sequential_dataset),
    ranking_task(  # candidates' title log-likelihoods
        "generative_ranking",
        generative_ranking_dataset,
        eval_modes=("sampled",),
        why="each candidate's title is scored by a forward pass of the decoder, so full "
        "ranking costs n_items passes per user (1,682 for MovieLens-100K); rank the held-out "
        "item among data.eval_negatives sampled ones",
    ),
    Task(
        "rating",
        point_dataset,
        lambda k: RatingMetrics(),
        eval_modes=("pointwise",),
        monitor="rmse",
        monitor_mode="min",
        baselines=("bias",),
        default_baselines=("bias",),
        why=POINTWISE,
        targets=task_rating_targets,
    ),
    Task(
        "behaviour",
        point_dataset,
        lambda k: BehaviourMetrics(),
        eval_modes=("pointwise",),
        monitor="macro_f1",
        baselines=("item_majority",),
        default_baselines=("item_majority",),
        why=POINTWISE,
        targets=task_behaviour_targets,
    ),
):
    register_task(_task)
