"""Typed data settings: the schema of `data.*` in conf/data/loader.yaml.

`data_settings(node)` merges a composed `data` node into these dataclasses before anything is
loaded, so a mistyped key (`data.batchsize`, `data.split.methd`, in an experiment file or on
the command line) stops at once with OmegaConf's message naming the full key, and values of
the wrong type are refused the same way. `source` is checked against its own class (each
source is a dataclass; see recsys_lm.data.sources.base).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recsys_lm.data.text import PromptText
from recsys_lm.errors import ConfigError

EVAL_MODES = ("full", "sampled", "pointwise")
EVAL_ITEMS = ("all", "cold")
CLICK_LABELS = ("sampled", "rating")
# Splits whose parts are in time order per user (train, then val, then test): rating-labelled
# click samples read the interactions before them as history.
TIME_ORDERED_SPLITS = ("leave_one_out", "temporal", "predefined")


@dataclass
class FilterSettings:
    min_user_interactions: int = 0
    min_item_interactions: int = 0


@dataclass
class SplitSettings:
    method: str = "leave_one_out"
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    # rolling only (conf/data/loader.yaml documents each)
    windows: int = 4
    window: int = 0
    initial_ratio: float = 0.5
    window_days: float | None = None
    cuts: list[int] | None = None
    fresh_after: int | None = None
    replay: float = 1.0


@dataclass
class NegativeSettings:
    sampler: str = "uniform"
    alpha: float = 0.75


@dataclass
class BehaviourSettings:
    column: str = "auto"
    rating_bounds: list[float] = field(default_factory=lambda: [3.0, 4.0])
    rating_classes: list[str] = field(default_factory=lambda: ["negative", "neutral", "positive"])


@dataclass
class DataSettings:
    """Every `data.*` key; the meaning of each is documented in conf/data/loader.yaml."""

    source: Any = None  # the source's own node (its `_target_` class checks its keys)
    root: str | None = None  # read by sources through ${data.root}
    item_template: str = "{title}"
    history_template: str = "{title}"
    max_item_tokens: int = 32
    max_history_tokens: int = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    length_grouping: bool = False
    max_sequence_length: int = 50
    window_stride: int | None = None
    use_cache: bool = True
    new_interactions: str | None = None
    cache_dir: str = "~/.cache/recsys_lm"
    filter: FilterSettings = field(default_factory=FilterSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    negatives: NegativeSettings = field(default_factory=NegativeSettings)
    train_negatives: int = 1
    eval_negatives: int = 99
    click_labels: str = "sampled"
    rating_threshold: float = 3.0
    history_items: int | None = None
    history_by_rating: bool = False
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    max_test_samples: int | None = None
    prompt: PromptText = field(default_factory=PromptText)
    eval_items: str = "all"
    eval_mode: str | None = None  # null: the task's default (its first eval mode)
    k: int = 10
    behaviour: BehaviourSettings = field(default_factory=BehaviourSettings)
    num_workers: int = 0
    seed: int = 0

    def max_samples(self, stage: str) -> int | None:
        return getattr(self, f"max_{stage}_samples")

    def check(self) -> None:
        """Values that are well-typed but cannot work; names the key."""
        if self.eval_items not in EVAL_ITEMS:
            raise ConfigError("data.eval_items", self.eval_items, f"one of {list(EVAL_ITEMS)}")
        if self.eval_mode is not None and self.eval_mode not in EVAL_MODES:
            raise ConfigError("data.eval_mode", self.eval_mode, f"one of {list(EVAL_MODES)}")
        if self.k < 1:
            raise ConfigError("data.k", self.k, "a positive cut-off")
        if (
            self.window_stride is not None
            and not 1 <= self.window_stride <= self.max_sequence_length
        ):
            raise ConfigError(
                "data.window_stride",
                self.window_stride,
                f"null or 1..data.max_sequence_length ({self.max_sequence_length})",
            )
        if self.click_labels not in CLICK_LABELS:
            raise ConfigError("data.click_labels", self.click_labels, f"one of {CLICK_LABELS}")
        for stage in ("train", "val", "test"):
            size = self.max_samples(stage)
            if size is not None and size < 1:
                raise ConfigError(f"data.max_{stage}_samples", size, "a positive count or null")
        if self.history_items is not None and self.history_items < 1:
            raise ConfigError("data.history_items", self.history_items, "a positive count or null")
        self._check_history_by_rating()
        if self.click_labels == "rating" and self.split.method not in TIME_ORDERED_SPLITS:
            raise ConfigError(
                "data.split.method",
                self.split.method,
                f"one of {TIME_ORDERED_SPLITS} with data.click_labels=rating: a sample's history "
                "is the interactions before it in time",
            )

    def _check_history_by_rating(self) -> None:
        # The split needs ratings, and words between the groups: otherwise the last liked
        # title would run into the first disliked one.
        if self.history_by_rating and self.click_labels != "rating":
            raise ConfigError(
                "data.click_labels", self.click_labels, "rating with data.history_by_rating=true"
            )
        if self.history_by_rating != bool(self.prompt.disliked_prefix):
            raise ConfigError(
                "data.prompt.disliked_prefix",
                self.prompt.disliked_prefix,
                "words before the disliked items exactly when data.history_by_rating=true",
            )

    def check_lengths(self, max_length: int, prompt_tokens: int = 0) -> None:
        need = self.max_history_tokens + self.max_item_tokens + 4 + prompt_tokens
        if need > max_length:
            words = f" + data.prompt's {prompt_tokens} tokens" if prompt_tokens else ""
            raise ConfigError(
                "data.max_history_tokens",
                self.max_history_tokens,
                f"max_history_tokens + max_item_tokens + special tokens{words} <= "
                f"backbone.max_length ({max_length}); got {need}",
            )


def data_settings(node: DictConfig) -> DataSettings:
    """`data.*` as DataSettings; unknown keys and wrong types stop here, naming the key."""
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("_target_", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataSettings), values)
        settings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "data"
        raise ConfigError(f"data.{key}", getattr(err, "msg", str(err)), _what(err)) from err
    settings.check()
    return settings


def _what(err: OmegaConfBaseException) -> str:
    if "not in" in str(err) or "not found" in str(err):
        return "a key documented in conf/data/loader.yaml (a misspelt key?)"
    return "a value of the type documented in conf/data/loader.yaml"
