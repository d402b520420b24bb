"""Graph-level caching for frozen layers: the hidden states after layer k, once per text.

With `freeze=bottom_k` the embeddings and the k lowest layers never change, so the states
they give a text are the same at every step and epoch. `FrozenLayerCache` computes them once
per distinct text (no grad) and feeds them in at layer k afterwards; the Hugging Face model
still runs its own forward (it builds its attention mask, positions and final norm), but the
k lowest blocks are swapped for pass-throughs for the duration of the call:

    layers[0 .. k-2] -> _Skip      returns its input (the embedding output, discarded)
    layers[k-1]      -> _Inject    returns the cached states, padded to the batch's width
    layers[k ..]                   run as usual, with gradients

Texts are keyed by their token ids (and segment ids), so every head that calls `Backbone`
shares one cache: the click cross-encoder's `history [SEP] candidate` rows (negatives are
drawn once, so reuse starts at epoch 2), the items a trained item side embeds every step
(reuse is immediate) and the catalogue embedded at each evaluation.

Equal outputs: a right-padded row's real-token states do not depend on its padding or on the
other rows (attention masks out padding keys), so the states of its n real tokens are stored
and zero-padded on use. The lower layers are run in eval mode: they are frozen, and the
dropout they would apply in training is noise that caching removes (the cached forward then
equals the uncached forward in eval mode; in training only the upper layers' dropout stays).

Memory per entry: n_tokens x hidden_size x 4 bytes in float32 (MiniLM, 384 hidden: 1.5 KB a
token, ~150 KB for a 100-token click pair; half that with `dtype=bfloat16` or `float16`),
plus ~0.3 KB of key and bookkeeping. `max_mb` bounds the stored bytes; once full, new texts
are computed but not stored: epochs visit texts in a cycle, where an LRU would evict each
entry just before its reuse and never hit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from recsys_lm.errors import ConfigError, RecsysLMError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheStats:
    """Counters since the cache was made: rows served from it, rows computed, the forward
    passes through the lower layers those took, and the bytes stored (`len(cache)` counts
    the stored texts)."""

    hits: int = 0
    misses: int = 0
    lower_passes: int = 0
    bytes: int = 0
    full_skips: int = 0  # rows computed but not stored because `max_mb` was reached


class _Skip(nn.Module):
    """A frozen block that is not run: its input goes through unchanged (and is unused)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Inject(nn.Module):
    """The last frozen block: gives the cached states instead of computing them."""

    def __init__(self, states: torch.Tensor) -> None:
        super().__init__()
        self.states = states

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.states.to(hidden_states.dtype)


@contextmanager
def _swapped(layers: nn.ModuleList, replacements: dict[int, nn.Module]) -> Iterator[None]:
    """`layers[i]` replaced by `replacements[i]` within the block, restored after."""
    saved = {i: layers[i] for i in replacements}
    for i, module in replacements.items():
        layers[i] = module
    try:
        yield
    finally:
        for i, module in saved.items():
            layers[i] = module


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode within the block, each one's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class FrozenLayerCache:
    """Hidden states after the `k` lowest layers of `layers` (the model's block list), per
    text. `dtype` is the storage type (float32 | bfloat16 | float16); `max_mb` bounds the
    stored bytes (None: unbounded). Entries live on the device they were computed on."""

    def __init__(
        self,
        layers: nn.ModuleList,
        k: int,
        frozen: list[nn.Parameter],
        dtype: str = "float32",
        max_mb: float | None = None,
    ) -> None:
        if not 1 <= k <= len(layers):
            raise ConfigError(
                "freeze.k", k, f"between 1 and the backbone's {len(layers)} layers to cache"
            )
        if dtype not in DTYPES:
            raise ConfigError("freeze.cache_dtype", dtype, f"one of {list(DTYPES)}")
        if max_mb is not None and max_mb <= 0:
            raise ConfigError("freeze.cache_max_mb", max_mb, "a positive number of MB, or null")
        self.layers, self.k = layers, k
        self.frozen = frozen  # every parameter below layer k: must stay frozen (check_frozen)
        self.check_frozen()
        self.dtype = DTYPES[dtype]
        self.max_bytes = None if max_mb is None else int(max_mb * 2**20)
        self.entries: dict[bytes, torch.Tensor] = {}
        self.stats = CacheStats()

    def check_frozen(self) -> None:
        """Cached states are valid only while nothing below layer k trains; checked at every
        call too, so that a later unfreeze (a callback, say) cannot leave stale states."""
        if any(p.requires_grad for p in self.frozen):
            raise ConfigError(
                "freeze.cache_frozen",
                True,
                f"false, or every parameter below layer {self.k} frozen: a trainable "
                "embedding or lower layer (or an adapter there) would change the cached states",
            )

    def __len__(self) -> int:
        """Texts stored."""
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.stats = CacheStats()

    def run(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
    ):
        """`model(input_ids=..., attention_mask=..., **kwargs)` with the lower layers' output
        read from the cache (computed for the rows it lacks)."""
        self.check_frozen()
        lengths = _right_padded_lengths(attention_mask)
        types = kwargs.get("token_type_ids")
        keys = _keys(input_ids, types, lengths)
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        fresh = self._compute(model, input_ids, attention_mask, kwargs, lengths, missing)
        rows = []
        for i, key in enumerate(keys):
            rows.append(fresh[i] if i in fresh else self.entries[key])
            if i in fresh:
                self._store(key, fresh[i])
        width = input_ids.shape[1]
        # A new tensor, not `new_zeros` of an entry: entries filled during evaluation are
        # inference-mode tensors, which autograd may read but not build on.
        shape = (len(rows), width, rows[0].shape[-1])
        states = torch.zeros(shape, dtype=self.dtype, device=rows[0].device)
        for i, row in enumerate(rows):
            states[i, : row.shape[0]] = row
        lower = {i: _Skip() for i in range(self.k - 1)}
        lower[self.k - 1] = _Inject(states)
        with _swapped(self.layers, lower):
            return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def _compute(
        self, model, input_ids, attention_mask, kwargs, lengths, rows: list[int]
    ) -> dict[int, torch.Tensor]:
        """States after layer k of `rows` (their real tokens only), in eval mode, no grad; the
        layers above k are skipped."""
        if not rows:
            return {}
        index = torch.tensor(rows, device=input_ids.device)
        width = int(max(lengths[i] for i in rows))
        sub = {
            name: value[index, :width] if isinstance(value, torch.Tensor) else value
            for name, value in kwargs.items()
        }
        captured: list[torch.Tensor] = []
        hook = self.layers[self.k - 1].register_forward_hook(
            lambda module, args, output: captured.append(
                output[0] if isinstance(output, tuple) else output
            )
        )
        upper = {i: _Skip() for i in range(self.k, len(self.layers))}
        try:
            with _eval_mode(model), _swapped(self.layers, upper):
                model(
                    input_ids=input_ids[index, :width],
                    attention_mask=attention_mask[index, :width],
                    **sub,
                )
        finally:
            hook.remove()
        self.stats.lower_passes += 1
        states = captured[0].to(self.dtype)
        return {i: states[j, : lengths[i]].clone() for j, i in enumerate(rows)}

    def _store(self, key: bytes, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if self.max_bytes is not None and self.stats.bytes + size > self.max_bytes:
            self.stats.full_skips += 1
            return
        self.entries[key] = states
        self.stats.bytes += size


def _right_padded_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Real tokens per row; the rows must be right-padded (as the framework pads them)."""
    lengths = attention_mask.sum(1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal((positions < lengths.unsqueeze(1)).to(attention_mask.dtype), attention_mask):
        raise RecsysLMError(
            "the frozen-layer cache needs right-padded batches (real tokens first in each row)"
        )
    return lengths.tolist()


def _keys(input_ids: torch.Tensor, types: torch.Tensor | None, lengths: list[int]) -> list[bytes]:
    """A 16-byte digest per row of its real token ids (and segment ids, which the
    embeddings read): the same text gives the same key in any batch, at any padding."""
    ids = input_ids.cpu().numpy()
    segments = types.cpu().numpy() if types is not None else None
    keys = []
    for i, n in enumerate(lengths):
        digest = hashlib.blake2b(ids[i, :n].tobytes(), digest_size=16)
        if segments is not None:
            digest.update(segments[i, :n].tobytes())
        keys.append(digest.digest())
    return keys
