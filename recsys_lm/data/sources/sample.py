"""Built-in sample data, generated deterministically in code: no files, no network.

Items get realistic text (title, category, brand or genre); users get latent tastes (favourite
categories and brands) and a sequential habit (the next item often shares the previous item's
category). Item popularity is Zipf-like, so popularity is a real but beatable baseline: a model
that reads the history's text can learn the tastes and habits that popularity ignores.

Every interaction also has explicit feedback: a `rating` (1-5) and a `behaviour` (view, click
or buy), both higher for items in the user's favourite categories and by the favourite maker,
plus per-item quality, per-user leniency and noise. They are drawn from a second generator
(seed + 1) after everything else, so items, sequences and timestamps are the same as before
feedback existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from recsys_lm.data.canonical import CanonicalData
from recsys_lm.errors import ConfigError

# Each flavour: category -> (nouns, words for titles, makers). Makers are brands (e-commerce),
# news desks' sub-categories (news) or directors (video).
ECOM = {
    "Headphones": (
        ["Headphones", "Earbuds", "Headset"],
        ["Wireless", "Noise Cancelling", "Bass", "Studio", "Sport"],
        ["Sonora", "Acoustix", "Beatline"],
    ),
    "Running Shoes": (
        ["Running Shoes", "Trail Runners", "Sneakers"],
        ["Lightweight", "Cushioned", "Waterproof", "Racing", "Stability"],
        ["Stride", "Pacer", "Fleetfoot"],
    ),
    "Coffee": (
        ["Coffee Beans", "Espresso Roast", "Cold Brew Pack"],
        ["Dark Roast", "Single Origin", "Organic", "Decaf", "Medium Roast"],
        ["Bean Co", "Roastery", "Morning Ritual"],
    ),
    "Kitchen": (
        ["Chef Knife", "Frying Pan", "Cutting Board"],
        ["Stainless", "Non-Stick", "Cast Iron", "Bamboo", "Professional"],
        ["Culina", "HomeChef", "Forge"],
    ),
    "Books": (
        ["Mystery Novel", "Cookbook", "Biography"],
        ["Bestselling", "Illustrated", "Paperback", "Hardcover", "Classic"],
        ["Penfold Press", "Lantern Books", "Quill"],
    ),
    "Camping": (
        ["Tent", "Sleeping Bag", "Camping Stove"],
        ["Ultralight", "4-Season", "Compact", "Family Size", "Backpacking"],
        ["Summit", "Trailhead", "Northwild"],
    ),
    "Skincare": (
        ["Moisturizer", "Sunscreen", "Face Serum"],
        ["Hydrating", "SPF 50", "Fragrance-Free", "Vitamin C", "Sensitive Skin"],
        ["Glow Lab", "Dermaclear", "Petal"],
    ),
    "Toys": (
        ["Building Blocks", "Puzzle", "Board Game"],
        ["Educational", "1000-Piece", "Family", "STEM", "Wooden"],
        ["Playwise", "Kidcraft", "Brickton"],
    ),
}
NEWS = {
    "sports": (
        ["quarterback", "striker", "coach", "championship", "playoffs"],
        ["wins", "stuns rivals in", "signs for", "injured before", "celebrates"],
        ["football", "soccer", "basketball"],
    ),
    "politics": (
        ["senate", "governor", "election", "campaign", "president"],
        ["debates", "passes bill on", "faces pressure over", "announces", "rejects"],
        ["elections", "congress", "policy"],
    ),
    "technology": (
        ["smartphone", "startup", "AI model", "chipmaker", "app"],
        ["launches", "unveils", "patches flaw in", "raises funds for", "recalls"],
        ["gadgets", "ai", "security"],
    ),
    "health": (
        ["vaccine", "diet", "sleep study", "hospital", "workout"],
        ["linked to", "improves", "reduces risk of", "doctors warn about", "rethinks"],
        ["medical", "fitness", "nutrition"],
    ),
    "finance": (
        ["stocks", "bank", "mortgage rates", "inflation", "crypto"],
        ["rally after", "slump on", "surge amid", "fall over", "steady ahead of"],
        ["markets", "personal finance", "economy"],
    ),
    "travel": (
        ["beach resort", "national park", "airline", "road trip", "island"],
        ["reopens", "tops list of", "cuts fares to", "guide to", "hidden gems in"],
        ["destinations", "flights", "tips"],
    ),
    "food": (
        ["pasta recipe", "bakery", "barbecue", "vegan dish", "chef"],
        ["shares secret of", "best ever", "wins award for", "quick", "reinvents"],
        ["recipes", "restaurants", "baking"],
    ),
    "entertainment": (
        ["pop star", "box office", "sitcom", "award show", "album"],
        ["breaks record at", "returns to", "teases new", "tops charts with", "reviews"],
        ["music", "tv", "movies"],
    ),
}
VIDEO = {
    "Action": (
        ["Mission", "Strike", "Fury", "Escape", "Vendetta"],
        ["Final", "Deadly", "Iron", "Rogue", "Midnight"],
        ["R. Kane", "J. Stahl", "M. Ortiz"],
    ),
    "Comedy": (
        ["Wedding", "Roommates", "Vacation", "Neighbors", "Reunion"],
        ["Crazy", "Awkward", "Big Fat", "Totally", "Accidental"],
        ["L. Bloom", "P. Hart", "D. Fine"],
    ),
    "Horror": (
        ["House", "Curse", "Woods", "Ritual", "Whispers"],
        ["Haunted", "Silent", "Bloody", "Hollow", "Dark"],
        ["W. Crane", "E. Voss", "S. Graves"],
    ),
    "Romance": (
        ["Summer", "Letters", "Promise", "Heart", "Kiss"],
        ["Endless", "Second", "Secret", "Paris", "Last"],
        ["A. Rose", "C. Belle", "N. Amor"],
    ),
    "Sci-Fi": (
        ["Galaxy", "Android", "Colony", "Signal", "Horizon"],
        ["Quantum", "Lost", "Stellar", "Neon", "Infinite"],
        ["K. Nova", "T. Orbit", "Z. Lumen"],
    ),
    "Animation": (
        ["Dragon", "Kingdom", "Robot", "Forest", "Adventure"],
        ["Little", "Magic", "Brave", "Tiny", "Flying"],
        ["H. Pixel", "F. Toon", "G. Sketch"],
    ),
    "Documentary": (
        ["Ocean", "Planet", "Empire", "Mountain", "Revolution"],
        ["Inside the", "Secrets of the", "Rise of the", "Wild", "Frozen"],
        ["B. Fact", "V. Lens", "O. True"],
    ),
    "Drama": (
        ["Family", "Courtroom", "Journey", "Silence", "Harvest"],
        ["Broken", "Quiet", "American", "Long", "Distant"],
        ["Q. Stone", "U. Reyes", "I. Marsh"],
    ),
}
FLAVOURS = {"ecom": ECOM, "news": NEWS, "video": VIDEO}
# Per-interaction columns kept only until the feedback is drawn.
AFFINITY = ("_liked", "_fav", "_user", "_item")


@dataclass
class SampleSource:
    """Deterministic synthetic interactions in one of three domains (`ecom`, `news`, `video`)."""

    flavour: str = "ecom"
    num_users: int = 300
    num_items: int = 400
    min_history: int = 10
    max_history: int = 30
    sequential_prob: float = 0.5  # next item shares the previous item's category
    taste_prob: float = 0.35  # next item comes from a favourite category
    seed: int = 7

    parser_version: ClassVar[int] = 1  # bump when the generated data changes for the same settings

    @property
    def name(self) -> str:
        return f"sample_{self.flavour}"

    def prepare(self) -> None:
        """Nothing to download: the data is generated in code."""

    def raw_files(self) -> list[Path]:
        """No files: the settings (and `parser_version`) are the whole cache key."""
        return []

    def load(self) -> CanonicalData:
        if self.flavour not in FLAVOURS:
            raise ConfigError("data.source.flavour", self.flavour, f"one of {list(FLAVOURS)}")
        rng = np.random.default_rng(self.seed)
        items = self._items(rng)
        interactions = self._interactions(rng, items)
        interactions = self._feedback(np.random.default_rng(self.seed + 1), interactions)
        return CanonicalData(self.name, items.drop(columns=["_cat", "_maker"]), interactions)

    def _items(self, rng: np.random.Generator) -> pd.DataFrame:
        table = FLAVOURS[self.flavour]
        categories = list(table)
        rows, seen = [], set()
        while len(rows) < self.num_items:
            cat = categories[len(rows) % len(categories)]
            nouns, words, makers = table[cat]
            noun, word, maker = rng.choice(nouns), rng.choice(words), rng.choice(makers)
            title = self._title(rng, cat, str(noun), str(word), str(maker))
            if title in seen:
                continue
            seen.add(title)
            rows.append(
                {"item_id": f"{self.flavour[0]}{len(rows):05d}", "title": title, "_cat": cat}
                | self._fields(rng, cat, str(maker))
            )
        return pd.DataFrame(rows)

    def _title(self, rng, cat: str, noun: str, word: str, maker: str) -> str:
        if self.flavour == "ecom":
            return f"{maker} {word} {noun} {rng.choice(['Pro', 'Plus', 'Lite', 'Max', 'Mini', 'X', '2', '3'])}"
        if self.flavour == "news":
            who = rng.choice(["Local", "Top", "New", "Veteran", "Rising", "Star"])
            return f"{who} {noun} {word} {rng.choice(['Boston', 'Denver', 'Austin', 'Seattle', 'Miami', 'Chicago'])}".capitalize()
        year = int(rng.integers(1970, 2024))
        return (
            f"{word} {noun} {rng.choice(['', 'II', 'Returns', 'Rising', 'Forever'])}".strip()
            + f" ({year})"
        )

    def _fields(self, rng, cat: str, maker: str) -> dict:
        if self.flavour == "ecom":
            return {"category": cat, "brand": maker, "_maker": maker}
        if self.flavour == "news":
            return {"category": cat, "subcategory": maker, "_maker": maker}
        other = rng.choice([c for c in VIDEO if c != cat])
        genres = f"{cat}|{other}" if rng.random() < 0.4 else cat
        return {"genres": genres, "director": maker, "_maker": maker}

    def _interactions(self, rng: np.random.Generator, items: pd.DataFrame) -> pd.DataFrame:
        n = len(items)
        popularity = 1.0 / np.arange(1, n + 1) ** 0.9
        popularity = popularity[rng.permutation(n)]
        cats = items["_cat"].to_numpy()
        makers = items["_maker"].to_numpy()
        categories = np.unique(cats)
        by_cat = {c: np.flatnonzero(cats == c) for c in categories}
        rows, t0 = [], 1_600_000_000
        for u in range(self.num_users):
            likes = rng.choice(categories, size=int(rng.integers(1, 3)), replace=False)
            fav_maker = rng.choice(makers[np.isin(cats, likes)])
            liked = set(likes.tolist())
            length = int(rng.integers(self.min_history, self.max_history + 1))
            seen: set[int] = set()
            prev_cat = rng.choice(likes)
            t = t0 + int(rng.integers(0, 86_400 * 30))
            for _ in range(length):
                r = rng.random()
                if r < self.sequential_prob:
                    pool = by_cat[prev_cat]
                elif r < self.sequential_prob + self.taste_prob:
                    pool = by_cat[rng.choice(likes)]
                else:
                    pool = np.arange(n)
                pool = np.array([i for i in pool if i not in seen]) if seen else pool
                if len(pool) == 0:
                    pool = np.array([i for i in range(n) if i not in seen])
                weight = popularity[pool] * np.where(makers[pool] == fav_maker, 4.0, 1.0)
                item = int(rng.choice(pool, p=weight / weight.sum()))
                seen.add(item)
                prev_cat = cats[item]
                t += int(rng.integers(60, 86_400))
                # The user's affinity to the item travels along (no draw) for _feedback.
                affinity = (cats[item] in liked, makers[item] == fav_maker, u, item)
                rows.append((f"u{u:05d}", items.at[item, "item_id"], t, *affinity))
        columns = ["user_id", "item_id", "timestamp", *AFFINITY]
        return pd.DataFrame(rows, columns=columns).astype({"timestamp": "int64"})

    def _feedback(self, rng: np.random.Generator, frame: pd.DataFrame) -> pd.DataFrame:
        """Rating 1-5 and behaviour (view / click / buy) from the user's affinity to the item
        (learnable from the history's text), the item's quality and the user's leniency
        (learnable from averages) and noise."""
        quality = rng.normal(0.0, 0.5, self.num_items)
        leniency = rng.normal(0.0, 0.4, self.num_users)
        item, user = frame["_item"].to_numpy(), frame["_user"].to_numpy()
        affinity = 1.2 * frame["_liked"].to_numpy() + 0.6 * frame["_fav"].to_numpy()
        taste = affinity + quality[item]
        latent = 2.4 + taste + leniency[user] + rng.normal(0.0, 0.6, len(frame))
        engagement = taste + rng.normal(0.0, 0.6, len(frame))
        return frame.drop(columns=list(AFFINITY)).assign(
            rating=np.clip(np.rint(latent), 1, 5).astype("float32"),
            behaviour=np.select([engagement >= 2.0, engagement >= 1.2], ["buy", "click"], "view"),
        )
