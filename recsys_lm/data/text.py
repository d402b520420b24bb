"""Item and history text: templates render items, token ids are computed once and reused."""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from recsys_lm.errors import ConfigError, RecsysLMError


def render(items: pd.DataFrame, template: str, key: str) -> list[str]:
    """Format each item row with a plain `str.format` template such as "{title} ({genres})"."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = sorted(fields - set(items.columns))
    if missing:
        raise ConfigError(
            key,
            template,
            f"fields among the item columns {list(items.columns)}; {missing} not found",
        )
    records = items[sorted(fields)].fillna("").astype(str).to_dict("records")
    return [" ".join(template.format(**row).split()) for row in records]


@dataclass
class TokenLayout:
    """Where a tokenizer puts its special tokens around one text or a pair of texts.

    transformers v5 tokenizers no longer expose `build_inputs_with_special_tokens`, so the
    layout is read once from a probe encoding; ids cached without special tokens are then
    wrapped without calling the tokenizer again.
    """

    single_prefix: list[int]
    single_suffix: list[int]
    pair_prefix: list[int]
    pair_middle: list[int]
    pair_suffix: list[int]

    @classmethod
    def probe(cls, tokenizer) -> TokenLayout:
        a = tokenizer("alpha", add_special_tokens=False)["input_ids"]
        b = tokenizer("omega", add_special_tokens=False)["input_ids"]
        single = tokenizer("alpha")["input_ids"]
        pair = tokenizer("alpha", "omega")["input_ids"]
        i = _find(single, a)
        j = _find(pair, a)
        k = _find(pair[j + len(a) :], b) + j + len(a)
        return cls(
            single[:i], single[i + len(a) :], pair[:j], pair[j + len(a) : k], pair[k + len(b) :]
        )

    def single(self, ids: list[int]) -> tuple[list[int], list[int]]:
        full = self.single_prefix + ids + self.single_suffix
        return full, [0] * len(full)

    def pair(self, first: list[int], second: list[int]) -> tuple[list[int], list[int]]:
        head = self.pair_prefix + first + self.pair_middle
        tail = second + self.pair_suffix
        return head + tail, [0] * len(head) + [1] * len(tail)

    @property
    def single_overhead(self) -> int:
        return len(self.single_prefix) + len(self.single_suffix)

    @property
    def pair_overhead(self) -> int:
        return len(self.pair_prefix) + len(self.pair_middle) + len(self.pair_suffix)


@dataclass
class PromptText:
    """Fixed words around a (history, candidate) pair, from `data.prompt`:
    `history_prefix` + history + `candidate_prefix` + candidate + `question`; with
    `data.history_by_rating` the history is the liked items, `disliked_prefix`, the disliked.

    They are tokenized on their own, spaces kept (BPE tokenizers fold a leading space into the
    next word's token), and joined as ids; empty strings (the default) add no token, so an encoder click run reads
    exactly `history [SEP] candidate` as before.
    """

    history_prefix: str = ""
    candidate_prefix: str = ""
    question: str = ""
    disliked_prefix: str = ""


@dataclass(frozen=True)
class RatedHistory:
    """A history whose items carry the user's own verdict (TALLRec's liked / disliked split):
    `liked[i]` says whether `items[i]` was rated above the threshold. Only ratings given
    before the sample are here, never the sample's own."""

    items: tuple[int, ...]
    liked: tuple[bool, ...]


def _token_key(tokenizer, item_texts, history_texts, max_item_tokens: int) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab()))
    for part in (rules, str(max_item_tokens), *item_texts, "\x00", *history_texts):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x1f")
    return digest.hexdigest()[:32]


def _find(seq: list[int], sub: list[int]) -> int:
    for start in range(len(seq) - len(sub) + 1):
        if seq[start : start + len(sub)] == sub:
            return start
    raise ValueError("tokenizer probe: could not locate the probe text in its own encoding")


class TokenCache:
    """Token ids of every item's text and history snippet, computed once per dataset.

    With `cache_dir`, the ids are also kept on disk, keyed by the tokenizer's vocabulary and
    rules and by the exact texts, so a later run (another PEFT strategy in a sweep, say)
    skips tokenization altogether.
    """

    def __init__(
        self,
        tokenizer,
        item_texts: list[str],
        history_texts: list[str],
        max_item_tokens: int,
        history_separator: str = " ; ",
        cache_dir: str | Path | None = None,
        prompt: PromptText | None = None,
    ) -> None:
        self.layout = TokenLayout.probe(tokenizer)
        words = prompt or PromptText()
        self.prompt = {
            name: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            for name, text in vars(words).items()
        }
        self.separator = tokenizer(history_separator.strip(), add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id
        file = None
        if cache_dir is not None:
            key = _token_key(tokenizer, item_texts, history_texts, max_item_tokens)
            file = Path(cache_dir).expanduser() / "tokens" / f"{key}.pt"
        if file is not None and file.exists():
            saved = torch.load(file, weights_only=True)
            self.item_ids, self.history_ids = saved["item_ids"], saved["history_ids"]
            return
        encode = tokenizer(item_texts, add_special_tokens=False, truncation=False)["input_ids"]
        self.item_ids = [ids[:max_item_tokens] for ids in encode]
        self.history_ids = tokenizer(history_texts, add_special_tokens=False)["input_ids"]
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            partial = file.with_suffix(".part")
            torch.save({"item_ids": self.item_ids, "history_ids": self.history_ids}, partial)
            partial.replace(file)  # atomic: an interrupted write leaves no half cache

    def append(
        self, tokenizer, item_texts: list[str], history_texts: list[str], max_item_tokens: int
    ) -> list[int]:
        """Tokenize items added after the cache was built (serving takes new items by their
        text); returns their indices, which follow the existing items."""
        start = len(self.item_ids)
        encode = tokenizer(item_texts, add_special_tokens=False, truncation=False)["input_ids"]
        self.item_ids.extend(ids[:max_item_tokens] for ids in encode)
        self.history_ids.extend(tokenizer(history_texts, add_special_tokens=False)["input_ids"])
        return list(range(start, len(self.item_ids)))

    @property
    def prompt_overhead(self) -> int:
        """Tokens the prompt's fixed words add to every pair."""
        return sum(map(len, self.prompt.values()))

    def pair(
        self, history: list[int] | RatedHistory, item: int, budget: int
    ) -> tuple[list[int], list[int]]:
        """(ids, segment ids) of history and candidate with the prompt's words around them."""
        words = self.prompt
        return self.layout.pair(
            words["history_prefix"] + self.history_text(history, budget),
            words["candidate_prefix"] + self.item_ids[item] + words["question"],
        )

    def continuation(self, history: list[int], item: int, budget: int) -> tuple[list[int], int]:
        """The history prompt continued by the item's text (no question): the ids and where
        the item's tokens start; they fill the next `len(item_ids[item])` positions."""
        words, layout = self.prompt, self.layout
        head = (
            layout.pair_prefix
            + words["history_prefix"]
            + self.history_text(history, budget)
            + layout.pair_middle
            + words["candidate_prefix"]
        )
        return head + self.item_ids[item] + layout.pair_suffix, len(head)

    def history(self, items: list[int], budget: int) -> list[int]:
        """The most recent items' snippets that fit `budget` tokens, oldest first."""
        return self._join(self._recent(items, budget)[::-1])

    def rated_history(self, history: RatedHistory, budget: int) -> list[int]:
        """The same recent items, liked ones first, then `disliked_prefix` and the disliked
        ones (each group oldest first): TALLRec's "likes: ... dislikes: ..." prompt."""
        pieces = self._recent(list(history.items), budget)[::-1]
        verdicts = history.liked[len(history.items) - len(pieces) :]
        liked = [p for p, ok in zip(pieces, verdicts, strict=True) if ok]
        disliked = [p for p, ok in zip(pieces, verdicts, strict=True) if not ok]
        return self._join(liked) + self.prompt["disliked_prefix"] + self._join(disliked)

    def history_text(self, history: list[int] | RatedHistory, budget: int) -> list[int]:
        """Ids of a click row's history: in time order, or split by rating when rated."""
        if isinstance(history, RatedHistory):
            return self.rated_history(history, budget)
        if self.prompt["disliked_prefix"]:
            # Serving passes plain histories: without the user's ratings the prompt would
            # put every item under "likes", which the model never saw in training.
            raise RecsysLMError(
                "this model reads histories split by the user's ratings "
                "(data.history_by_rating=true), and this history has no ratings: score it "
                "with rated histories, or serve a model trained with data.history_by_rating=false"
            )
        return self.history(history, budget)

    def _recent(self, items: list[int], budget: int) -> list[list[int]]:
        """Snippets of the most recent items that fit `budget` tokens with their separators,
        newest first; the separators between any subset of them fit too."""
        pieces: list[list[int]] = []
        used = 0
        for item in reversed(items):
            piece = self.history_ids[item]
            cost = len(piece) + (len(self.separator) if pieces else 0)
            if used + cost > budget:
                if not pieces:  # always keep (the tail of) the most recent item
                    pieces.append(piece[-budget:])
                break
            pieces.append(piece)
            used += cost
        return pieces

    def _join(self, pieces: list[list[int]]) -> list[int]:
        out: list[int] = []
        for piece in pieces:
            out.extend((self.separator if out else []) + piece)
        return out
