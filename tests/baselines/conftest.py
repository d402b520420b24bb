"""Prepared sample data for the baseline tests: the built-in sample source, no cache files."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest

from recsys_lm.data.prepared import PreparedData, prepare
from recsys_lm.data.settings import DataSettings
from recsys_lm.data.sources.sample import SampleSource
from recsys_lm.data.tasks import get_task

SMALL = (("num_users", 40), ("num_items", 60))


@pytest.fixture(scope="session")
def prepared(tokenizer) -> Callable[..., PreparedData]:
    """prepared("click", source=SMALL, eval_negatives=9) -> PreparedData, built once per
    argument set in a session: treat it as read-only (`dataclasses.replace` to vary it)."""

    @cache
    def build(task: str = "retrieval", source: tuple = SMALL, **settings) -> PreparedData:
        values = DataSettings(**{"eval_negatives": 9, "use_cache": False, **settings})
        values.check()
        return prepare(SampleSource(**dict(source)), values, get_task(task), tokenizer, 128)

    return build
