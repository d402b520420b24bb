"""Interaction filters applied before splitting: k-core and minimum history length."""

from __future__ import annotations

import pandas as pd


def k_core(
    frame: pd.DataFrame, min_user: int = 0, min_item: int = 0, max_rounds: int = 100
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop users with < `min_user` and items with < `min_item` interactions, repeatedly,
    until both hold (removing an item can push a user under the bar and vice versa).

    `frame` has `user_id` and `item_id`; returns the kept rows and what went, by reason.
    """
    dropped = {"user below min_user_interactions": 0, "item below min_item_interactions": 0}
    for _ in range(max_rounds):
        before = len(frame)
        if min_item > 0:
            keep = frame.groupby("item_id")["user_id"].transform("size") >= min_item
            dropped["item below min_item_interactions"] += int((~keep).sum())
            frame = frame[keep]
        if min_user > 0:
            keep = frame.groupby("user_id")["item_id"].transform("size") >= min_user
            dropped["user below min_user_interactions"] += int((~keep).sum())
            frame = frame[keep]
        if len(frame) == before:
            break
    return frame.reset_index(drop=True), {k: v for k, v in dropped.items() if v}
